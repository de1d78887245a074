"""The gan_vae student's loss: a registry of terms (common.registry), summed in the order they were registered.

    @dataclass
    class TVConfig:                                     # the term's own keys, with ranges: student.tv.*
        weight: float = opt(0.01, "weight of the total variation term", ge=0)

    @STUDENT_LOSSES.register("tv", config=TVConfig, help="total variation of the reconstruction")
    def tv(step: StudentStep) -> TermValue:
        return TermValue(total_variation(step.vae["x_hat"]).mean())

A term reads one training step (`StudentStep`: the batch, its row weights, the networks, the student's forward) and
returns its value before weighting (`TermValue`). Its weight in the sum is its section's `weight` key
(student.<name>.weight), or the flat key a built-in term names in `weight_key` (student.contrastive_weight,
kd.feature_weight, ...: the keys those terms had before the registry), or 1 when it has neither. Every registered
term is in the sum; metrics.jsonl logs each as student/<name> (or the keys it returns). A term defined outside the
repository is registered the same way from a file named by run.plugins (examples/plugins/tv_loss.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from common.errors import check
from common.registry import Entry, Registry
from models import Critic, TaskVAE, bernoulli_kl, gaussian_kl, nt_xent, relational_kd, vae_loss_terms

# No key selects among them: every registered term is summed (a weight of 0 keeps a term computed but adds 0).
STUDENT_LOSSES = Registry("gan_vae student loss", key="gan_vae student loss", sections="student")


@dataclass
class StudentStep:
    """What a student loss term reads at one training step. Terms only read it: no optimiser step, nothing kept
    between steps. B rows: the replayed tasks' rows first, the current task's rows last.

    x [B, C, 32, 32]: the images the student sees (mixed ones with student.mixup); task_ids [B]; mix: (partner task
    ids [B], lambda [B]) or None; replayed [B] bool: the rows of earlier tasks; row_weight [B]: 1 on current-task
    rows, the replayed expert's adaptive weight on the others (every replay and distillation term scales its rows
    by it); expert_of [B]: the expert behind each row, -1 for a task that has no expert yet (only with
    student.joint: the distillation terms leave such rows out); temperature: the relational-KD temperature; generator: this
    step's seeded RNG (augmentations draw from it, in registration order). student; previous: its frozen copy from
    before the task, or None; critics and projections: one per expert; cfg: the run's config."""
    cfg: Any
    student: TaskVAE
    previous: TaskVAE | None
    critics: list[Critic]
    projections: nn.ModuleList
    x: torch.Tensor
    task_ids: torch.Tensor
    mix: tuple[torch.Tensor, torch.Tensor] | None
    replayed: torch.Tensor
    row_weight: torch.Tensor
    expert_of: torch.Tensor
    temperature: float
    generator: torch.Generator

    @cached_property
    def vae(self) -> dict[str, torch.Tensor]:
        """The student's training-mode forward on x, once per step (models.vae_loss_terms): per-row loss, recon,
        kl_z, kl_u [B], encoder features h [B, H], posterior means mu_z [B, Z] and mu_u [B, U], and the
        reconstruction x_hat [B, C, 32, 32] in [-1, 1]."""
        return vae_loss_terms(self.student, self.x, self.task_ids, self.cfg.student.beta, self.mix)

    @cached_property
    def critic_features(self) -> torch.Tensor:
        """[B, F]: each row's features from its own expert's critic, on exactly the images the student sees (mixed
        ones included); no gradient. Once per step."""
        features = torch.zeros(len(self.x), self.critics[0].feature_dim, device=self.x.device)
        with torch.no_grad():
            for e in self.taught_experts:
                rows = self.expert_of == e
                features[rows] = self.critics[e].features(self.x[rows])
        return features

    @cached_property
    def taught_experts(self) -> list[int]:
        """The experts behind the batch's rows (ascending); rows of a task without an expert yet (-1) have none."""
        return [e for e in self.expert_of.unique().tolist() if e >= 0]

    @cached_property
    def distill_weight(self) -> torch.Tensor:
        """[B]: row_weight on rows that have an expert, 0 on rows of a task without one (student.joint's later
        tasks): the weights of the terms that distil an expert."""
        return torch.where(self.expert_of >= 0, self.row_weight, torch.zeros_like(self.row_weight))


