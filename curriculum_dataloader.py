"""Curriculum sampling: which training images an epoch uses, chosen by their difficulty.

`CurriculumSampler` is a torch Sampler for `data.TrainViews` (it yields (index, epoch) pairs). Every rank derives
the same global order from (seed, epoch, difficulty, target) and takes an equal-length shard of it, so changing the
target or the difficulty between epochs needs no new DataLoader: persistent workers keep running. The trainer
batches it with `data.TrainBatchSampler`, which marks the padded duplicates of the shards invalid: every selected
sample reaches the loss exactly once per epoch, so the samples trained in an epoch are exactly
`selection_size()` (summed over ranks).

Strategies, with N the dataset size and f the fraction (M = ceil(f * N)):
- all:           every sample, reshuffled each epoch (no curriculum).
- random_subset: a uniformly random M samples each epoch (the control with the same budget).
- adaptive:      the M samples whose difficulty is nearest the target d, reshuffled each epoch.
- easy_to_hard:  pacing: the easiest ceil(g(e) * N), g growing linearly from start_fraction to 1 over pacing_epochs.
- hard_to_easy:  the hardest ceil(g(e) * N) (anti-curriculum).
- mixed:         M samples from every difficulty quintile, weighted 5, 3, 2, 1, 1 by distance from the quintile
                 that holds d; a quintile's shortfall goes to the others.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from samplers import pad_and_shard
from utils import UserError

STRATEGIES = ("all", "random_subset", "adaptive", "easy_to_hard", "hard_to_easy", "mixed")
DIFFICULTY_STRATEGIES = ("adaptive", "easy_to_hard", "hard_to_easy", "mixed")
MIXED_WEIGHTS = (5, 3, 2, 1, 1)  # by distance (0..4) from the target's quintile


def check_fraction(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise UserError(f"curriculum fraction {fraction} must lie in (0, 1]")


def check_target(target: float) -> None:
    if not 0 <= target <= 1:
        raise UserError(f"target difficulty {target} must lie in [0, 1]")


def pacing_fraction(epoch: int, start_fraction: float, pacing_epochs: int) -> float:
    """g(e): linear from start_fraction at epoch 0 to 1 at epoch pacing_epochs, then 1."""
    if pacing_epochs <= 0:
        return 1.0
    return min(1.0, start_fraction + (1.0 - start_fraction) * epoch / pacing_epochs)


def ceil_share(share: float, n: int) -> int:
    """ceil(share * n), the size of a selection, without floating-point overshoot: 0.56 * 600 is
    336.00000000000006 in binary floating point, which a plain ceil would turn into 337."""
    return math.ceil(round(share * n, 9))


def allocate(total: int, weights: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Split `total` items over groups in proportion to `weights`, never above a group's `capacity`: a group whose
    share exceeds its capacity is filled, and its shortfall goes to the others, again by weight (water-filling).
    The real-valued shares are then rounded once, by largest remainder. Requires total <= capacity.sum()."""
    weights, capacity = np.asarray(weights, dtype=np.float64), np.asarray(capacity, dtype=np.float64)
    share = np.zeros(len(weights))
    full = capacity <= 0
    while True:
        free = ~full
        w = np.where(free, weights, 0.0)
        if w.sum() == 0:  # only zero-weight groups have room left
            w = free.astype(np.float64)
        remaining = total - share[full].sum()
        share[free] = remaining * w[free] / w.sum()
        over = free & (share >= capacity)
        if not over.any():
            break
        share[over] = capacity[over]
        full |= over
    counts = np.floor(share + 1e-9).astype(np.int64)
    order = np.argsort(-(share - counts), kind="stable")
    for i in order[: total - counts.sum()]:
        counts[i] += 1
    return counts


