"""Trim a teacher vocabulary to the tokens a corpus needs: the id map and the trimmed tokenizer.

Following "Load What You Need" (Abdaoui et al., 2020), a multilingual teacher's 250k+ vocabulary
is cut to the ids that occur in the target-language corpus plus the ids needed to tokenize any
text: special tokens, byte-fallback tokens, single-character pieces, and what each tokenizer
model needs to reproduce the teacher's tokenization of the corpus exactly:

* BPE (Gemma, Llama): the intermediate tokens of merges (:func:`close_over_merges`).
* WordPiece (mBERT, MuRIL, IndicBERT v2): greedy longest-match-first picks the same piece from
  any sub-vocabulary that still holds it, so the corpus pieces suffice for every word the teacher
  tokenized; a word the teacher turned into ``[UNK]`` also needs the pieces its greedy walk
  matched before failing, which only the text shows (:func:`wordpiece_unk_paths`).
* Unigram (XLM-R SentencePiece): the Viterbi path of the teacher stays optimal among the paths
  of a sub-vocabulary that holds it, provided the unknown-piece score (lowest piece score - 10)
  does not rise, so the lowest-scoring piece is kept too (:func:`unigram_min_score_token`).

Token ids on disk stay teacher ids; a ``VocabMap`` remaps them to student ids (the kept teacher
ids in ascending order, so low-id special tokens come first) and restricts embedding / head rows.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tokenizers.pre_tokenizers import ByteLevel
from transformers import PreTrainedTokenizerFast
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from megadistill.files import atomic_write_text

logger = logging.getLogger(__name__)

BYTE_FALLBACK_TOKENS = tuple(f"<0x{i:02X}>" for i in range(256))
"""The 256 byte tokens of SentencePiece-style byte fallback (Gemma, Llama 2, Mistral)."""

SPECIAL_TOKEN_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_FORMAT = "megadistill.vocab_map"


class VocabMap:
    """Map between a teacher vocabulary and a trimmed student vocabulary.

    Student id ``s`` is teacher id ``student_to_teacher[s]``; teacher ids are kept in ascending
    order, so the student vocabulary keeps the teacher's relative order.

    Attributes:
        student_to_teacher: ``int64 ndarray[Vs]``, strictly increasing teacher ids.
        teacher_vocab_size: ``Vt``, the number of real teacher ids (the tokenizer length, not a
            padded embedding size).
        unk_teacher_id: teacher id that dropped ids are replaced by; must be kept. Default: the
            smallest kept id (pad or unk in SentencePiece-style vocabularies); pass the
            tokenizer's ``unk_token_id`` to be explicit.
        teacher_to_student: ``int64 ndarray[Vt]``, student id or -1 where the id was dropped.
        unk_student_id: student id of ``unk_teacher_id``.

    Raises:
        ValueError: ids not strictly increasing, out of ``[0, Vt)``, or the unk id not kept.
    """

    def __init__(self, student_to_teacher: Iterable[int], teacher_vocab_size: int, unk_teacher_id: int | None = None):
        ids = _id_array(student_to_teacher)
        if ids.size == 0:
            raise ValueError("student_to_teacher must hold at least one teacher id")
        if np.any(np.diff(ids) <= 0):
            raise ValueError("student_to_teacher must be strictly increasing teacher ids (sort and deduplicate them)")
        if ids[0] < 0 or ids[-1] >= teacher_vocab_size:
            raise ValueError(f"teacher ids must lie in [0, {teacher_vocab_size}), got {ids[0]}..{ids[-1]}")
        self.student_to_teacher = ids
        self.teacher_vocab_size = int(teacher_vocab_size)
        self.teacher_to_student = np.full(self.teacher_vocab_size, -1, dtype=np.int64)
        self.teacher_to_student[ids] = np.arange(ids.size, dtype=np.int64)
        unk_teacher_id = int(ids[0]) if unk_teacher_id is None else unk_teacher_id
        if not 0 <= unk_teacher_id < teacher_vocab_size or self.teacher_to_student[unk_teacher_id] < 0:
            raise ValueError(f"unk teacher id {unk_teacher_id} must be one of the kept ids")
        self.unk_teacher_id = int(unk_teacher_id)
        self.unk_student_id = int(self.teacher_to_student[unk_teacher_id])
        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    @classmethod
    def from_token_ids(
        cls,
        ids: Iterable[int] | Mapping[int, int] | np.ndarray,
        teacher_vocab_size: int,
        always_keep: Iterable[int] = (),
        *,
        unk_teacher_id: int | None = None,
    ) -> VocabMap:
        """Build a map keeping the given teacher ids.

        Args:
            ids: teacher ids to keep (any iterable or array, duplicates allowed), or a mapping
                ``id -> count`` where ids with a positive count are kept.
            teacher_vocab_size: ``Vt``.
            always_keep: ids kept regardless (special tokens); ``unk_teacher_id`` is added too.
            unk_teacher_id: teacher id that dropped ids map to (default: the smallest kept id).
        """
        if isinstance(ids, Mapping):
            ids = [token for token, count in ids.items() if count > 0]
        unk = [] if unk_teacher_id is None else [unk_teacher_id]
        kept = np.concatenate([_id_array(ids), _id_array(always_keep), _id_array(unk)])
        return cls(np.unique(kept), teacher_vocab_size, unk_teacher_id)

    def __len__(self) -> int:
        return int(self.student_to_teacher.size)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VocabMap):
            return NotImplemented
        same_sizes = (self.teacher_vocab_size, self.unk_teacher_id) == (other.teacher_vocab_size, other.unk_teacher_id)
        return same_sizes and np.array_equal(self.student_to_teacher, other.student_to_teacher)

    def __repr__(self) -> str:
        return f"VocabMap(kept={len(self)} of {self.teacher_vocab_size} teacher ids, unk={self.unk_teacher_id})"

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        # Lookup tables are cached per device so collate on CPU and KD on GPU each copy once.
        key = (name, device)
        if key not in self._tables:
            self._tables[key] = torch.from_numpy(getattr(self, name)).to(device)
        return self._tables[key]

    def remap(self, teacher_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher ids to student ids.

        Args:
            teacher_ids: ``LongTensor[...]`` of ids in ``[0, Vt)``.

        Returns:
            ``(student_ids, dropped)``: ``LongTensor[...]`` with dropped ids replaced by
            ``unk_student_id``, and ``BoolTensor[...]`` that is True where an id was dropped.

        Raises:
            ValueError: an id outside ``[0, Vt)`` (data tokenized with another tokenizer?).
        """
        _check_range(teacher_ids, self.teacher_vocab_size, "teacher")
        student = self._table("teacher_to_student", teacher_ids.device)[teacher_ids]
        dropped = student < 0
        return student.masked_fill(dropped, self.unk_student_id), dropped

    def to_teacher(self, student_ids: torch.Tensor) -> torch.Tensor:
        """Student ids ``LongTensor[...]`` in ``[0, Vs)`` to teacher ids ``LongTensor[...]``.

        Raises:
            ValueError: an id outside ``[0, Vs)``.
        """
        _check_range(student_ids, len(self), "student")
        return self._table("student_to_teacher", student_ids.device)[student_ids]

    def restrict_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """Gather the kept rows of a teacher embedding, output head or bias, in student order.

        Args:
            weight: ``Tensor[R, ...]`` indexed by teacher id, ``R >= Vt``. Rows ``>= Vt`` (a padded
                vocabulary, e.g. 152,064 rows for 151,665 ids) are never addressed.

        Returns:
            ``Tensor[Vs, ...]``, a new tensor on ``weight``'s device (gradients flow to ``weight``).

        Raises:
            ValueError: ``R < Vt``: the weight belongs to a different vocabulary.
        """
        if weight.shape[0] < self.teacher_vocab_size:
            raise ValueError(
                f"weight has {weight.shape[0]} rows but the vocab map was built for {self.teacher_vocab_size} "
                "teacher ids: the weight and the map come from different vocabularies"
            )
        return weight.index_select(0, self._table("student_to_teacher", weight.device))

    def to_dict(self) -> dict:
        """JSON-ready form: ``format``, ``version``, ``teacher_vocab_size``, ``unk_teacher_id``,
        ``student_to_teacher`` (list of ints)."""
        return {
            "format": _FORMAT,
            "version": 1,
            "teacher_vocab_size": self.teacher_vocab_size,
            "unk_teacher_id": self.unk_teacher_id,
            "student_to_teacher": self.student_to_teacher.tolist(),
        }

    @classmethod
    def from_dict(cls, payload: Mapping) -> VocabMap:
        """Inverse of ``to_dict``.

        Raises:
            ValueError: not a vocab-map dict (wrong ``format`` field) or invalid ids.
        """
        if payload.get("format") != _FORMAT:
            raise ValueError(f"not a megadistill vocab map (format field {payload.get('format')!r})")
        ids = np.asarray(payload["student_to_teacher"], dtype=np.int64)
        return cls(ids, payload["teacher_vocab_size"], payload["unk_teacher_id"])

    def save(self, path: str | Path) -> None:
        """Write ``to_dict()`` as JSON, atomically (a temporary file renamed into place)."""
        atomic_write_text(Path(path), json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> VocabMap:
        """Read a map written by ``save``.

        Raises:
            FileNotFoundError: no such file. ValueError: not a vocab-map JSON file.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"vocab map {path} not found: build one with VocabMap.from_token_ids(...).save(path)"
            )
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


def _id_array(values) -> np.ndarray:
    if not isinstance(values, (np.ndarray, torch.Tensor)):
        values = list(values)
    return np.asarray(values, dtype=np.int64).ravel()


def _check_range(ids: torch.Tensor, size: int, kind: str) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
        raise ValueError(f"{kind} ids must lie in [0, {size}), got {int(ids.min())}..{int(ids.max())}")



def kept_ids_from_corpus(
    datasets: Iterable, tokenizer: PreTrainedTokenizerBase, extra_ids: Iterable[int] = (), *,
    texts: Iterable[str] | None = None, char_fallback: bool = True,
) -> np.ndarray:
    """The teacher ids a trimmed vocabulary must keep for a corpus.

    The union of: ids occurring in the documents; ``tokenizer.all_special_ids``; the byte-fallback
    tokens ``<0x00>..<0xFF>`` and byte-level alphabet when the vocabulary has them (so unseen text
    still tokenizes without ``<unk>``); ``extra_ids``; and what keeps the trimmed tokenizer equal
    to the teacher's on the corpus (module docstring): BPE merge intermediates, the lowest-score
    Unigram piece, and for WordPiece with ``texts`` the greedy paths of words the teacher maps to
    ``[UNK]``. With ``char_fallback`` (WordPiece, Unigram), the single-character pieces (and
    ``##c`` continuations) of every character in a kept piece are kept too, so new words in the
    corpus's scripts do not become ``[UNK]``; adding pieces never breaks the exactness.

    Args:
        datasets: iterable of datasets, each an iterable (or ``len`` + ``[]`` indexable sequence)
            of 1-D integer arrays of teacher ids, e.g. ``megadistill.data.indexed.IndexedDataset``.
        tokenizer: the teacher tokenizer the documents were tokenized with.
        extra_ids: further teacher ids to keep (e.g. chat-template tokens).
        texts: the corpus text (WordPiece only; without it, exactness holds for every word the
            teacher tokenized without ``[UNK]``).
        char_fallback: keep single-character pieces (WordPiece, Unigram).

    Returns:
        ``int64 ndarray`` of sorted unique teacher ids.

    Raises:
        ValueError: a document holds an id outside ``[0, len(tokenizer))``.
    """
    vocab_size = len(tokenizer)
    seen = np.zeros(vocab_size, dtype=bool)
    for dataset in datasets:
        for document in _documents(dataset):
            _mark(seen, np.asarray(document), vocab_size)
    from_data = int(seen.sum())
    vocab = tokenizer.get_vocab()
    tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str())
    seen[[i for i in tokenizer.all_special_ids if i is not None]] = True
    seen[[vocab[t] for t in _fallback_tokens(tokenizer_json) if t in vocab]] = True
    seen[_id_array(extra_ids)] = True
    id_to_token = {i: t for t, i in vocab.items()}
    kept = {id_to_token[i] for i in np.flatnonzero(seen)}
    seen[[vocab[t] for t in _closure_tokens(tokenizer, tokenizer_json, kept, texts, char_fallback)]] = True
    kept_ids = np.flatnonzero(seen).astype(np.int64)
    logger.info("kept %d of %d teacher ids (%d seen in the corpus)", kept_ids.size, vocab_size, from_data)
    return kept_ids


def _closure_tokens(tokenizer, tokenizer_json: dict, kept: set[str], texts, char_fallback: bool) -> set[str]:
    """Token strings (of the vocabulary) to add to ``kept`` for the tokenizer model's exactness guarantee."""
    kind = tokenizer_json["model"]["type"]
    if kind == "BPE":
        return close_over_merges(tokenizer_json, kept)
    added = set()
    if kind == "WordPiece" and texts is not None:
        added |= wordpiece_unk_paths(tokenizer, texts)
    if kind == "Unigram" and tokenizer_json["model"]["vocab"]:
        added.add(unigram_min_score_token(tokenizer_json))
    if char_fallback and kind in ("WordPiece", "Unigram"):
        added |= char_fallback_tokens(tokenizer_json, kept | added)
    return added


def char_fallback_tokens(tokenizer_json: dict, token_strings: Iterable[str]) -> set[str]:
    """Single-character pieces of every character in ``token_strings``, as the vocabulary has them.

    WordPiece: ``c`` and ``##c`` (word-initial and continuation); Unigram: ``c``. Special and
    added tokens (``[CLS]``, ``<s>``) are not split into characters.
    """
    model = tokenizer_json["model"]
    vocab = _model_vocab(model)
    specials = {a["content"] for a in tokenizer_json.get("added_tokens", [])}
    prefix = (model.get("continuing_subword_prefix") or "") if model["type"] == "WordPiece" else ""
    chars = set()
    for token in token_strings:
        if token not in specials:
            chars.update(token[len(prefix):] if prefix and token.startswith(prefix) else token)
    candidates = chars | ({prefix + c for c in chars} if prefix else set())
    return {t for t in candidates if t in vocab}


def wordpiece_unk_paths(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str]) -> set[str]:
    """Pieces greedy longest-match-first matches in words it then maps to ``[UNK]``.

    WordPiece turns a whole word into ``[UNK]`` when, at some position, no piece matches. A
    sub-vocabulary without the pieces matched before that position could take a shorter piece
    there and then succeed, producing ids the teacher never produced; keeping them forces the
    same walk and the same failure.

    Args:
        tokenizer: a fast tokenizer whose model is WordPiece.
        texts: the corpus text (normalized and pre-tokenized as the tokenizer does).

    Returns:
        Token strings (possibly empty).
    """
    backend = tokenizer.backend_tokenizer
    model = json.loads(backend.to_str())["model"]
    unk = model["unk_token"]
    words = set()
    for text in texts:
        normalized = backend.normalizer.normalize_str(text) if backend.normalizer else text
        pieces = backend.pre_tokenizer.pre_tokenize_str(normalized) if backend.pre_tokenizer else [(normalized, None)]
        words.update(word for word, _ in pieces)
    needed = set()
    for word in words:
        # Only [UNK] words need it; the Rust tokenize call filters them cheaply.
        if [t.value for t in backend.model.tokenize(word)] == [unk]:
            needed |= _greedy_walk_before_failure(word, model)
    return needed


def _greedy_walk_before_failure(word: str, model: dict) -> set[str]:
    """The pieces WordPiece matches in ``word`` before no piece matches (empty when it succeeds or is too long)."""
    vocab, prefix = model["vocab"], model.get("continuing_subword_prefix") or ""
    if len(word) > model.get("max_input_chars_per_word", 100):
        return set()  # [UNK] without any matching: nothing to keep
    walk, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start and (prefix if start else "") + word[start:end] not in vocab:
            end -= 1
        if end == start:
            return set(walk)
        walk.append((prefix if start else "") + word[start:end])
        start = end
    return set()


def unigram_min_score_token(tokenizer_json: dict) -> str:
    """The lowest-scoring piece of a Unigram model (ties: the first).

    The unknown-piece score is ``min(score) - 10`` over the model's pieces (``tokenizers`` and
    SentencePiece alike); keeping this piece keeps that score, so an unknown node replacing a
    dropped single-character piece always scores below it and no new path can win.
    """
    pieces = tokenizer_json["model"]["vocab"]
    return min(pieces, key=lambda piece: piece[1])[0]


def _model_vocab(model: dict) -> set[str]:
    vocab = model["vocab"]
    return {p[0] for p in vocab} if model["type"] == "Unigram" else set(vocab)


def vocab_map_from_corpus(
    datasets: Iterable, tokenizer: PreTrainedTokenizerBase, extra_ids: Iterable[int] = (), **closure
) -> VocabMap:
    """``VocabMap`` over ``kept_ids_from_corpus``, with ``Vt = len(tokenizer)`` and the tokenizer's unk.

    ``closure`` (``texts=``, ``char_fallback=``) goes to :func:`kept_ids_from_corpus`.

    Raises:
        ValueError: the tokenizer has no unk token (pass ``unk_teacher_id`` to
        ``VocabMap.from_token_ids`` yourself), or as ``kept_ids_from_corpus``.
    """
    if tokenizer.unk_token_id is None:
        raise ValueError(
            "the tokenizer has no unk token: build the map with VocabMap.from_token_ids(..., unk_teacher_id=...)"
        )
    kept = kept_ids_from_corpus(datasets, tokenizer, extra_ids, **closure)
    return VocabMap.from_token_ids(kept, len(tokenizer), unk_teacher_id=tokenizer.unk_token_id)


def _documents(dataset) -> Iterable:
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        return (dataset[i] for i in range(len(dataset)))
    return iter(dataset)


def _mark(seen: np.ndarray, document: np.ndarray, vocab_size: int) -> None:
    if document.size == 0:
        return
    if document.min() < 0 or document.max() >= vocab_size:
        raise ValueError(
            f"document holds token ids {int(document.min())}..{int(document.max())}, outside [0, {vocab_size}): "
            "it was tokenized with a different tokenizer than the one given"
        )
    seen[document] = True


def _fallback_tokens(tokenizer_json: dict) -> list[str]:
    """Tokens that let any text be encoded: byte-fallback tokens, and the byte-level alphabet
    when the pre-tokenizer maps bytes to characters (GPT-2 style)."""
    tokens = list(BYTE_FALLBACK_TOKENS)
    if '"ByteLevel"' in json.dumps(tokenizer_json.get("pre_tokenizer")):
        tokens += sorted(ByteLevel.alphabet())
    return tokens


def _merge_pair(merge: str | list[str]) -> tuple[str, str]:
    # tokenizers < 0.20 wrote merges as "a b"; newer versions write ["a", "b"].
    if isinstance(merge, str):
        left, right = merge.split(" ", 1)
        return left, right
    return merge[0], merge[1]


def _merge_result(left: str, right: str, prefix: str) -> str:
    if prefix and right.startswith(prefix):
        return left + right[len(prefix):]
    return left + right


def close_over_merges(tokenizer_json: dict, kept_token_strings: Iterable[str]) -> set[str]:
    """Close a set of BPE tokens under merge ancestry.

    For every merge ``(a, b)`` whose result ``a+b`` is in the set, ``a`` and ``b`` are added,
    recursively. Then a BPE tokenizer restricted to the set (merges kept iff ``a``, ``b`` and
    ``a+b`` are kept, in the original order) tokenizes EXACTLY like the teacher on any text whose
    teacher tokens are all kept: every merge the teacher applies on such text yields a kept token
    or an ancestor of one, so it is still available, and any merge the trimmed tokenizer could
    prefer was also available to the teacher, which did not pick it.

    Args:
        tokenizer_json: ``json.loads(tokenizer.backend_tokenizer.to_str())`` of a BPE tokenizer.
        kept_token_strings: token strings to keep.

    Returns:
        The closed set of token strings (a superset of the input).
    """
    model = tokenizer_json["model"]
    prefix = model.get("continuing_subword_prefix") or ""
    producers: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for merge in model.get("merges", []):
        left, right = _merge_pair(merge)
        producers[_merge_result(left, right, prefix)].append((left, right))
    closed = set(kept_token_strings)
    pending = list(closed)
    while pending:
        for pair in producers.get(pending.pop(), ()):
            for part in pair:
                if part not in closed:
                    closed.add(part)
                    pending.append(part)
    return closed


def trim_tokenizer(tokenizer: PreTrainedTokenizerFast, vocab_map: VocabMap) -> PreTrainedTokenizerFast:
    """A tokenizer that produces STUDENT ids for the kept vocabulary.

    The ``tokenizer.json`` is edited: the model vocabulary (BPE, Unigram or WordPiece) and the
    added tokens are restricted to kept tokens and renumbered to student ids, BPE merges are kept
    iff ``a``, ``b`` and ``a+b`` are all kept (original order), and post-processor special-token
    ids are renumbered. Normalizer, pre-tokenizer and decoder are unchanged, so byte fallback
    covers characters whose tokens were dropped. With a vocabulary closed by
    ``close_over_merges`` (BPE) or from ``kept_ids_from_corpus`` (WordPiece with its ``texts``,
    Unigram), ids equal ``vocab_map.remap(teacher ids)`` on the corpus text. ``model_input_names``
    are the teacher tokenizer's (DistilBERT takes no ``token_type_ids``).

    Args:
        tokenizer: the teacher's fast tokenizer.
        vocab_map: map built for this tokenizer's ids.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``len == len(vocab_map)`` that saves and reloads with
        ``AutoTokenizer``; bos/eos/pad/unk/sep/cls/mask token strings carried over.

    Raises:
        ValueError: unsupported model type (not BPE/Unigram/WordPiece), a kept id with no token,
        or a special token of the tokenizer (e.g. pad) that the map dropped.
    """
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    id_to_token = {i: t for t, i in tokenizer.get_vocab().items()}
    missing = [int(i) for i in vocab_map.student_to_teacher if int(i) not in id_to_token]
    if missing:
        raise ValueError(
            f"kept teacher ids {missing[:5]} have no token in this tokenizer (map built for another vocabulary?)"
        )
    kept = {id_to_token[int(t)]: s for s, t in enumerate(vocab_map.student_to_teacher)}
    data["model"] = _restrict_model(data["model"], kept, vocab_map)
    added = data.get("added_tokens", [])
    data["added_tokens"] = [dict(a, id=kept[a["content"]]) for a in added if a["content"] in kept]
    if data.get("post_processor"):
        data["post_processor"] = _renumber_post_processor(data["post_processor"], kept)
    backend = Tokenizer.from_str(json.dumps(data))
    trimmed = PreTrainedTokenizerFast(tokenizer_object=backend, model_input_names=list(tokenizer.model_input_names),
                                      **_special_tokens(tokenizer, kept))
    trimmed.model_max_length = tokenizer.model_max_length
    trimmed.padding_side = tokenizer.padding_side
    if getattr(tokenizer, "chat_template", None):
        trimmed.chat_template = tokenizer.chat_template
    logger.info("trimmed tokenizer: %d of %d ids", len(trimmed), len(tokenizer))
    return trimmed


def _special_tokens(tokenizer: PreTrainedTokenizerBase, kept: dict[str, int]) -> dict[str, str]:
    tokens = {}
    for name in SPECIAL_TOKEN_ATTRIBUTES:
        value = getattr(tokenizer, name, None)
        if value is None:
            continue
        if str(value) not in kept:
            raise ValueError(f"the vocab map drops the {name} {str(value)!r}: keep it via always_keep")
        tokens[name] = str(value)
    return tokens


def _restrict_model(model: dict, kept: dict[str, int], vocab_map: VocabMap) -> dict:
    kind = model.get("type")
    if kind == "BPE":
        merges = [_merge_pair(m) for m in model["merges"]]
        prefix = model.get("continuing_subword_prefix") or ""
        model = dict(model, vocab={t: kept[t] for t in model["vocab"] if t in kept})
        model["merges"] = [[a, b] for a, b in merges if a in kept and b in kept and _merge_result(a, b, prefix) in kept]
        return model
    if kind == "WordPiece":
        if model["unk_token"] not in kept:
            raise ValueError(f"the vocab map drops the WordPiece unk token {model['unk_token']!r}: keep it via always_keep")
        return dict(model, vocab={t: kept[t] for t in model["vocab"] if t in kept})
    if kind == "Unigram":
        if model["vocab"] and unigram_min_score_token({"model": model}) not in kept:
            logger.warning("the trimmed Unigram vocabulary lacks the lowest-score piece: its unknown-piece score rises "
                           "and corpus tokenization may differ from the teacher's (use kept_ids_from_corpus)")
        # The piece list is in id order and student ids keep that order, so filtering renumbers.
        pieces = [p for p in model["vocab"] if p[0] in kept]
        assert all(kept[p[0]] == i for i, p in enumerate(pieces)), "Unigram pieces must be in id order"
        unk = model.get("unk_id")
        if unk is not None and vocab_map.teacher_to_student[unk] < 0:
            raise ValueError(f"the vocab map drops the Unigram unk piece (teacher id {unk}): keep it via always_keep")
        return dict(model, vocab=pieces, unk_id=None if unk is None else int(vocab_map.teacher_to_student[unk]))
    raise ValueError(f"cannot trim a {kind!r} tokenizer model: only BPE, Unigram and WordPiece are supported")


def _renumber_post_processor(processor: dict, kept: dict[str, int]) -> dict:
    """Renumber the special-token ids a post-processor inserts (Template, Bert, Roberta, Sequence)."""
    kind = processor.get("type")
    if kind == "Sequence":
        return dict(processor, processors=[_renumber_post_processor(p, kept) for p in processor["processors"]])
    if kind == "TemplateProcessing":
        specials = {
            name: dict(spec, ids=[_kept_id(token, kept) for token in spec["tokens"]])
            for name, spec in processor["special_tokens"].items()
        }
        return dict(processor, special_tokens=specials)
    if kind in ("BertProcessing", "RobertaProcessing"):
        sep, cls = processor["sep"][0], processor["cls"][0]
        return dict(processor, sep=[sep, _kept_id(sep, kept)], cls=[cls, _kept_id(cls, kept)])
    return processor


def _kept_id(token: str, kept: dict[str, int]) -> int:
    if token not in kept:
        raise ValueError(f"the post-processor inserts {token!r}, which the vocab map drops: keep it via always_keep")
    return kept[token]
