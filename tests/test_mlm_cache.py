"""Masked-LM teacher cache: training masks replayed exactly, equal to the online teacher, ~mask_prob of the bytes, checked.

A tiny XLM-R encoder (2 layers, width 32) with a 250-id Unigram tokenizer (so ``k = 255``
keeps every id) on binarized SIB-200 Hindi dev text, 32-token windows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_sib200_texts
from megadistill.config import LossConfig, load_config
from megadistill.data.batches import MlmBatches
from megadistill.data.binarize import binarize
from megadistill.data.indexed import IndexedDataset
from megadistill.data.masking import MaskingConfig, MlmCollator
from megadistill.data.packing import PackedDataset
from megadistill.losses.logits import topk_targets
from megadistill.models.adapters import adapter_for
from megadistill.models.scratch import random_xlmr_encoder, train_unigram_tokenizer
from megadistill.models.teacher import load_teacher
from megadistill.models.vocab import VocabMap
from megadistill.objectives.lm import LMObjective
from megadistill.objectives.spec import KDSpec
from megadistill.stages.build import open_cache
from megadistill.teacher_cache import (CacheSpec, TeacherCache, compute_shard, directory_bytes_per_token, shard_path,
                                       write_shard)
from megadistill.teachers import CachedTeacher, TeacherSignal
from test_cache_faults import enospc_in_write_npy
from test_teacher_cache import run_tool
from tools import cache_teacher_logits

SEQ, SEED, VOCAB = 32, 7, 250
CPU = torch.device("cpu")
SINGLE_PROCESS = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")


def run_mlm_tool(root: Path, out: Path, *extra: str) -> None:
    """The cache tool on the tiny encoder and its data (16 windows per shard, 3 per teacher forward)."""
    args = ["--teacher", str(root / "teacher"), "--data", str(root / "data" / "hin"), "--output", str(out),
            "--seq-len", str(SEQ), "--seed", str(SEED), "--windows-per-shard", "16", "--micro-batch-size", "3",
            "--chunk-tokens", "20", *extra]
    with pytest.MonkeyPatch.context() as mp:
        for key, value in SINGLE_PROCESS.items():
            mp.setenv(key, value)
        assert cache_teacher_logits.main(args) == 0


@pytest.fixture(scope="module")
def mlm_root(tmp_path_factory, sib200_dir):
    """An XLM-R teacher directory (random, 250 ids) and binarized Hindi dev text; caches top-8 (T 2) and top-255."""
    root = tmp_path_factory.mktemp("mlm_cache")
    tok = train_unigram_tokenizer(read_sib200_texts(sib200_dir, "hin_Deva"), vocab_size=VOCAB)
    assert len(tok) == VOCAB
    random_xlmr_encoder(tok, num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    _, loaded = load_teacher(root / "teacher")
    binarize([sib200_dir / "hin_Deva" / "dev.tsv"], loaded, root / "data" / "hin", show_progress=False)
    run_mlm_tool(root, root / "top8", "--k", "8", "--top-p", "0.9", "--temperature", "2", "--mask-prob", "0.15")
    run_mlm_tool(root, root / "top255", "--k", "255")
    return root


def packed(root: Path, seed: int = SEED) -> PackedDataset:
    return PackedDataset([IndexedDataset(root / "data" / "hin")], SEQ, seed=seed, fixed_layout=True)


def training_batches(root: Path, tok, seed: int = SEED, vocab_map=None, replace_from_all: bool = False) -> MlmBatches:
    """Batches with static masks and document masking on (the stage uses ``replace_from_all=True`` with a cache)."""
    collator = MlmCollator.from_tokenizer(tok, MaskingConfig(mask_prob=0.15), vocab_map, replace_from_all=replace_from_all)
    return MlmBatches(packed(root), collator, seed, static_mask=True, document_masking=True)


def online_masked_logits(teacher, batch) -> torch.Tensor:
    """Reference: ``[N, V]`` teacher logits at the batch's masked positions, computed in one piece."""
    adapter = adapter_for(teacher)
    with torch.no_grad():
        hidden = adapter.final_hidden_states(teacher, batch["teacher_input_ids"], document_ids=batch["document_ids"],
                                             position_ids=batch["position_ids"])
    rows = hidden[batch["labels"] != -100].float()
    return rows @ adapter.output_weight(teacher)[:VOCAB].float().T + adapter.output_bias(teacher)[:VOCAB].float()


