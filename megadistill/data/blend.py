"""Language blending: temperature sampling over several token datasets (XLM-R / mT5 style).

With ``n_i`` tokens in language i, sampling language i with probability

    q_i = n_i^alpha / sum_j n_j^alpha

up-samples low-resource languages and down-samples high-resource ones (Conneau et al. 2020,
"Unsupervised Cross-lingual Representation Learning at Scale", XLM-R, §3.1, alpha = 0.3;
Xue et al. 2021, mT5, §2.2, alpha = 0.3). alpha = 1 keeps the natural proportions, alpha = 0
gives every language the same share.

:class:`BlendedDataset` turns the weights into a fixed, precomputed document index (the idea
of Megatron-LM's ``BlendedDataset``/``BlendedMegatronDatasetBuilder``): dataset i contributes
about ``q_i * total_tokens`` tokens, i.e. ``epochs_i = q_i * total_tokens / n_i`` passes over
its documents. The blend is itself a document-level dataset (``len``, ``ds[i]``, ``sizes``), so
it plugs into :class:`megadistill.data.packing.PackedDataset` unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megadistill.data.indexed import IndexedDataset, read_provenance

# The dataset index of every blended document is stored as uint16.
MAX_DATASETS = int(np.iinfo(np.uint16).max)


def blend_weights(tokens_per_dataset: Sequence[int], alpha: float = 0.3) -> np.ndarray:
    """Temperature-sampling weights ``q_i = n_i^alpha / sum_j n_j^alpha`` (XLM-R §3.1, mT5 §2.2).

    Args:
        tokens_per_dataset: ``n_i``, tokens in dataset i (each > 0).
        alpha: in ``[0, 1]``; 1 = proportional to size, 0 = uniform, 0.3 = XLM-R / mT5.
    Returns:
        float64 array of shape ``(len(tokens_per_dataset),)``, non-negative, summing to 1.
    Raises:
        ValueError: alpha outside ``[0, 1]`` (or NaN), no datasets, a count that is not a
            positive finite number (the message names its index).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"blend alpha must be in [0, 1] (1 = proportional, 0 = uniform), got {alpha}")
    counts = _positive_array(tokens_per_dataset, "token count")
    # In log space: n^alpha overflows nothing, and the largest term becomes exp(0) = 1.
    logits = alpha * np.log(counts)
    powered = np.exp(logits - logits.max())
    return powered / powered.sum()


def normalize_weights(explicit: Sequence[float]) -> np.ndarray:
    """User-given blend weights scaled to sum to 1.

    Args:
        explicit: one positive finite weight per dataset, any scale (``[3, 1]`` -> ``[0.75, 0.25]``).
    Returns:
        float64 array of shape ``(len(explicit),)`` summing to 1.
    Raises:
        ValueError: empty, or an entry not a positive finite number (the message names its index).
    """
    weights = _positive_array(explicit, "blend weight")
    return weights / weights.sum()


def _positive_array(values: Sequence[float], what: str) -> np.ndarray:
    """``values`` as float64 after checking each is a positive finite number; ValueError naming the bad entry."""
    values = list(values)
    if not values:
        raise ValueError(f"need at least one {what}, got none")
    for i, value in enumerate(values):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{what} {i} must be a number, got {value!r}") from None
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"{what} {i} must be positive and finite, got {value!r}")
    return np.asarray(values, dtype=np.float64)


