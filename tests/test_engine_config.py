"""The run config owns batch shape, precision and optimizer in the DeepSpeed JSON."""

import pytest

from megadistill.config import OptimConfig, TrainConfig
from megadistill.engine import build_ds_config, load_ds_config, teacher_ds_config, warmup_cosine


def test_injects_batch_precision_optimizer():
    train = TrainConfig(micro_batch_size=3, grad_accum_steps=4, precision="bf16", max_steps=50)
    cfg = build_ds_config({"zero_optimization": {"stage": 3}}, train, OptimConfig(lr=1e-3, warmup_steps=5), world_size=2)
    assert cfg["train_batch_size"] == 24
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["bf16"] == {"enabled": True}
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["optimizer"]["params"]["lr"] == 1e-3
    assert "scheduler" not in cfg  # the LR schedule is a LambdaLR (warmup_cosine), not a JSON block
    teacher = teacher_ds_config(cfg)
    assert "optimizer" not in teacher and "scheduler" not in teacher
    assert teacher["zero_optimization"]["stage"] == 3


def test_conflicting_json_is_an_error():
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=8"):
        build_ds_config({"train_micro_batch_size_per_gpu": 8}, TrainConfig(micro_batch_size=2), OptimConfig(), 1)
    with pytest.raises(ValueError, match="'optimizer' block"):
        build_ds_config({"optimizer": {"type": "Adam"}}, TrainConfig(), OptimConfig(), 1)
    same = build_ds_config({"train_micro_batch_size_per_gpu": 2}, TrainConfig(micro_batch_size=2), OptimConfig(), 1)
    assert same["train_micro_batch_size_per_gpu"] == 2


def test_shipped_configs_are_valid(tmp_path):
    for name in ("cpu_zero3", "zero3", "zero3_offload"):
        cfg = load_ds_config(f"ds_configs/{name}.json")
        assert cfg["zero_optimization"]["stage"] == 3
        build_ds_config(cfg, TrainConfig(), OptimConfig(), 2)
    bad = tmp_path / "bad.json"
    bad.write_text("{\n  oops\n}")
    with pytest.raises(ValueError, match="bad.json: invalid JSON at line 2"):
        load_ds_config(bad)
    with pytest.raises(FileNotFoundError, match="ds_configs"):
        load_ds_config(tmp_path / "missing.json")


def test_warmup_cosine_trains_from_the_first_step():
    lrs = [warmup_cosine(s, warmup_steps=4, total_steps=20, min_lr_ratio=0.1) for s in range(21)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[20] == pytest.approx(0.1)
    assert warmup_cosine(0, warmup_steps=0, total_steps=10, min_lr_ratio=0.0) == 1.0
