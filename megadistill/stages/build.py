"""Builders every stage shares: teacher vocabulary checks, the student from a config, feature matching, the cache.

Stage specs (``pretrain.py``, later ``task.py`` and ``post.py``) call these instead of copying
them; each takes the sub-config it needs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from megadistill.config import FeatureConfig, LossConfig, RunConfig, StudentConfig, to_dict
from megadistill.losses.features import FeatureDistiller, feature_layer_pairs, use_eager_attention
from megadistill.models.adapters import adapter_for
from megadistill.models.student import build_random_student, build_student_from_teacher, parse_layer_map
from megadistill.models.vocab import VocabMap, kept_ids_from_corpus, trim_tokenizer

log = logging.getLogger(__name__)

__all__ = ["StudentParts", "best_exporter", "build_features", "build_student", "check_paths", "check_vocab_sizes",
           "export_files", "open_cache", "stage_loss", "unk_fallback_id"]


def check_paths(cfg: RunConfig) -> RunConfig:
    """Every file the config names, checked before any model loads (``stat`` only, nothing read).

    Checks ``data.train_prefixes`` / ``data.valid_prefixes`` (``.bin``, ``.idx`` and provenance
    ``.json``, :func:`megadistill.data.inspect.resolve_dataset`), ``teacher.path``,
    ``student.checkpoint`` (``student.init: checkpoint``) and ``teacher.logit_cache``
    (``teacher.mode: offline``), ``student.tokenizer`` and ``data.student_*_prefixes``. Romanized
    twins are datasets of ``data.*_prefixes`` like any other.

    Returns:
        ``cfg`` with the dataset prefixes as prefixes (``x.idx``/``x.bin``/``x.json`` become ``x``).
    Raises:
        FileNotFoundError / ValueError: one line naming the config field, the path and the fix
            (binarize a missing dataset, adopt one without provenance, fetch a Hub model first).
    """
    from megadistill.data.inspect import resolve_dataset
    from megadistill.models.teacher import check_model_spec

    tokenizers = {"train_prefixes": cfg.teacher.path, "valid_prefixes": cfg.teacher.path,
                  "student_train_prefixes": cfg.student.tokenizer, "student_valid_prefixes": cfg.student.tokenizer}
    data = dataclasses.replace(cfg.data, **{
        name: [str(resolve_dataset(p, f"data.{name}[{i}]", tokenizer=tokenizer))
               for i, p in enumerate(getattr(cfg.data, name))]
        for name, tokenizer in tokenizers.items()})
    if cfg.student.tokenizer and not (Path(cfg.student.tokenizer) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"student.tokenizer: {cfg.student.tokenizer} has no tokenizer.json: train one with "
                                f"python tools/train_tokenizer.py CORPUS --output {cfg.student.tokenizer}")
    if cfg.teacher.path:
        check_model_spec(cfg.teacher.path, "teacher.path")
    if cfg.student.init == "checkpoint" and cfg.student.checkpoint:
        check_model_spec(cfg.student.checkpoint, "student.checkpoint")
    if cfg.teacher.mode == "offline" and cfg.teacher.logit_cache:
        meta = Path(cfg.teacher.logit_cache) / "meta.json"
        if not meta.is_file():
            raise FileNotFoundError(f"teacher.logit_cache: {meta} not found: build the cache with "
                                    f"tools/cache_teacher_logits.py --output {cfg.teacher.logit_cache} (an unfinished "
                                    "cache has no meta.json; rerun the same command to finish it)")
    return dataclasses.replace(cfg, data=data)


def check_vocab_sizes(teacher, tokenizer) -> int:
    """Real teacher vocabulary size; rows of the output head beyond it are padding.

    Raises:
        ValueError: the tokenizer has more ids than the teacher head has rows.
    """
    rows = adapter_for(teacher).output_weight(teacher).shape[0]
    real = len(tokenizer)
    if real > rows:
        raise ValueError(f"teacher tokenizer has {real} ids but the teacher head has {rows} rows: tokenizer and model do not match")
    if rows > real:
        log.info("teacher head has %d rows for %d real ids: %d padded rows are masked out of KD", rows, real, rows - real)
    return real


def unk_fallback_id(tokenizer) -> int:
    """Teacher id that out-of-vocabulary inputs become: unk, else pad, else EOS (Qwen/Llama-3 have no unk).

    Raises:
        ValueError: the tokenizer has none of the three.
    """
    for name in ("unk_token_id", "pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            if name != "unk_token_id":
                log.info("tokenizer has no unk token: dropped ids map to %s %d", name, value)
            return value
    raise ValueError("the teacher tokenizer has no unk, pad or eos token to map dropped ids to")


@dataclass
class StudentParts:
    """A built student and what KD needs to compare it with its teacher.

    Attributes:
        model: the student (HF causal or masked LM), trainable.
        tokenizer: its tokenizer (trimmed when ``vocab_map`` is set).
        vocab_map: student id -> teacher id map, or None (the teacher's vocabulary).
        layer_map: teacher layer each student layer was copied from (``[]`` for a loaded checkpoint).
        teacher_head: ``[V, Ht]`` teacher output projection rows of the student's ids (detached).
        teacher_bias: ``[V]`` teacher output bias restricted the same way, or None.
    """

    model: torch.nn.Module
    tokenizer: object
    vocab_map: VocabMap | None
    layer_map: list[int]
    teacher_head: torch.Tensor
    teacher_bias: torch.Tensor | None


def _restrict(tensor: torch.Tensor | None, vocab_map: VocabMap | None, teacher_vocab: int) -> torch.Tensor | None:
    if tensor is None:
        return None
    tensor = tensor.detach()
    return vocab_map.restrict_rows(tensor) if vocab_map is not None else tensor[:teacher_vocab].clone()


def build_student(cfg: StudentConfig, seed: int, teacher, tokenizer, train_sets, teacher_vocab: int) -> StudentParts:
    """The student of ``student.init``: teacher layers (``layer_map``, trimmed vocabulary), random, or a checkpoint.

    With ``student.tokenizer`` the student gets that vocabulary instead (:func:`_own_tokenizer_student`).

    Raises:
        ValueError: a bad layer map, or a checkpoint whose vocabulary does not match its ``vocab_map.json``.
        FileNotFoundError: ``student.checkpoint`` does not exist.
    """
    adapter = adapter_for(teacher)
    if cfg.tokenizer:
        return _own_tokenizer_student(cfg, seed, teacher, tokenizer, teacher_vocab)
    if cfg.init == "checkpoint":
        model, student_tokenizer, vocab_map = _load_checkpoint(cfg.checkpoint, adapter.family)
        layer_map = []
    else:
        layer_map = parse_layer_map(cfg.layer_map, getattr(teacher.config, adapter.depth_field))
        vocab_map = None
        if cfg.trim_vocab:
            kept = kept_ids_from_corpus(train_sets, tokenizer)
            vocab_map = VocabMap.from_token_ids(kept, teacher_vocab, unk_teacher_id=unk_fallback_id(tokenizer))
        if cfg.init == "random":
            model = build_random_student(teacher, seed, layer_map, vocab_map)
        else:
            model = build_student_from_teacher(teacher, layer_map, vocab_map)
        student_tokenizer = trim_tokenizer(tokenizer, vocab_map) if vocab_map is not None else tokenizer
    return StudentParts(model, student_tokenizer, vocab_map, layer_map,
                        _restrict(adapter.output_weight(teacher), vocab_map, teacher_vocab),
                        _restrict(adapter.output_bias(teacher), vocab_map, teacher_vocab))


def _own_tokenizer_student(cfg: StudentConfig, seed: int, teacher, tokenizer, teacher_vocab: int) -> StudentParts:
    """A student with its own tokenizer: teacher layers (or random ones), embeddings from the teacher's.

    The body is built with the teacher's vocabulary, then its token embeddings are replaced by
    ``student.embedding_init`` rows for the student's ids (:func:`megadistill.models.embedding_init.init_embeddings`).
    The teacher head stays whole (``[Vt, Ht]``): cross-tokenizer KD compares full distributions.
    """
    from transformers import AutoTokenizer

    from megadistill.models.embedding_init import apply_embeddings, init_embeddings

    student_tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer, local_files_only=True)
    layer_map = parse_layer_map(cfg.layer_map, getattr(teacher.config, adapter_for(teacher).depth_field))
    if cfg.init == "random":
        model = build_random_student(teacher, seed, layer_map, None)
    else:
        model = build_student_from_teacher(teacher, layer_map, None)
    table = teacher.get_input_embeddings().weight.detach()[:teacher_vocab].float()
    init = init_embeddings(student_tokenizer, tokenizer, table, method=cfg.embedding_init, seed=seed)
    apply_embeddings(model, init.weight, student_tokenizer)
    log.info("student tokenizer %s: %d ids, embeddings by %s: %d copied, %d averaged, %d fallback, %d special, %d random",
             cfg.tokenizer, len(student_tokenizer), cfg.embedding_init, init.exact, init.averaged, init.fallback,
             init.specials, init.random)
    head = adapter_for(teacher).output_weight(teacher).detach()[:teacher_vocab].clone()
    return StudentParts(model, student_tokenizer, None, layer_map, head, None)


def _load_checkpoint(path: str, family: str):
    """An exported student directory: model, tokenizer and its ``vocab_map.json`` (None when absent)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"student.checkpoint {directory} has no config.json: pass a directory written by an "
                                "earlier run (runs/<name>/hf)")
    loader = AutoModelForMaskedLM if family == "encoder" else AutoModelForCausalLM
    model = loader.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    model.train().requires_grad_(True)
    vocab_file = directory / "vocab_map.json"
    vocab_map = VocabMap.load(vocab_file) if vocab_file.is_file() else None
    return model, AutoTokenizer.from_pretrained(directory, local_files_only=True), vocab_map