class TermValue(NamedTuple):
    """A student loss term's value: `loss`, a scalar before the term's weight, and what metrics.jsonl records as
    student/<key> (None: `loss` itself, under the term's name)."""
    loss: torch.Tensor
    logged: dict[str, torch.Tensor] | None = None


class LossTerm:
    """A term registered as a class (a function `compute(step)` registers as well).

    compute(step) -> TermValue | None: the term on this step (None: left out of the sum and the log this step).
    weight_key: the dotted config key of its weight (default: its section's `weight`, else weight 1).
    reads: the dotted config keys, beyond its weight and its own section, that only this term reads: with its
        weight at 0 they change nothing and are refused (`unread_at_weight_zero`).
    prepare(step) -> anything (optional): runs for every term, in registration order, before any compute, so before
        the student's training-mode forward moves its BatchNorm running statistics; compute is then called as
        compute(step, prepared)."""
    weight_key: str | None = None
    reads: tuple[str, ...] = ()
    prepare = None


def weight_key(entry: Entry) -> str | None:
    """The config key of a term's weight: its `weight_key`, else student.<name>.weight when its section has a
    `weight` key; None: the term is added with weight 1."""
    key = getattr(entry.obj, "weight_key", None)
    if key is None and entry.config is not None and "weight" in {f.name for f in dataclasses.fields(entry.config)}:
        key = f"{STUDENT_LOSSES.sections}.{entry.name}.weight"
    return key


def unread_at_weight_zero(cfg) -> dict[str, str]:
    """The keys that only a term weighted 0 reads, each with why: the term still runs (and is logged), but its
    value is multiplied by 0, so its own keys (`reads`, its section's keys other than the weight) change no
    number the run trains or measures."""
    out = {}
    for entry in STUDENT_LOSSES.entries_of(cfg):
        key = weight_key(entry)
        if key is None or OmegaConf.select(cfg, key) != 0:
            continue
        own = [f"{STUDENT_LOSSES.sections}.{entry.name}.{f.name}" for f in dataclasses.fields(entry.config)
               if f.name != "weight"] if entry.config is not None else []
        for read in (*getattr(entry.obj, "reads", ()), *own):
            out[read] = f"{key}=0 takes the {entry.name} term, which alone reads it, out of the loss"
    return out


def check_terms(cfg) -> None:
    """Every term's weight key names a number of the config, and each term's own `validate(cfg)` passes."""
    for entry in STUDENT_LOSSES.entries_of(cfg):
        key = weight_key(entry)
        check(key is None or isinstance(OmegaConf.select(cfg, key), (int, float)),
              f"student loss {entry.name!r} is weighted by {key}, which is not a number in the config")
        STUDENT_LOSSES.validate(cfg, entry.name)


