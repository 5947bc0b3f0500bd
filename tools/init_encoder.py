#!/usr/bin/env python
"""Write a randomly initialized XLM-R-shaped masked LM and a Unigram tokenizer trained on text files.

    python tools/init_encoder.py --input ../shared/data/sib200/*/train.tsv --vocab-size 8000 \
        --layers 6 --hidden 256 --heads 4 --intermediate 1024 --output runs/encoder/init

The directory loads with ``AutoModelForMaskedLM`` / ``AutoTokenizer`` and serves as the starting
point of a from-scratch encoder (``teacher.path=DIR teacher.mode=none student.layer_map=<all layers>
student.trim_vocab=false``). Text files are SIB-200/FLORES ``.tsv`` (column ``text``), ``.txt`` or ``.jsonl``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="text files to train the tokenizer on")
    parser.add_argument("--output", required=True, help="directory to write (replaced atomically)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megadistill.data.sources import read_documents
    from megadistill.files import atomic_directory
    from megadistill.models.scratch import random_xlmr_encoder, train_unigram_tokenizer

    texts = [doc.text for path in args.input for doc in read_documents(path)]
    tokenizer = train_unigram_tokenizer(texts, args.vocab_size)
    model = random_xlmr_encoder(tokenizer, args.layers, args.hidden, args.heads, args.intermediate, seed=args.seed)
    with atomic_directory(args.output) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    params = sum(p.numel() for p in model.parameters())
    print(f"init_encoder: {len(texts):,} texts, vocabulary {len(tokenizer):,}, {params / 1e6:.2f}M parameters -> {args.output}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as err:
        print(f"init_encoder: error: {err}", file=sys.stderr)
        sys.exit(2)
