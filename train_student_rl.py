"""Knowledge distillation with a curriculum chosen every epoch by a reinforcement-learning agent.

    python train_student_rl.py                                     # mini-ImageNet, PPO agent, adaptive curriculum
    python train_student_rl.py agent.name=bandit                   # discounted Thompson sampling over 15 actions
    python train_student_rl.py agent.name=fixed agent.fixed_actions=[[2,1]]     # control: target 0.5, T unchanged
    python train_student_rl.py curriculum.strategy=easy_to_hard agent.name=fixed   # pacing control
    python train_student_rl.py run.name=my_run run.resume=auto     # continue a killed run (agent included)
    torchrun --nproc_per_node=4 train_student_rl.py

    # on the offline quickstart's data and teacher (trained first by teacher.prepare unless it exists)
    python train_student_rl.py --config configs/curriculum_synthetic.yaml agent.name=bandit

Everything train_student.py has (config, cached teacher, AMP, DDP, resume, run directory) comes from its Trainer,
which `CurriculumTrainer` composes with three parts: the curriculum (curriculum.Curriculum: the sampler of
curriculum_dataloader.STRATEGY_REGISTRY's strategy and the difficulty refresh, a hook of the trainer), the Gymnasium
environment (rl_curriculum_env.CurriculumEnv: one step = one epoch, the action of step t applies to the epoch step
t trains) and the agent (agents.AGENT_REGISTRY). Extra outputs: curriculum.jsonl (one line per epoch),
curriculum.png, difficulty/epoch_XXX.{npy,png} at every refresh.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

# the agents and save_difficulty_snapshot are also imported from here (tests, bench.py: this script's parts)
import kd_methods
from agents import AGENT_REGISTRY, AgentConfig, BanditAgent, FixedAgent, PPOAgent, RandomAgent, make_agent
from common.cli import run_cli
from common.config import check_same_config_on_all_ranks, opt, parse_config, section
from common.distributed import all_gather_objects, broadcast_object, cleanup_distributed, setup_distributed
from common.errors import UserError, check
from common.metrics import MetricLogger, read_jsonl
from common.rng import rng_state, state_digest, trace, trace_dir
from curriculum import Curriculum, build_sampler, save_difficulty_snapshot
from curriculum_dataloader import STRATEGIES, STRATEGY_REGISTRY
from rl_curriculum_env import ACTION_NVEC, CurriculumEnv
from train_student import Config, Trainer, prepare_teacher, run_training, validate


# ================================================================================================================
# Config: train_student.py's schema plus three sections.
# ================================================================================================================
@dataclass
class CurriculumConfig:
    strategy: str = opt("adaptive", f"which samples an epoch uses: {', '.join(STRATEGIES)}",
                        choices=STRATEGY_REGISTRY)
    fraction: float = opt(0.7, "f: share of the training set per epoch (random_subset, adaptive, mixed)", gt=0, le=1)
    target: float = opt(0.5, "target difficulty before the agent's first action", ge=0, le=1)
    start_fraction: float = opt(0.4, "easy_to_hard / hard_to_easy: share of the set at epoch 0", gt=0, le=1)
    pacing_epochs: int = opt(10, "easy_to_hard / hard_to_easy: epochs until the whole set is used (0: from the start)",
                             ge=0)


@dataclass
class DifficultyConfig:
    refresh_every: int = opt(5, "recompute the difficulty scores every this many epochs", ge=1)
    warmup_epochs: int = opt(5, "first refresh before this epoch; until then the curriculum uses the whole set", ge=0)


@dataclass
class RLConfig(Config):
    curriculum: CurriculumConfig = section(CurriculumConfig)
    difficulty: DifficultyConfig = section(DifficultyConfig)
    agent: AgentConfig = section(AgentConfig)


def validate_rl(cfg) -> None:
    """train_student.validate, then the curriculum's checks that involve several keys and those of the selected
    agent and strategy (their `validate(cfg)` hooks, when they have one). Each key's own range is declared with it."""
    validate(cfg)
    c = cfg.curriculum
    for component in (AGENT_REGISTRY[cfg.agent.name], STRATEGY_REGISTRY[c.strategy]):
        if hasattr(component, "validate"):
            component.validate(cfg)
    for a in cfg.agent.fixed_actions:
        check(len(a) == len(ACTION_NVEC) and all(0 <= x < n for x, n in zip(a, ACTION_NVEC)),
              f"agent.fixed_actions entry {list(a)}: need [target index 0-{ACTION_NVEC[0] - 1}, temperature step "
              f"0-{ACTION_NVEC[1] - 1}]")
    check(len(cfg.agent.fixed_actions) >= 1, "agent.fixed_actions needs at least one action")
    if STRATEGY_REGISTRY[c.strategy].needs_difficulty:
        check(kd_methods.uses_teacher(cfg), f"curriculum.strategy={c.strategy} ranks samples by difficulty, "
              "which needs a teacher: set kd.alpha < 1 (or a KD method other than label-only kd), or use strategy "
              "all or random_subset")
        check(cfg.teacher.mode == "cached",
              f"curriculum.strategy={c.strategy} scores difficulty from the teacher's cached evaluation-view logits "
              "of the training set, which teacher.mode=online does not build. Use teacher.mode=cached (the "
              "default: it also makes every epoch as cheap as label-only training)")


