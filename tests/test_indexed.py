"""Tests for megadistill.data.indexed: MMIDIDX round trip, byte format, validation, atomicity, provenance."""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest

from megadistill.data.indexed import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetWriter,
    check_tokenizer_matches,
    read_provenance,
    token_dtype_for_vocab,
    tokenizer_sha256,
    write_provenance,
)

DOCS = [[2, 10, 11, 1], [2, 500, 1], [7], [2, 65000, 3, 4, 5, 1]]


def write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in docs:
            writer.add_document(doc)
    return prefix


def parse_mmidindex(prefix):
    """Independent reader written from the format spec (struct only, no numpy, no megadistill)."""
    with open(f"{prefix}.idx", "rb") as f:
        raw = f.read()
    magic, version, code, n, d = struct.unpack_from("<9sQBQQ", raw, 0)
    pos = 9 + 8 + 1 + 8 + 8
    lengths = list(struct.unpack_from(f"<{n}i", raw, pos))
    pos += 4 * n
    pointers = list(struct.unpack_from(f"<{n}q", raw, pos))
    pos += 8 * n
    doc_index = list(struct.unpack_from(f"<{d}q", raw, pos))
    pos += 8 * d
    with open(f"{prefix}.bin", "rb") as f:
        data = f.read()
    return dict(magic=magic, version=version, code=code, n=n, d=d, lengths=lengths,
                pointers=pointers, doc_index=doc_index, idx_size=len(raw), end=pos, bin=data)


def test_round_trip_ids_and_boundaries(tmp_path):
    ds = IndexedDataset(write(tmp_path / "c", DOCS))
    assert len(ds) == len(DOCS)
    assert [d.tolist() for d in ds] == DOCS
    assert ds.sizes.dtype == np.int32 and ds.sizes.tolist() == [4, 3, 1, 6]
    assert ds.dtype == np.uint16 and ds[0].dtype == np.uint16
    assert ds.num_tokens == 14
    assert ds.pointers.tolist() == [0, 8, 14, 16]
    assert ds.document_indices.tolist() == [0, 1, 2, 3, 4]
    assert ds[-1].tolist() == DOCS[-1]
    assert ds.get(3, offset=1, length=2).tolist() == [65000, 3]
    assert ds.get(0, offset=2).tolist() == [11, 1]


def test_get_out_of_range(tmp_path):
    ds = IndexedDataset(write(tmp_path / "c", DOCS))
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(IndexError):
        ds.get(0, offset=3, length=2)


def test_pickle_reopens_instead_of_copying(tmp_path):
    ds = IndexedDataset(write(tmp_path / "c", DOCS))
    blob = pickle.dumps(ds)
    assert len(blob) < 500  # the path, not the tokens
    assert pickle.loads(blob)[3].tolist() == DOCS[3]


def test_dtype_rule():
    assert token_dtype_for_vocab(700) == np.uint16
    assert token_dtype_for_vocab(65499) == np.uint16
    assert token_dtype_for_vocab(65500) == np.int32
    assert token_dtype_for_vocab(262144) == np.int32
    # Megatron's table, not NeoX's or DeepSpeed data_sampling's.
    assert DTYPE_CODES[8] == np.uint16 and DTYPE_CODES[4] == np.int32
    assert DTYPE_CODES[6] == np.float64 and DTYPE_CODES[7] == np.float32


def test_large_ids_round_trip_in_int32(tmp_path):
    dtype = token_dtype_for_vocab(262144)
    ds = IndexedDataset(write(tmp_path / "big", [[2, 70000, 262143, 1]], dtype))
    assert ds.dtype == np.int32
    assert ds[0].tolist() == [2, 70000, 262143, 1]


