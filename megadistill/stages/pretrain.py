"""Pre-training distillation stage: general KD on unlabeled packed text, causal LM or masked LM.

The objective follows the teacher's family: a decoder teacher gives next-token KD (the student
copies a subset of its layers and a vocabulary trimmed to the corpus), an encoder (masked-LM)
teacher gives DistilBERT-style masked-LM KD (Sanh et al. 2019, arXiv:1910.01108). The teacher
signal is online (frozen engine), offline (``tools/cache_teacher_logits.py``) or none (the
no-teacher baseline: same data, same tokens, CE only).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from megadistill import checkpoint, distributed, engine
from megadistill.config import RunConfig
from megadistill.data.batches import ClmBatches, MlmBatches, batch_iterator, eval_indices, train_indices
from megadistill.data.blend import BlendedDataset, blend_if_several, format_report
from megadistill.data.indexed import open_checked_datasets
from megadistill.data.masking import MaskingConfig, MlmCollator
from megadistill.data.packing import PackedDataset, restart_id
from megadistill.files import atomic_write_text
from megadistill.models.adapters import adapter_for
from megadistill.models.teacher import count_parameters, load_teacher_once, output_softcap
from megadistill.objectives.lm import LMObjective, lm_metrics
from megadistill.objectives.spec import KDSpec
from megadistill.stages import StageRun
from megadistill.stages.build import (best_exporter, build_features, build_student, check_paths, check_vocab_sizes,
                                      export_files, open_cache, stage_loss)
from megadistill.teachers import CachedTeacher, NoTeacher, OnlineTeacher, TeacherBody

log = logging.getLogger(__name__)


def _datasets(cfg: RunConfig, tokenizer, run_dir: Path, masked: bool):
    """Indexed train/valid datasets (checked against the teacher tokenizer and framing) and the packed windows."""
    framing = "encoder" if masked else "decoder"
    train_sets = open_checked_datasets(cfg.data.train_prefixes, tokenizer, framing)
    valid_sets = open_checked_datasets(cfg.data.valid_prefixes, tokenizer, framing)
    sources = blend_if_several(train_sets, cfg.data.blend_alpha, cfg.data.blend_weights, cfg.data.blend_total_tokens,
                               seed=cfg.train.seed)
    if isinstance(sources[0], BlendedDataset) and distributed.is_main():
        log.info("language blend (alpha %s):\n%s", cfg.data.blend_alpha, format_report(sources[0].report()))
        atomic_write_text(run_dir / "blend.json", json.dumps(sources[0].report(), indent=2))
    if masked and cfg.data.window_bos and distributed.is_main():
        log.info("data.window_bos is not applied: it is for causal teachers; a masked-LM teacher's windows keep their tokens")
    restart = restart_id(tokenizer, cfg.data.window_bos and not masked)
    train = PackedDataset(sources, cfg.data.seq_len_tokens, seed=cfg.train.seed, fixed_layout=cfg.teacher.mode == "offline",
                          restart_id=restart)
    valid = PackedDataset(valid_sets, cfg.data.seq_len_tokens, shuffle=False, restart_id=restart) if valid_sets else None
    return train_sets, train, valid


def _batch_maker(cfg: RunConfig, masked: bool, data, tokenizer, vocab_map, static_mask: bool):
    """The CLM or MLM micro-batch builder over ``data``."""
    world = distributed.world_size()
    if not masked:
        return ClmBatches(data, vocab_map, cfg.data.document_masking, world)
    # With a cache (static masks) replacements come from every teacher id, as when the cache was written.
    collator = MlmCollator.from_tokenizer(tokenizer, MaskingConfig(mask_prob=cfg.data.mask_prob, whole_word=cfg.data.whole_word),
                                          vocab_map, replace_from_all=static_mask)
    return MlmBatches(data, collator, cfg.train.seed, static_mask, cfg.data.document_masking, world)


def _teacher_needed_online(cfg: RunConfig, features) -> bool:
    """True when some step needs the live teacher (KD weight > 0 at any point, or feature matching)."""
    kd_ever = cfg.loss.kd_weight > 0 or (cfg.loss.kd_weight_end or 0) > 0
    return cfg.teacher.mode == "online" and (kd_ever or features is not None)


def build(cfg: RunConfig, ds_config: dict, make_student=build_student, labels: tuple[str, str] = ("init", "distilled"),
          ) -> StageRun:
    """Teacher, data, student, objective and engines of a pre-training distillation run.

    Every path of the config is checked first (:func:`~megadistill.stages.build.check_paths`), so a
    missing dataset or model fails in a second, not after the teacher has loaded.

    Args:
        cfg, ds_config: the run config and the DeepSpeed JSON.
        make_student: ``f(student_cfg, seed, teacher, tokenizer, train_sets, teacher_vocab) -> StudentParts``
            (:func:`~megadistill.stages.build.build_student`; ``stage: post`` passes its reduction).
        labels: the ``stage`` recorded in ``hf_init/`` and in the trained exports' ``megadistill.json``.

    Raises:
        ValueError / FileNotFoundError: bad data, teacher, cache or student settings (naming them).
    """
    cfg = check_paths(cfg)
    if cfg.student.tokenizer:  # a student with its own vocabulary: paired data, cross-tokenizer KD
        from megadistill.stages import own_tokenizer

        return own_tokenizer.build(cfg, ds_config)
    run_dir = Path(cfg.run_dir)
    teacher, tokenizer = load_teacher_once(cfg.teacher.path, cfg.teacher.cache_dir)
    masked = adapter_for(teacher).family == "encoder"
    teacher_vocab = check_vocab_sizes(teacher, tokenizer)
    train_sets, train_data, valid_data = _datasets(cfg, tokenizer, run_dir, masked)
    cache = open_cache(cfg, train_data, tokenizer, masked)
    parts = make_student(cfg.student, cfg.train.seed, teacher, tokenizer, train_sets, teacher_vocab)
    student = parts.model
    info = {"parameters": {"teacher": count_parameters(teacher), "student": count_parameters(student)},
            "objective": "mlm" if masked else "clm", "teacher_mode": cfg.teacher.mode}
    log.info("parameters: %s; student vocabulary %d ids (teacher %d); layers %s", json.dumps(info["parameters"]),
             len(parts.tokenizer), teacher_vocab, parts.layer_map)
    if distributed.broadcast_object(not (run_dir / "hf_init").exists()):
        checkpoint.export_hf(student, parts.tokenizer, run_dir / "hf_init", export_files(cfg, parts, labels[0]))

    features = build_features(cfg.features, student, teacher, parts.layer_map)
    loss_cfg = stage_loss(cfg.loss, cfg.teacher.mode)
    spec = KDSpec.from_config(loss_cfg, len(parts.tokenizer), output_softcap(student.config), output_softcap(teacher.config))
    dense = cfg.teacher.mode == "online" or (cache is not None and cache.kind == "hidden")
    objective = LMObjective(student, spec, loss_cfg, cfg.train.max_steps, masked=masked,
                            teacher_head=parts.teacher_head if dense else None,
                            teacher_bias=parts.teacher_bias if dense else None, features=features)
    ds = engine.build_ds_config(ds_config, cfg.train, cfg.optim, distributed.world_size())
    student_engine = engine.init_student(objective, ds, cfg.train, cfg.optim,
                                         external_params=adapter_for(student).head_parameters(student))
    device = student_engine.device
    online = NoTeacher()
    if _teacher_needed_online(cfg, features):
        online = OnlineTeacher(engine.init_teacher(TeacherBody(teacher, features), ds), device)
    del teacher  # past this point only the teacher engine (if any) holds the weights
    train_teacher = CachedTeacher(cache, parts.vocab_map, device) if cache is not None else online
    log.info("teacher signal: %s (%s objective)", train_teacher.kind, info["objective"])

    make_train = _batch_maker(cfg, masked, train_data, tokenizer, parts.vocab_map, static_mask=cache is not None)
    rank, world, mbs = distributed.rank(), distributed.world_size(), cfg.train.micro_batch_size
    eval_batches = None
    if valid_data is not None:
        make_valid = _batch_maker(cfg, masked, valid_data, tokenizer, parts.vocab_map, static_mask=True)
        eval_batches = lambda: batch_iterator(make_valid, eval_indices(len(valid_data), rank, world, mbs,  # noqa: E731
                                                                       cfg.train.eval_max_batches))

    def export(out_dir: Path, extra: dict | None = None) -> None:
        files = export_files(cfg, parts, labels[1])
        files["megadistill.json"].update(extra or {})
        checkpoint.export_hf(student, parts.tokenizer, out_dir, files)

    return StageRun(engine=student_engine, teacher=train_teacher, eval_teacher=online, metrics=lm_metrics,
                    train_batches=lambda consumed: batch_iterator(make_train, train_indices(consumed, rank, world, mbs)),
                    tokens_per_sample=cfg.data.seq_len_tokens, eval_batches=eval_batches, export=export, info=info,
                    on_eval=best_exporter(run_dir, "ce", export, False) if eval_batches is not None else None)
