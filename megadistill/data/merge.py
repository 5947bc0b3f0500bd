"""Merge indexed-dataset shards (``<prefix>.bin/.idx/.json``) into one dataset, streaming.

IndicCorp-sized corpora are binarized as shards (one job per input file or per node, see
``tools/binarize.py``) and merged afterwards: the ``.bin`` files are concatenated byte for byte,
the ``.idx`` is rebuilt from the sequence lengths, and the provenance sums the counts and keeps
every shard's sources. Merging shards in order gives the same bytes as binarizing their inputs
in one run (without ``--dedup``: deduplication is per shard, a merge does not deduplicate across
shards). Megatron-LM ships the same operation as ``tools/merge_datasets.py``; this one also
checks the provenance so that shards tokenized differently are never mixed.
"""

from __future__ import annotations

import datetime
import glob
import logging
from pathlib import Path
from typing import Any, Sequence

from megadistill.data.framing import framing_from_provenance
from megadistill.data.indexed import (IndexedDataset, IndexedDatasetWriter, dataset_prefix, read_provenance,
                                      write_provenance)
from megadistill.data.inspect import resolve_dataset
from megadistill.data.sources import sum_counts

logger = logging.getLogger(__name__)

# Provenance fields every shard must agree on (a difference changes what the token ids mean).
_MUST_MATCH = ("format", "tokenizer", "bos_id", "eos_id", "add_bos", "dtype")
# Fields that identify the corpus slice; shards of several languages are refused unless allowed.
_SLICE = ("language", "script")
_SUMMED = ("documents", "tokens", "characters", "bytes_utf8")
_EXAMPLES = 5


def merge_datasets(prefixes: Sequence[str | Path], output_prefix: str | Path, *,
                   allow_mixed_languages: bool = False) -> dict[str, Any]:
    """Concatenate indexed datasets in the given order into ``<output_prefix>.bin/.idx/.json``.

    Tokens are copied as raw bytes in 64 MiB chunks, so memory is 8 bytes per document plus one
    chunk whatever the corpus size. The output appears atomically (temp files + rename, the
    provenance last); on any error nothing new is left behind and a previous output is untouched.

    Args:
        prefixes: two or more shard prefixes (a ``.bin``/``.idx``/``.json`` suffix is dropped), each
            with a ``.json`` provenance written by ``tools/binarize.py``, ``tools/adopt_dataset.py``
            (a Megatron-LM pair) or an earlier merge.
        output_prefix: the merged dataset's prefix; must not be one of ``prefixes``.
        allow_mixed_languages: merge shards whose language or script differ (the result records
            ``language``/``script`` as None and lists them under ``languages``). Off by default:
            blending needs one dataset per language.
    Returns:
        The merged provenance: the shared fields of the shards; documents, tokens, characters,
        bytes and dropped-record counts summed (characters / bytes None when a shard, e.g. an
        adopted one, does not know its own); ``sources`` concatenated (each tagged with its
        ``shard``); ``merged_from`` with one entry per shard; for romanized shards the
        romanization counts summed and ``unmapped_fraction`` recomputed.
    Raises:
        ValueError: fewer than two shards, the output is one of the inputs, a shard's ``.bin``/``.idx``
            is invalid, or the shards disagree on tokenizer, special tokens, dtype, language,
            script or romanization scheme (the message names both shards and the field).
        FileNotFoundError: a shard's ``.bin``, ``.idx`` or ``.json`` is missing (one line with the fix,
            :func:`~megadistill.data.inspect.resolve_dataset`).
    """
    paths = [resolve_dataset(p, f"shard {i}") for i, p in enumerate(prefixes)]
    output_prefix = Path(output_prefix)
    if len(paths) < 2:
        raise ValueError(f"merging needs at least two datasets, got {len(paths)}")
    if output_prefix.resolve() in {p.resolve() for p in paths}:
        raise ValueError(f"output {output_prefix} is also an input; choose another --output-prefix")
    metas = [read_provenance(p) for p in paths]
    datasets = [IndexedDataset(p) for p in paths]
    _check_compatible(paths, metas, allow_mixed_languages)
    for path, meta, ds in zip(paths, metas, datasets):
        _check_counts(path, meta, ds)
    Path(f"{output_prefix}.json").unlink(missing_ok=True)  # never new tokens beside old provenance
    with IndexedDatasetWriter(output_prefix, datasets[0].dtype) as writer:
        for ds in datasets:
            writer.add_dataset(ds)
    merged = merged_provenance(paths, metas)
    write_provenance(output_prefix, merged)
    logger.info("merged %d datasets into %s: %d documents, %d tokens", len(paths), output_prefix,
                merged["documents"], merged["tokens"])
    return merged


def _check_compatible(paths: list[Path], metas: list[dict], allow_mixed_languages: bool) -> None:
    """ValueError naming the first shard that differs from the first one in a field that must match."""
    fields = _MUST_MATCH + (() if allow_mixed_languages else _SLICE)
    first = metas[0]
    _check_framings(paths, metas)
    for path, meta in zip(paths[1:], metas[1:]):
        for key in fields:
            if meta.get(key) != first.get(key):
                raise ValueError(
                    f"{path}.json: {key} is {meta.get(key)!r} but {paths[0]}.json has {first.get(key)!r}; "
                    + ("pass --allow-mixed-languages to merge languages anyway (blending needs one dataset per language)"
                       if key in _SLICE else "shards must come from the same tokenizer and binarize settings")
                )
        if _scheme(meta) != _scheme(first):
            raise ValueError(f"{path}.json: romanization scheme {_scheme(meta)!r} but {paths[0]}.json has {_scheme(first)!r}")


