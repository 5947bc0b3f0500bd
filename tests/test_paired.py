"""Paired cross-tokenizer windows: the same text on both sides, span groups that hold identical bytes."""

import numpy as np
import pytest
import torch

from conftest import build_tiny_tokenizer, read_sib200_texts
from megadistill.data.binarize import binarize
from megadistill.data.collate import IGNORE_INDEX
from megadistill.data.indexed import IndexedDataset
from megadistill.data.offsets import token_bytes_table
from megadistill.data.packing import PackedDataset
from megadistill.data.paired import DocumentOffsets, PairedBatches, check_paired


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_tokenizer, sib200_dir):
    """Hindi dev binarized with the tiny teacher tokenizer (700 ids) and a smaller "student" one (330 ids)."""
    root = tmp_path_factory.mktemp("paired")
    student_tok = build_tiny_tokenizer(read_sib200_texts(sib200_dir, "hin_Deva")[:300], vocab_size=330)
    source = sib200_dir / "hin_Deva" / "dev.tsv"
    binarize([source], tiny_tokenizer, root / "teacher", show_progress=False)
    binarize([source], student_tok, root / "student", show_progress=False)
    return root, student_tok, tiny_tokenizer


def _batches(pair, seq_len: int = 24, teacher_prefix: str = "teacher") -> tuple[PairedBatches, list[bytes], list[bytes]]:
    root, student_tok, teacher_tok = pair
    s_sets, t_sets = [IndexedDataset(root / "student")], [IndexedDataset(root / teacher_prefix)]
    s_table, t_table = token_bytes_table(student_tok), token_bytes_table(teacher_tok)
    data = PackedDataset(s_sets, seq_len, seed=3)
    batches = PairedBatches(data, DocumentOffsets(s_sets, s_table, ["student"]), DocumentOffsets(t_sets, t_table, ["teacher"]),
                            teacher_tok.pad_token_id)
    return batches, s_table, t_table


def _group_bytes(labels: torch.Tensor, groups: torch.Tensor, table: list[bytes], count: int) -> list[bytes]:
    out = [b""] * count
    for label, group in zip(labels.flatten().tolist(), groups.flatten().tolist()):
        if group >= 0:
            out[group] += table[label]
    return out


def test_every_span_holds_the_same_bytes_on_both_sides(pair):
    """Grouped label tokens of the student and of the teacher decode to identical bytes, span by span."""
    batches, s_table, t_table = _batches(pair)
    for start in range(0, 40, 4):
        batch = batches(list(range(start, start + 4)))
        k = batch["num_groups"]
        assert k > 0
        student = _group_bytes(batch["labels"], batch["student_group"], s_table, k)
        teacher = _group_bytes(batch["teacher_labels"], batch["teacher_group"], t_table, k)
        assert student == teacher
        # Ids 0..K-1 each on both sides, rows of a group consecutive within its window.
        for side in ("student_group", "teacher_group"):
            ids = batch[side][batch[side] >= 0]
            assert set(ids.tolist()) == set(range(k))
            for row in batch[side]:
                seen = row[row >= 0].tolist()
                assert seen == sorted(seen)


def test_teacher_window_reads_the_student_window_text(pair):
    """The teacher tokens of a window decode to a substring of the student window's text (cut tokens left out)."""
    batches, s_table, t_table = _batches(pair)
    batch = batches([0, 1, 2])
    for b in range(3):
        s_bytes = b"".join(s_table[i] for i in batch["input_ids"][b].tolist() + batch["labels"][b, -1:].tolist())
        labels = batch["teacher_labels"][b]
        t_ids = batch["teacher_input_ids"][b, :1].tolist() + labels[labels != IGNORE_INDEX].tolist()
        t_bytes = b"".join(t_table[i] for i in t_ids)
        assert t_bytes and t_bytes in s_bytes
        assert len(t_bytes) >= len(s_bytes) - 64  # only the straddling tokens at the two cuts are missing


def test_document_and_position_ids_restart_per_piece(pair):
    batches, _, _ = _batches(pair, seq_len=64)
    batch = batches([5, 6])
    for side in ("", "teacher_"):
        docs, pos = batch[f"{side}document_ids"], batch[f"{side}position_ids"]
        assert docs.shape == pos.shape
        starts = torch.ones_like(docs, dtype=torch.bool)
        starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
        assert (pos[starts] == 0).all() and (pos[~starts] > 0).all()
    assert batch["teacher_input_ids"].shape == batch["teacher_labels"].shape == batch["teacher_group"].shape


def test_unpaired_documents_are_refused_with_one_line(pair, tmp_path, sib200_dir, tiny_tokenizer):
    root, student_tok, _ = pair
    with pytest.raises(ValueError, match="documents but its teacher twin"):
        train = tmp_path / "train"
        binarize([sib200_dir / "hin_Deva" / "train.tsv"], tiny_tokenizer, train, show_progress=False)
        check_paired([IndexedDataset(root / "student")], [IndexedDataset(train)], ["student"], ["train"])
    # Same number of documents, one sentence changed: refused when a window reaches it.
    lines = (sib200_dir / "hin_Deva" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    fields = lines[1].split("\t")
    fields[-1] = fields[-1] + " और"
    edited = tmp_path / "hin_Deva" / "dev.tsv"
    edited.parent.mkdir()
    edited.write_text("\n".join([lines[0], "\t".join(fields), *lines[2:]]) + "\n", encoding="utf-8")
    binarize([edited], tiny_tokenizer, root / "teacher_edited", show_progress=False)
    batches, _, _ = _batches(pair, seq_len=512, teacher_prefix="teacher_edited")
    with pytest.raises(ValueError, match="document 0 holds .* bytes of text but its teacher twin .* not binarized from"):
        for window in range(len(batches.data)):  # one of the windows holds document 0
            batches([window])


def test_identical_tokenizers_give_one_token_per_span(pair):
    """With the same tokenizer on both sides every labelled row is its own span, aligned row for row."""
    root, _, teacher_tok = pair
    sets = [IndexedDataset(root / "teacher")]
    table = token_bytes_table(teacher_tok)
    offsets = DocumentOffsets(sets, table, ["teacher"])
    batches = PairedBatches(PackedDataset(sets, 32, seed=1), offsets, offsets, teacher_tok.pad_token_id)
    batch = batches([0, 1])
    assert torch.equal(batch["input_ids"], batch["teacher_input_ids"][:, : batch["input_ids"].shape[1]])
    s = batch["student_group"]
    t = batch["teacher_group"][:, : s.shape[1]]
    assert torch.equal(s, t)
    valid = s[s >= 0]
    assert len(np.unique(valid.numpy())) == len(valid) == batch["num_groups"]
