"""A curriculum run: an engine.trainer.Trainer whose training sampler, temperature and extra checkpoint state come
from a curriculum chosen every epoch by a reinforcement-learning agent (train_student_rl.py).

    run = CurriculumRun(cfg, dist, run_dir)    # cfg: engine.rl_schema.RLConfig
    run_training(cfg, dist, CurriculumRun)     # engine.run: a TrainingRun like the Trainer itself

The parts: the trainer (run.trainer, built with curriculum.build_sampler as its sampler factory), the curriculum
(run.curriculum, curriculum.Curriculum: sampler and difficulty refresh, a hook of the trainer), the Gymnasium
environment (run.env, rl_curriculum_env.CurriculumEnv: one step = one epoch, the action of step t applies to the
epoch step t trains; it drives this object as its rl_curriculum_env.CurriculumTraining) and the agent (run.agent,
agents.AGENT_REGISTRY). Extra outputs: curriculum.jsonl, curriculum.png, difficulty/epoch_XXX.{npy,png}.
"""
from __future__ import annotations

import copy
import time
from functools import partial
from pathlib import Path

import numpy as np

import kd_methods
from agents import make_agent
from common.distributed import all_gather_objects, broadcast_object
from common.errors import UserError
from common.metrics import MetricLogger, read_jsonl
from common.rng import rng_state, state_digest, trace, trace_dir
from engine.curriculum_hook import Curriculum, build_sampler
from engine.trainer import Trainer
from rl_curriculum_env import CurriculumEnv


class CurriculumRun:
    """One curriculum run. Joins its trainer only through the Trainer's declared points: the sampler factory,
    the script name, two hooks (this object, which traces each epoch's decision and checkpoints the environment and
    the agent, then the curriculum) and set_temperature. As engine.run.TrainingRun: script, start_epoch,
    load_state, fit, final_report. Callers reach the trainer's own state as run.trainer.<attribute>."""

    script = "train_student_rl"
    name = "agent"  # its entry in the checkpoint's "extra" dict

    def __init__(self, cfg, dist, run_dir: Path | None):
        self.cfg, self.dist, self.run_dir = cfg, dist, run_dir
        self.uses_temperature = kd_methods.uses_temperature(cfg)
        self.trainer = Trainer(cfg, dist, run_dir, sampler=partial(build_sampler, cfg, dist), script=self.script)
        self.curriculum = Curriculum(cfg, self.trainer)
        self.env = CurriculumEnv(self, cfg.train.epochs)
        self.agent = make_agent(cfg, self.env)
        self.resumed, self.last_action = False, None
        # in this order: the decision trace reads the epoch's selection before the curriculum refreshes its scores
        self.trainer.add_hook(self)
        self.trainer.add_hook(self.curriculum)

    # ---- engine.run.TrainingRun ----------------------------------------------------------------------------------
    @property
    def start_epoch(self) -> int:
        return self.trainer.start_epoch

    def load_state(self, ckpt: dict, path: Path) -> None:
        self.trainer.load_state(ckpt, path)  # this object's state comes back through its hook, load_extra_state

    def final_report(self) -> dict:
        return self.trainer.final_report()

    @property
    def inputs(self) -> dict:
        return self.trainer.inputs

    # ---- rl_curriculum_env.CurriculumTraining: what the environment drives --------------------------------------
    @property
    def num_classes(self) -> int:
        return self.trainer.num_classes

    @property
    def temperature(self) -> float:
        return self.trainer.temperature

    @property
    def target(self) -> float:
        return self.curriculum.target

    def apply_curriculum(self, target: float, temperature: float) -> None:
        # rank 0's values on every rank: the shards must partition one selection, trained at one temperature
        target, temperature = broadcast_object((target, temperature))
        self.curriculum.set_target(target)
        if self.uses_temperature:  # else the loss has none: the agent's step is not applied (rl_schema)
            self.trainer.set_temperature(temperature)

    def train_and_validate(self, epoch: int) -> tuple[dict, bool]:
        return self.trainer.train_and_validate(epoch)

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
        start_epoch = self.trainer.start_epoch
        curriculum_log = MetricLogger(self.run_dir / "curriculum.jsonl", self.dist.is_main)
        curriculum_log.truncate_after(start_epoch)
        obs = self.first_observation()
        for epoch in range(start_epoch, self.cfg.train.epochs):
            start = time.perf_counter()
            stats = self.curriculum.difficulty_stats()  # the scores this epoch's selection uses
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
        self.trainer.release_cache()
        if self.dist.is_main:
            plot_curriculum(self.run_dir)

    def action_note(self, action, info: dict, record: dict) -> str:
        """The epoch's action in its console line: the target difficulty, the temperature (the KD loss scales with
        T², so it moves when T does) and the selection those gave, out of the training set."""
        return (f"action {[int(a) for a in action]}: target {info['target']:.2f}, T {info['temperature']:.2f}, "
                f"{record['train/samples']}/{len(self.trainer.splits['train'])} samples")

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