# ================================================================================================================
# The run: a Trainer with a Curriculum, driven epoch by epoch by the agent through the environment.
# ================================================================================================================
class CurriculumTrainer:
    """One curriculum run. Owns the trainer (train_student.Trainer, built with the curriculum's sampler), the
    curriculum (curriculum.Curriculum: sampler, difficulty refresh), the environment, which drives this object
    through rl_curriculum_env.CurriculumTraining, and the agent. Both this object and the curriculum are hooks of
    the trainer: this one traces each epoch's decision and checkpoints the environment and the agent."""

    script = "train_student_rl"
    name = "agent"  # its entry in the checkpoint's "extra" dict
    # The trainer's attributes, read and set through this object: run_training, bench.py and the tests use a run
    # as a trainer, and a train_epoch replaced here must be the one the environment's steps train with.
    TRAINER_ATTRIBUTES = frozenset({"cfg", "dist", "splits", "student", "num_classes", "temperature", "start_epoch",
                                    "train_sampler", "train_epoch", "train_and_validate", "state_dict", "load_state",
                                    "final_report"})

    def __init__(self, cfg, dist, run_dir: Path | None):
        self.trainer = Trainer(cfg, dist, run_dir, sampler=partial(build_sampler, cfg, dist))
        self.trainer.script = self.script  # its checkpoints, and their messages, are this program's
        self.run_dir = run_dir
        self.curriculum = Curriculum(cfg, self.trainer)
        self.env = CurriculumEnv(self, cfg.train.epochs)
        self.agent = make_agent(cfg, self.env)
        self.resumed, self.last_action = False, None
        # in this order: the decision trace reads the epoch's selection before the curriculum refreshes its scores
        self.trainer.hooks += [self, self.curriculum]

    def __getattr__(self, name):  # only reached for names this object does not hold itself
        if name in CurriculumTrainer.TRAINER_ATTRIBUTES:
            return getattr(self.trainer, name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __setattr__(self, name, value):
        if name in self.TRAINER_ATTRIBUTES:
            setattr(self.trainer, name, value)
        else:
            super().__setattr__(name, value)

    def __delattr__(self, name):  # e.g. undoing a replaced train_epoch brings back the trainer's method
        if name in self.TRAINER_ATTRIBUTES:
            delattr(self.trainer, name)
        else:
            super().__delattr__(name)

    # ---- the curriculum's, for callers of the run ------------------------------------------------------------------
    @property
    def difficulty(self) -> np.ndarray | None:
        return self.curriculum.difficulty

    def refresh_difficulty(self, epoch: int) -> None:
        self.curriculum.refresh_difficulty(epoch)

    def student_train_logits(self) -> np.ndarray:
        return self.curriculum.student_train_logits()

    # ---- rl_curriculum_env.CurriculumTraining: what the environment drives --------------------------------------
    @property
    def target(self) -> float:
        return self.curriculum.target

    def apply_curriculum(self, target: float, temperature: float) -> None:
        # rank 0's values on every rank: the shards must partition one selection, trained at one temperature
        target, temperature = broadcast_object((target, temperature))
        self.curriculum.set_target(target)
        self.temperature = temperature

    def prepare_epoch(self, epoch: int) -> None:
        self.curriculum.prepare(epoch)

    def difficulty_stats(self) -> dict:
        return self.curriculum.difficulty_stats()

    def snapshot(self) -> dict:
        """Everything `restore` needs to put training back where it is now (used by env.reset): the checkpoint
        state, curriculum, environment and agent included."""
        return copy.deepcopy(self.trainer.state_dict(self.env.epoch, all_gather_objects(rng_state())))

    def restore(self, snap: dict) -> None:
        self.trainer.load_state(copy.deepcopy(snap), Path("<snapshot>"))

    # ---- hook of the trainer -------------------------------------------------------------------------------------
    def before_epoch(self, epoch: int) -> None:
        pass

    def after_epoch(self, epoch: int, record: dict) -> None:
        if trace_dir() is not None:  # tests: what this rank trained on, while the sampler still holds this epoch
            sampler = self.curriculum.sampler
            action = None if self.last_action is None else [int(a) for a in self.last_action]
            trace("decisions", {"epoch": epoch, "action": action, "target": sampler.target,
                                "temperature": self.temperature, "selection": [int(i) for i in sampler.select()],
                                "shard": [int(i) for i in sampler.shard()],
                                "difficulty": state_digest(sampler.difficulty)})

    def extra_state(self) -> dict:
        return {"env": self.env.state_dict(), "agent": self.agent.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if not state:  # only train_student.py writes none: its checkpoint has no sampler, agent or environment
            raise UserError("the checkpoint holds no curriculum or agent state: it was written by train_student.py, "
                            "and train_student_rl.py can only continue its own runs. Start a new run.name instead")
        self.env.load_state_dict(state["env"])
        self.agent.load_state_dict(state["agent"])
        self.resumed = True

    # ---- the loop: the agent acts, the environment trains one epoch, the trainer logs and checkpoints ----------
    def decide(self, obs: np.ndarray) -> np.ndarray:
        """This epoch's action: rank 0's agent acts, every rank gets its action. An agent may sample from the
        process's random streams, which differ between ranks, and only rank 0's agent learns, so letting each rank
        act would split one run into several."""
        return broadcast_object(self.agent.act(obs) if self.dist.is_main else None)

    def first_observation(self) -> np.ndarray:
        if self.resumed:  # the environment's state came back with the checkpoint; reset would restart training
            return self.env.observation()
        self.env.epoch = self.start_epoch
        return self.env.reset(seed=self.cfg.train.seed)[0]

    def fit(self, logger: MetricLogger) -> None:
        curriculum_log = MetricLogger(self.run_dir / "curriculum.jsonl", self.dist.is_main)
        curriculum_log.truncate_after(self.start_epoch)
        obs = self.first_observation()
        for epoch in range(self.start_epoch, self.cfg.train.epochs):
            start = time.perf_counter()
            stats = self.difficulty_stats()  # the scores this epoch's selection uses
            action = self.last_action = self.decide(obs)
            next_obs, reward, terminated, _, info = self.env.step(action)
            if self.dist.is_main:  # only rank 0's agent decides, so only it learns; its state is the checkpoint's
                self.agent.observe(obs, action, reward, next_obs, terminated)
            record = self.env.last_record
            curriculum_log.log(self.curriculum_line(epoch, action, reward, info, stats, record))
            record.update({"rl/reward": reward, "rl/target": info["target"],
                           "curriculum/num_samples": record["train/samples"],
                           "time/difficulty_s": self.curriculum.last_refresh_s,
                           "time/step_s": time.perf_counter() - start})
            self.trainer.finish_epoch(epoch, record, self.env.last_improved, logger,
                                      note=self.action_note(action, info, record))
            obs = next_obs
        curriculum_log.close()
        if self.dist.is_main:
            plot_curriculum(self.run_dir)

    def action_note(self, action, info: dict, record: dict) -> str:
        """The epoch's action in its console line: the target difficulty, the temperature (the KD loss scales with
        T², so it moves when T does) and the selection those gave, out of the training set."""
        return (f"action {[int(a) for a in action]}: target {info['target']:.2f}, T {info['temperature']:.2f}, "
                f"{record['train/samples']}/{len(self.splits['train'])} samples")

    def curriculum_line(self, epoch: int, action, reward: float, info: dict, stats: dict, record: dict) -> dict:
        """curriculum.jsonl's line of epoch `epoch`. num_samples: the samples it trained on (after its set_epoch,
        before the next refresh); every selected sample reaches the loss once, so this is the selection size,
        summed over ranks."""
        return {"epoch": epoch, "action": [int(a) for a in action], "target": info["target"],
                "temperature": info["temperature"], "strategy": self.cfg.curriculum.strategy,
                "num_samples": record["train/samples"], "reward": reward,
                **{f"reward_{k}": v for k, v in info["reward_terms"].items()},
                **{f"difficulty_{k}": v for k, v in stats.items()}, "val/acc1": record["val/acc1"],
                "difficulty_refreshed": self.curriculum.refreshed_for == epoch + 1}


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
    check_same_config_on_all_ranks(cfg)
    if cfg.teacher.prepare and kd_methods.uses_teacher(cfg):
        prepare_teacher(cfg, dist)  # a train_student.py run, in its own run directory
    run_training(cfg, dist, CurriculumTrainer)
    cleanup_distributed()


if __name__ == "__main__":
    run_cli(main)
