"""Tests for megadistill.data.adopt and tools/adopt_dataset.py: Megatron-LM pairs (no .json) made usable.

A Megatron-LM pair is written with the project's own writer (byte compatible with Megatron's
``_IndexWriter``) and its ``.json`` deleted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import load_tool
from megadistill.data.adopt import adopt_dataset
from megadistill.data.binarize import binarize
from megadistill.data.indexed import IndexedDatasetWriter, open_checked_datasets, read_provenance
from megadistill.data.inspect import validate
from megadistill.data.merge import merge_datasets

SAME_AS_BINARIZE = ("format", "tokenizer", "bos_id", "eos_id", "add_bos", "framing", "language", "script",
                    "documents", "tokens", "dtype")


adopt_tool = load_tool("adopt_dataset")


@pytest.fixture(scope="module")
def tok_dir(tiny_tokenizer, tmp_path_factory):
    """``(tokenizer, directory)``: the tiny tokenizer saved alone and loaded back, as the CLI loads it."""
    path = tmp_path_factory.mktemp("tok")
    tiny_tokenizer.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path), path


def megatron_pair(prefix: Path, docs) -> Path:
    """``docs`` written as a bare ``.bin``/``.idx`` pair (what Megatron-LM's preprocess_data.py leaves)."""
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for doc in docs:
            writer.add_document(doc)
    return prefix


@pytest.fixture
def binarized(tmp_path, tok_dir, sib200_dir):
    """``(prefix, provenance)`` of SIB-200 Hindi dev binarized, its ``.json`` then deleted."""
    tok, _ = tok_dir
    prefix = tmp_path / "hin_Deva"
    meta = binarize([sib200_dir / "hin_Deva" / "dev.tsv"], tok, prefix, show_progress=False)
    Path(f"{prefix}.json").unlink()
    return prefix, meta


def test_adopted_provenance_is_what_binarize_wrote(binarized, tok_dir):
    prefix, original = binarized
    tok, _ = tok_dir
    meta, warnings = adopt_dataset(prefix, tok)
    assert warnings == []
    assert {k: meta[k] for k in SAME_AS_BINARIZE} == {k: original[k] for k in SAME_AS_BINARIZE}
    assert meta["adopted"] is True and meta["adopted_from"] == str(prefix) and meta["characters"] is None
    assert read_provenance(prefix) == meta
    assert validate(prefix, check_ids=True) == []
    assert len(open_checked_datasets([prefix], tok)[0]) == original["documents"]  # train accepts it


def test_adopted_shard_merges_with_a_binarized_one(binarized, tok_dir, sib200_dir, tmp_path):
    prefix, original = binarized
    tok, _ = tok_dir
    with pytest.raises(FileNotFoundError, match=f"shard 0: dataset {prefix} has no provenance"):
        merge_datasets([prefix, prefix], tmp_path / "never")
    adopt_dataset(prefix, tok)
    other = tmp_path / "b" / "hin_Deva"
    binarize([sib200_dir / "hin_Deva" / "test.tsv"], tok, other, show_progress=False)
    merged = merge_datasets([prefix, other], tmp_path / "merged")
    assert merged["documents"] == original["documents"] + read_provenance(other)["documents"]
    assert merged["characters"] is None  # the adopted shard's text is unknown: no made-up sum


def test_megatron_documents_without_bos_record_the_frame_they_carry(tmp_path, tok_dir):
    tok, _ = tok_dir
    texts = ["hello world", "नमस्ते दुनिया"]
    prefix = megatron_pair(tmp_path / "eod", [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]
                                              for t in texts])  # preprocess_data.py --append-eod
    meta, warnings = adopt_dataset(prefix, tok)
    assert meta["framing"] == {"kind": "decoder", "prefix_ids": [], "suffix_ids": [tok.eos_token_id]}
    assert meta["add_bos"] is False
    assert len(warnings) == 1 and f"prefix ids [{tok.bos_token_id}]" in warnings[0]
    assert validate(prefix, check_ids=True) == []


def test_ids_beyond_the_vocabulary_are_refused_and_nothing_is_written(tmp_path, tok_dir):
    tok, _ = tok_dir
    prefix = megatron_pair(tmp_path / "big", [[2, 10, 1], [2, len(tok) + 3, 1]])
    with pytest.raises(ValueError, match=rf"big.bin: byte 8: token id {len(tok) + 3} outside the vocabulary"):
        adopt_dataset(prefix, tok, chunk_tokens=2)
    assert not Path(f"{prefix}.json").exists()


def test_inconsistent_pair_and_existing_provenance_are_refused(tmp_path, tok_dir):
    tok, _ = tok_dir
    prefix = megatron_pair(tmp_path / "cut", [[2, 10, 1], [2, 11, 1]])
    with open(f"{prefix}.bin", "r+b") as f:
        f.truncate(6)
    with pytest.raises(ValueError, match="truncated .bin.*cannot be adopted"):
        adopt_dataset(prefix, tok)
    ok = megatron_pair(tmp_path / "ok", [[2, 10, 1]])
    adopt_dataset(ok, tok)
    with pytest.raises(ValueError, match="ok.json exists already.*--force"):
        adopt_dataset(ok, tok)
    assert adopt_dataset(ok, tok, force=True)[0]["adopted"]


def test_cli_adopts_and_refuses_in_one_line(tmp_path, tok_dir, capsys):
    tok, path = tok_dir
    prefix = megatron_pair(tmp_path / "hin_Deva", [tok("नमस्ते").input_ids + [tok.eos_token_id]])
    assert adopt_tool.main([f"{prefix}.idx", "--tokenizer", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"adopt_dataset: wrote {prefix}.json: 1 documents")
    meta = json.loads(Path(f"{prefix}.json").read_text())
    assert (meta["language"], meta["script"], meta["tokenizer"]["name"]) == ("hin", "Deva", str(path))
    assert adopt_tool.main([str(prefix), "--tokenizer", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "exists already" in err
    assert adopt_tool.main([str(tmp_path / "nothing"), "--tokenizer", str(path)]) == 2
    assert f"dataset {tmp_path / 'nothing'} not found (no" in capsys.readouterr().err
