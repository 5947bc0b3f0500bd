"""Initialize the embedding rows of a student with its own vocabulary from the teacher's embedding table.

A student that keeps the teacher's width but gets a new tokenizer (e.g. one trained by
:mod:`megadistill.data.tokenizer_train` for Ol Chiki) cannot copy the teacher's embedding rows by
id. The ``mean`` method follows Fast Vocabulary Transfer (Gee et al., 2022, "Fast Vocabulary
Transfer for Language Model Compression", EMNLP Industry Track), the simple case of WECHSEL
(Minixhofer et al., 2022, arXiv:2112.06598) and FOCUS (Dobler & de Melo, 2023, arXiv:2305.14481)
without their auxiliary embeddings: a student piece that exists verbatim in the teacher vocabulary
copies that row, any other piece gets the mean of the rows of its teacher tokenization, and
special tokens take the teacher's rows of the same role. ``random`` is the baseline those papers
compare with. For Gemma the input and output embeddings are tied, so this sets the output head
too; :func:`apply_embeddings` puts the rows into a Hugging Face model.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:  # annotations only: importing transformers' model classes takes seconds
    from transformers import PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "ROLES", "EmbeddingInit", "apply_embeddings", "init_embeddings"]

METHODS = ("mean", "random")
ROLES = ("bos", "eos", "pad", "unk")
"""Special-token roles mapped from student to teacher by role, not by string (``<s>`` -> ``<bos>``)."""

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte-fallback piece


@dataclass
class EmbeddingInit:
    """Initial embedding rows of a student vocabulary and how each was obtained.

    Attributes:
        weight: ``float32 [Vs, H]``, row ``i`` for student id ``i``.
        method: ``"mean"`` or ``"random"``.
        exact: rows copied from the teacher row of the same piece string.
        averaged: rows that are the mean of the teacher rows of the piece's teacher tokenization.
        fallback: rows that are the mean of all teacher token rows (no teacher id for the piece).
        specials: rows copied from the teacher row of the same special role (bos, eos, pad, unk).
        random: rows drawn at random (method ``random``).
        fallback_pieces: the student pieces that got the fallback row, in id order.
    """

    weight: torch.Tensor
    method: str
    exact: int = 0
    averaged: int = 0
    fallback: int = 0
    specials: int = 0
    random: int = 0
    fallback_pieces: list[str] = field(default_factory=list)


def init_embeddings(
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    teacher_embeddings: torch.Tensor,
    method: Literal["mean", "random"] = "mean",
    seed: int = 0,
    hidden_size: int | None = None,
) -> EmbeddingInit:
    """Embedding rows for every id of ``student_tokenizer`` from the teacher's input embedding.

    ``mean`` (Fast Vocabulary Transfer, Gee et al. 2022; the plain case of WECHSEL, Minixhofer et al.
    2022, arXiv:2112.06598, and FOCUS, Dobler & de Melo 2023, arXiv:2305.14481), first rule that applies:

    1. the student's bos/eos/pad/unk token -> the teacher's bos/eos/pad/unk row (``specials``);
    2. a piece whose exact string is in the teacher vocabulary (``▁नमस्ते``, ``<0xE0>``) -> that row
       (``exact``). This assumes both use SentencePiece-style pieces (``▁`` for a space);
    3. the piece's text (``▁`` -> space; an unmatched ASCII byte piece -> that character) tokenized
       by the teacher without special tokens -> the mean of those rows, the teacher's unk excluded
       (``averaged``);
    4. otherwise (no teacher id, e.g. a lone non-ASCII byte) -> the mean of all teacher token rows (``fallback``).

    ``random``: ``N(0, std)`` with the std of the teacher's token rows, from ``torch.Generator(seed)``.

    Args:
        student_tokenizer: the student's tokenizer; ``Vs = len(student_tokenizer)``.
        teacher_tokenizer: the teacher's tokenizer (encodes piece texts; gives the special roles).
        teacher_embeddings: ``[Vt, H]`` floating tensor, any dtype/device, ``Vt >= len(teacher_tokenizer)``
            (rows past the tokenizer, padding of the table, are not used).
        method: ``"mean"`` or ``"random"``.
        seed: seed of ``random`` (unused by ``mean``, which is deterministic).
        hidden_size: the student's width when known; must equal ``H``.
    Returns:
        An :class:`EmbeddingInit` with a ``float32 [Vs, H]`` CPU ``weight`` and per-rule row counts.
    Raises:
        ValueError: an unknown method, a table that is not 2-D floating or has fewer rows than the
            teacher tokenizer has ids, a width other than ``hidden_size``, or (``mean``) a special
            role the student has and the teacher lacks.
    """
    table = _teacher_rows(teacher_embeddings, teacher_tokenizer, hidden_size)
    size = len(student_tokenizer)
    if method == "random":
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(size, table.shape[1], generator=generator, dtype=torch.float32) * table.std()
        return EmbeddingInit(weight, method, random=size)
    if method != "mean":
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    result = _mean_init(student_tokenizer, teacher_tokenizer, table, _role_map(student_tokenizer, teacher_tokenizer))
    logger.info("student embeddings (%d x %d): %d specials, %d exact, %d averaged, %d fallback", size, table.shape[1],
                result.specials, result.exact, result.averaged, result.fallback)
    return result


def _teacher_rows(embeddings: torch.Tensor, teacher_tokenizer: PreTrainedTokenizerBase,
                  hidden_size: int | None) -> torch.Tensor:
    """The teacher's token rows as ``float32 [len(teacher_tokenizer), H]`` on CPU; ValueError for a bad table."""
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2 or not embeddings.is_floating_point():
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(f"teacher_embeddings must be a 2-D floating tensor [Vt, H] "
                         f"(model.get_input_embeddings().weight), got {shape}")
    count = len(teacher_tokenizer)
    if embeddings.shape[0] < count:
        raise ValueError(f"teacher_embeddings has {embeddings.shape[0]} rows but the teacher tokenizer has {count} ids: "
                         "pass the input embedding of the model that goes with this tokenizer")
    if hidden_size is not None and embeddings.shape[1] != hidden_size:
        raise ValueError(f"teacher_embeddings width {embeddings.shape[1]} does not match the student hidden_size "
                         f"{hidden_size}: copying rows needs a student as wide as the teacher")
    return embeddings.detach()[:count].to(device="cpu", dtype=torch.float32)


