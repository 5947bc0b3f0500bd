"""Character offsets recovered from token ids, and the common spans of two tokenizations.

Documents are stored as token ids only, so cross-tokenizer distillation (teacher and student
tokenize the same text differently) needs each token's place in the text back from its id:

* :func:`token_bytes_table` gives the UTF-8 bytes every id of a tokenizer stands for
  (SentencePiece-style pieces with ``▁`` and ``<0xNN>`` byte fallback, e.g. Gemma, or
  byte-level BPE pieces, e.g. GPT-2 / Qwen / Llama 3), checked on a probe text;
* :func:`char_ends` turns ids into the number of complete characters read after each token;
* :func:`align_spans` groups the tokens of two tokenizations into their smallest common
  character spans, the byte-offset alignment of TRL's GOLD trainer (Patiño et al. 2025,
  "Unlocking On-Policy Distillation for Any Model Family").

Offsets are counted in Unicode code points (``len(str)``), which are the same for both
tokenizers whatever their byte splits.
"""

from __future__ import annotations

import codecs
import functools
import json
import re

import numpy as np

__all__ = ["PROBE_TEXT", "align_spans", "char_ends", "token_bytes_table"]

PROBE_TEXT = "नमस्ते दुनिया, क्षत्रिय hello World 2024  x 7"
"""Devanagari, Latin, digits and single and double spaces, not starting with a space: every
tokenizer accepted by :func:`token_bytes_table` must give back exactly these bytes."""

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SENTENCEPIECE_DECODERS = frozenset({"ByteFallback", "Metaspace", "Replace"})


def token_bytes_table(tokenizer) -> list[bytes]:
    """The UTF-8 bytes each id of ``tokenizer`` stands for: ``table[id]``, ``len(table) == len(tokenizer)``.

    Pieces come from ``convert_ids_to_tokens``. SentencePiece-style tokenizers (decoder with
    ``ByteFallback`` / ``Replace`` / ``Metaspace``): ``<0xNN>`` is that one byte, any other
    piece is its text with ``▁`` read as a space. Byte-level BPE (a ``ByteLevel`` decoder, or
    no decoder and pieces in the GPT-2 byte-to-unicode alphabet): each character is mapped
    back to its byte. Special tokens (``all_special_ids`` and added tokens marked special)
    stand for no text: ``b""``. Other added tokens matched on raw text (``normalized=False``)
    stand for their content as written.

    A literal ``▁`` in a text comes back as a space: same character count, other bytes.

    Args:
        tokenizer: a Hugging Face fast tokenizer (``PreTrainedTokenizerFast`` or subclass).

    Returns:
        ``list[bytes]`` indexed by token id.

    Raises:
        ValueError: the tokenizer is neither SentencePiece-style nor byte-level (the message
            names its decoder), a byte-level piece has a character outside the byte alphabet,
            or the bytes of ``tokenizer(PROBE_TEXT, add_special_tokens=False)`` are not the
            probe's own bytes (e.g. a tokenizer that adds a dummy prefix space).
    """
    byte_level = _is_byte_level(tokenizer)
    added = tokenizer.added_tokens_decoder  # a property that builds a new dict: read it once
    special = set(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}
    # byte-level added tokens are matched on raw text, never spelled in the byte alphabet
    raw_added = {i: token.content for i, token in added.items()
                 if not token.special and (byte_level or not token.normalized)}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    piece_bytes = _byte_level_piece if byte_level else _sentencepiece_piece
    table = [b"" if i in special or piece is None
             else raw_added[i].encode() if i in raw_added else piece_bytes(piece, i)
             for i, piece in enumerate(pieces)]
    _check_probe(tokenizer, table)
    return table


