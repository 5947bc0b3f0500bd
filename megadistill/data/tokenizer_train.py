"""Train a student tokenizer with SentencePiece and save it as a Hugging Face fast tokenizer.

A student distilled for Indic languages (Santali in Ol Chiki, Odia, Assamese, Hindi) gains from a
vocabulary of its own: Gemma 3 spends about one token per Ol Chiki character. This module trains a
SentencePiece model (Kudo & Richardson, 2018, arXiv:1808.06226; Unigram LM: Kudo, 2018,
arXiv:1804.10959; or BPE: Sennrich et al., 2016) in memory on NFC-normalized text, then rebuilds
it from ``tokenizers`` components so that the Hugging Face tokenizer segments text as SentencePiece
does and round-trips it: ``decode(encode(text))`` is ``NFC(text)``.

Layout of the vocabulary (as in Gemma): ``0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>``, then ``<`` (see
:data:`USER_SYMBOLS`), the 256 byte pieces ``<0x00>`` .. ``<0xFF>`` (with byte fallback) and the
learned pieces. A document is framed ``<bos> text`` by the post-processor; binarize appends
``<eos>`` (:func:`megadistill.data.framing.framing_for_tokenizer` derives prefix ``(2,)`` and
suffix ``(1,)``). The output directory holds the ``save_pretrained`` files, the SentencePiece
``tokenizer.model`` and ``megadistill_tokenizer.json`` (spec, corpus counts, SHA-256 of the text).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sentencepiece
import tokenizers
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import generate_merges
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from megadistill.files import atomic_directory

logger = logging.getLogger(__name__)

__all__ = [
    "BYTE_PIECES", "METADATA_FILE", "SPECIAL_PIECES", "SPM_FILE", "USER_SYMBOLS", "TokenizerSpec",
    "read_texts", "tokens_per_char", "train_tokenizer",
]

SPECIAL_PIECES = ("<pad>", "<eos>", "<bos>", "<unk>")
"""Special pieces at ids 0, 1, 2, 3 (Gemma's order): pad, eos, bos, unk."""

BYTE_PIECES = tuple(f"<0x{i:02X}>" for i in range(256))
"""The byte-fallback pieces, named as SentencePiece (and Gemma) name them."""

USER_SYMBOLS = ("<",)
"""Pieces SentencePiece always cuts out alone. ``<`` is one so that no learned piece starts with it and
literal text such as ``"<0x41>"`` can never be matched as the byte piece of that name (a Unigram
model matches every vocabulary string, byte pieces included); the HF pre-tokenizer isolates it too."""

SPM_FILE = "tokenizer.model"
"""The SentencePiece model bytes, saved beside the Hugging Face files."""

METADATA_FILE = "megadistill_tokenizer.json"
"""Training record: spec, corpus counts and the SHA-256 of the training text stream."""

MODEL_TYPES = ("unigram", "bpe")

_REQUIRED_CHARS = re.compile(r"(\d+) vs (\d+)")  # SentencePiece: "... smaller than required_chars. 300 vs 435."


@dataclass(frozen=True)
class TokenizerSpec:
    """What to train: a SentencePiece model type, its size and the options that change the pieces.

    Attributes:
        model_type: ``"unigram"`` (Kudo, 2018) or ``"bpe"`` (Sennrich et al., 2016).
        vocab_size: ids in all, specials and byte pieces included.
        byte_fallback: spell characters outside the vocabulary as UTF-8 byte pieces (no ``<unk>``).
        character_coverage: fraction of the characters (by frequency) that get their own piece;
            1.0 keeps every character of the corpus, which small Indic corpora need.
        seed: SentencePiece's random seed (training is single-threaded, so the result is reproducible).
        max_sentence_bytes: longer training lines are skipped by SentencePiece (with a warning here).
        max_sentences: train on a seeded sample of this many lines; 0 uses every line.
    """

    model_type: Literal["unigram", "bpe"] = "unigram"
    vocab_size: int = 4000
    byte_fallback: bool = True
    character_coverage: float = 1.0
    seed: int = 0
    max_sentence_bytes: int = 1 << 14
    max_sentences: int = 0

    @property
    def reserved_pieces(self) -> int:
        """Ids taken before any learned piece: specials, user symbols and (with byte fallback) 256 byte pieces."""
        return len(SPECIAL_PIECES) + len(USER_SYMBOLS) + (len(BYTE_PIECES) if self.byte_fallback else 0)

    def validate(self) -> None:
        """Check every field.

        Raises:
            ValueError: one line naming the field, its value and the accepted range.
        """
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if not isinstance(self.vocab_size, int) or self.vocab_size <= self.reserved_pieces:
            byte_pieces = len(BYTE_PIECES) if self.byte_fallback else 0
            raise ValueError(f"vocab_size must be an integer > {self.reserved_pieces} ({len(SPECIAL_PIECES)} special, "
                             f"{len(USER_SYMBOLS)} user and {byte_pieces} byte pieces come first), got {self.vocab_size!r}")
        if not 0.0 < self.character_coverage <= 1.0:
            raise ValueError(f"character_coverage must be in (0, 1], got {self.character_coverage!r}")
        for name in ("seed", "max_sentences"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.max_sentence_bytes, int) or self.max_sentence_bytes < 1:
            raise ValueError(f"max_sentence_bytes must be an integer >= 1, got {self.max_sentence_bytes!r}")


@dataclass
class _Corpus:
    """The NFC training lines and the counts recorded in :data:`METADATA_FILE`."""

    lines: list[str]
    texts: int
    characters: int
    sha256: str
    long_lines: int


def _corpus(texts: Iterable[str], max_line_bytes: int) -> _Corpus:
    """NFC every text and cut it into lines (SentencePiece trains on sentences; IndicCorp joins them with newlines)."""
    digest = hashlib.sha256()
    lines: list[str] = []
    count = characters = long_lines = 0
    for text in texts:
        if not isinstance(text, str):
            raise ValueError(f"training text {count} is a {type(text).__name__}, not a str")
        text = unicodedata.normalize("NFC", text)
        count += 1
        characters += len(text)
        for line in text.split("\n"):
            if line:
                data = line.encode("utf-8")
                digest.update(data + b"\n")  # the stream SentencePiece sees, one line each
                long_lines += len(data) > max_line_bytes
                lines.append(line)
    return _Corpus(lines, count, characters, digest.hexdigest(), long_lines)


def _describe(corpus: _Corpus) -> str:
    return f"{corpus.texts:,} texts, {len(corpus.lines):,} lines, {corpus.characters:,} characters"


def _train_sentencepiece(corpus: _Corpus, spec: TokenizerSpec) -> bytes:
    """Serialized SentencePiece model trained in memory on ``corpus.lines``.

    Raises:
        ValueError: SentencePiece refuses the corpus (rephrased with its size), or learns fewer
            pieces than ``spec.vocab_size`` (the vocabulary is too large for the corpus).
    """
    sentencepiece.set_random_generator_seed(spec.seed)
    writer = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus.lines), model_writer=writer, model_type=spec.model_type,
            vocab_size=spec.vocab_size, character_coverage=spec.character_coverage, byte_fallback=spec.byte_fallback,
            # identity: the text is already NFC, and SentencePiece's nmt_nfkc would also fold compatibility forms.
            normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
            hard_vocab_limit=False, num_threads=1, max_sentence_length=spec.max_sentence_bytes,
            input_sentence_size=spec.max_sentences, shuffle_input_sentence=True,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece=SPECIAL_PIECES[0], eos_piece=SPECIAL_PIECES[1],
            bos_piece=SPECIAL_PIECES[2], unk_piece=SPECIAL_PIECES[3], user_defined_symbols=list(USER_SYMBOLS),
            minloglevel=2,
        )
    except RuntimeError as err:
        raise _sentencepiece_error(err, corpus, spec) from None
    model = writer.getvalue()
    size = sentencepiece.SentencePieceProcessor(model_proto=model).get_piece_size()
    if size < spec.vocab_size:
        raise ValueError(f"vocab_size {spec.vocab_size} is too large for this corpus ({_describe(corpus)}): "
                         f"SentencePiece found only {size} pieces; use vocab_size <= {size} or more text")
    return model


