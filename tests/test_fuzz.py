"""Property-based fuzzing (hypothesis) of the readers, the binarizer, the ``.idx/.bin`` reader and the config parser.

Properties (issue 15, "Reliability"):

* ``sources``: :func:`megadistill.data.sources.read_documents` on random corpora (tsv / txt / jsonl,
  plain or compressed, possibly corrupt): random bytes (invalid UTF-8, NULs, over-long lines),
  random Unicode across the Indic scripts (Devanagari, Bengali, Tamil, Odia, Ol Chiki, combining
  marks, ZWJ/ZWNJ, emoji), empty documents, blank and whitespace-only lines. Either one line of
  ``ValueError`` starting with the file name, or NFC, non-blank documents; the same documents
  whatever the block size; ``on_error="fail"`` raises (naming ``file:line``) exactly when ``skip``
  dropped a malformed record.
* ``binarize``: :func:`megadistill.data.binarize.binarize` on the same corpora, with a decoder (BPE,
  byte fallback) and an encoder (WordPiece) tokenizer: the same ``ValueError`` as the reader, or
  a dataset whose documents are exactly ``prefix + tokenizer(text) + suffix`` of the reader's
  documents (document count, token count and characters agree with the provenance).
* ``index``: :class:`megadistill.data.indexed.IndexedDataset` on a valid pair with one random
  corruption (truncation, appended bytes, flipped header bytes, wrong version, dtype code,
  counts, sizes / pointers / document indices overwritten, ``.bin`` cut or grown): a one-line
  ``ValueError`` naming the ``.idx`` or ``.bin``, or a dataset that reads back the original
  tokens (the only corruption the bytes cannot reveal is a dtype code changed to another dtype
  of the same width, which :func:`check_provenance_counts`, run by ``open_checked_datasets``,
  catches against the provenance).
* ``config_overrides`` / ``config_recipe``: :func:`megadistill.config.load_config` with random
  dotted keys and values, and random recipes (nested mappings, wrong types, broken YAML, bytes):
  a valid config that survives ``save_config`` + ``load_config`` unchanged, or one line of
  ``ValueError``; never a TypeError / AttributeError / KeyError / yaml error.

CI runs each property a fixed number of times (:data:`CI_EXAMPLES`) under the ``megadistill-ci``
profile (``derandomize=True``: the same examples every run, no example database); ``bench/fuzz.py``
runs the same :data:`PROPERTIES` with many more examples and a seed.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import json
import lzma
import struct
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PROFILE = "megadistill-ci"
settings.register_profile(
    PROFILE,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

CI_EXAMPLES = {"sources": 250, "binarize": 80, "index": 300, "config_overrides": 400, "config_recipe": 300}
"""Examples per property in CI (about 25 s for the whole file on 2 shared cores)."""

# ------------------------------------------------------------------ random text and corpora

INDIC_RANGES = [
    (0x0900, 0x097F),  # Devanagari
    (0x0980, 0x09FF),  # Bengali
    (0x0B00, 0x0B7F),  # Odia
    (0x0B80, 0x0BFF),  # Tamil
    (0x1C50, 0x1C7F),  # Ol Chiki
    (0x0300, 0x036F),  # combining diacritical marks
    (0x1F300, 0x1F6FF),  # emoji and pictographs
    (0x1F900, 0x1F9FF),
]
SPECIAL_CHARS = list(
    "\u200c\u200d"  # ZWNJ, ZWJ
    "\ufeff\u00a0\u3000\u2028\u0085\u1680\u00ad"  # BOM, NBSP, ideographic space, line separator, NEL, ogham space, soft hyphen
    "\u0964\u0965\u093c\u094d\u09cd\u0bcd\u0b4d"  # danda, double danda, nukta, viramas
    "\U0001f44d\U0001f3fd\u2764\ufe0f\U0001f469\u200d\U0001f4bb"  # emoji, skin tone, VS16, ZWJ sequence parts
    "\x01\x1c\x7f\x0b\x0c"  # control characters (\x1c and \x0b are whitespace to str.strip, not all to bytes.strip)
    ' \t\r"\\{}[]:,'
)

indic_chars = st.one_of(
    *[st.characters(min_codepoint=lo, max_codepoint=hi, exclude_categories=("Cs",)) for lo, hi in INDIC_RANGES],
    st.sampled_from(SPECIAL_CHARS),
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
)
indic_text = st.text(indic_chars, max_size=30)
whitespace = st.text(st.sampled_from(" \t\u00a0\u3000\u2028\x0b\x0c\u200b"), min_size=1, max_size=4)

INVALID_UTF8 = [b"\xff", b"\xc3", b"\xe0\xa4", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80abc", b"\xc0\xaf"]


@st.composite
def raw_line(draw, huge: int) -> bytes:
    """One physical line's bytes (no newline): Indic text, blank, whitespace, binary junk, or a huge line."""
    kind = draw(st.sampled_from(["text"] * 8 + ["blank", "blank", "space", "invalid", "nul", "binary", "huge"]))
    if kind == "text":
        return draw(indic_text).replace("\n", " ").encode("utf-8")
    if kind == "blank":
        return b""
    if kind == "space":
        return draw(whitespace).encode("utf-8")
    if kind == "invalid":
        return draw(indic_text).encode("utf-8") + draw(st.sampled_from(INVALID_UTF8)) + draw(indic_text).encode("utf-8")
    if kind == "nul":
        return draw(indic_text).encode("utf-8") + b"\x00" + draw(indic_text).encode("utf-8")
    if kind == "binary":
        return draw(st.binary(max_size=40)).replace(b"\n", b"")
    return ("\u0915\u094d\u0937" * draw(st.integers(huge // 9 + 1, huge // 3 + 4))).encode("utf-8")  # > huge bytes


@st.composite
def jsonl_line(draw, huge: int) -> bytes:
    """A jsonl line: a record with a text field (sometimes of the wrong type), other JSON, or junk."""
    kind = draw(st.sampled_from(["record"] * 10 + ["no_text", "wrong_type", "not_object", "surrogate", "nul", "deep",
                                                 "bigint", "raw"]))
    text = draw(indic_text)
    if kind == "record":
        record: Any = {"text": text}
        if draw(st.booleans()):
            record.update(doc_id=draw(st.one_of(st.integers(), indic_text)), type=draw(st.sampled_from(["verified", 3])))
        return json.dumps(record, ensure_ascii=draw(st.booleans())).encode("utf-8")
    if kind == "no_text":
        return json.dumps({"txt": text}).encode()
    if kind == "wrong_type":
        return json.dumps({"text": draw(st.one_of(st.integers(), st.lists(st.integers(), max_size=3), st.none()))}).encode()
    if kind == "not_object":
        return json.dumps(draw(st.one_of(st.lists(indic_text, max_size=3), indic_text, st.integers()))).encode()
    if kind == "surrogate":
        return b'{"text": "ab\\ud800cd"}'
    if kind == "nul":
        return b'{"text": "a\\u0000b"}'
    if kind == "deep":
        depth = draw(st.sampled_from([1, 30, 3000, 200_000]))
        return b'{"text": "x", "n": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "bigint":
        return b'{"text": "x", "n": ' + b"7" * draw(st.sampled_from([4300, 4301, 6000])) + b"}"
    return draw(raw_line(huge))


@st.composite
def tsv_line(draw, huge: int, width: int) -> bytes:
    """A tsv row: ``width`` fields (sometimes one more or less), or any raw line."""
    if draw(st.integers(0, 7)) == 0:
        return draw(raw_line(huge))
    n = width + draw(st.sampled_from([0] * 8 + [-1, 1]))
    return b"\t".join(draw(raw_line(huge)).replace(b"\t", b" ") for _ in range(max(n, 1)))


@dataclass
class Corpus:
    """A random corpus file: its name, bytes and the reader options to use."""

    name: str
    data: bytes
    on_error: str
    max_line_bytes: int
    block_bytes: int

    def write(self, directory: Path) -> Path:
        """Write the corpus under ``directory``; returns its path."""
        path = directory / self.name
        path.write_bytes(self.data)
        return path


@st.composite
def corpora(draw) -> Corpus:
    """A tsv / txt / jsonl corpus, maybe with a BOM, CRLF endings, no final newline, compressed, corrupt or pure junk."""
    fmt = draw(st.sampled_from(["txt", "txt", "tsv", "jsonl"]))
    huge = draw(st.sampled_from([1024, 200, 64]))  # max_line_bytes; "huge" lines exceed it
    count = draw(st.sampled_from([3, 1, 2, 5, 8, 13, 20, 0]))  # lists() would mostly draw very short corpora
    if fmt == "txt":
        lines = [draw(raw_line(huge)) for _ in range(count)]
    elif fmt == "jsonl":
        lines = [draw(jsonl_line(huge)) for _ in range(count)]
    else:
        columns = draw(st.permutations(["id", "category", "text"]).map(list))
        if draw(st.integers(0, 9)) == 0:
            columns[columns.index("text")] = "sentence"  # no text column
        lines = ["\t".join(columns).encode()] + [draw(tsv_line(huge, len(columns))) for _ in range(count)]
    newline = draw(st.sampled_from([b"\n", b"\n", b"\r\n"]))
    data = newline.join(lines) + (newline if lines and draw(st.booleans()) else b"")
    if draw(st.integers(0, 6)) == 0:
        data = b"\xef\xbb\xbf" + data
    if draw(st.integers(0, 20)) == 0:
        data = draw(st.binary(max_size=300))  # not text at all
    name = f"corpus.{fmt}"
    compression = draw(st.sampled_from(["", "", "", ".gz", ".bz2", ".xz"]))
    if compression:
        data = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[compression](data)
        name += compression
        damage = draw(st.sampled_from(["none", "none", "none", "none", "truncate", "flip"]))
        if damage == "truncate" and data:
            data = data[: draw(st.integers(0, len(data) - 1))]
        elif damage == "flip" and data:
            at = draw(st.integers(0, len(data) - 1))
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    return Corpus(name, data, draw(st.sampled_from(["skip", "skip", "skip", "fail"])), huge,
                  draw(st.sampled_from([1, 7, 64, 1 << 20])))


def assert_clean_error(err: BaseException, *paths: Path) -> None:
    """A user-facing error: one line, naming one of ``paths`` (the message starts with it, or holds it)."""
    message = str(err)
    assert "\n" not in message, f"multi-line message: {message!r}"
    assert any(str(p) in message for p in paths), f"message names none of {[str(p) for p in paths]}: {message!r}"


def read_reference(path: Path, corpus: Corpus, on_error: str | None = None):
    """``(documents, stats)`` of :func:`read_documents`, or ``(ValueError, stats)``; other exceptions propagate."""
    from megadistill.data.sources import SourceStats, read_documents

    stats = SourceStats()
    try:
        return list(read_documents(path, on_error=on_error or corpus.on_error, stats=stats,
                                   max_line_bytes=corpus.max_line_bytes)), stats
    except ValueError as err:
        assert_clean_error(err, path)
        return err, stats


MALFORMED = {"invalid_utf8", "nul_byte", "line_too_long", "missing_text_field", "bad_json", "bad_tsv_row"}


def check_sources(corpus: Corpus) -> str:
    """Property ``sources`` (see the module docstring); returns the outcome (``ValueError`` or ``documents``)."""
    from megadistill.data.sources import SourceStats, parse_block, read_blocks

    with tempfile.TemporaryDirectory() as tmp:
        path = corpus.write(Path(tmp))
        docs, stats = read_reference(path, corpus)
        if isinstance(docs, ValueError):
            return "ValueError"
        for doc in docs:
            assert doc.text == unicodedata.normalize("NFC", doc.text) and doc.text.strip()
            assert "\x00" not in doc.text and doc.source == str(path) and doc.line >= 1
            doc.text.encode("utf-8")  # no lone surrogate
        assert stats.documents == len(docs) and stats.characters == sum(len(d.text) for d in docs)
        # The same documents however the file is cut into blocks (blocks are parsed apart, in other processes).
        block_stats = SourceStats()
        blocks = read_blocks(path, on_error=corpus.on_error, stats=block_stats, max_line_bytes=corpus.max_line_bytes,
                             block_bytes=corpus.block_bytes)
        assert [d for b in blocks for d in parse_block(b, block_stats)] == docs
        assert block_stats.dropped == stats.dropped and block_stats.lines_read == stats.lines_read
        if corpus.on_error == "skip":
            strict, _ = read_reference(path, corpus, on_error="fail")
            if set(stats.dropped) & MALFORMED:
                assert isinstance(strict, ValueError), f"on_error=fail accepted what skip dropped: {stats.dropped}"
                assert f"{path}:" in str(strict)
            else:
                assert strict == docs
        return "documents"


# ------------------------------------------------------------------ binarize

TOKENIZER_TEXTS = [
    "नमस्ते दुनिया, यह एक परीक्षण है।", "আমার সোনার বাংলা, আমি তোমায় ভালোবাসি।", "வணக்கம் உலகம், இது ஒரு சோதனை.",
    "ନମସ୍କାର ଦୁନିଆ, ଏହା ଏକ ପରୀକ୍ଷା।", "ᱥᱟᱱᱛᱟᱲᱤ ᱯᱟᱹᱨᱥᱤ ᱚᱞ ᱪᱤᱠᱤ", "Hello world, this is a test 123.",
]


@functools.lru_cache(maxsize=None)
def tokenizer(kind: str):
    """A tiny decoder (Gemma-like BPE with byte fallback) or encoder (BERT WordPiece) tokenizer, built once."""
    from conftest import build_bert_tokenizer, build_tiny_tokenizer

    texts = TOKENIZER_TEXTS * 4
    return build_tiny_tokenizer(texts, vocab_size=400) if kind == "decoder" else build_bert_tokenizer(texts, vocab_size=300)


@st.composite
def binarize_cases(draw) -> tuple[Corpus, str]:
    """A corpus and a tokenizer kind."""
    return draw(corpora()), draw(st.sampled_from(["decoder", "decoder", "encoder"]))


def check_binarize(case: tuple[Corpus, str]) -> str:
    """Property ``binarize`` (see the module docstring); returns the outcome (``ValueError`` or ``dataset``)."""
    from megadistill.data.binarize import BinarizeOptions, binarize
    from megadistill.data.framing import framing_for_tokenizer
    from megadistill.data.indexed import open_checked_datasets, read_provenance

    corpus, kind = case
    tok = tokenizer(kind)
    with tempfile.TemporaryDirectory() as tmp:
        path = corpus.write(Path(tmp))
        docs, _ = read_reference(path, corpus)
        out = Path(tmp) / "out" / "data"
        options = BinarizeOptions(on_error=corpus.on_error, max_line_bytes=corpus.max_line_bytes,
                                  block_bytes=corpus.block_bytes)
        try:
            meta = binarize([path], tok, out, options, show_progress=False)
        except ValueError as err:
            assert_clean_error(err, path)
            assert isinstance(docs, ValueError), f"binarize failed ({err}) where the reader gave {len(docs)} documents"
            assert not Path(f"{out}.idx").exists() and not Path(f"{out}.bin").exists()
            return "ValueError"
        assert not isinstance(docs, ValueError), f"binarize succeeded where the reader raised {docs}"
        framing = framing_for_tokenizer(tok)
        expected = [list(framing.prefix_ids) + tok(d.text, add_special_tokens=False)["input_ids"] + list(framing.suffix_ids)
                    for d in docs]
        (ds,) = open_checked_datasets([out], tok)  # tokenizer hash, framing and provenance counts agree
        assert [ds[i].tolist() for i in range(len(ds))] == expected
        assert meta["documents"] == len(ds) == len(docs)
        assert meta["tokens"] == ds.num_tokens == sum(map(len, expected))
        assert meta["characters"] == sum(len(d.text) for d in docs)
        assert read_provenance(out) == meta
        return "dataset"


# ------------------------------------------------------------------ .idx / .bin corruption

INT_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16]
HEADER = 34  # magic 9, version 8, dtype code 1, counts 8 + 8


@dataclass
class IndexCase:
    """Documents of a valid pair, its dtype, and one corruption (``kind``, ``args``) to apply to it."""

    docs: list[list[int]]
    dtype: Any
    kind: str
    args: tuple


CORRUPTIONS = ["truncate_idx", "truncate_bin", "append_idx", "append_bin", "flip_header", "flip_idx", "version",
               "dtype_code", "count", "doc_count", "size", "pointer", "doc_index", "swap_sizes", "junk_idx",
               "empty_idx", "empty_bin", "magic"]


@st.composite
def index_cases(draw) -> IndexCase:
    """A small valid dataset and one random corruption of it."""
    dtype = draw(st.sampled_from(INT_DTYPES))
    high = min(np.iinfo(dtype).max, 70000)
    docs = draw(st.lists(st.lists(st.integers(0, high), min_size=1, max_size=8), max_size=8))
    kind = draw(st.sampled_from(CORRUPTIONS))
    u64 = st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 40))
    i64 = st.one_of(st.integers(-2**63, 2**63 - 1), st.integers(-3, 80))
    args: tuple = ()
    if kind in ("truncate_idx", "truncate_bin", "flip_idx"):
        args = (draw(st.floats(0, 1, exclude_max=True)), draw(st.integers(1, 255)))
    elif kind in ("append_idx", "append_bin"):
        args = (draw(st.binary(min_size=1, max_size=24)),)
    elif kind == "flip_header":
        args = (draw(st.integers(0, HEADER - 1)), draw(st.integers(1, 255)))
    elif kind in ("version", "count", "doc_count"):
        args = (draw(u64),)
    elif kind == "dtype_code":
        args = (draw(st.one_of(st.integers(1, 8), st.integers(0, 255))),)  # often another valid code
    elif kind == "size":
        args = (draw(st.integers(0, 10)), draw(st.integers(-2**31, 2**31 - 1) | st.integers(-2, 20)))
    elif kind in ("pointer", "doc_index"):
        args = (draw(st.integers(0, 10)), draw(i64))
    elif kind == "swap_sizes":
        args = (draw(st.integers(0, 10)), draw(st.integers(0, 10)))
    elif kind == "junk_idx":
        args = (draw(st.binary(max_size=120)),)
    elif kind == "magic":
        args = (draw(st.binary(min_size=9, max_size=9)),)
    return IndexCase(docs, dtype, kind, args)