def _is_byte_level(tokenizer) -> bool:
    """True for byte-level BPE, False for SentencePiece-style; ValueError for anything else."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"tokenizer {_name(tokenizer)} is not a fast tokenizer: load it with use_fast=True")
    types = _decoder_types(backend.decoder)
    if "ByteLevel" in types:
        return True
    if types & _SENTENCEPIECE_DECODERS:
        return False
    if not types and _pieces_look_byte_level(tokenizer):
        return True
    raise ValueError(f"tokenizer {_name(tokenizer)} has decoder {sorted(types) or None}: char offsets need a "
                     "SentencePiece-style (▁, <0xNN> byte fallback) or byte-level BPE tokenizer")


def _decoder_types(decoder) -> set[str]:
    """Type names of a ``tokenizers`` decoder and, for a ``Sequence``, of its members (empty for None)."""
    if decoder is None:
        return set()
    state = json.loads(decoder.__getstate__())
    stack, types = [state], set()
    while stack:
        node = stack.pop()
        types.add(node.get("type"))
        stack.extend(node.get("decoders") or [])
    return types


def _pieces_look_byte_level(tokenizer) -> bool:
    """Whether the vocabulary (no decoder given) is spelled in the GPT-2 byte alphabet with ``Ġ`` for space."""
    alphabet = set(_byte_decoder())
    added = tokenizer.added_tokens_decoder  # a property that builds a new dict: read it once
    pieces = [p for p, i in tokenizer.get_vocab().items() if i not in added]
    return any("Ġ" in p for p in pieces) and all(set(p) <= alphabet for p in pieces)


def _sentencepiece_piece(piece: str, _id: int) -> bytes:
    """Bytes of a SentencePiece piece: ``<0xNN>`` is one byte, ``▁`` is a space."""
    match = _BYTE_PIECE.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    return piece.replace("▁", " ").encode()


def _byte_level_piece(piece: str, token_id: int) -> bytes:
    """Bytes of a byte-level BPE piece (each character is one byte of the GPT-2 alphabet)."""
    decoder = _byte_decoder()
    try:
        return bytes(decoder[ch] for ch in piece)
    except KeyError as err:
        raise ValueError(f"byte-level piece {piece!r} (id {token_id}) has {err.args[0]!r}, "
                         "which is not in the byte-to-unicode alphabet") from None


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` (Radford et al. 2019, ``encoder.py``): character -> byte.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards in
    byte order (so space is ``Ġ`` U+0120). Re-derived here because transformers moved it.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]
    return dict(zip(chars, printable + others))


def _check_probe(tokenizer, table: list[bytes]) -> None:
    """Raise ``ValueError`` unless the probe text's ids give back exactly its bytes."""
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    got = b"".join(table[i] for i in ids)
    if got != PROBE_TEXT.encode():
        raise ValueError(f"tokenizer {_name(tokenizer)} does not give back its text from token bytes "
                         f"({got.decode(errors='replace')!r} for {PROBE_TEXT!r}): a dummy prefix space or "
                         "a normalizer that changes text makes char offsets unrecoverable from ids")


def _name(tokenizer) -> str:
    """A name for messages: the tokenizer's path or its class."""
    return repr(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def char_ends(ids: np.ndarray, table: list[bytes]) -> np.ndarray:
    """For each token, the number of complete characters of the text made by tokens ``0..i``.

    A character counts once all of its bytes arrived (its lead byte declares its length), so
    a byte-fallback piece ending inside a multi-byte character adds 0 until the piece that
    completes it, and a special token (``b""``) adds 0. A sequence may end inside a character
    (a window cut): that character is never counted.

    Args:
        ids: ``[n]`` integer token ids.
        table: :func:`token_bytes_table` of the tokenizer that made ``ids``.

    Returns:
        ``[n]`` int64, non-decreasing, in characters (code points).

    Raises:
        ValueError: ``ids`` not 1-D integers, an id outside ``[0, len(table))``, or bytes that
            are not UTF-8 (a stray continuation byte, an invalid lead byte, a truncated
            character followed by more text).
    """
    ids = _check_ids(ids, len(table))
    pieces = [table[i] for i in ids.tolist()]
    blob = b"".join(pieces)
    _check_utf8(blob)
    data = np.frombuffer(blob, dtype=np.uint8)
    lead_pos = np.flatnonzero((data & 0xC0) != 0x80)
    lead = data[lead_pos]
    # 1 + (>= 0xC0) + (>= 0xE0) + (>= 0xF0) is the length a lead byte declares.
    char_end = lead_pos + 1 + (lead >= 0xC0) + (lead >= 0xE0) + (lead >= 0xF0)
    completed = np.zeros(data.size + 1, dtype=np.int64)
    completed[char_end[char_end <= data.size]] = 1  # characters never overlap: one end per byte offset
    chars_by_offset = np.cumsum(completed)
    byte_ends = np.cumsum(np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces)))
    return chars_by_offset[byte_ends]


