"""Task benchmark: trained classifiers (several seeds each) and the MLP floor scored per language, as a table.

For each language the test (or dev) split is read once; every run directory of a model is
scored on it (:func:`megadistill.task_eval.predict_classes`, accuracy and macro-F1 in percent)
and the runs of one model are summarized as mean and sample standard deviation over seeds. The
SIB-200 MLP baseline (:func:`megadistill.task_eval.mlp_baseline`) trains per language on that
language's training split, as in the paper, once per seed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megadistill.data.tasks import TaskSplit, load_split
from megadistill.task_eval import classification_scores, mlp_baseline, predict_classes, summarize_seeds

log = logging.getLogger(__name__)

__all__ = ["format_task_table", "score_classifier", "score_mlp", "task_report"]


def score_classifier(path: str | Path, splits: dict[str, TaskSplit], max_len_tokens: int,
                     batch_size: int = 32) -> tuple[dict[str, dict[str, float]], dict]:
    """Scores of one saved classifier on each language's split, and facts about it.

    Returns:
        ``({lang: {"accuracy", "macro_f1", "examples"}}, {"path", "parameters", "protocol", "seed", "best"})``.

    Raises:
        ValueError: the checkpoint's labels differ from the task's (naming both).
    """
    from megadistill.models.teacher import count_parameters
    from megadistill.stages.task import load_classifier

    label_set = next(iter(splits.values())).label_set
    model, tokenizer = load_classifier(Path(path), label_set, "evaluated")
    scores = {}
    for lang, split in splits.items():
        pred, _ = predict_classes(model, tokenizer, split.texts, batch_size=batch_size, max_len_tokens=max_len_tokens)
        scores[lang] = classification_scores(split.labels, pred, len(label_set))
    meta_file = Path(path) / "megadistill.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
    seed = meta.get("config", {}).get("train", {}).get("seed")
    return scores, {"path": str(path), "parameters": count_parameters(model), "protocol": meta.get("protocol"),
                    "seed": seed, "best": meta.get("best")}


def score_mlp(train: dict[str, TaskSplit], test: dict[str, TaskSplit], seed: int, analyzer: str) -> dict[str, dict[str, float]]:
    """The MLP baseline trained and scored per language (one seed)."""
    out = {}
    for lang, split in test.items():
        pred = mlp_baseline(train[lang].texts, train[lang].labels, split.texts, seed=seed, analyzer=analyzer)
        out[lang] = classification_scores(split.labels, pred, len(split.label_set))
    return out


def _summaries(per_run: list[dict[str, dict[str, float]]], languages: Sequence[str]) -> dict:
    """``{lang: {"accuracy": {mean, std, n}, "macro_f1": ...}}`` plus ``"mean"``: the language average per run."""
    out = {lang: summarize_seeds([run[lang] for run in per_run]) for lang in languages}
    averages = [{k: float(np.mean([run[lang][k] for lang in languages])) for k in ("accuracy", "macro_f1")}
                for run in per_run]
    out["mean"] = summarize_seeds(averages)
    return out


def task_report(models: Sequence[tuple[str, Sequence[str]]], data_dir: str | Path, languages: Sequence[str],
                split: str = "test", max_len_tokens: int = 164, mlp_seeds: Sequence[int] = (),
                mlp_analyzers: Sequence[str] = ("word",), batch_size: int = 32) -> dict:
    """Per-language scores of every model (its runs = seeds) and of the MLP baseline, with seed summaries.

    Returns:
        ``{"split", "languages", "models": {name: {"runs": [facts], "scores": [per-run], "summary"}}}``;
        MLP rows are named ``mlp-<analyzer>``.

    Raises:
        FileNotFoundError / ValueError: missing task files or checkpoints, mismatched labels.
    """
    tests = {lang: load_split(data_dir, [lang], split) for lang in languages}
    report = {"split": split, "languages": list(languages), "max_len_tokens": max_len_tokens, "models": {}}
    for name, paths in models:
        results = []
        for path in paths:
            log.info("scoring %s: %s", name, path)
            results.append(score_classifier(path, tests, max_len_tokens, batch_size))
        report["models"][name] = {"runs": [facts for _, facts in results], "scores": [s for s, _ in results],
                                  "summary": _summaries([s for s, _ in results], languages)}
    if mlp_seeds:
        trains = {lang: load_split(data_dir, [lang], "train") for lang in languages}
        for analyzer in mlp_analyzers:
            scores = [score_mlp(trains, tests, seed, analyzer) for seed in mlp_seeds]
            report["models"][f"mlp-{analyzer}"] = {"runs": [{"seed": s} for s in mlp_seeds], "scores": scores,
                                                   "summary": _summaries(scores, languages)}
    return report


def _cell(summary: dict) -> str:
    mean, std, n = summary["mean"], summary["std"], summary["n"]
    return f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def format_task_table(report: dict, metric: str = "accuracy", reference: str | None = None) -> str:
    """A Markdown table: one row per model, one column per language plus the mean, ``metric`` mean ± std (percent).

    ``reference`` names the model whose total parameter count the ``params`` column divides by.
    """
    languages = report["languages"]
    head = ["model", "seeds", *languages, "mean", "params (M)", "params / ref"]
    ref_params = None
    if reference in report["models"]:
        ref_params = report["models"][reference]["runs"][0]["parameters"]["total"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in report["models"].items():
        summary = entry["summary"]
        params = entry["runs"][0].get("parameters")
        total = f"{params['total'] / 1e6:.1f}" if params else "-"
        ratio = f"{params['total'] / ref_params:.3f}" if params and ref_params else "-"
        cells = [_cell(summary[lang][metric]) for lang in languages] + [_cell(summary["mean"][metric])]
        lines.append("| " + " | ".join([name, str(len(entry["scores"])), *cells, total, ratio]) + " |")
    return "\n".join(lines)