def corrupt(prefix: Path, case: IndexCase) -> bool:
    """Apply ``case``'s corruption to ``<prefix>.idx/.bin``; False when it does not apply (the pair is unchanged)."""
    idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    idx, data = bytearray(idx_path.read_bytes()), bytearray(bin_path.read_bytes())
    n = len(case.docs)
    kind, args = case.kind, case.args

    def put(fmt: str, offset: int, value: int) -> None:
        struct.pack_into(fmt, idx, offset, value)

    if kind == "truncate_idx":
        idx = idx[: int(args[0] * len(idx))]
    elif kind == "truncate_bin":
        if not data:
            return False
        data = data[: int(args[0] * len(data))]
    elif kind == "append_idx":
        idx += args[0]
    elif kind == "append_bin":
        data += args[0]
    elif kind == "flip_header":
        idx[args[0]] ^= args[1]
    elif kind == "flip_idx":
        idx[int(args[0] * len(idx))] ^= args[1]
    elif kind == "version":
        put("<Q", 9, args[0])
    elif kind == "dtype_code":
        idx[17] = args[0]
    elif kind == "count":
        put("<Q", 18, args[0])
    elif kind == "doc_count":
        put("<Q", 26, args[0])
    elif kind == "size":
        if not n:
            return False
        put("<i", HEADER + 4 * (args[0] % n), args[1])
    elif kind == "pointer":
        if not n:
            return False
        put("<q", HEADER + 4 * n + 8 * (args[0] % n), args[1])
    elif kind == "doc_index":
        put("<q", HEADER + 12 * n + 8 * (args[0] % (n + 1)), args[1])
    elif kind == "swap_sizes":
        if not n:
            return False
        i, j = args[0] % n, args[1] % n
        a, b = HEADER + 4 * i, HEADER + 4 * j
        idx[a:a + 4], idx[b:b + 4] = idx[b:b + 4], idx[a:a + 4]
    elif kind == "junk_idx":
        idx = bytearray(args[0])
    elif kind == "empty_idx":
        idx = bytearray()
    elif kind == "empty_bin":
        if not data:
            return False
        data = bytearray()
    elif kind == "magic":
        idx[:9] = args[0]
    idx_path.write_bytes(bytes(idx))
    bin_path.write_bytes(bytes(data))
    return True