def _sentencepiece_error(err: RuntimeError, corpus: _Corpus, spec: TokenizerSpec) -> ValueError:
    """SentencePiece's multi-line C++ check failure as one actionable line."""
    message = str(err)
    needed = _REQUIRED_CHARS.search(message)
    if "required_chars" in message and needed:
        return ValueError(f"vocab_size {spec.vocab_size} is too small for this corpus ({_describe(corpus)}): its "
                          f"special, byte and single-character pieces alone need {needed.group(2)} ids; use "
                          f"vocab_size well above {needed.group(2)} or a character_coverage below {spec.character_coverage}")
    first = " ".join(message.split())
    return ValueError(f"SentencePiece could not train a {spec.vocab_size}-piece {spec.model_type} model on this "
                      f"corpus ({_describe(corpus)}): {first}")


def _hf_model(sp: sentencepiece.SentencePieceProcessor, spec: TokenizerSpec) -> models.Model:
    """The ``tokenizers`` model with SentencePiece's pieces, ids and scores (Unigram) or merges (BPE)."""
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    unk_id = sp.unk_id()
    if spec.model_type == "unigram":
        return models.Unigram(pieces, unk_id=unk_id, byte_fallback=spec.byte_fallback)
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    # Control, unknown and byte pieces are never the result of a merge (SentencePiece never forms them from text).
    skip = [piece for i, (piece, _) in enumerate(pieces) if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)]
    merges = generate_merges(vocab, skip_tokens=skip)  # ranked by the merged piece's id, as SentencePiece ranks them
    return models.BPE(vocab, merges, unk_token=sp.id_to_piece(unk_id), byte_fallback=spec.byte_fallback, fuse_unk=True)