class CurriculumSampler(torch.utils.data.Sampler):
    """Yields (index, epoch) pairs of the samples chosen for this epoch, sharded over ranks.

    The chosen set (before sharding) has exactly `selection_size()` samples; it is padded by wrapping to a multiple
    of num_replicas (never truncated, `data.pad_and_shard`), so every rank gets the same number of items and no
    sample is dropped. The padded items are the last shard position of some ranks; `data.TrainBatchSampler` marks
    them invalid so that they are not counted or trained on twice."""

    def __init__(self, difficulty, strategy: str, fraction: float = 0.7, target: float = 0.5, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, start_fraction: float = 0.4, pacing_epochs: int = 10):
        if strategy not in STRATEGIES:
            raise UserError(f"unknown curriculum strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")
        check_fraction(fraction)
        check_target(target)
        check_fraction(start_fraction)
        self.strategy, self.fraction, self.target, self.seed = strategy, fraction, float(target), seed
        self.num_replicas, self.rank = num_replicas, rank
        self.start_fraction, self.pacing_epochs = start_fraction, pacing_epochs
        self.epoch = 0
        self.use_all = False  # set while no difficulty has been measured yet (warm-up)
        self.update_difficulty(difficulty)

    # ---- state -------------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_target(self, target: float) -> None:
        check_target(target)
        self.target = float(target)

    def update_difficulty(self, difficulty) -> None:
        d = np.asarray(difficulty, dtype=np.float64)
        if d.ndim != 1 or len(d) == 0:
            raise UserError("difficulty must be a non-empty 1-D array with one value per training sample")
        if hasattr(self, "difficulty") and len(d) != len(self.difficulty):
            raise UserError(f"difficulty has {len(d)} values but the dataset has {len(self.difficulty)} samples")
        self.difficulty = d

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "target": self.target, "difficulty": self.difficulty.copy(),
                "use_all": self.use_all}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.target, self.use_all = state["epoch"], state["target"], state["use_all"]
        self.update_difficulty(state["difficulty"])

    # ---- selection ---------------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.difficulty)

    def selection_size(self) -> int:
        n = self.size
        if self.strategy == "all" or self.use_all:
            return n
        if self.strategy in ("easy_to_hard", "hard_to_easy"):
            return ceil_share(pacing_fraction(self.epoch, self.start_fraction, self.pacing_epochs), n)
        return ceil_share(self.fraction, n)

    def num_selected(self) -> int:
        """Distinct samples this epoch trains on over all ranks (padding excluded); see `selection_size`."""
        return self.selection_size()

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, 7])

    def select(self) -> np.ndarray:
        """The chosen indices of this epoch, in their global (shuffled) order; identical on every rank."""
        rng, n, m, d = self._rng(), self.size, self.selection_size(), self.difficulty
        tie_break = rng.random(n)  # random among equal distances/difficulties, not by index
        if self.strategy == "all" or self.use_all:
            chosen = np.arange(n)
        elif self.strategy == "random_subset":
            chosen = rng.choice(n, size=m, replace=False)
        elif self.strategy == "adaptive":
            chosen = np.lexsort((tie_break, np.abs(d - self.target)))[:m]
        elif self.strategy == "easy_to_hard":
            chosen = np.lexsort((tie_break, d))[:m]
        elif self.strategy == "hard_to_easy":
            chosen = np.lexsort((tie_break, -d))[:m]
        else:
            chosen = self._select_mixed(rng, tie_break, m)
        return chosen[rng.permutation(len(chosen))]

    def quintiles(self, tie_break: np.ndarray | None = None) -> list[np.ndarray]:
        """The samples split into 5 equal-count difficulty groups, easiest first."""
        tie = tie_break if tie_break is not None else np.zeros(self.size)
        return np.array_split(np.lexsort((tie, self.difficulty)), 5)

    def target_quintile(self, groups: list[np.ndarray]) -> int:
        """The quintile whose difficulty range holds the target: the number of quintile upper bounds below it."""
        uppers = [self.difficulty[g].max() for g in groups[:-1] if len(g)]
        return int(sum(self.target > u for u in uppers))

    def _select_mixed(self, rng: np.random.Generator, tie_break: np.ndarray, m: int) -> np.ndarray:
        groups = self.quintiles(tie_break)
        q = self.target_quintile(groups)
        weights = np.asarray([MIXED_WEIGHTS[abs(i - q)] for i in range(5)], dtype=np.float64)
        counts = allocate(m, weights, np.asarray([len(g) for g in groups]))
        return np.concatenate([rng.choice(g, size=c, replace=False) for g, c in zip(groups, counts)])

    # ---- Sampler -----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return math.ceil(self.selection_size() / self.num_replicas)

    def shard(self) -> np.ndarray:
        return pad_and_shard(self.select(), self.num_replicas, self.rank)

    def __iter__(self):
        for i in self.shard():
            yield int(i), self.epoch
