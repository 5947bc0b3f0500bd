"""Signals: the training loop's graceful stop, and the tools' interruptible writes.

:class:`GracefulStop` (training): SIGTERM / SIGINT finish the current optimizer step, save, and exit 0.
:func:`interruptible` (binarize, teacher caches): SIGTERM / SIGINT raise :class:`Interrupted` inside
the block so that its ``finally`` removes partial files; commits can defer the signal.

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

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

__all__ = ["GracefulStop", "Interrupted", "SignalGuard", "interruptible"]

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


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived inside :func:`interruptible`; raised by its handler so the cleanup runs.

    A ``BaseException`` (like ``KeyboardInterrupt``): no ``except Exception`` swallows it. ``str(err)``
    is one line: ``interrupted by SIGTERM <what>``.

    Attributes:
        signum: int, the signal number; ``128 + signum`` is the conventional exit status.
    """

    def __init__(self, signum: int, what: str) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} {what}")


class SignalGuard:
    """The handler :func:`interruptible` installs: raises its error once; later signals, and signals while
    deferred, are only remembered (a cleanup or a commit must not stop halfway)."""

    def __init__(self, what: str, error: type[Interrupted]) -> None:
        self.what, self.error = what, error
        self.pending: int | None = None
        self._deferring, self._fired = False, False

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """The SIGTERM / SIGINT handler."""
        if self._fired:  # the first signal's cleanup is running: let it finish
            return
        if self._deferring:
            self.pending = signum
            return
        self._fired = True
        raise self.error(signum, self.what)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Within the block a signal is remembered, not raised; it acts when :func:`interruptible` ends."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def defer(self) -> None:
        """From now on until :func:`interruptible` ends, a signal is remembered, not raised."""
        self._deferring = True


@contextlib.contextmanager
def interruptible(what: str, error: type[Interrupted] = Interrupted) -> Iterator[SignalGuard]:
    """Within the block SIGTERM / SIGINT raise ``error(signum, what)`` (main thread only; elsewhere a no-op).

    The previous handlers are restored after; a signal deferred by the guard is then sent again,
    so it acts as if it had come just after the block. Yields the :class:`SignalGuard`.
    """
    guard = SignalGuard(what, error)
    if threading.current_thread() is not threading.main_thread():
        yield guard
        return
    previous = {signum: signal.signal(signum, guard.handle) for signum in _SIGNALS}
    try:
        yield guard
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if guard.pending is not None:
            signal.raise_signal(guard.pending)
