"""Graceful stop: SIGTERM / SIGINT finish the current optimizer step, save, and exit 0.

SLURM sends SIGTERM before a job's time limit (``--signal``) or on ``scancel``; Ctrl-C sends SIGINT
to every process of the foreground group (the DeepSpeed launcher forwards SIGTERM to the ranks and
SIGKILLs them 30 s later). The first signal only sets a flag that the loop reads at the end of each
step (combined over ranks, so all ranks stop at the same step); a second signal exits at once with
``128 + signum``. That is safe for the checkpoints: a save in progress writes a hidden partial folder
and ``latest`` still names the previous complete checkpoint (:mod:`megadistill.checkpoint`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

__all__ = ["GracefulStop"]

log = logging.getLogger("megadistill.stop")
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """Context manager installing the SIGTERM/SIGINT handlers (main thread only) and restoring the old ones.

    ``requested`` is True once a first signal arrived; ``signal_name`` says which. Outside the main
    thread (where Python cannot install handlers) it installs nothing and ``requested`` stays False.
    """

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
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
        if self.requested:
            # Second signal: leave now. os._exit skips cleanup handlers that could block on a
            # collective the other ranks will never join.
            log.warning("%s again: exiting immediately (the last complete checkpoint is kept)", name)
            os._exit(128 + signum)
        self.requested, self.signal_name = True, name
        log.warning("%s received: finishing this step, saving a checkpoint, then exiting (send it again to exit now)", name)