SAME_WIDTH = {1: {1, 2}, 2: {1, 2}, 3: {3, 8}, 8: {3, 8}, 4: {4, 7}, 7: {4, 7}, 5: {5, 6}, 6: {5, 6}}
"""Megatron dtype codes of the same item size: a code changed within a group leaves every length consistent."""


def check_index(case: IndexCase) -> str:
    """Property ``index`` (see the module docstring); returns the outcome (``ValueError``, ``same tokens``, ...)."""
    from megadistill.data.indexed import IndexedDataset, IndexedDatasetWriter, check_provenance_counts, validate_index

    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "ds"
        with IndexedDatasetWriter(prefix, case.dtype) as writer:
            for doc in case.docs:
                writer.add_document(doc)
        original_code = Path(f"{prefix}.idx").read_bytes()[17]
        changed = corrupt(prefix, case)
        paths = (Path(f"{prefix}.idx"), Path(f"{prefix}.bin"))
        report = validate_index(prefix)  # never raises for a pair whose files exist
        for problem in report.problems:
            assert_clean_error(ValueError(problem), *paths)
        try:
            ds = IndexedDataset(prefix)
            tokens = [ds[i].tolist() for i in range(len(ds))]
        except ValueError as err:
            assert_clean_error(err, *paths)
            assert changed, f"valid pair refused: {err}"
            assert report.problems, "IndexedDataset refused a pair validate_index found no problem in"
            return "ValueError"
        assert report.valid, f"IndexedDataset opened a pair with problems: {report.problems}"
        code = Path(f"{prefix}.idx").read_bytes()[17]
        if code != original_code:  # undetectable from the bytes alone: a same-width dtype, or any for no tokens
            assert code in SAME_WIDTH[original_code] or not any(case.docs), \
                f"dtype code {original_code} -> {code} not detected"
            meta = {"dtype": np.dtype(case.dtype).name, "documents": len(case.docs), "tokens": sum(map(len, case.docs))}
            try:  # ... but the provenance binarize writes names the dtype (open_checked_datasets checks it)
                check_provenance_counts(ds, meta)
            except ValueError as err:
                assert_clean_error(err, Path(f"{prefix}.json"))
                return "same-width dtype code, caught by the provenance"
            raise AssertionError(f"dtype code {original_code} -> {code} not caught by check_provenance_counts")
        assert tokens == case.docs, "corrupted pair read back other tokens without an error"
        return "same tokens"


