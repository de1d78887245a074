"""KD methods: what `kd.method` names. One registry entry per method, with its own keys (`kd.<name>.*`) declared
next to it; the training loop never names a method.

    python train_student.py kd.method=kd                          # Hinton et al. 2015 (the default)
    python train_student.py kd.method=dkd                         # Decoupled KD, Zhao et al. CVPR 2022
    python train_student.py kd.method=dist                        # DIST, Huang et al. NeurIPS 2022
    python train_student.py kd.method=kd kd.logit_standardize=true    # Sun et al. CVPR 2024 (kd, dkd, pooled_hint)
    python train_student.py kd.method=pooled_hint                 # kd + an MSE hint on pooled features (cached)
    python train_student.py kd.method=fitnet teacher.mode=online  # FitNets, Romero et al. ICLR 2015 (mdistiller)
    python train_student.py kd.ce_weight=0.5 kd.kd_weight=0.5 kd.temperature=1     # kd with weights of its own
    python train_student.py --config configs/quickstart.yaml --config configs/methods/dist_imagenet.yaml
                                                                  # a published setting (configs/methods/*.yaml)

A method is a `KDMethod` (an nn.Module, so it can own trainable parts). It declares what it needs from the teacher
(`teacher_outputs`: "logits", "features", or a method's own online-only output such as fitnet's "feature_map",
computed by its `teacher_online`), runs the student (`forward`, inside the module that DDP, torch.compile, the
optimizer and the checkpoint cover: `Distiller`), and returns its loss as named terms with their weights
(`loss_terms`). The loop sums weight x term and logs every term as `train/loss_<name>`. The loss functions
themselves are pure functions in models.py, with their formulas.

The output-dict contract. `forward` (the student's outputs) and `teacher_online` (the teacher's) return flat dicts
from a name to one tensor (or None) whose first dimension is the batch: {"logits": [B, K], "hint": [B, C, H, W],
...}, never a list or a nested dict. The loop selects rows of every entry alike (DDP padding, `engine.loss.rows_of`)
and the cache replays its entries row by row, so an entry that is not batch-first would be cut wrongly.

The declaration, read by the engine before any work (engine.schema.check_method_needs, engine.build.check_stages):
`student_reads` and `teacher_reads`, what the method takes from each model, among MODEL_OUTPUTS ("logits", pooled
"features", "stage_maps": feature maps at the stages `stages(cfg)`, read with models.stage_maps /
logits_and_stage_maps); `teacher_outputs`, the names of the teacher dict that `loss_terms` reads. The teacher cache
holds TEACHER_OUTPUTS only, so a method whose `teacher_outputs` go beyond them (`can_cache`) is refused with
teacher.mode=cached by the engine, with the method's `cache_refusal(cfg)` text added; every declared stage is
checked against the student and the teacher once they are built, before the cache or training.

Adding a method: subclass KDMethod and register it,

    @dataclass
    class MyConfig:
        weight: float = opt(1.0, "weight of my term", ge=0)          # kd.mine.weight, range-checked, in --help

    @KD_METHODS.register("mine", config=MyConfig, help="what it is (paper)")
    class Mine(KDMethod): ...

here or in a file of your own named by `run.plugins` (examples/plugins/normalized_kd.py). Nothing else changes:
kd.method accepts it, kd.mine.* joins the schema, --help and the docs tables list them, its `validate(cfg)` runs
before any work, and its parameters train, checkpoint and resume with the student.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from common.config import opt
from common.errors import UserError, check
from common.registry import Registry
from models import (HintRegressor, dist_loss_terms, dkd_loss_terms, dkd_warmup, fitnet_loss_terms, hint_loss,
                    kd_loss_terms, logits_and_pooled_features, logits_and_stage_map, stage_shape)

# name -> (weight, value): the loss is sum(weight * value); every value is logged as train/loss_<name>
LossTerms = dict[str, tuple[float, torch.Tensor]]
# the kd.* keys of KDConfig that some methods read and others not: each method declares its own (`KDMethod.reads`)
KD_METHODS = Registry("KD method", key="kd.method", sections="kd",
                      shared=("kd.alpha", "kd.ce_weight", "kd.kd_weight", "kd.temperature", "kd.logit_standardize"))
TEACHER_OUTPUTS = ("logits", "features")  # what the teacher cache can hold (teacher.mode=cached)
MODEL_OUTPUTS = ("logits", "features", "stage_maps")  # what a method may read from a model (student_reads, ...)


def method_class(cfg) -> type["KDMethod"]:
    """The class of the configured kd.method (UserError listing the registered methods when it is unknown)."""
    return KD_METHODS[cfg.kd.method]


class KDMethod(nn.Module):
    """The interface. Class-level facts are read before anything is built (which teacher outputs to cache, whether
    a teacher is needed at all); an instance is built once the student and teacher exist."""

    name = "?"
    teacher_outputs: tuple[str, ...] = ("logits",)  # what loss_terms reads from the teacher
    student_reads: tuple[str, ...] = ("logits",)  # from the student, among MODEL_OUTPUTS
    teacher_reads: tuple[str, ...] = ("logits",)  # from the teacher, among MODEL_OUTPUTS

    @classmethod
    def stages(cls, cfg) -> tuple[int, ...]:
        """The stage indices (timm feature_info) whose maps a method reading "stage_maps" takes from each model that
        it reads them from; the engine checks them against the built models (engine.build.check_stages)."""
        return ()

    @classmethod
    def can_cache(cls, cfg) -> bool:
        """Whether teacher.mode=cached can serve this method: its teacher outputs are among what the cache holds."""
        return set(cls.teacher_outputs) <= set(TEACHER_OUTPUTS)

    @classmethod
    def cache_refusal(cls, cfg) -> str:
        """Text the engine adds to its refusal of teacher.mode=cached (e.g. how large such a cache would be)."""
        return ""

    @classmethod
    def uses_teacher(cls, cfg) -> bool:
        return True

    @classmethod
    def reads(cls, cfg) -> tuple[str, ...]:
        """The shared kd.* keys (KD_METHODS.shared) this method reads under `cfg`; the others, set away from their
        defaults, are refused before any work (common.config.check_unread_keys), as are other methods' sections.
        Here: kd.temperature, which `temperature` reads; a method with a temperature of its own declares ()."""
        return ("kd.temperature",)

    @classmethod
    def uses_temperature(cls, cfg) -> bool:
        """Whether the loss reads the temperature that `loss_terms` is given: train_student_rl.py's agent changes
        it only where it does (engine.curriculum_run), and refuses an agent whose actions would change nothing.
        By default: whenever a teacher is used."""
        return cls.uses_teacher(cfg)

    @classmethod
    def temperature(cls, cfg) -> float:
        """The starting temperature (logged as kd/temperature; train_student_rl.py's agent may change it)."""
        return float(cfg.kd.temperature)

    @classmethod
    def loss_weights(cls, cfg) -> dict[str, float]:
        """The weight of each term `loss_terms` returns, before any schedule (DKD's warm-up). Not all may be 0: the
        run would train nothing (validate_method). {} when the method does not say."""
        return {}

    @classmethod
    def loss_label(cls, cfg) -> str:
        """What the loss is, with its weights, for the epoch line and the results table, e.g. "0.5 CE + 0.5 T² KL".
        By default the terms of `loss_weights` by name."""
        return " + ".join(f"{_w(w)} {name}" for name, w in cls.loss_weights(cfg).items()) or cls.name

    @classmethod
    def validate(cls, cfg) -> None:
        """Checks of the method's settings that involve several keys (UserError), run for the selected method before
        anything is built. Each key's own range is declared with the key in its config section (common.config.opt,
        checked for every method's keys when the config is loaded)."""

    @classmethod
    def build(cls, cfg, student: nn.Module, teacher) -> "KDMethod":
        """The method for this student and teacher (a `models.FrozenTeacher`, or None without one). A method whose
        parts depend on more than the teacher's pooled width (FitNet's regressor) overrides this."""
        teacher_dim = teacher.feature_dim if teacher is not None else None
        if "features" in cls.teacher_outputs and cls.uses_teacher(cfg):
            check(teacher_dim is not None, f"kd.method={cls.name} distils the teacher's pooled features, but teacher "
                                           f"{cfg.teacher.name} exposes none (no forward_features / forward_head / "
                                           "num_features); use a timm classifier as the teacher, or a logit method")
        return cls(cfg, student, teacher_dim)

    def __init__(self, cfg, student: nn.Module, teacher_feature_dim: int | None):
        super().__init__()
        self.cfg = cfg

    def teacher_online(self, teacher, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """teacher.mode=online: the teacher's outputs that loss_terms reads, computed now from the batch `x`."""
        if "features" in self.teacher_outputs:
            logits, features = teacher.logits_and_features(x)
            return {"logits": logits, "features": features}
        return {"logits": teacher(x), "features": None}

    def forward(self, student: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The student's outputs this method's loss reads: at least {"logits": [B, C]}."""
        return {"logits": student(x)}

    def loss_terms(self, outputs: dict, teacher: dict, labels: torch.Tensor, epoch: int,
                   temperature: float) -> LossTerms:
        """Named (weight, value) terms, each value a mean over the given samples. `teacher` maps the names in
        `teacher_outputs` to tensors (None without a teacher); `epoch` is 0-based."""
        raise NotImplementedError


class Distiller(nn.Module):
    """Everything that trains: the student and its method's trainable parts (e.g. the hint regressors). DDP,
    torch.compile and the optimizer wrap this module, so a method's parameters are synchronised, compiled and
    optimised with the student's. forward(x) -> the method's student outputs."""

    def __init__(self, student: nn.Module, method: KDMethod):
        super().__init__()
        self.student, self.method = student, method

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.method(self.student, x)


def build_method(cfg, student: nn.Module, teacher) -> KDMethod:
    """The configured method for this student and teacher (a `models.FrozenTeacher`, or None without one)."""
    return method_class(cfg).build(cfg, student, teacher)


def validate_method(cfg) -> None:
    """Config checks for kd.method, before anything is built. (The shared keys it does not read are refused when the
    config is loaded: common.config.check_unread_keys, from its `reads`.)"""
    cls = method_class(cfg)
    cls.validate(cfg)
    weights = cls.loss_weights(cfg)
    check(not weights or any(w > 0 for w in weights.values()),
          f"every loss weight of kd.method={cls.name} is 0 ({cls.loss_label(cfg)}): the run would train nothing and "
          "report the accuracy of an untrained student. Give at least one term a weight above 0")
    if "features" in cls.teacher_outputs and cls.uses_teacher(cfg) and cfg.teacher.mode == "cached":
        check(cfg.teacher.cache_features, f"kd.method={cls.name} needs the teacher's pooled features, which "
                                          "teacher.cache_features=false keeps out of the cache; set "
                                          "teacher.cache_features=true (or teacher.mode=online)")


def check_saved_method(saved: dict | None) -> None:
    """On resume: refuse a run whose saved config used kd.method=fitnet before it named FitNets, when that name
    meant the pooled hint now called pooled_hint (its section then held kd.fitnet.weight). The key's value is the
    same string, so the config comparison alone would let the run continue with another method."""
    kd = (saved or {}).get("kd") or {}
    if kd.get("method") == "fitnet" and "weight" in (kd.get("fitnet") or {}):
        raise UserError("this run was trained with kd.method=fitnet as it was before issue 18: the hint on pooled "
                        "features, now kd.method=pooled_hint (kd.pooled_hint.weight); kd.method=fitnet is now "
                        "FitNets' feature-map hint, another method. It cannot be continued under either name: start "
                        "a new run (another run.name) with kd.method=pooled_hint or kd.method=fitnet")


def uses_teacher(cfg) -> bool:
    return method_class(cfg).uses_teacher(cfg)


def uses_temperature(cfg) -> bool:
    return method_class(cfg).uses_temperature(cfg)


def loss_label(cfg) -> str:
    """The configured method's loss with its weights (KDMethod.loss_label), as the epoch line and results show it."""
    return method_class(cfg).loss_label(cfg)


def _w(weight: float) -> str:
    return f"{float(weight):g}"


def needs_teacher_features(cfg) -> bool:
    cls = method_class(cfg)
    return cls.uses_teacher(cfg) and "features" in cls.teacher_outputs


# ================================================================================================================
# The methods.
# ================================================================================================================
def kd_weights(cfg) -> tuple[float, float]:
    """(CE weight, KD weight) of the `kd` loss, for `kd` and every method built on it: kd.ce_weight and kd.kd_weight
    when they are given (both: one alone is a UserError; `KD.validate` also refuses them with a kd.alpha of its
    own), else the shorthand kd.alpha, i.e. (alpha, 1 - alpha)."""
    k = cfg.kd
    if k.ce_weight is None and k.kd_weight is None:
        return float(k.alpha), 1.0 - float(k.alpha)
    # one weight alone would leave the other to a rule a reader has to look up: ask for both
    check(k.ce_weight is not None and k.kd_weight is not None,
          f"kd.ce_weight={k.ce_weight} and kd.kd_weight={k.kd_weight}: set the two together (or neither, and use "
          "the shorthand kd.alpha)")
    return float(k.ce_weight), float(k.kd_weight)


@KD_METHODS.register("kd", help="Hinton et al. 2015: kd.ce_weight x CE + kd.kd_weight x T² KL(teacher || student) "
                                "(shorthand: kd.alpha, 1 - kd.alpha)")
class KD(KDMethod):
    """Hinton et al. 2015 (models.kd_loss_terms): w_ce x CE + w_kd x T² KL, T = kd.temperature, (w_ce, w_kd) =
    `kd_weights` (kd.ce_weight / kd.kd_weight, or kd.alpha / 1 - kd.alpha); with kd.logit_standardize, the KL compares
    z-scored logits (Sun et al. 2024). w_kd = 0 (kd.alpha=1): labels only, no teacher."""

    @classmethod
    def uses_teacher(cls, cfg) -> bool:
        return kd_weights(cfg)[1] > 0.0

    @classmethod
    def reads(cls, cfg) -> tuple[str, ...]:
        # labels only (KD weight 0): no KL term, so neither its temperature nor the standardisation of its logits
        k = cfg.kd
        labels_only = k.kd_weight == 0.0 if k.kd_weight is not None else k.alpha == 1.0
        weights = ("kd.alpha", "kd.ce_weight", "kd.kd_weight")
        return weights if labels_only else (*weights, "kd.temperature", "kd.logit_standardize")

    @classmethod
    def loss_weights(cls, cfg) -> dict[str, float]:
        ce_w, kd_w = kd_weights(cfg)
        return {"ce": ce_w, "kd": kd_w}

    @classmethod
    def loss_label(cls, cfg) -> str:
        ce_w, kd_w = kd_weights(cfg)
        standardized = " of z-scored logits" if cfg.kd.logit_standardize else ""
        return f"{_w(ce_w)} CE + {_w(kd_w)} T² KL{standardized}" if kd_w else f"{_w(ce_w)} CE, labels only"

    @classmethod
    def validate(cls, cfg) -> None:
        k = cfg.kd
        kd_weights(cfg)  # refuses a weight without its pair
        # an explicit pair and a kd.alpha of its own would say two things about the same weights
        check(k.ce_weight is None or k.alpha == 0.0,
              f"kd.alpha={k.alpha} and kd.ce_weight={k.ce_weight} / kd.kd_weight={k.kd_weight} both set the kd "
              "weights; use kd.alpha alone or the two weights alone (kd.alpha left at its default 0)")

    def loss_terms(self, outputs, teacher, labels, epoch, temperature) -> LossTerms:
        ce_w, kd_w = kd_weights(self.cfg)
        # kd_loss_terms' alpha only decides here whether the KL is computed (alpha 1: not, and no teacher is read);
        # its own convex "loss" is unused: the loop weighs the two terms with (ce_w, kd_w)
        t = kd_loss_terms(outputs["logits"], teacher.get("logits"), labels, 1.0 if kd_w == 0.0 else 0.0,
                          temperature, self.cfg.kd.logit_standardize)
        return {"ce": (ce_w, t["ce"]), "kd": (kd_w, t["kd"])}  # KD weight 0: kd is a zero, weighted 0


@dataclass
class DKDConfig:
    alpha: float = opt(1.0, "TCKD weight (target-class term). Defaults: Zhao et al. CVPR 2022, ImageNet ResNet-50 -> "
                            "MobileNet-V1 (mdistiller configs/imagenet/r50_mv1/dkd.yaml): alpha 1, beta 2, T 1, "
                            "warm-up 1 epoch, CE weight 1", ge=0)
    beta: float = opt(2.0, "NCKD weight (non-target term; 0.5 for ImageNet ResNet-34 -> ResNet-18, mdistiller "
                           "configs/imagenet/r34_r18/dkd.yaml)", ge=0)
    temperature: float = opt(1.0, "DKD's temperature T (ImageNet: 1); with kd.logit_standardize it is the base "
                                  "temperature of Sun et al. 2024 (their DKD setting: 2, alpha and beta x 9)", gt=0)
    warmup_epochs: float = opt(1.0, "linear warm-up of the DKD weight: min((epoch + 1) / W, 1); 0 = off", ge=0)
    ce_weight: float = opt(1.0, "weight of the label cross-entropy", ge=0)


@KD_METHODS.register("dkd", config=DKDConfig, help="Decoupled KD (Zhao et al. CVPR 2022): target-class and "
                                                   "non-target-class terms weighted apart (kd.dkd.*)")
class DKD(KDMethod):
    """Decoupled KD (Zhao et al. 2022, models.dkd_loss_terms): kd.dkd.ce_weight x CE + w(e) x (alpha TCKD +
    beta NCKD), w(e) the linear warm-up (models.dkd_warmup). kd.logit_standardize z-scores both logits first."""

    reads = ("kd.logit_standardize",)

    @classmethod
    def temperature(cls, cfg) -> float:
        return float(cfg.kd.dkd.temperature)

    @classmethod
    def loss_weights(cls, cfg) -> dict[str, float]:
        d = cfg.kd.dkd
        return {"ce": d.ce_weight, "tckd": d.alpha, "nckd": d.beta}

    @classmethod
    def loss_label(cls, cfg) -> str:
        d = cfg.kd.dkd
        standardized = " of z-scored logits" if cfg.kd.logit_standardize else ""
        return (f"{_w(d.ce_weight)} CE + warm-up x ({_w(d.alpha)} TCKD + {_w(d.beta)} NCKD), T²-scaled"
                f"{standardized}")

    def loss_terms(self, outputs, teacher, labels, epoch, temperature) -> LossTerms:
        d = self.cfg.kd.dkd
        logits = outputs["logits"]
        warm = dkd_warmup(epoch, d.warmup_epochs)
        t = dkd_loss_terms(logits, teacher["logits"], labels, temperature, self.cfg.kd.logit_standardize)
        ce = nn.functional.cross_entropy(logits.float(), labels)
        return {"ce": (d.ce_weight, ce), "tckd": (warm * d.alpha, t["tckd"]), "nckd": (warm * d.beta, t["nckd"])}


@dataclass
class DISTConfig:
    beta: float = opt(2.0, "inter-class (per sample) relation weight. Default: what Huang et al. (NeurIPS 2022) run on "
                           "ImageNet, CE 1 + 2 x (inter + intra) at tau 1, i.e. beta = gamma = 2: their loss "
                           "DIST(beta=1, gamma=1) times a loss weight of 2 (hunto/image_classification_sota "
                           "lib/models/losses/kd_loss.py with hunto/DIST_KD configs/strategies/distill/"
                           "resnet_dist.yaml; PaddleClas ppcls/configs/ImageNet/Distillation/"
                           "resnet34_distill_resnet18_dist.yaml: DistillationDISTLoss weight 2.0, CE 1.0). "
                           "configs/methods/dist_imagenet.yaml", ge=0, before=1.0)  # 1 until commit ca48427
    gamma: float = opt(2.0, "intra-class (per class, over the batch) relation weight (ImageNet: 2, as beta)", ge=0,
                       before=1.0)
    temperature: float = opt(1.0, "DIST's temperature tau (ImageNet: 1)", gt=0)
    ce_weight: float = opt(1.0, "weight of the label cross-entropy", ge=0)


@KD_METHODS.register("dist", config=DISTConfig, help="DIST (Huang et al. NeurIPS 2022): Pearson correlation of the "
                                                     "predictions per sample and per class (kd.dist.*)")
class DIST(KDMethod):
    """DIST (Huang et al. 2022, models.dist_loss_terms): kd.dist.ce_weight x CE + beta tau² inter +
    gamma tau² intra."""

    # no shared key: DIST has its own weights and temperature, and correlates the softmax probabilities, which
    # neither Huang et al. nor Sun et al. define with standardised logits (kd.logit_standardize is refused)
    reads = ()

    @classmethod
    def temperature(cls, cfg) -> float:
        return float(cfg.kd.dist.temperature)

    @classmethod
    def loss_weights(cls, cfg) -> dict[str, float]:
        d = cfg.kd.dist
        return {"ce": d.ce_weight, "inter": d.beta, "intra": d.gamma}

    @classmethod
    def loss_label(cls, cfg) -> str:
        d = cfg.kd.dist
        return f"{_w(d.ce_weight)} CE + {_w(d.beta)} inter + {_w(d.gamma)} intra, τ²-scaled"

    def loss_terms(self, outputs, teacher, labels, epoch, temperature) -> LossTerms:
        d = self.cfg.kd.dist
        logits = outputs["logits"]
        t = dist_loss_terms(logits, teacher["logits"], temperature)
        ce = nn.functional.cross_entropy(logits.float(), labels)
        return {"ce": (d.ce_weight, ce), "inter": (d.beta, t["inter"]), "intra": (d.gamma, t["intra"])}


@dataclass
class PooledHintConfig:
    weight: float = opt(1.0, "weight of the pooled hint (MSE between the student's pooled penultimate features, mapped "
                             "by a learned linear regressor, and the teacher's). No paper sets it: 1 keeps the hint on "
                             "the scale of the KD term here", ge=0)


@KD_METHODS.register("pooled_hint", config=PooledHintConfig,
                     help="kd plus an MSE hint between a learned linear map of the student's pooled penultimate "
                          "features and the teacher's, which the teacher cache can hold (kd.pooled_hint.*). Not "
                          "FitNets: that hints a middle-stage feature map through a conv regressor (kd.method=fitnet)")
class PooledHint(KD):
    """The `kd` method plus a hint on the pooled penultimate features (models.hint_loss): a learned linear regressor
    maps the student's width to the teacher's, trained with the student; weight kd.pooled_hint.weight. The KD part
    is the `kd` entry with its settings (kd.alpha, kd.temperature); kd.alpha=1 keeps only CE + hint.

    How it differs from FitNets (Romero et al. 2015; kd.method=fitnet): FitNets hints a middle layer's spatial
    feature map through a convolutional regressor, with CE and no KD term in mdistiller's one-stage form; this hints
    the pooled vectors after the last stage, on top of KD. A pooled vector per view is small enough to cache (2
    bytes x width x K per image), so it runs on the cached teacher; its numbers are not FitNets numbers."""

    teacher_outputs = ("logits", "features")
    student_reads = teacher_reads = ("logits", "features")

    @classmethod
    def uses_teacher(cls, cfg) -> bool:
        return True

    @classmethod
    def loss_weights(cls, cfg) -> dict[str, float]:
        return {**super().loss_weights(cfg), "hint": cfg.kd.pooled_hint.weight}

    @classmethod
    def loss_label(cls, cfg) -> str:
        return f"{super().loss_label(cfg)} + {_w(cfg.kd.pooled_hint.weight)} pooled-feature MSE"

    def __init__(self, cfg, student: nn.Module, teacher_feature_dim: int | None):
        super().__init__(cfg, student, teacher_feature_dim)
        self.regressor = nn.Linear(int(student.num_features), int(teacher_feature_dim))

    def forward(self, student, x):
        logits, features = logits_and_pooled_features(student, x)
        return {"logits": logits, "hint": self.regressor(features)}

    def loss_terms(self, outputs, teacher, labels, epoch, temperature) -> LossTerms:
        terms = super().loss_terms(outputs, teacher, labels, epoch, temperature)
        terms["hint"] = (float(self.cfg.kd.pooled_hint.weight), hint_loss(outputs["hint"], teacher["features"]))
        return terms


@dataclass
class FitNetConfig:
    stage: int = opt(2, "the hint stage: an index into timm's feature_info of both teacher and student (ResNet: 0 "
                        "stem, 1-4 layer1-layer4; MobileNetV2: the blocks ending strides 2-32). Default: mdistiller's "
                        "hint layer 2 (its cfg FITNET.HINT_LAYER), the stride-8 maps: ResNet-152 layer2, 512 x 28 x 28 "
                        "at 224 px; MobileNetV2 blocks.2, 32 x 28 x 28", ge=0)
    ce_weight: float = opt(1.0, "weight of the label cross-entropy (mdistiller FITNET.LOSS.CE_WEIGHT: 1)", ge=0)
    hint_weight: float = opt(100.0, "weight of the hint MSE (mdistiller FITNET.LOSS.FEAT_WEIGHT: 100)", ge=0)
    regressor_relu: bool = opt(True, "ReLU after the regressor's conv + BatchNorm, as mdistiller's ConvReg (the hinted "
                                     "ResNet maps are post-ReLU)")


# 50,000 mini-ImageNet training images; ResNet-152's stride-8 map at 224 px (the default stage)
_MINI_IMAGENET_MAP = (50_000, 512, 28, 28)


@KD_METHODS.register("fitnet", config=FitNetConfig,
                     help="FitNets (Romero et al. ICLR 2015) in mdistiller's one-stage form: kd.fitnet.ce_weight x CE "
                          "+ kd.fitnet.hint_weight x MSE(r(F_s), F_t), F the stage-kd.fitnet.stage feature maps, r a "
                          "conv + BatchNorm regressor; no KD term. Online teacher only (teacher.mode=online)")
class FitNet(KDMethod):
    """FitNets (Romero et al. 2015, models.fitnet_loss_terms) as mdistiller runs it (mdistiller/distillers/FitNet.py,
    defaults in mdistiller/engine/cfg.py; it ships no ImageNet FitNet config): CE weight 1, hint weight 100, hint
    layer 2, regressor conv + BN + ReLU (models.HintRegressor), trained with the student in one stage, no KD term.
    The teacher's map comes from the online teacher, which stops after that stage; the map is too large to cache."""

    teacher_outputs = ("feature_map",)
    student_reads, teacher_reads = ("logits", "stage_maps"), ("stage_maps",)
    reads = ()  # no KD term, so no temperature; it compares feature maps, not logits (no kd.logit_standardize)

    @classmethod
    def uses_temperature(cls, cfg) -> bool:
        return False

    @classmethod
    def stages(cls, cfg) -> tuple[int, ...]:
        return (int(cfg.kd.fitnet.stage),)

    @classmethod
    def cache_refusal(cls, cfg) -> str:
        n, c, h, w = _MINI_IMAGENET_MAP
        k = int(cfg.teacher.cache_views)
        size = n * k * c * h * w * 2
        return (f"FitNets hints the teacher's whole stage-{cfg.kd.fitnet.stage} feature map, and caching one per view "
                f"would be too large (mini-ImageNet, ResNet-152 at 224 px: {n:,} images x K={k} x {c} x {h} x {w} x 2 "
                f"bytes (fp16) = {size / 1e9:,.0f} GB, against {n * k * 100 * 2 / 1e6:,.0f} MB of cached logits); "
                "kd.method=pooled_hint is a hint on pooled features, which caches")

    @classmethod
    def loss_weights(cls, cfg) -> dict[str, float]:
        f = cfg.kd.fitnet
        return {"ce": f.ce_weight, "hint": f.hint_weight}

    @classmethod
    def loss_label(cls, cfg) -> str:
        f = cfg.kd.fitnet
        return f"{_w(f.ce_weight)} CE + {_w(f.hint_weight)} feature-map MSE"

    @classmethod
    def build(cls, cfg, student: nn.Module, teacher) -> "FitNet":
        stage, size = int(cfg.kd.fitnet.stage), int(cfg.data.image_size)
        return cls(cfg, stage_shape(student, stage, size, "student"),
                   stage_shape(teacher.model, stage, size, "teacher"))

    def __init__(self, cfg, student_shape: tuple[int, int, int], teacher_shape: tuple[int, int, int]):
        super().__init__(cfg, None, None)
        self.stage = int(cfg.kd.fitnet.stage)
        self.regressor = HintRegressor(student_shape, teacher_shape, cfg.kd.fitnet.regressor_relu)

    def teacher_online(self, teacher, x):
        return {"feature_map": teacher.feature_map(x, self.stage)}

    def forward(self, student, x):
        logits, feature_map = logits_and_stage_map(student, x, self.stage)
        return {"logits": logits, "hint": self.regressor(feature_map)}

    def loss_terms(self, outputs, teacher, labels, epoch, temperature) -> LossTerms:
        f = self.cfg.kd.fitnet
        t = fitnet_loss_terms(outputs["logits"], outputs["hint"], teacher["feature_map"], labels)
        return {"ce": (float(f.ce_weight), t["ce"]), "hint": (float(f.hint_weight), t["hint"])}
