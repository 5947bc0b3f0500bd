"""Tests for megadistill.data.merge and tools/merge_datasets.py: shards merged == one binarize run."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import load_tool
from megadistill.data.binarize import BinarizeOptions, binarize
from megadistill.data.indexed import IndexedDataset, IndexedDatasetWriter, read_provenance
from megadistill.data.inspect import validate
from megadistill.data.merge import merge_datasets



merge_tool = load_tool("merge_datasets")


@pytest.fixture(scope="module")
def shards(sib200_dir, tiny_tokenizer, tmp_path_factory):
    """hin_Deva dev and test binarized as two shards and together (with an IAST twin each)."""
    root = tmp_path_factory.mktemp("shards")
    inputs = [sib200_dir / "hin_Deva" / "dev.tsv", sib200_dir / "hin_Deva" / "test.tsv"]
    options = BinarizeOptions(romanize="iast", block_bytes=4096)
    prefixes = []
    for i, path in enumerate(inputs):
        prefix = root / f"hin_Deva.{i:02d}"
        binarize([path], tiny_tokenizer, prefix, options, show_progress=False)
        prefixes.append(prefix)
    together = root / "together" / "hin_Deva"
    together.parent.mkdir()
    binarize(inputs, tiny_tokenizer, together, options, show_progress=False)
    return root, prefixes, together


def _bytes(prefix, suffix: str) -> bytes:
    return Path(f"{prefix}{suffix}").read_bytes()


def test_merged_shards_equal_one_run_byte_for_byte(shards):
    root, prefixes, together = shards
    out = root / "merged"
    meta = merge_datasets(prefixes, out)
    assert _bytes(out, ".bin") == _bytes(together, ".bin")
    assert _bytes(out, ".idx") == _bytes(together, ".idx")
    one = read_provenance(together)
    for key in ("documents", "tokens", "characters", "bytes_utf8", "dropped", "language", "script", "tokenizer", "dtype"):
        assert meta[key] == one[key], key
    assert [{k: v for k, v in s.items() if k != "shard"} for s in meta["sources"]] == one["sources"]
    assert [s["shard"] for s in meta["sources"]] == [str(p) for p in prefixes]
    assert [m["documents"] for m in meta["merged_from"]] == [len(IndexedDataset(p)) for p in prefixes]
    assert "romanized_as" not in meta and read_provenance(out) == meta
    assert validate(out, check_ids=True) == []  # the independent reader agrees with the sidecar


def test_merged_romanized_twins_keep_the_pairing_and_sum_the_report(shards):
    root, prefixes, together = shards
    out = root / "merged.iast"
    meta = merge_datasets([f"{p}.iast" for p in prefixes], out)
    assert _bytes(out, ".bin") == _bytes(f"{together}.iast", ".bin")
    one = read_provenance(f"{together}.iast")["romanization"]
    roman = meta["romanization"]
    for key in ("unmapped_characters", "native_characters", "characters", "documents"):
        assert roman[key] == one[key], key
    assert roman["unmapped_fraction"] == pytest.approx(one["unmapped_fraction"])
    assert roman["scheme"] == "iast" and roman["paired_with"] is None


def test_refuses_another_tokenizer_and_leaves_nothing(shards, tmp_path):
    root, prefixes, _ = shards
    copies = []
    for i, prefix in enumerate(prefixes):
        copy = tmp_path / f"shard{i}"
        for suffix in (".bin", ".idx", ".json"):
            Path(f"{copy}{suffix}").write_bytes(_bytes(prefix, suffix))
        copies.append(copy)
    meta = json.loads(Path(f"{copies[1]}.json").read_text())
    meta["tokenizer"]["sha256"] = "0" * 64
    Path(f"{copies[1]}.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"shard1\.json: tokenizer"):
        merge_datasets(copies, tmp_path / "out")
    assert not list(tmp_path.glob("out*"))


def test_refuses_other_language_unless_allowed(shards, sib200_dir, tiny_tokenizer, tmp_path):
    _, prefixes, _ = shards
    ben = tmp_path / "ben_Beng"
    binarize([sib200_dir / "ben_Beng" / "dev.tsv"], tiny_tokenizer, ben, BinarizeOptions(), show_progress=False)
    with pytest.raises(ValueError, match="language is 'ben'.*--allow-mixed-languages"):
        merge_datasets([prefixes[0], ben], tmp_path / "mixed")
    meta = merge_datasets([prefixes[0], ben], tmp_path / "mixed", allow_mixed_languages=True)
    assert meta["language"] is None and meta["languages"] == ["ben_Beng", "hin_Deva"]
    assert meta["documents"] == len(IndexedDataset(prefixes[0])) + len(IndexedDataset(ben))


def test_refuses_shards_framed_differently(shards, tmp_path):
    _, prefixes, _ = shards
    copy = tmp_path / "encoder_shard"
    for suffix in (".bin", ".idx"):
        Path(f"{copy}{suffix}").write_bytes(_bytes(prefixes[1], suffix))
    meta = read_provenance(prefixes[1])
    meta["framing"] = {"kind": "encoder", "prefix_ids": [2], "suffix_ids": [1]}
    Path(f"{copy}.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"encoder_shard\.json: framing is .*'encoder'.* but .*hin_Deva\.00\.json has"):
        merge_datasets([prefixes[0], copy], tmp_path / "out")
    legacy = tmp_path / "legacy_shard"  # provenance from before "framing" existed: decoder, merges with new shards
    for suffix in (".bin", ".idx"):
        Path(f"{legacy}{suffix}").write_bytes(_bytes(prefixes[1], suffix))
    del meta["framing"]
    Path(f"{legacy}.json").write_text(json.dumps(meta))
    merged = merge_datasets([legacy, prefixes[0]], tmp_path / "out")
    assert merged["framing"] == {"kind": "decoder", "prefix_ids": [2], "suffix_ids": [1]}


def test_failed_merge_keeps_the_previous_output(shards, tmp_path):
    root, prefixes, _ = shards
    out = tmp_path / "out"
    merge_datasets(prefixes, out)
    before = {s: _bytes(out, s) for s in (".bin", ".idx", ".json")}
    bad = tmp_path / "bad"
    for suffix in (".bin", ".idx", ".json"):
        Path(f"{bad}{suffix}").write_bytes(_bytes(prefixes[1], suffix))
    with open(f"{bad}.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match=r"bad\.bin"):
        merge_datasets([prefixes[0], bad], out)
    assert {s: _bytes(out, s) for s in (".bin", ".idx", ".json")} == before
    assert not list(tmp_path.glob("*.tmp"))


def test_sidecar_from_another_run_is_refused(shards, tmp_path):
    _, prefixes, _ = shards
    stale = tmp_path / "stale"
    Path(f"{stale}.bin").write_bytes(_bytes(prefixes[0], ".bin"))
    Path(f"{stale}.idx").write_bytes(_bytes(prefixes[0], ".idx"))
    Path(f"{stale}.json").write_bytes(_bytes(prefixes[1], ".json"))  # counts of the other shard
    with pytest.raises(ValueError, match=r"stale\.json says .* documents"):
        merge_datasets([prefixes[1], stale], tmp_path / "out")


def test_output_may_not_be_an_input(shards):
    _, prefixes, _ = shards
    with pytest.raises(ValueError, match="also an input"):
        merge_datasets(prefixes, prefixes[0])
    with pytest.raises(ValueError, match="at least two"):
        merge_datasets(prefixes[:1], prefixes[0].parent / "x")


def test_add_dataset_refuses_sentence_split_files(tmp_path):
    """A Megatron file with two sequences in one document cannot be merged without losing that boundary."""
    with IndexedDatasetWriter(tmp_path / "split", np.uint16) as writer:
        writer.add_document([1, 2, 3])
        writer.add_document([4, 5])
    idx = Path(tmp_path / "split.idx")
    raw = idx.read_bytes()
    header = struct.Struct("<9sQBQQ")
    magic, version, code, count, _ = header.unpack(raw[: header.size])
    body = raw[header.size: header.size + 12 * count]
    idx.write_bytes(header.pack(magic, version, code, count, 2) + body + np.array([0, 2], "<i8").tobytes())
    with IndexedDatasetWriter(tmp_path / "out", np.uint16) as writer:
        with pytest.raises(ValueError, match="1 documents hold 2 sequences"):
            writer.add_dataset(IndexedDataset(tmp_path / "split"))
        writer.add_document([7])
    assert IndexedDataset(tmp_path / "out")[0].tolist() == [7]


def test_cli_glob_merges_in_sorted_order(shards, tmp_path, capsys):
    root, prefixes, together = shards
    out = tmp_path / "cli"
    assert merge_tool.main(["--input-glob", str(root / "hin_Deva.0?"), "--output-prefix", str(out)]) == 0
    assert "2 shards" in capsys.readouterr().out
    assert _bytes(out, ".bin") == _bytes(together, ".bin")
    suffixed = tmp_path / "suffixed"  # file names given instead of prefixes name the same shards
    assert merge_tool.main(["--input", f"{prefixes[0]}.idx", f"{prefixes[1]}.json", "--output-prefix", str(suffixed)]) == 0
    assert _bytes(suffixed, ".bin") == _bytes(together, ".bin")
    assert merge_tool.main(["--input-glob", str(root / "nothing*"), "--output-prefix", str(out)]) == 2
    assert "no .idx file matches" in capsys.readouterr().err


def test_literal_special_tokens_are_summed_over_shards():
    from megadistill.data.merge import merged_provenance

    def meta(count, docs, kept):
        return {"language": "hin", "script": "Deva", "documents": 1, "tokens": 1,
                "special_tokens_in_text": {"count": count, "documents": docs, "examples": [f"x:{count}"], "literal_kept_as_text": kept}}

    merged = merged_provenance([Path("a"), Path("b"), Path("c")], [meta(2, 1, True), meta(3, 2, False), {"documents": 1, "tokens": 1}])
    assert merged["special_tokens_in_text"] == {"count": 5, "documents": 3, "examples": ["x:2", "x:3"], "literal_kept_as_text": False}
