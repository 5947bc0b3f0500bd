"""Offline teacher cache: packing round trip, tool output equals online top-k, resume, 2 ranks, bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from conftest import free_port
from megadistill.data.indexed import IndexedDataset
from megadistill.data.packing import PackedDataset
from megadistill.losses.logits import chunked_distill_loss, topk_targets
from megadistill.models.teacher import final_hidden_states, load_teacher
from megadistill.objectives.spec import KDSpec
from megadistill.teacher_cache import (TeacherCache, id_layout, pack_entries, shard_path, teacher_targets,
                                       unpack_entries)
from tools import cache_teacher_logits

ROOT = Path(__file__).resolve().parents[1]
SEQ = 16


def run_tool(cache_workspace, out, *extra):
    args = ["--teacher", str(cache_workspace / "teacher"), "--data", str(cache_workspace / "data" / "hin"), "--output", str(out),
            "--seq-len", str(SEQ), "--seed", "7", "--windows-per-shard", "8", "--micro-batch-size", "3",
            "--chunk-tokens", "20", *extra]
    assert cache_teacher_logits.main(args) == 0


def packed_windows(cache_workspace, seed=7, seq=SEQ):
    return PackedDataset([IndexedDataset(cache_workspace / "data" / "hin")], seq, seed=seed, fixed_layout=True)




def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard_*.npy"))}


def test_pack_unpack_round_trip_and_tail():
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(50, 3000, generator=g)
    logits[0, :5] = 60.0  # a row whose kept tail entries fall below -32 nats: they must move into the tail
    targets = topk_targets(logits, 16, 0.95)
    id_bits, step = id_layout(3000)
    assert id_bits == 12
    entries, counts, tail = pack_entries(targets, id_bits, step)
    assert entries.dtype == np.uint32 and counts.dtype == np.uint8 and len(entries) == int(counts.sum())
    out = unpack_entries(entries, counts, tail, 16, id_bits, step)
    valid = torch.isfinite(out.logprobs)
    assert bool((valid.sum(1) == torch.from_numpy(counts.astype(np.int64))).all())
    kept = torch.isfinite(targets.logprobs) & (targets.logprobs > -32)
    assert torch.equal(valid, kept) and torch.equal(out.ids[valid], targets.ids[valid])
    # Quantization (step) plus renormalization against a float16 tail log-mass (spacing <= 1e-3 for |log tail| < 2).
    assert float((out.logprobs[valid] - targets.logprobs[valid]).abs().max()) <= step + 1e-3
    total = torch.logsumexp(torch.cat([out.logprobs, out.tail_logprob.unsqueeze(1)], 1), 1)
    torch.testing.assert_close(total, torch.zeros(50), atol=1e-6, rtol=0)
    assert float(out.tail_logprob.exp()[0]) > 0  # the dropped -55-nat entries live on as tail mass


def test_tool_cache_equals_online_topk(cache_workspace, tmp_path, single_process):
    out = tmp_path / "topk"
    run_tool(cache_workspace, out, "--k", "8", "--top-p", "0.9")
    cache = TeacherCache(out)
    packed = packed_windows(cache_workspace)
    teacher, tok = load_teacher(cache_workspace / "teacher")
    cache.check_compatible(packed, tok)
    assert cache.meta["num_windows"] == len(packed) and cache.meta["num_shards"] == -(-len(packed) // 8)
    # 4 bytes per kept entry + 1 (count) + 2 (tail) per token, + .npy headers and the marker of each 128-token shard.
    mean_entries = sum(int(np.asarray(a["counts"], dtype=np.int64).sum()) for a in cache._shards) / (len(packed) * SEQ)
    payload = 4 * mean_entries + 3
    assert payload < cache.bytes_per_token < payload + (5 * 128 + 200) / (8 * SEQ) + 1
    windows = [3, 0, len(packed) - 1]
    got = cache.targets(windows)
    ids = torch.from_numpy(np.stack([packed.window(w)[:-1] for w in windows]))
    want = teacher_targets(teacher, ids, len(tok), 8, 0.9)
    valid = torch.isfinite(want.logprobs)
    assert torch.equal(torch.isfinite(got.logprobs), valid) and torch.equal(got.ids[valid], want.ids[valid])
    step = cache.meta["logprob_step"]
    assert float((got.logprobs[valid] - want.logprobs[valid]).abs().max()) <= step + 1e-3
    counts = valid.sum(1)
    assert int(counts.min()) < 8  # top-p made the number of entries vary
    cache.verify_windows(windows, [packed.window(w) for w in windows])
    with pytest.raises(ValueError, match="window 3 holds other tokens"):
        cache.verify_windows([3], [packed.window(4)])


def test_hidden_kind_round_trip(cache_workspace, tmp_path, single_process):
    out = tmp_path / "hidden"
    run_tool(cache_workspace, out, "--kind", "hidden")
    cache = TeacherCache(out)
    packed = packed_windows(cache_workspace)
    teacher, _ = load_teacher(cache_workspace / "teacher")
    ids = torch.from_numpy(np.stack([packed.window(w)[:-1] for w in (1, 2)]))
    with torch.no_grad():
        want = final_hidden_states(teacher, ids).float()
    torch.testing.assert_close(cache.hidden([1, 2]), want, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="holds hidden states"):
        cache.targets([0])
    cache.check_compatible(packed, load_teacher(cache_workspace / "teacher")[1], temperature=3.0)  # any T: logits are recomputed
    with pytest.raises(ValueError, match="hidden-state cache does not depend on the temperature"):
        run_tool(cache_workspace, tmp_path / "hidden_t2", "--kind", "hidden", "--temperature", "2")


def test_resume_rewrites_only_missing_shards_identically(cache_workspace, tmp_path, single_process):
    out = tmp_path / "resume"
    run_tool(cache_workspace, out)
    before = shard_bytes(out)
    shard_path(out, 1, "entries").unlink()
    shard_path(out, 1, "done").unlink()
    (out / ".shard_000002.entries.npy.tmp999").write_bytes(b"half-written")  # an interrupted writer's leftover
    untouched = shard_path(out, 0, "entries").stat().st_mtime_ns
    run_tool(cache_workspace, out)
    assert shard_bytes(out) == before
    assert shard_path(out, 0, "entries").stat().st_mtime_ns == untouched  # complete shards are skipped
    with pytest.raises(ValueError, match="another spec.k"):
        run_tool(cache_workspace, out, "--k", "4")


def test_two_ranks_write_the_same_shards(cache_workspace, tmp_path, single_process):
    one, two = tmp_path / "one", tmp_path / "two"
    run_tool(cache_workspace, one)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "tools/cache_teacher_logits.py", "--teacher", str(cache_workspace / "teacher"), "--data",
           str(cache_workspace / "data" / "hin"), "--output", str(two), "--seq-len", str(SEQ), "--seed", "7",
           "--windows-per-shard", "8", "--micro-batch-size", "3", "--chunk-tokens", "20"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shard_bytes(two) == shard_bytes(one) and len(shard_bytes(one)) >= 10
    assert TeacherCache(two).meta["bytes_per_token"] == TeacherCache(one).meta["bytes_per_token"]


def test_mismatches_and_damage_are_named(cache_workspace, tmp_path, single_process):
    out = tmp_path / "bad"
    run_tool(cache_workspace, out, "--k", "4")
    cache = TeacherCache(out)
    _, tok = load_teacher(cache_workspace / "teacher")
    with pytest.raises(ValueError, match="seq_len_tokens is 16 in the cache but 12"):
        cache.check_compatible(packed_windows(cache_workspace, seq=12), tok)
    with pytest.raises(ValueError, match="seed is 7 in the cache but 8"):
        cache.check_compatible(packed_windows(cache_workspace, seed=8), tok)
    other = AutoTokenizer.from_pretrained(cache_workspace / "teacher")
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="tokenizer_sha256"):
        cache.check_compatible(packed_windows(cache_workspace), other)
    bos = PackedDataset([IndexedDataset(cache_workspace / "data" / "hin")], SEQ, seed=7, fixed_layout=True, restart_id=2)
    with pytest.raises(ValueError, match=r"window_bos \(data.window_bos\) is False in the cache but True"):
        cache.check_compatible(bos, tok)
    with pytest.raises(ValueError, match="fixed_layout"):
        cache.check_compatible(PackedDataset([IndexedDataset(cache_workspace / "data" / "hin")], SEQ, seed=7), tok)
    entries = shard_path(out, 0, "entries")
    entries.write_bytes(entries.read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"shard_000000\.entries\.npy"):
        TeacherCache(out)
    (out / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta.json not found"):
        TeacherCache(out)
    with pytest.raises(ValueError, match="k must be in"):
        run_tool(cache_workspace, tmp_path / "k0", "--k", "0")


def test_tempered_cache_stores_the_tempered_topk_and_is_valid_only_at_its_temperature(cache_workspace, tmp_path,
                                                                                       single_process):
    out = tmp_path / "t2"
    run_tool(cache_workspace, out, "--k", "8", "--top-p", "0.9", "--temperature", "2")
    cache = TeacherCache(out)
    assert cache.spec.temperature == 2.0 and cache.meta["spec"]["temperature"] == 2.0 and cache.meta["version"] == 3
    packed = packed_windows(cache_workspace)
    teacher, tok = load_teacher(cache_workspace / "teacher")
    windows = [0, len(packed) - 1]
    got = cache.targets(windows)
    assert got.temperature == 2.0
    ids = torch.from_numpy(np.stack([packed.window(w)[:-1] for w in windows]))
    want = teacher_targets(teacher, ids, len(tok), 8, 0.9, temperature=2.0)
    untempered = teacher_targets(teacher, ids, len(tok), 8, 0.9)
    valid = torch.isfinite(want.logprobs)
    assert torch.equal(torch.isfinite(got.logprobs), valid) and torch.equal(got.ids[valid], want.ids[valid])
    assert float((got.logprobs[valid] - want.logprobs[valid]).abs().max()) <= cache.meta["logprob_step"] + 1e-3
    assert float((want.tail_logprob - untempered.tail_logprob).abs().max()) > 0.1  # T = 2 is another distribution
    cache.check_compatible(packed, tok, temperature=2.0)
    cache.check_compatible(packed, tok)  # no temperature given: not checked here (the loss still checks)
    with pytest.raises(ValueError, match=r"temperature 2.0 but this run's loss.temperature is 1.0: .*--temperature 1.0"):
        cache.check_compatible(packed, tok, temperature=1.0)
    # The loss refuses the cached targets at another temperature and takes them at the cache's.
    n = got.ids.shape[0]
    g = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(n, 8, generator=g), torch.randn(len(tok), 8, generator=g)
    labels = torch.from_numpy(np.stack([packed.window(w)[1:] for w in windows])).flatten()
    out_t2 = chunked_distill_loss(hidden, head, labels, KDSpec(vocab_size=len(tok), temperature=2.0), sparse_targets=got)
    assert bool(torch.isfinite(out_t2.loss)) and int(out_t2.kd_tokens) == n
    with pytest.raises(ValueError, match="rebuild the cache with tools/cache_teacher_logits.py --temperature 1.0"):
        chunked_distill_loss(hidden, head, labels, KDSpec(vocab_size=len(tok)), sparse_targets=got)
    with pytest.raises(ValueError, match="another spec.temperature"):
        run_tool(cache_workspace, out, "--k", "8", "--top-p", "0.9")  # resuming needs the same temperature
    # A version-1 cache (written before the fields) reads as temperature 1.0, objective clm.
    meta = json.loads((out / "meta.json").read_text())
    meta["version"] = 1
    del meta["spec"]["temperature"]
    (out / "meta.json").write_text(json.dumps(meta))
    old = TeacherCache(out)
    assert old.spec.temperature == 1.0 and old.targets([0]).temperature == 1.0 and old.objective == "clm"


def test_window_bos_cache_holds_the_teacher_on_bos_restarted_windows(cache_workspace, tmp_path, single_process):
    out = tmp_path / "bos"
    run_tool(cache_workspace, out, "--k", "8", "--window-bos")
    cache = TeacherCache(out)
    teacher, tok = load_teacher(cache_workspace / "teacher")
    packed = PackedDataset([IndexedDataset(cache_workspace / "data" / "hin")], SEQ, seed=7, fixed_layout=True,
                           restart_id=tok.bos_token_id)
    cache.check_compatible(packed, tok)
    plain = packed_windows(cache_workspace)
    restarted = [w for w in range(len(packed)) if plain.window(w)[0] != packed.window(w)[0] == tok.bos_token_id][:3]
    assert restarted  # some windows start inside a document and were given a BOS
    cache.verify_windows(restarted, [packed.window(w) for w in restarted])
    with pytest.raises(ValueError, match="window_bos"):
        cache.check_compatible(packed_windows(cache_workspace), tok)