def student_loss(step: StudentStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The student's loss, sum_k w_k L_k over the registered terms active this step (w_k: the term's config weight,
    1 without one), a scalar with its graph; and every logged value, detached, by name."""
    entries = STUDENT_LOSSES.entries_of(step.cfg)  # the built-in terms and those of the run's own plugins
    prepared = {e.name: e.obj.prepare(step) for e in entries if getattr(e.obj, "prepare", None) is not None}
    total, logged = None, {}
    for entry in entries:
        compute = getattr(entry.obj, "compute", entry.obj)
        value = compute(step, prepared[entry.name]) if entry.name in prepared else compute(step)
        if value is None:
            continue
        key = weight_key(entry)
        term = value.loss if key is None else OmegaConf.select(step.cfg, key) * value.loss
        total = term if total is None else total + term
        logged.update({k: v.detach() for k, v in (value.logged or {entry.name: value.loss}).items()})
    return total, logged


# ================================================================================================================
# The built-in terms. Registration order is summation order: the augmentations draw from the step's generator and
# the training-mode forwards move BatchNorm statistics in it, and float sums are not associative, so reordering
# changes results.
# ================================================================================================================
def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A contrastive view: a random translation of up to 3 pixels and a small brightness change, per sample."""
    b = x.shape[0]
    shifts = torch.randint(-3, 4, (b, 2), generator=generator)
    out = torch.stack([torch.roll(img, tuple(s.tolist()), dims=(1, 2)) for img, s in zip(x, shifts)])
    scale = 1 + 0.2 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)
    return ((out + 1) * scale.to(x.device) - 1).clamp(-1, 1)


@STUDENT_LOSSES.register("vae", help="beta-VAE loss with replay (Kingma and Welling 2014; Higgins et al. 2017)")
class VAETerm(LossTerm):
    @staticmethod
    def compute(step: StudentStep) -> TermValue:
        """beta-VAE loss with replay, rows weighted:

            L = mean_b w_b [ recon_b + beta (KL_z,b + KL_u,b) ]      (models.vae_loss_terms; KL_u to p(u | task_b))

        On replayed rows it is output-level distillation: they reconstruct their expert's samples under their task
        id. Logged: recon, kl_z and kl_u, unweighted row means."""
        out = step.vae
        return TermValue((step.row_weight * out["loss"]).mean(),
                         {"recon": out["recon"].mean(), "kl_z": out["kl_z"].mean(), "kl_u": out["kl_u"].mean()})


@STUDENT_LOSSES.register("contrastive", help="NT-Xent between two augmented views (SimCLR, Chen et al. 2020)")
class ContrastiveTerm(LossTerm):
    weight_key = "student.contrastive_weight"
    reads = ("student.contrastive_temperature",)

    @staticmethod
    def compute(step: StudentStep) -> TermValue:
        """NT-Xent (models.nt_xent) between the z-means [B, Z] of two augmented views of x. Not row-weighted: it
        shapes the student's own encoder and distils no teacher."""
        _, (mu1, _), _ = step.student.encode(augment(step.x, step.generator))
        _, (mu2, _), _ = step.student.encode(augment(step.x, step.generator))
        return TermValue(nt_xent(mu1, mu2, step.cfg.student.contrastive_temperature))


@STUDENT_LOSSES.register("feature_kd", help="feature-level distillation (FitNets, Romero et al. 2015)")
class FeatureKDTerm(LossTerm):
    weight_key = "kd.feature_weight"

    @staticmethod
    def compute(step: StudentStep) -> TermValue:
        """Feature-level distillation through a projection P_e per expert e:

            L = mean_b w_b mean_d ( P_e(b)(h_b) - phi_e(b)(x_b) )_d^2

        h [B, H]: the student's encoder features; phi_e(b) [F]: the critic features of row b's expert (a row of a
        task without an expert yet, student.joint's later tasks, adds 0)."""
        h, target = step.vae["h"], step.critic_features
        error = torch.zeros(len(step.x), device=step.x.device)
        for e in step.taught_experts:
            rows = step.expert_of == e
            error[rows] = (step.projections[e](h[rows]) - target[rows]).pow(2).mean(1)
        return TermValue((step.row_weight * error).mean())


@STUDENT_LOSSES.register("relational_kd", help="relational distillation (after Park et al. 2019)")
class RelationalKDTerm(LossTerm):
    weight_key = "kd.relational_weight"
    reads = ("kd.temperature_max", "kd.temperature_min", "kd.temperature_fid_gain")  # its dynamic temperature

    @staticmethod
    def compute(step: StudentStep) -> TermValue:
        """models.relational_kd: each row's similarities to the other rows of its expert, student z-means [B, Z]
        against that expert critic's features [B, F], compared as softmax distributions at the dynamic
        temperature; row b's KL scaled by w_b."""
        return TermValue(relational_kd(step.critic_features, step.vae["mu_z"], step.temperature,
                                       groups=step.expert_of, weights=step.distill_weight))


