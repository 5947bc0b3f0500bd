"""Offline teacher cache: top-k log-probs (+ tail mass) or final hidden states, aligned with packed windows.

The cache follows the training data's fixed packing (``PackedDataset(..., fixed_layout=True)``):
window ``w`` holds ``L + 1`` teacher ids. A causal-LM cache (``objective: clm``) gets ``L`` rows
per window, one per input position, in the order the trainer reads them. A masked-LM cache
(``objective: mlm``, an encoder teacher) gets one row per *masked position* of the window's
static mask (the positions whose label is not ``-100``, including the 10% random / 10% kept
tokens), in position order: the masks are replayed with the trainer's own
:class:`~megadistill.data.batches.MlmBatches` (``static_mask=True``: the mask of window ``w``
depends only on ``(seed, w)``), the teacher reads the masked ids, and only the masked rows are
projected and stored, about ``mask_prob`` of a per-token cache's bytes. A cache directory
holds ``meta.json`` and shards of ``windows_per_shard`` windows, each a set of ``.npy`` files
read with ``mmap``:

* ``topk``: ``entries`` uint32 (teacher id in the low ``id_bits`` bits, ``round(-logprob /
  logprob_step)`` in the high bits: 4 bytes per kept entry), ``counts`` uint8 [rows]
  (entries per row: top-p makes it variable), ``window_offsets`` int64 [windows+1] (first
  entry of each window), ``tail`` float16 [rows] (log of the mass outside the kept entries).
  ``rows`` is ``windows * L`` for ``clm``; ``mlm`` adds ``row_offsets`` int64 [windows+1]
  (first row of each window) and ``masked_hash`` uint64 [windows] (digest of the masked
  teacher ids the teacher read, :meth:`TeacherCache.verify_masked`).
* ``hidden`` (``clm`` only): ``hidden`` float16 [windows, L, H] (the teacher's final normed
  hidden states; the student run recomputes logits through the teacher head it keeps).
* both: ``window_hash`` uint64 [windows] (blake2b of the window's ids) to catch a cache
  read against other data, and ``shard_XXXXXX.done.json`` written last: a shard is complete
  iff its marker exists, so an interrupted writer leaves nothing that counts.

Every file is written to ``.<name>.tmp<pid>``, fsynced and renamed (:func:`write_shard`,
:func:`write_cache_json`). A full disk or quota removes the partial shard's files and raises
:class:`CacheDiskFull` (one line: the file, bytes written, bytes still needed, bytes free);
SIGTERM / SIGINT inside :func:`interruptible` raise :class:`CacheInterrupted`, with the same
cleanup. Complete shards are never touched, so rerunning the writer resumes from them.

A ``topk`` cache holds the top-k of the teacher distribution at the KD temperature
``CacheSpec.temperature`` (``softmax(z / T)``, tempered before the cut, so the tail bucket is
the exact tempered tail ``sum_i p_i^(1/T)``); a tail bucket cannot be re-tempered later, so the
cache is valid only for a loss at that temperature (:meth:`TeacherCache.check_compatible`, and
the loss checks ``SparseTargets.temperature``). Hidden-state caches do not depend on it.
Format version 2 added ``temperature`` (version 1 reads as 1.0); version 3 added ``objective``
and ``masking`` (older caches read as ``clm``).

Top-k targets with an explicit tail bucket follow the sparse-KD practice of storing
teacher top-k logits offline (e.g. Raman et al. 2023, "For distillation, tokens are not all
you need"; MiniPLM / "Sparse logit sampling", Anshumann et al. 2025, arXiv:2503.16870); the
masked-position targets are DistilBERT's KD positions (Sanh et al. 2019, arXiv:1910.01108).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import io
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from megadistill.data.batches import MlmBatches
from megadistill.data.blend import underlying_datasets
from megadistill.data.collate import IGNORE_INDEX
from megadistill.data.indexed import tokenizer_sha256
from megadistill.data.masking import MaskingConfig, MlmCollator
from megadistill.data.packing import position_ids_from_documents
from megadistill.files import disk_full_errno, fsync_directory
from megadistill.losses.logits import SparseTargets, topk_targets
from megadistill.models.adapters import adapter_for
from megadistill.models.teacher import final_hidden_states, output_softcap
from megadistill.stop import Interrupted
from megadistill.stop import interruptible as _interruptible

FORMAT = "megadistill-teacher-cache"
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1: before CacheSpec.temperature (always 1.0); 2: before objective (always clm)
KINDS = ("topk", "hidden")
OBJECTIVES = ("clm", "mlm")
LOGPROB_RANGE_NATS = 32.0
FP16_MAX = 65504.0

__all__ = ["CacheDiskFull", "CacheInterrupted", "CacheSpec", "TeacherCache", "complete_shard_bytes", "disk_full_errno",
           "interruptible", "npy_bytes", "remove_stale_temporaries", "write_cache_json", "write_npy", "cached_rows", "compute_shard", "dataset_fingerprint", "masked_teacher_targets",
           "mlm_replay", "pack_entries", "shard_windows", "spec_for_teacher", "teacher_hidden_rows", "teacher_targets",
           "unpack_entries", "window_hash", "write_shard"]




class CacheDiskFull(OSError):
    """The disk or quota filled (ENOSPC / EDQUOT) while a cache file was written; its partial files were removed.

    ``str(err)`` is one line: the file, bytes written before it filled, an estimate of the bytes
    still needed to finish the cache, the bytes free (after the cleanup) and what was kept.

    Attributes:
        errno: ``errno.ENOSPC`` or ``errno.EDQUOT``.
        path: Path of the file being written (its final name).
        written: int, bytes of the shard (or file) that reached the disk before the error.
        needed: int, estimated bytes still to write to finish the cache.
        free: int, bytes free on the cache's filesystem after the cleanup (``shutil.disk_usage``).
    """

    def __init__(self, code: int, path: Path, written: int, needed: int, how: str, root: Path, kept: int,
                 shard: int | None = None, done: str | None = None) -> None:
        self.path, self.written, self.needed = Path(path), written, needed
        self.free = shutil.disk_usage(root).free
        what = "disk full" if code == errno.ENOSPC else "disk quota exceeded"
        part = (f"{written:,} bytes of shard {shard} written before it filled (its partial files were removed)"
                if shard is not None else f"{written:,} bytes of it written before it filled (the partial file was removed)")
        done = done or (f"{kept} complete shards kept: free space or use another --output, "
                        "then rerun the same command to resume")
        super().__init__(code, f"{what} writing {path}: {part}; about {needed:,} more bytes needed to finish the cache "
                               f"({how}); {self.free:,} bytes free on {root}; {done}")

    def __str__(self) -> str:
        return self.strerror


class CacheInterrupted(Interrupted):
    """SIGTERM or SIGINT arrived while caching (:func:`interruptible`); the cleanup has run.

    ``str(err)`` is one line; ``signum`` the signal number (``128 + signum``: the exit status).
    """


def interruptible(what: str):
    """:func:`megadistill.stop.interruptible` raising :class:`CacheInterrupted` (``what`` ends its message)."""
    return _interruptible(what, CacheInterrupted)


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds; two runs with different specs may not share a directory.

    Attributes:
        kind: ``topk`` or ``hidden``.
        k: most entries kept per token (top-k), ``1 <= k <= 255``.
        top_p: keep the smallest prefix reaching this mass, at most ``k`` entries.
        seq_len_tokens: packed window length ``L`` (tokens fed to the teacher per window).
        seed: packing seed (document order of the fixed layout).
        windows_per_shard: windows per shard file set.
        document_masking: the teacher saw position ids restarting per document (attention kept
            inside documents), as training with ``data.document_masking`` does.
        temperature: ``topk`` only: KD temperature ``T > 0`` of the stored distribution
            (``softmax(z / T)``, tempered before top-k); training must use the same
            ``loss.temperature``. Hidden-state caches are temperature-independent: 1.0.
        objective: ``clm`` (a row per position: next-token targets of a causal teacher) or
            ``mlm`` (a row per masked position of the static mask: an encoder teacher).
        masking: ``mlm`` only: the :class:`MaskingConfig` of the replayed masks (training's
            ``data.mask_prob`` / ``data.whole_word``); the mask seed is ``seed`` (``train.seed``).
        window_bos: the windows starting inside a document began with BOS (``data.window_bos``).
    """

    kind: str = "topk"
    k: int = 64
    top_p: float = 1.0
    seq_len_tokens: int = 256
    seed: int = 1234
    windows_per_shard: int = 256
    document_masking: bool = True
    temperature: float = 1.0
    objective: str = "clm"
    masking: MaskingConfig | None = None
    window_bos: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field."""
        self._validate_objective()
        if self.kind not in KINDS:
            raise ValueError(f"cache kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not 1 <= self.k <= 255:
            raise ValueError(f"k must be in [1, 255] (entry counts are stored as uint8), got {self.k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seq_len_tokens < 1 or self.windows_per_shard < 1:
            raise ValueError("seq_len_tokens and windows_per_shard must be >= 1")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite T > 0, got {self.temperature}")
        if self.kind == "hidden" and self.temperature != 1.0:
            raise ValueError(f"a hidden-state cache does not depend on the temperature (got {self.temperature}): "
                             "drop --temperature, the loss tempers the logits it computes from the hidden states")

    def _validate_objective(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"cache objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective == "clm":
            if self.masking is not None:
                raise ValueError("masking settings (--mask-prob, --whole-word) apply to encoder (masked-LM) teachers "
                                 "only: drop them for a causal teacher")
            return
        if self.masking is None:
            raise ValueError("a masked-LM cache needs its masking settings (CacheSpec.masking)")
        self.masking.validate()
        if self.kind != "topk":
            raise ValueError("a hidden-state cache of an encoder (masked-LM) teacher is not supported: use --kind topk "
                             "(top-k targets at the masked positions, about mask_prob of a per-token cache's bytes)")


def spec_for_teacher(spec: CacheSpec, teacher, mask_prob: float | None = None, whole_word: bool = False) -> CacheSpec:
    """``spec`` for the objective ``teacher`` is trained with: ``mlm`` for an encoder, ``clm`` for a decoder.

    An encoder teacher (``adapter_for(teacher).family == "encoder"``) gets
    ``MaskingConfig(mask_prob (default 0.15), whole_word=whole_word)``, as the pre-training
    stage builds it from ``data.mask_prob`` / ``data.whole_word``.

    Raises:
        ValueError: ``mask_prob`` or ``whole_word`` given for a decoder teacher, or as :meth:`CacheSpec.validate`
            (``--kind hidden`` with an encoder).
    """
    if adapter_for(teacher).family != "encoder":
        if mask_prob is not None or whole_word:
            raise ValueError(f"--mask-prob / --whole-word apply to encoder (masked-LM) teachers; "
                             f"{type(teacher).__name__} is a causal LM: drop them")
        return spec
    masking = MaskingConfig(mask_prob=0.15 if mask_prob is None else mask_prob, whole_word=whole_word)
    spec = dataclasses.replace(spec, objective="mlm", masking=masking)
    spec.validate()
    return spec


def spec_from_meta(meta: dict) -> CacheSpec:
    """The :class:`CacheSpec` of a ``meta.json``; fields added later default to what older writers did."""
    fields = {"document_masking": False, "temperature": 1.0, "objective": "clm", "masking": None, "window_bos": False,
              **meta["spec"]}
    if fields["masking"] is not None:
        fields["masking"] = MaskingConfig(**fields["masking"])
    return CacheSpec(**fields)


def window_hash(tokens: np.ndarray) -> int:
    """64-bit blake2b digest of a window's token ids (as little-endian int64)."""
    data = np.ascontiguousarray(np.asarray(tokens, dtype="<i8")).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def dataset_fingerprint(dataset) -> dict:
    """Identity of an indexed dataset: prefix, documents, tokens and the sha256 of its ``.idx`` file."""
    idx_path = Path(f"{dataset.prefix}.idx")
    digest = hashlib.sha256()
    with open(idx_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"prefix": str(dataset.prefix), "documents": len(dataset), "tokens": int(dataset.num_tokens),
            "idx_sha256": digest.hexdigest()}


