"""On-policy batches (GKD) without a launcher: the lambda draw, the generated micro-batch, the iterator; post-stage config."""

import numpy as np
import pytest
import torch

from megadistill.config import PostConfig, load_config
from megadistill.data.collate import IGNORE_INDEX, collate_clm
from megadistill.generate import Samples, SamplingConfig
from megadistill.models.vocab import VocabMap
from megadistill.onpolicy import OnPolicySpec, generated_batch, is_on_policy, on_policy_batches
from megadistill.stages.post import dropped_layers


def test_the_draw_is_a_function_of_seed_and_sample_index_with_rate_lambda():
    draws = [is_on_policy(0.3, 7, i) for i in range(4000)]
    assert draws == [is_on_policy(0.3, 7, i) for i in range(4000)]  # every rank, every resume: the same choices
    assert abs(np.mean(draws) - 0.3) < 0.03
    assert draws != [is_on_policy(0.3, 8, i) for i in range(4000)]
    assert not any(is_on_policy(0.0, 7, i) for i in range(200)) and all(is_on_policy(1.0, 7, i) for i in range(200))


def _vocab_map() -> VocabMap:
    return VocabMap([0, 1, 2, 3, 10, 11, 12, 13], teacher_vocab_size=20, unk_teacher_id=3)


def test_generated_batch_labels_only_the_sampled_tokens_and_maps_back_to_teacher_ids():
    # Prompt of 3 student ids, then sampled tokens; row 0 stops at EOS (id 1) and is padded (id 0).
    sequences = torch.tensor([[2, 4, 5, 6, 1, 0, 0], [2, 5, 5, 7, 6, 4, 7]])
    generated = torch.zeros_like(sequences, dtype=torch.bool)
    generated[0, 3:5] = True
    generated[1, 3:] = True
    corpus = {"samples": 4, "window_ids": [5, 9]}
    batch = generated_batch(corpus, Samples(sequences=sequences, generated=generated), _vocab_map())
    expected_teacher = torch.tensor([[2, 10, 11, 12, 1, 0, 0], [2, 11, 11, 13, 12, 10, 13]])
    assert torch.equal(batch["teacher_input_ids"], expected_teacher[:, :-1])
    assert torch.equal(batch["input_ids"], sequences[:, :-1])
    labels = batch["labels"]
    assert labels[0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 6, 1, IGNORE_INDEX, IGNORE_INDEX]
    assert labels[1].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7, 6, 4, 7]
    assert torch.equal(batch["position_ids"][0], torch.arange(6))  # one document per row
    assert batch["samples"] == 4 and batch["window_ids"] == [5, 9] and batch["on_policy"]


class _FakeSampler:
    """Continues every prompt with ``n`` copies of token 7 and records the seeds it was given."""

    vocab_map = None

    def __init__(self, n: int):
        self.n, self.seeds = n, []

    def __call__(self, prompts, seed):
        self.seeds.append(seed)
        tail = torch.full((prompts.shape[0], self.n), 7)
        sequences = torch.cat([prompts, tail], 1)
        generated = torch.zeros_like(sequences, dtype=torch.bool)
        generated[:, prompts.shape[1]:] = True
        return Samples(sequences=sequences, generated=generated)


def _corpus(count: int, world: int = 2):
    rng = np.random.default_rng(0)
    for i in range(count):
        batch = collate_clm([rng.integers(4, 9, size=9) for _ in range(2)])
        batch.update(samples=2 * world, window_ids=[2 * i, 2 * i + 1])
        yield batch


def _spec(fraction: float) -> OnPolicySpec:
    return OnPolicySpec(fraction=fraction, prompt_tokens=3, sampling=SamplingConfig(max_new_tokens=4), seed=5, rank=1)


def test_lambda_zero_passes_the_corpus_batches_through_untouched():
    sampler = _FakeSampler(4)
    out = list(on_policy_batches(_corpus(6), 0, _spec(0.0), sampler))
    for got, want in zip(out, _corpus(6)):
        assert torch.equal(got["input_ids"], want["input_ids"]) and "on_policy" not in got
    assert sampler.seeds == []


def test_lambda_one_continues_each_window_prompt_and_times_it():
    sampler = _FakeSampler(4)
    out = list(on_policy_batches(_corpus(3), 8, _spec(1.0), sampler))
    for got, want in zip(out, _corpus(3)):
        assert torch.equal(got["input_ids"][:, :3], want["input_ids"][:, :3])  # the window's prompt
        assert got["input_ids"].shape == (2, 3 + 4 - 1) and got["generate_s"] >= 0
    assert len(set(sampler.seeds)) == 3  # a fresh sampling seed per micro-batch
    # Keyed by the global sample index: starting at sample 16 (the third batch: 8 + 2 x 4) repeats its seed.
    again = _FakeSampler(4)
    list(on_policy_batches(_corpus(1), 16, _spec(1.0), again))
    assert again.seeds == sampler.seeds[2:]


def _post(**kw) -> PostConfig:
    return PostConfig(**kw)


def test_dropped_layers_from_a_list_and_its_errors():
    assert dropped_layers(_post(drop_layers=[3, 1]), None, 4) == [1, 3]
    assert dropped_layers(_post(drop_layers=0), None, 4) == []
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        dropped_layers(_post(drop_layers=[4]), None, 4)
    with pytest.raises(ValueError, match="distinct"):
        dropped_layers(_post(drop_layers=[1, 1]), None, 4)
    with pytest.raises(ValueError, match="all 4 layers"):
        dropped_layers(_post(drop_layers=[0, 1, 2, 3]), None, 4)


@pytest.mark.parametrize("overrides, message", [
    (["post.drop_layers=2"], "post.importance is needed"),
    (["post.keep_mlp=64"], "post.importance is needed"),
    (["post.on_policy=0.5", "teacher.mode=offline", "teacher.logit_cache=c"], "needs teacher.mode online"),
    (["post.on_policy=1.5"], r"post.on_policy must be in \[0, 1\]"),
    (["post.on_policy=0.5", "post.prompt_tokens=40", "post.max_new_tokens=40"], "data.seq_len_tokens"),
    (["student.init=random"], "student.init must be from_teacher"),
    (["post.layer_metric=norm"], "cosine or skip_loss"),
    (["post.sample_top_p=0"], "sample_top_p"),
])
def test_post_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["stage=post", "data.train_prefixes=[x]", "data.seq_len_tokens=64", *overrides])