class BlendedDataset:
    """Document-level blend of several datasets, sampled to target token shares.

    The blend holds about ``total_tokens`` tokens. Dataset i gets the target
    ``t_i = round(q_i * total_tokens)`` tokens: ``t_i // n_i`` full passes over its documents,
    each pass in its own seeded random order, then a uniformly random subset of documents for
    the rest (a prefix of a seeded random order, cut where its token count is closest to the
    remainder, so the realized tokens are within half a document of ``t_i`` and long and short
    documents are equally likely to be kept). The per-dataset sequences are then merged in one
    seeded random order that keeps each dataset's own order, so a repeated document comes back
    only after its pass is over. The index is precomputed as compact numpy arrays
    (uint16 dataset index, int64 document index, int64 sizes: 18 bytes per blended document).

    Args:
        datasets: objects with ``len()`` and ``ds[i] -> np.ndarray`` (1-D token ids of document
            i), optionally ``sizes`` (tokens per document; read from the documents otherwise),
            e.g. :class:`megadistill.data.indexed.IndexedDataset`. At most 65535.
        weights: explicit blend weights, one per dataset (any positive scale, normalized);
            overrides ``alpha``. None or empty: use ``alpha``.
        alpha: temperature exponent for :func:`blend_weights` when ``weights`` is None.
        total_tokens: tokens in the blend; None or 0 = the sum of all datasets' tokens.
        seed: non-negative int; the index is deterministic for (dataset sizes, weights,
            total_tokens, seed).
        names: one label per dataset for :meth:`report` (default ``dataset0``, ``dataset1``, ...).
    Raises:
        ValueError: no datasets or more than 65535, a dataset without documents or tokens,
            ``weights``/``names`` of the wrong length, bad weights or alpha (see
            :func:`blend_weights`), negative ``total_tokens``, a negative seed, or a
            ``total_tokens`` so small that no document is drawn.
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float] | None = None, alpha: float = 0.3,
                 total_tokens: int | None = None, seed: int = 1234, names: Sequence[str] | None = None):
        self.datasets = list(datasets)
        self.names = _check_names(names, len(self.datasets))
        self.seed = _check_seed(seed)
        self.doc_sizes = [_document_sizes(ds, name) for ds, name in zip(self.datasets, self.names)]
        self.tokens = np.array([int(s.sum()) for s in self.doc_sizes], dtype=np.int64)
        self.weights = self._resolve_weights(weights, alpha)
        self.total_tokens = _check_total(total_tokens, int(self.tokens.sum()))
        self.targets = np.rint(self.weights * self.total_tokens).astype(np.int64)
        sequences = [self._select(d) for d in range(len(self.datasets))]
        self.drawn = np.array([int(self.doc_sizes[d][seq].sum()) for d, seq in enumerate(sequences)], dtype=np.int64)
        self._dataset_index, self._document_index = self._interleave(sequences)
        self._sizes = self._blended_sizes()

    def _resolve_weights(self, weights: Sequence[float] | None, alpha: float) -> np.ndarray:
        """Explicit weights normalized, else ``blend_weights(tokens, alpha)``."""
        if weights is None or len(weights) == 0:
            return blend_weights(self.tokens, alpha)
        if len(weights) != len(self.datasets):
            listed = ", ".join(self.names)
            raise ValueError(f"got {len(weights)} blend weights for {len(self.datasets)} datasets ({listed})")
        return normalize_weights(weights)

    def _select(self, d: int) -> np.ndarray:
        """Document indices (int64) drawn from dataset ``d``, in this dataset's own order."""
        sizes = self.doc_sizes[d]
        full, remainder = divmod(int(self.targets[d]), int(self.tokens[d]))
        rng = np.random.default_rng([self.seed, 0, d])
        passes = [rng.permutation(len(sizes)) for _ in range(full)]
        order = rng.permutation(len(sizes))
        passes.append(order[:_prefix_closest_to(sizes[order], remainder)])
        return np.concatenate(passes).astype(np.int64, copy=False)

    def _interleave(self, sequences: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Random merge of the per-dataset sequences keeping each one's order: (uint16 dataset, int64 document)."""
        counts = [len(seq) for seq in sequences]
        if sum(counts) == 0:
            raise ValueError(f"total_tokens={self.total_tokens} is too small: the blend drew no document")
        labels = np.repeat(np.arange(len(sequences), dtype=np.uint16), counts)
        labels = np.random.default_rng([self.seed, 1]).permutation(labels)
        slots = np.argsort(labels, kind="stable")  # positions of dataset 0's documents, then dataset 1's, ...
        documents = np.empty(len(labels), dtype=np.int64)
        documents[slots] = np.concatenate(sequences)
        return labels, documents

    def _blended_sizes(self) -> np.ndarray:
        """Tokens of each blended document, int64."""
        sizes = np.empty(len(self._document_index), dtype=np.int64)
        for d, doc_sizes in enumerate(self.doc_sizes):
            mask = self._dataset_index == d
            sizes[mask] = doc_sizes[self._document_index[mask]]
        return sizes

    def __len__(self) -> int:
        return len(self._document_index)

    def __getitem__(self, i: int) -> np.ndarray:
        """Tokens of blended document ``i``: the underlying dataset's 1-D array (its dtype, no copy).

        Raises:
            IndexError: ``i`` outside ``[-len(self), len(self))``.
        """
        n = len(self._document_index)
        if not -n <= i < n:
            raise IndexError(f"blended document {i} out of range for {n} documents")
        return self.datasets[int(self._dataset_index[i])][int(self._document_index[i])]

    @property
    def sizes(self) -> np.ndarray:
        """Tokens per blended document, int64 array of shape ``(len(self),)``."""
        return self._sizes

    @property
    def dataset_index(self) -> np.ndarray:
        """Source dataset of each blended document, uint16 array of shape ``(len(self),)``."""
        return self._dataset_index

    @property
    def document_index(self) -> np.ndarray:
        """Document index inside its source dataset, int64 array of shape ``(len(self),)``."""
        return self._document_index

    @property
    def num_tokens(self) -> int:
        """Tokens in the blend (realized, ``sum(sizes)``)."""
        return int(self.drawn.sum())

    def report(self) -> list[dict[str, Any]]:
        """One row per dataset: what was asked for and what was drawn.

        Returns:
            dicts with ``name``; ``documents`` and ``tokens`` (n_i) of the source; ``weight``
            (q_i); ``drawn`` (tokens in the blend); ``share`` (drawn / all drawn tokens);
            ``epochs`` (drawn / n_i, > 1 means repeated data).
        """
        total = max(self.num_tokens, 1)
        return [
            {"name": name, "documents": len(sizes), "tokens": int(n), "weight": float(q), "drawn": int(drawn),
             "share": drawn / total, "epochs": drawn / n}
            for name, sizes, n, q, drawn in zip(self.names, self.doc_sizes, self.tokens, self.weights, self.drawn)
        ]


def _prefix_closest_to(sizes: np.ndarray, target: int) -> int:
    """Number k of leading documents whose token sum ``sizes[:k].sum()`` is closest to ``target`` (ties: more)."""
    if target <= 0:
        return 0
    cumulative = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    k = int(np.searchsorted(cumulative, target, side="left"))  # first k with cumulative[k] >= target
    if k >= len(cumulative):
        return len(sizes)
    return k if cumulative[k] - target <= target - cumulative[k - 1] else k - 1


def _document_sizes(dataset: Any, name: str) -> np.ndarray:
    """Tokens per document of ``dataset`` (int64): its ``sizes`` when present, else read from the documents."""
    sizes = getattr(dataset, "sizes", None)
    if sizes is None:
        sizes = [len(dataset[i]) for i in range(len(dataset))]
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) == 0 or int(sizes.sum()) <= 0:
        raise ValueError(f"dataset {name} has no tokens ({len(sizes)} documents); drop it from the blend")
    return sizes