def _check_ids(ids, vocab: int) -> np.ndarray:
    """``ids`` as a 1-D int64 array, or ``ValueError`` for another shape, dtype or an id outside ``[0, vocab)``."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise ValueError(f"ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"token ids must be in [0, {vocab}) (the table's tokenizer), got {ids.min()}..{ids.max()}")
    return ids.astype(np.int64, copy=False)


def _check_utf8(blob: bytes) -> None:
    """``ValueError`` unless ``blob`` is UTF-8, its last character possibly incomplete."""
    try:
        codecs.getincrementaldecoder("utf-8")("strict").decode(blob, final=False)
    except UnicodeDecodeError as err:
        raise ValueError(f"token bytes are not UTF-8 at byte {err.start}: {err.reason}") from None


def align_spans(a_ends: np.ndarray, b_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group two tokenizations of one text into their smallest common character spans.

    The walk of TRL's GOLD trainer (Patiño et al. 2025): advance the side whose current token
    ends earlier; when both current tokens end at the same offset a group closes, holding the
    tokens of each side since the last close. It is computed without a Python loop: in a
    merge walk of two sorted arrays, the ``k``-th token ending at offset ``e`` on one side
    meets the ``k``-th token ending at ``e`` on the other, so token ``i`` closes a group iff
    its rank among the tokens ending at ``a_ends[i]`` is below the other side's count of them;
    every token belongs to the group of the next close at or after it.

    Zero-width tokens (BOS/EOS, byte pieces inside a character) join the group the walk puts
    them in: a BOS (end 0) on both sides forms its own group, as does an EOS on both sides;
    unpaired ones join the next group.

    Args:
        a_ends, b_ends: ``[n_a]``, ``[n_b]`` integer :func:`char_ends` of the two tokenizations.

    Returns:
        ``(a_group, b_group)``: int64 ``[n_a]``, ``[n_b]``, each token's group in ``0..K-1``
        (groups in text order, consecutive tokens), ``-1`` after the last common boundary
        (text that does not end at the same place on both sides, e.g. a window cut).

    Raises:
        ValueError: an input that is not a 1-D integer array or not non-decreasing.
    """
    a_ends, b_ends = _check_ends(a_ends, "a_ends"), _check_ends(b_ends, "b_ends")
    a_close, b_close = _closes(a_ends, b_ends), _closes(b_ends, a_ends)
    return _groups(a_close), _groups(b_close)


def _check_ends(ends, name: str) -> np.ndarray:
    """``ends`` as 1-D int64, or ``ValueError`` when it is not a non-decreasing integer array."""
    ends = np.asarray(ends)
    if ends.ndim != 1 or not (np.issubdtype(ends.dtype, np.integer) or ends.size == 0):
        raise ValueError(f"{name} must be a 1-D integer array, got shape {ends.shape} dtype {ends.dtype}")
    if ends.size > 1 and np.any(np.diff(ends) < 0):
        raise ValueError(f"{name} must be non-decreasing (char_ends of one text), first drop at "
                         f"token {int(np.argmax(np.diff(ends) < 0)) + 1}")
    return ends.astype(np.int64, copy=False)


def _closes(ends: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``[n]`` bool: tokens of ``ends`` that close a group against the sorted ``other``."""
    rank = np.arange(ends.size) - np.searchsorted(ends, ends, side="left")
    count = np.searchsorted(other, ends, side="right") - np.searchsorted(other, ends, side="left")
    return rank < count


def _groups(close: np.ndarray) -> np.ndarray:
    """Group of each token: the index of the next close at or after it, -1 when there is none."""
    group = np.cumsum(close) - close
    group[group >= close.sum()] = -1
    return group.astype(np.int64)