# ------------------------------------------------------------------ config


def _field_paths() -> list[str]:
    """Every dotted key of :class:`RunConfig` (``train.max_steps``, ``stage``, ...)."""
    import dataclasses

    from megadistill.config import RunConfig

    paths = []
    for f in dataclasses.fields(RunConfig):
        default = getattr(RunConfig(), f.name)
        if dataclasses.is_dataclass(default):
            paths += [f"{f.name}.{g.name}" for g in dataclasses.fields(default)]
        else:
            paths.append(f.name)
    return paths


FIELD_PATHS = _field_paths()
key_part = st.one_of(st.sampled_from(["train", "loss", "data", "max_steps", "lr", "x", "", " ", "0", "null"]),
                     st.text(max_size=8))
dotted_keys = st.one_of(st.sampled_from(FIELD_PATHS), st.sampled_from(FIELD_PATHS).map(lambda k: k + ".x"),
                        st.lists(key_part, min_size=1, max_size=4).map(".".join))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-10, 300), st.floats(),
                    st.floats(0, 1), st.text(max_size=10),
                    st.sampled_from(["fp32", "bf16", "online", "offline", "none", "pre", "task", "every:2",
                                     "last:1", "student", "uniform", "forward_kl", "cosine", "1e-3", "nan", "-.inf"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.one_of(st.text(max_size=6), st.integers()),
                                                                        inner, max_size=3)), max_leaves=8)
