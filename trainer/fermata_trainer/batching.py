"""Deterministic data order: a seeded permutation per epoch, consumed in fixed-size steps.

The data position is ``(epoch, index)``: the index of the next unused entry of the epoch's
permutation. One optimizer step consumes ``batch × accumulation × world`` entries; micro-batch
``m`` of rank ``r`` takes entries ``[(m·world + r)·batch, +batch)`` from the current index, so the
ranks' shards are disjoint (a deterministic DistributedSampler). The last step of an epoch wraps
around to the start of the permutation to fill its batch. Resuming from a saved position replays
exactly the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DataPosition:
    epoch: int = 0
    index: int = 0


class BatchPlan:
    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        accumulation: int,
        world_size: int,
        seed: int,
    ) -> None:
        if num_samples <= 0:
            raise ValueError("no training samples")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.accumulation = accumulation
        self.world_size = world_size
        self.seed = seed
        self._cached: tuple[int, list[int]] | None = None

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.num_samples / self.samples_per_step))

    def total_steps(self, epochs: int, max_steps: int | None) -> int:
        total = epochs * self.steps_per_epoch
        return min(total, max_steps) if max_steps is not None else total

    def permutation(self, epoch: int) -> list[int]:
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        generator = torch.Generator()
        generator.manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.num_samples, generator=generator).tolist()
        self._cached = (epoch, perm)
        return perm

    def micro_batches(self, position: DataPosition, rank: int) -> list[list[int]]:
        """Sample indices of this rank's micro-batches for the step starting at ``position``."""
        perm = self.permutation(position.epoch)
        out: list[list[int]] = []
        for micro in range(self.accumulation):
            start = position.index + (micro * self.world_size + rank) * self.batch_size
            out.append([perm[(start + j) % self.num_samples] for j in range(self.batch_size)])
        return out

    def advance(self, position: DataPosition) -> DataPosition:
        index = position.index + self.samples_per_step
        if index >= self.num_samples:
            return DataPosition(position.epoch + 1, 0)
        return DataPosition(position.epoch, index)
