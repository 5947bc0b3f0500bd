"""Run output for humans and tools: console logging, progress bar, metrics.jsonl, tensorboard.

Only rank 0 writes; other ranks get no-op objects, so callers never branch on rank.
(Named after the design card; ``megadistill/train.py`` removes its own folder from
``sys.path`` so this module never shadows the standard library's ``logging``.)
"""

from __future__ import annotations

import json
import logging as std_logging
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from megadistill.files import atomic_write_text


def setup_console(is_main: bool, level: int = std_logging.INFO) -> None:
    """Route library log records to stderr: INFO on rank 0, WARNING elsewhere."""
    handler = std_logging.StreamHandler(sys.stderr)
    handler.setFormatter(std_logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%H:%M:%S"))
    root = std_logging.getLogger("megadistill")
    root.handlers[:] = [handler]
    root.setLevel(level if is_main else std_logging.WARNING)
    root.propagate = False


class MetricsLogger:
    """Appends one JSON object per call to ``metrics.jsonl`` and mirrors scalars to tensorboard.

    Args:
        run_dir: the run directory; files go to ``run_dir/metrics.jsonl`` and ``run_dir/tensorboard``.
        enabled: False on ranks other than 0 (every method becomes a no-op).
        resume_step: optimizer step the run resumes from; records of later steps (logged
            after that checkpoint by a process that then died) are dropped so that every step
            appears once.

    Each record is ``{"step": int, "time_s": float (since start), "split": str, <metric>: float...}``.
    """

    def __init__(self, run_dir: str | Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.start = time.time()
        self._file = None
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            _truncate_after(run_dir / "metrics.jsonl", resume_step)
            self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        """Record ``metrics`` (plain floats/ints) for optimizer step ``step`` under ``split`` (train/valid)."""
        if not self.enabled:
            return
        record = {"step": step, "time_s": round(time.time() - self.start, 3), "split": split}
        record.update({k: float(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in metrics.items():
            self._tb.add_scalar(f"{split}/{key}", float(value), step)

    def close(self) -> None:
        """Flush and close the files."""
        if self.enabled:
            self._file.close()
            self._tb.close()


def _truncate_after(path: Path, step: int) -> None:
    """Keep only records of steps <= ``step`` in a metrics file (rewritten atomically).

    A process killed mid-write leaves a torn last line: it is dropped (it belongs to a step after
    the checkpoint). A torn line elsewhere is a corrupted file.

    Raises:
        ValueError: a line other than the last is not JSON (names the file and line).
    """
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as err:
            if number == len(lines):
                continue
            raise ValueError(f"{path}:{number}: not a JSON record ({err.msg}): move the file aside to resume") from err
        if record is not None and record["step"] <= step:
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def progress_bar(total_steps: int, initial_step: int, enabled: bool):
    """A tqdm bar over optimizer steps on rank 0 (``disable=True`` elsewhere)."""
    return tqdm(total=total_steps, initial=initial_step, disable=not enabled, unit="step", dynamic_ncols=True, desc="distill")


def one_line(err: BaseException) -> str:
    """``err`` as one line for a command's error message: an ``OSError``'s strerror (and file name) when it has them."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    return " ".join(str(err).split())


def write_error_line(program: str, message: str) -> None:
    """Write ``PROGRAM: error: MESSAGE`` to stderr as one line in a single write.

    Every rank reports a fatal error, and ``print`` writes the text and its newline separately,
    so two ranks' lines could run together on the shared stderr.
    """
    sys.stderr.write(f"{program}: error: {message}\n")
    sys.stderr.flush()