def id_layout(vocab_size: int) -> tuple[int, float]:
    """``(id_bits, logprob_step)`` for packing entries of a ``vocab_size`` vocabulary into uint32.

    The remaining ``32 - id_bits`` bits quantize ``-logprob`` over ``[0, 32]`` nats (step
    ``32 / (2**(32 - id_bits) - 1)``: 0.002 nats for a 262,144-id vocabulary).

    Raises:
        ValueError: a vocabulary over 2**24 ids (too few bits left for the log-prob).
    """
    id_bits = max(1, math.ceil(math.log2(max(vocab_size, 2))))
    if id_bits > 24:
        raise ValueError(f"vocabulary of {vocab_size} ids is too large for 32-bit cache entries (at most 2**24)")
    return id_bits, LOGPROB_RANGE_NATS / (2 ** (32 - id_bits) - 1)


def pack_entries(targets: SparseTargets, id_bits: int, step: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize sparse targets into ``(entries uint32 [E], counts uint8 [N], tail float16 [N])``.

    Entries whose log-prob is below ``-LOGPROB_RANGE_NATS`` (probability < 1e-14) move into the
    tail, so the tail log-mass stays exact; padding slots (``-inf``) are not stored.
    """
    logprobs, ids = targets.logprobs.float().cpu(), targets.ids.cpu()
    levels = torch.round(-logprobs / step)
    keep = torch.isfinite(logprobs) & (levels <= 2 ** (32 - id_bits) - 1)
    moved = torch.logsumexp(logprobs.masked_fill(keep, float("-inf")), dim=-1)
    tail = torch.logaddexp(targets.tail_logprob.float().cpu(), moved)
    packed = (levels.clamp_min(0).to(torch.int64) << id_bits) | ids
    entries = packed[keep].numpy().astype(np.uint32)  # row-major: each token's entries in rank order
    return entries, keep.sum(-1).numpy().astype(np.uint8), tail.numpy().astype(np.float16)


def unpack_entries(entries: np.ndarray, counts: np.ndarray, tail: np.ndarray, k: int, id_bits: int,
                   step: float, temperature: float = 1.0) -> SparseTargets:
    """Inverse of :func:`pack_entries`: ``[N, k]`` slots, renormalized so entries + tail sum to 1 (fp32).

    ``temperature`` is the one the entries were built at (``CacheSpec.temperature``), recorded in the result.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = len(counts)
    row = np.repeat(np.arange(n), counts)
    slot = np.arange(len(entries)) - np.repeat(np.cumsum(counts) - counts, counts)
    raw = np.asarray(entries, dtype=np.int64)
    ids = np.zeros((n, k), dtype=np.int64)
    logprobs = np.full((n, k), -np.inf, dtype=np.float32)
    ids[row, slot] = raw & ((1 << id_bits) - 1)
    logprobs[row, slot] = -(raw >> id_bits).astype(np.float32) * step
    lp, tl = torch.from_numpy(logprobs), torch.from_numpy(np.asarray(tail, dtype=np.float32))
    total = torch.logsumexp(torch.cat([lp, tl.unsqueeze(1)], dim=1), dim=1)
    return SparseTargets(torch.from_numpy(ids), lp - total.unsqueeze(1), tl - total, temperature)


@torch.no_grad()
def teacher_hidden_rows(teacher, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final normed teacher hidden states ``[B*L, H]`` fp32 for ``input_ids`` ``[B, L]`` (optional position ids)."""
    return final_hidden_states(teacher, input_ids, position_ids=position_ids).flatten(0, 1).float()


@torch.no_grad()
def teacher_targets(teacher, input_ids: torch.Tensor, vocab_size: int, k: int, top_p: float = 1.0,
                    chunk_tokens: int = 256, position_ids: torch.Tensor | None = None,
                    temperature: float = 1.0) -> SparseTargets:
    """Top-k (top-p) targets of the tempered teacher, with tail mass, for every position of ``input_ids`` ``[B, L]``.

    Logits are ``softcap(h @ W[:vocab_size].T)`` over the real vocabulary (padded head rows
    excluded), divided by ``temperature`` before the top-k (:func:`topk_targets`), computed
    ``chunk_tokens`` rows at a time so ``[B*L, V]`` is never built. This is exactly what the
    chunked loss does online with ``loss.top_k`` at ``loss.temperature``.

    Returns:
        :class:`SparseTargets` with ``B*L`` rows in teacher ids, ``temperature`` recorded.

    Raises:
        ValueError: as :func:`topk_targets` (``k < 1``, ``top_p`` outside (0, 1], ``temperature <= 0``).
    """
    hidden = teacher_hidden_rows(teacher, input_ids, position_ids)
    return head_topk(teacher, hidden, vocab_size, k, top_p, chunk_tokens, temperature)


@torch.no_grad()
def masked_teacher_targets(teacher, batch: dict, vocab_size: int, k: int, top_p: float = 1.0, chunk_tokens: int = 256,
                           temperature: float = 1.0) -> SparseTargets:
    """Top-k targets of an encoder teacher at the masked positions of a masked-LM batch.

    The teacher reads ``batch["teacher_input_ids"]`` ``[B, L]`` (the masked teacher ids) with the
    batch's ``document_ids`` / ``position_ids`` when present (document masking), exactly as
    :class:`~megadistill.teachers.OnlineTeacher` does; its head input is kept at the rows where
    ``batch["labels"] != -100`` (row-major, the rows the masked-LM objective reads) and projected
    as ``softcap(h @ W[:V].T + b[:V])`` (:func:`head_topk`).

    Returns:
        :class:`SparseTargets` with one row per masked position, teacher ids.

    Raises:
        ValueError: as :func:`topk_targets`.
    """
    hidden = adapter_for(teacher).final_hidden_states(teacher, batch["teacher_input_ids"],
                                                      document_ids=batch.get("document_ids"),
                                                      position_ids=batch.get("position_ids"))
    return head_topk(teacher, hidden[batch["labels"] != IGNORE_INDEX].float(), vocab_size, k, top_p, chunk_tokens,
                     temperature)


def head_topk(teacher, hidden: torch.Tensor, vocab_size: int, k: int, top_p: float, chunk_tokens: int,
              temperature: float) -> SparseTargets:
    """:func:`topk_targets` of ``softcap(hidden @ W[:V].T (+ b[:V]))`` for head-input rows ``hidden`` ``[N, H]`` fp32.

    ``W`` / ``b`` are the teacher's output projection and bias (:func:`adapter_for`; decoders
    have no bias), ``chunk_tokens`` rows at a time. ``N`` may be 0 (an empty result with ``k`` slots).
    """
    adapter = adapter_for(teacher)
    weight = adapter.output_weight(teacher)[:vocab_size].float()
    bias = adapter.output_bias(teacher)
    bias = None if bias is None else bias[:vocab_size].float()
    cap = output_softcap(teacher.config)
    parts = []
    for start in range(0, max(hidden.shape[0], 1), chunk_tokens):
        logits = hidden[start : start + chunk_tokens] @ weight.T
        if bias is not None:
            logits = logits + bias
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        parts.append(topk_targets(logits, k, top_p, temperature))
    return SparseTargets.cat(parts)


def shard_path(root: Path, shard: int, name: str) -> Path:
    """``<root>/shard_XXXXXX.<name>.npy`` (or ``.done.json`` for the marker)."""
    suffix = "done.json" if name == "done" else f"{name}.npy"
    return Path(root) / f"shard_{shard:06d}.{suffix}"


def write_shard(root: Path, shard: int, arrays: dict[str, np.ndarray], num_shards: int | None = None) -> None:
    """Write a shard's arrays, then its completion marker, each to a temporary name, fsynced, renamed.

    On any error (or :class:`CacheInterrupted`) before the marker is in place, the shard's
    temporary and already renamed files are removed, so the directory holds only complete
    shards; the error propagates.

    Args:
        num_shards: shards of the whole cache, for the estimate in a disk-full error (None: this shard only).
    Raises:
        CacheDiskFull: ENOSPC / EDQUOT; one line with the file, bytes of this shard written,
            bytes still needed to finish the cache and bytes free.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    marker = shard_path(root, shard, "done")
    blobs = [(shard_path(root, shard, name), functools.partial(write_npy, array=a)) for name, a in arrays.items()]
    shapes = json.dumps({"shapes": {name: list(a.shape) for name, a in arrays.items()}}).encode()
    blobs.append((marker, lambda f: f.write(shapes)))
    writer = _StagedWriter()
    try:
        for final, write in blobs:
            writer.write(final, write)
        fsync_directory(root)
    except BaseException as err:
        if not marker.is_file():
            for final, _ in blobs:
                final.unlink(missing_ok=True)
        code = disk_full_errno(err)
        if code is None:
            raise
        size = sum(npy_bytes(a) for a in arrays.values()) + len(shapes)
        raise _shard_disk_full(code, root, shard, writer, size, num_shards) from None


def write_cache_json(root: Path, name: str, text: str, num_shards: int) -> None:
    """Write ``<root>/<name>`` (``plan.json``, ``meta.json``) through a temporary name, fsynced, renamed.

    Raises:
        CacheDiskFull: ENOSPC / EDQUOT (the temporary file removed, a previous file unchanged);
            the estimate adds the shards still missing (``num_shards`` in all) at the mean complete-shard size.
    """
    root, data = Path(root), text.encode("utf-8")
    writer = _StagedWriter()
    try:
        writer.write(root / name, lambda f: f.write(data))
        fsync_directory(root)
    except OSError as err:
        code = disk_full_errno(err)
        if code is None:
            raise
        sizes = complete_shard_bytes(root)
        left = num_shards - len(sizes)
        if left and not sizes:
            needed, how = len(data), f"{len(data):,} bytes of {name}, plus {left} shards: none written yet to size them"
        else:
            per = round(sum(sizes) / len(sizes)) if sizes else 0
            needed, how = len(data) + per * left, f"{len(data):,} bytes of {name} + {left} shards left x {per:,} bytes"
        raise CacheDiskFull(code, root / name, writer.written, needed, how, root, len(sizes)) from None


def write_npy(f, array: np.ndarray) -> None:
    """``np.save(f, array)`` byte for byte, but the data goes through ``f.write``.

    ``np.save`` on a real file uses ``ndarray.tofile``, whose full-disk error has no errno
    (``OSError: N requested and M written``); ``f.write`` raises ``OSError(ENOSPC)``.
    """
    array = np.ascontiguousarray(array)
    np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
    f.write(array.data if array.size else b"")


def npy_bytes(array: np.ndarray) -> int:
    """Size in bytes of ``array`` as an ``.npy`` file (:func:`write_npy`: header + data)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(np.ascontiguousarray(array)))
    return len(header.getvalue()) + array.nbytes


class _StagedWriter:
    """Writes files through ``.<name>.tmp<pid>`` + fsync + rename; counts the bytes that reached the disk."""

    def __init__(self) -> None:
        self.path, self.written = None, 0

    def write(self, final: Path, write) -> None:
        """``write(f)`` into a temporary sibling of ``final``, fsync, rename; on any error remove the temporary."""
        self.path, tmp = final, final.with_name(f".{final.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            self.written += final.stat().st_size
        except BaseException:
            with contextlib.suppress(OSError):
                self.written += tmp.stat().st_size
            tmp.unlink(missing_ok=True)
            raise


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Delete the ``.<name>.tmp*`` files a killed writer (SIGKILL, power loss) left in ``root``; returns them.

    Call only while no writer is running on ``root`` (rank 0, before the ranks start writing).
    """
    stale = [p for p in Path(root).glob(".*.tmp*") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def complete_shard_bytes(root: Path) -> list[int]:
    """Disk space in bytes of each complete shard under ``root`` (its ``.npy`` files and marker), in shard order.

    A file counts its allocated blocks where they exceed its size (a 4 KiB block per small file), so
    the estimate of a disk-full error is what the shards really take.
    """
    sizes = []
    for marker in sorted(Path(root).glob("shard_*.done.json")):
        stem = marker.name[: -len(".done.json")]
        sizes.append(sum(_disk_bytes(p) for p in Path(root).glob(f"{stem}.*")))
    return sizes


def _disk_bytes(path: Path) -> int:
    """``max(size, allocated blocks)`` of a file, in bytes."""
    stat = path.stat()
    return max(stat.st_size, getattr(stat, "st_blocks", 0) * 512)


def _shard_disk_full(code: int, root: Path, shard: int, writer: _StagedWriter, size: int,
                     num_shards: int | None) -> CacheDiskFull:
    """The :class:`CacheDiskFull` of shard ``shard`` (``size`` bytes in all), after its files were removed."""
    sizes = complete_shard_bytes(root)
    left = 1 if num_shards is None else num_shards - len(sizes)
    if sizes:
        per, basis = round(sum(sizes) / len(sizes)), "the mean complete shard"
    else:
        per, basis = size, f"the size of shard {shard}"
    how = f"{left} shards left x {per:,} bytes, {basis}"
    return CacheDiskFull(code, writer.path, writer.written, per * left, how, root, len(sizes), shard)


def shard_is_complete(root: Path, shard: int) -> bool:
    """True when the shard's completion marker exists (written after all its arrays)."""
    return shard_path(root, shard, "done").is_file()


def shard_arrays(kind: str, objective: str = "clm") -> tuple[str, ...]:
    """Array names stored per shard for a cache kind and objective."""
    if kind == "hidden":
        return ("hidden", "window_hash")
    topk = ("entries", "counts", "window_offsets", "tail", "window_hash")
    return topk + ("row_offsets", "masked_hash") if objective == "mlm" else topk


class TeacherCache:
    """Read a cache directory written by ``tools/cache_teacher_logits.py``.

    Args:
        path: the cache directory.

    Raises:
        FileNotFoundError: no ``meta.json`` (not a cache, or the writer has not finished)
            or a shard file is missing.
        ValueError: another format or version, or a shard file whose shape does not
            match ``meta.json`` (truncated or foreign file); the message names the file.
    """

    def __init__(self, path: str | Path):
        self.root = Path(path)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: build the cache with tools/cache_teacher_logits.py "
                                    "(an unfinished cache has no meta.json; rerun the same command to finish it)")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.meta.get("format") != FORMAT or self.meta.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"{meta_path}: not a {FORMAT} cache of version {' or '.join(map(str, READABLE_VERSIONS))} "
                             f"(format {self.meta.get('format')!r}, version {self.meta.get('version')!r}): "
                             "rebuild it with this version's tools/cache_teacher_logits.py")
        self.spec = spec_from_meta(self.meta)
        self.kind, self.objective = self.spec.kind, self.spec.objective
        self._shards = [self._open_shard(s) for s in range(self.meta["num_shards"])]

    @property
    def bytes_per_token(self) -> float:
        """Mean bytes on disk per cached token (all shard files / tokens)."""
        return float(self.meta["bytes_per_token"])

    def _open_shard(self, shard: int) -> dict[str, np.ndarray]:
        """Memory-map one shard's arrays and check their shapes against its marker."""
        marker = shard_path(self.root, shard, "done")
        if not marker.is_file():
            raise FileNotFoundError(f"{marker} not found: shard {shard} is incomplete; rerun the cache tool to finish it")
        shapes = json.loads(marker.read_text(encoding="utf-8"))["shapes"]
        arrays = {}
        for name in shard_arrays(self.kind, self.objective):
            path = shard_path(self.root, shard, name)
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: the cache is incomplete")
            try:
                arrays[name] = np.load(path, mmap_mode="r")
            except (ValueError, OSError) as err:
                raise ValueError(f"{path}: unreadable cache shard ({err}); delete it and its .done.json marker and rerun") from None
            if list(arrays[name].shape) != shapes[name]:
                raise ValueError(f"{path}: shape {list(arrays[name].shape)} but the shard marker says {shapes[name]}")
        return arrays

    def _locate(self, window: int) -> tuple[dict, int]:
        """The shard arrays holding ``window`` and its index inside the shard."""
        if not 0 <= window < self.meta["num_windows"]:
            raise IndexError(f"window {window} is outside the cache's {self.meta['num_windows']} windows")
        shard, local = divmod(window, self.spec.windows_per_shard)
        return self._shards[shard], local

    def check_compatible(self, packed, tokenizer, document_masking: bool = True, temperature: float | None = None,
                         masking: MaskingConfig | None = None) -> None:
        """Raise ``ValueError`` naming the first field where ``packed`` / ``tokenizer`` differ from the cache.

        Checks the objective (``masking`` given: the run trains a masked LM with these settings
        and needs an ``mlm`` cache of the same ``MaskingConfig``; None: a causal run, which needs
        a ``clm`` cache), the KD temperature (``topk`` caches, when ``temperature`` is given: the
        run's ``loss.temperature``; a top-k tail cannot be re-tempered), the sequence length,
        packing seed (also the mask seed of an ``mlm`` cache: ``train.seed``), document masking,
        fixed layout, number of windows, the datasets (prefix, documents, tokens, ``.idx`` hash)
        and the tokenizer hash. Each message names the cached and the current value.
        """
        self._check_objective(masking)
        if temperature is not None and self.kind == "topk" and temperature != self.spec.temperature:
            raise ValueError(f"teacher cache {self.root} holds the teacher's top-k at temperature {self.spec.temperature} "
                             f"but this run's loss.temperature is {temperature}: rebuild the cache with "
                             f"tools/cache_teacher_logits.py --temperature {temperature} "
                             f"(or train with loss.temperature={self.spec.temperature})")
        expected = {
            "seq_len_tokens": (self.spec.seq_len_tokens, packed.seq_len_tokens),
            "document_masking": (self.spec.document_masking, document_masking),
            "window_bos (data.window_bos)": (self.spec.window_bos, getattr(packed, "restart_id", None) is not None),
            "seed": (self.spec.seed, packed.seed),
            "num_windows": (self.meta["num_windows"], len(packed)),
            "tokenizer_sha256": (self.meta["tokenizer_sha256"], tokenizer_sha256(tokenizer)),
        }
        if not getattr(packed, "fixed_layout", False):
            raise ValueError("the training windows must use PackedDataset(..., fixed_layout=True) to read a teacher cache")
        for field, (cached, current) in expected.items():
            if cached != current:
                raise ValueError(f"teacher cache {self.root}: {field} is {cached!r} in the cache but {current!r} for this run "
                                 "(same data, data.seq_len_tokens, train.seed and tokenizer as the cache, or rebuild it)")
        current = [dataset_fingerprint(ds) for ds in underlying_datasets(packed.datasets)]
        for i, (cached, now) in enumerate(zip(self.meta["datasets"], current)):
            for key in ("documents", "tokens", "idx_sha256"):
                if cached[key] != now[key]:
                    raise ValueError(f"teacher cache {self.root}: dataset {i} ({now['prefix']}) differs in {key} "
                                     f"from the cached {cached['prefix']}: rebuild the cache for this data")
        if len(current) != len(self.meta["datasets"]):
            raise ValueError(f"teacher cache {self.root}: built from {len(self.meta['datasets'])} datasets, this run has {len(current)}")

    def _check_objective(self, masking: MaskingConfig | None) -> None:
        """Raise ``ValueError`` when the run's objective or masking settings differ from the cache's."""
        if masking is None and self.objective == "mlm":
            raise ValueError(f"teacher cache {self.root} holds masked-LM targets (an encoder teacher at the masked "
                             "positions) but this run trains a causal LM: build a cache from the causal teacher")
        if masking is not None and self.objective != "mlm":
            raise ValueError(f"teacher cache {self.root} holds per-token causal-LM targets but this run trains a masked LM: "
                             f"build a masked-LM cache from the encoder teacher with tools/cache_teacher_logits.py "
                             f"--mask-prob {masking.mask_prob}{' --whole-word' if masking.whole_word else ''}")
        if masking is None:
            return
        for name in ("mask_prob", "whole_word", "replace_mask", "replace_random"):
            cached, current = getattr(self.spec.masking, name), getattr(masking, name)
            if cached != current:
                raise ValueError(f"teacher cache {self.root}: masking {name} is {cached!r} in the cache but {current!r} "
                                 f"for this run: train with data.{name}={cached!r}, or rebuild the cache with "
                                 "tools/cache_teacher_logits.py --mask-prob/--whole-word as data.mask_prob/data.whole_word")

    def verify_windows(self, window_ids, windows) -> None:
        """Raise ``ValueError`` naming the window whose tokens do not hash to the cached value."""
        for w, tokens in zip(window_ids, windows):
            arrays, local = self._locate(w)
            if int(arrays["window_hash"][local]) != window_hash(tokens):
                raise ValueError(f"teacher cache {self.root}: window {w} holds other tokens than the training data "
                                 "(cache built from other data or packing)")

    def verify_masked(self, window_ids, teacher_input_ids: torch.Tensor) -> None:
        """Raise ``ValueError`` unless each window's masked ids ``[B, L]`` (the batch's ``teacher_input_ids``) are the cached ones.

        ``mlm`` caches only: the masks the cache was built with must be the training batch's
        (same seed, masking settings and random-replacement ids).
        """
        if self.objective != "mlm":
            raise ValueError(f"teacher cache {self.root} is a causal-LM cache: it has no masks to verify")
        for w, row in zip(window_ids, teacher_input_ids.cpu().numpy()):
            arrays, local = self._locate(w)
            if int(arrays["masked_hash"][local]) != window_hash(row):
                raise ValueError(f"teacher cache {self.root}: window {w} is masked differently than when the cache was "
                                 "built (other mask seed or settings, or random replacements drawn from a trimmed "
                                 "student vocabulary): the cached teacher read other inputs")

    def targets(self, window_ids) -> SparseTargets:
        """Top-k targets for the windows, in window order, teacher ids.

        ``clm``: ``len(window_ids) * L`` rows (every position). ``mlm``: each window's rows at its
        masked positions in position order (the rows where the batch's ``labels != -100``, row-major,
        when the labels lose no token to a trimmed vocabulary). Their ``temperature`` is the cache's
        (``spec.temperature``), which the loss checks.

        Raises:
            ValueError: a hidden-state cache. IndexError: a window outside the cache.
        """
        if self.kind != "topk":
            raise ValueError(f"teacher cache {self.root} holds hidden states, not top-k targets")
        return SparseTargets.cat([self._window_targets(w) for w in window_ids])

    def _window_targets(self, window: int) -> SparseTargets:
        arrays, local = self._locate(window)
        begin, end = int(arrays["window_offsets"][local]), int(arrays["window_offsets"][local + 1])
        if self.objective == "mlm":
            rows = slice(int(arrays["row_offsets"][local]), int(arrays["row_offsets"][local + 1]))
        else:
            rows = slice(local * self.spec.seq_len_tokens, (local + 1) * self.spec.seq_len_tokens)
        return unpack_entries(arrays["entries"][begin:end], arrays["counts"][rows], arrays["tail"][rows],
                              self.spec.k, self.meta["id_bits"], self.meta["logprob_step"], self.spec.temperature)

    def hidden(self, window_ids) -> torch.Tensor:
        """Teacher final hidden states ``[len(window_ids), L, H]`` float32."""
        if self.kind != "hidden":
            raise ValueError(f"teacher cache {self.root} holds top-k targets, not hidden states")
        out = []
        for w in window_ids:
            arrays, local = self._locate(w)
            out.append(torch.from_numpy(np.asarray(arrays["hidden"][local], dtype=np.float32)))
        return torch.stack(out)