def test_mlm_cache_replays_the_training_masks_and_equals_the_online_topk(mlm_root):
    cache = TeacherCache(mlm_root / "top8")
    teacher, tok = load_teacher(mlm_root / "teacher")
    assert cache.meta["version"] == 3 and cache.meta["spec"]["objective"] == "mlm" and cache.meta["spec"]["seed"] == SEED
    assert cache.meta["spec"]["masking"] == {"mask_prob": 0.15, "replace_mask": 0.8, "replace_random": 0.1,
                                             "whole_word": False}
    data = packed(mlm_root)
    cache.check_compatible(data, tok, temperature=2.0, masking=MaskingConfig(mask_prob=0.15))
    make = training_batches(mlm_root, tok)
    step = cache.meta["logprob_step"]
    for indices in ([0, 1, 2], [5, 2 * len(data) + 3, len(data) - 1]):  # 2 * len + 3: epoch 2, another visiting order
        batch = make(indices)
        cache.verify_masked(batch["window_ids"], batch["teacher_input_ids"])
        got = CachedTeacher(cache, None, CPU).signal(batch).sparse
        want = topk_targets(online_masked_logits(teacher, batch), 8, 0.9, temperature=2.0)
        assert got.ids.shape[0] == int((batch["labels"] != -100).sum()) > 0 and got.temperature == 2.0
        valid = torch.isfinite(want.logprobs)
        assert torch.equal(torch.isfinite(got.logprobs), valid) and torch.equal(got.ids[valid], want.ids[valid])
        assert float((got.logprobs[valid] - want.logprobs[valid]).abs().max()) <= step + 1e-3  # + fp16 tail renormalization
        torch.testing.assert_close(got.tail_logprob, want.tail_logprob, atol=2e-3, rtol=0)
    rows = sum(int(np.asarray(a["row_offsets"])[-1]) for a in cache._shards)
    assert cache.meta["num_rows"] == rows and 0.12 < rows / (len(data) * SEQ) <= 0.15  # 15% of non-special tokens


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_mlm_cache_with_every_id_gives_the_online_dense_loss(mlm_root, divergence):
    cache = TeacherCache(mlm_root / "top255")
    teacher, tok = load_teacher(mlm_root / "teacher")
    adapter = adapter_for(teacher)
    head, bias = adapter.output_weight(teacher)[:VOCAB].detach(), adapter.output_bias(teacher)[:VOCAB].detach()
    loss_cfg = LossConfig(ce_weight=0.3, kd_weight=0.7, divergence=divergence, chunk_size_tokens=16)
    spec = KDSpec.from_config(loss_cfg, VOCAB)
    student = random_xlmr_encoder(tok, num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, seed=1).eval()  # no dropout
    online = LMObjective(student, spec, loss_cfg, 10, masked=True, teacher_head=head, teacher_bias=bias)
    offline = LMObjective(student, spec, loss_cfg, 10, masked=True)
    batch = training_batches(mlm_root, tok)([4, len(packed(mlm_root)) + 9, 11])
    with torch.no_grad():
        hidden = adapter.final_hidden_states(teacher, batch["teacher_input_ids"], document_ids=batch["document_ids"],
                                             position_ids=batch["position_ids"])
    want = online(batch, TeacherSignal(hidden=hidden), 0)
    got = offline(batch, CachedTeacher(cache, None, CPU).signal(batch), 0)
    assert float(got["stats"]["kd_tokens"]) == float(want["stats"]["kd_tokens"]) == int((batch["labels"] != -100).sum())
    assert float(got["stats"]["kd_sum"]) == pytest.approx(float(want["stats"]["kd_sum"]), rel=1e-4)
    assert float(got["loss"].detach()) == pytest.approx(float(want["loss"].detach()), rel=1e-4)


