"""Agents that pick the curriculum's action each epoch: the registry of them by name (`agent.name`), each with its
config section (`agent.<name>.*`) declared next to it.

An agent reads its action space from the environment (`env.action_space`, a MultiDiscrete whose `nvec` gives the
size of each action component) and has this interface:

    agent = AGENT_REGISTRY[name].from_config(cfg, env)   # cfg: train_student_rl.RLConfig
    action = agent.act(obs)                               # int64 [len(nvec)]
    agent.observe(obs, action, reward, next_obs, done)    # one transition per epoch
    agent.state_dict() / agent.load_state_dict(state)     # saved in the checkpoint
    AGENT_REGISTRY[name].validate(cfg)                    # optional: checks of several keys, before any work

Under DDP only rank 0's agent acts and observes (engine.curriculum_run.CurriculumRun.decide). A new agent is a
class with these methods, registered with `@AGENT_REGISTRY.register("name", config=ItsConfig, help="...")`, here
or in a file named by run.plugins (examples/plugins/epsilon_greedy.py); its keys are then agent.<name>.*.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from common.config import opt
from common.errors import check
from common.registry import Registry, holds_sections_of
from common.rng import rng_state, set_rng_state
from rl_curriculum_env import ACTION_NVEC


class Agent(Protocol):
    @classmethod
    def from_config(cls, cfg, env) -> Agent: ...

    def act(self, obs: np.ndarray) -> np.ndarray: ...

    def observe(self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray,
                done: bool) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


# agent.fixed_actions: read by the fixed agent alone (its `reads`); set with another agent it is refused
AGENT_REGISTRY = Registry("agent", key="agent.name", sections="agent", shared=("agent.fixed_actions",))


# ================================================================================================================
# Config sections of the agents that have keys of their own (agent.ppo.*, agent.bandit.*).
# ================================================================================================================
@dataclass
class PPOConfig:
    # stable-baselines3 normalises the advantages over each minibatch and the rollout: both need 2 samples or more
    n_steps: int = opt(5, "rollout length in epochs (one PPO update per rollout)", ge=2)
    batch_size: int = opt(5, "minibatch size of the PPO update (at most agent.ppo.n_steps)", ge=2)
    n_epochs: int = opt(4, "passes over each rollout", ge=1)
    lr: float = opt(3e-4, "policy and value learning rate", gt=0)
    gamma: float = opt(0.99, "discount", ge=0, le=1)
    gae_lambda: float = opt(0.95, "GAE lambda", ge=0, le=1)
    clip_range: float = opt(0.2, "PPO clip range", gt=0)
    vf_coef: float = opt(1.0, "value loss coefficient", ge=0)
    ent_coef: float = opt(0.01, "entropy bonus coefficient", ge=0)


@dataclass
class BanditConfig:
    discount: float = opt(0.9, "discount of past rewards (non-stationarity: the best action changes as training goes)",
                          ge=0, le=1)
    reward_std: float = opt(5.0, "assumed reward noise of the Gaussian Thompson sampler", gt=0)
    prior_std: float = opt(10.0, "prior standard deviation of an arm's mean reward", gt=0)


# ================================================================================================================
# Agents.
# ================================================================================================================
class OwnStreams:
    """A private set of Python, NumPy and torch random streams that code which only draws from the global ones
    (stable-baselines3) runs on: `with streams.active():` swaps them in, and on exit keeps where they got to and
    puts the process's own streams back untouched. Saved in the owner's checkpoint (`state`)."""

    def __init__(self):
        self.state: dict | None = None  # None: the body starts from the process's streams (e.g. to seed them)

    @contextlib.contextmanager
    def active(self):
        outer = rng_state()
        if self.state is not None:
            set_rng_state(self.state)
        try:
            yield
        finally:
            self.state = rng_state()
            set_rng_state(outer)


@AGENT_REGISTRY.register("ppo", config=PPOConfig, help="stable-baselines3 PPO, one transition per epoch "
                                                       "(agent.ppo.*)")
class PPOAgent:
    """stable-baselines3 PPO, fed one transition per epoch. The rollout buffer is filled here (not by
    `PPO.learn`, which would own the training loop), and `PPO.train()` runs once per `n_steps` epochs.

    Random streams: PPO(seed=...) seeds Python's, NumPy's and torch's global generators with `seed`
    (stable_baselines3.common.utils.set_random_seed), and the policy samples its actions and shuffles its
    minibatches from those global generators. Both run on the agent's own streams (`OwnStreams`), seeded with
    `seed`: the trainer's per-rank streams (utils.seed_everything(seed, rank)) are never reseeded into one stream
    copied on every rank (a student with dropout would draw the same masks on every shard), rank 0's training draws
    are not shifted by the agent's, and the actions depend on the seed and the agent's history alone, not on how
    many numbers the run drew before (a teacher cache built or reused, for one)."""

    def __init__(self, env, cfg, seed: int):
        from stable_baselines3 import PPO
        from stable_baselines3.common.logger import Logger
        self.streams = OwnStreams()
        with self.streams.active():  # PPO seeds them; the policy is initialised from them
            self.model = PPO("MlpPolicy", env, n_steps=cfg.n_steps, batch_size=cfg.batch_size, n_epochs=cfg.n_epochs,
                             learning_rate=cfg.lr, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda,
                             clip_range=cfg.clip_range, vf_coef=cfg.vf_coef, ent_coef=cfg.ent_coef, seed=seed,
                             device="cpu", verbose=0)
        self.model.set_logger(Logger(folder=None, output_formats=[]))
        self.buffer, self.policy = self.model.rollout_buffer, self.model.policy
        self.episode_start, self.pending, self.updates = True, None, 0

    @classmethod
    def from_config(cls, cfg, env):
        return cls(env, cfg.agent.ppo, cfg.train.seed)

    @classmethod
    def validate(cls, cfg) -> None:
        """Before anything is built: a minibatch larger than the rollout (one environment: n_steps transitions)
        would silently shrink to it."""
        p = cfg.agent.ppo
        check(p.batch_size <= p.n_steps, f"agent.ppo.batch_size={p.batch_size} is larger than the rollout, "
                                         f"agent.ppo.n_steps={p.n_steps} transitions (one per epoch): use "
                                         "agent.ppo.batch_size <= agent.ppo.n_steps")
        check(p.n_steps <= cfg.train.epochs, f"agent.ppo.n_steps={p.n_steps} is more than train.epochs="
                                             f"{cfg.train.epochs}: PPO updates its policy once per rollout of "
                                             "n_steps epochs, so it would never learn and act at random all run; "
                                             "use agent.ppo.n_steps <= train.epochs (or agent.name=bandit)")

    def act(self, obs):
        from stable_baselines3.common.utils import obs_as_tensor
        with torch.no_grad(), self.streams.active():
            actions, values, log_probs = self.policy(obs_as_tensor(obs[None], self.policy.device))
        self.pending = (actions.cpu().numpy(), values, log_probs)
        return self.pending[0][0]

    def observe(self, obs, action, reward, next_obs, done):
        from stable_baselines3.common.utils import obs_as_tensor
        actions, values, log_probs = self.pending
        self.buffer.add(obs[None], actions, np.asarray([reward], dtype=np.float32),
                        np.asarray([self.episode_start]), values, log_probs)
        self.episode_start = bool(done)
        if self.buffer.full:
            with torch.no_grad():
                last_values = self.policy.predict_values(obs_as_tensor(next_obs[None], self.policy.device))
            self.buffer.compute_returns_and_advantage(last_values=last_values, dones=np.asarray([done]))
            with self.streams.active():  # minibatch order (NumPy), any sampling in the update (torch)
                self.model.train()
            self.buffer.reset()
            self.updates += 1

    _BUFFER_FIELDS = ("observations", "actions", "rewards", "returns", "episode_starts", "values", "log_probs",
                      "advantages")

    def state_dict(self):
        return {"policy": self.policy.state_dict(), "optimizer": self.policy.optimizer.state_dict(),
                "buffer": {k: getattr(self.buffer, k).copy() for k in self._BUFFER_FIELDS},
                "pos": self.buffer.pos, "full": self.buffer.full, "episode_start": self.episode_start,
                "updates": self.updates, "n_updates": self.model._n_updates, "streams": self.streams.state}

    def load_state_dict(self, state):
        self.policy.load_state_dict(state["policy"])
        self.policy.optimizer.load_state_dict(state["optimizer"])
        for k in self._BUFFER_FIELDS:
            setattr(self.buffer, k, state["buffer"][k].copy())
        self.buffer.pos, self.buffer.full = state["pos"], state["full"]
        self.episode_start, self.updates, self.model._n_updates = state["episode_start"], state["updates"], \
            state["n_updates"]
        # checkpoints from before the agent had its own streams: it continues from those it was built with
        self.streams.state = state.get("streams", self.streams.state)


@AGENT_REGISTRY.register("bandit", config=BanditConfig, help="discounted Gaussian Thompson sampling over the "
                                                             "joint actions (agent.bandit.*)")
class BanditAgent:
    """Discounted Gaussian Thompson sampling over the prod(nvec) joint actions (5 targets x 3 temperature steps =
    15 for the curriculum environment), arm a = the row-major index of the action.

    Arm a keeps discounted counts n_a = sum_s g^(t-s) [a_s = a] and reward sums r_a. Its posterior mean reward is
    N(r_a / (n_a + k), reward_std^2 / (n_a + k)) with k = reward_std^2 / prior_std^2 (a zero-mean Gaussian prior).
    Discounting by g < 1 forgets old rewards, as the best action drifts while the student learns."""

    def __init__(self, cfg, seed: int, nvec=ACTION_NVEC):
        self.nvec = tuple(int(n) for n in nvec)
        self.discount, self.sigma = cfg.discount, cfg.reward_std
        self.k = (cfg.reward_std / cfg.prior_std) ** 2
        num_arms = int(np.prod(self.nvec))
        self.n, self.r = np.zeros(num_arms), np.zeros(num_arms)
        self.rng = np.random.default_rng([seed, 13])

    @classmethod
    def from_config(cls, cfg, env):
        return cls(cfg.agent.bandit, cfg.train.seed, env.action_space.nvec)

    def act(self, obs):
        mean = self.r / (self.n + self.k)
        std = self.sigma / np.sqrt(self.n + self.k)
        arm = int(np.argmax(self.rng.normal(mean, std)))
        return np.asarray(np.unravel_index(arm, self.nvec), dtype=np.int64)

    def observe(self, obs, action, reward, next_obs, done):
        arm = int(np.ravel_multi_index(tuple(int(a) for a in action), self.nvec))
        self.n *= self.discount
        self.r *= self.discount
        self.n[arm] += 1.0
        self.r[arm] += reward

    def state_dict(self):
        return {"n": self.n.copy(), "r": self.r.copy(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.n, self.r = state["n"].copy(), state["r"].copy()
        self.rng.bit_generator.state = state["rng"]


@AGENT_REGISTRY.register("fixed", help="a control: the actions of agent.fixed_actions, one per epoch")
class FixedAgent:
    """A control: a configured action per epoch (the last one repeats)."""

    reads = ("agent.fixed_actions",)

    def __init__(self, actions):
        self.actions, self.t = [np.asarray(a, dtype=np.int64) for a in actions], 0

    @classmethod
    def from_config(cls, cfg, env):
        return cls(cfg.agent.fixed_actions)

    def act(self, obs):
        return self.actions[min(self.t, len(self.actions) - 1)]

    def observe(self, obs, action, reward, next_obs, done):
        self.t += 1

    def state_dict(self):
        return {"t": self.t}

    def load_state_dict(self, state):
        self.t = state["t"]


@AGENT_REGISTRY.register("random", help="a control: each action component uniform, from a seeded generator")
class RandomAgent:
    """A control: each action component uniform over its nvec values, from a seeded generator."""

    def __init__(self, seed: int, nvec=ACTION_NVEC):
        self.nvec = [int(n) for n in nvec]
        self.rng = np.random.default_rng([seed, 11])

    @classmethod
    def from_config(cls, cfg, env):
        return cls(cfg.train.seed, env.action_space.nvec)

    def act(self, obs):
        return np.asarray([self.rng.integers(n) for n in self.nvec], dtype=np.int64)

    def observe(self, obs, action, reward, next_obs, done):
        pass

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]


@holds_sections_of(AGENT_REGISTRY)
@dataclass
class AgentConfig:
    """agent.name and the fixed agent's actions; every agent's own section (agent.ppo.*, agent.bandit.*, a plugin's)
    is added from the registry (common.registry.compose_schema)."""
    name: str = opt("ppo", "who picks the action each epoch (agents.AGENT_REGISTRY, or one a run.plugins file "
                           "registers)", choices=AGENT_REGISTRY)
    fixed_actions: list[list[int]] = opt([[2, 1]], f"fixed agent: [target index 0-{ACTION_NVEC[0] - 1}, temperature "
                                                   f"step 0-{ACTION_NVEC[1] - 1}] per epoch; the last one repeats "
                                                   "([[2, 1]] = target 0.5, T kept)", ge=0)


def make_agent(cfg, env) -> Agent:
    """The configured agent (UserError listing the registered agents when agent.name is unknown)."""
    return AGENT_REGISTRY[cfg.agent.name].from_config(cfg, env)
