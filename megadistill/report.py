"""Markdown result tables (and plots) from study directories (run directories plus their ``eval.json``).

Each table puts every student next to its no-teacher baseline and the teacher, with the step of
the best dev checkpoint it was scored at (``hf_best/megadistill.json``), as ``docs/results.md``
requires. The numbers are those ``tools/evaluate.py`` wrote; nothing is recomputed here.

The experiment grid (:func:`grid_table`, :func:`grid_plots`) reads the layout the grid runner
(``tools/run_experiments.py``) writes::

    DIR/grid.json                    {"name", "languages", "cells": {cell: {"overrides", "baseline", "view",
                                      "description"}}, "common", "recipe", "teacher"}
    DIR/<lang>/teacher/eval.json     the teacher on the native text (model name "teacher")
    DIR/<lang>/teacher_<view>/eval.json   the teacher on a romanized view (optional)
    DIR/<lang>/<cell>/eval.json      the cell's hf_best (model name = cell name)
    DIR/<lang>/<cell>/summary.json, metrics.jsonl, hf_best/megadistill.json, cell.json

A cell of a romanized view is scored per character of the native text (``tools/evaluate.py
--chars-from``), so every bits/char of a language divides by the same characters and compares
with the native teacher's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from megadistill.files import tree_bytes

__all__ = ["OWN_TOKENIZER_RUNS", "POST_ROWS", "grid_plots", "grid_table", "load_grid", "own_tokenizer_table",
           "post_table"]

OWN_TOKENIZER_RUNS = {
    "a_trimmed": "a) trimmed teacher vocabulary, distilled",
    "b_own_none": "b) own tokenizer, no teacher",
    "c_own_uld": "c) own tokenizer + ULD",
    "d_own_span": "d) own tokenizer + span-aligned KD",
}
"""Run directory name -> row label of ``launch_scripts/own_tokenizer_study.sh``."""


def _read_json(path: Path, hint: str = "run launch_scripts/own_tokenizer_study.sh first") -> dict:
    """A JSON file, or a ValueError naming it (FileNotFoundError with ``hint`` when it is missing)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: {hint}") from None
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


# ---------------------------------------------------------------- experiment grid

GRID_HINT = "run tools/run_experiments.py on the grid first"


@dataclass
class GridRun:
    """One model of one language in a grid study: a cell, or the teacher on a view.

    Attributes:
        name: cell name (``teacher`` / ``teacher_<view>`` for the teacher rows).
        view: ``native``, ``iso`` or ``itrans`` (the text the model reads).
        run_dir: ``DIR/<lang>/<name>``.
        record: its ``tools/evaluate.py`` result (bits/char at the best dev checkpoint); None when
            not run (no ``eval.json`` yet).
        baseline: the cell it is compared with (``grid.json``), None for none.
        best_step: optimizer step of ``hf_best`` (``hf_best/megadistill.json``), None when absent.
        steps, tokens_per_step: from ``summary.json`` (tokens per optimizer step, all ranks).
        train_s: training seconds: ``summary.json`` ``train_time_s`` (the optimizer loop), else
            ``cell.json`` ``train_s``.
    """

    name: str
    view: str
    run_dir: Path
    record: dict | None = None
    baseline: str | None = None
    best_step: int | None = None
    steps: int | None = None
    tokens_per_step: int | None = None
    train_s: float | None = None

    @property
    def bits_per_char(self) -> float | None:
        """Dev bits per (native) character, None when not run."""
        return None if self.record is None else self.record["bits_per_char"]

    @property
    def tokens_trained(self) -> int | None:
        """``steps x tokens_per_step``, None when either is unknown."""
        return None if self.steps is None or self.tokens_per_step is None else self.steps * self.tokens_per_step


@dataclass
class GridStudy:
    """A grid study directory read by :func:`load_grid`.

    Attributes:
        directory: ``DIR``.
        name: the grid's name (``grid.json``).
        languages: language codes, in ``grid.json`` order.
        cells: ``grid.json``'s cell specs, in order.
        teachers: ``{language: [teacher, teacher_<view> ...]}`` (the native teacher first, even when not run).
        runs: ``{language: {cell: GridRun}}``, every cell of the grid (``record`` None when not run).
    """

    directory: Path
    name: str
    languages: list[str]
    cells: dict[str, dict]
    teachers: dict[str, list[GridRun]] = field(default_factory=dict)
    runs: dict[str, dict[str, GridRun]] = field(default_factory=dict)

    def baselines(self) -> set[str]:
        """Cells that some cell names as its baseline."""
        return {spec.get("baseline") for spec in self.cells.values()} - {None}