def test_mlm_cache_is_about_mask_prob_of_a_per_token_cache(mlm_root, tmp_path):
    cache = TeacherCache(mlm_root / "top255")
    teacher, _ = load_teacher(mlm_root / "teacher")
    data = packed(mlm_root)
    # The same teacher, k and windows stored at every position (a causal-style per-token cache).
    spec = CacheSpec(k=255, seq_len_tokens=SEQ, seed=SEED, windows_per_shard=16)
    meta = {"num_windows": len(data), "spec": {"seq_len_tokens": SEQ}}
    for shard in range(cache.meta["num_shards"]):
        write_shard(tmp_path, shard, compute_shard(spec, teacher, VOCAB, data, shard, 8, 64))
    per_token = directory_bytes_per_token(tmp_path, meta)
    ratio = cache.bytes_per_token / per_token
    masked_fraction = cache.meta["num_rows"] / (len(data) * SEQ)
    assert per_token > 4 * VOCAB and ratio < 0.25
    assert ratio == pytest.approx(masked_fraction, abs=0.01)  # entries dominate; offsets and hashes are 32 bytes/window


def test_mismatched_masking_seed_or_objective_is_refused(mlm_root, cache_workspace, tmp_path, single_process):
    cache = TeacherCache(mlm_root / "top8")
    _, tok = load_teacher(mlm_root / "teacher")
    data = packed(mlm_root)
    with pytest.raises(ValueError, match="masking mask_prob is 0.15 in the cache but 0.2 for this run"):
        cache.check_compatible(data, tok, masking=MaskingConfig(mask_prob=0.2))
    with pytest.raises(ValueError, match="masking whole_word is False in the cache but True"):
        cache.check_compatible(data, tok, masking=MaskingConfig(whole_word=True))
    with pytest.raises(ValueError, match="seed is 7 in the cache but 8"):
        cache.check_compatible(packed(mlm_root, seed=8), tok, masking=MaskingConfig())
    with pytest.raises(ValueError, match="holds masked-LM targets .* this run trains a causal LM"):
        cache.check_compatible(data, tok)
    causal = tmp_path / "causal"
    run_tool(cache_workspace, causal, "--k", "4")
    causal_tok = load_teacher(cache_workspace / "teacher")[1]
    causal_data = PackedDataset([IndexedDataset(cache_workspace / "data" / "hin")], 16, seed=7, fixed_layout=True)
    with pytest.raises(ValueError, match="holds per-token causal-LM targets but this run trains a masked LM: .*--mask-prob 0.15"):
        TeacherCache(causal).check_compatible(causal_data, causal_tok, masking=MaskingConfig())
    # Masks drawn with another seed, or random replacements restricted to a trimmed student vocabulary, differ.
    other_seed = training_batches(mlm_root, tok, seed=8)([0, 1])
    with pytest.raises(ValueError, match="window 0 is masked differently"):
        cache.verify_masked(other_seed["window_ids"], other_seed["teacher_input_ids"])
    trimmed = VocabMap.from_token_ids(range(0, VOCAB, 2), VOCAB, always_keep=range(5))
    batch = training_batches(mlm_root, tok, vocab_map=trimmed)(list(range(12)))
    with pytest.raises(ValueError, match="masked differently"):
        cache.verify_masked(batch["window_ids"], batch["teacher_input_ids"])
    # What the stage builds for a trimmed student with a cache: replacements from every teacher id, exact replay.
    batch = training_batches(mlm_root, tok, vocab_map=trimmed, replace_from_all=True)(list(range(12)))
    cache.verify_masked(batch["window_ids"], batch["teacher_input_ids"])
    assert int(batch["mlm_mask"].sum()) == cache.targets(batch["window_ids"]).ids.shape[0]


def test_tool_refuses_bad_masking_arguments(mlm_root, cache_workspace, tmp_path):
    with pytest.raises(ValueError, match=r"another spec\.masking"):
        run_mlm_tool(mlm_root, mlm_root / "top8", "--k", "8", "--top-p", "0.9", "--temperature", "2", "--mask-prob", "0.2")
    with pytest.raises(ValueError, match="hidden-state cache of an encoder"):
        run_mlm_tool(mlm_root, tmp_path / "hidden", "--kind", "hidden")
    with pytest.raises(ValueError, match="apply to encoder"):
        run_mlm_tool(cache_workspace, tmp_path / "decoder", "--whole-word")