def _check_framings(paths: list[Path], metas: list[dict]) -> None:
    """ValueError naming the first shard framed unlike the first one (no record, as in older shards, = decoder)."""
    first = framing_from_provenance(metas[0], f"{paths[0]}.json")
    for path, meta in zip(paths[1:], metas[1:]):
        framing = framing_from_provenance(meta, f"{path}.json")
        if framing != first:
            raise ValueError(f"{path}.json: framing is {framing.as_dict()} but {paths[0]}.json has "
                             f"{first.as_dict()}; shards must come from the same tokenizer and binarize settings")


def _check_counts(path: Path, meta: dict, ds: IndexedDataset) -> None:
    """ValueError if the provenance's document/token counts do not describe the ``.idx`` next to it."""
    if meta.get("documents") != len(ds) or meta.get("tokens") != ds.num_tokens:
        raise ValueError(
            f"{path}.json says {meta.get('documents')} documents / {meta.get('tokens')} tokens but {path}.idx holds "
            f"{len(ds)} / {ds.num_tokens}: the sidecar belongs to another run; re-binarize this shard"
        )


def _scheme(meta: dict) -> str | None:
    roman = meta.get("romanization")
    return roman.get("scheme") if isinstance(roman, dict) else None


def merged_provenance(paths: Sequence[Path], metas: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Provenance of the concatenation of shards ``paths`` with provenances ``metas`` (no checks).

    Returns:
        A new dict, see :func:`merge_datasets`. Pairing keys (``romanized_as``, ``paired_with``)
        are dropped: a merged dataset is paired with another only if the user merged both twins
        in the same order, which this function cannot know.
    """
    merged = {key: value for key, value in metas[0].items() if key not in ("romanized_as",)}
    merged["framing"] = framing_from_provenance(metas[0]).as_dict()
    for key in _SUMMED:
        merged[key] = _sum_known([m.get(key, 0) for m in metas])  # absent (older shards): 0, as before
    merged["sources"] = [dict(src, shard=str(path)) for path, m in zip(paths, metas) for src in m.get("sources", [])]
    merged["dropped"] = sum_counts(m.get("dropped", {}) for m in metas)
    mixed = [m.get("mixed_script_documents") or {"count": 0, "examples": []} for m in metas]
    merged["mixed_script_documents"] = {"count": sum(x["count"] for x in mixed),
                                        "examples": [e for x in mixed for e in x["examples"]][:_EXAMPLES]}
    languages = sorted({f"{m.get('language')}_{m.get('script')}" for m in metas})
    if len(languages) > 1:
        merged["language"], merged["script"], merged["languages"] = None, None, languages
    if any("special_tokens_in_text" in m for m in metas):
        merged["special_tokens_in_text"] = _merged_special_tokens([m.get("special_tokens_in_text") for m in metas])
    if _scheme(metas[0]) is not None:
        merged["romanization"] = _merged_romanization([m["romanization"] for m in metas])
    merged["merged_from"] = [{"prefix": str(p), "documents": m.get("documents"), "tokens": m.get("tokens")}
                             for p, m in zip(paths, metas)]
    merged["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return merged


def _merged_special_tokens(reports: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Literal special-token counts summed over shards (absent in older shards: 0); examples kept up to the limit."""
    known = [r for r in reports if r]
    return {"count": sum(int(r.get("count", 0)) for r in known),
            "documents": sum(int(r.get("documents", 0)) for r in known),
            "examples": [e for r in known for e in r.get("examples", [])][:_EXAMPLES],
            "literal_kept_as_text": all(r.get("literal_kept_as_text", True) for r in known)}


def _sum_known(values: list[Any]) -> int | None:
    """Sum of per-shard counts; None when one shard's is unknown (None: an adopted Megatron pair has no character count)."""
    return None if any(v is None for v in values) else sum(int(v) for v in values)


def _merged_romanization(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Romanization counts summed over shards, unmapped fraction recomputed, no twin recorded."""
    out = dict(reports[0], paired_with=None)
    for key, value in reports[0].items():
        if isinstance(value, int) and not isinstance(value, bool):
            out[key] = sum(int(r.get(key) or 0) for r in reports)
    out["unmapped_fraction"] = out.get("unmapped_characters", 0) / max(out.get("native_characters", 0), 1)
    return out


def prefixes_matching(pattern: str) -> list[str]:
    """Shard prefixes of the ``.idx`` files a glob matches, sorted (``pattern`` may name ``.idx`` files or prefixes).

    Raises:
        FileNotFoundError: the glob matches no ``.idx`` file.
    """
    idx_pattern = pattern if pattern.endswith(".idx") else pattern + ".idx"
    matches = sorted(glob.glob(idx_pattern))
    if not matches:
        raise FileNotFoundError(f"shard glob {pattern!r}: no .idx file matches {idx_pattern!r}; "
                                "check the path (and quote the glob so the shell leaves it alone)")
    return [str(dataset_prefix(m)) for m in matches]
