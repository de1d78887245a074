"""A curriculum strategy from a plugin file: the hardest samples, trained hardest first within each epoch.

    python train_student_rl.py run.plugins=[examples/plugins/hard_first.py] curriculum.strategy=hard_first \
        curriculum.fraction=0.5 curriculum.hard_first.skip_hardest=0.02

It shares curriculum.fraction with the built-in strategies and brings one key of its own, curriculum.hard_first.*.
`ordered = True` makes the sampler train the selection in the order `choose` returns (no shuffle); every selected
sample still reaches the loss exactly once per epoch, and on several ranks training step k holds the same block of
that order on all of them together.
"""
from dataclasses import dataclass

import numpy as np

from common.config import opt
from common.errors import check
from curriculum_dataloader import STRATEGY_REGISTRY, Strategy


@dataclass
class HardFirstConfig:
    skip_hardest: float = opt(0.0, "share of the training set, the very hardest, left out each epoch (hard "
                                   "outliers are often mislabelled)", ge=0, lt=1)


@STRATEGY_REGISTRY.register("hard_first", config=HardFirstConfig,
                            help="the ceil(f N) hardest samples (after skipping the hardest skip_hardest share), "
                                 "hardest first within the epoch")
class HardFirst(Strategy):
    """hard_first: the M = ceil(f N) samples of largest D_i after the floor(skip_hardest N) largest, in decreasing
    D_i (ties in random order): the epoch trains them hardest first."""

    ordered = True

    @classmethod
    def validate(cls, cfg) -> None:
        c = cfg.curriculum
        check(c.fraction + c.hard_first.skip_hardest <= 1, f"curriculum.fraction={c.fraction} plus "
              f"curriculum.hard_first.skip_hardest={c.hard_first.skip_hardest} exceeds 1: fewer samples are left "
              "than an epoch takes")

    def choose(self, pool, m, rng, tie_break):
        n = len(pool.difficulty)
        skip = min(int(np.floor(self.options.skip_hardest * n)), n - m)  # validate keeps skip + m <= n
        return np.lexsort((tie_break, -pool.difficulty))[skip:skip + m]