def test_open_cache_passes_the_run_masking_and_refuses_kd_at_all_positions(mlm_root):
    base = [f"teacher.path={mlm_root / 'teacher'}", "teacher.mode=offline", f"teacher.logit_cache={mlm_root / 'top255'}",
            f"data.train_prefixes=[{mlm_root / 'data' / 'hin'}]", f"data.seq_len_tokens={SEQ}", f"train.seed={SEED}"]
    _, tok = load_teacher(mlm_root / "teacher")
    assert open_cache(load_config(None, base), packed(mlm_root), tok, masked=True).objective == "mlm"
    with pytest.raises(ValueError, match="mask_prob is 0.15 in the cache but 0.3"):
        open_cache(load_config(None, base + ["data.mask_prob=0.3"]), packed(mlm_root), tok, masked=True)
    with pytest.raises(ValueError, match="loss.kd_positions=masked"):
        open_cache(load_config(None, base + ["loss.kd_positions=all"]), packed(mlm_root), tok, masked=True)


def test_rerun_resumes_and_otherwise_does_nothing(mlm_root, tmp_path):
    out = tmp_path / "resume"
    run_mlm_tool(mlm_root, out, "--k", "4", "--whole-word")
    assert TeacherCache(out).spec.masking.whole_word
    files = sorted(out.glob("shard_*.npy"))
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    run_mlm_tool(mlm_root, out, "--k", "4", "--whole-word")  # complete: nothing rewritten
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before
    for name in ("entries", "row_offsets", "done"):
        shard_path(out, 1, name).unlink()
    run_mlm_tool(mlm_root, out, "--k", "4", "--whole-word")
    assert {p.name: p.read_bytes() for p in sorted(out.glob("shard_*.npy"))} == {k: v[0] for k, v in before.items()}
    assert shard_path(out, 0, "entries").stat().st_mtime_ns == before[shard_path(out, 0, "entries").name][1]


def test_disk_full_keeps_complete_mlm_shards_and_the_rerun_equals_the_uninterrupted_cache(mlm_root, tmp_path,
                                                                                          monkeypatch, capsys):
    """ENOSPC on shard 1's last array (its other arrays already renamed): all of shard 1 goes, shard 0 stays."""
    out = tmp_path / "full"
    args = ["--teacher", str(mlm_root / "teacher"), "--data", str(mlm_root / "data" / "hin"), "--output", str(out),
            "--seq-len", str(SEQ), "--seed", str(SEED), "--windows-per-shard", "16", "--micro-batch-size", "3",
            "--chunk-tokens", "20", "--k", "255"]
    for key, value in SINGLE_PROCESS.items():
        monkeypatch.setenv(key, value)
    enospc_in_write_npy(monkeypatch, ".shard_000001.masked_hash.npy.tmp")
    assert cache_teacher_logits.run_cli(args) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cache_teacher_logits")]
    assert len(lines) == 1 and lines[0].startswith(
        f"cache_teacher_logits: error: disk full writing {shard_path(out, 1, 'masked_hash')}: "), lines
    assert lines[0].endswith("; 1 complete shards kept: free space or use another --output, then rerun the same command "
                             "to resume")
    shards = {p.name: p.read_bytes() for p in sorted(out.glob("shard_*"))}
    reference = {p.name: p.read_bytes() for p in sorted((mlm_root / "top255").glob("shard_*"))}
    assert shards and all(name.startswith("shard_000000.") and reference[name] == data for name, data in shards.items())
    assert not [p for p in out.iterdir() if ".tmp" in p.name] and not (out / "meta.json").exists()
    monkeypatch.undo()
    for key, value in SINGLE_PROCESS.items():
        monkeypatch.setenv(key, value)
    assert cache_teacher_logits.run_cli(args) == 0
    assert {p.name: p.read_bytes() for p in sorted(out.glob("shard_*"))} == reference
    assert (out / "meta.json").read_bytes() == (mlm_root / "top255" / "meta.json").read_bytes()
