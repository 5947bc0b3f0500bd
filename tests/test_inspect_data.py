"""Tests for megadistill.data.inspect and tools/inspect_data.py: report, raw-byte validation of corrupt pairs, JSON, decoding, CLI."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

from megadistill.data.indexed import IndexedDatasetWriter, tokenizer_sha256, write_provenance
from megadistill.data.inspect import describe, validate
from tools.inspect_data import main

DOCS = [[2, 10, 11, 1], [2, 500, 1], [7], [2, 650, 3, 4, 5, 1]]
# Offsets in the .idx of DOCS (n = 4 sequences, d = 5 document indices).
SIZES_AT, POINTERS_AT, DOCS_AT, IDX_BYTES = 34, 34 + 4 * 4, 34 + 12 * 4, 34 + 12 * 4 + 8 * 5
BIN_BYTES = 14 * 2  # 14 uint16 tokens


def make_dataset(prefix, docs=DOCS, vocab_size=700, sha256="0" * 64, characters=40):
    """Write ``docs`` as uint16 MMIDIDX plus a provenance like tools/binarize.py writes."""
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for doc in docs:
            writer.add_document(doc)
    write_provenance(prefix, {
        "format": "megatron-mmidindex-v1",
        "tokenizer": {"name": "tiny-test-tok", "sha256": sha256, "vocab_size": vocab_size},
        "language": "hin", "script": "Deva", "romanization": {"scheme": "iast"},
        "sources": [{"path": "dev.tsv", "documents": len(docs)}],
        "documents": len(docs), "tokens": sum(map(len, docs)), "characters": characters,
        "dtype": "uint16", "dropped": {"empty": 2}, "created": "2025-01-01T00:00:00+00:00",
    })
    return prefix


@pytest.fixture
def dataset(tmp_path):
    """The valid 4-document dataset ``DOCS`` at ``tmp_path/c``."""
    return make_dataset(tmp_path / "c")


def patch(path, offset, data):
    """Overwrite bytes of ``path`` in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def truncate(path, size):
    """Cut ``path`` to ``size`` bytes."""
    with open(path, "r+b") as f:
        f.truncate(size)


def append(path, data):
    """Append bytes to ``path``."""
    with open(path, "ab") as f:
        f.write(data)


def test_valid_dataset_report(dataset, capsys):
    assert validate(dataset) == []
    assert main([str(dataset)]) == 0
    out = capsys.readouterr().out
    assert "sequences   4, documents 4" in out
    assert "uint16 (Megatron code 8)" in out
    assert "4 documents, 14 tokens, 40 characters" in out
    assert "min 1, mean 3.5, median 3.5, max 6" in out
    assert "per char    0.350" in out
    assert "tiny-test-tok" in out and "hin, script Deva, romanization iast" in out and "dropped     empty 2" in out
    assert out.rstrip().endswith("valid")


# (name, mutation(prefix), file suffix named, substrings of the problem)
CORRUPTIONS = [
    ("truncated idx", lambda p: truncate(f"{p}.idx", 100), ".idx", ["byte 100", "truncated .idx", "promises 122"]),
    ("truncated bin", lambda p: truncate(f"{p}.bin", BIN_BYTES - 2), ".bin", ["byte 26", "truncated .bin", "sequence 3"]),
    ("bad magic", lambda p: patch(f"{p}.idx", 0, b"XX"), ".idx", ["byte 0", "bad magic"]),
    ("unknown dtype", lambda p: patch(f"{p}.idx", 17, bytes([9])), ".idx", ["byte 17", "unknown dtype code 9"]),
    ("wrong version", lambda p: patch(f"{p}.idx", 9, struct.pack("<Q", 2)), ".idx", ["byte 9", "version 2"]),
    ("edited pointer", lambda p: patch(f"{p}.idx", POINTERS_AT + 8 * 2, struct.pack("<q", 99)), ".idx",
     ["byte 66", "pointer of sequence 2 is 99, expected 14"]),
    ("doc indices decrease", lambda p: patch(f"{p}.idx", DOCS_AT + 8 * 2, struct.pack("<q", 0)), ".idx",
     ["byte 98", "document indices decrease: index 2 is 0"]),
    ("doc indices end", lambda p: patch(f"{p}.idx", DOCS_AT + 8 * 4, struct.pack("<q", 3)), ".idx",
     ["byte 114", "expected the sequence count 4"]),
    ("negative length", lambda p: patch(f"{p}.idx", SIZES_AT + 4, struct.pack("<i", -3)), ".idx",
     ["byte 38", "sequence 1 has negative length -3"]),
    ("trailing idx bytes", lambda p: append(f"{p}.idx", b"abc"), ".idx", ["byte 122", "3 trailing bytes"]),
    ("trailing bin bytes", lambda p: append(f"{p}.bin", b"\0\0"), ".bin", ["byte 28", "2 trailing bytes"]),
]


