"""Knowledge distillation with a curriculum chosen every epoch by a reinforcement-learning agent.

    python train_student_rl.py                                     # mini-ImageNet, PPO agent, adaptive curriculum
    python train_student_rl.py agent.name=bandit                   # discounted Thompson sampling over 15 actions
    python train_student_rl.py agent.name=fixed agent.fixed_actions=[[2,1]]     # control: target 0.5, T unchanged
    python train_student_rl.py curriculum.strategy=easy_to_hard agent.name=fixed   # pacing control
    python train_student_rl.py run.name=my_run run.resume=auto     # continue a killed run (agent included)
    torchrun --nproc_per_node=4 train_student_rl.py

    # on the offline quickstart's data and teacher (run configs/quickstart_teacher.yaml first)
    python train_student_rl.py --config configs/curriculum_synthetic.yaml agent.name=bandit

Everything train_student.py has (config, cached teacher, AMP, DDP, resume, run directory) comes from its Trainer;
this script adds the difficulty score (models.difficulty_score), the curriculum sampler
(curriculum_dataloader.CurriculumSampler), the Gymnasium environment (rl_curriculum_env.CurriculumEnv: one step =
one epoch, the action of step t applies to the epoch step t trains) and the agent. Extra outputs:
curriculum.jsonl (one line per epoch), curriculum.png, difficulty/epoch_XXX.{npy,png} at every refresh.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from curriculum_dataloader import DIFFICULTY_STRATEGIES, STRATEGIES, CurriculumSampler
from normalization import input_norm, normalize_batch
from samplers import ShardSampler
from views import EvalViews, make_loader
from models import difficulty_score
from rl_curriculum_env import TARGETS, CurriculumEnv
from train_student import Config, Trainer, run_training, validate
from utils import (MetricLogger, UserError, all_gather_objects, broadcast_buffers, broadcast_object, check,
                   cleanup_distributed, opt, parse_config, read_jsonl, rng_state, run_cli, section, setup_distributed,
                   state_digest, trace, trace_dir)

AGENTS = ("ppo", "bandit", "fixed", "random")


# ================================================================================================================
# Config: train_student.py's schema plus three sections.
# ================================================================================================================
@dataclass
class CurriculumConfig:
    strategy: str = opt("adaptive", f"which samples an epoch uses: {', '.join(STRATEGIES)}")
    fraction: float = opt(0.7, "f: share of the training set per epoch (random_subset, adaptive, mixed)")
    target: float = opt(0.5, "target difficulty before the agent's first action")
    start_fraction: float = opt(0.4, "easy_to_hard / hard_to_easy: share of the set at epoch 0")
    pacing_epochs: int = opt(10, "easy_to_hard / hard_to_easy: epochs until the whole set is used")


@dataclass
class DifficultyConfig:
    refresh_every: int = opt(5, "recompute the difficulty scores every this many epochs")
    warmup_epochs: int = opt(5, "first refresh before this epoch; until then the curriculum uses the whole set")


@dataclass
class PPOConfig:
    n_steps: int = opt(5, "rollout length in epochs (one PPO update per rollout)")
    batch_size: int = opt(5, "minibatch size of the PPO update")
    n_epochs: int = opt(4, "passes over each rollout")
    lr: float = opt(3e-4, "policy and value learning rate")
    gamma: float = opt(0.99, "discount")
    gae_lambda: float = opt(0.95, "GAE lambda")
    clip_range: float = opt(0.2, "PPO clip range")
    vf_coef: float = opt(1.0, "value loss coefficient")
    ent_coef: float = opt(0.01, "entropy bonus coefficient")


@dataclass
class BanditConfig:
    discount: float = opt(0.9, "discount of past rewards (non-stationarity: the best action changes as training goes)")
    reward_std: float = opt(5.0, "assumed reward noise of the Gaussian Thompson sampler")
    prior_std: float = opt(10.0, "prior standard deviation of an arm's mean reward")


@dataclass
class AgentConfig:
    name: str = opt("ppo", f"who picks the action each epoch: {', '.join(AGENTS)}")
    fixed_actions: list[list[int]] = opt([[2, 1]], "fixed agent: [target index 0-4, temperature step 0-2] per "
                                                   "epoch; the last one repeats ([[2, 1]] = target 0.5, T kept)")
    ppo: PPOConfig = section(PPOConfig)
    bandit: BanditConfig = section(BanditConfig)


@dataclass
class RLConfig(Config):
    curriculum: CurriculumConfig = section(CurriculumConfig)
    difficulty: DifficultyConfig = section(DifficultyConfig)
    agent: AgentConfig = section(AgentConfig)


def validate_rl(cfg) -> None:
    validate(cfg)
    c = cfg.curriculum
    check(c.strategy in STRATEGIES,
          f"unknown curriculum.strategy '{c.strategy}'; choose one of {', '.join(STRATEGIES)}")
    check(cfg.agent.name in AGENTS, f"unknown agent.name '{cfg.agent.name}'; choose one of {', '.join(AGENTS)}")
    check(0 < c.fraction <= 1, f"curriculum.fraction={c.fraction} must lie in (0, 1]")
    check(0 <= c.target <= 1, f"curriculum.target={c.target} must lie in [0, 1]")
    check(0 < c.start_fraction <= 1, f"curriculum.start_fraction={c.start_fraction} must lie in (0, 1]")
    check(cfg.difficulty.refresh_every >= 1, "difficulty.refresh_every must be >= 1")
    check(cfg.difficulty.warmup_epochs >= 0, "difficulty.warmup_epochs must be >= 0")
    for a in cfg.agent.fixed_actions:
        check(len(a) == 2 and 0 <= a[0] < 5 and 0 <= a[1] < 3,
              f"agent.fixed_actions entry {list(a)}: need [target index 0-4, temperature step 0-2]")
    check(len(cfg.agent.fixed_actions) >= 1, "agent.fixed_actions needs at least one action")
    if c.strategy in DIFFICULTY_STRATEGIES:
        check(cfg.kd.alpha < 1, f"curriculum.strategy={c.strategy} ranks samples by difficulty, which needs a "
                                "teacher: set kd.alpha < 1, or use strategy all or random_subset")
        check(cfg.teacher.mode == "cached",
              f"curriculum.strategy={c.strategy} scores difficulty from the teacher's cached evaluation-view logits "
              "of the training set, which teacher.mode=online does not build. Use teacher.mode=cached (the "
              "default: it also makes every epoch as cheap as label-only training)")


# ================================================================================================================
# Agents: act(obs) -> action, observe(...), state_dict / load_state_dict.
# ================================================================================================================
class FixedAgent:
    """A control: a configured action per epoch (the last one repeats)."""

    def __init__(self, actions):
        self.actions, self.t = [np.asarray(a, dtype=np.int64) for a in actions], 0

    def act(self, obs):
        return self.actions[min(self.t, len(self.actions) - 1)]

    def observe(self, obs, action, reward, next_obs, done):
        self.t += 1

    def state_dict(self):
        return {"t": self.t}

    def load_state_dict(self, state):
        self.t = state["t"]


class RandomAgent:
    """A control: uniformly random actions from a seeded generator."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng([seed, 11])

    def act(self, obs):
        return np.asarray([self.rng.integers(len(TARGETS)), self.rng.integers(3)], dtype=np.int64)

    def observe(self, obs, action, reward, next_obs, done):
        pass

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]


