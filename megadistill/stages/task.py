"""Task stage (in-training distillation): fine-tune a trained student on labelled data with KD from a fine-tuned teacher.

The student (a pre-distilled ``hf/`` export, or any HF model: its body plus a new classification
head) trains on ``alpha * CE(labels) + (1 - alpha) * KD(class logits)``; the teacher signal is the
task-fine-tuned teacher's class logits, online or cached (``tools/cache_teacher_logits.py --task``),
or none (``teacher.mode: none`` or ``alpha: 1``: plain fine-tuning, the no-KD baseline, reading the
same examples in the same order). Each model reads the texts through its own tokenizer. Every
held-out evaluation that improves ``task.select_metric`` on dev exports ``hf_best/``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from megadistill import checkpoint, distributed, engine
from megadistill.config import RunConfig, to_dict
from megadistill.data.tagging import TaggedBatches, encode_tagged, load_tagged_split
from megadistill.data.tasks import (EncodedTexts, LabelSet, TaskBatches, TaskSplit, encode_texts, load_split,
                                    task_eval_indices, task_train_indices)
from megadistill.models.teacher import count_parameters, resolve_teacher_once
from megadistill.objectives.classify import ClassifyObjective, ClassifySpec, classify_metrics
from megadistill.stages import StageRun
from megadistill.stages.build import best_exporter
from megadistill.teachers import CachedClassTeacher, ClassifierBody, ClassifierTeacher, NoTeacher

log = logging.getLogger(__name__)

MAX_UNK_RATE = 0.05
"""A student tokenizer that turns more of the task's tokens than this into unk does not match the data."""


HEAD_SUFFIX = {"sequence": "ForSequenceClassification", "token": "ForTokenClassification"}


def _is_classifier(config, kind: str = "sequence") -> bool:
    return any(name.endswith(HEAD_SUFFIX[kind]) for name in (config.architectures or []))


def _labels_of(config) -> list[str]:
    return [config.id2label[i] for i in range(config.num_labels)]


def check_classifier_config(directory: Path, label_set: LabelSet, role: str, kind: str = "sequence"):
    """The HF config of ``directory``, checked before any weights load.

    Raises:
        ValueError: a teacher without a classification head (says how to make one with
            ``tools/finetune.py``), or a classifier whose labels differ from the task's.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    if role != "student" and not _is_classifier(config, kind):
        raise ValueError(f"{role} checkpoint {directory} has no {kind} classification head (architectures "
                         f"{config.architectures}): fine-tune one first with tools/finetune.py --model {directory} "
                         f"--data-dir <task dir> --languages ... --out <dir>, then pass teacher.path=<dir>/hf_best")
    if _is_classifier(config, kind) and _labels_of(config) != list(label_set.names):
        raise ValueError(f"{role} checkpoint {directory}: labels {_labels_of(config)} (config.json id2label) differ "
                         f"from the task's {list(label_set.names)} ({label_set.source})")
    return config


def load_classifier(directory: Path, label_set: LabelSet, role: str, kind: str = "sequence"):
    """A ``*ForSequenceClassification`` (``kind="token"``: ``*ForTokenClassification``) model and its tokenizer.

    The tokenizer's pad id is set on the config (decoders pool the last non-pad token).

    A teacher (any ``role`` but ``"student"``) must be a fine-tuned classifier with the task's labels;
    a student without a head gets a new one (``num_labels``, ``id2label`` from ``label_set``).

    Raises:
        ValueError: as :func:`check_classifier_config`, or a tokenizer with neither pad nor EOS token.
    """
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    config = check_classifier_config(directory, label_set, role, kind)
    names = list(label_set.names)
    kwargs = {} if _is_classifier(config, kind) else {"num_labels": len(names), "id2label": label_set.id2label,
                                                      "label2id": {n: i for i, n in enumerate(names)}}
    auto = AutoModelForTokenClassification if kind == "token" else AutoModelForSequenceClassification
    model = auto.from_pretrained(directory, dtype=torch.float32, local_files_only=True, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{role} tokenizer {directory} has neither a pad nor an EOS token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def check_student_tokenizer(encoded: EncodedTexts, model: torch.nn.Module, directory: Path, languages: str) -> None:
    """Refuse a student whose tokenizer does not fit the task data or its own embeddings.

    Raises:
        ValueError: token ids beyond the embedding rows (a tokenizer from another model), or more than
            :data:`MAX_UNK_RATE` of the tokens unknown (a vocabulary trimmed to other languages).
    """
    rows = model.get_input_embeddings().weight.shape[0]
    top = max(int(ids.max()) for ids in encoded.ids)
    if top >= rows:
        raise ValueError(f"student {directory}: its tokenizer produces id {top} but the model has {rows} embedding rows: "
                         "tokenizer and model do not match")
    if encoded.unk_rate > MAX_UNK_RATE:
        raise ValueError(f"student {directory}: its tokenizer maps {100 * encoded.unk_rate:.1f}% of the tokens of "
                         f"{languages} to unk (limit {100 * MAX_UNK_RATE:.0f}%): its vocabulary "
                         "was trimmed to other text; pre-distil a student on these languages (stage pre)")


def transformer_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of transformer blocks of a HF classifier (``layers`` of decoders, ``encoder.layer`` of BERTs).

    Raises:
        ValueError: no such stack found.
    """
    for name, module in model.base_model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "layer", "h", "blocks"):
            return module
    raise ValueError(f"{type(model).__name__}: no transformer layer stack found for task.train_top_layers")