def _read_grid(path: Path) -> dict:
    """``grid.json``, checked for a ``languages`` list and a ``cells`` mapping (ValueError naming the file)."""
    grid = _read_json(path, GRID_HINT)
    if not isinstance(grid, dict) or not isinstance(grid.get("languages"), list) or not isinstance(grid.get("cells"), dict):
        raise ValueError(f"{path}: not a grid description (needs a \"languages\" list and a \"cells\" mapping)")
    return grid


def _eval_record(path: Path, names: tuple[str, ...], language: str) -> dict | None:
    """The record of the first of ``names`` (for ``language`` when several) in an ``eval.json``; None when absent.

    A file holding one record only for that language is taken whatever its model name.

    Raises:
        ValueError: not JSON, no ``results`` list, or no record of those names.
    """
    if not path.is_file():
        return None
    results = _read_json(path, GRID_HINT).get("results")
    if not isinstance(results, list):
        raise ValueError(f"{path}: no \"results\" list (not a tools/evaluate.py output)")
    ours = [r for r in results if r.get("language") == language] or results
    for name in names:
        found = [r for r in ours if r.get("name") == name]
        if found:
            return found[0]
    if len(ours) == 1:
        return ours[0]
    raise ValueError(f"{path}: no result named {' or '.join(names)} (has {[r.get('name') for r in results]})")


