"""Attention Transfer (AT) as a plugin: a KD method on intermediate feature maps, defined outside the repository's core.

    python train_student.py run.plugins=[examples/plugins/attention_transfer.py] kd.method=at teacher.mode=online
    python train_student.py run.plugins=[examples/plugins/attention_transfer.py] kd.method=at teacher.mode=online \
        kd.at.stages=[2,3] kd.at.weight=500

Zagoruyko and Komodakis, "Paying More Attention to Attention: Improving the Performance of Convolutional Neural
Networks via Attention Transfer", ICLR 2017. The student matches the teacher's spatial attention maps (`at_loss_terms`)
at the ends of several stages, on top of the labels' cross-entropy; no KD term, as mdistiller's AT
(megvii-research/mdistiller, mdistiller/distillers/AT.py: CE weight 1, feature weight 1000, p = 2).

This file is the whole of the method: the loss (pure functions with their formulas), its config section `ATConfig`
(kd.at.*, with ranges, listed by --help), and the `KDMethod` registered as kd.method=at. It reads the models' stage
maps through the public helpers of models.py (`stage_shape`, `logits_and_stage_maps`, FrozenTeacher.feature_maps)
and declares so (`student_reads`, `teacher_reads`, `stages`): the engine checks kd.at.stages against both models
before any work, and refuses teacher.mode=cached, since the cache holds logits and pooled features only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.config import opt
from common.errors import check
from kd_methods import KD_METHODS, KDMethod, LossTerms
from models import logits_and_stage_maps, stage_shape


def attention_map(feature_map: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """The spatial attention map of Zagoruyko and Komodakis (2017, Sec. 3.1 and Eq. 2), flattened and L2-normalised:

        Q = vec(F(A)) / ||vec(F(A))||_2,   F(A)_{h,w} = (1/C) sum_c |A_{c,h,w}|^p

    A [B, C, H, W] a feature map -> Q [B, H W], in fp32. (The mean over channels rather than the paper's sum
    changes nothing after the normalisation.)"""
    return F.normalize(feature_map.float().abs().pow(p).mean(1).reshape(feature_map.shape[0], -1), dim=1)


def at_loss_terms(student_logits: torch.Tensor, student_attention: torch.Tensor, teacher_attention: torch.Tensor,
                  labels: torch.Tensor, sizes: list[int]) -> dict[str, torch.Tensor]:
    """The AT loss, unweighted (L = w_ce ce + w_at at):

        ce = CE(z_s, y),   at = sum_j (1 / (B n_j)) sum_{i, k} (Q_s^j - Q_t^j)_{i,k}^2

    Q^j [B, n_j] the attention maps (`attention_map`) at stage j, given concatenated along dim 1 in the order of
    `sizes` (n_j = H_j W_j): student_attention, teacher_attention [B, sum_j n_j]. The squared difference of the
    normalised maps, averaged over samples and positions, as mdistiller's at_loss (the paper's Eq. 2 takes the
    unsquared p-norm of the difference, with beta / 2 in front). fp32."""
    differences = (student_attention.float() - teacher_attention.float()).split(sizes, dim=1)
    return {"ce": F.cross_entropy(student_logits.float(), labels),
            "at": sum(d.pow(2).mean() for d in differences)}


@dataclass
class ATConfig:
    stages: list[int] = opt([1, 2, 3, 4], "the stages whose attention maps are matched: indices into timm's "
                                          "feature_info of both teacher and student (ResNet: 1-4 = layer1-layer4, "
                                          "the paper's groups of residual blocks; 0 = the stem)", ge=0)
    p: float = opt(2.0, "the exponent p of the attention map F(A) = mean_c |A_c|^p (the paper's and mdistiller's: 2)",
                   ge=1)
    weight: float = opt(1000.0, "weight of the attention term (paper: beta = 1000; mdistiller FEAT_WEIGHT: 1000)",
                        ge=0)
    ce_weight: float = opt(1.0, "weight of the label cross-entropy (mdistiller CE_WEIGHT: 1)", ge=0)


@KD_METHODS.register("at", config=ATConfig,
                     help="Attention Transfer (Zagoruyko & Komodakis, ICLR 2017): CE + kd.at.weight x the squared "
                          "distance of normalised spatial attention maps at kd.at.stages (kd.at.*; "
                          "examples/plugins/attention_transfer.py). Online teacher only")
class AttentionTransfer(KDMethod):
    """AT in mdistiller's form; see the module docstring. Where the student's and the teacher's maps at a stage
    differ in size, the larger is average-pooled to the smaller before its attention map is taken, as mdistiller
    does."""

    teacher_outputs = ("attention",)  # the teacher's attention maps, concatenated: [B, sum_j n_j]
    student_reads, teacher_reads = ("logits", "stage_maps"), ("stage_maps",)
    reads = ()  # no KD term, so no kd.temperature; it compares attention maps, not logits (no kd.logit_standardize)

    @classmethod
    def loss_weights(cls, cfg) -> dict[str, float]:
        return {"ce": float(cfg.kd.at.ce_weight), "at": float(cfg.kd.at.weight)}

    @classmethod
    def loss_label(cls, cfg) -> str:
        a = cfg.kd.at
        return f"{a.ce_weight:g} CE + {a.weight:g} attention-map distance"

    @classmethod
    def stages(cls, cfg) -> tuple[int, ...]:
        return tuple(int(s) for s in cfg.kd.at.stages)

    @classmethod
    def validate(cls, cfg) -> None:
        stages = cls.stages(cfg)
        check(len(stages) > 0 and len(set(stages)) == len(stages),
              f"kd.at.stages={list(stages)}: name each stage once, at least one")

    @classmethod
    def build(cls, cfg, student, teacher) -> "AttentionTransfer":
        size = int(cfg.data.image_size)
        sizes = []
        for stage in cls.stages(cfg):
            (_, hs, ws), (_, ht, wt) = stage_shape(student, stage, size, "student"), \
                stage_shape(teacher.model, stage, size, "teacher")
            sizes.append((min(hs, ht), min(ws, wt)))
        return cls(cfg, sizes)

    def __init__(self, cfg, sizes: list[tuple[int, int]]):
        super().__init__(cfg, None, None)
        self.stage_list, self.sizes = list(self.stages(cfg)), sizes

    def attention(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """The attention maps of one model's stage maps, each at its stage's common size, concatenated: [B, sum n_j]."""
        p = float(self.cfg.kd.at.p)
        return torch.cat([attention_map(m if tuple(m.shape[2:]) == hw else F.adaptive_avg_pool2d(m, hw), p)
                          for m, hw in zip(maps, self.sizes)], dim=1)

    def teacher_online(self, teacher, x):
        return {"attention": self.attention(teacher.feature_maps(x, self.stage_list))}

    def forward(self, student, x):
        logits, maps = logits_and_stage_maps(student, x, self.stage_list)
        return {"logits": logits, "attention": self.attention(maps)}

    def loss_terms(self, outputs, teacher, labels, epoch, temperature) -> LossTerms:
        a = self.cfg.kd.at
        t = at_loss_terms(outputs["logits"], outputs["attention"], teacher["attention"], labels,
                          [h * w for h, w in self.sizes])
        return {"ce": (float(a.ce_weight), t["ce"]), "at": (float(a.weight), t["at"])}
