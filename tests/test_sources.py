"""Tests for megadistill.data.sources: tsv/txt/jsonl readers, errors, NFC, language codes."""

from __future__ import annotations

import json
import unicodedata

import pytest

from megadistill.data.sources import Document, SourceStats, language_from_path, parse_block, read_blocks, read_documents

# "क़" written decomposed (KA + NUKTA) and "é" as e + combining acute: NFC must compose the latter
# and keep the Devanagari nukta form that NFC excludes from composition.
DECOMPOSED = "caf" + "e\u0301" + " \u0915\u093c"


def write_bytes(path, data: bytes):
    path.write_bytes(data)
    return path


def test_tsv_reads_text_column_without_quoting(tmp_path):
    path = write_bytes(tmp_path / "x.tsv", 'id\tcategory\ttext\n1\tsports\tsaid "hi\n2\tx\t"quoted" text\r\n'.encode())
    stats = SourceStats()
    docs = list(read_documents(path, stats=stats))
    assert docs == [Document('said "hi', str(path), 2), Document('"quoted" text', str(path), 3)]
    assert (stats.documents, stats.lines_read, stats.characters) == (2, 3, 8 + 13)


def test_tsv_matches_sib200_reference(sib200_dir):
    from conftest import read_sib200_texts

    texts = [d.text for d in read_documents(sib200_dir / "hin_Deva" / "dev.tsv")]
    assert texts == [unicodedata.normalize("NFC", t) for t in read_sib200_texts(sib200_dir, "hin_Deva", "dev")]
    assert len(texts) == 99


def test_tsv_without_text_column(tmp_path):
    path = write_bytes(tmp_path / "x.tsv", b"id\tsentence\n1\thello\n")
    with pytest.raises(ValueError, match=r"x\.tsv: no 'text' column"):
        list(read_documents(path))


def test_tsv_row_with_wrong_field_count_is_dropped(tmp_path):
    path = write_bytes(tmp_path / "x.tsv", b"id\ttext\n1\ta\tb\n2\tok\n")
    stats = SourceStats()
    assert [d.text for d in read_documents(path, stats=stats)] == ["ok"]
    assert stats.dropped == {"bad_tsv_row": 1}


def test_txt_groups_sentences_by_blank_lines(tmp_path):
    content = "\n\nएक।\nदो।\n\n\n  \nthree\n\nfour\nfive\n"
    path = write_bytes(tmp_path / "x.txt", content.encode())
    stats = SourceStats()
    docs = list(read_documents(path, stats=stats))
    assert [(d.text, d.line) for d in docs] == [("एक।\nदो।", 3), ("three", 8), ("four\nfive", 10)]
    assert stats.lines_read == 11 and stats.documents == 3
    assert stats.characters == sum(len(d.text) for d in docs)


def test_jsonl_reads_text_field_and_counts_problems(tmp_path):
    lines = [
        json.dumps({"text": "पहला", "id": 1}, ensure_ascii=False),
        "{not json",
        json.dumps({"body": "x"}),
        json.dumps({"text": "   "}),
        "",
        json.dumps({"text": "second\nline"}),
        '{"text": "\\ud800"}',
    ]
    path = write_bytes(tmp_path / "x.jsonl", "\n".join(lines).encode())
    stats = SourceStats()
    docs = list(read_documents(path, stats=stats))
    assert [(d.text, d.line) for d in docs] == [("पहला", 1), ("second\nline", 6)]
    assert stats.dropped == {"bad_json": 1, "missing_text_field": 1, "empty_document": 1, "invalid_utf8": 1}


@pytest.mark.parametrize(
    "name, content, bad_line",
    [
        ("x.txt", b"good one\n\xff\xfebad\ngood two\n", 2),
        ("x.tsv", b"id\ttext\n1\tfine\n2\tbro\xc3ken\n3\talso fine\n", 3),
        ("x.jsonl", b'{"text": "fine"}\n{"text": "bad \xe0\xa4"}\n', 2),
    ],
)
def test_invalid_utf8_skip_and_fail(tmp_path, name, content, bad_line):
    path = write_bytes(tmp_path / name, content)
    stats = SourceStats()
    docs = list(read_documents(path, on_error="skip", stats=stats))
    assert stats.dropped == {"invalid_utf8": 1}
    assert all("bad" not in d.text and "bro" not in d.text for d in docs)
    with pytest.raises(ValueError, match=rf"{name}:{bad_line}: invalid UTF-8 .*--on-error skip"):
        list(read_documents(path, on_error="fail"))


def test_txt_bad_line_does_not_split_document(tmp_path):
    path = write_bytes(tmp_path / "x.txt", b"\xffbad\ngood one\ngood two\n")
    docs = list(read_documents(path))
    assert [(d.text, d.line) for d in docs] == [("good one\ngood two", 2)]


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        read_documents(tmp_path / "nope.txt")  # raised at call time, before iteration
    with pytest.raises(ValueError, match=r"empty\.tsv: empty file"):
        read_documents(write_bytes(tmp_path / "empty.tsv", b""))
    with pytest.raises(ValueError, match=r"blank\.txt: no documents"):
        list(read_documents(write_bytes(tmp_path / "blank.txt", b"\n  \n\n")))
    with pytest.raises(ValueError, match=r"header\.tsv: no documents"):
        list(read_documents(write_bytes(tmp_path / "header.tsv", b"id\ttext\n")))


