"""Curriculum sampling: which training images an epoch uses, chosen by their difficulty.

`CurriculumSampler` is a torch Sampler for `views.TrainViews` (it yields (index, epoch) pairs). Every rank derives
the same global order from (seed, epoch, difficulty, target) and takes an equal-length shard of it, so changing the
target or the difficulty between epochs needs no new DataLoader: persistent workers keep running. The trainer
batches it with `samplers.TrainBatchSampler`, which marks the padded duplicates of the shards invalid: every selected
sample reaches the loss exactly once per epoch, so the samples trained in an epoch are exactly
`selection_size()` (summed over ranks).

Strategies are the entries of STRATEGY_REGISTRY (a common.registry.Registry of `Strategy` classes), each rule in its
class's docstring. With N the dataset size and f the fraction (M = ceil(f * N)):
- all:           every sample, reshuffled each epoch (no curriculum).
- random_subset: a uniformly random M samples each epoch (the control with the same budget).
- adaptive:      the M samples whose difficulty is nearest the target d, reshuffled each epoch.
- easy_to_hard:  pacing: the easiest ceil(g(e) * N), g growing linearly from start_fraction to 1 over pacing_epochs.
- hard_to_easy:  the hardest ceil(g(e) * N) (anti-curriculum).
- mixed:         M samples from every difficulty quintile, weighted 5, 3, 2, 1, 1 by distance from the quintile
                 that holds d; a quintile's shortfall goes to the others.
These choose membership: the sampler shuffles what they choose. A strategy whose class sets `ordered = True` also
sets the order within the epoch: its selection is trained in the order it returns (examples/plugins/hard_first.py).
A new strategy is a `Strategy` subclass registered with `@STRATEGY_REGISTRY.register(name, config=..., help=...)`,
in this file or in a plugin file named by run.plugins (docs/extending.md);
`curriculum.strategy` accepts every registered name, and an entry's own keys are curriculum.<name>.*.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from common.errors import UserError
from common.registry import Registry
from imagedata.samplers import pad_and_shard

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


def quintiles(difficulty: np.ndarray, tie_break: np.ndarray | None = None) -> list[np.ndarray]:
    """The sample indices split into 5 equal-count difficulty groups, easiest first (ties broken by tie_break)."""
    tie = tie_break if tie_break is not None else np.zeros(len(difficulty))
    return np.array_split(np.lexsort((tie, difficulty)), 5)


def target_quintile(difficulty: np.ndarray, groups: list[np.ndarray], target: float) -> int:
    """The quintile whose difficulty range holds the target: the number of quintile upper bounds below it."""
    uppers = [difficulty[g].max() for g in groups[:-1] if len(g)]
    return int(sum(target > u for u in uppers))


# ================================================================================================================
# Strategies: the entries of STRATEGY_REGISTRY.
# ================================================================================================================
@dataclass(frozen=True)
class EpochPool:
    """What a strategy chooses from in one epoch: the same on every rank."""
    difficulty: np.ndarray  # [N] float64 in [0, 1], one score per training sample
    target: float           # d: the target difficulty in [0, 1]
    epoch: int              # e, 0-based
    fraction: float         # f in (0, 1]
    start_fraction: float   # g(0) of the pacing strategies
    pacing_epochs: int      # epochs until the pacing strategies use the whole set


class Strategy:
    """A curriculum strategy: `size` samples per epoch, `choose` which. Both are pure functions of their arguments
    (choose draws only from the rng it is given), so every rank derives the same selection.

    `ordered` = False: the sampler shuffles the chosen indices afterwards, so `choose` may return them in any
    order. `ordered` = True: `choose` returns them in the order to train on (the sampler keeps it; see
    `CurriculumSampler.select`). The sampler makes one instance per run, `Strategy(options)`, with `options` the
    entry's own config section (curriculum.<name>.*, registered with `config=`), or None when it has none."""

    needs_difficulty = True  # ranks samples by difficulty: the whole set until the first refresh, needs a teacher
    reads_target = True  # selects by the target difficulty (pool.target), which the agent sets each epoch
    ordered = False
    reads: tuple[str, ...] = ("curriculum.fraction",)  # the shared keys read (`size`: M = ceil(f N))

    def __init__(self, options=None):
        self.options = options

    @classmethod
    def validate(cls, cfg) -> None:
        """Checks of the run's config (train_student_rl.RLConfig) that involve several keys, for the selected
        strategy, before anything is built (UserError); none by default. Each key's own range is declared with
        the key in the schema (common.config.opt)."""

    def size(self, pool: EpochPool) -> int:
        """M = ceil(f N) by default."""
        return ceil_share(pool.fraction, len(pool.difficulty))

    def choose(self, pool: EpochPool, m: int, rng: np.random.Generator, tie_break: np.ndarray) -> np.ndarray:
        """m distinct indices into pool.difficulty (in training order when `ordered`). tie_break: [N] uniform
        numbers, drawn from rng first, that give a random order among equal keys (not the index order)."""
        raise NotImplementedError


