"""Document framing: the special-token ids around each document, derived from a tokenizer and kept in provenance.

A binarized document is ``prefix_ids + tokenizer(text, add_special_tokens=False) + suffix_ids``:

* decoder tokenizers (Gemma, Llama, Qwen, ...): what the tokenizer's post-processor adds (BOS
  for Gemma/Llama, nothing for Qwen), then EOS, so documents are delimited for causal LM;
* encoder (masked-LM) tokenizers: the post-processor's own frame, ``[CLS] ... [SEP]`` for
  BERT/WordPiece, ``<s> ... </s>`` for XLM-R/RoBERTa, as the model saw in pre-training.

The frame is read off the tokenizer by encoding a probe text with and without special tokens,
not from token names, so any template the tokenizer applies is reproduced exactly. It is
stored in the dataset's ``.json`` as ``"framing": {"kind", "prefix_ids", "suffix_ids"}``;
provenance written before the field existed means decoder framing (:func:`framing_from_provenance`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

FramingKind = Literal["decoder", "encoder"]
KINDS: tuple[str, ...] = ("decoder", "encoder")

# Several scripts and digits, so that no tokenizer encodes it to nothing.
PROBE_TEXT = "Hello world, नमस्ते दुनिया। ওড়িয়া 123"


@dataclass(frozen=True)
class Framing:
    """Special-token ids around every document of a dataset.

    Attributes:
        kind: ``"decoder"`` (causal LM, documents end with EOS) or ``"encoder"`` (masked LM,
            documents framed like ``[CLS] ... [SEP]``).
        prefix_ids: token ids before the text's tokens, e.g. ``(2,)`` (Gemma BOS), ``(101,)``
            (BERT ``[CLS]``), ``()`` (Qwen).
        suffix_ids: token ids after them, e.g. ``(1,)`` (Gemma EOS), ``(102,)`` (``[SEP]``).
    Raises:
        ValueError: ``kind`` is not one of :data:`KINDS`.
    """

    kind: FramingKind
    prefix_ids: tuple[int, ...] = ()
    suffix_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"framing kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def special_ids(self) -> frozenset[int]:
        """Every id the frame adds (prefix and suffix)."""
        return frozenset(self.prefix_ids) | frozenset(self.suffix_ids)

    def as_dict(self) -> dict[str, Any]:
        """The provenance form: ``{"kind": str, "prefix_ids": [int], "suffix_ids": [int]}``."""
        return {"kind": self.kind, "prefix_ids": list(self.prefix_ids), "suffix_ids": list(self.suffix_ids)}


def framing_for_tokenizer(tokenizer: Any) -> Framing:
    """The framing binarize applies with ``tokenizer`` (see the module docstring).

    Encoder when the tokenizer's post-processor closes a sequence with its ``sep_token``
    (BERT ``[SEP]``, XLM-R ``</s>``), or when it adds nothing but the tokenizer has a mask,
    CLS and SEP token (a masked-LM vocabulary without a post-processor: framed ``[CLS] ... [SEP]``
    by hand). Otherwise decoder: the post-processor's prefix and suffix, plus EOS unless the
    suffix already ends with it.

    Args:
        tokenizer: a Hugging Face tokenizer (``__call__``, ``eos_token_id``; ``sep_token_id``,
            ``cls_token_id``, ``mask_token_id`` where it has them).
    Raises:
        ValueError: a decoder tokenizer without an EOS token (documents could not be delimited),
            or one whose special tokens are not a plain prefix/suffix of the text's tokens.
    """
    eos, sep = getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if eos is None and sep is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no EOS token (decoder) nor SEP token (encoder); "
                         "documents need one as a separator: set eos_token (or sep_token for a masked LM)")
    prefix, suffix = post_processor_frame(tokenizer)
    if sep is not None and suffix and suffix[-1] == sep:
        return Framing("encoder", prefix, suffix)
    if not prefix and not suffix and _is_masked_lm_vocabulary(tokenizer):
        return Framing("encoder", (tokenizer.cls_token_id,), (sep,))
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no EOS token and does not frame sequences with "
                         f"its SEP token; documents need a separator: set eos_token")
    return Framing("decoder", prefix, suffix if suffix and suffix[-1] == eos else (*suffix, eos))


def control_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the tokenizer's control tokens, which text must never encode to (``<eos>``, ``[SEP]``, ``<mask>``, ...).

    The named special tokens (``all_special_ids``) and every added token flagged ``special``,
    except the unknown token: ``<unk>`` stands for text the vocabulary cannot spell, so it
    legitimately appears inside documents.

    Args:
        tokenizer: a Hugging Face tokenizer; attributes it lacks count as empty.
    Returns:
        A frozenset of int token ids (possibly empty).
    """
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(i for i, token in added.items() if getattr(token, "special", False))
    ids.discard(getattr(tokenizer, "unk_token_id", None))
    return frozenset(int(i) for i in ids if i is not None)


def _is_masked_lm_vocabulary(tokenizer: Any) -> bool:
    """True when the tokenizer has mask, CLS and SEP tokens (BERT-like vocabulary)."""
    return all(getattr(tokenizer, f"{name}_token_id", None) is not None for name in ("mask", "cls", "sep"))


def post_processor_frame(tokenizer: Any, text: str = PROBE_TEXT) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(prefix_ids, suffix_ids)`` that ``add_special_tokens=True`` puts around the text's own ids.

    Raises:
        ValueError: the text encodes to no ids, or the ids with special tokens are not
            ``prefix + ids without + suffix`` (a post-processor that rewrites the text's tokens).
    """
    bare = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if not bare:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} encodes the probe text {text!r} to no ids")
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return tuple(full[:start]), tuple(full[start + len(bare):])
    raise ValueError(f"tokenizer {type(tokenizer).__name__}: ids with special tokens {full} do not contain the ids "
                     f"without them {bare}; binarize frames documents as prefix + text ids + suffix and cannot "
                     "reproduce this post-processor")


def framing_from_provenance(meta: Mapping[str, Any], source: str = "provenance") -> Framing:
    """The :class:`Framing` recorded in a provenance dict; decoder framing when it has none.

    Without a ``framing`` record (data binarized before it existed) the frame is rebuilt from
    ``add_bos``/``bos_id``/``eos_id``: ``[bos]`` if ``add_bos``, then ``[eos]``.

    Args:
        meta: the ``.json`` provenance of a dataset.
        source: named in error messages (e.g. ``"corpus/hin_Deva.json"``).
    Raises:
        ValueError: a ``framing`` record that is not ``{"kind": "decoder"|"encoder",
            "prefix_ids": [int], "suffix_ids": [int]}`` (names the field).
    """
    record = meta.get("framing")
    if record is None:
        prefix = (meta["bos_id"],) if meta.get("add_bos") and meta.get("bos_id") is not None else ()
        suffix = (meta["eos_id"],) if meta.get("eos_id") is not None else ()
        return Framing("decoder", prefix, suffix)  # binarize framed only decoders then
    if not isinstance(record, Mapping) or record.get("kind") not in KINDS:
        raise ValueError(f"{source}: framing.kind must be one of {KINDS}, got {record!r}; re-binarize the dataset")
    return Framing(record["kind"], _ids(record, "prefix_ids", source), _ids(record, "suffix_ids", source))


def _ids(record: Mapping[str, Any], key: str, source: str) -> tuple[int, ...]:
    """``record[key]`` as a tuple of non-negative ints; ValueError naming the field otherwise."""
    value = record.get(key)
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise ValueError(f"{source}: framing.{key} must be a list of token ids, got {value!r}; re-binarize the dataset")
    return tuple(value)
