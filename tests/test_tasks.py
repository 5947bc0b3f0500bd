"""Task data (SIB-200 tsv, jsonl, HF datasets), the task sampler and batches, class-logit KD and the logit cache."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megadistill.data.tasks import (LabelSet, TaskBatches, encode_texts, load_split, read_jsonl, read_labels, read_tsv,
                                    task_eval_indices, task_train_indices)
from megadistill.losses.classify import class_logit_kd
from megadistill.objectives.classify import ClassifyObjective, ClassifySpec, classify_metrics
from megadistill.objectives.spec import LossNormalizer
from megadistill.teachers import TeacherSignal

LABELS = ("science/technology", "travel", "politics", "sports", "health", "entertainment", "geography")


def write_tsv(path, rows, header="index_id\tcategory\ttext"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header] + ["\t".join(r) for r in rows]) + "\n", encoding="utf-8")


def test_sib200_split_reads_every_row_with_labels_txt_order(sib200_dir):
    split = load_split(sib200_dir, ["hin_Deva", "sat_Olck"], "train")
    assert len(split) == 2 * 701
    assert split.label_set.names == tuple(read_labels(sib200_dir / "hin_Deva" / "labels.txt").names)
    assert split.languages[0] == "hin_Deva" and split.languages[-1] == "sat_Olck"
    # The first Hindi row of train.tsv is index 431, geography.
    assert split.ids[0] == "431" and split.label_set.names[split.labels[0]] == "geography"
    assert len(split.select_language("sat_Olck")) == 701


def test_missing_label_column_names_the_file(tmp_path):
    path = tmp_path / "xx" / "train.tsv"
    write_tsv(path, [("1", "some text")], header="index_id\ttext")
    with pytest.raises(ValueError, match=r"train\.tsv:1: missing column\(s\) \['category'\]"):
        read_tsv(path, LabelSet(LABELS))


def test_unknown_label_names_file_line_and_label_file(tmp_path):
    (tmp_path / "xx").mkdir()
    (tmp_path / "xx" / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    write_tsv(tmp_path / "xx" / "train.tsv", [("1", "travel", "ok"), ("2", "cooking", "bad")])
    with pytest.raises(ValueError, match=r"train\.tsv:3 \(category\): label 'cooking' is not in .*labels\.txt"):
        load_split(tmp_path, ["xx"], "train")


def test_empty_text_is_refused(tmp_path):
    write_tsv(tmp_path / "t.tsv", [("1", "travel", "  ")])
    with pytest.raises(ValueError, match=r"t\.tsv:2 \(category\): field 'text' is empty"):
        read_tsv(tmp_path / "t.tsv", LabelSet(LABELS))


def test_label_sets_that_differ_between_languages_are_refused(tmp_path):
    for lang, labels in (("aa", LABELS), ("bb", LABELS[:-1])):
        (tmp_path / lang).mkdir()
        (tmp_path / lang / "labels.txt").write_text("\n".join(labels), encoding="utf-8")
        write_tsv(tmp_path / lang / "train.tsv", [("1", "travel", "text")])
    with pytest.raises(ValueError, match="label sets differ"):
        load_split(tmp_path, ["aa", "bb"], "train")


def test_jsonl_labels_from_train_and_unknown_dev_label(tmp_path):
    lang = tmp_path / "xx"
    lang.mkdir()
    (lang / "train.jsonl").write_text('{"text": "a b", "label": "pos"}\n{"text": "c", "label": "neg"}\n', encoding="utf-8")
    (lang / "dev.jsonl").write_text('{"text": "d", "label": "neu"}\n', encoding="utf-8")
    train = load_split(tmp_path, ["xx"], "train")
    assert train.label_set.names == ("neg", "pos") and train.labels.tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"dev\.jsonl:1 \(label\): label 'neu'"):
        load_split(tmp_path, ["xx"], "dev")
    (lang / "test.jsonl").write_text('{"label": "pos"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"test\.jsonl:1: missing field 'text'"):
        read_jsonl(lang / "test.jsonl", train.label_set)


def test_hf_datasets_split_with_class_label(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    DatasetDict({"train": Dataset.from_dict({"text": ["x", "y", "z"], "label": [1, 0, 1]}, features=features),
                 "validation": Dataset.from_dict({"text": ["w"], "label": [0]}, features=features)}).save_to_disk(tmp_path / "hf")
    dev = load_split(tmp_path / "hf", ["any"], "dev")
    assert dev.label_set.names == ("neg", "pos") and dev.texts == ["w"] and dev.labels.tolist() == [0]


def test_train_indices_are_epoch_permutations_and_resume_exactly():
    n, world, mbs = 10, 2, 3
    full = task_train_indices(0, 0, world, mbs, n, seed=7)
    other = task_train_indices(0, 1, world, mbs, n, seed=7)
    steps = [next(full) + next(other) for _ in range(10)]  # 60 global samples = 6 epochs
    flat = [i for step in steps for i in step]
    for epoch in range(6):
        assert sorted(flat[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert flat[:n] != flat[n:2 * n]  # a new order each epoch
    resumed = task_train_indices(4 * world * mbs, 0, world, mbs, n, seed=7)
    assert next(resumed) == steps[4][:mbs]


def test_eval_indices_cover_every_example_once():
    got = [i for rank in range(3) for b in task_eval_indices(10, rank, 3, 2) for i in b]
    assert sorted(i for i in got if i >= 0) == list(range(10))
    assert len({len(task_eval_indices(10, r, 3, 2)) for r in range(3)}) == 1


def test_batches_pad_right_and_ignore_padding_slots(tiny_tokenizer):
    texts = ["नमस्ते दुनिया", "एक"]
    encoded = encode_texts(texts, tiny_tokenizer, 64)
    batch = TaskBatches(encoded, np.array([3, 5]), tiny_tokenizer.pad_token_id, encoded, 0)([1, 0, -1])
    assert batch["labels"].tolist() == [5, 3, -100]
    assert batch["attention_mask"].sum(1).tolist() == [len(encoded.ids[1]), len(encoded.ids[0]), len(encoded.ids[0])]
    assert batch["input_ids"][0, len(encoded.ids[1]):].eq(tiny_tokenizer.pad_token_id).all()
    assert batch["samples"] == 2 and batch["teacher_input_ids"].shape == batch["input_ids"].shape


def test_truncation_keeps_count_and_length(tiny_tokenizer):
    encoded = encode_texts(["शब्द " * 50, "छोटा"], tiny_tokenizer, 8)
    assert encoded.truncated == 1 and len(encoded.ids[0]) == 8 and len(encoded.ids[1]) < 8


def test_kl_and_mse_equal_hand_computation():
    s = torch.tensor([[1.0, 0.0, -1.0]])
    t = torch.tensor([[0.0, 2.0, 0.0]])
    T = 2.0
    p = [math.exp(x / T) for x in (0.0, 2.0, 0.0)]
    p = [x / sum(p) for x in p]
    q = [math.exp(x / T) for x in (1.0, 0.0, -1.0)]
    q = [x / sum(q) for x in q]
    kl = T * T * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert class_logit_kd(s, t, "kl", T).item() == pytest.approx(kl, rel=1e-6)
    assert class_logit_kd(s, t, "mse").item() == pytest.approx((1 + 4 + 1) / 3, rel=1e-6)
    assert class_logit_kd(t, t, "kl", T).item() == pytest.approx(0.0, abs=1e-7)


class FixedLogits(torch.nn.Module):
    """A 'classifier' whose logits are a trainable table row per input id (to check the objective's arithmetic)."""

    def __init__(self, table):
        super().__init__()
        self.emb = torch.nn.Embedding.from_pretrained(table, freeze=False)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.emb(input_ids[:, 0])})()