@pytest.mark.parametrize("bad", [[2, 65536], [-1, 5], [], [[1, 2]], [1.5]])
def test_writer_rejects_ids_that_do_not_fit(tmp_path, bad):
    with pytest.raises(ValueError):
        with IndexedDatasetWriter(tmp_path / "c", np.uint16) as writer:
            writer.add_document(bad)
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_non_megatron_dtype(tmp_path):
    with pytest.raises(ValueError, match="uint32"):
        IndexedDatasetWriter(tmp_path / "c", np.uint32)


def test_golden_format_parsed_independently(tmp_path):
    prefix = write(tmp_path / "g", DOCS)
    f = parse_mmidindex(prefix)
    assert f["magic"] == b"MMIDIDX\x00\x00"
    assert f["version"] == 1
    assert f["code"] == 8  # uint16 in Megatron's table
    assert f["n"] == 4 and f["d"] == 5
    assert f["lengths"] == [4, 3, 1, 6]
    assert f["pointers"] == [0, 8, 14, 16]
    assert f["doc_index"] == [0, 1, 2, 3, 4]
    assert f["end"] == f["idx_size"] == 34 + 4 * 4 + 8 * 4 + 8 * 5
    tokens = list(struct.unpack(f"<{len(f['bin']) // 2}H", f["bin"]))
    assert tokens == [t for doc in DOCS for t in doc]


def test_golden_int32_code(tmp_path):
    f = parse_mmidindex(write(tmp_path / "g", [[70000]], np.int32))
    assert f["code"] == 4
    assert struct.unpack("<i", f["bin"]) == (70000,)


def test_empty_dataset_is_valid(tmp_path):
    ds = IndexedDataset(write(tmp_path / "e", []))
    assert len(ds) == 0 and ds.num_tokens == 0


def test_missing_bin_names_file(tmp_path):
    prefix = write(tmp_path / "c", DOCS)
    (tmp_path / "c.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"c\.bin.*binarize"):
        IndexedDataset(prefix)


def test_missing_idx_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.idx"):
        IndexedDataset(tmp_path / "nothing")


def test_wrong_magic(tmp_path):
    prefix = write(tmp_path / "c", DOCS)
    raw = bytearray((tmp_path / "c.idx").read_bytes())
    raw[:7] = b"NOTMEGA"
    (tmp_path / "c.idx").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"c\.idx: byte 0: bad magic .*not a Megatron MMIDIDX index"):
        IndexedDataset(prefix)


@pytest.mark.parametrize("keep", [20, 60])
def test_truncated_idx(tmp_path, keep):
    prefix = write(tmp_path / "c", DOCS)
    raw = (tmp_path / "c.idx").read_bytes()
    (tmp_path / "c.idx").write_bytes(raw[:keep])
    with pytest.raises(ValueError, match=r"c\.idx: (byte \d+: )?truncated \.idx"):
        IndexedDataset(prefix)


def test_unknown_dtype_code_and_version(tmp_path):
    prefix = write(tmp_path / "c", DOCS)
    raw = bytearray((tmp_path / "c.idx").read_bytes())
    raw[17] = 9
    (tmp_path / "c.idx").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="unknown dtype code 9"):
        IndexedDataset(prefix)
    raw[17] = 8
    raw[9:17] = struct.pack("<Q", 2)
    (tmp_path / "c.idx").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="unsupported MMIDIDX version 2"):
        IndexedDataset(prefix)


def test_bin_size_mismatch(tmp_path):
    prefix = write(tmp_path / "c", DOCS)
    with open(tmp_path / "c.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(ValueError, match=r"c\.bin: byte 28: 2 trailing bytes; \.bin has 30 bytes but the \.idx describes 28"):
        IndexedDataset(prefix)


def test_inconsistent_pointers(tmp_path):
    prefix = write(tmp_path / "c", DOCS)
    raw = bytearray((tmp_path / "c.idx").read_bytes())
    pointer_1 = 34 + 4 * 4 + 8
    raw[pointer_1:pointer_1 + 8] = struct.pack("<q", 6)
    (tmp_path / "c.idx").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="pointers are not consistent"):
        IndexedDataset(prefix)