def build_features(cfg: FeatureConfig, student, teacher, layer_map: list[int]):
    """The feature-matching module (projections + weights), or None when every feature weight is 0.

    ``features.layer_map: student`` pairs the embeddings and each student layer with the
    teacher layer it was copied from. Attention maps need eager attention in both models.
    """
    if max(cfg.hidden_weight, cfg.attention_weight, cfg.relation_weight) <= 0:
        return None
    s_cfg, t_cfg = student.config.get_text_config(), teacher.config.get_text_config()
    s_depth = getattr(s_cfg, adapter_for(student).depth_field)
    t_depth = getattr(t_cfg, adapter_for(teacher).depth_field)
    if cfg.layer_map == "student":
        if not layer_map:
            raise ValueError("features.layer_map student needs a student built from teacher layers: give pairs or uniform")
        pairs = [(0, 0)] + [(i + 1, t + 1) for i, t in enumerate(layer_map)]
    else:
        pairs = feature_layer_pairs(cfg.layer_map, s_depth, t_depth)
    if cfg.attention_weight > 0:
        use_eager_attention(student)
        use_eager_attention(teacher)
    heads = getattr(s_cfg, "num_attention_heads", None) or getattr(s_cfg, "n_heads")
    return FeatureDistiller(
        pairs, _width(s_cfg), _width(t_cfg), hidden_weight=cfg.hidden_weight, hidden_kind=cfg.hidden_loss,
        attention_weight=cfg.attention_weight, relation_weight=cfg.relation_weight, relations=tuple(cfg.relations),
        num_relation_heads=cfg.relation_heads or heads, causal=adapter_for(student).causal, project=cfg.project,
    )


