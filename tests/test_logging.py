"""metrics.jsonl keeps each step once across a crash and resume."""

import json

from megadistill.logging import MetricsLogger


def steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    first = MetricsLogger(tmp_path, enabled=True)
    for step in range(1, 6):
        first.log(step, "train", {"loss": 1.0 / step})
    first.close()
    # The process died after step 5; the last checkpoint was at step 3.
    again = MetricsLogger(tmp_path, enabled=True, resume_step=3)
    for step in range(4, 7):
        again.log(step, "train", {"loss": 0.5})
    again.close()
    assert steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_disabled_logger_writes_nothing(tmp_path):
    off = MetricsLogger(tmp_path / "r", enabled=False)
    off.log(1, "train", {"loss": 1.0})
    off.close()
    assert not (tmp_path / "r").exists()
