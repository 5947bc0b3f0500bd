"""Packed windows cover the token stream exactly; the rank split resumes without repeats or gaps."""

import numpy as np
import pytest
import torch

from megadistill.data.collate import collate_clm
from megadistill.data.packing import PackedDataset
from megadistill.data.sampler import micro_batch_indices


def docs(n=20, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(5, 100, size=int(rng.integers(3, 30))) for _ in range(n)]


def test_unshuffled_windows_tile_the_stream():
    corpus = docs()
    stream = np.concatenate(corpus)
    packed = PackedDataset([corpus], seq_len_tokens=16, shuffle=False)
    assert len(packed) == (len(stream) - 1) // 16
    for i in range(len(packed)):
        np.testing.assert_array_equal(packed[i], stream[i * 16 : i * 16 + 17])
    with pytest.raises(IndexError):
        packed[len(packed)]


def test_shuffled_epoch_is_a_permutation_of_documents_and_deterministic():
    corpus = docs()
    a = PackedDataset([corpus], seq_len_tokens=8, seed=3)
    b = PackedDataset([corpus], seq_len_tokens=8, seed=3)
    first = [a[i] for i in range(len(a))]
    for i in range(len(a)):
        np.testing.assert_array_equal(first[i], b[i])
    # Same windows as the unshuffled tiling of that epoch's document order, visited in another order.
    order, starts, windows = a._epoch_layout(0)
    stream = np.concatenate([corpus[k] for k in order])
    tiles = [stream[i * 8 : i * 8 + 9] for i in range(len(a))]
    for i in range(len(a)):
        np.testing.assert_array_equal(first[i], tiles[windows[i]])
    assert sorted(windows.tolist()) == list(range(len(a))) and windows.tolist() != list(range(len(a)))
    # A later epoch uses another document order.
    second = np.concatenate([a[len(a) + i] for i in range(len(a))])
    assert not np.array_equal(np.concatenate(first), second)


def test_too_little_data():
    with pytest.raises(ValueError, match="fewer than seq_len_tokens"):
        PackedDataset([[np.arange(5)]], seq_len_tokens=16)


def test_rank_split_resumes_exactly():
    world, mbs, steps = 2, 3, 10
    seen = [i for s in range(steps) for r in range(world) for i in micro_batch_indices(s * world * mbs, r, world, mbs)]
    assert sorted(seen) == list(range(steps * world * mbs))
    # Resuming after 4 micro-steps continues with exactly the remaining samples.
    resumed = [i for s in range(4, steps) for r in range(world) for i in micro_batch_indices(s * world * mbs, r, world, mbs)]
    assert resumed == seen[4 * world * mbs :]


class FakeVocabMap:
    """Keeps even teacher ids; student id = teacher id // 2; unk = 0."""

    def remap(self, ids):
        dropped = ids % 2 == 1
        return torch.where(dropped, torch.zeros_like(ids), ids // 2), dropped


def test_collate_shifts_and_masks_dropped_labels():
    windows = [np.array([2, 4, 6, 7, 8]), np.array([2, 10, 12, 14, 16])]
    batch = collate_clm(windows, FakeVocabMap())
    assert batch["teacher_input_ids"].tolist() == [[2, 4, 6, 7], [2, 10, 12, 14]]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [1, 5, 6, 7]]
    assert batch["labels"].tolist() == [[2, 3, -100, 4], [5, 6, 7, 8]]
    assert int(batch["dropped_tokens"]) == 1
    plain = collate_clm(windows)
    assert plain["labels"].tolist()[0] == [4, 6, 7, 8]
    with pytest.raises(ValueError, match="one length"):
        collate_clm([np.arange(3), np.arange(4)])


def test_fixed_layout_keeps_windows_across_epochs_and_names_them():
    corpus = docs(30)
    packed = PackedDataset([corpus], seq_len_tokens=8, seed=5, fixed_layout=True)
    n = len(packed)
    tiles = {w: packed.window(w).tolist() for w in range(n)}
    for epoch in range(3):
        ids = [packed.window_id(epoch * n + i) for i in range(n)]
        assert sorted(ids) == list(range(n))  # every window once per epoch
        for i, w in enumerate(ids):
            assert packed[epoch * n + i].tolist() == tiles[w]
    assert [packed.window_id(i) for i in range(n)] != [packed.window_id(n + i) for i in range(n)]  # visit order reshuffled
    # Without fixed_layout the document order (so the set of windows) changes per epoch.
    moving = PackedDataset([corpus], seq_len_tokens=8, seed=5)
    assert {tuple(moving[i]) for i in range(n)} != {tuple(moving[n + i]) for i in range(n)}
    with pytest.raises(IndexError):
        packed.window(n)


