"""Pre-training distillation of a student with its own tokenizer: paired data, cross-tokenizer KD.

Selected by ``student.tokenizer`` within ``stage: pre`` (:func:`megadistill.stages.pretrain.build`
hands over). For scripts the teacher fragments (Santali: ~1 Gemma token per character) the
student gets a tokenizer trained on the target language (``tools/train_tokenizer.py``), its
embeddings start from the teacher's, and KD compares the two models over common character spans
(``loss.cross_tokenizer``: span-aligned KD or ULD). The corpus is binarized once per tokenizer
(``data.train_prefixes`` with the teacher's, ``data.student_train_prefixes`` with the student's);
the student's tokens define the packed windows (:class:`megadistill.data.paired.PairedBatches`).
``teacher.mode: none`` trains the same student on the same windows with CE only: the baseline.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from megadistill import checkpoint, distributed, engine
from megadistill.config import RunConfig
from megadistill.data.batches import ClmBatches, batch_iterator, eval_indices, train_indices
from megadistill.data.indexed import open_checked_datasets
from megadistill.data.offsets import token_bytes_table
from megadistill.data.packing import PackedDataset
from megadistill.data.paired import DocumentOffsets, PairedBatches, check_paired
from megadistill.losses.cross_tokenizer import SharedVocab
from megadistill.models.adapters import adapter_for
from megadistill.models.teacher import count_parameters, load_teacher_once, output_softcap
from megadistill.models.vocab import VocabMap, kept_ids_from_corpus
from megadistill.objectives.cross import CrossTokenizerObjective
from megadistill.objectives.lm import lm_metrics
from megadistill.objectives.spec import KDSpec
from megadistill.stages import StageRun
from megadistill.stages.build import (best_exporter, build_student, check_vocab_sizes, export_files, stage_loss,
                                      unk_fallback_id)
from megadistill.teachers import NoTeacher, OnlineTeacher, TeacherBody

log = logging.getLogger(__name__)

__all__ = ["build"]


def _paired_sets(cfg: RunConfig, tokenizer, student_tokenizer, split: str):
    """``(student datasets, teacher datasets)`` of ``split`` (train / valid), checked and paired document by document."""
    teacher_prefixes = getattr(cfg.data, f"{split}_prefixes")
    student_prefixes = getattr(cfg.data, f"student_{split}_prefixes")
    teacher_sets = open_checked_datasets(teacher_prefixes, tokenizer, "decoder")
    student_sets = open_checked_datasets(student_prefixes, student_tokenizer, "decoder")
    check_paired(student_sets, teacher_sets, student_prefixes, teacher_prefixes)
    return student_sets, teacher_sets


def _batches(cfg: RunConfig, split: str, data: PackedDataset, student_sets, teacher_sets, tables, tokenizer):
    """Paired micro-batches (``tables`` given: a teacher to distil from) or plain CLM batches of the
    student windows (the no-teacher baseline: the same windows, no teacher tokens)."""
    world = distributed.world_size()
    if tables is None:
        return ClmBatches(data, None, cfg.data.document_masking, world)
    student = DocumentOffsets(student_sets, tables[0], getattr(cfg.data, f"student_{split}_prefixes"))
    teacher = DocumentOffsets(teacher_sets, tables[1], getattr(cfg.data, f"{split}_prefixes"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PairedBatches(data, student, teacher, pad, cfg.data.document_masking, world)


def _teacher_vocab(teacher_sets, tokenizer, teacher_vocab: int) -> VocabMap:
    """The teacher ids of the training corpus (plus specials and byte pieces): KD's teacher distribution.

    As for a trimmed-vocabulary student, the teacher distribution is restricted to these ids and
    renormalized (``student.trim_vocab``); with Gemma's 262,144 ids this makes the teacher's
    log-softmax over every teacher row ~30-100x cheaper for one language.
    """
    kept = kept_ids_from_corpus(teacher_sets, tokenizer)
    vocab_map = VocabMap.from_token_ids(kept, teacher_vocab, unk_teacher_id=unk_fallback_id(tokenizer))
    log.info("teacher distribution restricted to %d of %d ids (those of the training corpus)", len(vocab_map), teacher_vocab)
    return vocab_map


def _restrict_shared(shared: SharedVocab, teacher_map: VocabMap | None) -> SharedVocab:
    """``shared`` with its teacher ids in the restricted teacher vocabulary (pairs outside it dropped)."""
    if teacher_map is None:
        return shared
    ids, dropped = teacher_map.remap(shared.teacher_ids)
    return SharedVocab(student_ids=shared.student_ids[~dropped], teacher_ids=ids[~dropped])


def build(cfg: RunConfig, ds_config: dict) -> StageRun:
    """Teacher, paired data, own-tokenizer student, cross-tokenizer objective and engines.

    ``cfg`` has been through :func:`megadistill.stages.build.check_paths`.

    Raises:
        ValueError / FileNotFoundError: an encoder teacher, data binarized with another tokenizer,
            student and teacher datasets that are not twins, bad student or loss settings.
    """
    run_dir = Path(cfg.run_dir)
    teacher, tokenizer = load_teacher_once(cfg.teacher.path, cfg.teacher.cache_dir)
    if adapter_for(teacher).family != "decoder":
        raise ValueError("student.tokenizer: cross-tokenizer KD needs a decoder (causal LM) teacher")
    if cfg.data.window_bos:
        log.info("data.window_bos is not applied with student.tokenizer: the student's windows define the packing")
    teacher_vocab = check_vocab_sizes(teacher, tokenizer)
    parts = build_student(cfg.student, cfg.train.seed, teacher, tokenizer, [], teacher_vocab)
    student_tokenizer, student = parts.tokenizer, parts.model
    train_sets = _paired_sets(cfg, tokenizer, student_tokenizer, "train")
    valid_sets = _paired_sets(cfg, tokenizer, student_tokenizer, "valid")
    if len(train_sets[0]) > 1:
        log.info("student.tokenizer: %d training prefixes packed in natural proportions (no language blend)",
                 len(train_sets[0]))
    train_data = PackedDataset(train_sets[0], cfg.data.seq_len_tokens, seed=cfg.train.seed)
    valid_data = PackedDataset(valid_sets[0], cfg.data.seq_len_tokens, shuffle=False) if valid_sets[0] else None
    info = {"parameters": {"teacher": count_parameters(teacher), "student": count_parameters(student)},
            "objective": f"clm, cross-tokenizer {cfg.loss.cross_tokenizer}", "teacher_mode": cfg.teacher.mode,
            "student_vocab": len(student_tokenizer), "teacher_vocab": teacher_vocab}
    log.info("parameters: %s; student vocabulary %d ids (own tokenizer), teacher %d; layers %s",
             json.dumps(info["parameters"]), len(student_tokenizer), teacher_vocab, parts.layer_map)
    if distributed.broadcast_object(not (run_dir / "hf_init").exists()):
        checkpoint.export_hf(student, student_tokenizer, run_dir / "hf_init", export_files(cfg, parts, "init"))

    loss_cfg = stage_loss(cfg.loss, cfg.teacher.mode)
    online = cfg.teacher.mode == "online"
    spec = KDSpec.from_config(loss_cfg, len(student_tokenizer), output_softcap(student.config), output_softcap(teacher.config))
    teacher_map = _teacher_vocab(train_sets[1], tokenizer, teacher_vocab) if online and cfg.student.trim_vocab else None
    head = parts.teacher_head if teacher_map is None else teacher_map.restrict_rows(parts.teacher_head)
    shared = None
    if online and cfg.loss.cross_tokenizer == "span":
        shared = _restrict_shared(SharedVocab.from_tokenizers(student_tokenizer, tokenizer), teacher_map)
        log.info("span-aligned KD: %d student ids share their string with a teacher id", len(shared.student_ids))
    objective = CrossTokenizerObjective(student, spec, loss_cfg, cfg.train.max_steps, teacher_head=head if online else None,
                                        shared=shared, teacher_vocab_map=teacher_map)
    ds = engine.build_ds_config(ds_config, cfg.train, cfg.optim, distributed.world_size())
    student_engine = engine.init_student(objective, ds, cfg.train, cfg.optim,
                                         external_params=adapter_for(student).head_parameters(student))
    teacher_signal = NoTeacher()
    if online:
        teacher_signal = OnlineTeacher(engine.init_teacher(TeacherBody(teacher), ds), student_engine.device)
    del teacher
    log.info("teacher signal: %s (cross-tokenizer %s)", teacher_signal.kind, cfg.loss.cross_tokenizer)

    tables = (token_bytes_table(student_tokenizer), token_bytes_table(tokenizer)) if online else None
    make_train = _batches(cfg, "train", train_data, *train_sets, tables, tokenizer)
    rank, world, mbs = distributed.rank(), distributed.world_size(), cfg.train.micro_batch_size
    eval_batches = None
    if valid_data is not None:
        make_valid = _batches(cfg, "valid", valid_data, *valid_sets, tables, tokenizer)
        eval_batches = lambda: batch_iterator(make_valid, eval_indices(len(valid_data), rank, world, mbs,  # noqa: E731
                                                                       cfg.train.eval_max_batches))

    def export(out_dir: Path, extra: dict | None = None) -> None:
        files = export_files(cfg, parts, "distilled")
        files["megadistill.json"].update(extra or {})
        checkpoint.export_hf(student, student_tokenizer, out_dir, files)

    return StageRun(engine=student_engine, teacher=teacher_signal, eval_teacher=teacher_signal, metrics=lm_metrics,
                    train_batches=lambda consumed: batch_iterator(make_train, train_indices(consumed, rank, world, mbs)),
                    tokens_per_sample=cfg.data.seq_len_tokens, eval_batches=eval_batches, export=export, info=info,
                    on_eval=best_exporter(run_dir, "ce", export, False) if eval_batches is not None else None)
