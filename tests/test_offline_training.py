"""A training step from the offline top-k cache equals the online step with the same top-k (plain PyTorch)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from megadistill.config import LossConfig
from megadistill.data.batches import ClmBatches
from megadistill.models.student import build_student_from_teacher
from megadistill.models.teacher import final_hidden_states, load_teacher
from megadistill.objectives.lm import LMObjective, lm_metrics
from megadistill.objectives.spec import KDSpec
from megadistill.teacher_cache import TeacherCache
from megadistill.teachers import CachedTeacher, TeacherSignal
from test_teacher_cache import packed_windows, run_tool


def masked_batch(packed, indices):
    """Windows and the training batch with document ids / position ids (what training feeds by default)."""
    batch = ClmBatches(packed)(indices)
    return batch["windows"], batch


def objective(student, head, loss_cfg: LossConfig, vocab: int) -> LMObjective:
    """The causal-LM objective the pre-training stage builds (constant weights)."""
    return LMObjective(student, KDSpec.from_config(loss_cfg, vocab), loss_cfg, total_steps=10, teacher_head=head)


def means(out: dict) -> dict:
    """Token-mean ce / kd of one forward's stats."""
    return lm_metrics({k: float(v) for k, v in out["stats"].items()})


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_step_from_cache_equals_online_topk_step(cache_workspace, tmp_path, single_process, divergence):
    out = tmp_path / "cache"
    run_tool(cache_workspace, out, "--k", "8", "--top-p", "0.95")
    cache = TeacherCache(out)
    teacher, tok = load_teacher(cache_workspace / "teacher")
    packed = packed_windows(cache_workspace)
    vocab = len(tok)
    head = teacher.get_output_embeddings().weight.detach()[:vocab].clone()
    loss_cfg = LossConfig(ce_weight=0.3, kd_weight=0.7, divergence=divergence, top_k=8, top_p=0.95, chunk_size_tokens=10)
    torch.manual_seed(0)
    student = build_student_from_teacher(teacher, [0], None)
    online_module = objective(copy.deepcopy(student), head, loss_cfg, vocab)
    offline_module = objective(copy.deepcopy(student), None, loss_cfg, vocab)
    indices = [5, 2 * len(packed) + 3]  # second one is from epoch 2: same window ids, visited in another order
    windows, batch = masked_batch(packed, indices)
    positions = batch["position_ids"]
    with torch.no_grad():
        teacher_hidden = final_hidden_states(teacher, batch["teacher_input_ids"], position_ids=positions)
    online = online_module(batch, TeacherSignal(hidden=teacher_hidden), 0)
    signal = CachedTeacher(cache, None, torch.device("cpu")).signal(batch)
    assert signal.sparse is not None and signal.hidden is None
    offline = offline_module(batch, signal, 0)
    # Only the cache's log-prob quantization (2^-? nats) and fp16 tail separate the two.
    assert means(offline)["kd"] == pytest.approx(means(online)["kd"], rel=2e-3, abs=1e-4)
    assert means(offline)["ce"] == pytest.approx(means(online)["ce"], rel=1e-6)
    for module, result in ((online_module, online), (offline_module, offline)):
        opt = torch.optim.SGD(module.parameters(), lr=0.5)
        result["loss"].backward()
        opt.step()
    for a, b in zip(online_module.student.parameters(), offline_module.student.parameters()):
        # SGD lr 0.5 on gradients that differ by the cache's log-prob quantization (2^-9 nats).
        torch.testing.assert_close(a, b, rtol=1e-3, atol=3e-4)
    moved = any(not torch.equal(a, b) for a, b in zip(student.parameters(), online_module.student.parameters()))
    assert moved
    # Reading the wrong windows is caught by the per-window hash.
    with pytest.raises(ValueError, match="holds other tokens"):
        CachedTeacher(cache, None, torch.device("cpu")).signal({**batch, "window_ids": [packed.window_id(i) for i in (6, 7)]})
    assert np.array_equal(windows[0], packed.window(packed.window_id(indices[0])))


def test_step_from_hidden_cache_equals_online_dense_step(cache_workspace, tmp_path, single_process):
    out = tmp_path / "hidden"
    run_tool(cache_workspace, out, "--kind", "hidden")
    cache = TeacherCache(out)
    teacher, tok = load_teacher(cache_workspace / "teacher")
    packed = packed_windows(cache_workspace)
    head = teacher.get_output_embeddings().weight.detach()[: len(tok)].clone()
    loss_cfg = LossConfig(ce_weight=0.5, kd_weight=0.5, divergence="mse", chunk_size_tokens=7)
    module = objective(build_student_from_teacher(teacher, [1], None), head, loss_cfg, len(tok))
    indices = [i for i in range(len(packed)) if packed.item(i)[1][:-1].max() > 0][:3]  # windows with a document start
    windows, batch = masked_batch(packed, indices)
    positions = batch["position_ids"]
    assert int(positions.min()) == 0 and bool((positions[:, 1:] == 0).any())  # at least one document starts mid-window
    with torch.no_grad():
        teacher_hidden = final_hidden_states(teacher, batch["teacher_input_ids"], position_ids=positions)
        online = means(module(batch, TeacherSignal(hidden=teacher_hidden), 0))
        signal = CachedTeacher(cache, None, torch.device("cpu")).signal(batch)
        assert signal.hidden is not None and signal.sparse is None and signal.hidden.dtype == torch.float32
        offline = means(module(batch, signal, 0))
    assert online["kd"] > 0
    assert offline["kd"] == pytest.approx(online["kd"], rel=1e-3)  # fp16 storage of the hidden states