# --- document boundaries: ids, position resets, attention that never crosses documents ---------

def test_document_ids_follow_the_stream():
    corpus = docs()
    packed = PackedDataset([corpus], seq_len_tokens=16, shuffle=False)
    owner = np.repeat(np.arange(len(corpus)), [len(d) for d in corpus])  # document of each stream token
    for i in range(len(packed)):
        tokens, doc_ids = packed.item(i)
        np.testing.assert_array_equal(tokens, packed[i])
        span = owner[i * 16 : i * 16 + 17]
        np.testing.assert_array_equal(doc_ids, span - span[0])  # local numbering 0, 1, ... in the window


def test_position_ids_restart_at_each_document():
    from megadistill.data.packing import position_ids_from_documents

    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]])
    assert torch.equal(position_ids_from_documents(doc_ids), expected)
    batch = collate_clm([np.arange(9), np.arange(9)], document_ids=[np.array([0, 0, 0, 1, 1, 2, 3, 3, 3]),
                                                                   np.array([0, 1, 1, 1, 1, 1, 1, 1, 1])])
    assert torch.equal(batch["position_ids"], expected) and torch.equal(batch["document_ids"], doc_ids)
    assert "position_ids" not in collate_clm([np.arange(9)])


def tiny_decoder(kind: str, attn: str):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, attn_implementation=attn))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=16, sliding_window=4, attn_implementation=attn,
                                                   layer_types=["sliding_attention", "full_attention"]))
    return model.eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_packed_window_equals_each_document_alone(kind, attn):
    """Hidden states of a document inside a packed window equal those of the document run alone."""
    from megadistill.data.packing import position_ids_from_documents
    from megadistill.models.teacher import final_hidden_states

    model = tiny_decoder(kind, attn)
    lengths = [5, 1, 9, 3]
    tokens = torch.randint(2, 64, (1, sum(lengths)))
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    with torch.no_grad():
        packed = final_hidden_states(model, tokens, position_ids=position_ids_from_documents(doc_ids))[0]
        plain = final_hidden_states(model, tokens)[0]  # GPT-style packing, for contrast
        start = 0
        for n in lengths:
            alone = final_hidden_states(model, tokens[:, start : start + n])[0]
            torch.testing.assert_close(packed[start : start + n], alone, rtol=1e-5, atol=1e-5)
            start += n
    assert not torch.allclose(packed[5:], plain[5:], atol=1e-3)  # without resets, later documents see earlier ones


def test_explicit_block_mask_isolates_documents_in_a_bidirectional_encoder():
    from transformers import BertConfig, BertModel

    from megadistill.data.packing import document_attention_mask, position_ids_from_documents

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64)).eval()
    lengths = [4, 7, 2]
    tokens = torch.randint(5, 64, (1, sum(lengths)))
    doc_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    mask = document_attention_mask(doc_ids, causal=False)
    assert mask.shape == (1, 1, 13, 13) and not bool(mask[0, 0, 0, 4]) and bool(mask[0, 0, 4, 10])
    causal = document_attention_mask(doc_ids, causal=True)
    assert not bool(causal[0, 0, 4, 10]) and bool(causal[0, 0, 10, 4])
    with torch.no_grad():
        packed = model(input_ids=tokens, attention_mask=mask, position_ids=position_ids_from_documents(doc_ids)).last_hidden_state[0]
        start = 0
        for n in lengths:
            alone = model(input_ids=tokens[:, start : start + n]).last_hidden_state[0]
            torch.testing.assert_close(packed[start : start + n], alone, rtol=1e-5, atol=1e-5)
            start += n


def test_restart_id_replaces_only_a_mid_document_first_token():
    corpus = docs()
    plain = PackedDataset([corpus], seq_len_tokens=16, shuffle=False)
    bos = PackedDataset([corpus], seq_len_tokens=16, shuffle=False, restart_id=2)
    starts = set(np.cumsum([0] + [len(d) for d in corpus]).tolist())
    mid = 0
    for i in range(len(plain)):
        (a, a_docs), (b, b_docs) = plain.item(i), bos.item(i)
        np.testing.assert_array_equal(a[1:], b[1:])  # every target is unchanged: none is lost
        np.testing.assert_array_equal(a_docs, b_docs)
        if i * 16 in starts:
            assert b[0] == a[0]  # a window that starts at a document keeps its first token
        else:
            assert b[0] == 2 and a[0] != 2
            mid += 1
    assert 0 < mid < len(plain)
