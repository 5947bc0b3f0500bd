"""One rank of the ZeRO-3 loss tests (run by tests/test_zero3_loss.py in spawned processes).

Builds the same tiny student + :class:`LMObjective` on every rank, wraps it in the real
DeepSpeed ZeRO-3 engine (gloo, CPU), runs one optimizer step of the real loop
(:func:`megadistill.loop._train_step`) over two micro-batches with 12 and 2 valid label tokens
(as one rank with 2 accumulation steps, or 2 ranks with one each), and records the per-micro-batch
stats, the number of all-gather collectives one forward issues at two chunk sizes, the shape of
the head the loss reads, and the gathered parameters after the step.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN, TEACHER_HIDDEN, BATCH, SEQ = 96, 32, 24, 1, 16
VALID_TOKENS = (12, 2)  # label tokens of the two micro-batches: uneven on purpose


def make_module(chunk: int):
    """Tiny Llama student in an LMObjective with a fixed teacher head (same on every rank)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megadistill.config import LossConfig
    from megadistill.objectives.lm import LMObjective
    from megadistill.objectives.spec import KDSpec

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    student = LlamaForCausalLM(cfg)
    head = 0.3 * torch.randn(VOCAB, TEACHER_HIDDEN, generator=torch.Generator().manual_seed(1))
    loss = LossConfig(ce_weight=0.4, kd_weight=0.6, temperature=2.0, chunk_size_tokens=chunk)
    return LMObjective(student, KDSpec.from_config(loss, VOCAB), loss, total_steps=10, teacher_head=head)


def make_batches():
    """Two micro-batches (dicts as the CLM batch iterator yields) with 12 and 2 valid labels, and teacher hidden states."""
    g = torch.Generator().manual_seed(2)
    out = []
    for valid in VALID_TOKENS:
        ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        labels = ids[:, 1:].clone()
        labels[:, valid:] = -100
        out.append({"input_ids": ids[:, :-1], "labels": labels, "dropped_tokens": torch.tensor(0), "samples": 1,
                    "t_hidden": torch.randn(BATCH, SEQ, TEACHER_HIDDEN, generator=g)})
    return out


class FixedTeacher:
    """Teacher signal stored in the batch (the test's stand-in for an online teacher)."""

    def signal(self, batch):
        from megadistill.teachers import TeacherSignal

        return TeacherSignal(hidden=batch["t_hidden"])


class GatherCounter:
    """Counts all-gather collectives DeepSpeed issues (wraps every *gather* method of its comm backend)."""

    def __init__(self):
        import deepspeed.comm.comm as ds_comm

        self.calls = 0
        backend = ds_comm.cdb
        for name in dir(backend):
            if "gather" in name and callable(getattr(backend, name)) and not name.startswith(("has_", "get_")):
                setattr(backend, name, self._wrap(getattr(backend, name)))

    def _wrap(self, fn):
        def counted(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)
        return counted


def run(rank: int, world: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    sys.path.insert(0, str(ROOT))
    import deepspeed

    import megadistill.objectives.lm as lm
    from megadistill import distributed, engine, loop
    from megadistill.config import OptimConfig, TrainConfig

    distributed.init()
    engine.init_distributed_backend()
    seen_shapes = []
    original = lm.chunked_distill_loss

    def recording_loss(hidden, weight, *args, **kwargs):
        seen_shapes.append(tuple(weight.shape))
        return original(hidden, weight, *args, **kwargs)

    lm.chunked_distill_loss = recording_loss
    module = make_module(chunk=1024)
    train = TrainConfig(micro_batch_size=BATCH, grad_accum_steps=2 // world, max_steps=10)
    # eps=1 makes the first Adam update ~ lr * g (not lr * sign(g)), so the comparison checks the gradients.
    optim = OptimConfig(lr=1e-2, warmup_steps=0, grad_clip=1.0, eps=1.0)
    ds_config = engine.build_ds_config(engine.load_ds_config(ROOT / "ds_configs" / "cpu_zero3.json"), train, optim, world)
    # A tiny model would otherwise stay gathered between forwards (reuse distance / live-parameter
    # budgets): release every parameter after use, as for a model that does not fit.
    ds_config["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0,
                                          stage3_max_live_parameters=0, stage3_prefetch_bucket_size=0)
    student_engine = engine.init_student(module, ds_config, train, optim,
                                         external_params=module.adapter.head_parameters(module.student))
    batches = make_batches()
    mine = batches if world == 1 else [batches[rank]]
    for batch in mine:
        batch["samples"] = world  # global samples per micro-batch, as the batch iterators count them
    stats = []

    def metrics(totals):
        stats.append(totals)
        return totals

    parts = loop.LoopParts(engine=student_engine, train_batches=lambda consumed: iter(mine), teacher=FixedTeacher(),
                           metrics=metrics, save=lambda state: None, tokens_per_sample=SEQ)
    state = loop.LoopState()
    loop._train_step(parts, iter(mine), train, state)
    result = {"stats": stats, "shapes": seen_shapes, "consumed": state.consumed_samples}
    with deepspeed.zero.GatheredParameters(list(module.student.parameters())):
        result["params"] = {k: v.detach().clone() for k, v in module.student.named_parameters()}
    if world > 1:
        counter = GatherCounter()
        student_engine.eval()
        with torch.no_grad():
            for chunk in (1, 1024, 1, 1024):  # warm-up pair, then the measured pair
                module.spec = module.spec.__class__(**{**module.spec.__dict__, "chunk_size_tokens": chunk})
                before = counter.calls
                student_engine(batches[rank], FixedTeacher().signal(batches[rank]), 0, None)
                result.setdefault("gathers", []).append((chunk, counter.calls - before))
    torch.save(result, out_path)
    distributed.barrier()


def main(rank: int, world: int, port: int, out_dir: str) -> None:
    """Spawn entry point: write ``rank{r}.pt`` or ``rank{r}.err`` (the traceback) into ``out_dir``."""
    try:
        run(rank, world, port, str(Path(out_dir) / f"rank{rank}.pt"))
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
