"""Task objective (in-training distillation): ``alpha * CE(labels) + (1 - alpha) * KD(class logits)``.

The student is a Hugging Face ``*ForSequenceClassification`` model (last-token pooling for
decoders, ``[CLS]`` for encoders); the teacher signal's ``logits`` are the fine-tuned teacher's
class logits for the same examples (online or cached). ``alpha = 1`` is plain fine-tuning, the
no-KD baseline. CE and KD are sums over the labelled examples divided by the **global batch's**
example count (:class:`~megadistill.objectives.spec.LossNormalizer`, from the loop).
Sources: task-specific KD as in DistilBERT's and TinyBERT's fine-tuning stage (Sanh et al. 2019,
arXiv:1910.01108; Jiao et al. 2020, arXiv:1909.10351), logit MSE as in Tang et al. 2019.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megadistill.losses.classify import CLASS_KD_LOSSES, class_logit_kd
from megadistill.objectives.spec import LossNormalizer
from megadistill.teachers import TeacherSignal

__all__ = ["ClassifyObjective", "ClassifySpec", "classify_metrics"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ClassifySpec:
    """The task loss, validated once.

    Attributes:
        num_labels: classes C.
        alpha: weight of CE on the labels, in [0, 1]; KD gets ``1 - alpha``.
        kd_loss: ``kl`` (T^2-scaled KL at ``temperature``) or ``mse`` (on raw logits).
        temperature: KD softmax temperature (``kl`` only).
    """

    num_labels: int
    alpha: float = 0.5
    kd_loss: str = "kl"
    temperature: float = 1.0

    def __post_init__(self):
        if self.num_labels < 2:
            raise ValueError(f"a classification task needs >= 2 labels, got {self.num_labels}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"task.alpha must be in [0, 1], got {self.alpha}")
        if self.kd_loss not in CLASS_KD_LOSSES:
            raise ValueError(f"task.kd_loss must be one of {', '.join(CLASS_KD_LOSSES)}, got {self.kd_loss!r}")
        if self.temperature <= 0:
            raise ValueError(f"task.temperature must be > 0, got {self.temperature}")

    @property
    def ce_weight(self) -> float:
        """``alpha`` (the name the loop logs)."""
        return self.alpha

    @property
    def kd_weight(self) -> float:
        """``1 - alpha``."""
        return 1.0 - self.alpha


class ClassifyObjective(torch.nn.Module):
    """The student classifier plus its task loss; what the student engine wraps.

    ``forward(batch, signal, step, normalizer)`` reads ``input_ids``/``attention_mask`` ``[B, L]`` int64
    and ``labels``: ``[B]`` int64 for sequence classification (``-100`` = padding slot), or ``[B, L]``
    for token classification (the tag at each word's first sub-token, ``-100`` elsewhere); the
    teacher signal's ``logits`` are ``[N, C]``, one row per label != -100 in row-major order. Returns ``{"loss": fp32 scalar,
    "stats": {name: fp32 scalar sum}}``: ``ce_sum``, ``kd_sum``, ``examples``, ``correct`` and per
    class ``tp_<c>``, ``pred_<c>``, ``gold_<c>`` (for macro-F1 over the global batch).
    """

    def __init__(self, model: torch.nn.Module, spec: ClassifySpec):
        super().__init__()
        self.model, self.spec = model, spec

    def spec_at(self, step: int) -> ClassifySpec:
        """The spec (task losses have no schedule)."""
        return self.spec

    def counts(self, batch: dict) -> dict[str, int]:
        """Labelled rows (examples, or tagged words) of a micro-batch, for CE and KD alike (CPU labels: no device sync)."""
        n = int((batch["labels"] != IGNORE_INDEX).sum())
        return {"ce_tokens": n, "kd_tokens": n}

    def forward(self, batch: dict, signal: TeacherSignal, step: int, normalizer: LossNormalizer | None = None) -> dict:
        device = self.model.get_input_embeddings().weight.device
        logits = self.model(input_ids=batch["input_ids"].to(device),
                            attention_mask=batch["attention_mask"].to(device)).logits.float()
        labels = batch["labels"].to(device)
        rows = labels != IGNORE_INDEX
        student, gold = logits[rows], labels[rows]
        ce_sum = F.cross_entropy(student, gold, reduction="sum")
        kd_sum = torch.zeros((), device=device)
        if signal.logits is not None:
            if signal.logits.shape[0] != student.shape[0]:
                raise ValueError(f"teacher gives {signal.logits.shape[0]} labelled rows, the student {student.shape[0]}: "
                                 "truncation kept different words; raise task.max_len_tokens")
            kd_sum = class_logit_kd(student, signal.logits.to(device), self.spec.kd_loss, self.spec.temperature).sum()
        loss = torch.zeros((), device=device)
        if normalizer is not None:
            loss = self.spec.alpha * ce_sum / normalizer.ce_tokens
            if signal.logits is not None and self.spec.kd_weight > 0:
                loss = loss + self.spec.kd_weight * kd_sum / normalizer.kd_tokens
        stats = {"ce_sum": ce_sum, "kd_sum": kd_sum, **_prediction_counts(student.argmax(-1), gold, self.spec.num_labels)}
        return {"loss": loss, "stats": {k: v.detach().float() for k, v in stats.items()}}


def _prediction_counts(pred: torch.Tensor, gold: torch.Tensor, num_labels: int) -> dict[str, torch.Tensor]:
    """Named count sums of ``[N]`` predictions vs gold: examples, correct, and per class tp / predicted / gold."""
    hit = pred == gold
    pred_counts = torch.bincount(pred, minlength=num_labels)
    gold_counts = torch.bincount(gold, minlength=num_labels)
    tp_counts = torch.bincount(gold[hit], minlength=num_labels)
    out = {"examples": torch.tensor(float(gold.numel()), device=gold.device), "correct": hit.sum()}
    for c in range(num_labels):
        out.update({f"tp_{c}": tp_counts[c], f"pred_{c}": pred_counts[c], f"gold_{c}": gold_counts[c]})
    return out


def classify_metrics(totals: dict[str, float]) -> dict[str, float]:
    """Logged metrics from stats summed over micro-batches and ranks.

    Returns ``ce`` and ``kd`` (means per example, nats; ``kd`` includes T^2 for ``kl``), ``accuracy`` and
    ``macro_f1`` (percent), and ``examples``.
    """
    from megadistill.task_eval import macro_f1_from_counts

    n = max(totals["examples"], 1.0)
    classes = sorted(int(k[3:]) for k in totals if k.startswith("tp_"))
    f1 = macro_f1_from_counts([totals[f"tp_{c}"] for c in classes], [totals[f"pred_{c}"] for c in classes],
                              [totals[f"gold_{c}"] for c in classes])
    return {"ce": totals["ce_sum"] / n, "kd": totals["kd_sum"] / n, "accuracy": 100.0 * totals["correct"] / n,
            "macro_f1": f1, "examples": totals["examples"]}
