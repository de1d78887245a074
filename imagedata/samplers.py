"""Samplers: which (index, epoch) keys each rank loads, and how they are batched.

Every rank derives the same global order from (seed, epoch) and takes its shard with `pad_and_shard`, the one
sharding function of the repository: `EpochSampler` and `curriculum_dataloader.CurriculumSampler` shard a padded
order (every rank takes the same number of steps; `TrainBatchSampler` masks the padded duplicates), `ShardSampler`
(evaluation, teacher cache) shards the plain order without padding, so each sample is counted exactly once.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from common.errors import UserError


def pad_and_shard(order: np.ndarray, num_replicas: int, rank: int, pad: bool = True) -> np.ndarray:
    """Rank `rank`'s shard of a global order [N]: pad the order by wrapping to a multiple of num_replicas, then take
    every num_replicas-th entry from `rank`. Shard position j holds global position rank + j * num_replicas, which
    is a padded duplicate exactly when it is >= len(order): padding (fewer than num_replicas items over all
    ranks) only ever sits at a shard's end. `TrainBatchSampler` marks those items invalid.

    pad=False (evaluation, `ShardSampler`): the same strided shard of the order as it is, so the shards partition
    it and ranks hold ceil or floor of N / num_replicas entries."""
    total = math.ceil(len(order) / num_replicas) * num_replicas if pad else len(order)
    if total > len(order):
        order = np.concatenate([order, np.resize(order, total - len(order))])
    return order[rank:total:num_replicas]


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled (index, epoch) pairs, sharded over ranks like DistributedSampler: every rank derives the same
    permutation from (seed, epoch), pads it by wrapping to a multiple of the world size and takes every
    `num_replicas`-th entry from `rank` (`pad_and_shard`). Call `set_epoch` before each epoch."""

    def __init__(self, size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0, shuffle: bool = True):
        self.size, self.seed, self.num_replicas, self.rank, self.shuffle = size, seed, num_replicas, rank, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=g).numpy()

    def num_selected(self) -> int:
        """Distinct samples this epoch uses over all ranks (padding excluded): the whole set."""
        return self.size

    def __len__(self) -> int:
        return math.ceil(self.size / self.num_replicas)

    def __iter__(self):
        for i in pad_and_shard(self.global_order(), self.num_replicas, self.rank):
            yield int(i), self.epoch


class TrainBatchSampler(torch.utils.data.Sampler):
    """Batches of keys (index, epoch, valid) over one rank's shard of a training sampler (EpochSampler or
    curriculum_dataloader.CurriculumSampler), so that every selected sample reaches the loss exactly once per epoch:

    - nothing is dropped: the last batch may be smaller than batch_size;
    - a last batch of ONE item is merged into the previous batch (which then holds batch_size + 1), because
      BatchNorm in train mode cannot normalise a single sample whose features are 1x1 (and a 1-sample batch
      statistic is meaningless). A shard of a single item (selection <= world size) gets one masked duplicate;
    - padded duplicates (`pad_and_shard`: the last shard position of some ranks when the selection size M is not
      a multiple of the world size W) carry valid = False. The trainer runs them through the forward pass, so
      every rank takes the same steps with non-empty batches, but masks them out of the loss and of every count.

    Every rank holds the same number of batches with the same bounds. Batch k covers the global positions
    [a_k W, b_k W) of the padded order (shard positions [a_k, b_k) on every rank), so the number of valid samples
    in step k over all ranks, `global_valid(k)` = min(b_k W, M) - a_k W, is known without communication."""

    def __init__(self, sampler, batch_size: int):
        if batch_size < 1:
            raise UserError(f"batch size {batch_size} must be >= 1")
        self.sampler, self.batch_size = sampler, batch_size

    def bounds(self) -> list[tuple[int, int]]:
        """[(a_k, b_k)]: shard positions of each batch this epoch."""
        n, b = len(self.sampler), self.batch_size
        out = [(a, min(a + b, n)) for a in range(0, n, b)]
        if b > 1 and len(out) > 1 and out[-1][1] - out[-1][0] == 1:
            out[-2:] = [(out[-2][0], n)]
        return out

    def global_valid(self, step: int) -> int:
        """Valid samples in batch `step` summed over all ranks."""
        a, b = self.bounds()[step]
        w = self.sampler.num_replicas
        return max(0, min(b * w, self.sampler.num_selected()) - a * w)

    def __len__(self) -> int:
        return len(self.bounds())

    def __iter__(self):
        m, w, r = self.sampler.num_selected(), self.sampler.num_replicas, self.sampler.rank
        keys = [(int(i), int(e), r + j * w < m) for j, (i, e) in enumerate(self.sampler)]
        for a, b in self.bounds():
            batch = keys[a:b]
            if len(batch) == 1 and self.batch_size > 1:
                batch = batch + [(batch[0][0], batch[0][1], False)]
            yield batch


class ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank + W, rank + 2W, ...: over all ranks every sample exactly once (`pad_and_shard` without
    padding). Evaluation sums over ranks rather than stepping in lockstep, so unequal shards need no padding."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0):
        self.indices = pad_and_shard(np.arange(size), num_replicas, rank, pad=False).tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)