def test_unknown_format_and_on_error(tmp_path):
    path = write_bytes(tmp_path / "x.csv", b"text\nhello\n")
    with pytest.raises(ValueError, match=r"x\.csv: unknown corpus format"):
        read_documents(path)
    assert [d.text for d in read_documents(path, fmt="txt")] == ["text\nhello"]
    with pytest.raises(ValueError, match="on_error"):
        read_documents(path, fmt="txt", on_error="ignore")


def test_nfc_normalization(tmp_path):
    assert unicodedata.normalize("NFC", DECOMPOSED) != DECOMPOSED
    for name, content in [
        ("x.txt", DECOMPOSED + "\n"),
        ("x.tsv", "text\n" + DECOMPOSED + "\n"),
        ("x.jsonl", json.dumps({"text": DECOMPOSED}) + "\n"),
    ]:
        [doc] = read_documents(write_bytes(tmp_path / name, content.encode()))
        assert doc.text == unicodedata.normalize("NFC", DECOMPOSED)
        assert "caf\u00e9" in doc.text


def test_bom_before_tsv_header(tmp_path):
    path = write_bytes(tmp_path / "x.tsv", "\ufefftext\nhello\n".encode())
    assert [d.text for d in read_documents(path)] == ["hello"]


def test_stats_accumulate_across_files(tmp_path):
    stats = SourceStats()
    for i in range(2):
        list(read_documents(write_bytes(tmp_path / f"{i}.txt", b"a\n\nbb\n"), stats=stats))
    assert (stats.documents, stats.characters, stats.lines_read) == (4, 6, 6)


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/data/sib200/hin_Deva/train.tsv", ("hin", "Deva")),
        ("corpora/sat_Olck.txt", ("sat", "Olck")),
        ("corpora/eng_Latn/hin_Deva.iast.jsonl", ("hin", "Deva")),
        ("/data/indiccorp/hi.txt", ("hin", "Deva")),  # IndicCorp v2 file names
        ("/data/indiccorp/sat.txt.xz", ("sat", "Olck")),
        ("/data/sangraha/verified/ori/data-0.parquet", ("ory", "Orya")),  # Sangraha folders
        ("/data/sangraha/verified/asm/hi.parquet", ("hin", "Deva")),  # innermost component first
        ("/data/ben/kas_Deva.txt", ("kas", "Deva")),  # a FLORES code beats a bare one
        ("/data/HIN_DEVA/x.txt", (None, None)),
        ("/data/history/notes.txt", (None, None)),  # only whole components are codes
    ],
)
def test_language_from_path(path, expected):
    assert language_from_path(path) == expected


# --- compressed, parquet, datasets, framing -------------------------------------------------

IC_TEXT = "पहला वाक्य।\nदूसरा वाक्य।\n\nতৃতীয় বাক্য।\n\n\nfourth\n"
IC_DOCS = [("पहला वाक्य।\nदूसरा वाक्य।", 1), ("তৃতীয় বাক্য।", 4), ("fourth", 7)]


@pytest.mark.parametrize("suffix, opener", [(".gz", "gzip"), (".xz", "lzma"), (".bz2", "bz2")])
def test_compressed_txt_round_trip(tmp_path, suffix, opener):
    module = __import__(opener)
    path = tmp_path / f"hin_Deva.txt{suffix}"
    with module.open(path, "wb") as f:
        f.write(IC_TEXT.encode())
    docs = list(read_documents(path))
    assert [(d.text, d.line) for d in docs] == IC_DOCS
    assert language_from_path(path) == ("hin", "Deva")


def test_truncated_gzip_is_named(tmp_path):
    import gzip

    data = gzip.compress(("line\n" * 20000).encode())
    path = write_bytes(tmp_path / "x.txt.gz", data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"x\.txt\.gz:\d+: cannot read compressed data .*truncated"):
        list(read_documents(path))


def test_parquet_keeps_doc_id_and_type(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"doc_id": ["a", "b", "c", "d"], "type": ["verified", "synthetic", "verified", "verified"],
                      "text": ["एक", None, "दो", "  "]})
    path = tmp_path / "sangraha.parquet"
    pq.write_table(table, path, row_group_size=2)
    stats = SourceStats()
    docs = list(read_documents(path, stats=stats))
    assert [(d.text, d.line, d.doc_id, d.kind) for d in docs] == [("एक", 1, "a", "verified"), ("दो", 3, "c", "verified")]
    assert stats.dropped == {"missing_text_field": 1, "empty_document": 1}
    assert stats.kinds == {"verified": 2} and stats.lines_read == 4
    with pytest.raises(ValueError, match=r"sangraha\.parquet: no 'body' column"):
        list(read_documents(path, text_field="body"))
    bad = write_bytes(tmp_path / "bad.parquet", b"not parquet at all")
    with pytest.raises(ValueError, match=r"bad\.parquet: not a readable parquet file"):
        list(read_documents(bad))