yaml_snippets = st.sampled_from(["[", "]", "{a: 1", "a: b: c", "- x\ny: 1", "!!python/object:os.system {}", "&a [*a]",
                                 "*undefined", "'unterminated", "\t", "%YAML 9.9\n---", "? a", "@x", "`", "{a: 1, a: 2}",
                                 "\x00", "\ufeff1", "1e400", "0x10", "0o7", "+.inf", "~", "2001-12-14", "!!binary aGk="])


def _yaml_text(value: Any) -> str:
    """``value`` as one line of YAML flow text, as a user would type it after ``key=``."""
    try:
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
    except yaml.YAMLError:
        return str(value)


def _typed_values(path: str) -> st.SearchStrategy:
    """Values of roughly the right type for the field at dotted ``path`` (so that many configs are valid)."""
    import dataclasses

    from megadistill.config import RunConfig

    node: Any = RunConfig()
    for part in path.split("."):
        node = getattr(node, part)
    if isinstance(node, bool):
        return st.booleans()
    if isinstance(node, int):
        return st.one_of(st.integers(-2, 20), st.integers(0, 10**6), st.just(node))
    if isinstance(node, float):
        return st.one_of(st.floats(0, 1), st.floats(-1e3, 1e3), st.floats(), st.just(node))
    if isinstance(node, list):
        return st.lists(st.one_of(st.floats(0, 1), st.text("abc/_", min_size=1, max_size=4)), max_size=3)
    if node is None or isinstance(node, str):
        return st.one_of(st.sampled_from(["fp32", "bf16", "online", "offline", "none", "pre", "task", "every:2",
                                          "last:1", "student", "uniform", "forward_kl", "jsd", "cosine", "linear",
                                          "mse", "masked", "all", "checkpoint", "random", "auto", "always"]),
                         st.text(max_size=6), st.none(), st.integers(1, 8))
    assert not dataclasses.is_dataclass(node)
    return values