def shard_arrays_for(spec: CacheSpec, teacher, vocab_size: int, windows: list[np.ndarray], micro_batch_size: int,
                     chunk_tokens: int = 256, document_ids: list[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Compute one ``clm`` shard's arrays from its windows (each ``L + 1`` teacher ids): a row per position.

    Args:
        document_ids: per window, int64 [L + 1] document index of each token
            (``PackedDataset.window_item``); required when ``spec.document_masking``.
    Raises:
        ValueError: hidden states that overflow float16; document ids missing.
    """
    if spec.document_masking and document_ids is None:
        raise ValueError("spec.document_masking needs the windows' document_ids")
    parts = []
    for start in range(0, len(windows), micro_batch_size):
        ids = torch.from_numpy(np.stack(windows[start : start + micro_batch_size])[:, :-1].astype(np.int64))
        positions = None
        if spec.document_masking:
            docs = torch.from_numpy(np.stack(document_ids[start : start + micro_batch_size])[:, :-1].astype(np.int64))
            positions = position_ids_from_documents(docs)
        if spec.kind == "hidden":
            parts.append(teacher_hidden_rows(teacher, ids, positions).view(ids.shape[0], ids.shape[1], -1))
        else:
            parts.append(teacher_targets(teacher, ids, vocab_size, spec.k, spec.top_p, chunk_tokens, positions,
                                         spec.temperature))
    hashes = np.array([window_hash(w) for w in windows], dtype=np.uint64)
    if spec.kind == "hidden":
        hidden = torch.cat(parts)
        if not bool(torch.isfinite(hidden).all()) or float(hidden.abs().max()) >= FP16_MAX:
            raise ValueError("teacher hidden states overflow float16: use --kind topk")
        return {"hidden": hidden.numpy().astype(np.float16), "window_hash": hashes}
    targets = SparseTargets.cat(parts)
    id_bits, step = id_layout(vocab_size)
    entries, counts, tail = pack_entries(targets, id_bits, step)
    per_window = counts.reshape(len(windows), -1).astype(np.int64).sum(1)
    offsets = np.concatenate([[0], np.cumsum(per_window)]).astype(np.int64)
    return {"entries": entries, "counts": counts, "window_offsets": offsets, "tail": tail, "window_hash": hashes}


class _WindowsInOrder:
    """A fixed-layout ``PackedDataset`` whose sample ``i`` is window ``i``: what :func:`mlm_replay` walks."""

    def __init__(self, packed):
        self.packed, self.seq_len_tokens = packed, packed.seq_len_tokens

    def item(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.packed.window_item(index)

    def window_id(self, index: int) -> int:
        return index


def mlm_replay(spec: CacheSpec, tokenizer, packed) -> MlmBatches | None:
    """The trainer's static masks of ``packed``'s windows, indexed by window id; None for a ``clm`` spec.

    ``replay([w, ...])`` is the :class:`MlmBatches` batch the pre-training stage builds for those
    windows with a cache (``static_mask=True``, seed ``spec.seed`` = ``train.seed``,
    ``MlmCollator.from_tokenizer(teacher tokenizer, spec.masking)``, ``spec.document_masking``):
    the same code, so the same masks. Source: ``megadistill/stages/pretrain.py`` ``_batch_maker``.

    Raises:
        ValueError: the tokenizer has no mask token (or no word boundaries for whole-word masking).
    """
    if spec.objective != "mlm":
        return None
    collator = MlmCollator.from_tokenizer(tokenizer, spec.masking)
    return MlmBatches(_WindowsInOrder(packed), collator, spec.seed, static_mask=True,
                      document_masking=spec.document_masking)


def mlm_shard_arrays(spec: CacheSpec, teacher, vocab_size: int, replay: MlmBatches, window_ids: range,
                     micro_batch_size: int, chunk_tokens: int = 256) -> dict[str, np.ndarray]:
    """One ``mlm`` shard's arrays: the teacher's top-k at the masked positions of each window's replayed mask.

    Args:
        replay: :func:`mlm_replay` of the spec; ``window_ids``: the shard's windows (:func:`shard_windows`).
    Returns:
        ``entries`` / ``counts`` / ``tail`` as :func:`pack_entries` over all masked rows, ``row_offsets``
        and ``window_offsets`` int64 [windows + 1], ``window_hash`` and ``masked_hash`` uint64 [windows].
    """
    parts, rows, hashes, masked = [], [], [], []
    for start in range(0, len(window_ids), micro_batch_size):
        batch = replay(list(window_ids[start : start + micro_batch_size]))
        parts.append(masked_teacher_targets(teacher, batch, vocab_size, spec.k, spec.top_p, chunk_tokens,
                                            spec.temperature))
        rows += (batch["labels"] != IGNORE_INDEX).sum(1).tolist()
        hashes += [window_hash(w) for w in batch["windows"]]
        masked += [window_hash(r) for r in batch["teacher_input_ids"].numpy()]
    entries, counts, tail = pack_entries(SparseTargets.cat(parts), *id_layout(vocab_size))
    row_offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    first_entry = np.concatenate([[0], np.cumsum(counts.astype(np.int64))])
    return {"entries": entries, "counts": counts, "window_offsets": first_entry[row_offsets].astype(np.int64),
            "tail": tail, "window_hash": np.array(hashes, dtype=np.uint64), "row_offsets": row_offsets,
            "masked_hash": np.array(masked, dtype=np.uint64)}


def shard_windows(spec: CacheSpec, num_windows: int, shard: int) -> range:
    """Window ids of ``shard``: ``[shard * windows_per_shard, ...)``, the last shard possibly shorter."""
    return range(shard * spec.windows_per_shard, min(num_windows, (shard + 1) * spec.windows_per_shard))


def compute_shard(spec: CacheSpec, teacher, vocab_size: int, packed, shard: int, micro_batch_size: int,
                  chunk_tokens: int = 256, replay: MlmBatches | None = None) -> dict[str, np.ndarray]:
    """The arrays of shard ``shard`` of ``packed`` (fixed layout) for :func:`write_shard`.

    ``clm``: :func:`shard_arrays_for` over the windows; ``mlm``: :func:`mlm_shard_arrays` with
    ``replay`` (:func:`mlm_replay`, built once per writer).

    Raises:
        ValueError: an ``mlm`` spec without ``replay``, or as the functions above.
    """
    windows = shard_windows(spec, len(packed), shard)
    if spec.objective == "mlm":
        if replay is None:
            raise ValueError("a masked-LM cache replays the training masks: pass replay=mlm_replay(spec, tokenizer, packed)")
        return mlm_shard_arrays(spec, teacher, vocab_size, replay, windows, micro_batch_size, chunk_tokens)
    items = [packed.window_item(w) for w in windows]
    return shard_arrays_for(spec, teacher, vocab_size, [t for t, _ in items], micro_batch_size, chunk_tokens,
                            [d for _, d in items])


def cache_meta(spec: CacheSpec, packed, tokenizer, teacher_path: str, vocab_size: int, hidden_size: int, softcap) -> dict:
    """The identity part of ``meta.json`` (everything but the final size statistics)."""
    id_bits, step = id_layout(vocab_size)
    return {
        "format": FORMAT, "version": VERSION, "spec": asdict(spec), "id_bits": id_bits, "logprob_step": step,
        "num_windows": len(packed), "num_shards": math.ceil(len(packed) / spec.windows_per_shard),
        "datasets": [dataset_fingerprint(ds) for ds in underlying_datasets(packed.datasets)], "teacher": str(teacher_path),
        "tokenizer_sha256": tokenizer_sha256(tokenizer), "teacher_vocab_size": vocab_size,
        "hidden_size": hidden_size, "softcap": softcap,
    }


def directory_bytes_per_token(root: Path, meta: dict) -> float:
    """Bytes of all shard files divided by the windows' tokens (``num_windows * L``, masked or not)."""
    total = sum(p.stat().st_size for p in Path(root).glob("shard_*"))
    return total / max(1, meta["num_windows"] * meta["spec"]["seq_len_tokens"])


def cached_rows(root: Path, meta: dict) -> int:
    """Rows stored in all complete shards (from their markers): ``num_windows * L`` for ``clm``, masked positions for ``mlm``."""
    name = "counts" if meta["spec"]["kind"] == "topk" else "hidden"
    rows = 0
    for shard in range(meta["num_shards"]):
        shape = json.loads(shard_path(root, shard, "done").read_text(encoding="utf-8"))["shapes"][name]
        rows += shape[0] if name == "counts" else shape[0] * shape[1]
    return rows
