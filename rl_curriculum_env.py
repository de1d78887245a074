"""The curriculum as a Gymnasium environment: one step is one training epoch.

The action of step t sets the target difficulty and the distillation temperature of the epoch that step t trains;
the observation and reward step t returns describe that same epoch. The reward is `curriculum_reward`.

    env = CurriculumEnv(trainer, num_epochs)      # trainer: a CurriculumTraining (engine.curriculum_run.CurriculumRun)
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(np.array([2, 1]))   # target 0.5, temperature unchanged
"""
from __future__ import annotations

import math
from typing import Protocol

import gymnasium as gym
import numpy as np

TARGETS = (0.0, 0.25, 0.5, 0.75, 1.0)
TEMPERATURE_STEPS = (-0.5, 0.0, 0.5)
TEMPERATURE_RANGE = (2.0, 8.0)
ACTION_NVEC = (len(TARGETS), len(TEMPERATURE_STEPS))  # MultiDiscrete sizes: target index, temperature step
OBS_KEYS = ("epoch_fraction", "val_acc", "val_acc_change", "train_loss", "train_loss_change", "difficulty_mean",
            "difficulty_std", "difficulty_q25", "difficulty_q50", "difficulty_q75", "target", "temperature")


def curriculum_reward_terms(acc: float, prev_acc: float, loss: float, prev_loss: float, epoch: int,
                            num_epochs: int) -> dict[str, float]:
    """The four terms of `curriculum_reward`: {"acc", "loss", "early", "abs"}."""
    return {"acc": 2.0 * (acc - prev_acc) if prev_acc > 0 else 0.0,
            "loss": -min(5.0 * max(loss - prev_loss, 0.0), 5.0) if prev_loss < math.inf else 0.0,
            "early": 2.0 if acc > 60.0 and epoch < 0.3 * num_epochs else 0.0,
            "abs": 0.1 * max(acc - 70.0, 0.0)}


def curriculum_reward(acc: float, prev_acc: float, loss: float, prev_loss: float, epoch: int,
                      num_epochs: int) -> float:
    """Reward of one epoch. acc, prev_acc: validation accuracy in %, a_t and a_{t-1}; loss, prev_loss: training
    loss l_t and l_{t-1}; epoch: 0-based index e of the epoch just trained; E = num_epochs.

        R_acc   = 2.0 (a_t - a_{t-1})                    if a_{t-1} > 0,    else 0
        R_loss  = -min(5.0 max(l_t - l_{t-1}, 0), 5.0)   if l_{t-1} < +inf, else 0
        R_early = 2.0                                    if a_t > 60.0 and e < 0.3 E, else 0
        R_abs   = 0.1 max(a_t - 70.0, 0)
        R       = R_acc + R_loss + R_early + R_abs

    At the first step a_{t-1} = 0 and l_{t-1} = +inf."""
    return sum(curriculum_reward_terms(acc, prev_acc, loss, prev_loss, epoch, num_epochs).values())


def decode_action(action, temperature: float) -> tuple[float, float]:
    """(target difficulty, new temperature) for a MultiDiscrete(ACTION_NVEC) action at the current temperature."""
    a = np.asarray(action).reshape(-1)
    new_t = float(np.clip(temperature + TEMPERATURE_STEPS[int(a[1])], *TEMPERATURE_RANGE))
    return TARGETS[int(a[0])], new_t


class CurriculumTraining(Protocol):
    """What the environment drives: one training run whose curriculum it sets (engine.curriculum_run.CurriculumRun
    is one). The environment needs nothing else of it."""

    temperature: float  # the distillation temperature of the next epoch
    target: float       # the curriculum's target difficulty for the next epoch
    num_classes: int    # C: the observation scales the training loss by log C

    def apply_curriculum(self, target: float, temperature: float) -> None:
        """The action: target and temperature of the epoch trained next."""

    def train_and_validate(self, epoch: int) -> tuple[dict, bool]:
        """Train epoch `epoch`, validate, and make the curriculum ready for the next epoch (a difficulty refresh
        when due). Returns (metrics record with "val/acc1" and "train/loss", whether val/acc1 improved)."""

    def prepare_epoch(self, epoch: int) -> None:
        """Make the curriculum ready for epoch `epoch` (a difficulty refresh when due) before anything trains."""

    def difficulty_stats(self) -> dict[str, float]:
        """Mean, std, q25, q50, q75 of the difficulty scores the next epoch selects by (zeros before any)."""

    def snapshot(self) -> dict:
        """Everything `restore` needs to put training back where it is now."""

    def restore(self, snapshot: dict) -> None:
        """Put training back where `snapshot` was taken (reset: the episode restarts training)."""


