"""Markdown result tables from study directories (run directories plus their ``eval.json``).

Each table puts every student next to its no-teacher baseline and the teacher, with the step of
the best dev checkpoint it was scored at (``hf_best/megadistill.json``), as ``docs/results.md``
requires. The numbers are those ``tools/evaluate.py`` wrote; nothing is recomputed here.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["OWN_TOKENIZER_RUNS", "own_tokenizer_table"]

OWN_TOKENIZER_RUNS = {
    "a_trimmed": "a) trimmed teacher vocabulary, distilled",
    "b_own_none": "b) own tokenizer, no teacher",
    "c_own_uld": "c) own tokenizer + ULD",
    "d_own_span": "d) own tokenizer + span-aligned KD",
}
"""Run directory name -> row label of ``launch_scripts/own_tokenizer_study.sh``."""


def _read_json(path: Path) -> dict:
    """A JSON file, or a ValueError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: run launch_scripts/own_tokenizer_study.sh first") from None
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def _best(run_dir: Path) -> dict:
    """Best-dev-checkpoint facts of a run: ``step``, its dev ``ce`` and the non-embedding parameters."""
    meta = _read_json(run_dir / "hf_best" / "megadistill.json")["best"]
    summary_file = run_dir / "summary.json"
    summary = _read_json(summary_file) if summary_file.is_file() else {}
    return {"step": meta["step"], "steps": summary.get("steps"), "train_time_s": summary.get("train_time_s")}


def own_tokenizer_table(study_dir: str | Path) -> str:
    """The own-tokenizer study table: per language, teacher and the four students (a-d).

    Columns: tokens/char and bits/char on SIB-200 dev (each model with its own tokenizer),
    bits/char relative to the no-teacher student (b), inference characters/s, non-embedding
    parameters, best dev step / steps trained.

    Raises:
        FileNotFoundError: no ``<lang>/eval.json`` under ``study_dir``, or a run without ``hf_best/``.
        ValueError: a file that is not JSON.
    """
    study_dir = Path(study_dir)
    evals = sorted(study_dir.glob("*/eval.json"))
    if not evals:
        raise FileNotFoundError(f"{study_dir} holds no <lang>/eval.json: run launch_scripts/own_tokenizer_study.sh first")
    lines = ["| language | model | tokens/char | bits/char | vs (b) | chars/s | non-emb. params | best step / steps |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for path in evals:
        records = {r["name"]: r for r in _read_json(path)["results"]}
        baseline = records.get("b_own_none", {}).get("bits_per_char")
        for name in ("teacher", *OWN_TOKENIZER_RUNS):
            if name not in records:
                continue
            r = records[name]
            label = OWN_TOKENIZER_RUNS.get(name, "teacher (Gemma 3 270M)")
            steps = "-" if name == "teacher" else "{step} / {steps}".format(**_best(path.parent / name))
            rel = f"{100 * (r['bits_per_char'] / baseline - 1):+.1f}%" if baseline and name != "teacher" else "-"
            lines.append(f"| {r['language']} | {label} | {r['tokens_per_char']:.3f} | {r['bits_per_char']:.4f} | {rel} | "
                         f"{r['chars_per_s']:.0f} | {r['parameters']['non_embedding'] / 1e6:.1f}M | {steps} |")
    return "\n".join(lines)