def _best_step(run_dir: Path) -> int | None:
    path = run_dir / "hf_best" / "megadistill.json"
    if not path.is_file():
        return None
    try:
        return int(_read_json(path, GRID_HINT)["best"]["step"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: no best.step ({err!r})") from None


def _optional_json(path: Path) -> dict:
    return _read_json(path, GRID_HINT) if path.is_file() else {}


def _grid_run(lang_dir: Path, name: str, view: str, language: str, baseline: str | None = None) -> GridRun:
    """A :class:`GridRun` from ``lang_dir/name`` (teacher runs look for their own name, then ``teacher``)."""
    run_dir = lang_dir / name
    names = (name, "teacher") if name.startswith("teacher") else (name,)
    summary, cell = _optional_json(run_dir / "summary.json"), _optional_json(run_dir / "cell.json")
    return GridRun(name=name, view=view, run_dir=run_dir, record=_eval_record(run_dir / "eval.json", names, language),
                   baseline=baseline, best_step=_best_step(run_dir), steps=summary.get("steps"),
                   tokens_per_step=summary.get("tokens_per_step"),
                   train_s=summary.get("train_time_s", cell.get("train_s")))


def load_grid(study_dir: str | Path) -> GridStudy:
    """Read a grid study: ``grid.json`` and, per language, the teacher(s) and every cell (run or not).

    Raises:
        FileNotFoundError: no ``grid.json`` under ``study_dir``.
        ValueError: a file that is not JSON or lacks what is read from it (the message names the file).
    """
    directory = Path(study_dir)
    grid = _read_grid(directory / "grid.json")
    study = GridStudy(directory=directory, name=str(grid.get("name", directory.name)), languages=list(grid["languages"]),
                      cells=dict(grid["cells"]))
    views = sorted({spec.get("view", "native") for spec in study.cells.values()} - {"native"})
    for lang in study.languages:
        lang_dir = directory / lang
        teachers = [_grid_run(lang_dir, "teacher", "native", lang)]
        teachers += [_grid_run(lang_dir, f"teacher_{v}", v, lang) for v in views if (lang_dir / f"teacher_{v}").is_dir()]
        study.teachers[lang] = teachers
        study.runs[lang] = {name: _grid_run(lang_dir, name, spec.get("view", "native"), lang, spec.get("baseline"))
                            for name, spec in study.cells.items()}
    return study


def _relative(value: float | None, reference: float | None) -> str:
    """``+x.x%`` of ``value`` over ``reference``; ``-`` when either is missing."""
    if value is None or not reference:
        return "-"
    return f"{100 * (value / reference - 1):+.1f}%"


def _count(n: int | None) -> str:
    """A count with a k/M/G suffix (``-`` for None)."""
    if n is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


ROMANIZED_MARK = " (per romanized char)"


def _per_romanized_char(run: GridRun) -> bool:
    """A romanized view scored without ``--chars-from``: its bits/char divide by the romanized text's length."""
    return run.view != "native" and run.record is not None and run.record.get("characters_from") == "scored"


def _grid_row(lang: str, run: GridRun, baseline: float | None, teacher: float | None) -> str:
    """One table row; ``not run`` with dashes when the run has no ``eval.json``."""
    if run.record is None:
        return f"| {lang} | {run.name} | {run.view} | not run | - | - | - | - | - | - |"
    r, p = run.record, run.record.get("parameters", {})
    params = f"{p['non_embedding'] / 1e6:.1f}M / {p['total'] / 1e6:.1f}M" if "total" in p and "non_embedding" in p else "-"
    steps = "-" if run.best_step is None and run.steps is None else f"{_or(run.best_step, '-')} / {_or(run.steps, '-')}"
    train = f"{run.train_s:.0f}" if run.train_s is not None else "-"
    vs_teacher = "-" if run.name == "teacher" else _relative(r["bits_per_char"], teacher)
    mark = ROMANIZED_MARK if _per_romanized_char(run) else ""
    return (f"| {lang} | {run.name} | {run.view} | {r['bits_per_char']:.4f}{mark} | {_relative(r['bits_per_char'], baseline)} | "
            f"{vs_teacher} | {params} | {steps} | {_count(run.tokens_trained)} | {train} |")


def _grid_legend(study: GridStudy) -> list[str]:
    """One line per cell: its description and baseline."""
    lines = ["", f"grid {study.name}: bits/char on dev, per native character (romanized views: --chars-from); "
             f"a value marked{ROMANIZED_MARK} was evaluated without --chars-from and does not compare with the others."]
    for name, spec in study.cells.items():
        baseline = f" (baseline: {spec['baseline']})" if spec.get("baseline") else ""
        lines.append(f"- {name} [{spec.get('view', 'native')}]: {spec.get('description', '')}{baseline}")
    return lines


def grid_table(study_dir: str | Path) -> str:
    """The experiment-grid table: per language, the teacher row(s), then every cell of ``grid.json``.

    Columns: dev bits/char (per native character), relative to the cell's baseline and to the
    native teacher (``+x.x%``: higher is worse; ``-`` without one), non-embedding / total
    parameters, best dev step / steps trained, tokens trained (steps x tokens_per_step), training
    seconds. A cell without ``eval.json`` is listed as ``not run``; a romanized cell whose record
    says ``characters_from: "scored"`` (divided by the romanized length) is marked. A legend of the
    cells follows.

    Raises:
        FileNotFoundError: no ``grid.json``.
        ValueError: a malformed JSON file (named in the message).
    """
    study = load_grid(study_dir)
    lines = ["| language | model | view | bits/char (dev) | vs baseline | vs teacher | non-emb. / total params | "
             "best step / steps | tokens trained | train s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for lang in study.languages:
        teacher = study.teachers[lang][0].bits_per_char
        lines += [_grid_row(lang, t, None, teacher) for t in study.teachers[lang] if t.name == "teacher" or t.record]
        runs = study.runs[lang]
        for run in runs.values():
            baseline = runs[run.baseline].bits_per_char if run.baseline in runs else None
            lines.append(_grid_row(lang, run, baseline, teacher))
    return "\n".join(lines + _grid_legend(study))


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (:class:`megadistill.logging.MetricsLogger`), [] when absent.

    Raises:
        ValueError: a line that is not a JSON object (names the file and line).
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{path}:{number}: not a JSON record ({err})") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}:{number}: not a metrics record (no \"step\")")
        records.append(record)
    return records


def _curve(records: list[dict], split: str, key: str, tokens_per_step: int) -> tuple[list[float], list[float]]:
    """``(tokens, values)`` of ``key`` in the ``split`` records; tokens = step x tokens_per_step."""
    points = [(r["step"] * tokens_per_step, r[key]) for r in records if r.get("split") == split and key in r]
    return [x for x, _ in points], [y for _, y in points]


def _run_curves(run: GridRun) -> dict[str, tuple[list[float], list[float]]]:
    """``{"train": train loss, "dev": valid CE}`` vs tokens; {} for a run not run or without tokens_per_step."""
    if run.record is None or not run.tokens_per_step:
        return {}
    records = read_metrics(run.run_dir / "metrics.jsonl")
    return {"train": _curve(records, "train", "loss", run.tokens_per_step),
            "dev": _curve(records, "valid", "ce", run.tokens_per_step)}


TOKENS_LABEL = "training tokens (step x tokens/step)"
DEV_CE_LABEL = "dev CE, nats/token (packed windows)"


def _plot_bits_per_char(study: GridStudy, colors: dict[str, str], path: Path) -> Path:
    """Grouped bars: languages on x, one bar per cell (baselines hatched), the native teacher as a line."""
    from megadistill.plots import grouped_bar_chart, new_figure, save_png

    baselines = study.baselines()
    label = {c: f"{c} (baseline)" if c in baselines else c for c in study.cells}
    nan = float("nan")
    series = {label[c]: [_or(study.runs[lang][c].bits_per_char, nan) for lang in study.languages] for c in study.cells}
    teacher = [_or(study.teachers[lang][0].bits_per_char, nan) for lang in study.languages]
    fig, (ax,) = new_figure(width_in=max(6.0, 1.2 * len(study.languages) * max(1, len(study.cells)) ** 0.5), height_in=4.0)
    grouped_bar_chart(ax, study.languages, series, colors={label[c]: colors[c] for c in study.cells},
                      hatched=[label[c] for c in baselines if c in label], reference=teacher, reference_label="teacher",
                      ylabel="dev bits per native character", annotate=True, missing_label="not run",
                      title=f"{study.name}: bits/char at the best dev checkpoint (lower is better)")
    return save_png(fig, path)


def _or(value, default):
    """``value``, or ``default`` when it is None."""
    return default if value is None else value


def _plot_curves(lang: str, curves: dict[str, dict], colors: dict[str, str], path: Path) -> Path:
    """Two panels for one language: train loss and dev CE vs training tokens, one line per cell."""
    from megadistill.plots import line_plot, new_figure, save_png

    fig, (train, dev) = new_figure(1, 2, width_in=6.0, height_in=4.0)
    line_plot(train, {c: k["train"] for c, k in curves.items()}, colors=colors, marker=None, xlabel=TOKENS_LABEL,
              ylabel="train loss (the cell's objective), nats/token", title=f"{lang}: train loss")
    line_plot(dev, {c: k["dev"] for c, k in curves.items()}, colors=colors, xlabel=TOKENS_LABEL, ylabel=DEV_CE_LABEL,
              title=f"{lang}: dev CE")
    return save_png(fig, path)


def _mark_best(ax, run: GridRun, dev: tuple[list[float], list[float]], color: str) -> None:
    """A star at the best dev checkpoint's point of ``dev``, labelled with its bits/char."""
    xs, ys = dev
    if run.best_step is None or not xs:
        return
    x = run.best_step * run.tokens_per_step
    y = ys[min(range(len(xs)), key=lambda i: abs(xs[i] - x))]
    ax.plot([x], [y], marker="*", markersize=10, color=color)
    ax.annotate(f"{run.bits_per_char:.3f} bits/char", (x, y), xytext=(4, 6), textcoords="offset points", fontsize=7,
                color=color)


def _plot_dev_vs_tokens(study: GridStudy, curves: dict[str, dict], colors: dict[str, str], path: Path) -> Path:
    """One panel per language: dev CE vs tokens per cell, the best checkpoint starred with its bits/char."""
    from megadistill.plots import line_plot, new_figure, save_png

    fig, axes = new_figure(1, len(study.languages), width_in=6.0, height_in=4.0)
    for ax, lang in zip(axes, study.languages):
        line_plot(ax, {c: k["dev"] for c, k in curves[lang].items()}, colors=colors, xlabel=TOKENS_LABEL,
                  ylabel=DEV_CE_LABEL, title=f"{lang}: dev CE vs tokens (star: best checkpoint, dev bits/char)")
        for cell, k in curves[lang].items():
            _mark_best(ax, study.runs[lang][cell], k["dev"], colors[cell])
    # CE per token depends on the tokenizer and the view (a romanized text has other tokens), so
    # curves of different tokenizers are compared through the stars' bits/char, not their heights.
    fig.suptitle("nats/token differ between tokenizers and views: compare cells by the starred bits/char", fontsize=9)
    return save_png(fig, path)


def grid_plots(study_dir: str | Path, dest_dir: str | Path | None = None) -> list[Path]:
    """Write the grid's PNGs into ``dest_dir`` (default ``study_dir``) and return their paths.

    * ``bits_per_char.png``: per language, dev bits/char of every cell (baselines hatched), the
      native teacher as a black line;
    * ``curves_<lang>.png``: train loss (``split=train`` ``loss``) and dev CE (``split=valid``
      ``ce``) vs training tokens (step x ``tokens_per_step``), one line per cell;
    * ``bpc_vs_tokens.png``: per language, dev CE vs tokens with each cell's best checkpoint starred
      and labelled with its dev bits/char.

    Cells not run, or without ``tokens_per_step`` in ``summary.json``, have no curve. Each cell has
    one colour in every figure.

    Raises:
        FileNotFoundError: no ``grid.json``.
        ValueError: a malformed JSON or ``metrics.jsonl`` file (named in the message).
    """
    from megadistill.plots import series_colors

    study = load_grid(study_dir)
    dest = Path(dest_dir) if dest_dir is not None else study.directory
    colors = series_colors(list(study.cells))
    curves = {lang: {c: k for c, run in study.runs[lang].items() if (k := _run_curves(run))} for lang in study.languages}
    paths = [_plot_bits_per_char(study, colors, dest / "bits_per_char.png")]
    paths += [_plot_curves(lang, curves[lang], colors, dest / f"curves_{lang}.png") for lang in study.languages]
    paths.append(_plot_dev_vs_tokens(study, curves, colors, dest / "bpc_vs_tokens.png"))
    return paths