typed_overrides = st.sampled_from(FIELD_PATHS).flatmap(
    lambda path: _typed_values(path).map(lambda v: f"{path}={_yaml_text(v)}"))

override_items = st.one_of(
    typed_overrides, typed_overrides, typed_overrides, typed_overrides,
    st.tuples(dotted_keys, values.map(_yaml_text)).map("=".join),
    st.tuples(dotted_keys, yaml_snippets).map("=".join),
    st.tuples(dotted_keys, st.text(max_size=12)).map("=".join),
    st.text(max_size=15),  # maybe no "=" at all
)


@st.composite
def override_cases(draw) -> list[str]:
    """Overrides that usually make a runnable config, plus random ones."""
    base = ["data.train_prefixes=[a]"] if draw(st.integers(0, 3)) else []
    return base + draw(st.lists(override_items, max_size=4))


@st.composite
def recipe_cases(draw) -> tuple[bytes, list[str]]:
    """A recipe file's bytes (a random nested mapping as YAML, broken YAML or random bytes) and overrides."""
    kind = draw(st.sampled_from(["typed", "typed", "typed", "mapping", "mapping", "broken", "text", "bytes"]))
    if kind == "typed":  # the fields of RunConfig with values of about the right type: often a valid recipe
        sections: dict = {"data": {"train_prefixes": ["a"]}} if draw(st.integers(0, 3)) else {}
        for path in draw(st.lists(st.sampled_from(FIELD_PATHS), max_size=6)):
            *section, name = path.split(".")
            node = sections.setdefault(section[0], {}) if section else sections
            if isinstance(node, dict):
                node[name] = draw(_typed_values(path))
        data = yaml.safe_dump(sections, allow_unicode=draw(st.booleans())).encode()
    elif kind == "mapping":
        sections = draw(st.dictionaries(st.one_of(st.sampled_from(["train", "loss", "data", "optim", "features",
                                                                   "student", "teacher", "task", "stage", "run_dir"]),
                                                  st.text(max_size=5), st.integers(), st.none()),
                                        st.one_of(st.dictionaries(st.one_of(st.sampled_from(
                                            [p.split(".")[-1] for p in FIELD_PATHS]), st.text(max_size=5)),
                                            values, max_size=4), values), max_size=4))
        data = yaml.safe_dump(sections, allow_unicode=draw(st.booleans())).encode()
    elif kind == "broken":
        good = yaml.safe_dump({"train": {"max_steps": 3}, "data": {"train_prefixes": ["a"]}})
        at = draw(st.integers(0, len(good)))
        data = (good[:at] + draw(yaml_snippets) + good[at:]).encode()
    elif kind == "text":
        data = draw(st.text(max_size=60)).encode("utf-8", "surrogatepass")
    else:
        data = draw(st.binary(max_size=60))
    return data, draw(override_cases())