def _width(config) -> int:
    """Hidden size of a HF config (DistilBERT calls it ``dim``)."""
    return getattr(config, "hidden_size", None) or config.dim


def stage_loss(loss: LossConfig, teacher_mode: str) -> LossConfig:
    """The loss settings a run uses: with ``teacher.mode: none``, plain CE (weight 1, no KD, no schedule)."""
    if teacher_mode != "none":
        return loss
    return dataclasses.replace(loss, ce_weight=1.0, kd_weight=0.0, ce_weight_end=None, kd_weight_end=None)


def open_cache(cfg: RunConfig, train_data, tokenizer, masked: bool):
    """The offline teacher cache checked against the training windows, or None unless ``teacher.mode: offline``.

    ``masked`` (an encoder teacher, which trains a masked LM): the cache must be a masked-LM cache
    of the run's ``data.mask_prob`` / ``data.whole_word``; otherwise a causal one.

    Raises:
        ValueError / FileNotFoundError: the cache is missing or was built from other data, sequence
            length, seed, tokenizer, temperature, objective or masking settings; a masked-LM cache
            with ``loss.kd_positions: all`` (it holds the masked positions only).
    """
    from megadistill.data.masking import MaskingConfig
    from megadistill.teacher_cache import TeacherCache

    if cfg.teacher.mode != "offline":
        return None
    cache = TeacherCache(cfg.teacher.logit_cache)
    masking = MaskingConfig(mask_prob=cfg.data.mask_prob, whole_word=cfg.data.whole_word) if masked else None
    cache.check_compatible(train_data, tokenizer, cfg.data.document_masking, temperature=cfg.loss.temperature,
                           masking=masking)
    if masked and cfg.loss.kd_positions == "all":
        raise ValueError("a masked-LM teacher cache holds the teacher at the masked positions only: set "
                         "loss.kd_positions=masked, or use teacher.mode=online for KD at all positions")
    if cache.kind == "topk" and cfg.loss.divergence in ("mse", "cosine"):
        raise ValueError(f"loss.divergence {cfg.loss.divergence} needs full teacher logits: build the cache with --kind hidden")
    log.info("teacher signal: offline %s cache %s (%.1f bytes/token)", cache.kind, cfg.teacher.logit_cache, cache.bytes_per_token)
    return cache