def test_exception_in_writer_keeps_previous_output(tmp_path):
    prefix = write(tmp_path / "c", DOCS)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_document([9, 9, 9])
            raise RuntimeError("boom")
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # no .tmp left, old pair byte-identical
    assert IndexedDataset(prefix)[0].tolist() == DOCS[0]


def test_exception_without_previous_output_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with IndexedDatasetWriter(tmp_path / "c", np.uint16) as writer:
            writer.add_document([1, 2])
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_provenance_round_trip(tmp_path):
    meta = {"language": "hin", "note": "हिन्दी", "counts": {"tokens": 3}}
    path = write_provenance(tmp_path / "c", meta)
    assert path.name == "c.json"
    assert read_provenance(tmp_path / "c") == meta
    assert "हिन्दी" in path.read_text(encoding="utf-8")  # UTF-8, not \u escapes
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]
    with pytest.raises(FileNotFoundError, match=r"dataset .*other not found \(no .*other\.bin/\.idx\)"):
        read_provenance(tmp_path / "other")
    write(tmp_path / "megatron", DOCS)  # a pair without provenance, as Megatron-LM writes it
    with pytest.raises(FileNotFoundError, match=r"megatron\.json: no provenance; .*tools/adopt_dataset\.py"):
        read_provenance(tmp_path / "megatron")


def test_tokenizer_hash_is_stable_and_discriminates(tiny_tokenizer, sib200_dir, tmp_path):
    from conftest import build_tiny_tokenizer, read_sib200_texts

    digest = tokenizer_sha256(tiny_tokenizer)
    assert len(digest) == 64
    import copy

    from megadistill.data.indexed import _tokenizer_sha256

    mutated = copy.deepcopy(tiny_tokenizer)
    mutated(["नमस्ते"], truncation=True, max_length=4)  # mutates backend truncation state
    assert _tokenizer_sha256(mutated) == digest  # uncached: the canonical form ignores truncation
    assert tokenizer_sha256(mutated) == digest
    mutated.add_tokens(["<new_token>"])  # the remembered hash must not survive a vocabulary change
    assert tokenizer_sha256(mutated) == _tokenizer_sha256(mutated) != digest
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    assert tokenizer_sha256(AutoTokenizer.from_pretrained(tmp_path / "tok")) == digest
    other = build_tiny_tokenizer(read_sib200_texts(sib200_dir, "hin_Deva")[:200], vocab_size=500)
    assert tokenizer_sha256(other) != digest


def test_check_tokenizer_matches(tiny_tokenizer, sib200_dir, tmp_path):
    from conftest import build_tiny_tokenizer, read_sib200_texts

    write_provenance(tmp_path / "c", {"tokenizer": {"sha256": tokenizer_sha256(tiny_tokenizer)}})
    check_tokenizer_matches(tmp_path / "c", tiny_tokenizer)
    other = build_tiny_tokenizer(read_sib200_texts(sib200_dir, "hin_Deva")[:200], vocab_size=500)
    with pytest.raises(ValueError, match=r"re-binarize with the teacher tokenizer") as err:
        check_tokenizer_matches(tmp_path / "c", other)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "c") in message
    assert tokenizer_sha256(tiny_tokenizer)[:12] in message and tokenizer_sha256(other)[:12] in message
    (tmp_path / "c.json").write_text(json.dumps({"tokenizer": {}}))
    with pytest.raises(ValueError, match="no tokenizer.sha256"):
        check_tokenizer_matches(tmp_path / "c", tiny_tokenizer)


def test_atomic_text_files_get_ordinary_permissions(tmp_path):
    """Sidecars are written through mkstemp (mode 0600); they must end up readable like open(..., "w") files."""
    import os

    from megadistill.files import atomic_write_text

    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "meta.json", "{}\n")
        plain = tmp_path / "plain.json"
        plain.write_text("{}\n")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o644


