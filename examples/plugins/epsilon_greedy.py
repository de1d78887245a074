"""An epsilon-greedy agent as a plugin: an agent for train_student_rl.py defined outside the repository's core, with
a key of its own (agent.epsilon_greedy.epsilon).

    python train_student_rl.py run.plugins=[examples/plugins/epsilon_greedy.py] agent.name=epsilon_greedy
    python train_student_rl.py run.plugins=[examples/plugins/epsilon_greedy.py] agent.name=epsilon_greedy \
        agent.epsilon_greedy.epsilon=0.2

The classic bandit rule (Sutton and Barto, "Reinforcement Learning: An Introduction", 2nd ed. 2018, Sec. 2.2-2.4)
over the prod(nvec) joint actions of the environment's MultiDiscrete action space (arm a = the row-major index of
the action): with probability epsilon a uniformly random arm, otherwise the arm with the highest mean reward so far,
untried arms first (in index order). The mean of arm a after its n-th reward r is updated incrementally,
Q_a <- Q_a + (r - Q_a) / n. Its state (counts, means, generator) goes into the checkpoint, so a resumed run acts
as an uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agents import AGENT_REGISTRY
from common.config import opt


@dataclass
class EpsilonGreedyConfig:
    epsilon: float = opt(0.1, "probability of a uniformly random action each epoch; otherwise the action with the "
                              "best mean reward so far (untried actions first)", ge=0, le=1)


@AGENT_REGISTRY.register("epsilon_greedy", config=EpsilonGreedyConfig,
                         help="epsilon-greedy over the joint actions (agent.epsilon_greedy.*; "
                              "examples/plugins/epsilon_greedy.py)")
class EpsilonGreedyAgent:
    """Sample-average epsilon-greedy over the joint actions; see the module docstring."""

    def __init__(self, epsilon: float, seed: int, nvec):
        self.epsilon, self.nvec = float(epsilon), tuple(int(n) for n in nvec)
        arms = int(np.prod(self.nvec))
        self.counts, self.means = np.zeros(arms), np.zeros(arms)
        self.rng = np.random.default_rng([seed, 17])

    @classmethod
    def from_config(cls, cfg, env):
        return cls(cfg.agent.epsilon_greedy.epsilon, cfg.train.seed, env.action_space.nvec)

    def act(self, obs):
        explore, random_arm = self.rng.random() < self.epsilon, int(self.rng.integers(len(self.counts)))
        # both numbers are drawn every epoch, so the stream's position does not depend on the choices made
        greedy = int(np.argmax(np.where(self.counts == 0, np.inf, self.means)))
        return np.asarray(np.unravel_index(random_arm if explore else greedy, self.nvec), dtype=np.int64)

    def observe(self, obs, action, reward, next_obs, done):
        arm = int(np.ravel_multi_index(tuple(int(a) for a in action), self.nvec))
        self.counts[arm] += 1
        self.means[arm] += (float(reward) - self.means[arm]) / self.counts[arm]

    def state_dict(self):
        return {"counts": self.counts.copy(), "means": self.means.copy(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.counts, self.means = state["counts"].copy(), state["means"].copy()
        self.rng.bit_generator.state = state["rng"]
