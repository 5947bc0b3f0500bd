"""Graceful stop: SIGTERM / SIGINT finish the current optimizer step, save, and exit 0.

SLURM sends SIGTERM to every process of a job step before its time limit (``--signal``) or on
``scancel``; Ctrl-C sends SIGINT to every process of the foreground group. The first signal only sets
a flag that the loop reads at the end of each step (combined over ranks, so all ranks stop at the
same step); a second signal, at least ``REPEAT_AFTER_S`` later, exits at once with ``128 + signum``.
That is safe for the checkpoints: a save in progress writes a hidden partial folder and ``latest``
still names the previous complete checkpoint (:mod:`megadistill.checkpoint`).

Launchers: the DeepSpeed launcher (``deepspeed.launcher.launch``) answers SIGINT/SIGTERM by sending
SIGTERM to the ranks within milliseconds (the same request, hence the window) and SIGKILLs them 30 s
later, so under it a graceful stop has 30 s for the step and the save; the ``deepspeed`` runner
itself does not forward signals on one node (signal the process group, as SLURM and Ctrl-C do).
``srun`` and ``torchrun`` deliver the signal to the ranks without that 30 s limit.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

__all__ = ["GracefulStop"]

log = logging.getLogger("megadistill.stop")
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_AFTER_S = 1.0
"""Seconds after the first signal before another one counts as "exit now" (launchers forward the first)."""


class GracefulStop:
    """Context manager installing the SIGTERM/SIGINT handlers (main thread only) and restoring the old ones.

    ``requested`` is True once a first signal arrived; ``signal_name`` says which. Outside the main
    thread (where Python cannot install handlers) it installs nothing and ``requested`` stays False.
    """

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in _SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested and time.monotonic() - self._first_at < REPEAT_AFTER_S:
            return  # the launcher forwarding the same stop request
        if self.requested:
            # Second signal: leave now. os._exit skips cleanup handlers that could block on a
            # collective the other ranks will never join.
            log.warning("%s again: exiting immediately (the last complete checkpoint is kept)", name)
            os._exit(128 + signum)
        self.requested, self.signal_name, self._first_at = True, name, time.monotonic()
        log.warning("%s received: finishing this step, saving a checkpoint, then exiting (send it again to exit now)", name)
