"""Loss-weight and temperature schedules, and their config validation."""

import math

import pytest

from megadistill.config import LossConfig, load_config
from megadistill.losses.schedule import loss_weights_at, scheduled_value


def test_shapes_hit_start_middle_end():
    assert scheduled_value(1.0, 0.0, "constant", 50, 100) == 1.0
    assert scheduled_value(1.0, None, "linear", 50, 100) == 1.0
    assert scheduled_value(1.0, 0.0, "linear", 0, 100) == 1.0
    assert scheduled_value(1.0, 0.0, "linear", 25, 100) == pytest.approx(0.75)
    assert scheduled_value(1.0, 0.0, "linear", 100, 100) == 0.0
    assert scheduled_value(1.0, 0.0, "linear", 500, 100) == 0.0  # stays at the end value
    assert scheduled_value(4.0, 1.0, "cosine", 50, 100) == pytest.approx(2.5)
    assert scheduled_value(4.0, 1.0, "cosine", 25, 100) == pytest.approx(1.0 + 3.0 * 0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        scheduled_value(1.0, 0.0, "step", 0, 10)


def test_loss_weights_follow_config_and_schedule_steps():
    cfg = LossConfig(ce_weight=1.0, kd_weight=0.0, temperature=4.0, schedule="linear", ce_weight_end=0.0,
                     kd_weight_end=1.0, temperature_end=1.0, schedule_steps=10)
    w = loss_weights_at(cfg, 5, total_steps=1000)
    assert (w.ce_weight, w.kd_weight, w.temperature) == pytest.approx((0.5, 0.5, 2.5))
    assert loss_weights_at(cfg, 10, 1000).temperature == 1.0
    constant = loss_weights_at(LossConfig(), 7, 10)
    assert (constant.ce_weight, constant.kd_weight, constant.temperature) == (0.5, 0.5, 1.0)


@pytest.mark.parametrize("override, message", [
    ("loss.divergence=kl", "loss.divergence must be one of"),
    ("loss.schedule=step", "loss.schedule must be one of"),
    ("loss.jsd_beta=2", "jsd_beta"),
    ("loss.temperature_end=0", "temperature_end"),
    ("teacher.mode=offline", "teacher.logit_cache"),
    ("features.relations=[x]", "features.relations"),
    ("loss.chunk_size_tokens=-1", "chunk_size_tokens must be >= 0"),
])
def test_bad_loss_config_is_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["data.train_prefixes=[x]", override])


def test_features_need_online_teacher():
    with pytest.raises(ValueError, match="need the teacher online"):
        load_config(None, ["data.train_prefixes=[x]", "teacher.mode=offline", "teacher.logit_cache=c",
                           "features.hidden_weight=1"])
