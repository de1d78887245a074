"""The gan_vae student phase: replay batches from the experts, per-row expert weights, the relational temperature,
and one update of the beta-VAE student on the sum of the registered loss terms (gan_vae.losses)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from gan_vae.experts import ExpertPool, frozen_copy, step_seed
from gan_vae.losses import StudentStep, student_loss
from models import TaskVAE


def expert_weight(fid: float, threshold: float, floor: float, ceiling: float) -> float:
    """Replay and distillation weight of an expert, decreasing with its latest FID: clip(threshold / FID,
    floor, ceiling) (an expert at the threshold gets 1, one twice as far gets 1/2)."""
    return float(np.clip(threshold / max(fid, 1e-8), floor, ceiling))


def dynamic_temperature(step: int, steps: int, t_max: float, t_min: float, fid: float, threshold: float,
                        gain: float) -> float:
    """Relational-KD temperature: linear from t_max to t_min over a task's steps, times
    1 + gain * clip(fid / threshold - 1, 0, 1) (softer targets while the teacher's samples are poor)."""
    t = t_max - (t_max - t_min) * step / max(steps - 1, 1)
    return t * (1 + gain * float(np.clip(fid / threshold - 1, 0, 1)))


def replay_counts(batch_size: int, n_seen: int, replay_share: float) -> list[int]:
    """Rows of each seen task in a student batch, the current task last: equal shares, batch_size // n_seen per
    replayed task and the rest for the current task; or, with replay_share > 0 and an earlier task,
    round(batch_size x replay_share) rows for the replayed tasks together, split equally (the remainder goes to the
    current task)."""
    n_old = n_seen - 1
    share = round(batch_size * replay_share) // n_old if replay_share > 0 and n_old else batch_size // n_seen
    return [share] * n_old + [batch_size - share * n_old]


def replays_generated(student_cfg) -> bool:
    """Whether replayed rows are generated (by the experts, and by the student's copy as student.self_replay says):
    not in the reference rows student.replay_source=real (the oracle) and student.joint=true (joint training), whose
    rows are all real training images, each weighted 1."""
    return student_cfg.replay_source == "generated" and not student_cfg.joint


def seen_tasks(t: int, n_tasks: int, replay: bool, joint: bool) -> list[int]:
    """The tasks a student batch of task t covers, the current task last (replay_counts gives it the remainder):
    0..t with replay, t alone without, and every task of the sequence with joint training."""
    if joint:
        return [j for j in range(n_tasks) if j != t] + [t]
    return list(range(t + 1)) if replay else [t]


class StudentLearner:
    """The student phase: the beta-VAE student, its projections (feature KD: one per expert, onto that expert
    critic's feature space) and optimiser, and `previous`, the student as it was before the current task
    (self-distillation). One step: a replay batch, the registered loss terms (gan_vae.losses), an Adam update."""

    def __init__(self, cfg, device: torch.device, pool: ExpertPool, train_x: list[torch.Tensor]):
        self.cfg, self.device, self.pool, self.train_x = cfg, device, pool, train_x
        sc = cfg.student
        self.student = TaskVAE(cfg.data.channels, sc.z_dim, sc.u_dim, sc.width).to(device)
        self.projections = nn.ModuleList()
        self.opt = self._optimizer()
        self.previous: TaskVAE | None = None
        self.began = -1  # the last task whose student phase has begun (begin_task)

    def _optimizer(self):
        return torch.optim.Adam(list(self.student.parameters()) + list(self.projections.parameters()),
                                lr=self.cfg.student.lr)

    def _projection(self) -> nn.Linear:
        return nn.Linear(self.student.feature_dim, self.pool.experts[0].critic.feature_dim).to(self.device)

    def steps(self, t: int) -> int:
        """Student steps of task t: student.steps + t x student.steps_per_earlier_task."""
        return self.cfg.student.steps + t * self.cfg.student.steps_per_earlier_task

    def begin_task(self, t: int) -> list[int]:
        """Ready for task t (a new task prior, or with student.joint every task's from the first task on, a
        projection per new expert, a fresh optimiser, the copy from before the task, unless resuming within it);
        returns the tasks its batches cover (seen_tasks)."""
        sc, kd = self.cfg.student, self.cfg.kd
        n_tasks = len(self.train_x)
        if self.began < t:
            keep_copy = kd.previous_weight > 0 or (sc.self_replay > 0 and replays_generated(sc))
            self.previous = frozen_copy(self.student) if t > 0 and sc.replay and keep_copy else None
            while self.student.num_tasks < (n_tasks if sc.joint else t + 1):
                self.student.add_task()
            while len(self.projections) < len(self.pool.experts):  # a new expert brings its own projection
                self.projections.append(self._projection())
            self.opt = self._optimizer()
            self.began = t
        self.student.train()
        return seen_tasks(t, n_tasks, sc.replay, sc.joint)

    def update(self, t: int, seen: list[int], step: int) -> dict:
        """One training step on the sum of the loss terms; returns what metrics.jsonl records of it."""
        batch = self.step_inputs(t, seen, step)
        loss, logged = student_loss(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.student.freeze_old_priors:  # no gradient, so Adam leaves them as they were
            for j in range(t):
                self.student.prior_mu[j].grad = self.student.prior_logvar[j].grad = None
        self.opt.step()
        record = {"student/loss": loss.item(), **{f"student/{k}": v.item() for k, v in logged.items()}}
        record["kd/temperature"] = batch.temperature
        for j in seen:
            if j != t:
                record[f"kd/weight_task{j}"] = float(batch.row_weight[batch.task_ids == j][0])
        return record

    def step_inputs(self, t: int, seen: list[int], step: int) -> StudentStep:
        """What the loss terms read at student step `step` of task t: the replay batch (`batch`, from this step's
        seeded generator), its row weights, the relational temperature and the networks."""
        cfg, kd = self.cfg, self.cfg.kd
        g = torch.Generator().manual_seed(step_seed(cfg.train.seed, t, 1, step))
        x, task_ids, mix = self.batch(t, seen, g)
        taught = [j for j in seen if j < len(self.pool.task_to_expert)]  # (student.joint: later tasks have none yet)
        fid_now = float(np.mean([self.pool.of_task(j).latest_fid for j in taught]))
        temperature = dynamic_temperature(step, self.steps(t), kd.temperature_max, kd.temperature_min, fid_now,
                                          cfg.teacher.fid_threshold, kd.temperature_fid_gain)
        expert_of = torch.tensor([self.pool.task_to_expert[j] if j in taught else -1 for j in task_ids.tolist()],
                                 device=self.device)
        return StudentStep(cfg=cfg, student=self.student, previous=self.previous,
                           critics=[e.critic for e in self.pool.experts], projections=self.projections, x=x,
                           task_ids=task_ids, mix=mix, replayed=task_ids != t, row_weight=self.row_weights(task_ids, t),
                           expert_of=expert_of, temperature=temperature, generator=g)

    def batch(self, t: int, seen: list[int], g: torch.Generator):
        """One student batch: real task-t images and, for every other seen task, images from that task's expert
        (replay; real training images of that task with student.replay_source=real or student.joint), in equal
        shares; with student.mixup, each real image mixed with a replayed one. Returns images [B, C, 32, 32], task
        ids [B] and the mixup pairing (other task ids, lambda) or None."""
        sc = self.cfg.student
        xs, tasks = [], []
        real = not replays_generated(sc)
        for j, n in zip(seen, replay_counts(sc.batch_size, len(seen), sc.replay_share)):
            if j == t or real:
                xs.append(self.train_x[j][torch.randint(0, len(self.train_x[j]), (n,), generator=g)].to(self.device))
            else:  # replay: the task's expert generates it (output-level distillation target)
                xs.append(self.replay(j, n, g))
            tasks.append(torch.full((n,), j, dtype=torch.long))
        x, task_ids = torch.cat(xs), torch.cat(tasks).to(self.device)
        mix = None
        if sc.mixup and len(seen) > 1:  # mix each real image with a replayed one, and their task priors
            n_real = len(xs[-1]) if seen[-1] == t else 0
            perm = torch.randint(0, len(x) - n_real, (len(x),), generator=g).to(self.device)
            lam = torch.distributions.Beta(0.4, 0.4).sample((len(x),)).to(self.device)
            lam = torch.where(task_ids == t, lam, torch.ones_like(lam))
            x = lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x[perm]
            mix = (task_ids[perm], lam)
        return x, task_ids, mix

    def replay(self, j: int, n: int, g: torch.Generator) -> torch.Tensor:
        """n replayed images of earlier task j [n, C, 32, 32]: the expert's (z truncated by
        student.replay_truncation), except the first round(n x student.self_replay), which the student's frozen copy
        from before the task generates from its prior p(u | j)."""
        knows = self.previous is not None and j < self.previous.num_tasks  # (a copy always knows its earlier tasks)
        n_self = round(n * self.cfg.student.self_replay) if knows else 0
        parts = []
        if n_self:
            with torch.no_grad():
                tasks = torch.full((n_self,), j, dtype=torch.long, device=self.device)
                parts.append(self.previous.eval().sample(tasks, g))
        if n - n_self:
            parts.append(self.pool.of_task(j).sample(n - n_self, g, self.cfg.student.replay_truncation))
        return torch.cat(parts)

    def row_weights(self, task_ids: torch.Tensor, t: int) -> torch.Tensor:
        """Per-row weight [B]: 1 for the current task, and for a replayed task its expert's adaptive weight
        (expert_weight of the expert's latest FID); 1 on every row when the rows are real images
        (student.replay_source=real, student.joint)."""
        if not replays_generated(self.cfg.student):
            return torch.ones(len(task_ids), device=self.device)
        kd, w = self.cfg.kd, {}
        for j in task_ids.unique().tolist():
            w[j] = 1.0 if j == t else expert_weight(self.pool.of_task(j).latest_fid, self.cfg.teacher.fid_threshold,
                                                    kd.weight_floor, kd.weight_ceiling)
        return torch.tensor([w[j] for j in task_ids.tolist()], device=self.device)

    def modules(self) -> list[nn.Module]:
        return [self.student, self.projections]

    def state(self) -> dict:
        return {"student": self.student.state_dict(), "num_student_tasks": self.student.num_tasks,
                "projections": self.projections.state_dict(), "num_projections": len(self.projections),
                "opt_s": self.opt.state_dict(),
                "previous": self.previous.state_dict() if self.previous is not None else None,
                "previous_tasks": self.previous.num_tasks if self.previous is not None else 0,
                "student_began": self.began}

    def load(self, ckpt: dict) -> None:
        while self.student.num_tasks < ckpt["num_student_tasks"]:
            self.student.add_task()
        self.student.load_state_dict(ckpt["student"])
        while len(self.projections) < ckpt["num_projections"]:
            self.projections.append(self._projection())
        self.projections.load_state_dict(ckpt["projections"])
        # (a checkpoint from before student.joint: the student had a prior for each task begun, no more)
        self.began = ckpt.get("student_began", ckpt["num_student_tasks"] - 1)
        self.opt = self._optimizer()
        self.opt.load_state_dict(ckpt["opt_s"])
        if ckpt.get("previous") is not None:
            sc = self.cfg.student
            previous = TaskVAE(self.cfg.data.channels, sc.z_dim, sc.u_dim, sc.width).to(self.device)
            while previous.num_tasks < ckpt["previous_tasks"]:
                previous.add_task()
            previous.load_state_dict(ckpt["previous"])
            self.previous = frozen_copy(previous)