def export_files(cfg: RunConfig, parts: StudentParts, stage: str) -> dict:
    """Self-describing sidecar files for an HF export (what it was distilled from and how)."""
    files = {"megadistill.json": {"stage": stage, "teacher": cfg.teacher.path, "teacher_mode": cfg.teacher.mode,
                                  "layer_map": parts.layer_map, "config": json.loads(json.dumps(to_dict(cfg)))}}
    if parts.vocab_map is not None:
        files["vocab_map.json"] = parts.vocab_map.to_dict()
    return files


def best_exporter(run_dir: Path, metric: str, export, higher_is_better: bool, report=("ce",)):
    """``on_eval`` hook: export ``hf_best/`` whenever dev ``metric`` improves (resumes from the saved best).

    With 701 sentences a language a student overfits within ~100 steps, so every quality number is
    read at its best dev checkpoint: this export, not the last step's.

    Args:
        run_dir: the run directory (``hf_best/`` goes inside).
        metric: the held-out metric that selects (``ce`` for language modelling, ``accuracy`` for tasks).
        export: ``f(out_dir, extra)`` writing the student with ``extra`` merged into ``megadistill.json``.
        higher_is_better: direction of ``metric``.
        report: dev metrics recorded beside the selected value.
    """
    best_file = run_dir / "hf_best" / "megadistill.json"
    sign = 1.0 if higher_is_better else -1.0
    best = {"value": -math.inf}
    if best_file.is_file():
        best["value"] = sign * json.loads(best_file.read_text(encoding="utf-8"))["best"]["value"]

    def on_eval(step: int, metrics: dict) -> None:
        # Every rank sees the same reduced metrics, so all take the same branch (the export is collective).
        if sign * metrics[metric] > best["value"]:
            best["value"] = sign * metrics[metric]
            export(run_dir / "hf_best", {"best": {"step": step, "metric": metric, "value": metrics[metric],
                                                  "dev": {k: metrics[k] for k in report if k in metrics}}})
            log.info("dev %s %.4f at step %d: exported %s", metric, metrics[metric], step, run_dir / "hf_best")

    return on_eval
