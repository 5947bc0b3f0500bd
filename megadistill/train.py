"""Pre-training distillation entry point: recipe in, trained and exported student out.

    deepspeed --num_gpus 2 megadistill/train.py --ds_config ds_configs/cpu_zero3.json \
        --config megadistill/recipes/quickstart.yaml [key=value ...]

Also runs under ``torchrun`` and as plain ``python`` (one process). Reads top to bottom:
config -> process group -> teacher -> data -> student -> engines -> resume -> loop -> export.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: put the repository root first and drop megadistill/ itself, whose
    # logging.py would otherwise shadow the standard library module.
    _root = str(Path(__file__).resolve().parents[1])
    sys.path[:] = [_root] + [p for p in sys.path[1:] if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import logging
import time
import warnings

import torch

from megadistill import checkpoint, distributed, engine
from megadistill.config import RunConfig, load_config, save_config, to_dict
from megadistill.data.indexed import open_checked_datasets
from megadistill.data.blend import BlendedDataset, blend_if_several, format_report
from megadistill.data.packing import PackedDataset
from megadistill.files import atomic_write_text
from megadistill.logging import MetricsLogger, setup_console
from megadistill.models.student import build_student_from_teacher, parse_layer_map
from megadistill.models.teacher import count_parameters, load_teacher_once, output_softcap
from megadistill.models.vocab import VocabMap, kept_ids_from_corpus, trim_tokenizer
from megadistill.losses.features import FeatureDistiller, feature_layer_pairs, use_eager_attention
from megadistill.losses.schedule import loss_weights_at
from megadistill.stages.pretrain import (DistillStudent, LoopData, LoopState, TeacherBody, TeacherSource, evaluate_loss,
                                         train_loop)
from megadistill.teacher_cache import TeacherCache

log = logging.getLogger("megadistill.train")
# DeepSpeed calls torch.distributed collectives that torch has renamed; the warning repeats every step.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def parse_args(argv=None) -> argparse.Namespace:
    """``--config`` recipe, ``--ds_config`` DeepSpeed JSON, and dotted ``key=value`` overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (see megadistill/recipes/)")
    parser.add_argument("--ds_config", required=True, help="DeepSpeed JSON (see ds_configs/)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the DeepSpeed launcher")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20")
    return parser.parse_args(argv)


def check_vocab_sizes(teacher, tokenizer) -> int:
    """Real teacher vocabulary size; rows of the output head beyond it are padding.

    Raises:
        ValueError: the tokenizer has more ids than the teacher head has rows.
    """
    rows = teacher.get_output_embeddings().weight.shape[0]
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


def build_student(cfg: RunConfig, teacher, tokenizer, train_sets, teacher_vocab: int):
    """Student model, its tokenizer, the VocabMap (or None) and the teacher head rows KD uses."""
    layer_map = parse_layer_map(cfg.student.layer_map, teacher.config.num_hidden_layers)
    vocab_map = None
    if cfg.student.trim_vocab:
        kept = kept_ids_from_corpus(train_sets, tokenizer)
        vocab_map = VocabMap.from_token_ids(kept, teacher_vocab, unk_teacher_id=unk_fallback_id(tokenizer))
    student = build_student_from_teacher(teacher, layer_map, vocab_map)
    if cfg.student.init == "random":
        torch.manual_seed(cfg.train.seed)
        student = type(student)(student.config)
    head = teacher.get_output_embeddings().weight.detach()
    teacher_head = vocab_map.restrict_rows(head) if vocab_map is not None else head[:teacher_vocab].clone()
    student_tokenizer = trim_tokenizer(tokenizer, vocab_map) if vocab_map is not None else tokenizer
    return student, student_tokenizer, vocab_map, teacher_head, layer_map


