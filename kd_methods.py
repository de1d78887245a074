"""KD methods: what `kd.method` names. One registry entry per method; the training loop never names a method.

    python train_student.py kd.method=kd                          # Hinton et al. 2015 (the default)
    python train_student.py kd.method=dkd                         # Decoupled KD, Zhao et al. CVPR 2022
    python train_student.py kd.method=dist                        # DIST, Huang et al. NeurIPS 2022
    python train_student.py kd.method=kd kd.logit_standardize=true    # Sun et al. CVPR 2024 (kd, dkd, fitnet)
    python train_student.py kd.method=fitnet                      # KD + a FitNets hint on pooled features

A method is a `KDMethod` (an nn.Module, so it can own trainable parts). It declares what it needs from the teacher
(`teacher_outputs`: "logits", "features"), runs the student (`forward`, inside the module that DDP, torch.compile,
the optimizer and the checkpoint cover: `Distiller`), and returns its loss as named terms with their weights
(`loss_terms`). The loop sums weight x term and logs every term as `train/loss_<name>`. The loss functions
themselves are pure functions in models.py, with their formulas.

Adding a method: subclass KDMethod, decorate it with `@register("name")`; its hyper-parameters go in a section of
train_student.KDConfig (or anywhere it reads from `cfg`). Nothing else changes.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from common.errors import UserError, check
from models import dist_loss_terms, dkd_loss_terms, dkd_warmup, hint_loss, kd_loss_terms, logits_and_pooled_features

# name -> (weight, value): the loss is sum(weight * value); every value is logged as train/loss_<name>
LossTerms = dict[str, tuple[float, torch.Tensor]]
KD_METHODS: dict[str, type["KDMethod"]] = {}
TEACHER_OUTPUTS = ("logits", "features")


def register(name: str):
    """Class decorator: `@register("dkd")` makes the class the method `kd.method=dkd`."""
    def add(cls: type[KDMethod]) -> type[KDMethod]:
        KD_METHODS[name] = cls
        cls.name = name
        return cls
    return add


def method_class(cfg) -> type["KDMethod"]:
    if cfg.kd.method not in KD_METHODS:
        raise UserError(f"unknown kd.method '{cfg.kd.method}'; choose one of {', '.join(KD_METHODS)}")
    return KD_METHODS[cfg.kd.method]


class KDMethod(nn.Module):
    """The interface. Class-level facts are read before anything is built (which teacher outputs to cache, whether
    a teacher is needed at all); an instance is built once the student and teacher exist."""

    name = "?"
    teacher_outputs: tuple[str, ...] = ("logits",)  # what loss_terms reads from the teacher

    @classmethod
    def uses_teacher(cls, cfg) -> bool:
        return True

    @classmethod
    def temperature(cls, cfg) -> float:
        """The starting temperature (logged as kd/temperature; train_student_rl.py's agent may change it)."""
        return float(cfg.kd.temperature)

    @classmethod
    def validate(cls, cfg) -> None:
        """Checks of the method's settings that involve several keys (UserError), run for the selected method before
        anything is built. Each key's own range is declared with the key in the schema (utils.opt, checked for
        every method's keys when the config is loaded)."""

    def __init__(self, cfg, student: nn.Module, teacher_feature_dim: int | None):
        super().__init__()
        self.cfg = cfg

    def forward(self, student: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The student's outputs this method's loss reads: at least {"logits": [B, C]}."""
        return {"logits": student(x)}

    def loss_terms(self, outputs: dict, teacher: dict, labels: torch.Tensor, epoch: int,
                   temperature: float) -> LossTerms:
        """Named (weight, value) terms, each value a mean over the given samples. `teacher` maps the names in
        `teacher_outputs` to tensors (None without a teacher); `epoch` is 0-based."""
        raise NotImplementedError


class Distiller(nn.Module):
    """Everything that trains: the student and its method's trainable parts (e.g. FitNet's regressor). DDP,
    torch.compile and the optimizer wrap this module, so a method's parameters are synchronised, compiled and
    optimised with the student's. forward(x) -> the method's student outputs."""

    def __init__(self, student: nn.Module, method: KDMethod):
        super().__init__()
        self.student, self.method = student, method

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.method(self.student, x)


def build_method(cfg, student: nn.Module, teacher) -> KDMethod:
    """The configured method for this student and teacher (a `models.FrozenTeacher`, or None without one)."""
    cls = method_class(cfg)
    teacher_dim = teacher.feature_dim if teacher is not None else None
    if "features" in cls.teacher_outputs and cls.uses_teacher(cfg):
        check(teacher_dim is not None, f"kd.method={cls.name} distils the teacher's pooled features, but teacher "
                                       f"{cfg.teacher.name} exposes none (no forward_features / forward_head / "
                                       "num_features); use a timm classifier as the teacher, or a logit method")
    return cls(cfg, student, teacher_dim)


def validate_method(cfg) -> None:
    """Config checks for kd.method, before anything is built."""
    cls = method_class(cfg)
    cls.validate(cfg)
    if "features" in cls.teacher_outputs and cls.uses_teacher(cfg) and cfg.teacher.mode == "cached":
        check(cfg.teacher.cache_features, f"kd.method={cls.name} needs the teacher's pooled features, which "
                                          "teacher.cache_features=false keeps out of the cache; set "
                                          "teacher.cache_features=true (or teacher.mode=online)")


def uses_teacher(cfg) -> bool:
    return method_class(cfg).uses_teacher(cfg)


def needs_teacher_features(cfg) -> bool:
    cls = method_class(cfg)
    return cls.uses_teacher(cfg) and "features" in cls.teacher_outputs


# ================================================================================================================
# The methods.
# ================================================================================================================
@register("kd")
class KD(KDMethod):
    """Hinton et al. 2015 (models.kd_loss): kd.alpha x CE + (1 - kd.alpha) x T² KL, T = kd.temperature; with
    kd.logit_standardize, the KL compares z-scored logits (Sun et al. 2024). kd.alpha=1: labels only, no teacher."""

    @classmethod
    def uses_teacher(cls, cfg) -> bool:
        return cfg.kd.alpha < 1.0

    def loss_terms(self, outputs, teacher, labels, epoch, temperature) -> LossTerms:
        alpha = self.cfg.kd.alpha
        t = kd_loss_terms(outputs["logits"], teacher.get("logits"), labels, alpha, temperature,
                          self.cfg.kd.logit_standardize)
        return {"ce": (alpha, t["ce"]), "kd": (1.0 - alpha, t["kd"])}  # alpha = 1: kd is a zero, weighted 0


@register("dkd")
class DKD(KDMethod):
    """Decoupled KD (Zhao et al. 2022, models.dkd_loss): kd.dkd.ce_weight x CE + w(e) x (alpha TCKD + beta NCKD),
    w(e) the linear warm-up (models.dkd_warmup). kd.logit_standardize z-scores both logits first."""

    @classmethod
    def temperature(cls, cfg) -> float:
        return float(cfg.kd.dkd.temperature)


    def loss_terms(self, outputs, teacher, labels, epoch, temperature) -> LossTerms:
        d = self.cfg.kd.dkd
        logits = outputs["logits"]
        warm = dkd_warmup(epoch, d.warmup_epochs)
        t = dkd_loss_terms(logits, teacher["logits"], labels, temperature, self.cfg.kd.logit_standardize)
        ce = nn.functional.cross_entropy(logits.float(), labels)
        return {"ce": (d.ce_weight, ce), "tckd": (warm * d.alpha, t["tckd"]), "nckd": (warm * d.beta, t["nckd"])}


@register("dist")
class DIST(KDMethod):
    """DIST (Huang et al. 2022, models.dist_loss): kd.dist.ce_weight x CE + beta tau² inter + gamma tau² intra."""

    @classmethod
    def temperature(cls, cfg) -> float:
        return float(cfg.kd.dist.temperature)

    @classmethod
    def validate(cls, cfg) -> None:
        # refused rather than ignored: DIST correlates the teacher's and the student's softmax probabilities, and
        # neither Huang et al. nor Sun et al. define it with standardised logits
        check(not cfg.kd.logit_standardize, "kd.logit_standardize=true applies to kd.method=kd, dkd and fitnet; "
                                            "kd.method=dist does not implement it. Set kd.logit_standardize=false "
                                            "or pick another method")

    def loss_terms(self, outputs, teacher, labels, epoch, temperature) -> LossTerms:
        d = self.cfg.kd.dist
        logits = outputs["logits"]
        t = dist_loss_terms(logits, teacher["logits"], temperature)
        ce = nn.functional.cross_entropy(logits.float(), labels)
        return {"ce": (d.ce_weight, ce), "inter": (d.beta, t["inter"]), "intra": (d.gamma, t["intra"])}


@register("fitnet")
class FitNet(KD):
    """KD plus a FitNets hint (Romero et al. 2015, models.hint_loss) on the pooled penultimate features: a learned
    linear regressor maps the student's width to the teacher's, trained with the student; weight kd.fitnet.weight.
    The KD part is the `kd` method with its settings (kd.alpha, kd.temperature); kd.alpha=1 keeps only CE + hint."""

    teacher_outputs = ("logits", "features")

    @classmethod
    def uses_teacher(cls, cfg) -> bool:
        return True


    def __init__(self, cfg, student: nn.Module, teacher_feature_dim: int | None):
        super().__init__(cfg, student, teacher_feature_dim)
        self.regressor = nn.Linear(int(student.num_features), int(teacher_feature_dim))

    def forward(self, student, x):
        logits, features = logits_and_pooled_features(student, x)
        return {"logits": logits, "hint": self.regressor(features)}

    def loss_terms(self, outputs, teacher, labels, epoch, temperature) -> LossTerms:
        terms = super().loss_terms(outputs, teacher, labels, epoch, temperature)
        terms["hint"] = (float(self.cfg.kd.fitnet.weight), hint_loss(outputs["hint"], teacher["features"]))
        return terms