def test_objective_is_alpha_ce_plus_one_minus_alpha_kd_over_the_global_count():
    table = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    teacher = torch.tensor([[0.0, 3.0, 0.0], [1.0, 1.0, 1.0], [5.0, 5.0, 5.0]])
    batch = {"input_ids": torch.tensor([[0], [1], [0]]), "attention_mask": torch.ones(3, 1, dtype=torch.long),
             "labels": torch.tensor([0, 2, -100])}
    objective = ClassifyObjective(FixedLogits(table), ClassifySpec(3, alpha=0.2, kd_loss="kl", temperature=2.0))
    assert objective.counts(batch) == {"ce_tokens": 2, "kd_tokens": 2}
    out = objective(batch, TeacherSignal(logits=teacher[:2]), 0, LossNormalizer(ce_tokens=4.0, kd_tokens=4.0))
    student = table[[0, 1]]
    ce = F.cross_entropy(student, torch.tensor([0, 2]), reduction="sum")
    kd = class_logit_kd(student, teacher[:2], "kl", 2.0).sum()
    assert out["loss"].item() == pytest.approx((0.2 * ce / 4 + 0.8 * kd / 4).item(), rel=1e-6)
    metrics = classify_metrics({k: v.item() for k, v in out["stats"].items()})
    assert metrics["accuracy"] == pytest.approx(50.0) and metrics["examples"] == 2
    # alpha = 1: the teacher's logits change nothing.
    plain = ClassifyObjective(FixedLogits(table), ClassifySpec(3, alpha=1.0))
    a = plain(batch, TeacherSignal(logits=teacher[:2]), 0, LossNormalizer(2.0, 2.0))["loss"]
    b = plain(batch, TeacherSignal(), 0, LossNormalizer(2.0, 2.0))["loss"]
    assert a.item() == b.item() == pytest.approx((ce / 2).item(), rel=1e-6)
    with pytest.raises(ValueError, match="labelled rows"):
        objective(batch, TeacherSignal(logits=teacher), 0, LossNormalizer(2.0, 2.0))


