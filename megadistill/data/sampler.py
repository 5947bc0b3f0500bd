"""Which global samples each rank reads at each micro-step: deterministic, distributed, resumable.

The job walks the global sample sequence ``0, 1, 2, ...`` of a :class:`PackedDataset` (whose
order is already shuffled by seed, see :mod:`megadistill.data.packing`). Each micro-step
consumes ``world_size * micro_batch_size`` consecutive samples, rank ``r`` taking the
``r``-th block of ``micro_batch_size`` (Megatron-LM's ``MegatronPretrainingSampler``). The
split depends only on the consumed-sample count saved in the checkpoint, so a restarted job
continues with exactly the samples not yet seen, none twice and none skipped; the global
order does not depend on the world size, so a restart may even change it.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Sampler


def micro_batch_indices(consumed_samples: int, rank: int, world_size: int, micro_batch_size: int) -> list[int]:
    """Global sample indices of this rank's next micro-batch (``micro_batch_size`` ints).

    Raises:
        ValueError: ``rank`` outside ``[0, world_size)``, or a negative count / non-positive size.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
    if consumed_samples < 0 or micro_batch_size < 1:
        raise ValueError(f"need consumed_samples >= 0 and micro_batch_size >= 1, got {consumed_samples}, {micro_batch_size}")
    start = consumed_samples + rank * micro_batch_size
    return list(range(start, start + micro_batch_size))


class MicroBatchSampler(Sampler[list[int]]):
    """``torch.utils.data.DataLoader`` batch sampler yielding this rank's micro-batches from ``consumed_samples`` on.

    Use as ``DataLoader(packed, batch_sampler=MicroBatchSampler(...), collate_fn=...)``.

    Args:
        total_samples: global samples to walk before stopping (e.g. ``max_steps * global batch``),
            counted from 0, not from ``consumed_samples``.
        rank, world_size: this process and the data-parallel size.
        micro_batch_size: samples per rank per micro-step.
        consumed_samples: samples the whole job has consumed already (from the checkpoint).
    Raises:
        ValueError: as :func:`micro_batch_indices`.
    """

    def __init__(self, total_samples: int, rank: int, world_size: int, micro_batch_size: int, consumed_samples: int = 0):
        micro_batch_indices(consumed_samples, rank, world_size, micro_batch_size)  # validates the arguments
        self.total_samples, self.rank, self.world_size = total_samples, rank, world_size
        self.micro_batch_size, self.consumed_samples = micro_batch_size, consumed_samples

    @property
    def samples_per_step(self) -> int:
        """Global samples consumed per micro-step (all ranks)."""
        return self.world_size * self.micro_batch_size

    def __len__(self) -> int:
        remaining = max(self.total_samples - self.consumed_samples, 0)
        return remaining // self.samples_per_step

    def __iter__(self) -> Iterator[list[int]]:
        consumed = self.consumed_samples
        while consumed + self.samples_per_step <= self.total_samples:
            yield micro_batch_indices(consumed, self.rank, self.world_size, self.micro_batch_size)
            consumed += self.samples_per_step
