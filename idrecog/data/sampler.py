"""A shuffling sampler whose position survives a restart, for exact mid-epoch resume.

Lightning restores the model, optimiser, schedulers and loop counters from a checkpoint, but a plain shuffling
``DataLoader`` restarts its epoch from the first batch with a fresh permutation. This sampler draws each epoch's
permutation from ``(seed, epoch)`` alone, so a resumed run can recompute it and start at the first batch the
interrupted run had not trained on (``IdDataModule`` stores the position in its checkpoint state).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler


class ResumableRandomSampler(Sampler[int]):
    """Random permutation per epoch, ``torch.randperm(n, generator=manual_seed(seed + epoch * 1_000_003))``.

    ``len()`` is always the full ``n`` (Lightning counts batches per epoch from it); after
    :meth:`load_state_dict` the first epoch iterated yields only the indices after the ``batches_done`` batches.

    Args:
        n: number of samples.
        seed: base seed.
        batch_size: the DataLoader's batch size (to turn batches into sample positions; ``drop_last=False``).
    """

    def __init__(self, n: int, seed: int = 0, batch_size: int = 1) -> None:
        self.n = n
        self.seed = seed
        self.batch_size = batch_size
        self.epoch = 0
        self._skip_epoch: int | None = None
        self._skip_samples = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch * 1_000_003)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.permutation(self.epoch)
        if self._skip_epoch == self.epoch:
            order = order[self._skip_samples :]
            self._skip_epoch = None  # only the resumed epoch is shortened
        return iter(order)

    def __len__(self) -> int:
        return self.n

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """``{"epoch", "batches_done"}``: continue ``epoch`` after its first ``batches_done`` batches."""
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if done >= math.ceil(self.n / self.batch_size):
            epoch, done = epoch + 1, 0  # saved at the epoch's end: the next epoch starts from its beginning
        # Lightning builds the first iterator before calling set_epoch, so the epoch is set here too
        self.epoch = epoch
        self._skip_epoch = epoch
        self._skip_samples = done * self.batch_size