def test_logit_cache_round_trip_and_refuses_other_data(tmp_path, sib200_dir):
    from megadistill.task_cache import TaskLogitCache, write_task_cache

    split = load_split(sib200_dir, ["hin_Deva"], "dev")
    logits = np.random.default_rng(0).normal(size=(len(split), 7)).astype(np.float32)
    write_task_cache(tmp_path / "c", logits, split, teacher="t", max_len_tokens=64)
    cache = TaskLogitCache(tmp_path / "c")
    cache.check_compatible(split, 64)
    got = cache.logits([3, -1, 0])
    assert torch.equal(got[0], torch.from_numpy(logits[3])) and got[1].eq(0).all()
    with pytest.raises(ValueError, match="task.max_len_tokens=32"):
        cache.check_compatible(split, 32)
    with pytest.raises(ValueError, match="built from other examples"):
        cache.check_compatible(load_split(sib200_dir, ["ben_Beng"], "dev"), 64)
    with pytest.raises(ValueError, match="shape"):
        write_task_cache(tmp_path / "d", logits[:-1], split, teacher="t", max_len_tokens=64)
    assert not (tmp_path / "d").exists()
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["languages"] == ["hin_Deva"] and meta["examples"] == 99


def test_length_grouping_keeps_epochs_complete_and_batches_homogeneous():
    from megadistill.data.tasks import epoch_order

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=400)
    order = epoch_order(400, 3, 0, lengths, global_batch=8, group_batches=10)
    assert sorted(order.tolist()) == list(range(400))
    spread = lambda o: np.mean([np.ptp(lengths[o[i:i + 8]]) for i in range(0, 400, 8)])  # noqa: E731
    assert spread(order) < 0.25 * spread(epoch_order(400, 3, 0))
    assert not np.array_equal(order, epoch_order(400, 3, 1, lengths, 8, 10))
    # A resumed run reads the same grouped batches.
    a = task_train_indices(0, 1, 2, 4, 400, 3, lengths)
    steps = [next(a) for _ in range(60)]
    assert next(task_train_indices(57 * 8, 1, 2, 4, 400, 3, lengths)) == steps[57]


def test_literal_special_tokens_in_a_sentence_stay_text(tiny_tokenizer, bert_tokenizer):
    """A sentence that contains "<eos>" / "[SEP]" as characters gets no control id in its middle."""
    for tok, literal in ((tiny_tokenizer, tiny_tokenizer.eos_token), (bert_tokenizer, bert_tokenizer.sep_token)):
        control = set(tok.all_special_ids)
        row = encode_texts([f"the end {literal} is near"], tok, max_len_tokens=64).ids[0]
        inner = [int(i) for i in row[1:-1]]
        assert not control & set(inner), (literal, inner)


@pytest.mark.parametrize("content, message", [
    (b"index_id\tcategory\ttext\n1\ta\tgo\xffod\n", r"t\.tsv:2: not UTF-8 text"),
    (b"index_id\tcategory\ttext\n1\ta\tgo\x00od\n", r"t\.tsv:2 \(category\): field 'text' contains a NUL byte"),
])
def test_bad_bytes_in_a_tsv_name_the_line(tmp_path, content, message):
    (tmp_path / "t.tsv").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_tsv(tmp_path / "t.tsv", LabelSet(("a", "b"), "labels.txt"))


@pytest.mark.parametrize("line, message", [
    ('{"n": ' + "[" * 100000 + "]" * 100000 + ', "text": "x", "label": "a"}', r"t\.jsonl:2: JSON nested too deeply"),
    ('{"n": ' + "9" * 5000 + ', "text": "x", "label": "a"}', r"t\.jsonl:2: unreadable JSON"),
    ('{"text": "x", "label": {"a": 1}}', r"t\.jsonl:2 \(label\): field 'label' must be a label name .*got dict"),
])
def test_hostile_jsonl_lines_are_one_line_errors(tmp_path, line, message):
    ok = json.dumps({"text": "x\u2028y", "label": "a"}, ensure_ascii=False)  # U+2028 is not a line break in .jsonl
    (tmp_path / "t.jsonl").write_text(ok + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_jsonl(tmp_path / "t.jsonl", LabelSet(("a", "b"), "labels.txt"))


def test_line_separator_inside_a_jsonl_string_is_text(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "x\u2028y", "label": "a"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_jsonl(tmp_path / "t.jsonl", LabelSet(("a", "b"), "labels.txt")).texts == ["x\u2028y"]
