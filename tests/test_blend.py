"""Language blending: XLM-R weights, realized token shares, repeats, determinism, packing on top."""

import math

import numpy as np
import pytest

from megadistill.data.blend import (BlendedDataset, blend_from_prefixes, blend_weights, format_report,
                                    normalize_weights)
from megadistill.data.indexed import IndexedDataset, IndexedDatasetWriter, write_provenance
from megadistill.data.packing import PackedDataset

STRIDE = 100_000  # token value = dataset * STRIDE + document: tells every token's origin


class ToyDataset:
    """In-memory documents; document i of dataset d is ``sizes[i]`` copies of ``d * STRIDE + i``."""

    def __init__(self, d, sizes):
        self.d = d
        self.sizes = np.asarray(sizes, dtype=np.int32)

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        return np.full(int(self.sizes[i]), self.d * STRIDE + i, dtype=np.int64)


def toy(d, docs, seed=0, low=10, high=60):
    return ToyDataset(d, np.random.default_rng([seed, d]).integers(low, high, size=docs))


def three_languages():
    """High (~70k tokens), mid (~7k) and low (~700) resource datasets."""
    return [toy(0, 2000), toy(1, 200), toy(2, 20)]


def doc_counts(blend, d):
    """How often each document of dataset d occurs in the blend."""
    return np.bincount(blend.document_index[blend.dataset_index == d], minlength=len(blend.datasets[d]))


# --- weights -----------------------------------------------------------------------------------

def test_weights_match_hand_computed_example():
    # 1e6^0.3 = 10^1.8, 1e4^0.3 = 10^1.2, so q_0 = 1 / (1 + 10^-0.6) = 0.799240...
    np.testing.assert_allclose(blend_weights([1e6, 1e4], alpha=0.3), [0.799240, 0.200760], atol=1e-6)
    np.testing.assert_allclose(blend_weights([1e6, 1e4], alpha=1.0), [100 / 101, 1 / 101], rtol=1e-12)
    np.testing.assert_allclose(blend_weights([1e6, 1e4], alpha=0.0), [0.5, 0.5], rtol=1e-12)
    assert blend_weights([1e6, 1e4]).dtype == np.float64  # default alpha is XLM-R's 0.3
    np.testing.assert_allclose(blend_weights([10**15, 1]).sum(), 1.0)  # no overflow for huge counts


def test_lower_alpha_flattens_the_distribution():
    counts = [5_000_000, 200_000, 3_000]
    low_share = [blend_weights(counts, a)[-1] for a in (1.0, 0.7, 0.3, 0.0)]
    assert low_share == sorted(low_share) and math.isclose(low_share[-1], 1 / 3)


def test_normalize_weights_sums_to_one():
    np.testing.assert_allclose(normalize_weights([3, 1]), [0.75, 0.25])
    w = normalize_weights([0.2, 7, 1e-3])
    assert math.isclose(w.sum(), 1.0) and w.dtype == np.float64


@pytest.mark.parametrize("call, message", [
    (lambda: blend_weights([10, 20], alpha=1.5), r"alpha must be in \[0, 1\]"),
    (lambda: blend_weights([10, 20], alpha=-0.1), r"alpha must be in \[0, 1\]"),
    (lambda: blend_weights([10, 20], alpha=float("nan")), r"alpha must be in \[0, 1\]"),
    (lambda: blend_weights([]), "at least one token count"),
    (lambda: blend_weights([10, 0, 5]), "token count 1 must be positive"),
    (lambda: blend_weights([10, 5, -3]), "token count 2 must be positive"),
    (lambda: normalize_weights([]), "at least one blend weight"),
    (lambda: normalize_weights([1, -2]), "blend weight 1 must be positive"),
    (lambda: normalize_weights([0, 1]), "blend weight 0 must be positive"),
    (lambda: normalize_weights([1, float("inf")]), "blend weight 1 must be positive and finite"),
    (lambda: normalize_weights([1, "x"]), "blend weight 1 must be a number"),
])
def test_bad_weight_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("kwargs, message", [
    (dict(datasets=[]), "at least one dataset"),
    (dict(weights=[1, 2]), "got 2 blend weights for 3 datasets"),
    (dict(weights=[1, 0, 2]), "blend weight 1 must be positive"),
    (dict(names=["a"]), "got 1 names for 3 datasets"),
    (dict(alpha=2.0), r"alpha must be in \[0, 1\]"),
    (dict(total_tokens=-5), "total_tokens must be positive"),
    (dict(total_tokens=3), "too small: the blend drew no document"),
    (dict(seed=-1), "seed must be a non-negative int"),
    (dict(datasets=[toy(0, 5), ToyDataset(1, [])]), "dataset dataset1 has no tokens"),
])
def test_bad_blend_inputs(kwargs, message):
    kwargs.setdefault("datasets", three_languages())
    with pytest.raises(ValueError, match=message):
        BlendedDataset(**kwargs)