def test_validate_index_reports_every_problem_and_the_reader_the_first(tmp_path):
    from megadistill.data.indexed import validate_index

    prefix = write(tmp_path / "c", DOCS)
    report = validate_index(prefix)
    assert report.valid and report.raw.count == 4 and report.raw.sizes.tolist() == [4, 3, 1, 6] and report.bin_bytes == 28
    raw = bytearray((tmp_path / "c.idx").read_bytes())
    raw[17] = 9  # unknown dtype code
    raw[34 + 4:34 + 8] = struct.pack("<i", -3)  # negative length of sequence 1
    (tmp_path / "c.idx").write_bytes(bytes(raw) + b"xyz")  # and trailing bytes
    problems = validate_index(prefix).problems
    assert len(problems) == 3, problems
    assert all(p.startswith(f"{prefix}.idx: byte ") for p in problems)
    with pytest.raises(ValueError, match=r"byte 17: unknown dtype code 9 .*3 problem\(s\) in all.*inspect_data\.py"):
        IndexedDataset(prefix)


def _framed_dataset(prefix, framing=None, **meta):
    """DOCS with a provenance carrying ``framing`` (a dict, or None for none) plus ``meta``."""
    write(prefix, DOCS)
    record = {"tokenizer": {"sha256": "0" * 64}, **meta}
    if framing is not None:
        record["framing"] = framing
    write_provenance(prefix, record)
    return prefix


def test_read_framing_of_old_and_new_provenance(tmp_path):
    from megadistill.data.framing import Framing
    from megadistill.data.indexed import read_framing

    old = _framed_dataset(tmp_path / "old", bos_id=2, eos_id=1, add_bos=True)  # written before "framing" existed
    assert read_framing(old) == Framing("decoder", (2,), (1,))
    qwen_like = _framed_dataset(tmp_path / "q", bos_id=None, eos_id=7, add_bos=False)
    assert read_framing(qwen_like) == Framing("decoder", (), (7,))
    new = _framed_dataset(tmp_path / "new", {"kind": "encoder", "prefix_ids": [2], "suffix_ids": [3]})
    assert read_framing(IndexedDataset(new)) == Framing("encoder", (2,), (3,))
    for bad, field in (({"kind": "seq2seq", "prefix_ids": [], "suffix_ids": []}, "framing.kind"),
                       ({"kind": "encoder", "prefix_ids": [2], "suffix_ids": "3"}, "framing.suffix_ids")):
        with pytest.raises(ValueError, match=rf"bad\.json: {field}"):
            read_framing(_framed_dataset(tmp_path / "bad", bad))


def test_open_checked_datasets_accepts_one_framing_per_run(tmp_path, monkeypatch):
    import megadistill.data.indexed as indexed

    monkeypatch.setattr(indexed, "tokenizer_sha256", lambda tokenizer: "0" * 64)
    encoder = {"kind": "encoder", "prefix_ids": [2], "suffix_ids": [3]}
    a, b = _framed_dataset(tmp_path / "a", encoder), _framed_dataset(tmp_path / "b", encoder)
    assert [len(ds) for ds in indexed.open_checked_datasets([a, b], tokenizer=None, framing_kind="encoder")] == [4, 4]
    decoder = _framed_dataset(tmp_path / "d", bos_id=2, eos_id=1, add_bos=True)
    with pytest.raises(ValueError, match=r"d\.json: framing .* differs from .*a\.json"):
        indexed.open_checked_datasets([a, decoder], tokenizer=None)
    with pytest.raises(ValueError, match=r"d\.json: documents are framed for decoder models .* needs encoder framing"):
        indexed.open_checked_datasets([decoder], tokenizer=None, framing_kind="encoder")


# Regression tests for what fuzzing the reader found (issue 15).