def test_hf_dataset_from_disk(tmp_path):
    import datasets

    ds = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["alpha", "", "beta"], "label": [0, 1, 2]}),
        "validation": datasets.Dataset.from_dict({"text": ["gamma"], "label": [3]}),
    })
    ds.save_to_disk(tmp_path / "hin_Deva")
    spec = f"hf:{tmp_path / 'hin_Deva'}"
    assert [(d.text, d.line) for d in read_documents(spec)] == [("alpha", 1), ("beta", 3)]
    assert [d.text for d in read_documents(spec, split="validation")] == ["gamma"]
    assert language_from_path(spec) == ("hin", "Deva")
    with pytest.raises(ValueError, match="no split 'test'"):
        list(read_documents(spec, split="test"))


def test_nul_bytes_and_overlong_lines(tmp_path):
    long_line = b"x" * (10 * 2**20)  # a single 10 MB line
    path = write_bytes(tmp_path / "x.txt", b"fine one\n" + long_line + b"\nbin\x00ary\nfine two\n")
    stats = SourceStats()
    docs = list(read_documents(path, stats=stats, max_line_bytes=2**20))
    assert [d.text for d in docs] == ["fine one\nfine two"]
    assert stats.dropped == {"line_too_long": 1, "nul_byte": 1} and stats.lines_read == 4
    with pytest.raises(ValueError, match=r"x\.txt:2: line of 10,485,761 bytes exceeds max_line_bytes"):
        list(read_documents(path, on_error="fail", max_line_bytes=2**20))
    with pytest.raises(ValueError, match=r"x\.txt:3: NUL byte at column 4"):
        list(read_documents(path, on_error="fail", max_line_bytes=16 * 2**20))


@pytest.mark.parametrize("name", ["x.txt", "x.jsonl", "x.tsv"])
def test_blocks_never_split_documents(tmp_path, name):
    """Small blocks give the same documents (and line numbers) as one big block."""
    rng = __import__("random").Random(0)
    docs = [" ".join(rng.choices(["क", "ख", "ga", "घ"], k=rng.randint(1, 30))) for _ in range(300)]
    if name.endswith(".txt"):
        body = "\n\n".join(d.replace(" ", "\n", 2) for d in docs) + "\n"
    elif name.endswith(".jsonl"):
        body = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    else:
        body = "id\ttext\n" + "".join(f"{i}\t{d}\n" for i, d in enumerate(docs))
    path = write_bytes(tmp_path / name, body.encode())
    whole = [(d.text, d.line) for b in read_blocks(path, block_bytes=2**30) for d in parse_block(b, SourceStats())]
    blocks = list(read_blocks(path, block_bytes=64))
    pieces = [(d.text, d.line) for b in blocks for d in parse_block(b, SourceStats())]
    assert len(blocks) > 50 and pieces == whole and len(whole) == 300


# Regression tests for what fuzzing the readers found (issue 15).


def test_corrupt_gzip_stream_is_a_value_error(tmp_path):
    """A damaged deflate stream raises zlib.error (not an OSError) inside gzip: reported as file:line."""
    import gzip

    data = gzip.compress(b'{"text": "x"}\n{"text": "y"}\n' * 3)
    damaged = data[:14] + bytes([data[14] ^ 0x55]) + data[15:]
    path = write_bytes(tmp_path / "x.jsonl.gz", damaged)
    with pytest.raises(ValueError, match=r"x\.jsonl\.gz:1: cannot read compressed data \(Error -3 .*truncated or corrupt"):
        list(read_documents(path))
    path = write_bytes(tmp_path / "y.jsonl.gz",
                       b"\x1f\x8b\x08\x00\x17z\x0fk\x02\xff\xabV*\xa9(Q\xb2RPR\xaa\xe5\xaa\xc6\xccN\xa5\x84\x03\x00t\x0fe^d\x00\x00\x00")
    with pytest.raises(ValueError, match=r"y\.jsonl\.gz:\d+: cannot read compressed data"):
        list(read_documents(path))


def test_jsonl_too_deep_or_too_long_numbers_are_bad_json(tmp_path):
    """json.loads raises RecursionError for deep nesting and a plain ValueError for > 4300-digit ints."""
    deep = b'{"text": "x", "n": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    big = b'{"text": "y", "n": ' + b"7" * 5000 + b"}"
    path = write_bytes(tmp_path / "x.jsonl", b'{"text": "ok"}\n' + deep + b"\n" + big + b"\n")
    stats = SourceStats()
    assert [d.text for d in read_documents(path, stats=stats)] == ["ok"]
    assert stats.dropped == {"bad_json": 2}
    with pytest.raises(ValueError, match=r"x\.jsonl:2: JSON nested too deeply to parse; rerun with --on-error skip"):
        list(read_documents(path, on_error="fail"))
    path = write_bytes(tmp_path / "y.jsonl", b'{"text": "ok"}\n' + big + b"\n")
    with pytest.raises(ValueError, match=r"y\.jsonl:2: unreadable JSON \(Exceeds the limit \(4300 digits\)"):
        list(read_documents(path, on_error="fail"))