# the curriculum.* keys that some strategies read and others not (each strategy's `reads`); refused when unread
STRATEGY_REGISTRY = Registry("curriculum strategy", key="curriculum.strategy", sections="curriculum",
                             shared=("curriculum.fraction", "curriculum.start_fraction", "curriculum.pacing_epochs"))


@STRATEGY_REGISTRY.register("all", help="every sample, reshuffled each epoch (no curriculum)")
class AllSamples(Strategy):
    """all: every sample, reshuffled each epoch (no curriculum); M = N."""

    needs_difficulty = reads_target = False
    reads = ()

    def size(self, pool: EpochPool) -> int:
        return len(pool.difficulty)

    def choose(self, pool, m, rng, tie_break):
        return np.arange(len(pool.difficulty))


@STRATEGY_REGISTRY.register("random_subset", help="a uniformly random ceil(f N) samples each epoch (the control)")
class RandomSubset(Strategy):
    """random_subset: a uniformly random M = ceil(f N) samples each epoch (the control with the same budget)."""

    needs_difficulty = reads_target = False

    def choose(self, pool, m, rng, tie_break):
        return rng.choice(len(pool.difficulty), size=m, replace=False)


@STRATEGY_REGISTRY.register("adaptive", help="the ceil(f N) samples whose difficulty is nearest the target")
class Adaptive(Strategy):
    """adaptive: the M = ceil(f N) samples with the smallest |D_i - d|, ties in random order."""

    def choose(self, pool, m, rng, tie_break):
        return np.lexsort((tie_break, np.abs(pool.difficulty - pool.target)))[:m]


class Pacing(Strategy):
    """M = ceil(g(e) N) with g(e) = `pacing_fraction` (linear from start_fraction to 1 over pacing_epochs)."""

    reads = ("curriculum.start_fraction", "curriculum.pacing_epochs")
    reads_target = False  # the pacing sets the size; the order is by difficulty alone

    def size(self, pool: EpochPool) -> int:
        return ceil_share(pacing_fraction(pool.epoch, pool.start_fraction, pool.pacing_epochs), len(pool.difficulty))


@STRATEGY_REGISTRY.register("easy_to_hard", help="pacing: the easiest ceil(g(e) N), g from start_fraction to 1")
class EasyToHard(Pacing):
    """easy_to_hard: the M = ceil(g(e) N) samples of smallest D_i (pacing curriculum)."""

    def choose(self, pool, m, rng, tie_break):
        return np.lexsort((tie_break, pool.difficulty))[:m]


@STRATEGY_REGISTRY.register("hard_to_easy", help="the hardest ceil(g(e) N) (anti-curriculum)")
class HardToEasy(Pacing):
    """hard_to_easy: the M = ceil(g(e) N) samples of largest D_i (anti-curriculum)."""

    def choose(self, pool, m, rng, tie_break):
        return np.lexsort((tie_break, -pool.difficulty))[:m]


@STRATEGY_REGISTRY.register("mixed", help="ceil(f N) samples from every difficulty quintile, weighted toward the "
                                          "target's (5, 3, 2, 1, 1)")
