"""Normalized KD (NKD) as a plugin: a KD method defined outside the repository's core, with keys of its own.

    python train_student.py run.plugins=[examples/plugins/normalized_kd.py] kd.method=nkd
    python train_student.py run.plugins=[examples/plugins/normalized_kd.py] kd.method=nkd kd.nkd.gamma=1.0

Yang, Zeng, Li, Zhang, Yuan and Li, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach
with Normalized Loss and Customized Soft Labels", ICCV 2023. Classic KD's loss splits into a term on the target
class and one on the non-target classes; the non-target probabilities sum to 1 - p_y, which differs between teacher
and student, so NKD normalises both over the non-target classes before comparing them (`nkd_loss_terms`).

This file is the whole of the method: the loss (a pure function with its formula), its config section `NKDConfig`
(kd.nkd.*, with ranges, listed by --help), and the `KDMethod` registered as kd.method=nkd.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.config import opt
from kd_methods import KD_METHODS, KDMethod, LossTerms


def nkd_loss_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                   temperature: float) -> dict[str, torch.Tensor]:
    """The two terms of the normalized KD loss (Yang et al. ICCV 2023, Eq. 8), unweighted (NKD = target +
    gamma * non_target), averaged over the B samples:

        target     = - T_y log S_y,                      T = softmax(z_t), S = softmax(z_s), y the label
        non_target = - lambda^2 sum_{i != y} N(T^lambda)_i log N(S^lambda)_i

    with N(p^lambda)_i = p_i^lambda / sum_{k != y} p_k^lambda the non-target probabilities at temperature lambda,
    normalised to sum to 1: the softmax of the C - 1 non-target logits divided by lambda. The target term is the
    cross-entropy towards the teacher's target probability (temperature 1); the teacher gets no gradient.
    Shapes: logits [B, C] (C >= 2), labels int64 [B]. Returns {"target", "non_target"}."""
    s, t = student_logits.float(), teacher_logits.float().detach()
    b, c = s.shape
    is_target = F.one_hot(labels, c).bool()
    target = -(F.softmax(t, dim=1)[is_target] * F.log_softmax(s, dim=1)[is_target]).mean()
    # the non-target logits alone, C - 1 per sample: their softmax is the normalised distribution N(.)
    q_t = F.softmax(t[~is_target].view(b, c - 1) / temperature, dim=1)
    log_q_s = F.log_softmax(s[~is_target].view(b, c - 1) / temperature, dim=1)
    non_target = -temperature**2 * (q_t * log_q_s).sum(dim=1).mean()
    return {"target": target, "non_target": non_target}


@dataclass
class NKDConfig:
    temperature: float = opt(1.0, "lambda: temperature of the normalised non-target distributions (Yang et al., "
                                  "ImageNet: 1)", gt=0)
    gamma: float = opt(1.5, "weight of the non-target term (Yang et al., ImageNet: 1.5)", ge=0)
    ce_weight: float = opt(1.0, "weight of the label cross-entropy", ge=0)


@KD_METHODS.register("nkd", config=NKDConfig, help="Normalized KD (Yang et al. ICCV 2023): the teacher's target "
                                                   "probability plus its normalised non-target distribution "
                                                   "(kd.nkd.*; examples/plugins/normalized_kd.py)")
class NKD(KDMethod):
    """kd.nkd.ce_weight x CE + target + kd.nkd.gamma x non_target (`nkd_loss_terms`), lambda = kd.nkd.temperature."""

    @classmethod
    def temperature(cls, cfg) -> float:
        return float(cfg.kd.nkd.temperature)

    # no shared kd.* key: its own temperature and weights, and the paper defines NKD on raw logits, so
    # kd.logit_standardize (and kd.temperature, kd.alpha, ...) set with kd.method=nkd are refused, not ignored
    reads = ()

    @classmethod
    def loss_weights(cls, cfg) -> dict[str, float]:
        n = cfg.kd.nkd
        return {"ce": n.ce_weight, "nkd_target": 1.0, "nkd_non_target": n.gamma}

    def loss_terms(self, outputs, teacher, labels, epoch, temperature) -> LossTerms:
        n = self.cfg.kd.nkd
        logits = outputs["logits"]
        t = nkd_loss_terms(logits, teacher["logits"], labels, temperature)
        ce = F.cross_entropy(logits.float(), labels)
        return {"ce": (n.ce_weight, ce), "nkd_target": (1.0, t["target"]), "nkd_non_target": (n.gamma, t["non_target"])}