class BanditAgent:
    """Discounted Gaussian Thompson sampling over the 15 joint actions (5 targets x 3 temperature steps).

    Arm a keeps discounted counts n_a = sum_s g^(t-s) [a_s = a] and reward sums r_a. Its posterior mean reward is
    N(r_a / (n_a + k), reward_std^2 / (n_a + k)) with k = reward_std^2 / prior_std^2 (a zero-mean Gaussian prior).
    Discounting by g < 1 forgets old rewards, as the best action drifts while the student learns."""

    def __init__(self, cfg, seed: int, num_arms: int = 15):
        self.discount, self.sigma = cfg.discount, cfg.reward_std
        self.k = (cfg.reward_std / cfg.prior_std) ** 2
        self.n, self.r = np.zeros(num_arms), np.zeros(num_arms)
        self.rng = np.random.default_rng([seed, 13])

    def act(self, obs):
        mean = self.r / (self.n + self.k)
        std = self.sigma / np.sqrt(self.n + self.k)
        arm = int(np.argmax(self.rng.normal(mean, std)))
        return np.asarray(divmod(arm, 3), dtype=np.int64)

    def observe(self, obs, action, reward, next_obs, done):
        arm = int(action[0]) * 3 + int(action[1])
        self.n *= self.discount
        self.r *= self.discount
        self.n[arm] += 1.0
        self.r[arm] += reward

    def state_dict(self):
        return {"n": self.n.copy(), "r": self.r.copy(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.n, self.r = state["n"].copy(), state["r"].copy()
        self.rng.bit_generator.state = state["rng"]


class PPOAgent:
    """stable-baselines3 PPO, fed one transition per epoch. The rollout buffer is filled here (not by
    `PPO.learn`, which would own the training loop), and `PPO.train()` runs once per `n_steps` epochs."""

    def __init__(self, env, cfg, seed: int):
        from stable_baselines3 import PPO
        from stable_baselines3.common.logger import Logger
        self.model = PPO("MlpPolicy", env, n_steps=cfg.n_steps, batch_size=cfg.batch_size, n_epochs=cfg.n_epochs,
                         learning_rate=cfg.lr, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, clip_range=cfg.clip_range,
                         vf_coef=cfg.vf_coef, ent_coef=cfg.ent_coef, seed=seed, device="cpu", verbose=0)
        self.model.set_logger(Logger(folder=None, output_formats=[]))
        self.buffer, self.policy = self.model.rollout_buffer, self.model.policy
        self.episode_start, self.pending, self.updates = True, None, 0

    def act(self, obs):
        from stable_baselines3.common.utils import obs_as_tensor
        with torch.no_grad():
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
            self.model.train()
            self.buffer.reset()
            self.updates += 1

    _BUFFER_FIELDS = ("observations", "actions", "rewards", "returns", "episode_starts", "values", "log_probs",
                      "advantages")

    def state_dict(self):
        return {"policy": self.policy.state_dict(), "optimizer": self.policy.optimizer.state_dict(),
                "buffer": {k: getattr(self.buffer, k).copy() for k in self._BUFFER_FIELDS},
                "pos": self.buffer.pos, "full": self.buffer.full, "episode_start": self.episode_start,
                "updates": self.updates, "n_updates": self.model._n_updates}

    def load_state_dict(self, state):
        self.policy.load_state_dict(state["policy"])
        self.policy.optimizer.load_state_dict(state["optimizer"])
        for k in self._BUFFER_FIELDS:
            setattr(self.buffer, k, state["buffer"][k].copy())
        self.buffer.pos, self.buffer.full = state["pos"], state["full"]
        self.episode_start, self.updates, self.model._n_updates = state["episode_start"], state["updates"], \
            state["n_updates"]


def make_agent(cfg, env):
    name, seed = cfg.agent.name, cfg.train.seed
    if name == "ppo":
        return PPOAgent(env, cfg.agent.ppo, seed)
    if name == "bandit":
        return BanditAgent(cfg.agent.bandit, seed)
    if name == "fixed":
        return FixedAgent(cfg.agent.fixed_actions)
    if name == "random":
        return RandomAgent(seed)
    raise UserError(f"unknown agent.name '{name}'; choose one of {', '.join(AGENTS)}")


# ================================================================================================================
# The trainer: train_student.Trainer with a curriculum sampler, difficulty refreshes and an agent loop.
# ================================================================================================================
class CurriculumTrainer(Trainer):
    script = "train_student_rl"

    def __init__(self, cfg, dist, run_dir: Path | None):
        self.target = float(cfg.curriculum.target)
        super().__init__(cfg, dist, run_dir)
        n = len(self.splits["train"])
        self.train_eval_loader = make_loader(EvalViews(self.splits["train"], self.spec),
                                             ShardSampler(n, dist.world_size, dist.rank), cfg.train.eval_batch_size,
                                             cfg.data.workers, self.device)
        self.difficulty: np.ndarray | None = None
        self.refreshed_for = -1  # the epoch whose difficulty is current
        self.last_refresh_s = 0.0
        self.env = CurriculumEnv(self, cfg.train.epochs)
        self.agent = make_agent(cfg, self.env)
        self.resumed = False
        self.last_action = None

    def build_train_sampler(self):
        c = self.cfg.curriculum
        sampler = CurriculumSampler(np.zeros(len(self.splits["train"])), c.strategy, c.fraction, c.target,
                                    self.cfg.train.seed, self.dist.world_size, self.dist.rank, c.start_fraction,
                                    c.pacing_epochs)
        sampler.use_all = c.strategy in DIFFICULTY_STRATEGIES  # whole set until the first difficulty refresh
        return sampler

    # ---- what the environment drives ---------------------------------------------------------------------------
    def apply_curriculum(self, target: float, temperature: float) -> None:
        # rank 0's values on every rank: the shards must partition one selection, trained at one temperature
        target, temperature = broadcast_object((target, temperature))
        self.target, self.temperature = target, temperature
        self.train_sampler.set_target(target)

    def train_and_validate(self, epoch: int) -> tuple[dict, bool]:
        out = super().train_and_validate(epoch)
        if trace_dir() is not None:  # tests: what this rank trained on, while the sampler still holds this epoch
            selection = self.train_sampler.select()
            action = None if self.last_action is None else [int(a) for a in self.last_action]
            trace("decisions", {"epoch": epoch, "action": action, "target": self.train_sampler.target,
                                "temperature": self.temperature, "selection": [int(i) for i in selection],
                                "shard": [int(i) for i in self.train_sampler.shard()],
                                "difficulty": state_digest(self.train_sampler.difficulty)})
        return out

    def refresh_due(self, epoch: int) -> bool:
        d = self.cfg.difficulty
        return (self.cache is not None and epoch >= d.warmup_epochs and (epoch - d.warmup_epochs) % d.refresh_every == 0
                and self.refreshed_for != epoch and epoch < self.cfg.train.epochs)

    def prepare_epoch(self, epoch: int) -> None:
        """Before epoch `epoch`: refresh the difficulty scores when due."""
        if self.refresh_due(epoch):
            self.refresh_difficulty(epoch)

    @torch.no_grad()
    def student_train_logits(self) -> np.ndarray:
        """The student's logits on the evaluation view of every training image (eval mode, no grad), computed on
        each rank's shard and gathered: float32 [N, C] on every rank. The student returns to its previous mode."""
        broadcast_buffers(self.student)  # rank 0's BatchNorm statistics on every shard (see Trainer.evaluate)
        self.trace_weights("difficulty")
        was_training = self.student.training
        self.student.eval()
        indices, logits = [], []
        for batch in self.train_eval_loader:
            x = normalize_batch(batch["image"], self.device, self.channels_last, input_norm(self.student))
            with self.autocast():
                out = self.student(x)
            indices.append(batch["index"].numpy())
            logits.append(out.float().cpu().numpy())
        self.student.train(was_training)
        full = np.zeros((len(self.splits["train"]), self.num_classes), dtype=np.float32)
        for idx, lg in all_gather_objects((np.concatenate(indices), np.concatenate(logits))):
            full[idx] = lg
        return full

    def refresh_difficulty(self, epoch: int) -> None:
        start = time.perf_counter()
        teacher = torch.from_numpy(np.asarray(self.cache.eval_logits("train"), dtype=np.float32))
        student = torch.from_numpy(self.student_train_logits())
        # rank 0's scores on every rank, so that all of them derive the same selection from them
        self.difficulty = broadcast_object(difficulty_score(teacher, student).numpy())
        self.train_sampler.update_difficulty(self.difficulty)
        self.train_sampler.use_all = False
        self.refreshed_for = epoch
        self.last_refresh_s = time.perf_counter() - start
        if self.dist.is_main and self.run_dir is not None:
            save_difficulty_snapshot(self.difficulty, self.run_dir / "difficulty", epoch)

    def difficulty_stats(self) -> dict:
        if self.difficulty is None:
            return {"mean": 0.0, "std": 0.0, "q25": 0.0, "q50": 0.0, "q75": 0.0}
        q25, q50, q75 = np.quantile(self.difficulty, [0.25, 0.5, 0.75])
        return {"mean": float(self.difficulty.mean()), "std": float(self.difficulty.std()), "q25": float(q25),
                "q50": float(q50), "q75": float(q75)}

    def snapshot(self) -> dict:
        """Everything `restore` needs to put training back where it is now (used by env.reset)."""
        return copy.deepcopy({"trainer": self.state_dict(self.env.epoch, all_gather_objects(rng_state())),
                              "curriculum": self.curriculum_state()})

    def restore(self, snap: dict) -> None:
        self.load_state(copy.deepcopy(snap["trainer"]), Path("<snapshot>"))
        self.load_curriculum_state(copy.deepcopy(snap["curriculum"]))

    # ---- checkpoint state --------------------------------------------------------------------------------------
    def curriculum_state(self) -> dict:
        return {"sampler": self.train_sampler.state_dict(), "target": self.target, "difficulty": self.difficulty,
                "refreshed_for": self.refreshed_for}

    def load_curriculum_state(self, state: dict) -> None:
        self.train_sampler.load_state_dict(state["sampler"])
        self.target, self.difficulty, self.refreshed_for = state["target"], state["difficulty"], state["refreshed_for"]

    def extra_state(self) -> dict:
        return {**self.curriculum_state(), "env": self.env.state_dict(), "agent": self.agent.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if not state:  # only train_student.py writes none: its checkpoint has no sampler, agent or environment
            raise UserError("the checkpoint holds no curriculum or agent state: it was written by train_student.py, "
                            "and train_student_rl.py can only continue its own runs. Start a new run.name instead")
        self.load_curriculum_state(state)
        if "env" in state and hasattr(self, "env"):
            self.env.load_state_dict(state["env"])
            self.agent.load_state_dict(state["agent"])
            self.resumed = True

    def decide(self, obs: np.ndarray) -> np.ndarray:
        """This epoch's action: rank 0's agent acts, every rank gets its action. Agents sample from the process's
        random streams, which differ between ranks, so letting each rank act would split one run into several."""
        return broadcast_object(self.agent.act(obs) if self.dist.is_main else None)

    # ---- the loop: the agent acts, the environment trains one epoch, the base trainer logs and checkpoints -----
    def fit(self, logger: MetricLogger) -> None:
        curriculum_log = MetricLogger(self.run_dir / "curriculum.jsonl", self.dist.is_main)
        curriculum_log.truncate_after(self.start_epoch)
        if self.resumed:  # the environment's state came back with the checkpoint; reset would restart training
            obs = self.env.observation()
        else:
            self.env.epoch = self.start_epoch
            obs, _ = self.env.reset(seed=self.cfg.train.seed)
        for epoch in range(self.start_epoch, self.cfg.train.epochs):
            start = time.perf_counter()
            self.last_refresh_s = 0.0
            stats = self.difficulty_stats()  # the scores this epoch's selection uses
            action = self.last_action = self.decide(obs)
            next_obs, reward, terminated, _, info = self.env.step(action)
            if self.dist.is_main:  # only rank 0's agent decides, so only it learns; its state is the checkpoint's
                self.agent.observe(obs, action, reward, next_obs, terminated)
            record = self.env.last_record
            # the samples this epoch trained on (after its set_epoch, before the next refresh): every selected
            # sample reaches the loss once, so this is the selection size, summed over ranks
            num_samples = record["train/samples"]
            line = {"epoch": epoch, "action": [int(a) for a in action], "target": info["target"],
                    "temperature": info["temperature"], "strategy": self.cfg.curriculum.strategy,
                    "num_samples": num_samples, "reward": reward,
                    **{f"reward_{k}": v for k, v in info["reward_terms"].items()},
                    **{f"difficulty_{k}": v for k, v in stats.items()}, "val/acc1": record["val/acc1"],
                    "difficulty_refreshed": self.refreshed_for == epoch + 1}
            curriculum_log.log(line)
            record.update({"rl/reward": reward, "rl/target": info["target"], "curriculum/num_samples": num_samples,
                           "time/difficulty_s": self.last_refresh_s, "time/step_s": time.perf_counter() - start})
            self.finish_epoch(epoch, record, self.env.last_improved, logger)
            obs = next_obs
        curriculum_log.close()
        if self.dist.is_main:
            plot_curriculum(self.run_dir)


def save_difficulty_snapshot(difficulty: np.ndarray, folder: Path, epoch: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"epoch_{epoch:03d}.npy", difficulty)
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.hist(difficulty, bins=40, range=(0, 1), color="tab:purple")
    ax.set_title(f"difficulty before epoch {epoch + 1}")
    ax.set_xlabel("D")
    fig.tight_layout()
    fig.savefig(folder / f"epoch_{epoch:03d}.png", dpi=100)
    plt.close(fig)


def plot_curriculum(run_dir: Path) -> None:
    """curriculum.png: target, temperature, reward and validation accuracy per epoch, and difficulty histograms."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lines = read_jsonl(run_dir / "curriculum.jsonl")
    if not lines:
        return
    snaps = sorted((run_dir / "difficulty").glob("epoch_*.npy"))
    picks = [snaps[i] for i in sorted({0, len(snaps) // 2, len(snaps) - 1})] if snaps else []
    fig, axes = plt.subplots(2 if picks else 1, 4, figsize=(16, 6.4 if picks else 3.2), squeeze=False)
    epochs = [ln["epoch"] + 1 for ln in lines]
    for ax, key, title in zip(axes[0], ("target", "temperature", "reward", "val/acc1"),
                              ("target difficulty", "temperature", "reward", "validation top-1 (%)")):
        ax.plot(epochs, [ln[key] for ln in lines], marker="o", ms=3)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if picks:
        for ax, path in zip(axes[1], picks):
            ax.hist(np.load(path), bins=40, range=(0, 1), color="tab:purple")
            ax.set_title(f"difficulty before epoch {int(path.stem.split('_')[1]) + 1}")
            ax.set_xlabel("D")
        for ax in axes[1][len(picks):]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(run_dir / "curriculum.png", dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> None:
    cfg = parse_config(RLConfig, argv, prog="train_student_rl.py", doc=__doc__)
    validate_rl(cfg)
    dist = setup_distributed(cfg.train.device)
    run_training(cfg, dist, CurriculumTrainer)
    cleanup_distributed()


if __name__ == "__main__":
    run_cli(main)