def freeze(model: torch.nn.Module, freeze_embeddings: bool, train_top_layers: int) -> None:
    """Fix the input embeddings and/or every layer below the top ``train_top_layers`` (0, or more than the
    model has: train all), so one protocol fits a 4-layer student and an 18-layer teacher."""
    if freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    if train_top_layers:
        layers = transformer_layers(model)
        for layer in layers[: max(len(layers) - train_top_layers, 0)]:
            layer.requires_grad_(False)


def _open_teacher(cfg: RunConfig, spec: ClassifySpec, train: TaskSplit):
    """The checked logit cache (offline) or teacher directory (online), or None when no step needs a teacher.

    Runs before the student loads, so a wrong teacher or cache fails fast.
    """
    from megadistill.task_cache import TaskLogitCache

    if spec.alpha >= 1.0:
        if cfg.teacher.mode != "none":
            log.info("task.alpha 1.0: plain fine-tuning, the teacher is not loaded")
        return None
    if cfg.teacher.mode == "offline":
        cache = TaskLogitCache(cfg.teacher.logit_cache)
        cache.check_compatible(train, cfg.task.max_len_tokens)
        return cache
    directory = resolve_teacher_once(cfg.teacher.path, cfg.teacher.cache_dir, role="teacher.path")
    check_classifier_config(directory, train.label_set, "teacher", cfg.task.kind)
    return directory


def _teacher_signal(cfg: RunConfig, source, train, ds: dict, device):
    """The training teacher signal, the teacher's encodings and pad id (online only), and its parameter counts."""
    if source is None:
        return NoTeacher(), None, None, None
    if not isinstance(source, Path):
        return CachedClassTeacher(source, device), None, None, None
    teacher, tokenizer = load_classifier(source, train.label_set, "teacher", cfg.task.kind)
    encoded = _encode(cfg.task.kind, train, tokenizer, cfg.task.max_len_tokens)
    params = count_parameters(teacher)
    teacher_engine = engine.init_teacher(ClassifierBody(teacher), ds)
    return ClassifierTeacher(teacher_engine, device), encoded, tokenizer.pad_token_id, params


def _load(task, split: str):
    """A :class:`TaskSplit` (sequence) or :class:`~megadistill.data.tagging.TaggedSplit` (token) of ``task.languages``."""
    if task.kind == "token":
        return load_tagged_split(task.data_dir, task.languages, split)
    return load_split(task.data_dir, task.languages, split)


def _encode(kind: str, split, tokenizer, max_len_tokens: int):
    """:class:`EncodedTexts` (sequence) or :func:`encode_tagged` examples (token) of ``split``."""
    return encode_tagged(split, tokenizer, max_len_tokens) if kind == "token" else encode_texts(split.texts, tokenizer, max_len_tokens)


def _ids_of(encoded, tokenizer) -> EncodedTexts:
    """The token ids of either encoding as :class:`EncodedTexts` (for the tokenizer check)."""
    if isinstance(encoded, EncodedTexts):
        return encoded
    return EncodedTexts.from_ids([e["input_ids"] for e in encoded], sum(e["lost_words"] > 0 for e in encoded), tokenizer)


def _batch_maker(kind: str, split, encoded, pad_id: int, teacher=None, teacher_pad: int = 0, world: int = 1):
    if kind == "token":
        return TaggedBatches(encoded, pad_id, teacher, teacher_pad, world)
    return TaskBatches(encoded, split.labels, pad_id, teacher, teacher_pad, world)


def _spec(cfg: RunConfig, num_labels: int) -> ClassifySpec:
    """The task loss; without a teacher (``teacher.mode: none``) plain CE whatever ``task.alpha`` says."""
    alpha = 1.0 if cfg.teacher.mode == "none" else cfg.task.alpha
    if alpha != cfg.task.alpha:
        log.info("teacher.mode none: task.alpha %.2f -> 1.0 (plain fine-tuning)", cfg.task.alpha)
    return ClassifySpec(num_labels, alpha, cfg.task.kd_loss, cfg.task.temperature)


def _export_files(cfg: RunConfig, directory: Path, label_set: LabelSet, extra: dict) -> dict:
    """``megadistill.json`` (stage, protocol, labels, teacher, config) plus the student's ``vocab_map.json`` if any."""
    files = {"megadistill.json": {"stage": "task", "protocol": cfg.task.protocol, "labels": list(label_set.names),
                                  "teacher": cfg.teacher.path, "teacher_mode": cfg.teacher.mode,
                                  "student": cfg.student.checkpoint, **extra,
                                  "config": json.loads(json.dumps(to_dict(cfg)))}}
    vocab_file = directory / "vocab_map.json"
    if vocab_file.is_file():
        files["vocab_map.json"] = json.loads(vocab_file.read_text(encoding="utf-8"))
    return files


