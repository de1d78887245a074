"""The gan_vae teachers: WGAN-GP experts (Gulrajani et al., 2017: gradient penalty, n_critic critic steps per
generator step), the decision to add an expert for a task or reuse one (a registry of expansion rules,
EXPANSION_RULES, selected by teacher.expansion), and the teacher phase's step.

    @dataclass
    class RelativeConfig:                               # the rule's own keys, with ranges: teacher.relative_fid.*
        ratio: float = opt(2.0, "...", gt=0)

    @EXPANSION_RULES.register("relative_fid", config=RelativeConfig, help="...")
    def relative_fid(choice: ExpansionChoice) -> Expansion:
        ...
        return Expansion("new", len(choice.fids), {"teacher.relative_fid.ratio": ratio, ...})

A rule reads what the pool measured before task t (`ExpansionChoice`) and returns its decision with the values it
decided with (`Expansion`); experts.json records both, under the rule's name. The pool checks the decision
(`ExpertPool.choose`). A rule defined outside the repository registers the same way from a file named by
run.plugins (examples/plugins/relative_fid.py).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from common.checkpoint import freeze, unfreeze
from common.errors import UserError
from common.registry import Registry
from models import Critic, Generator, gradient_penalty, wgan_critic_loss, wgan_generator_loss

EXPANSION_RULES = Registry("expert-expansion rule", key="teacher.expansion", sections="teacher")


@dataclass(frozen=True)
class ExpansionChoice:
    """What an expansion rule reads before task t: `fids[e]`, the FID between expert e's samples and task t's real
    training images (one per existing expert, none before the first task); `own_fids[e]`, expert e's latest FID on
    the test images of the last task it learned (the quality it reached on its own data); `max_experts`
    (teacher.max_experts); the run's `cfg` (a rule's own keys: cfg.teacher.<name>.*)."""
    task: int
    fids: list[float]
    own_fids: list[float]
    max_experts: int
    cfg: Any


class Expansion(NamedTuple):
    """An expansion rule's decision: `action` "new" (then `expert` = len(fids), the new expert's index) or "reuse"
    (`expert`: an existing expert's index); `values`: what the rule decided with, by name (config keys dotted, e.g.
    {"teacher.fid_threshold": 50.0}; measured quantities by a name of the rule's own), recorded in experts.json."""
    action: str
    expert: int
    values: dict[str, Any]


def decide_expert(fids: list[float], threshold: float, max_experts: int) -> tuple[str, int]:
    """("new", index of the new expert) when there is no expert yet, or when the best FID exceeds the threshold
    and fewer than max_experts exist; otherwise ("reuse", index of the expert with the lowest FID):

        new  iff  E = 0  or  (min_e FID_e > threshold  and  E < max_experts),   E = len(fids)

    This repository's rule, in the spirit of dynamic-expansion continual learners, which add an expert when no
    existing one fits the new data (e.g. CN-DPM: Lee et al., "A Neural Dirichlet Process Mixture Model for
    Task-Free Continual Learning", ICLR 2020); here the fit is the FID between an expert's samples and the task's
    images (Heusel et al., NeurIPS 2017)."""
    if not fids:
        return "new", 0
    best = int(np.argmin(fids))
    if fids[best] > threshold and len(fids) < max_experts:
        return "new", len(fids)
    return "reuse", best


@EXPANSION_RULES.register("fid_threshold", help="a new expert when every existing expert's FID on the task exceeds "
                                                "teacher.fid_threshold (and fewer than teacher.max_experts exist); "
                                                "else the nearest is reused")
def fid_threshold(choice: ExpansionChoice) -> Expansion:
    """`decide_expert(fids, teacher.fid_threshold, teacher.max_experts)`; records both keys' values."""
    threshold = float(choice.cfg.teacher.fid_threshold)
    action, index = decide_expert(choice.fids, threshold, choice.max_experts)
    return Expansion(action, index, {"teacher.fid_threshold": threshold, "teacher.max_experts": choice.max_experts})


def step_seed(seed: int, task: int, phase: int, step: int) -> int:
    """The seed of one training step's sampling: a pure function of (seed, task, phase, step), so a resumed run
    draws the same batches as an uninterrupted one."""
    return ((seed * 1_000 + task) * 10 + phase) * 10_000_000 + step


def draw_z(n: int, z_dim: int, generator: torch.Generator | None = None, truncation: float = 0.0) -> torch.Tensor:
    """Generator noise [n, z_dim] on the CPU: z ~ N(0, I) (torch.randn, the stream every untruncated draw uses), or
    with truncation psi > 0 the truncation trick of BigGAN (Brock, Donahue, Simonyan. Large Scale GAN Training for
    High Fidelity Natural Image Synthesis. ICLR 2019): each coordinate from N(0, 1) conditioned on |z_i| <= psi
    (torch.nn.init.trunc_normal_, inverse-CDF sampling from the same generator), so smaller psi trades the samples'
    diversity for their fidelity."""
    if truncation <= 0:
        return torch.randn(n, z_dim, generator=generator)
    return torch.nn.init.trunc_normal_(torch.empty(n, z_dim), 0.0, 1.0, -truncation, truncation,
                                       generator=generator)


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay of the (updates + 1)-th update of an exponential moving average of weights, with the warm-up of
    TensorFlow's ExponentialMovingAverage(num_updates):

        d_n = min(decay, (1 + n) / (10 + n)),   n = updates before this one

    so the first updates follow the trained weights closely (d_0 = 0.1) and the cap `decay` acts from
    n = (10 decay - 1) / (1 - decay) on (n = 890 for 0.99, 8,990 for 0.999): a run of a few hundred generator steps
    averages over roughly its last (10 + n) / 9 steps whatever the cap."""
    return min(decay, (1 + updates) / (10 + updates))


def ema(average: torch.Tensor, value: torch.Tensor, decay: float) -> torch.Tensor:
    """One step of an exponential moving average: decay * average + (1 - decay) * value.

    For a generator's weights, sampled from instead of the trained weights: Yazici et al., "The Unusual
    Effectiveness of Averaging in GAN Training", ICLR 2019; Karras et al., "Progressive Growing of GANs", ICLR 2018
    (decay 0.999); Brock et al., BigGAN, ICLR 2019 (0.9999)."""
    return decay * average + (1 - decay) * value


@torch.no_grad()
def update_average(average: nn.Module, model: nn.Module, decay: float) -> None:
    """`average`'s parameters <- ema(average's, model's, decay), name by name; its buffers (BatchNorm's running
    statistics, spectral norm's power-iteration vectors) <- model's, as the averaged generators of ProGAN and StyleGAN
    copy them."""
    params = dict(model.named_parameters())
    for name, p in average.named_parameters():
        p.copy_(ema(p, params[name], decay))
    buffers = dict(model.named_buffers())
    for name, b in average.named_buffers():
        b.copy_(buffers[name])


class Expert:
    """One teacher: a generator with its own critic and optimisers, the tasks it has learned, and with
    teacher.ema_decay > 0 `ema`, the moving average of its generator's weights (update_average after every generator
    step), which every sample is drawn from (`sampler`)."""

    def __init__(self, cfg, channels: int, device):
        t = cfg.teacher
        self.generator = Generator(t.z_dim, channels, t.width, t.attention).to(device)
        self.critic = Critic(channels, t.width, t.attention).to(device)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=t.lr, betas=tuple(t.betas))
        self.opt_d = torch.optim.Adam(self.critic.parameters(), lr=t.lr, betas=tuple(t.betas))
        self.tasks: list[int] = []
        self.latest_fid = math.inf
        self.z_dim, self.device = t.z_dim, device
        self.ema_decay = float(t.ema_decay)
        self.ema = frozen_copy(self.generator) if self.ema_decay > 0 else None
        self.ema_updates = 0  # generator steps averaged so far, over all of the expert's tasks
        self.freeze()

    @property
    def sampler(self) -> nn.Module:
        """The generator that samples: the weights' moving average with teacher.ema_decay > 0, else the generator."""
        return self.ema if self.ema is not None else self.generator

    def update_ema(self) -> None:
        """After a generator step: the moving average takes it in, at decay ema_decay_at(teacher.ema_decay, n)."""
        if self.ema is not None:
            update_average(self.ema, self.generator, ema_decay_at(self.ema_decay, self.ema_updates))
            self.ema_updates += 1

    def freeze(self) -> None:
        freeze(self.generator)
        freeze(self.critic)

    def unfreeze(self) -> None:
        unfreeze(self.generator)
        unfreeze(self.critic)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, truncation: float = 0.0) -> torch.Tensor:
        """n images from the sampler (the generator, or its moving average) in eval mode; z ~ N(0, I), or truncated
        to [-truncation, truncation] per coordinate when truncation > 0 (draw_z)."""
        sampler = self.sampler
        was = sampler.training
        sampler.eval()
        z = draw_z(n, self.z_dim, generator, truncation).to(self.device)
        out = sampler(z)
        sampler.train(was)
        return out

    def state_dict(self) -> dict:
        return {"generator": self.generator.state_dict(), "critic": self.critic.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(), "tasks": list(self.tasks),
                "latest_fid": self.latest_fid, "ema": self.ema.state_dict() if self.ema is not None else None,
                "ema_updates": self.ema_updates}

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.critic.load_state_dict(state["critic"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.tasks, self.latest_fid = list(state["tasks"]), state["latest_fid"]
        if self.ema is not None:  # teacher.ema_decay is a fixed key: a checkpoint with it holds the average
            self.ema.load_state_dict(state["ema"])
            self.ema_updates = int(state["ema_updates"])
        self.freeze()


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy without gradients, in eval mode: the replaying generator, or the student from before a task."""
    return freeze(copy.deepcopy(model))


class ExpertPool:
    """The teachers: the WGAN-GP experts, the expert of each task, every decision, and `frozen`, the copy of an
    expert's generator that replays the expert's earlier tasks while it learns a new one."""

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device
        self.experts: list[Expert] = []
        self.task_to_expert: list[int] = []
        self.decisions: list[dict] = []
        self.frozen: Generator | None = None

    def of_task(self, j: int) -> Expert:
        return self.experts[self.task_to_expert[j]]

    def choose(self, t: int, measured: list[dict]) -> None:
        """Task t's expert, from each existing expert's FID on it (`measured`, with sample counts): a new expert,
        or one reused, as the rule teacher.expansion decides (`decide`); a reused expert then replays its own
        earlier tasks from a frozen copy."""
        cfg = self.cfg
        fids = [m["fid"] for m in measured]
        action, index, values = self.decide(t, fids)
        if action == "new":
            self.experts.append(Expert(cfg, cfg.data.channels, self.device))
        self.task_to_expert.append(index)
        self.decisions.append({"task": t, "task_name": cfg.data.tasks[t], "fid_per_expert": fids,
                               "rule": cfg.teacher.expansion, "rule_values": values, "action": action,
                               "expert": index, "fid_samples": [[m["n_real"], m["n_fake"]] for m in measured]})
        tqdm.write(f"task {t} ({cfg.data.tasks[t]}): FIDs of existing experts {[round(f, 2) for f in fids]} -> "
                   f"{action} expert {index}")
        expert = self.experts[index]
        self.frozen = frozen_copy(expert.sampler) if expert.tasks else None  # replay of its old tasks

    def decide(self, t: int, fids: list[float]) -> Expansion:
        """The decision of the rule teacher.expansion for task t, checked: the first task makes expert 0, a new
        expert gets the next index and only below teacher.max_experts, a reused one exists. A rule that breaks
        this stops the run with its name, rather than growing the pool past its bound or training a missing
        expert."""
        cfg, name = self.cfg, self.cfg.teacher.expansion
        choice = ExpansionChoice(t, list(fids), [float(e.latest_fid) for e in self.experts], cfg.teacher.max_experts,
                                 cfg)
        decision = EXPANSION_RULES[name](choice)
        if not isinstance(decision, Expansion):
            raise UserError(f"teacher.expansion={name} returned {type(decision).__name__}; an expansion rule returns "
                            "gan_vae.experts.Expansion(action, expert, values)")
        action, index, n = decision.action, int(decision.expert), len(fids)
        if action == "new" and index == n and n < cfg.teacher.max_experts:
            return Expansion(action, index, dict(decision.values))
        if action == "reuse" and 0 <= index < n:
            return Expansion(action, index, dict(decision.values))
        raise UserError(f"teacher.expansion={name} decided ({action!r}, expert {index}) for task {t} with {n} "
                        f"expert(s) and teacher.max_experts={cfg.teacher.max_experts}: a rule adds expert {n} "
                        f"(\"new\", only below teacher.max_experts, and always for the first task) or reuses one of "
                        f"0..{n - 1} (\"reuse\")")

    def step(self, t: int, step: int, expert: Expert, x_real: torch.Tensor, n_old: int) -> dict:
        """One WGAN-GP generator step of `expert` on task t (n_critic critic steps first); returns the losses."""
        tc = self.cfg.teacher
        g = torch.Generator().manual_seed(step_seed(self.cfg.train.seed, t, 0, step))

        def real_batch():
            # current task plus replay of the expert's earlier tasks from its frozen copy, equal shares
            n_cur = tc.batch_size // (n_old + 1) if self.frozen is not None else tc.batch_size
            idx = torch.randint(0, len(x_real), (n_cur,), generator=g)
            parts = [x_real[idx].to(self.device)]
            if self.frozen is not None:
                with torch.no_grad():
                    z = torch.randn(tc.batch_size - n_cur, tc.z_dim, generator=g).to(self.device)
                    parts.append(self.frozen(z))
            return torch.cat(parts)

        for _ in range(tc.n_critic):
            real = real_batch()
            fake = expert.generator(torch.randn(len(real), tc.z_dim, generator=g).to(self.device)).detach()
            eps = torch.rand(len(real), 1, 1, 1, generator=g).to(self.device)
            gp = gradient_penalty(expert.critic, real, fake, tc.gp_weight, eps)
            loss_w = wgan_critic_loss(expert.critic(real), expert.critic(fake))
            loss_d = loss_w + gp
            expert.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            expert.opt_d.step()
        # the generator step must not train the critic (its eval mode changes nothing: no BatchNorm, no dropout)
        freeze(expert.critic)
        loss_g = wgan_generator_loss(expert.critic(expert.generator(torch.randn(tc.batch_size, tc.z_dim, generator=g)
                                                                    .to(self.device))))
        expert.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        expert.opt_g.step()
        expert.update_ema()
        unfreeze(expert.critic)
        return {"teacher/loss_d": loss_d.item(), "teacher/loss_g": loss_g.item(),
                "teacher/wasserstein": -loss_w.item(), "teacher/gp": gp.item()}

    def end_task(self, t: int, expert: Expert) -> None:
        """`expert` has learned task t: frozen again, and no replay copy any more."""
        expert.freeze()
        if t not in expert.tasks:
            expert.tasks.append(t)
        self.frozen = None

    def modules(self) -> list[nn.Module]:
        return [m for e in self.experts for m in (e.generator, e.critic)]

    def state(self) -> dict:
        return {"experts": [e.state_dict() for e in self.experts], "task_to_expert": self.task_to_expert,
                "decisions": self.decisions, "frozen": self.frozen.state_dict() if self.frozen is not None else None}

    def load(self, ckpt: dict) -> None:
        for state in ckpt["experts"]:
            expert = Expert(self.cfg, self.cfg.data.channels, self.device)
            expert.load_state_dict(state)
            self.experts.append(expert)
        self.task_to_expert, self.decisions = list(ckpt["task_to_expert"]), list(ckpt["decisions"])
        if ckpt["frozen"] is not None:
            self.frozen = frozen_copy(self.of_task(ckpt["progress"]["task"]).sampler)
            self.frozen.load_state_dict(ckpt["frozen"])