def build_features(cfg: RunConfig, student, teacher, layer_map: list[int]):
    """The feature-matching module (projections + weights), or None when every feature weight is 0.

    ``features.layer_map: student`` pairs the embeddings and each student layer with the
    teacher layer it was copied from. Attention maps need eager attention in both models.
    """
    f = cfg.features
    if max(f.hidden_weight, f.attention_weight, f.relation_weight) <= 0:
        return None
    s_cfg, t_cfg = student.config.get_text_config(), teacher.config.get_text_config()
    if f.layer_map == "student":
        pairs = [(0, 0)] + [(i + 1, t + 1) for i, t in enumerate(layer_map)]
    else:
        pairs = feature_layer_pairs(f.layer_map, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
    if f.attention_weight > 0:
        use_eager_attention(student)
        use_eager_attention(teacher)
    return FeatureDistiller(
        pairs, s_cfg.hidden_size, t_cfg.hidden_size, hidden_weight=f.hidden_weight, hidden_kind=f.hidden_loss,
        attention_weight=f.attention_weight, relation_weight=f.relation_weight, relations=tuple(f.relations),
        num_relation_heads=f.relation_heads or s_cfg.num_attention_heads, causal=True, project=f.project,
    )


def teacher_needed_online(cfg: RunConfig, features) -> bool:
    """True when some step needs the live teacher (KD weight > 0 at any point, or feature matching)."""
    kd_ever = cfg.loss.kd_weight > 0 or (cfg.loss.kd_weight_end or 0) > 0
    return cfg.teacher.mode == "online" and (kd_ever or features is not None)


def open_cache(cfg: RunConfig, train_data, tokenizer):
    """The offline teacher cache checked against the training windows, or None in online mode.

    Raises:
        ValueError / FileNotFoundError: the cache is missing or was built from other data,
            sequence length, seed or tokenizer.
    """
    if cfg.teacher.mode != "offline":
        return None
    cache = TeacherCache(cfg.teacher.logit_cache)
    cache.check_compatible(train_data, tokenizer, cfg.data.document_masking)
    if cache.kind == "topk" and cfg.loss.divergence in ("mse", "cosine"):
        raise ValueError(f"loss.divergence {cfg.loss.divergence} needs full teacher logits: build the cache with --kind hidden")
    log.info("teacher signal: offline %s cache %s (%.1f bytes/token)", cache.kind, cfg.teacher.logit_cache, cache.bytes_per_token)
    return cache


def export_files(cfg: RunConfig, vocab_map, layer_map, stage: str) -> dict:
    """Self-describing sidecar files for an HF export (what it was distilled from and how)."""
    files = {"megadistill.json": {"stage": stage, "teacher": cfg.teacher.path, "layer_map": layer_map,
                                  "config": to_dict(cfg)}}
    if vocab_map is not None:
        files["vocab_map.json"] = vocab_map.to_dict()
    return files


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    distributed.init()
    engine.init_distributed_backend()
    setup_console(distributed.is_main())
    torch.manual_seed(cfg.train.seed)
    run_dir = Path(cfg.run_dir)
    if distributed.is_main():
        save_config(cfg, run_dir / "config.yaml")
    wall_start = time.time()

    teacher, tokenizer = load_teacher_once(cfg.teacher.path, cfg.teacher.cache_dir)
    teacher_vocab = check_vocab_sizes(teacher, tokenizer)
    train_sets = open_checked_datasets(cfg.data.train_prefixes, tokenizer)
    valid_sets = open_checked_datasets(cfg.data.valid_prefixes, tokenizer)
    offline = cfg.teacher.mode == "offline"
    sources = blend_if_several(train_sets, cfg.data.blend_alpha, cfg.data.blend_weights, cfg.data.blend_total_tokens,
                               seed=cfg.train.seed)
    if isinstance(sources[0], BlendedDataset) and distributed.is_main():
        log.info("language blend (alpha %s%s):\n%s", cfg.data.blend_alpha, ", explicit weights" if cfg.data.blend_weights else "",
                 format_report(sources[0].report()))
        atomic_write_text(run_dir / "blend.json", json.dumps(sources[0].report(), indent=2))
    train_data = PackedDataset(sources, cfg.data.seq_len_tokens, seed=cfg.train.seed, fixed_layout=offline)
    cache = open_cache(cfg, train_data, tokenizer)
    valid_data = PackedDataset(valid_sets, cfg.data.seq_len_tokens, shuffle=False) if valid_sets else None

    student, student_tokenizer, vocab_map, teacher_head, layer_map = build_student(cfg, teacher, tokenizer, train_sets, teacher_vocab)
    params = {"teacher": count_parameters(teacher), "student": count_parameters(student)}
    log.info("parameters: %s", json.dumps(params))
    log.info("student vocabulary: %d ids (teacher %d); layers %s", len(student_tokenizer), teacher_vocab, layer_map)
    if distributed.broadcast_object(not (run_dir / "hf_init").exists()):
        checkpoint.export_hf(student, student_tokenizer, run_dir / "hf_init", export_files(cfg, vocab_map, layer_map, "init"))

    ds_config = engine.build_ds_config(engine.load_ds_config(args.ds_config), cfg.train, cfg.optim, distributed.world_size())
    features = build_features(cfg, student, teacher, layer_map)
    if cache is not None and cache.kind == "topk":
        teacher_head = None  # sparse targets carry the teacher distribution
    module = DistillStudent(student, teacher_head, cfg.loss, vocab_size=len(student_tokenizer),
                            student_softcap=output_softcap(student.config), teacher_softcap=output_softcap(teacher.config),
                            features=features)
    student_engine = engine.init_student(module, ds_config, cfg.train, cfg.optim, external_params=[student.get_output_embeddings().weight])
    teacher_engine = engine.init_teacher(TeacherBody(teacher, features), ds_config) if teacher_needed_online(cfg, features) else None
    if teacher_engine is None:
        del teacher  # offline or CE-only: the teacher's weights are not needed past this point
    online = TeacherSource(engine=teacher_engine)
    data = LoopData(train=train_data, valid=valid_data, teacher=TeacherSource(cache=cache, vocab_map=vocab_map) if offline else online,
                    valid_teacher=online, vocab_map=vocab_map, seq_len_tokens=cfg.data.seq_len_tokens,
                    document_masking=cfg.data.document_masking)

    ckpt_dir = run_dir / "checkpoints"
    client = checkpoint.resume(student_engine, ckpt_dir)
    state = LoopState(**client["loop_state"]) if client else LoopState()
    if client:
        log.info("resumed from step %d (%d samples consumed)", state.step, state.consumed_samples)

    def save(s: LoopState) -> None:
        checkpoint.save(student_engine, ckpt_dir, s.step, {"loop_state": vars(s).copy()})

    metrics_logger = MetricsLogger(run_dir, distributed.is_main(), resume_step=state.step)
    totals = train_loop(student_engine, data, cfg.train, cfg.loss, state, metrics_logger, save)
    if totals["steps_run"] > 0:
        save(state)
    if state.step < cfg.train.max_steps:
        log.info("stopped at step %d of %d (train.exit_after_steps): rerun the same command to resume", state.step, cfg.train.max_steps)
        metrics_logger.close()
        distributed.barrier()
        return 0
    final_eval = {}
    if valid_data is not None:
        final_eval = evaluate_loss(student_engine, data.valid_teacher, valid_data, vocab_map, cfg.train.micro_batch_size,
                                   cfg.train.eval_max_batches, loss_weights_at(cfg.loss, state.step, cfg.train.max_steps),
                                   cfg.data.document_masking)
        metrics_logger.log(state.step, "valid", final_eval)
    checkpoint.export_hf(student, student_tokenizer, run_dir / "hf", export_files(cfg, vocab_map, layer_map, "distilled"))
    metrics_logger.close()
    if distributed.is_main():
        summary = {"world_size": distributed.world_size(), "steps": state.step, "consumed_samples": state.consumed_samples,
                   "parameters": params, "valid": final_eval, "wall_time_s": time.time() - wall_start, **totals}
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
        log.info("done: %s", json.dumps({k: summary[k] for k in ("steps", "tokens_per_s", "wall_time_s")}))
    distributed.barrier()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as err:
        # Bad user input: one line naming the problem and the fix, no traceback.
        print(f"megadistill.train: error: {err}", file=sys.stderr)
        sys.exit(2)