def check_task_paths(cfg: RunConfig) -> None:
    """The student, the teacher (when one is used) and the logit cache exist, before anything loads.

    Raises:
        FileNotFoundError / ValueError: one line naming the config field and the path.
    """
    from megadistill.models.teacher import check_model_spec

    check_model_spec(cfg.student.checkpoint, "student.checkpoint")
    if cfg.task.alpha < 1.0 and cfg.teacher.mode == "online":
        check_model_spec(cfg.teacher.path, "teacher.path")
    if cfg.task.alpha < 1.0 and cfg.teacher.mode == "offline" and not (Path(cfg.teacher.logit_cache or "") / "meta.json").is_file():
        raise FileNotFoundError(f"teacher.logit_cache: {cfg.teacher.logit_cache}/meta.json not found: write the cache "
                                "with tools/cache_teacher_logits.py --task ...")


def build(cfg: RunConfig, ds_config: dict) -> StageRun:
    """Data, student classifier, teacher signal, objective and engines of a task run.

    Raises:
        ValueError / FileNotFoundError: bad task files, labels, student, teacher or cache (naming them).
    """
    task, run_dir = cfg.task, Path(cfg.run_dir)
    check_task_paths(cfg)
    train, dev = _load(task, "train"), _load(task, "dev")
    if dev.label_set.names != train.label_set.names:
        raise ValueError(f"label sets differ between splits: {train.label_set.source} vs {dev.label_set.source}")
    spec = _spec(cfg, len(train.label_set))
    teacher_source = _open_teacher(cfg, spec, train)
    student_dir = resolve_teacher_once(cfg.student.checkpoint, cfg.teacher.cache_dir, role="student.checkpoint")
    student, tokenizer = load_classifier(student_dir, train.label_set, "student", task.kind)
    train_ids = _encode(task.kind, train, tokenizer, task.max_len_tokens)
    dev_ids = _encode(task.kind, dev, tokenizer, task.max_len_tokens)
    train_tokens = _ids_of(train_ids, tokenizer)
    check_student_tokenizer(train_tokens, student, student_dir, ", ".join(task.languages))
    freeze(student, task.freeze_embeddings, task.train_top_layers)
    ds = engine.build_ds_config(ds_config, cfg.train, cfg.optim, distributed.world_size())
    student_params = count_parameters(student)
    student_engine = engine.init_student(ClassifyObjective(student, spec), ds, cfg.train, cfg.optim)
    teacher, teacher_ids, teacher_pad, teacher_params = _teacher_signal(cfg, teacher_source, train, ds, student_engine.device)
    truncated = train_tokens.truncated
    log.info("task (%s): %d train / %d dev examples (%s), %d labels; alpha %.2f, kd %s, T %.1f; teacher signal: %s; "
             "%d train examples cut at %d tokens", task.kind, len(train), len(dev), ",".join(task.languages),
             len(train.label_set), spec.alpha, spec.kd_loss, spec.temperature, teacher.kind, truncated, task.max_len_tokens)

    rank, world, mbs = distributed.rank(), distributed.world_size(), cfg.train.micro_batch_size
    lengths = [len(ids) for ids in train_tokens.ids] if task.group_by_length else None
    make_train = _batch_maker(task.kind, train, train_ids, tokenizer.pad_token_id, teacher_ids, teacher_pad or 0, world)
    make_dev = _batch_maker(task.kind, dev, dev_ids, tokenizer.pad_token_id, world=world)

    def export(out_dir: Path, extra: dict | None = None) -> None:
        checkpoint.export_hf(student, tokenizer, out_dir, _export_files(cfg, student_dir, train.label_set, extra or {}))

    info = {"parameters": {"student": student_params, "teacher": teacher_params}, "protocol": task.protocol,
            "labels": list(train.label_set.names), "train_examples": len(train), "dev_examples": len(dev),
            "truncated_train_examples": truncated, "kind": task.kind, "teacher_mode": teacher.kind, "alpha": spec.alpha}
    return StageRun(engine=student_engine, teacher=teacher, eval_teacher=NoTeacher(), metrics=classify_metrics,
                    train_batches=lambda consumed: (make_train(i) for i in task_train_indices(
                        consumed, rank, world, mbs, len(train), cfg.train.seed, lengths)),
                    tokens_per_sample=task.max_len_tokens,
                    eval_batches=lambda: (make_dev(i) for i in task_eval_indices(len(dev), rank, world, mbs)),
                    export=export, info=info, on_eval=best_exporter(run_dir, task.select_metric, export, True,
                                                                     ("accuracy", "macro_f1", "ce")))