class CurriculumEnv(gym.Env):
    """Gymnasium wrapper of a `CurriculumTraining`: one step trains and validates one epoch.

    Observation (float32, 12 values, clipped to [-10, 10]): epoch fraction, validation accuracy / 100 and its
    change, training loss / log C and its change, difficulty mean, std and quartiles, target, (T - 2) / 6.
    `reset()` restores the trainer to its state when the environment was made (the episode restarts training)."""

    metadata = {"render_modes": []}

    def __init__(self, trainer: CurriculumTraining, num_epochs: int, start_epoch: int = 0):
        super().__init__()
        self.trainer, self.num_epochs = trainer, num_epochs
        self.action_space = gym.spaces.MultiDiscrete(ACTION_NVEC)
        self.observation_space = gym.spaces.Box(low=-10.0, high=10.0, shape=(len(OBS_KEYS),), dtype=np.float32)
        self.epoch, self.prev_acc, self.prev_loss = start_epoch, 0.0, math.inf
        self.last_acc_change, self.last_loss_change = 0.0, 0.0
        self._initial = None
        self.last_record, self.last_improved = {}, False

    # ---- state for checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "prev_acc": self.prev_acc, "prev_loss": self.prev_loss,
                "last_acc_change": self.last_acc_change, "last_loss_change": self.last_loss_change}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update({k: state[k] for k in self.state_dict()})

    # ---- gymnasium API -----------------------------------------------------------------------------------------
    def observation(self) -> np.ndarray:
        stats = self.trainer.difficulty_stats()
        log_c = math.log(max(self.trainer.num_classes, 2))
        loss = 0.0 if math.isinf(self.prev_loss) else self.prev_loss / log_c
        values = [self.epoch / max(self.num_epochs, 1), self.prev_acc / 100, self.last_acc_change / 100, loss,
                  self.last_loss_change / log_c, stats["mean"], stats["std"], stats["q25"], stats["q50"],
                  stats["q75"], self.trainer.target, (self.trainer.temperature - TEMPERATURE_RANGE[0]) / 6.0]
        return np.clip(np.asarray(values, dtype=np.float32), -10.0, 10.0)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if self._initial is None:
            self._initial = (self.trainer.snapshot(), self.state_dict())
        else:
            self.trainer.restore(self._initial[0])
            self.load_state_dict(self._initial[1])
        self.trainer.prepare_epoch(self.epoch)  # a difficulty refresh due before the first epoch
        return self.observation(), {}

    def step(self, action):
        target, temperature = decode_action(action, self.trainer.temperature)
        self.trainer.apply_curriculum(target, temperature)  # applies to the epoch trained right now
        temperature = self.trainer.temperature  # as applied: a run whose loss has no temperature keeps its own
        record, improved = self.trainer.train_and_validate(self.epoch)
        acc, loss = record["val/acc1"], record["train/loss"]
        terms = curriculum_reward_terms(acc, self.prev_acc, loss, self.prev_loss, self.epoch, self.num_epochs)
        reward = sum(terms.values())
        self.last_acc_change = acc - self.prev_acc if self.prev_acc > 0 else 0.0
        self.last_loss_change = loss - self.prev_loss if math.isfinite(self.prev_loss) else 0.0
        self.prev_acc, self.prev_loss = acc, loss
        trained_epoch = self.epoch
        self.epoch += 1  # train_and_validate has readied the curriculum for it: the observation shows its scores
        # the full record (with its wall-clock timings) stays out of `info`, which must be deterministic
        self.last_record, self.last_improved = record, improved
        info = {"epoch": trained_epoch, "target": target, "temperature": temperature, "reward_terms": terms,
                "val/acc1": acc, "train/loss": loss}
        return self.observation(), float(reward), self.epoch >= self.num_epochs, False, info
