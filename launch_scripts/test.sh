#!/usr/bin/env bash
# Run the test suite on CPU (installs the environment on first use). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
MEGADISTILL_EXTRAS=${MEGADISTILL_EXTRAS:-dev} source launch_scripts/env.sh
exec python -m pytest -q tests "$@"