# --- the blend ---------------------------------------------------------------------------------

def test_realized_token_shares_match_weights():
    datasets = three_languages()
    blend = BlendedDataset(datasets, alpha=0.3, seed=7)
    n = np.array([int(ds.sizes.sum()) for ds in datasets])
    q = blend_weights(n, 0.3)
    np.testing.assert_allclose(blend.weights, q)
    assert blend.total_tokens == n.sum()
    # Count the tokens of the actual documents, by the origin written into each token.
    tokens = np.concatenate([blend[i] for i in range(len(blend))])
    realized = np.bincount(tokens // STRIDE, minlength=3)
    np.testing.assert_array_equal(realized, blend.drawn)
    assert realized.sum() == blend.sizes.sum() == blend.num_tokens
    np.testing.assert_allclose(realized / realized.sum(), q, atol=2e-3)
    # Each dataset lands within half a document (< 30 tokens) of its target q_i * total.
    assert np.all(np.abs(realized - q * n.sum()) <= 30)


def test_low_resource_repeats_and_high_resource_is_subsampled():
    blend = BlendedDataset(three_languages(), alpha=0.3, seed=1)
    rows = blend.report()
    assert rows[0]["epochs"] < 1 < rows[1]["epochs"] < rows[2]["epochs"]
    assert rows[2]["epochs"] > 10  # ~700 tokens asked to fill ~15% of ~78k
    for d, row in enumerate(rows):
        counts = doc_counts(blend, d)
        epochs = row["epochs"]
        # Every document appears floor(epochs) times, at most one more (the fractional pass).
        assert counts.min() >= math.floor(epochs) and counts.max() <= math.floor(epochs) + 1
    assert doc_counts(blend, 0).max() == 1 and 0 < (doc_counts(blend, 0) == 1).mean() < 1


def test_each_full_pass_is_a_permutation_in_blend_order():
    blend = BlendedDataset(three_languages(), alpha=0.3, seed=3)
    small = blend.document_index[blend.dataset_index == 2]  # dataset 2's documents, in blend order
    passes = len(small) // 20
    chunks = small[: passes * 20].reshape(passes, 20)
    for chunk in chunks:
        assert sorted(chunk.tolist()) == list(range(20))  # a repeat only after the pass is complete
    assert len({tuple(c) for c in chunks}) == passes  # each pass in its own order
    assert len(set(small[passes * 20:].tolist())) == len(small) - passes * 20  # fractional pass: no repeats


def test_report_matches_counts():
    datasets = three_languages()
    blend = BlendedDataset(datasets, alpha=0.5, seed=2, names=["hin_Deva", "tam_Taml", "sat_Olck"])
    for d, row in enumerate(blend.report()):
        counts = doc_counts(blend, d)
        drawn = int((counts * datasets[d].sizes).sum())
        assert row["name"] == ["hin_Deva", "tam_Taml", "sat_Olck"][d]
        assert row["documents"] == len(datasets[d]) and row["tokens"] == int(datasets[d].sizes.sum())
        assert row["drawn"] == drawn and math.isclose(row["epochs"], drawn / row["tokens"])
        assert math.isclose(row["weight"], blend.weights[d]) and math.isclose(row["share"], drawn / blend.num_tokens)


def test_items_are_the_underlying_documents():
    datasets = three_languages()
    blend = BlendedDataset(datasets, seed=4)
    assert blend.dataset_index.dtype == np.uint16 and blend.document_index.dtype == np.int64
    assert blend.sizes.dtype == np.int64 and blend.sizes.shape == (len(blend),)
    for i in list(range(0, len(blend), 97)) + [-1]:
        d, doc = int(blend.dataset_index[i]), int(blend.document_index[i])
        np.testing.assert_array_equal(blend[i], datasets[d][doc])
        assert len(blend[i]) == blend.sizes[i]
    with pytest.raises(IndexError, match="out of range"):
        blend[len(blend)]


def test_deterministic_for_a_seed():
    a, b = BlendedDataset(three_languages(), seed=11), BlendedDataset(three_languages(), seed=11)
    np.testing.assert_array_equal(a.dataset_index, b.dataset_index)
    np.testing.assert_array_equal(a.document_index, b.document_index)
    c = BlendedDataset(three_languages(), seed=12)
    assert not np.array_equal(a.dataset_index[:500], c.dataset_index[:500])
    assert not np.array_equal(a.document_index[:500], c.document_index[:500])
    np.testing.assert_allclose(a.drawn, c.drawn, atol=60)  # other documents, same shares


def test_alpha_one_with_default_total_is_each_document_once():
    datasets = three_languages()
    blend = BlendedDataset(datasets, alpha=1.0, seed=5)
    for d in range(3):
        assert np.all(doc_counts(blend, d) == 1)
    assert [r["epochs"] for r in blend.report()] == [1.0, 1.0, 1.0]


def test_explicit_weights_and_total_tokens():
    blend = BlendedDataset(three_languages(), weights=[1, 1, 2], total_tokens=20_000, seed=6)
    np.testing.assert_allclose(blend.weights, [0.25, 0.25, 0.5])
    np.testing.assert_allclose(blend.drawn, [5_000, 5_000, 10_000], atol=30)
    assert [r["epochs"] > 1 for r in blend.report()] == [False, False, True]


def test_datasets_without_sizes_attribute():
    docs = [np.arange(k, dtype=np.int64) + 1 for k in range(5, 15)]  # a plain list of arrays
    blend = BlendedDataset([docs, toy(1, 50)], alpha=0.0, seed=0)
    rows = blend.report()
    assert rows[0]["tokens"] == sum(len(x) for x in docs)
    assert math.isclose(rows[0]["weight"], 0.5) and abs(rows[0]["share"] - 0.5) < 0.02


def test_packed_dataset_on_top_of_the_blend():
    blend = BlendedDataset(three_languages(), alpha=0.3, seed=8)
    packed = PackedDataset([blend], seq_len_tokens=64, seed=8)
    assert len(packed) == (blend.num_tokens - 1) // 64
    windows = np.stack([packed[i] for i in range(len(packed))])
    assert windows.shape == (len(packed), 65)
    # The training stream carries each language in its blend share.
    share = np.bincount(windows[:, :-1].ravel() // STRIDE, minlength=3) / windows[:, :-1].size
    np.testing.assert_allclose(share, blend.weights, atol=5e-3)
    tokens, doc_ids = packed.item(0)
    assert doc_ids[0] == 0 and np.all(np.diff(doc_ids) >= 0)


def test_format_report_is_an_aligned_table():
    blend = BlendedDataset(three_languages(), names=["hin_Deva", "tam_Taml", "sat_Olck"], seed=9)
    text = format_report(blend.report())
    lines = text.splitlines()
    assert lines[0].split(" | ")[0].strip() == "dataset" and "epochs" in lines[0]
    assert len({len(line) for line in lines}) == 1  # every line the same width
    assert [line.split(" | ")[0].strip() for line in lines[2:5]] == ["hin_Deva", "tam_Taml", "sat_Olck"]
    assert lines[-1].startswith("total") and f"{blend.num_tokens:,}" in lines[-1]


def _write(prefix, docs, meta=None):
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for doc in docs:
            writer.add_document(doc)
    if meta is not None:
        write_provenance(prefix, dict(meta, documents=len(docs), tokens=int(sum(len(d) for d in docs))))


def test_blend_from_indexed_prefixes(tmp_path):
    rng = np.random.default_rng(0)
    hin = [rng.integers(10, 1000, size=int(rng.integers(5, 40))) for _ in range(300)]
    tam = [rng.integers(1000, 2000, size=int(rng.integers(5, 40))) for _ in range(30)]
    _write(tmp_path / "hin_Deva.train", hin, {"language": "hin", "script": "Deva"})
    _write(tmp_path / "tam_Taml.train", tam, {"language": "tam", "script": "Taml", "romanization": {"scheme": "iast"}})
    _write(tmp_path / "misc.train", tam[:10])  # no provenance: named after the file
    prefixes = [tmp_path / "hin_Deva.train", tmp_path / "tam_Taml.train", tmp_path / "misc.train"]
    blend = blend_from_prefixes(prefixes, alpha=0.3, seed=3)
    assert blend.names == ["hin_Deva", "tam_Taml.iast", "misc.train"]
    opened = [IndexedDataset(p) for p in prefixes]
    np.testing.assert_allclose(blend.weights, blend_weights([ds.num_tokens for ds in opened], 0.3))
    for i in range(0, len(blend), 13):
        d, doc = int(blend.dataset_index[i]), int(blend.document_index[i])
        np.testing.assert_array_equal(blend[i], opened[d][doc])
    rows = blend.report()
    assert rows[0]["epochs"] < 1 < rows[1]["epochs"]
    assert "tam_Taml.iast" in format_report(rows)
    assert len(PackedDataset([blend], seq_len_tokens=32)) == (blend.num_tokens - 1) // 32


def test_duplicate_names_are_made_unique(tmp_path):
    docs = [np.arange(1, 20)] * 4
    meta = {"language": "hin", "script": "Deva"}
    for prefix in ("a/hin_Deva", "b/hin_Deva", "b/hin_Deva.part2"):
        (tmp_path / prefix).parent.mkdir(exist_ok=True)
        _write(tmp_path / prefix, docs, meta)
    blend = blend_from_prefixes([tmp_path / p for p in ("a/hin_Deva", "b/hin_Deva", "b/hin_Deva.part2")])
    assert blend.names == ["hin_Deva#0", "hin_Deva#1", "hin_Deva:hin_Deva.part2"]


def test_blend_if_several_is_what_training_and_the_cache_tool_pack():
    from megadistill.data.blend import blend_if_several, underlying_datasets

    single = [toy(0, 10)]
    assert blend_if_several(single) == single and underlying_datasets(single) == single
    datasets = three_languages()
    [blend] = blend_if_several(datasets, alpha=0.3, seed=9)
    assert isinstance(blend, BlendedDataset) and underlying_datasets([blend]) == datasets
    again = blend_if_several(datasets, alpha=0.3, seed=9)[0]
    assert np.array_equal(blend.dataset_index, again.dataset_index)  # same windows for training and the cache tool
    weighted = blend_if_several(datasets, weights=[1, 1, 1], total_tokens=30_000)[0]
    assert [round(r["weight"], 3) for r in weighted.report()] == [0.333] * 3


def test_config_validates_blend_fields():
    from megadistill.config import RunConfig, validate

    cfg = RunConfig()
    cfg.data.train_prefixes = ["a", "b"]
    cfg.data.blend_weights = [1.0]
    with pytest.raises(ValueError, match="one weight per data.train_prefixes"):
        validate(cfg)
    cfg.data.blend_weights, cfg.data.blend_alpha = [], 1.5
    with pytest.raises(ValueError, match=r"data.blend_alpha must be in \[0, 1\]"):
        validate(cfg)