@pytest.mark.parametrize("mutate,suffix,expected", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_corruption_is_reported_with_file_and_offset(dataset, capsys, mutate, suffix, expected):
    mutate(dataset)
    problems = validate(dataset)
    matching = [p for p in problems if p.startswith(f"{dataset}{suffix}:") and all(s in p for s in expected)]
    assert matching, problems
    assert main([str(dataset)]) == 1
    out = capsys.readouterr().out
    assert "INVALID" in out and matching[0] in out


def test_edited_pointer_also_breaks_monotonicity(dataset):
    patch(f"{dataset}.idx", POINTERS_AT + 8 * 3, struct.pack("<q", 2))
    problems = validate(dataset)
    assert any("byte 74" in p and "not monotonic: sequence 3" in p for p in problems), problems


def test_every_problem_is_reported(dataset):
    patch(f"{dataset}.idx", 0, b"XX")
    patch(f"{dataset}.idx", 17, bytes([9]))
    append(f"{dataset}.idx", b"abc")
    problems = validate(dataset)
    assert len(problems) >= 3
    assert any("bad magic" in p for p in problems) and any("dtype code 9" in p for p in problems)
    assert any("trailing" in p for p in problems)


def test_provenance_disagreement(tmp_path):
    prefix = make_dataset(tmp_path / "c")
    meta = json.loads((tmp_path / "c.json").read_text())
    meta.update(tokens=99, documents=3)
    write_provenance(prefix, meta)
    problems = validate(prefix)
    assert any(p.startswith(f"{prefix}.json:") and '"tokens" is 99' in p and "14" in p for p in problems)
    assert any('"documents" is 3' in p for p in problems)


def test_missing_provenance_is_a_warning_with_the_adopt_hint(dataset, capsys):
    (dataset.parent / "c.json").unlink()  # a pair as Megatron-LM writes it: valid, no provenance
    assert validate(dataset) == []
    assert main([str(dataset)]) == 0
    out = capsys.readouterr().out
    assert "INVALID" not in out and out.rstrip().endswith("valid")
    assert f"warning: {dataset}.json: no provenance" in out
    assert f"python tools/adopt_dataset.py {dataset} --tokenizer" in out


def test_missing_provenance_check_ids_uses_the_tokenizer_vocabulary(tmp_path, tiny_tok_dir):
    tok, _ = tiny_tok_dir
    prefix = _text_dataset(tmp_path / "m", tok)
    (tmp_path / "m.json").unlink()
    assert describe(prefix, tok, check_ids=True)["valid"]
    small = make_dataset(tmp_path / "big_ids", docs=[[2, len(tok) + 5, 1]])
    (tmp_path / "big_ids.json").unlink()
    desc = describe(small, tok, check_ids=True)
    assert not desc["valid"] and f"token id {len(tok) + 5} outside the vocabulary" in desc["problems"][0]
    assert "token ids not checked" in " ".join(describe(small, check_ids=True)["warnings"])


@pytest.mark.parametrize("chunk", [3, 1 << 20])
def test_check_ids_finds_first_id_beyond_vocab(tmp_path, chunk):
    prefix = make_dataset(tmp_path / "c", vocab_size=600)
    assert validate(prefix) == []  # ids are only scanned on request
    problems = validate(prefix, check_ids=True, chunk_tokens=chunk)
    assert len(problems) == 1, problems
    # 650 is token 1 of sequence 3, global token 9, byte 18; it is the only bad id.
    assert problems[0].startswith(f"{prefix}.bin: byte 18: token id 650")
    assert "sequence 3, token 1" in problems[0] and "1 bad ids" in problems[0]


def test_check_ids_cli(tmp_path, capsys):
    prefix = make_dataset(tmp_path / "c", vocab_size=600)
    assert main([str(prefix)]) == 0
    assert main([str(prefix), "--check-ids"]) == 1
    assert "token id 650" in capsys.readouterr().out
    assert main([str(make_dataset(tmp_path / "ok")), "--check-ids"]) == 0


def test_json_output_parses(dataset, tmp_path, capsys):
    bad = tmp_path / "bad"
    for suffix in (".bin", ".idx", ".json"):
        shutil.copy(f"{dataset}{suffix}", f"{bad}{suffix}")
    truncate(f"{bad}.bin", 4)
    assert main([str(dataset), str(bad), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert [d["valid"] for d in result] == [True, False]
    good = result[0]
    assert good["index"] == {"dtype": "uint16", "dtype_code": 8, "version": 1, "sequences": 4, "documents": 4,
                             "idx_bytes": IDX_BYTES, "bin_bytes": BIN_BYTES}
    assert good["tokens"]["total"] == 14 and good["tokens"]["median"] == 3.5
    assert good["provenance"]["language"] == "hin" and good["problems"] == []
    assert any(f"{bad}.bin: byte 4" in p for p in result[1]["problems"])


def test_suffix_in_argument_is_accepted(dataset, capsys):
    assert main([f"{dataset}.idx"]) == 0
    assert f"== {dataset} ==" in capsys.readouterr().out


def test_missing_file_exits_2(tmp_path, dataset, capsys):
    (dataset.parent / "c.bin").unlink()
    assert main([str(dataset)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("inspect_data: error:") and f"{dataset}.bin" in err
    assert len(err.strip().splitlines()) == 1
    assert main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    nothing = tmp_path / "nothing"
    assert err.strip() == (f"inspect_data: error: dataset {nothing} not found (no {nothing}.bin/.idx): create it with "
                           f"python tools/binarize.py --input ... --output-prefix {nothing}")


TEXTS = ["hello world, this is the first document", "second text here", "a third one"]


@pytest.fixture(scope="module")
def tiny_tok_dir(tmp_path_factory):
    """``(tokenizer, directory it is saved in)``: a tiny BPE trained on ``TEXTS``."""
    from conftest import build_tiny_tokenizer

    tok = build_tiny_tokenizer(TEXTS * 5, vocab_size=300)
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)  # tokenizer files only: load_tokenizer accepts such a directory
    return tok, path


def _text_dataset(prefix, tok, sha256=None):
    docs = [tok(t).input_ids + [tok.eos_token_id] for t in TEXTS]
    chars = sum(map(len, TEXTS))
    return make_dataset(prefix, docs, vocab_size=len(tok), sha256=sha256 or tokenizer_sha256(tok), characters=chars)


def test_decode_prints_original_text(tmp_path, tiny_tok_dir, capsys):
    pytest.importorskip("megadistill.models.teacher")
    tok, tok_dir = tiny_tok_dir
    prefix = _text_dataset(tmp_path / "t", tok)
    assert main([str(prefix), "--tokenizer", str(tok_dir), "--docs", "2", "--check-ids"]) == 0
    captured = capsys.readouterr()
    assert TEXTS[0] in captured.out and TEXTS[1] in captured.out and TEXTS[2] not in captured.out
    assert "warning" not in captured.out + captured.err
    assert main([str(prefix), "--tokenizer", str(tok_dir), "--max-chars", "5"]) == 0
    out = capsys.readouterr().out
    assert "hello…" in out and TEXTS[0] not in out


def test_describe_warns_on_tokenizer_hash_mismatch(tmp_path, tiny_tok_dir):
    tok, _ = tiny_tok_dir
    prefix = _text_dataset(tmp_path / "t", tok, sha256="f" * 64)
    desc = describe(prefix, tokenizer=tok, docs=1)
    assert desc["valid"] and [d["text"] for d in desc["documents"]] == TEXTS[:1]
    assert any("differs from the provenance" in w for w in desc["warnings"])
    json.dumps(desc)


def test_tokenizer_load_failure_exits_2(dataset, tmp_path, capsys):
    pytest.importorskip("megadistill.models.teacher")
    empty = tmp_path / "not_a_tokenizer"
    empty.mkdir()
    assert main([str(dataset), "--tokenizer", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("inspect_data: error:") and len(err.strip().splitlines()) == 1


def test_check_ids_ignores_trailing_bytes(dataset):
    append(f"{dataset}.bin", b"\xff\xff")
    problems = validate(dataset, check_ids=True, chunk_tokens=5)
    assert len(problems) == 1 and "trailing bytes" in problems[0], problems


def test_empty_dataset_is_valid(tmp_path, capsys):
    prefix = make_dataset(tmp_path / "empty", docs=[])
    assert validate(prefix, check_ids=True) == []
    assert main([str(prefix)]) == 0
    assert "sequences   0, documents 0" in capsys.readouterr().out


def test_check_ids_finds_a_document_without_its_framing(tmp_path):
    prefix = make_dataset(tmp_path / "f", docs=[[2, 10, 3], [2, 11, 12, 3], [2, 13, 4]])
    meta = json.loads((tmp_path / "f.json").read_text())
    write_provenance(prefix, dict(meta, framing={"kind": "encoder", "prefix_ids": [2], "suffix_ids": [3]}))
    assert validate(prefix) == []  # the framing is only scanned with check_ids, like the ids
    problems = validate(prefix, check_ids=True)
    assert len(problems) == 1 and problems[0].startswith(f"{prefix}.bin: byte 14: sequence 2 is not framed"), problems
    assert "1 sequences in all" in problems[0]


def test_malformed_framing_record_is_a_provenance_problem(dataset, capsys):
    meta = json.loads((dataset.parent / "c.json").read_text())
    write_provenance(dataset, dict(meta, framing={"kind": "encoder", "prefix_ids": "CLS", "suffix_ids": []}))
    problems = validate(dataset, check_ids=True)
    assert any(p.startswith(f"{dataset}.json: framing.prefix_ids") for p in problems), problems
    assert main([str(dataset)]) == 1
    assert "framing     encoder CLS text []" in capsys.readouterr().out