def _check_names(names: Sequence[str] | None, count: int) -> list[str]:
    """Dataset labels, after checking the number of datasets (1 .. 65535)."""
    if count == 0:
        raise ValueError("BlendedDataset needs at least one dataset")
    if count > MAX_DATASETS:
        raise ValueError(f"BlendedDataset holds at most {MAX_DATASETS} datasets, got {count}")
    if names is None:
        return [f"dataset{i}" for i in range(count)]
    if len(names) != count:
        raise ValueError(f"got {len(names)} names for {count} datasets")
    return [str(n) for n in names]


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _check_total(total_tokens: int | None, available: int) -> int:
    """``total_tokens``, or ``available`` when it is None or 0; ValueError when negative."""
    if total_tokens is None or total_tokens == 0:
        return available
    if total_tokens < 0:
        raise ValueError(f"total_tokens must be positive (or None / 0 for all {available} tokens), got {total_tokens}")
    return int(total_tokens)


def format_report(rows: Sequence[dict[str, Any]]) -> str:
    """Aligned text table of :meth:`BlendedDataset.report` rows, with a total line.

    Columns: ``dataset | documents | tokens | weight | drawn | share | epochs``; counts in tokens
    with thousands separators, weight and share as fractions of 1, epochs = drawn / tokens.
    """
    header = ["dataset", "documents", "tokens", "weight", "drawn", "share", "epochs"]
    body = [_report_cells(r) for r in rows]
    tokens, drawn = sum(r["tokens"] for r in rows), sum(r["drawn"] for r in rows)
    total = {"name": "total", "documents": sum(r["documents"] for r in rows), "tokens": tokens,
             "weight": sum(r["weight"] for r in rows), "drawn": drawn, "share": 1.0 if drawn else 0.0,
             "epochs": drawn / tokens if tokens else 0.0}
    lines = [header] + body + [_report_cells(total)]
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    text = [_join(line, widths) for line in lines]
    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([text[0], rule, *text[1:-1], rule, text[-1]])


