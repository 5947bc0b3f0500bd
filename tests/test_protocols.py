"""Named fine-tuning protocols become the config overrides they promise; the task table formats seeds and ratios."""

import pytest

from megadistill.config import load_config
from megadistill.protocols import PROTOCOLS, protocol_overrides
from megadistill.task_benchmark import format_task_table


def test_paper_protocol_is_the_sib200_recipe():
    # 701 examples, batch 16: 44 steps an epoch, 20 epochs.
    args = dict(a.split("=", 1) for a in protocol_overrides("paper", 701, 2))
    assert args["train.max_steps"] == str(44 * 20) and args["train.micro_batch_size"] == "8"
    assert float(args["optim.lr"]) == 1e-5 and args["task.max_len_tokens"] == "164" and PROTOCOLS["paper"].seeds == 5
    cfg = load_config("megadistill/recipes/task-sib200.yaml", [*protocol_overrides("cpu", 4206, 1),
                                                               "student.checkpoint=x"])
    assert cfg.task.protocol == "cpu" and cfg.task.freeze_embeddings and cfg.train.max_steps == 263


def test_protocol_errors():
    with pytest.raises(ValueError, match="unknown protocol"):
        protocol_overrides("fast", 10, 1)
    with pytest.raises(ValueError, match="not divisible"):
        protocol_overrides("cpu", 10, 3)


def test_task_table_shows_mean_std_and_parameter_ratio():
    summary = lambda m, s, n: {"accuracy": {"mean": m, "std": s, "n": n}, "macro_f1": {"mean": m, "std": s, "n": n}}  # noqa: E731
    report = {"languages": ["hin_Deva"], "models": {
        "teacher": {"runs": [{"parameters": {"total": 200_000_000}}], "scores": [{}],
                    "summary": {"hin_Deva": summary(80.0, 0.0, 1), "mean": summary(80.0, 0.0, 1)}},
        "student": {"runs": [{"parameters": {"total": 50_000_000}}] * 3, "scores": [{}] * 3,
                    "summary": {"hin_Deva": summary(70.04, 1.26, 3), "mean": summary(70.04, 1.26, 3)}}}}
    table = format_task_table(report, "accuracy", "teacher").splitlines()
    assert table[2] == "| teacher | 1 | 80.0 | 80.0 | 200.0 | 1.000 |"
    assert table[3] == "| student | 3 | 70.0 ± 1.3 | 70.0 ± 1.3 | 50.0 | 0.250 |"