@pytest.mark.parametrize("dtype, code", [(np.uint16, 3), (np.int32, 7), (np.int64, 6), (np.uint8, 2)])
def test_same_width_dtype_code_is_caught_by_the_provenance(tmp_path, monkeypatch, dtype, code):
    """A dtype code changed to another dtype of the same width keeps every length consistent, so the
    pair alone looks valid (tokens are reinterpreted); the provenance's dtype catches it."""
    import megadistill.data.indexed as indexed

    monkeypatch.setattr(indexed, "tokenizer_sha256", lambda tokenizer: "0" * 64)
    docs = [[2, 200, 1], [2, 100, 5, 1]]
    prefix = write(tmp_path / "c", docs, dtype)
    write_provenance(prefix, {"tokenizer": {"sha256": "0" * 64}, "dtype": np.dtype(dtype).name, "documents": 2,
                              "tokens": 7})
    (ds,) = indexed.open_checked_datasets([prefix], tokenizer=None)
    assert [d.tolist() for d in ds] == docs
    raw = bytearray((tmp_path / "c.idx").read_bytes())
    raw[17] = code
    (tmp_path / "c.idx").write_bytes(bytes(raw))
    assert IndexedDataset(prefix).dtype == DTYPE_CODES[code]  # consistent bytes: the reader cannot tell
    with pytest.raises(ValueError, match=rf'c\.json: "dtype" is \'{np.dtype(dtype).name}\' but .*c\.idx holds '
                                         rf"'{DTYPE_CODES[code].name}'; the \.idx header is damaged"):
        indexed.open_checked_datasets([prefix], tokenizer=None)


def test_provenance_counts_must_match_the_index(tmp_path, monkeypatch):
    import megadistill.data.indexed as indexed

    monkeypatch.setattr(indexed, "tokenizer_sha256", lambda tokenizer: "0" * 64)
    prefix = write(tmp_path / "c", DOCS)
    write_provenance(prefix, {"tokenizer": {"sha256": "0" * 64}, "documents": 3, "tokens": 14})
    with pytest.raises(ValueError, match=r'c\.json: "documents" is 3 but .*c\.idx holds 4'):
        indexed.open_checked_datasets([prefix], tokenizer=None)
    write_provenance(prefix, {"tokenizer": {"sha256": "0" * 64}, "documents": 4, "tokens": 15})
    with pytest.raises(ValueError, match=r'c\.json: "tokens" is 15 but .*c\.idx holds 14'):
        indexed.open_checked_datasets([prefix], tokenizer=None)


def test_writer_leaves_no_temp_files_when_a_rename_or_a_close_fails(tmp_path, monkeypatch):
    import errno
    import os

    writer = IndexedDatasetWriter(tmp_path / "r", np.uint16)
    writer.add_document([1, 2, 3])
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(".idx"):
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        writer.finalize()
    monkeypatch.undo()
    assert not list(tmp_path.glob("*.tmp"))
    writer = IndexedDatasetWriter(tmp_path / "a", np.uint16)
    writer.add_document([1, 2, 3])

    class FullDisk:
        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    writer._bin.close()
    writer._bin = FullDisk()
    writer.abort()
    assert not list(tmp_path.glob("a.*"))


def test_float_datasets_are_not_token_ids(tmp_path, monkeypatch):
    """Megatron's table has float codes (6 float64, 7 float32): a consistent float pair is refused for training."""
    import megadistill.data.indexed as indexed

    monkeypatch.setattr(indexed, "tokenizer_sha256", lambda tokenizer: "0" * 64)
    prefix = write(tmp_path / "f", [[2, 200, 1]], np.int32)
    raw = bytearray((tmp_path / "f.idx").read_bytes())
    raw[17] = 7  # float32: same width as int32, so the pair stays consistent
    (tmp_path / "f.idx").write_bytes(bytes(raw))
    write_provenance(prefix, {"tokenizer": {"sha256": "0" * 64}, "dtype": "float32", "documents": 1, "tokens": 3})
    with pytest.raises(ValueError, match=r"f\.idx: dtype float32 holds no token ids"):
        indexed.open_checked_datasets([prefix], tokenizer=None)
