"""Distillation stages: one spec each (what to build, which batches, objective and teacher), no loop code.

``train.py`` runs ``STAGES[cfg.stage].build(cfg, ds_config)`` and hands the result to
:func:`megadistill.loop.run`. Adding a stage is one module here plus one entry below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["STAGES", "StageRun"]


@dataclass
class StageRun:
    """What a stage's ``build`` returns: the loop's inputs plus the export.

    Attributes:
        engine: the student engine (its module is the objective).
        train_batches: ``f(consumed_samples) -> iterator`` of this rank's micro-batches.
        teacher, eval_teacher: teacher signals (:mod:`megadistill.teachers`) for train / held-out batches.
        metrics: summed stats -> logged metrics.
        tokens_per_sample: tokens one sample feeds the student.
        eval_batches: ``f() -> iterable`` of held-out micro-batches, or None.
        export: ``f(out_dir)`` writes the trained student in Hugging Face format (collective).
        info: JSON-serializable facts for ``summary.json`` (parameter counts, vocabulary, layers).
        on_eval: ``f(step, metrics)`` after each held-out evaluation (collective), or None.
    """

    engine: object
    train_batches: Callable[[int], Iterator[dict]]
    teacher: object
    eval_teacher: object
    metrics: Callable[[dict], dict]
    tokens_per_sample: int
    eval_batches: Callable[[], Iterable[dict]] | None
    export: Callable[[Path], None]
    info: dict = field(default_factory=dict)
    on_eval: Callable[[int, dict], None] | None = None

    def loop_parts(self, save: Callable, log: Callable, stop: object):
        """The :class:`megadistill.loop.LoopParts` of this run, with the job's ``save``, ``log`` and ``stop``."""
        from megadistill.loop import LoopParts

        return LoopParts(engine=self.engine, train_batches=self.train_batches, teacher=self.teacher, metrics=self.metrics,
                         save=save, tokens_per_sample=self.tokens_per_sample, eval_batches=self.eval_batches,
                         eval_teacher=self.eval_teacher, log=log, on_eval=self.on_eval, stop=stop)


def _stages() -> dict:
    from megadistill.stages import post, pretrain, task

    return {"pre": pretrain, "task": task, "post": post}


class _Registry(dict):
    """``STAGES[name]`` imports the stage module on first use (stages import DeepSpeed-backed engines)."""

    def __missing__(self, name: str):
        modules = _stages()
        if name not in modules:
            raise ValueError(f"unknown stage {name!r}: choose one of {', '.join(modules)}")
        self[name] = modules[name]
        return modules[name]


STAGES = _Registry()
