"""Benchmark: peak memory and time of naive full-logits KD vs the chunked fused KD loss on CPU.

Each (method, tokens) cell runs forward + backward of the student side (teacher under
no_grad) in a fresh subprocess, which reports its own peak RSS (``resource.getrusage``
``ru_maxrss``) and wall time; the parent prints one table.

    python bench/kd_loss_memory.py                      # V = 262,144, hidden 640, fp32 (~20 min on 2 cores)
    python bench/kd_loss_memory.py --vocab 32000 --tokens 1024 4096 --chunked-tokens 16384
    python bench/kd_loss_memory.py --skip-naive-above 1024   # when 2048 naive tokens will not fit
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def naive_distill_loss(student_hidden, student_weight, labels, teacher_hidden, teacher_weight, temperature):
    """Reference: full ``[N, V]`` fp32 logits of both models, plain autograd; returns the loss."""
    z = student_hidden @ student_weight.T
    ce = F.cross_entropy(z, labels)
    with torch.no_grad():
        log_pt = F.log_softmax(teacher_hidden @ teacher_weight.T / temperature, dim=-1)
    log_ps = F.log_softmax(z / temperature, dim=-1)
    kd = F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * temperature**2
    return ce + kd


def make_inputs(tokens: int, vocab: int, hidden: int, teacher_hidden: int):
    """Random fp32 inputs: student side requires grad, teacher side does not."""
    g = torch.Generator().manual_seed(0)
    return dict(
        student_hidden=torch.randn(tokens, hidden, generator=g).requires_grad_(True),
        student_weight=(0.05 * torch.randn(vocab, hidden, generator=g)).requires_grad_(True),
        labels=torch.randint(0, vocab, (tokens,), generator=g),
        teacher_hidden=torch.randn(tokens, teacher_hidden, generator=g),
        teacher_weight=0.05 * torch.randn(vocab, teacher_hidden, generator=g),
    )


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far, GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_child(args) -> None:
    """Measure one cell in this (fresh) process and print a JSON line."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed
    from megadistill.losses.logits import chunked_distill_loss
    from megadistill.objectives.spec import KDSpec

    torch.set_num_threads(args.threads)
    inputs = make_inputs(args.tokens[0], args.vocab, args.hidden, args.teacher_hidden)
    spec = KDSpec(vocab_size=args.vocab, temperature=args.temperature, chunk_size_tokens=args.chunk_size_tokens)
    base = peak_rss_gib()
    start = time.perf_counter()
    if args.child == "naive":
        loss = naive_distill_loss(**inputs, temperature=args.temperature)
    else:
        loss = chunked_distill_loss(
            inputs["student_hidden"], inputs["student_weight"], inputs["labels"], spec,
            teacher_hidden=inputs["teacher_hidden"], teacher_weight=inputs["teacher_weight"],
        ).loss
    loss.backward()
    seconds = time.perf_counter() - start
    print(json.dumps(dict(loss=loss.item(), seconds=seconds, base_gib=base, peak_gib=peak_rss_gib())))


def measure(method: str, tokens: int, args) -> dict:
    """Run one cell in a subprocess; return its JSON result or an ``error`` entry."""
    cmd = [
        sys.executable, __file__, "--child", method, "--tokens", str(tokens), "--vocab", str(args.vocab),
        "--hidden", str(args.hidden), "--teacher-hidden", str(args.teacher_hidden),
        "--chunk-size-tokens", str(args.chunk_size_tokens), "--temperature", str(args.temperature),
        "--threads", str(args.threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [""])[-1][-60:]
        return dict(error="killed (out of memory?)" if proc.returncode < 0 else f"exit {proc.returncode}: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(rows: list[tuple[str, int, dict]], args) -> None:
    """One line per cell: peak RSS, RSS above the inputs, seconds, and loss (must agree)."""
    print(
        f"vocab={args.vocab} hidden={args.hidden} teacher_hidden={args.teacher_hidden} fp32 "
        f"chunk_size_tokens={args.chunk_size_tokens} threads={args.threads} tau={args.temperature}"
    )
    print(f"{'method':<8} {'tokens':>7} {'peak RSS GiB':>13} {'above inputs GiB':>17} {'fwd+bwd s':>10} {'loss':>10}")
    for method, tokens, r in rows:
        if "error" in r or "skipped" in r:
            print(f"{method:<8} {tokens:>7}  {r.get('error', r.get('skipped'))}")
            continue
        above = r["peak_gib"] - r["base_gib"]
        print(f"{method:<8} {tokens:>7} {r['peak_gib']:>13.2f} {above:>17.2f} {r['seconds']:>10.1f} {r['loss']:>10.4f}")


def parse_args(argv=None):
    """Command-line flags; ``--child`` is internal (one measurement per subprocess)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=262_144, help="student = restricted teacher vocabulary, ids")
    p.add_argument("--hidden", type=int, default=640, help="student hidden width")
    p.add_argument("--teacher-hidden", type=int, default=640, help="teacher hidden width")
    p.add_argument("--tokens", type=int, nargs="*", default=[1024, 2048], help="token counts for both methods")
    p.add_argument("--chunked-tokens", type=int, nargs="*", default=[8192, 32768], help="extra token counts, chunked only")
    p.add_argument("--chunk-size-tokens", type=int, default=64,
                   help="tokens per chunk of the chunked loss (64 x 262,144 x 4 B = 64 MiB per [chunk, V] buffer)")
    p.add_argument("--skip-naive-above", type=int, default=None, help="skip naive runs with more tokens than this")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--child", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    """Run every cell in its own subprocess and print the table."""
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return
    rows = []
    for tokens in args.tokens:
        for method in ("naive", "chunked"):
            if method == "naive" and args.skip_naive_above is not None and tokens > args.skip_naive_above:
                rows.append((method, tokens, dict(skipped=f"skipped (--skip-naive-above {args.skip_naive_above})")))
                continue
            rows.append((method, tokens, measure(method, tokens, args)))
    for tokens in args.chunked_tokens:
        rows.append(("chunked", tokens, measure("chunked", tokens, args)))
    print_table(rows, args)


if __name__ == "__main__":
    main()
