"""One rank of the ZeRO-3 loss-equality test (run by tests/test_zero3_loss.py in a spawned process).

Builds the same tiny student + chunked distillation module on every rank, wraps it in the
real DeepSpeed ZeRO-3 engine (gloo, CPU), records per-micro-batch losses, the number of
all-gather collectives one forward issues at two chunk sizes, the shape of the head the
loss reads, and the gathered parameters after one optimizer step.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN, TEACHER_HIDDEN, BATCH, SEQ = 96, 32, 24, 2, 12


def make_module(chunk: int):
    """Tiny Llama student wrapped in DistillStudent with a fixed teacher head (same on every rank)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megadistill.config import LossConfig
    from megadistill.stages.pretrain import DistillStudent

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    student = LlamaForCausalLM(cfg)
    head = 0.3 * torch.randn(VOCAB, TEACHER_HIDDEN, generator=torch.Generator().manual_seed(1))
    loss = LossConfig(ce_weight=0.4, kd_weight=0.6, temperature=2.0, chunk_size_tokens=chunk)
    return DistillStudent(student, head, loss, VOCAB)


def make_batches():
    """Two micro-batches: (input_ids [B, L], labels [B, L], teacher_hidden [B, L, Ht])."""
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        out.append((ids[:, :-1], ids[:, 1:].clone(), torch.randn(BATCH, SEQ, TEACHER_HIDDEN, generator=g)))
    return out


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

    import megadistill.stages.pretrain as pretrain
    from megadistill import distributed, engine
    from megadistill.config import OptimConfig, TrainConfig

    distributed.init()
    engine.init_distributed_backend()
    seen_shapes = []
    original = pretrain.chunked_distill_loss

    def recording_loss(hidden, weight, *args, **kwargs):
        seen_shapes.append(tuple(weight.shape))
        return original(hidden, weight, *args, **kwargs)

    pretrain.chunked_distill_loss = recording_loss
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
                                         external_params=[module.student.get_output_embeddings().weight])
    batches = make_batches()
    mine = batches if world == 1 else [batches[rank]]
    result = {"losses": [], "shapes": seen_shapes}
    for ids, labels, t_hidden in mine:
        out = student_engine(ids, labels, t_hidden)
        result["losses"].append([float(out["loss"]), float(out["ce"]), float(out["kd"])])
        student_engine.backward(out["loss"])
        student_engine.step()
    with deepspeed.zero.GatheredParameters(list(module.student.parameters())):
        result["params"] = {k: v.detach().clone() for k, v in module.student.named_parameters()}
    if world > 1:
        counter = GatherCounter()
        student_engine.eval()
        with torch.no_grad():
            for chunk in (1, 1024, 1, 1024):  # warm-up pair, then the measured pair
                module.loss_cfg.chunk_size_tokens = chunk
                before = counter.calls
                student_engine(*batches[rank])
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
