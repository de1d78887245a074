"""The curriculum as a component of an engine.trainer.Trainer: its sampler, the difficulty refresh, their state.

    trainer = Trainer(cfg, dist, run_dir, sampler=partial(build_sampler, cfg, dist))   # cfg: engine.rl_schema.RLConfig
    curriculum = Curriculum(cfg, trainer)      # scores with the trainer's student, drives the trainer's sampler
    trainer.add_hook(curriculum)               # refreshes when due around each epoch; saved under "curriculum"

The difficulty refresh (every `difficulty.refresh_every` epochs from `difficulty.warmup_epochs` on) scores every
training image with the score that difficulty.score selects (`score_difficulty`, models.DIFFICULTY_SCORES) from
the teacher cache's evaluation-view logits and the student's logits on the same views, hands the scores to the
sampler and writes difficulty/epoch_XXX.{npy,png}. Before the first refresh a strategy that ranks by difficulty
uses the whole set.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from common.config import to_plain
from common.distributed import all_gather_objects, broadcast_buffers, broadcast_object
from common.errors import UserError
from common.rng import rng_isolated
from curriculum_dataloader import CurriculumSampler, own_section, strategy_named
from imagedata.normalization import input_norm, normalize_batch
from imagedata.samplers import ShardSampler
from imagedata.views import EvalViews, make_loader
from models import DIFFICULTY_SCORES


def build_sampler(cfg, dist, num_samples: int) -> CurriculumSampler:
    """The training sampler of a curriculum run (engine.trainer.Trainer's `sampler`), with placeholder scores: a
    strategy that ranks by difficulty uses the whole set until the first refresh."""
    c = cfg.curriculum
    sampler = CurriculumSampler(np.zeros(num_samples), c.strategy, c.fraction, c.target, cfg.train.seed,
                                dist.world_size, dist.rank, c.start_fraction, c.pacing_epochs,
                                own_section(c, c.strategy))
    sampler.use_all = strategy_named(c.strategy).needs_difficulty
    return sampler


def score_difficulty(cfg, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> np.ndarray:
    """The difficulty of every training image, float32 [N], from the score difficulty.score selects, called with
    its own keys (difficulty.<score>.*) as keyword arguments. What it returns must be one finite number in [0, 1]
    per image (the strategies compare it with targets in [0, 1]): anything else stops the run, naming the score."""
    name = cfg.difficulty.score
    entry = DIFFICULTY_SCORES.entry(name)
    options = to_plain(cfg.difficulty[name]) if entry.config is not None else {}
    scores = entry.obj(teacher_logits, student_logits, **options)
    n = teacher_logits.shape[0]
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (n,):
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise UserError(f"difficulty.score={name} returned {got}, not a tensor of {n} scores (one per training "
                        "image): a score maps logits [N, C] to D [N]")
    d = scores.detach().float().cpu()
    if not bool(torch.isfinite(d).all()) or bool(((d < 0) | (d > 1)).any()):
        bad = d[~torch.isfinite(d) | (d < 0) | (d > 1)][0].item()
        raise UserError(f"difficulty.score={name} returned {bad} for some image; a difficulty score must be a "
                        "finite number in [0, 1]")
    return d.numpy()


class Curriculum:
    """Owns the trainer's CurriculumSampler (built by `build_sampler`) and the difficulty refresh; a hook of the
    trainer (engine.trainer.Trainer's `hooks`)."""

    name = "curriculum"

    def __init__(self, cfg, trainer):
        self.cfg, self.trainer = cfg, trainer
        self.sampler: CurriculumSampler = trainer.train_sampler
        dist = trainer.dist
        self.train_eval_loader = make_loader(EvalViews(trainer.splits["train"], trainer.spec),
                                             ShardSampler(len(trainer.splits["train"]), dist.world_size, dist.rank),
                                             cfg.train.eval_batch_size, cfg.data.workers, trainer.device)
        self.difficulty: np.ndarray | None = None  # float32 [N], the scores of the last refresh
        self.refreshed_for = -1  # the epoch whose difficulty is current
        self.last_refresh_s = 0.0

    @property
    def target(self) -> float:
        return self.sampler.target

    def set_target(self, target: float) -> None:
        self.sampler.set_target(target)

    # ---- hook: a refresh when due --------------------------------------------------------------------------------
    def refresh_due(self, epoch: int) -> bool:
        d = self.cfg.difficulty
        return (self.trainer.cache is not None and epoch >= d.warmup_epochs
                and (epoch - d.warmup_epochs) % d.refresh_every == 0 and self.refreshed_for != epoch
                and epoch < self.cfg.train.epochs)

    def prepare(self, epoch: int) -> None:
        """Before epoch `epoch`: refresh the difficulty scores when due."""
        if self.refresh_due(epoch):
            self.refresh_difficulty(epoch)

    def before_epoch(self, epoch: int) -> None:
        self.last_refresh_s = 0.0
        self.prepare(epoch)  # the first epoch, or a resume; otherwise after_epoch has done it

    def after_epoch(self, epoch: int, record: dict) -> None:
        # the next epoch's scores now, so that the agent's next observation and this epoch's checkpoint hold them
        self.prepare(epoch + 1)

    # ---- the refresh ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def student_train_logits(self) -> np.ndarray:
        """The student's logits on the evaluation view of every training image (eval mode, no grad), computed on
        each rank's shard and gathered: float32 [N, C] on every rank. The student returns to its previous mode."""
        t = self.trainer
        broadcast_buffers(t.student)  # rank 0's BatchNorm statistics on every shard (see Trainer.evaluate)
        t.trace_weights("difficulty")
        was_training = t.student.training
        t.student.eval()
        indices, logits = [], []
        for batch in self.train_eval_loader:
            x = normalize_batch(batch["image"], t.device, t.channels_last, input_norm(t.student))
            with t.autocast():
                out = t.student(x)
            indices.append(batch["index"].numpy())
            logits.append(out.float().cpu().numpy())
        t.student.train(was_training)
        full = np.zeros((len(t.splits["train"]), t.num_classes), dtype=np.float32)
        for idx, lg in all_gather_objects((np.concatenate(indices), np.concatenate(logits))):
            full[idx] = lg
        return full

    @rng_isolated()
    def refresh_difficulty(self, epoch: int) -> None:
        """Score every training image now (isolated from training's random streams: its loader draws a seed, and
        when and how often refreshes happen must not change what training draws)."""
        start = time.perf_counter()
        teacher = torch.from_numpy(np.asarray(self.trainer.cache.eval_logits("train"), dtype=np.float32))
        student = torch.from_numpy(self.student_train_logits())
        # rank 0's scores on every rank, so that all of them derive the same selection from them
        self.difficulty = broadcast_object(score_difficulty(self.cfg, teacher, student))
        self.sampler.update_difficulty(self.difficulty)
        self.sampler.use_all = False
        self.refreshed_for = epoch
        self.last_refresh_s = time.perf_counter() - start
        if self.trainer.dist.is_main and self.trainer.run_dir is not None:
            save_difficulty_snapshot(self.difficulty, self.trainer.run_dir / "difficulty", epoch)

    def difficulty_stats(self) -> dict:
        if self.difficulty is None:
            return {"mean": 0.0, "std": 0.0, "q25": 0.0, "q50": 0.0, "q75": 0.0}
        q25, q50, q75 = np.quantile(self.difficulty, [0.25, 0.5, 0.75])
        return {"mean": float(self.difficulty.mean()), "std": float(self.difficulty.std()), "q25": float(q25),
                "q50": float(q50), "q75": float(q75)}

    # ---- hook: checkpoint state ------------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "difficulty": self.difficulty,
                "refreshed_for": self.refreshed_for}

    def load_extra_state(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.difficulty, self.refreshed_for = state["difficulty"], state["refreshed_for"]


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
