"""Deterministic, resumable assignment of dataset indices to global batches, ranks and micro-batches."""

from __future__ import annotations

import math

import torch


class GlobalBatchSampler:
    """Maps ``(global step) -> this rank's micro-batches`` without any hidden iterator state.

    Epoch ``e`` visits ``torch.randperm(num_samples)`` seeded with ``seed + e`` (or ``0..n-1`` when ``shuffle`` is
    off); global step ``s`` of the epoch takes the ``global_batch_size`` indices ``[s*G, (s+1)*G)``; rank ``r``
    takes its contiguous ``G / world_size`` share, cut into micro-batches of ``micro_batch_size``. The incomplete
    last global batch of an epoch is dropped (as NeMo-Aligner does), so resuming at a step reproduces exactly the
    samples an uninterrupted run would have seen.

    Args:
        num_samples: dataset length.
        global_batch_size, micro_batch_size: in samples (preference pairs for DPO).
        rank, world_size: data-parallel position.
        seed: shuffling seed; shuffle: shuffle each epoch.

    Raises:
        ValueError: ``global_batch_size`` not divisible by ``micro_batch_size * world_size``, or fewer samples than
            one global batch.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1234,
        shuffle: bool = True,
    ):
        if global_batch_size % (micro_batch_size * world_size) != 0:
            raise ValueError(
                f"model.global_batch_size={global_batch_size} must be a multiple of model.micro_batch_size="
                f"{micro_batch_size} x data-parallel size {world_size}"
            )
        if num_samples < global_batch_size:
            raise ValueError(
                f"the training data has {num_samples} samples, fewer than one global batch ({global_batch_size})"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self._epoch_order: tuple[int, list[int]] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per rank per global step (gradient-accumulation steps)."""
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    def _order(self, epoch: int) -> list[int]:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.num_samples, generator=generator).tolist()
            else:
                order = list(range(self.num_samples))
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches (lists of dataset indices) for global step ``step`` (0-based, over epochs)."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        start = step_in_epoch * self.global_batch_size
        batch = self._order(epoch)[start : start + self.global_batch_size]
        per_rank = self.global_batch_size // self.world_size
        mine = batch[self.rank * per_rank : (self.rank + 1) * per_rank]
        return [mine[i : i + self.micro_batch_size] for i in range(0, per_rank, self.micro_batch_size)]


def sequential_batches(num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, limit: int | float | None = None):
    """Validation batches: ``0..n-1`` in order, ``batch_size`` per rank per batch, strided over ranks.

    ``limit`` follows Lightning's ``limit_val_batches``: an int is a batch count, a float in ``(0, 1]`` a fraction.
    Yields lists of indices (the last batch may be short; a rank may get an empty list, which callers skip).
    """
    global_size = batch_size * world_size
    total = math.ceil(num_samples / global_size)
    if isinstance(limit, float) and 0.0 < limit <= 1.0:
        total = max(1, int(total * limit))
    elif limit is not None and int(limit) >= 0:
        total = min(total, int(limit))
    for b in range(total):
        start = b * global_size + rank * batch_size
        yield list(range(start, min(start + batch_size, num_samples)))
