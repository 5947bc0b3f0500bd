"""Markdown result tables from study directories (run directories plus their ``eval.json``).

Each table puts every student next to its no-teacher baseline and the teacher, with the step of
the best dev checkpoint it was scored at (``hf_best/megadistill.json``), as ``docs/results.md``
requires. The numbers are those ``tools/evaluate.py`` wrote; nothing is recomputed here.
"""

from __future__ import annotations

import json
from pathlib import Path

from megadistill.files import tree_bytes

__all__ = ["OWN_TOKENIZER_RUNS", "POST_ROWS", "own_tokenizer_table", "post_table"]

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


POST_ROWS = {
    "depth2_reduced": "depth -2: reduced by importance, not healed", "depth2_healed": "depth -2: reduced + healed (KD)",
    "depth2_predistilled": "depth -2: uniform teacher layers + pre-distilled (KD)",
    "depth4_reduced": "depth -4: reduced by importance, not healed", "depth4_healed": "depth -4: reduced + healed (KD)",
    "depth4_predistilled": "depth -4: uniform teacher layers + pre-distilled (KD)",
    "depth6_reduced": "depth -6: reduced by importance, not healed", "depth6_healed": "depth -6: reduced + healed (KD)",
    "depth6_predistilled": "depth -6: uniform teacher layers + pre-distilled (KD)",
    "depth6_no_teacher": "depth -6: reduced, trained with CE only (no teacher)",
    "mlp50_reduced": "MLP 50%: reduced, not healed", "mlp50_healed": "MLP 50%: reduced + healed (KD)",
    "vocab_trimmed": "vocabulary trimmed to the language (no training)",
    "small_no_teacher": "4 layers: CE on the corpus (no teacher)", "small_token_kd": "4 layers: token-level KD (forward KL)",
    "small_seq_kd": "4 layers: sequence-level KD (CE on teacher samples)",
    "small_on_policy": "4 layers: on-policy KD (GKD, lambda 0.5, forward KL)",
}
"""Model name in ``eval.json`` -> row label of ``launch_scripts/post_study.sh``."""


def _post_step(run_dir: Path, name: str) -> str:
    """``best step / steps`` of a trained row, ``-`` for a model scored as reduced (``hf_init``)."""
    if name.endswith("_reduced") or name.startswith("vocab_") or not (run_dir / "hf_best").is_dir():
        return "-"
    return "{step} / {steps}".format(**_best(run_dir))


def _run_of(name: str) -> str:
    """The run directory holding a row's model (a reduced-only row is the ``hf_init`` of its healed run)."""
    return name.replace("_reduced", "_healed")


def post_table(study_dir: str | Path) -> str:
    """The post-training study table: per language, the teacher and every reduced / healed / baseline student.

    Columns: non-embedding and total parameters, disk size of the fp32 export (MB), bits/char on
    SIB-200 dev (at the best dev checkpoint for trained rows), relative to the teacher, best dev
    step / steps.

    Raises:
        FileNotFoundError: no ``<lang>/eval.json`` under ``study_dir``.
        ValueError: a file that is not JSON.
    """
    study_dir = Path(study_dir)
    evals = sorted(study_dir.glob("*/eval.json"))
    if not evals:
        raise FileNotFoundError(f"{study_dir} holds no <lang>/eval.json: run launch_scripts/post_study.sh first")
    lines = ["| language | model | non-emb. params | total params | disk MB | bits/char | vs teacher | best step / steps |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for path in evals:
        records = {r["name"]: r for r in _read_json(path)["results"]}
        teacher = records.get("teacher", {}).get("bits_per_char")
        for name in ("teacher", *POST_ROWS):
            if name not in records:
                continue
            r, run_dir = records[name], path.parent / _run_of(name)
            export = run_dir / ("hf_init" if name.endswith("_reduced") or name.startswith("vocab_") else "hf_best")
            disk = f"{tree_bytes(export) / 1e6:.0f}" if export.is_dir() else "-"
            rel = f"{100 * (r['bits_per_char'] / teacher - 1):+.1f}%" if teacher and name != "teacher" else "-"
            lines.append(f"| {r['language']} | {POST_ROWS.get(name, 'teacher (Gemma 3 270M)')} | "
                         f"{r['parameters']['non_embedding'] / 1e6:.1f}M | {r['parameters']['total'] / 1e6:.1f}M | {disk} | "
                         f"{r['bits_per_char']:.4f} | {rel} | {_post_step(run_dir, name)} |")
        full = path.parent / "vocab_full" / "hf_init"
        if full.is_dir():
            lines.append(f"| {path.parent.name} | full vocabulary (the teacher as an fp32 export) | - | - | "
                         f"{tree_bytes(full) / 1e6:.0f} | = teacher | - | - |")
    return "\n".join(lines)