def _report_cells(row: dict[str, Any]) -> list[str]:
    return [str(row["name"]), f"{row['documents']:,}", f"{row['tokens']:,}", f"{row['weight']:.4f}",
            f"{row['drawn']:,}", f"{row['share']:.4f}", f"{row['epochs']:.3f}"]


def _join(cells: list[str], widths: list[int]) -> str:
    """Name column left-aligned, numbers right-aligned, ``|`` between."""
    first = cells[0].ljust(widths[0])
    return " | ".join([first] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])])


def blend_from_prefixes(prefixes: Sequence[str | Path], alpha: float = 0.3, weights: Sequence[float] | None = None,
                        total_tokens: int | None = None, seed: int = 1234) -> BlendedDataset:
    """Open an :class:`IndexedDataset` per prefix and blend them (see :class:`BlendedDataset`).

    Each dataset is named from its provenance ``<prefix>.json`` as ``<language>_<script>``
    (``hin_Deva``; ``hin_Deva.iast`` for a romanized one), else by the prefix's file name;
    names that would repeat get ``:<file name>`` appended, and ``#<position>`` if still equal.

    Raises:
        FileNotFoundError / ValueError: as :class:`IndexedDataset` and :class:`BlendedDataset`.
    """
    datasets = [IndexedDataset(p) for p in prefixes]
    return BlendedDataset(datasets, weights=weights, alpha=alpha, total_tokens=total_tokens, seed=seed,
                          names=_prefix_names(prefixes))


def _prefix_names(prefixes: Sequence[str | Path]) -> list[str]:
    """Report names of the prefixes, made unique with the file name, then the position, where they collide."""
    names = [_provenance_name(p) or Path(p).name for p in prefixes]
    names = [f"{n}:{Path(p).name}" if names.count(n) > 1 and n != Path(p).name else n for n, p in zip(names, prefixes)]
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _provenance_name(prefix: str | Path) -> str | None:
    """``<language>_<script>[.<romanization scheme>]`` from ``<prefix>.json``; None without a usable one."""
    try:
        meta = read_provenance(prefix)
    except (FileNotFoundError, ValueError):
        return None
    language, script = meta.get("language"), meta.get("script")
    if not language:
        return None
    name = f"{language}_{script}" if script else str(language)
    romanization = meta.get("romanization")
    if isinstance(romanization, dict) and romanization.get("scheme"):
        name += f".{romanization['scheme']}"
    return name


def blend_if_several(datasets: Sequence, alpha: float = 0.3, weights: Sequence[float] | None = None,
                     total_tokens: int | None = None, seed: int = 1234) -> list:
    """The document sources to pack: ``datasets`` as given when there is one, else one :class:`BlendedDataset`.

    Datasets with a ``prefix`` (``IndexedDataset``) are named from their provenance, as in
    :func:`blend_from_prefixes`. Used identically by training and the teacher-cache tool, so both
    see the same windows.
    """
    if len(datasets) <= 1:
        return list(datasets)
    prefixes = [getattr(ds, "prefix", None) for ds in datasets]
    names = _prefix_names(prefixes) if all(p is not None for p in prefixes) else None
    return [BlendedDataset(datasets, weights=weights or None, alpha=alpha, total_tokens=total_tokens or None, seed=seed,
                           names=names)]


def underlying_datasets(datasets: Sequence) -> list:
    """The datasets inside any blend in ``datasets`` (for fingerprints), in order."""
    return [inner for ds in datasets for inner in (ds.datasets if isinstance(ds, BlendedDataset) else [ds])]
