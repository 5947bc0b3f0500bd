#!/usr/bin/env bash
# Sourced by the other launch scripts: create (once) and activate the project's virtual
# environment in $MEGADISTILL_VENV (default: .venv in the checkout), with the project
# installed in editable mode plus the extras named in $MEGADISTILL_EXTRAS.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MEGADISTILL_VENV:-$root/.venv}
extras=${MEGADISTILL_EXTRAS:-demo,dev}
stamp="$venv/.megadistill-installed-$extras-$(sha256sum "$root/pyproject.toml" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[env] setting up $venv (extras: $extras)" >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # Pin torch first: 2.13.0 is the CPU build on the project's machines; a plain range would pull a CUDA build.
  "$venv/bin/python" -m pip install -q "torch==2.13.0"
  "$venv/bin/python" -m pip install -q -e "$root[$extras]"
  touch "$stamp"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
export PYTHONUNBUFFERED=1