def _role_map(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> dict[int, int]:
    """``{student id: teacher id}`` of the special roles the student has; ValueError for one the teacher lacks."""
    mapping = {}
    for role in ROLES:
        student_id = getattr(student, f"{role}_token_id", None)
        if student_id is None:
            continue
        teacher_id = getattr(teacher, f"{role}_token_id", None)
        if teacher_id is None:
            raise ValueError(f"the student tokenizer has a {role} token ({getattr(student, f'{role}_token')!r}) but the "
                             f"teacher tokenizer has none: set teacher_tokenizer.{role}_token, or drop it from the student")
        mapping[int(student_id)] = int(teacher_id)
    return mapping


def _piece_text(piece: str) -> str | None:
    """The text a piece stands for: ``▁`` -> space, an ASCII byte piece -> its character, other bytes -> None."""
    match = _BYTE_PIECE.fullmatch(piece)
    if match:
        value = int(match.group(1), 16)
        return chr(value) if value < 0x80 else None  # a lone UTF-8 lead/continuation byte is no text
    return piece.replace("▁", " ")


def _mean_init(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, table: torch.Tensor,
               roles: dict[int, int]) -> EmbeddingInit:
    """The ``mean`` rule for every student id (see :func:`init_embeddings`)."""
    size = len(student)
    vocab = teacher.get_vocab()
    pieces = student.convert_ids_to_tokens(list(range(size)))
    sources: list[list[int]] = [[] for _ in range(size)]
    result = EmbeddingInit(torch.empty(0), "mean")
    pending: dict[int, str] = {}
    for i, piece in enumerate(pieces):
        if i in roles:
            sources[i], result.specials = [roles[i]], result.specials + 1
        elif piece is not None and vocab.get(piece, len(table)) < len(table):  # an id with a row
            sources[i], result.exact = [vocab[piece]], result.exact + 1
        elif piece is not None and (text := _piece_text(piece)):
            pending[i] = text
    if pending:
        encoded = teacher(list(pending.values()), add_special_tokens=False)["input_ids"]
        unk = teacher.unk_token_id
        for i, ids in zip(pending, encoded):
            sources[i] = [t for t in ids if t != unk]  # <unk> says nothing about what the piece means
            result.averaged += bool(sources[i])
    result.fallback = sum(not ids for ids in sources)
    result.fallback_pieces = [str(pieces[i]) for i, ids in enumerate(sources) if not ids]
    result.weight = _mean_rows(table, sources)
    return result


def _mean_rows(table: torch.Tensor, sources: list[list[int]]) -> torch.Tensor:
    """Row ``i`` = mean of ``table[sources[i]]``; the mean of all of ``table`` where ``sources[i]`` is empty."""
    flat = torch.tensor([t for ids in sources for t in ids], dtype=torch.long)
    offsets = torch.tensor([0] + [len(ids) for ids in sources[:-1]], dtype=torch.long).cumsum(0)
    weight = torch.nn.functional.embedding_bag(flat, table, offsets, mode="mean")  # empty bags give zeros
    empty = torch.tensor([not ids for ids in sources])
    weight[empty] = table.mean(dim=0)
    return weight


def apply_embeddings(model: PreTrainedModel, weight: torch.Tensor, tokenizer: PreTrainedTokenizerBase,
                     output_weight: torch.Tensor | None = None) -> PreTrainedModel:
    """Give ``model`` the vocabulary of ``tokenizer``: resize its embeddings to ``weight`` and copy the rows in.

    ``model.resize_token_embeddings(Vs)`` keeps tied input/output embeddings tied (Gemma), so the
    output head gets ``weight`` too; an untied output head gets ``output_weight`` (default ``weight``).
    The special-token ids of ``model.config`` (bos/eos/pad/unk) and of ``model.generation_config``
    (bos/eos/pad) become the tokenizer's: the teacher's ids name other tokens in the new vocabulary.

    Args:
        model: a Hugging Face model with input embeddings (e.g. ``Gemma3ForCausalLM``), modified in place.
        weight: ``[Vs, H]`` rows (e.g. :attr:`EmbeddingInit.weight`); cast to the model's dtype and device.
        tokenizer: the student tokenizer, ``len(tokenizer) == Vs``.
        output_weight: ``[Vs, H]`` rows for an untied output head; ignored when the head is tied.
    Returns:
        ``model``.
    Raises:
        ValueError: ``weight`` not 2-D, its width not the model's embedding width, or ``Vs != len(tokenizer)``.
    """
    embeddings = model.get_input_embeddings()
    width = embeddings.weight.shape[1]
    for name, rows in (("weight", weight), ("output_weight", output_weight)):
        if rows is not None and (rows.ndim != 2 or tuple(rows.shape) != (weight.shape[0], width)):
            raise ValueError(f"{name} has shape {tuple(rows.shape)} but the model needs [Vs, {width}] "
                             f"(its embedding width is {width})")
    if weight.shape[0] != len(tokenizer):
        raise ValueError(f"weight has {weight.shape[0]} rows but the tokenizer has {len(tokenizer)} ids: "
                         "build the rows with init_embeddings(student_tokenizer, ...)")
    model.resize_token_embeddings(weight.shape[0], mean_resizing=False)  # every row is overwritten below
    with torch.no_grad():
        inputs = model.get_input_embeddings().weight
        inputs.copy_(weight.to(device=inputs.device, dtype=inputs.dtype))
        head = model.get_output_embeddings()
        if head is not None and head.weight is not inputs:
            rows = weight if output_weight is None else output_weight
            head.weight.copy_(rows.to(device=head.weight.device, dtype=head.weight.dtype))
    _set_special_ids(model, tokenizer)
    return model


def _set_special_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Write the tokenizer's special ids into the model's config(s) and generation config."""
    configs = [model.config]
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if text_config is not model.config:
        configs.append(text_config)
    for config in configs:
        for role in ROLES:
            setattr(config, f"{role}_token_id", getattr(tokenizer, f"{role}_token_id", None))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        for role in ("bos", "eos", "pad"):  # GenerationConfig has no unk id
            setattr(generation, f"{role}_token_id", getattr(tokenizer, f"{role}_token_id", None))