def _hf_tokenizer(model_proto: bytes, spec: TokenizerSpec) -> PreTrainedTokenizerFast:
    """A fast tokenizer equivalent to the SentencePiece model (same pieces and, up to ties, the same segmentation).

    Built from components rather than ``transformers``' slow->fast converters, which add a dummy
    prefix space: NFC then spaces -> ``▁`` (SentencePiece's escaping); pieces never cross a ``▁``
    word start (SentencePiece's ``split_by_whitespace``) nor contain ``<`` (a user symbol); decoding
    maps ``▁`` back to spaces and fuses byte pieces into UTF-8 characters.
    """
    sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
    backend = Tokenizer(_hf_model(sp, spec))
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)]
        + [pre_tokenizers.Split(symbol, "isolated") for symbol in USER_SYMBOLS])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # Added (special) tokens, as in every HF SentencePiece tokenizer: never split, skipped by decode(skip_special_tokens=True).
    backend.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in SPECIAL_PIECES])
    pad, eos, bos, unk = SPECIAL_PIECES
    backend.post_processor = processors.TemplateProcessing(  # Gemma's template: BOS before each sequence
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, sp.bos_id())])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad)


def train_tokenizer(texts: Iterable[str], spec: TokenizerSpec, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a SentencePiece tokenizer on ``texts`` and save it as a Hugging Face fast tokenizer in ``out_dir``.

    Every text is NFC-normalized and cut into lines; SentencePiece (Kudo & Richardson, 2018) trains
    in memory, single-threaded with ``spec.seed``, so the same spec and texts give the same
    ``tokenizer.json`` bytes. ``out_dir`` is replaced atomically (:func:`megadistill.files.atomic_directory`)
    and only after training succeeded; it receives the ``save_pretrained`` files, :data:`SPM_FILE`
    and :data:`METADATA_FILE`.

    The tokenizer round-trips text: ``decode(encode(text, add_special_tokens=False)) == NFC(text)``
    for any text with byte fallback (unseen characters become ``<0xNN>`` pieces), spaces included.
    ``convert_ids_to_tokens`` gives SentencePiece pieces (``▁`` for a space, ``<0xE0>`` for a byte).
    As in every Hugging Face tokenizer, literal special-token text (``"<bos>"``) encodes to the special
    id; it decodes back unless ``skip_special_tokens=True``.

    Args:
        texts: training documents (any iterable of str, read once).
        spec: what to train (validated here).
        out_dir: output directory.
    Returns:
        The tokenizer, ``len(tokenizer) == spec.vocab_size``, ids 0-3 ``<pad> <eos> <bos> <unk>``.
    Raises:
        ValueError: an invalid spec, no text, a vocabulary too small for the corpus's characters or
            too large for the corpus (the message gives the corpus size).
        OSError: ``out_dir`` cannot be written (a previous directory there is left as it was).
    """
    spec.validate()
    corpus = _corpus(texts, spec.max_sentence_bytes)
    if not corpus.lines:
        raise ValueError(f"no training text: got {corpus.texts} texts with no characters; pass a non-empty corpus")
    if corpus.long_lines:
        logger.warning("%d training lines longer than %d bytes are skipped by SentencePiece (max_sentence_bytes)",
                       corpus.long_lines, spec.max_sentence_bytes)
    model_proto = _train_sentencepiece(corpus, spec)
    tokenizer = _hf_tokenizer(model_proto, spec)
    with atomic_directory(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        (tmp / SPM_FILE).write_bytes(model_proto)
        (tmp / METADATA_FILE).write_text(json.dumps(_metadata(spec, corpus, len(tokenizer)), indent=2) + "\n",
                                         encoding="utf-8")
    logger.info("trained a %d-piece %s tokenizer on %s into %s", len(tokenizer), spec.model_type, _describe(corpus),
                out_dir)
    return tokenizer


def _metadata(spec: TokenizerSpec, corpus: _Corpus, vocab_size: int) -> dict[str, Any]:
    return {
        "spec": dataclasses.asdict(spec),
        "vocab_size": vocab_size,
        "training_text": {"texts": corpus.texts, "lines": len(corpus.lines), "characters": corpus.characters,
                          "lines_over_max_sentence_bytes": corpus.long_lines,
                          "sha256": corpus.sha256, "sha256_of": "NFC lines, each UTF-8 + newline, in order"},
        "versions": {"sentencepiece": sentencepiece.__version__, "tokenizers": tokenizers.__version__},
    }


def read_texts(inputs: Sequence[str | Path]) -> list[str]:
    """The documents of raw corpora and indexed datasets, in order, as text.

    Each input is either a corpus file for :func:`megadistill.data.sources.read_documents`
    (.tsv, .txt, .jsonl, .parquet, optionally compressed, or ``hf:...``) or the prefix of an
    indexed dataset (``<prefix>.idx`` + ``<prefix>.json``; ``x.idx``/``x.bin``/``x.json`` name it too),
    whose documents are decoded with the tokenizer its provenance names
    (:func:`megadistill.models.teacher.load_tokenizer`), special tokens skipped.

    Raises:
        FileNotFoundError: an input that is neither a file nor a dataset prefix (names the path).
        ValueError: an unreadable or empty corpus (from ``read_documents``), a dataset whose
            provenance names no tokenizer or another one than the one that loads, or no input at all.
    """
    if not inputs:
        raise ValueError("no input: pass at least one corpus file or indexed dataset prefix")
    texts: list[str] = []
    for item in inputs:
        prefix = _dataset_prefix(item)
        if prefix is not None:
            texts.extend(_dataset_texts(prefix))
        elif str(item).startswith("hf:") or Path(item).is_file():
            from megadistill.data.sources import read_documents

            texts.extend(doc.text for doc in read_documents(item))
        else:
            raise FileNotFoundError(f"{item}: no such corpus file or indexed dataset ({item}.idx + {item}.json)")
    return texts


def _dataset_prefix(item: str | Path) -> Path | None:
    """The indexed-dataset prefix ``item`` names, or None when it names none."""
    from megadistill.data.indexed import dataset_prefix

    for prefix in (Path(item), dataset_prefix(item)):
        if Path(f"{prefix}.idx").is_file() and Path(f"{prefix}.json").is_file():
            return prefix
    return None


def _dataset_texts(prefix: Path) -> list[str]:
    """Documents of an indexed dataset decoded with the tokenizer named in its provenance."""
    from megadistill.data.indexed import IndexedDataset, check_tokenizer_matches, read_provenance
    from megadistill.models.teacher import load_tokenizer

    record = read_provenance(prefix).get("tokenizer")
    name = record.get("name") if isinstance(record, dict) else None
    if not name:
        raise ValueError(f"{prefix}.json: no tokenizer.name in provenance; decode needs the tokenizer that wrote it")
    tokenizer = load_tokenizer(name)
    check_tokenizer_matches(prefix, tokenizer)  # the ids must mean the strings this tokenizer gives them
    dataset = IndexedDataset(prefix)
    documents = [dataset[i].tolist() for i in range(len(dataset))]
    return tokenizer.batch_decode(documents, skip_special_tokens=True)


def tokens_per_char(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> float:
    """Text tokens (no special tokens) per character of NFC text: lower means shorter sequences.

    Raises:
        ValueError: the texts hold no character.
    """
    nfc = [unicodedata.normalize("NFC", text) for text in texts]
    characters = sum(len(text) for text in nfc)
    if characters == 0:
        raise ValueError("tokens_per_char needs text: the texts hold no character")
    ids = tokenizer(nfc, add_special_tokens=False)["input_ids"]
    return sum(len(row) for row in ids) / characters