def _check_load(recipe: Path | None, overrides: list[str], tmp: Path) -> str:
    from megadistill.config import RunConfig, load_config, save_config

    try:
        cfg = load_config(recipe, overrides)
    except ValueError as err:
        message = str(err)
        assert "\n" not in message and message, f"bad error message {message!r}"
        return "ValueError"
    assert isinstance(cfg, RunConfig)
    save_config(cfg, tmp / "saved.yaml")
    assert load_config(tmp / "saved.yaml") == cfg, "a valid config does not survive save_config + load_config"
    return "valid config"


def check_config_overrides(overrides: list[str]) -> str:
    """Property ``config_overrides`` (see the module docstring); returns the outcome."""
    with tempfile.TemporaryDirectory() as tmp:
        return _check_load(None, overrides, Path(tmp))


def check_config_recipe(case: tuple[bytes, list[str]]) -> str:
    """Property ``config_recipe`` (see the module docstring); returns the outcome."""
    data, overrides = case
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_bytes(data)
        return _check_load(recipe, overrides, Path(tmp))


# ------------------------------------------------------------------ the table bench/fuzz.py runs, and the CI tests

PROPERTIES: dict[str, tuple[Callable[[], st.SearchStrategy], Callable[[Any], None]]] = {
    "sources": (corpora, check_sources),
    "binarize": (binarize_cases, check_binarize),
    "index": (index_cases, check_index),
    "config_overrides": (override_cases, check_config_overrides),
    "config_recipe": (recipe_cases, check_config_recipe),
}
"""Property name -> (strategy factory, check of one example)."""


def ci_test(name: str):
    """A pytest test running property ``name`` for ``CI_EXAMPLES[name]`` examples under the CI profile."""
    strategy, check = PROPERTIES[name]

    def test(example) -> None:
        check(example)

    test.__name__ = test.__qualname__ = f"test_{name}_fuzz"
    return settings(settings.get_profile(PROFILE), max_examples=CI_EXAMPLES[name])(given(strategy())(test))


test_sources_fuzz = ci_test("sources")
test_binarize_fuzz = ci_test("binarize")
test_index_fuzz = ci_test("index")
test_config_overrides_fuzz = ci_test("config_overrides")
test_config_recipe_fuzz = ci_test("config_recipe")