def self_distillation(student: TaskVAE, previous: TaskVAE, x: torch.Tensor, replayed: torch.Tensor,
                      posterior: str = "means") -> torch.Tensor:
    """Per-row self-distillation [B] (zero on current-task rows): on replayed images x[replayed], the student's
    mean reconstruction is matched to that of its frozen copy from before the task and its posterior to the
    copy's, by its means (posterior="means"):

        d_b = KL( Bern(sigmoid(l'_b)) || Bern(sigmoid(l_b)) ) + ||mu_z,b - mu'_z,b||^2 + ||mu_u,b - mu'_u,b||^2

    or as distributions (posterior="kl"): the two squared distances replaced by
    KL( q'(z | x_b) || q(z | x_b) ) + KL( q'(u | x_b) || q(u | x_b) ) of the diagonal Gaussians (models.gaussian_kl),
    which also keeps the copy's posterior variances (what the replayed image's latent uncertainty was).

    (the Bernoulli KL summed over pixels, the scale of the reconstruction term; primes: the copy). Both run in eval
    mode: the copy as it was (BatchNorm with the running statistics of its own tasks, not the batch statistics of a
    batch that mixes in the new task) and the student as it is evaluated. Like with like, so identical weights give
    exactly 0; eval mode is row-wise, so only replayed rows run. The student's training mode is left as it was."""
    per = torch.zeros(len(x), device=x.device)
    if not replayed.any():
        return per
    old = x[replayed]
    previous.eval()
    with torch.no_grad():
        _, (p_mu_z, p_lv_z), (p_mu_u, p_lv_u) = previous.encode(old)
        p_logits = previous.decode_logits(p_mu_z, p_mu_u)
    was_training = student.training
    student.eval()
    _, (mu_z, lv_z), (mu_u, lv_u) = student.encode(old)
    logits = student.decode_logits(mu_z, mu_u)
    student.train(was_training)
    if posterior == "kl":
        latent_z, latent_u = gaussian_kl(p_mu_z, p_lv_z, mu_z, lv_z), gaussian_kl(p_mu_u, p_lv_u, mu_u, lv_u)
    else:
        latent_z, latent_u = (mu_z - p_mu_z).pow(2).sum(1), (mu_u - p_mu_u).pow(2).sum(1)
    # summed left to right, (KL + z) + u, as before the refactor: float addition is not associative, and
    # KL + (z + u) differs from it in the last bit on some rows (test_refactor_identity.py)
    per[replayed] = bernoulli_kl(p_logits, logits) + latent_z + latent_u
    return per


@STUDENT_LOSSES.register("previous_kd", help="self-distillation to the student's copy from before the task")
class PreviousKDTerm(LossTerm):
    weight_key = "kd.previous_weight"
    reads = ("kd.previous_posterior",)

    @staticmethod
    def prepare(step: StudentStep) -> torch.Tensor | None:
        # before the training-mode forward: at a task's first step the student's running statistics are still
        # exactly the copy's, so the term starts at exactly 0
        return None if step.previous is None else self_distillation(step.student, step.previous, step.x,
                                                                    step.replayed, step.cfg.kd.previous_posterior)

    @staticmethod
    def compute(step: StudentStep, per_row: torch.Tensor | None) -> TermValue | None:
        """`self_distillation` per row d [B], rows weighted: L = mean_b w_b d_b. Logged: the mean of d over the
        replayed rows. Off (None) without a copy: on the first task, with student.replay=false or
        kd.previous_weight=0."""
        if per_row is None:
            return None
        return TermValue((step.row_weight * per_row).mean(), {"previous_kd": per_row[step.replayed].mean()})