class Mixed(Strategy):
    """mixed: M = ceil(f N) samples drawn from all five difficulty quintiles, quintile i weighted
    MIXED_WEIGHTS[|i - q|] with q the quintile holding d; a full quintile's shortfall goes to the others by weight
    (`allocate`); uniformly random within a quintile."""

    def choose(self, pool, m, rng, tie_break):
        groups = quintiles(pool.difficulty, tie_break)
        q = target_quintile(pool.difficulty, groups, pool.target)
        weights = np.asarray([MIXED_WEIGHTS[abs(i - q)] for i in range(5)], dtype=np.float64)
        counts = allocate(m, weights, np.asarray([len(g) for g in groups]))
        return np.concatenate([rng.choice(g, size=c, replace=False) for g, c in zip(groups, counts)])


# the built-in names (for --help and parametrized tests); checks use the live registry, which plugins extend
STRATEGIES = tuple(STRATEGY_REGISTRY)
DIFFICULTY_STRATEGIES = tuple(name for name, s in STRATEGY_REGISTRY.items() if s.needs_difficulty)


def strategy_named(name: str, options=None) -> Strategy:
    """An instance of the registered strategy `name` (UserError listing the choices when unknown), given its own
    config section `options` (e.g. cfg.curriculum.<name>); with none given, that section's defaults."""
    entry = STRATEGY_REGISTRY.entry(name)
    if options is None and entry.config is not None:
        options = entry.config()
    return entry.obj(options)


def own_section(curriculum, name: str):
    """The strategy `name`'s own config section, curriculum.<name>, from the run's curriculum section; None when it
    registered no config (or the schema holds no such section: `strategy_named` then uses its defaults)."""
    if STRATEGY_REGISTRY.entry(name).config is None:
        return None
    return getattr(curriculum, name, None)


class CurriculumSampler(torch.utils.data.Sampler):
    """Yields (index, epoch) pairs of the samples chosen for this epoch, sharded over ranks.

    The chosen set (before sharding) has exactly `selection_size()` samples; it is padded by wrapping to a multiple
    of num_replicas (never truncated, `samplers.pad_and_shard`), so every rank gets the same number of items and no
    sample is dropped. The padded items are the last shard position of some ranks; `samplers.TrainBatchSampler` marks
    them invalid so that they are not counted or trained on twice.

    The shards are strided (`samplers.pad_and_shard`): training step k covers one contiguous block of the global
    order on all ranks together, so the order of an ordered strategy (`Strategy.ordered`) is the order of the
    steps on every rank. `options`: the strategy's own config section (see `strategy_named`)."""

    def __init__(self, difficulty, strategy: str, fraction: float = 0.7, target: float = 0.5, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, start_fraction: float = 0.4, pacing_epochs: int = 10,
                 options=None):
        self.rule = strategy_named(strategy, options)
        self.warmup_rule = AllSamples()
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

    def pool(self) -> EpochPool:
        return EpochPool(self.difficulty, self.target, self.epoch, self.fraction, self.start_fraction,
                         self.pacing_epochs)

    def active_rule(self) -> Strategy:
        # before the first difficulty refresh the scores are placeholders: use the whole set
        return self.warmup_rule if self.use_all else self.rule

    def selection_size(self) -> int:
        return self.active_rule().size(self.pool())

    def num_selected(self) -> int:
        """Distinct samples this epoch trains on over all ranks (padding excluded); see `selection_size`."""
        return self.selection_size()

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, 7])

    def select(self) -> np.ndarray:
        """The chosen indices of this epoch in their global order, identical on every rank: shuffled, or as the
        strategy returned them when it is `ordered`."""
        rng, pool, rule = self._rng(), self.pool(), self.active_rule()
        tie_break = rng.random(self.size)  # drawn for every strategy, so that each keeps its random stream
        chosen = np.asarray(rule.choose(pool, rule.size(pool), rng, tie_break))
        return chosen if rule.ordered else chosen[rng.permutation(len(chosen))]

    def quintiles(self, tie_break: np.ndarray | None = None) -> list[np.ndarray]:
        """The samples split into 5 equal-count difficulty groups, easiest first."""
        return quintiles(self.difficulty, tie_break)

    def target_quintile(self, groups: list[np.ndarray]) -> int:
        return target_quintile(self.difficulty, groups, self.target)

    # ---- Sampler -----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return math.ceil(self.selection_size() / self.num_replicas)

    def shard(self) -> np.ndarray:
        return pad_and_shard(self.select(), self.num_replicas, self.rank)

    def __iter__(self):
        for i in self.shard():
            yield int(i), self.epoch
