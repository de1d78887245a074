"""Models and the pure functions of their losses, each with its formula and paper in the docstring.

- Distillation losses of the KD methods (kd_methods.py): `kd_loss_terms` (Hinton et al. 2015), `standardize_logits`
  (Sun et al. 2024), `dkd_loss_terms` and `dkd_warmup` (Zhao et al. 2022), `dist_loss_terms` (Huang et al. 2022),
  `hint_loss` (pooled_hint), `fitnet_loss_terms` and its `HintRegressor` (Romero et al. 2015).
- Teacher and student: timm models created by name (`create_student`, `create_teacher`), the `FrozenTeacher` that
  restricts a 1000-way ImageNet teacher to the dataset's classes and re-normalises its input, weight files
  (`load_state_file`), pooled features and middle-stage maps for feature methods (`logits_and_pooled_features`;
  `num_stages`, `check_stage`, `stage_map`, `stage_maps`, `logits_and_stage_map`, `logits_and_stage_maps`,
  `stage_shape`: public, for plugins too).
- The curriculum's per-sample difficulty scores, `DIFFICULTY_SCORES` (difficulty.score; the built-in one is
  `difficulty_score`).
- gan_vae/: the WGAN-GP experts (`Generator`, `Critic`, `gradient_penalty`, the WGAN losses), the beta-VAE student
  (`TaskVAE`, `vae_loss_terms`) and its distillation losses (`relational_kd`, `nt_xent`, `gaussian_kl`,
  `bernoulli_kl`).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checkpoint import freeze, load_checkpoint, load_state_strict
from common.errors import UserError
from common.registry import Registry
from imagedata.normalization import IMAGENET_NORM, Norm, model_cfg, named_norm, pretrained_norm, renormalize


# ----------------------------------------------------------------------------------------------------------------
# Distillation losses of the KD methods.
# ----------------------------------------------------------------------------------------------------------------
def kd_loss_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                  alpha: float, temperature: float, logit_standardize: bool = False) -> dict[str, torch.Tensor]:
    """Knowledge-distillation loss (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015) as its terms:

        ce   = CE(z_s, y)                                               (mean over the batch)
        kd   = T^2 * KL( softmax(z_t / T) || softmax(z_s / T) )
        loss = alpha * ce + (1 - alpha) * kd

    with KL(p || q) = sum_i p_i (log p_i - log q_i) summed over the C classes, then averaged over the B samples. The
    T^2 factor keeps the soft-target gradients on the scale of the CE gradients. `logit_standardize`: the KL term
    compares `standardize_logits` of both (Sun et al., CVPR 2024); CE is unchanged.

    Shapes: student_logits, teacher_logits [B, C] (any float dtype, computed in float32), labels int64 [B].
    alpha = 1 is plain cross-entropy (kd a zero) and accepts teacher_logits=None. Returns {"ce", "kd", "loss"}."""
    s = student_logits.float()
    ce = F.cross_entropy(s, labels)
    if alpha >= 1.0:
        return {"ce": ce, "kd": torch.zeros_like(ce), "loss": ce}
    if teacher_logits is None:
        raise ValueError("kd_loss_terms needs teacher_logits when alpha < 1")
    t = teacher_logits.float()
    if logit_standardize:
        s, t = standardize_logits(s), standardize_logits(t)
    log_p_s = F.log_softmax(s / temperature, dim=1)
    log_p_t = F.log_softmax(t / temperature, dim=1)
    # KL(p_t || p_s) = sum_i p_t(i) (log p_t(i) - log p_s(i)), summed over classes, averaged over the batch.
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    kd = temperature**2 * kl
    return {"ce": ce, "kd": kd, "loss": alpha * ce + (1.0 - alpha) * kd}


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardisation (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024, Eq. 9-10):
    each sample's logits z-scored over its C classes before the temperature is applied,

        Z(z)_k = (z_k - mean(z)) / (std(z) + eps),   std with Bessel's correction (divides by C - 1),

    so student and teacher are compared on logit relations, not on their ranges. [B, C] -> [B, C], float32."""
    z = logits.float()
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)


def _binary_log_probs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log [p_target, 1 - p_target] of softmax(logits) per sample, computed stably in log space: [B, C] -> [B, 2]."""
    log_all = torch.logsumexp(logits, dim=1)
    non_target = logits.masked_fill(target, float("-inf"))
    return torch.stack([logits[target] - log_all, torch.logsumexp(non_target, dim=1) - log_all], dim=1)


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities: sum_k p_k (log p_k - log q_k). [B, K] -> [B]."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def dkd_loss_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                   temperature: float, logit_standardize: bool = False) -> dict[str, torch.Tensor]:
    """Decoupled knowledge distillation (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022, Eq. 7) as its two
    terms, unweighted (DKD = alpha * tckd + beta * nckd):

        tckd = T^2 * KL(b_t || b_s),   b = [p_y, 1 - p_y],           p = softmax(z / T), y the label
        nckd = T^2 * KL(q_t || q_s),   q_k = p_k / (1 - p_y), k != y  (= softmax of the non-target logits / T)

    KL summed over its classes, then averaged over the B samples. TCKD is the target-class knowledge, NCKD the
    "dark knowledge" among the non-target classes, which classic KD weighs by (1 - p_t,y) and DKD frees. The
    paper's warm-up of the weight is `dkd_warmup`. `logit_standardize`: both logits z-scored first
    (`standardize_logits`). Shapes: logits [B, C] (C >= 2), labels int64 [B]. Returns {"tckd", "nckd"}."""
    s, t = student_logits.float(), teacher_logits.float()
    if logit_standardize:
        s, t = standardize_logits(s), standardize_logits(t)
    s, t = s / temperature, t / temperature
    target = F.one_hot(labels, s.shape[1]).bool()
    tckd = _kl_rows(_binary_log_probs(t, target), _binary_log_probs(s, target))
    b, c = s.shape
    # the distributions over the C - 1 non-target classes: softmax of the non-target logits alone
    log_q_t = F.log_softmax(t[~target].view(b, c - 1), dim=1)
    log_q_s = F.log_softmax(s[~target].view(b, c - 1), dim=1)
    nckd = _kl_rows(log_q_t, log_q_s)
    return {"tckd": temperature**2 * tckd.mean(), "nckd": temperature**2 * nckd.mean()}


def dkd_warmup(epoch: float, warmup_epochs: float) -> float:
    """DKD's linear warm-up of its distillation weight (Zhao et al. 2022, Sec. 4; mdistiller's `WARMUP`):
    min((epoch + 1) / warmup_epochs, 1) for 0-based `epoch`, so the weight is 1 / W in the first epoch and 1 from
    epoch W - 1 on; 1 throughout when warmup_epochs <= 0."""
    return 1.0 if warmup_epochs <= 0 else min((epoch + 1) / warmup_epochs, 1.0)


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row pair: the cosine of the mean-centred rows. [B, K] x [B, K] -> [B]."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float) -> dict[str, torch.Tensor]:
    """DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022, Eq. 6-9) as its two terms,
    unweighted (DIST = beta * inter + gamma * intra): match the relations of the predictions, not their values,
    with Y = softmax(Z / tau) row-wise,

        inter = tau^2 * (1 - (1/B) sum_i rho(Y_s[i, :], Y_t[i, :]))     (per sample, over its classes)
        intra = tau^2 * (1 - (1/C) sum_j rho(Y_s[:, j], Y_t[:, j]))     (per class, over the batch)

    with rho the Pearson correlation (cosine of mean-centred vectors, eps 1e-8 in the denominator). Perfectly
    correlated predictions give 0. The intra term is a statistic of the batch (under DDP: of each rank's valid
    samples). Shapes: logits [B, C], B >= 2 for a meaningful intra term. Returns {"inter", "intra"}."""
    y_s = F.softmax(student_logits.float() / temperature, dim=1)
    y_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    inter = 1.0 - _pearson_rows(y_s, y_t).mean()
    intra = 1.0 - _pearson_rows(y_s.t(), y_t.t()).mean()
    return {"inter": temperature**2 * inter, "intra": temperature**2 * intra}


def hint_loss(student_hint: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """The pooled hint of kd.method=pooled_hint: the mean squared error between the student's pooled penultimate
    features mapped by a learned linear regressor r (`student_hint` = r(f_s), [B, D_t]) and the teacher's pooled
    penultimate features f_t [B, D_t],

        L_hint = (1 / (B D_t)) sum_{i,d} (r(f_s)_{i,d} - f_t,{i,d})^2.

    The squared error of FitNets' hint (Romero et al., ICLR 2015, Eq. 3, up to its factor 1/2), but on pooled
    vectors rather than a middle layer's feature maps: not FitNets (that is `fitnet_loss_terms`). fp32."""
    return F.mse_loss(student_hint.float(), teacher_features.float())


def fitnet_loss_terms(student_logits: torch.Tensor, student_hint: torch.Tensor, teacher_map: torch.Tensor,
                      labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """FitNets (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015) trained in one stage with the labels,
    as mdistiller runs it (megvii-research/mdistiller, mdistiller/distillers/FitNet.py): the loss is

        L = w_ce CE(z_s, y) + w_hint L_hint,
        L_hint = (1 / (B C H W)) sum_{i,c,h,w} (r(F_s)_{i,c,h,w} - F_t,{i,c,h,w})^2,

    F_s [B, C_s, H_s, W_s] and F_t [B, C, H, W] the student's and the teacher's feature maps at a middle stage (the
    paper's guided and hint layers), r the learned convolutional regressor (`HintRegressor`; `student_hint` =
    r(F_s)), z_s the student's logits, y the labels. The paper's Eq. 3 is 1/2 ||.||^2; the mean here changes only
    the scale, which w_hint sets (mdistiller: 100, CE weight 1). Returns the unweighted {"ce", "hint"}, both in
    fp32 (under autocast the maps arrive in fp16 / bf16)."""
    return {"ce": F.cross_entropy(student_logits.float(), labels),
            "hint": F.mse_loss(student_hint.float(), teacher_map.float())}


class HintRegressor(nn.Module):
    """FitNets' regressor r: the student's feature map [B, C_s, H_s, W_s] -> the teacher's shape [B, C_t, H_t, W_t]:
    a convolution, BatchNorm, then ReLU (optional), as mdistiller's ConvReg. The convolution follows the spatial
    sizes: equal -> 1x1; the student's twice the teacher's -> 3x3 stride 2; half -> a 4x4 transposed convolution,
    stride 2; larger by d -> a valid (1 + d) x (1 + d) convolution (the paper's fully convolutional regressor); any
    other pair is refused. No bias: the BatchNorm's shift follows it."""

    def __init__(self, student_shape: tuple[int, int, int], teacher_shape: tuple[int, int, int], relu: bool = True):
        super().__init__()
        (cs, hs, ws), (ct, ht, wt) = student_shape, teacher_shape
        if (hs, ws) == (ht, wt):
            conv = nn.Conv2d(cs, ct, 1, bias=False)
        elif (hs, ws) == (2 * ht, 2 * wt):
            conv = nn.Conv2d(cs, ct, 3, stride=2, padding=1, bias=False)
        elif (2 * hs, 2 * ws) == (ht, wt):
            conv = nn.ConvTranspose2d(cs, ct, 4, stride=2, padding=1, bias=False)
        elif hs >= ht and ws >= wt:
            conv = nn.Conv2d(cs, ct, (1 + hs - ht, 1 + ws - wt), bias=False)
        else:
            raise UserError(f"no FitNets regressor maps the student's {hs}x{ws} feature map to the teacher's "
                            f"{ht}x{wt} (the student's must be as large, larger, or half as large): pick another "
                            "kd.fitnet.stage")
        self.conv, self.bn = conv, nn.BatchNorm2d(ct)
        self.act = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


# ----------------------------------------------------------------------------------------------------------------
# Student and teacher.
# ----------------------------------------------------------------------------------------------------------------
def _create(name: str, pretrained: bool, num_classes: int | None, what: str) -> nn.Module:
    import timm
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise UserError(f"{what}.name={name} is not a timm model; list them with "
                            "`python -c \"import timm; print(timm.list_models('*resnet*'))\"`") from None
        raise _weights_error(name, what, exc) from None
    except Exception as exc:  # hub download failures come in many types (OSError, HTTP errors, hub errors)
        if not pretrained:
            raise
        raise _weights_error(name, what, exc) from None


def _weights_error(name: str, what: str, exc: Exception) -> UserError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return UserError(f"cannot get pretrained weights for {what} '{name}' ({type(exc).__name__}: {first}). "
                     f"Offline? Download them once with internet (they land in the HF cache, which you can copy), "
                     f"or pass {what}.checkpoint=PATH to a local state dict (.pt/.pth/.safetensors), "
                     f"or set {what}.pretrained=false")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def create_student(cfg, num_classes: int) -> nn.Module:
    """`cfg.student.name` from timm with a `num_classes`-way head (from scratch unless student.pretrained)."""
    return _create(cfg.student.name, cfg.student.pretrained, num_classes, "student")


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a .pt/.pth file (a bare state dict, or a training checkpoint of this
    repository, whose `model` entry is used)."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:
            raise UserError(f"cannot read checkpoint {path}: it is truncated or not a safetensors file "
                            f"({type(exc).__name__}: {exc})") from None
    obj = load_checkpoint(path)  # a UserError for a missing, empty, truncated or foreign file, or not a dict
    if "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} holds no model weights: expected a state dict (names to tensors) or a training "
                        "checkpoint of train_student.py or train_student_rl.py (its 'model' entry)")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


class FrozenTeacher(nn.Module):
    """A teacher that never trains: no gradients, always in eval mode (BatchNorm uses running statistics) whatever
    `.train()` is called on it. Its logits are restricted to the dataset's classes with one `index_select`.

    Its input is normalised with `input_norm` (the student's mean and std, so one batch serves both); when the
    teacher's own statistics (`own_norm`, from its timm config, `normalization.model_cfg`) differ, forward
    re-expresses the batch in them first (`normalization.renormalize`), so the teacher sees the pixels normalised
    as its weights expect.

    forward(x [B, 3, H, W]) -> logits [B, C], C = len(class_index) or the model's own number of outputs."""

    def __init__(self, model: nn.Module, class_index: list[int] | None, input_norm: Norm = IMAGENET_NORM):
        super().__init__()
        self.input_norm, self.own_norm = input_norm, pretrained_norm(model_cfg(model))
        self.model = freeze(model)
        index = torch.as_tensor(class_index if class_index is not None else [], dtype=torch.long)
        self.register_buffer("class_index", index, persistent=False)
        self.restrict = class_index is not None

    def train(self, mode: bool = True) -> "FrozenTeacher":
        # Deliberately ignore `mode`: a frozen teacher with training-mode BatchNorm gives wrong soft targets.
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.restrict_logits(self.model(self.own_input(x)))

    def own_input(self, x: torch.Tensor) -> torch.Tensor:
        """The batch in the teacher's own normalisation (unchanged when it equals the input's)."""
        return renormalize(x, self.input_norm, self.own_norm) if self.input_norm != self.own_norm else x

    def restrict_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_select(1, self.class_index) if self.restrict else logits

    @property
    def feature_dim(self) -> int | None:
        """Width of the pooled penultimate features (timm's `num_features`), or None for a model without them."""
        return pooled_feature_dim(self.model)

    @torch.no_grad()
    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, C], pooled penultimate features [B, feature_dim]) from one forward."""
        logits, features = logits_and_pooled_features(self.model, self.own_input(x))
        return self.restrict_logits(logits), features

    @torch.no_grad()
    def feature_map(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """The feature map [B, C, H, W] at the end of timm stage `stage` (models.stage_map); the later stages and
        the head do not run."""
        return stage_map(self.model, self.own_input(x), stage)

    @torch.no_grad()
    def feature_maps(self, x: torch.Tensor, stages: list[int]) -> list[torch.Tensor]:
        """The feature maps at each stage of `stages` (models.stage_maps), from one forward that stops after the
        last of them."""
        return stage_maps(self.model, self.own_input(x), stages)


def pooled_feature_dim(model: nn.Module) -> int | None:
    """timm's `num_features` (the width `forward_head(..., pre_logits=True)` returns), None when the model lacks
    the forward_features / forward_head split."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        return None
    dim = getattr(model, "num_features", 0)
    return int(dim) if dim else None


def logits_and_pooled_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of a timm classifier returning (logits, pooled pre-logit features): forward_features, then
    forward_head(pre_logits=True), then the classifier, with the head's dropout in training as timm applies it,
    so the logits are those of `model(x)`."""
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    drop = float(getattr(model, "drop_rate", 0.0) or 0.0)
    head_in = F.dropout(pooled, p=drop, training=model.training) if drop > 0 else pooled
    return model.get_classifier()(head_in), pooled


def num_stages(model: nn.Module) -> int:
    """How many stages `stage_map` can read from `model`: the length of timm's feature_info (0 for a model without
    forward_intermediates or feature_info)."""
    if not hasattr(model, "forward_intermediates"):
        return 0
    return len(getattr(model, "feature_info", None) or [])


def check_stage(model: nn.Module, stage: int, what: str, reader: str = "this run") -> None:
    """A UserError unless `stage` is a stage index of `model` (0 <= stage < num_stages(model)). `what` names the
    model in the message ("student", "teacher resnet18"), `reader` what reads the stage ("kd.method=at")."""
    stages = num_stages(model)
    if not stages:
        raise UserError(f"{reader} reads a middle stage of the {what} through timm's forward_intermediates and "
                        f"feature_info, which {type(model).__name__} lacks: use a timm CNN (ResNet, MobileNetV2, ...)")
    if not 0 <= stage < stages:
        raise UserError(f"{reader} reads stage {stage} of the {what} ({type(model).__name__}), which has stages 0 to "
                        f"{stages - 1} (timm's feature_info: the stem, then one per resolution)")


def stage_map(model: nn.Module, x: torch.Tensor, stage: int) -> torch.Tensor:
    """The feature map [B, C, H, W] at the end of timm stage `stage` (an index into model.feature_info: for a
    ResNet 0 = the stem, 1-4 = layer1-layer4; for MobileNetV2 the block ending each resolution), without running
    the later stages."""
    # stop_early: without it timm runs every later stage too and drops their outputs
    return model.forward_intermediates(x, indices=[stage], intermediates_only=True, stop_early=True)[0]


def stage_maps(model: nn.Module, x: torch.Tensor, stages: list[int]) -> list[torch.Tensor]:
    """The feature maps [B, C_j, H_j, W_j] at the end of each timm stage in `stages` (as `stage_map`), in that
    order, from one forward that stops after the last of them."""
    order = sorted(set(stages))
    maps = model.forward_intermediates(x, indices=order, intermediates_only=True, stop_early=True)
    return [maps[order.index(s)] for s in stages]


def logits_and_stage_map(model: nn.Module, x: torch.Tensor, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of a timm classifier returning (logits, its feature map at `stage`): forward_intermediates, then
    forward_head, so the logits are those of `model(x)`."""
    final, maps = model.forward_intermediates(x, indices=[stage])
    return model.forward_head(final), maps[0]


def logits_and_stage_maps(model: nn.Module, x: torch.Tensor,
                          stages: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits [B, K], [the feature map at each stage of `stages`, in that order]) from one forward of a timm
    classifier (as `logits_and_stage_map`)."""
    order = sorted(set(stages))
    final, maps = model.forward_intermediates(x, indices=order)
    return model.forward_head(final), [maps[order.index(s)] for s in stages]


@torch.no_grad()
def stage_shape(model: nn.Module, stage: int, image_size: int, what: str) -> tuple[int, int, int]:
    """(C, H, W) of `model`'s feature map at `stage` for image_size x image_size inputs, from one forward of zeros
    in eval mode (no BatchNorm statistic moves, nothing random is drawn); the model's mode is restored. A stage
    `model` lacks is a UserError (`check_stage`; `what` names the model)."""
    check_stage(model, stage, what)
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        x = torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)
        return tuple(stage_map(model, x, stage).shape[1:])
    finally:
        model.train(was_training)


def teacher_output_classes(state: dict[str, torch.Tensor], model: nn.Module) -> int | None:
    """Number of outputs of the classifier stored in `state`, for the model's classifier key (`classifier` of its
    timm config, `normalization.model_cfg`: the config normalisation reads too; "fc" when it names none)."""
    key = model_cfg(model).get("classifier") or "fc"
    key = key[0] if isinstance(key, (tuple, list)) else key  # a distilled model's (head, head_dist): the first
    weight = state.get(f"{key}.weight")
    return int(weight.shape[0]) if weight is not None else None


def create_teacher(cfg, class_names: list[str], input_norm: Norm | None = None) -> FrozenTeacher:
    """The frozen teacher for a dataset with these class names, fed batches normalised with `input_norm` (default:
    the mean and std of the student `cfg.student.name`, see FrozenTeacher).

    - hub weights (`teacher.pretrained=true`), or a local state dict (`teacher.checkpoint`, e.g. a teacher trained
      by train_student.py with kd.alpha=1), or random weights;
    - a teacher with exactly len(class_names) outputs is used as is; a 1000-way ImageNet teacher is restricted to
      the dataset's classes through timm's mini-ImageNet synset and index lists (checked at start-up)."""
    from imagedata.label_alignment import imagenet_class_index
    t = cfg.teacher
    if t.checkpoint:
        state = load_state_file(Path(t.checkpoint))
        probe = _create(t.name, False, None, "teacher")
        num_outputs = teacher_output_classes(state, probe) or 1000
        model = probe if num_outputs == 1000 else _create(t.name, False, num_outputs, "teacher")
        load_state_strict(model, state, f"teacher.checkpoint={t.checkpoint}")
    else:
        model = _create(t.name, t.pretrained, None, "teacher")
    num_outputs = model.num_classes if hasattr(model, "num_classes") else model(torch.zeros(1, 3, 64, 64)).shape[1]
    if num_outputs == len(class_names):
        class_index = None
    elif num_outputs == 1000:
        class_index = imagenet_class_index(class_names)
    else:
        raise UserError(f"the teacher has {num_outputs} outputs but the dataset has {len(class_names)} classes; "
                        "use a teacher trained on this dataset or a 1000-way ImageNet teacher")
    return FrozenTeacher(model, class_index, input_norm or named_norm(cfg.student.name))


# ----------------------------------------------------------------------------------------------------------------
# Per-sample difficulty (curriculum): DIFFICULTY_SCORES, selected by difficulty.score.
# ----------------------------------------------------------------------------------------------------------------
# A score is a pure function `score(teacher_logits [N, C], student_logits [N, C], **options) -> D [N]` in [0, 1]:
# both float32 at temperature 1, the teacher cache's evaluation-view logits and the student's eval-mode logits on the
# same views. `options` are the keys of its own config section, difficulty.<name>.* (registered with `config=`).
# curriculum.score_difficulty calls the selected one and checks what it returns. A new score registers here or from
# a file named by run.plugins (examples/plugins/margin_difficulty.py).
DIFFICULTY_SCORES = Registry("difficulty score", key="difficulty.score", sections="difficulty")


@DIFFICULTY_SCORES.register("confidence_entropy_kl", help="0.3 (1 - max p_t) + 0.3 H(p_t) / log C + 0.4 "
                                                          "min(KL(p_t || p_s) / 5, 1): teacher confidence and "
                                                          "entropy, teacher-student disagreement")
def difficulty_score(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Difficulty of each sample in [0, 1] from the teacher's and the student's logits (both at temperature 1).

    With p_t = softmax(teacher_logits), p_s = softmax(student_logits) and C classes:
        D_conf    = 1 - max_i p_t(i)
        D_entropy = (- sum_i p_t(i) log p_t(i)) / log C
        D_kl      = min(KL(p_t || p_s) / 5, 1),  KL(p_t || p_s) = sum_i p_t(i) log(p_t(i) / p_s(i))
        D         = 0.3 D_conf + 0.3 D_entropy + 0.4 D_kl

    Least confidence and entropy are the uncertainty measures of active learning (Settles, "Active Learning
    Literature Survey", 2009, Sec. 3.1); the KL term adds the student's disagreement with the teacher. The weights
    and the KL scale 5 are this repository's choice (difficulty.score=confidence_entropy_kl, the default).
    Computed in float32 from log_softmax, with 0 log 0 = 0 (a class with p_t(i) = 0 adds nothing).
    Shapes: teacher_logits, student_logits [B, C] -> D [B]."""
    t, s = teacher_logits.float(), student_logits.float()
    num_classes = t.shape[1]
    log_p_t, log_p_s = F.log_softmax(t, dim=1), F.log_softmax(s, dim=1)
    p_t = log_p_t.exp()
    # p * log p with the 0 log 0 = 0 convention: where p_t underflows to 0 the product is defined as 0.
    plogp = torch.where(p_t > 0, p_t * log_p_t, torch.zeros_like(p_t))
    d_conf = 1.0 - p_t.max(dim=1).values
    d_entropy = -plogp.sum(dim=1) / math.log(num_classes)
    kl = (plogp - torch.where(p_t > 0, p_t * log_p_s, torch.zeros_like(p_t))).sum(dim=1)
    d_kl = (kl.clamp(min=0.0) / 5.0).clamp(max=1.0)
    return (0.3 * d_conf + 0.3 * d_entropy + 0.4 * d_kl).clamp(0.0, 1.0)


# ================================================================================================================
# Continual generative learning (gan_vae/): WGAN-GP expert networks and the beta-VAE student.
# ================================================================================================================
class SelfAttention(nn.Module):
    """SAGAN self-attention (Zhang et al., 2019): x + gamma * softmax(Q^T K) V, gamma starting at 0.
    x [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, channels: int, spectral: bool = False):
        super().__init__()
        wrap = nn.utils.parametrizations.spectral_norm if spectral else (lambda m: m)
        self.query = wrap(nn.Conv2d(channels, max(channels // 8, 1), 1))
        self.key = wrap(nn.Conv2d(channels, max(channels // 8, 1), 1))
        self.value = wrap(nn.Conv2d(channels, channels, 1))
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # [B, HW, C']
        k = self.key(x).flatten(2)  # [B, C', HW]
        attn = torch.softmax(q @ k, dim=-1)  # [B, HW, HW]
        v = self.value(x).flatten(2)  # [B, C, HW]
        return x + self.gamma * (v @ attn.transpose(1, 2)).view(b, c, h, w)


class Generator(nn.Module):
    """DCGAN-style generator with spectral norm on every layer: z [B, z_dim] -> image [B, C, 32, 32] in [-1, 1].
    4x4 -> 8x8 -> 16x16 (optional self-attention) -> 32x32."""

    def __init__(self, z_dim: int = 64, channels: int = 1, width: int = 64, attention: bool = False):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.z_dim = z_dim
        self.project = sn(nn.Linear(z_dim, 4 * 4 * 4 * width))
        self.width = width
        self.body = nn.Sequential(
            nn.BatchNorm2d(4 * width), nn.ReLU(True),
            sn(nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1)), nn.BatchNorm2d(2 * width), nn.ReLU(True),
            sn(nn.ConvTranspose2d(2 * width, width, 4, 2, 1)), nn.BatchNorm2d(width), nn.ReLU(True),
            SelfAttention(width, spectral=True) if attention else nn.Identity(),
            sn(nn.ConvTranspose2d(width, channels, 4, 2, 1)), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).view(-1, 4 * self.width, 4, 4))


class Critic(nn.Module):
    """WGAN critic without batch norm: image [B, C, 32, 32] -> score [B]. `features(x)` is the penultimate,
    flattened activation [B, 4 * width * 16] used for feature-level distillation."""

    def __init__(self, channels: int = 1, width: int = 64, attention: bool = False):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True),  # 16x16
            SelfAttention(width) if attention else nn.Identity(),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2, True),  # 8x8
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.LeakyReLU(0.2, True))  # 4x4
        self.head = nn.Linear(4 * width * 16, 1)
        self.feature_dim = 4 * width * 16

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(1)


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor, weight: float = 10.0,
                     eps: torch.Tensor | None = None) -> torch.Tensor:
    """WGAN-GP gradient penalty (Gulrajani et al., 2017), a scalar:

        GP = weight * mean_b ( || grad_x critic(x_hat_b) ||_2 - 1 )^2,   x_hat = eps * real + (1 - eps) * fake

    with eps ~ U(0, 1) per sample (or given, shape [B, 1, 1, 1]) and the norm of each sample's flattened gradient.
    real, fake: [B, C, H, W]."""
    if eps is None:
        eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    x_hat = (eps * real + (1 - eps) * fake.detach()).requires_grad_(True)
    scores = critic(x_hat)
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    return weight * ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def wgan_critic_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """WGAN critic loss (Arjovsky et al., 2017; Gulrajani et al., 2017 add `gradient_penalty` to it), a scalar to
    minimise: the negated Wasserstein estimate

        L_D = -( mean_b D(x_real_b) - mean_b D(x_fake_b) ),

    so -L_D is the estimate itself. real_scores [B], fake_scores [B'] (critic outputs; B' may differ from B)."""
    return -(real_scores.mean() - fake_scores.mean())


def wgan_generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """WGAN generator loss (Arjovsky et al., 2017), a scalar to minimise: L_G = -mean_b D(G(z_b)).
    fake_scores [B]: the critic's scores of generated images, with the graph back to the generator."""
    return -fake_scores.mean()


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR, Chen et al., 2020) between two views a, b [B, D] of the same B samples, a scalar.

    With the 2B vectors v = normalize(cat(a, b)) and s_ij = v_i . v_j / temperature, the loss of anchor i is
    -log( exp(s_{i,p(i)}) / sum_{k != i} exp(s_ik) ), p(i) its other view; averaged over the 2B anchors."""
    v = F.normalize(torch.cat([a, b]).float(), dim=1)
    n = a.shape[0]
    sim = v @ v.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=sim.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(sim.device)
    return F.cross_entropy(sim, positives)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor | float = 0.0,
                prior_logvar: torch.Tensor | float = 0.0) -> torch.Tensor:
    """KL( N(mu, diag exp(logvar)) || N(prior_mu, diag exp(prior_logvar)) ), summed over the last dimension:

        0.5 * sum_d [ prior_logvar - logvar + (exp(logvar) + (mu - prior_mu)^2) / exp(prior_logvar) - 1 ]

    mu, logvar [B, D]; the prior broadcasts ([D], [B, D] or a number). Returns [B]."""
    prior_mu = torch.as_tensor(prior_mu, dtype=mu.dtype, device=mu.device)
    prior_logvar = torch.as_tensor(prior_logvar, dtype=mu.dtype, device=mu.device)
    return 0.5 * (prior_logvar - logvar + (logvar.exp() + (mu - prior_mu) ** 2) / prior_logvar.exp() - 1).sum(-1)


def bernoulli_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL( Bern(sigmoid(logits_p)) || Bern(sigmoid(logits_q)) ) summed over all but the first dimension:

        sum_pixels [ p (log p - log q) + (1 - p) (log(1 - p) - log(1 - q)) ],  p = sigmoid(logits_p), ...

    computed from log-sigmoids for stability. Returns [B]."""
    p = torch.sigmoid(logits_p)
    kl = p * (F.logsigmoid(logits_p) - F.logsigmoid(logits_q)) + \
        (1 - p) * (F.logsigmoid(-logits_p) - F.logsigmoid(-logits_q))
    return kl.flatten(1).sum(1)


def relational_kd(teacher_features: torch.Tensor, student_features: torch.Tensor, temperature: float,
                  groups: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Relational distillation (after Park et al., 2019, "Relational Knowledge Distillation", with cosine
    similarities compared as softmax distributions at temperature T), a scalar:

        loss = 1/B sum_b w_b KL( softmax_c(S_t[b, c] / T) || softmax_c(S_s[b, c] / T) ),  c != b, g_c = g_b

    S_t and S_s are the cosine similarities [B, B] of the teacher's and the student's features [B, D_t], [B, D_s].
    Row b compares b only with the other rows of its group (`groups` [B], e.g. the expert that taught each row:
    similarities between features of different teachers mean nothing); without groups all rows form one group.
    `weights` [B] (default 1) scales each row's KL; a row alone in its group contributes 0."""
    n = len(teacher_features)
    mask = ~torch.eye(n, dtype=torch.bool, device=teacher_features.device)
    if groups is not None:
        mask &= groups.view(-1, 1) == groups.view(1, -1)
    has_pair = mask.any(1, keepdim=True)
    # a row with no partner keeps finite logits (zeros) so that neither value nor gradient becomes NaN
    keep = mask | ~has_pair

    def log_probs(f):
        f = F.normalize(f.float(), dim=1)
        logits = (f @ f.t() / temperature).masked_fill(~keep, float("-inf"))
        return F.log_softmax(logits, dim=1).masked_fill(~mask, 0.0)

    log_p_t, log_p_s = log_probs(teacher_features), log_probs(student_features)
    per_row = (log_p_t.exp() * mask * (log_p_t - log_p_s)).sum(1)
    if weights is not None:
        per_row = per_row * weights.to(per_row)
    return per_row.mean()


class TaskVAE(nn.Module):
    """beta-VAE student with a shared latent z ~ N(0, I) and a domain latent u with a learned task-conditional
    prior p(u | t) = N(mu_t, diag sigma_t^2), one per task, added by `add_task()`. Decoder p(x | z, u) gives
    Bernoulli logits over pixels in [0, 1] (images live in [-1, 1]; x01 = (x + 1) / 2).

    encode(x [B, C, 32, 32]) -> h [B, F] (encoder features), (mu_z, logvar_z) [B, Z], (mu_u, logvar_u) [B, U]."""

    def __init__(self, channels: int = 1, z_dim: int = 16, u_dim: int = 8, width: int = 32):
        super().__init__()
        self.z_dim, self.u_dim, self.channels = z_dim, u_dim, channels
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2, True),
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.BatchNorm2d(4 * width), nn.LeakyReLU(0.2, True),
            nn.Flatten(), nn.Linear(4 * width * 16, 256), nn.LeakyReLU(0.2, True))
        self.feature_dim = 256
        self.to_z = nn.Linear(256, 2 * z_dim)
        self.to_u = nn.Linear(256, 2 * u_dim)
        self.decoder_in = nn.Linear(z_dim + u_dim, 4 * width * 16)
        self.decoder = nn.Sequential(
            nn.BatchNorm2d(4 * width), nn.ReLU(True),
            nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU(True),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.BatchNorm2d(width), nn.ReLU(True),
            nn.ConvTranspose2d(width, channels, 4, 2, 1))
        self.width = width
        self.prior_mu = nn.ParameterList()
        self.prior_logvar = nn.ParameterList()

    @property
    def num_tasks(self) -> int:
        return len(self.prior_mu)

    def add_task(self) -> int:
        """A new task prior p(u | t), initialised apart from the others (mean drawn from N(0, I))."""
        device = self.to_u.weight.device
        self.prior_mu.append(nn.Parameter(torch.randn(self.u_dim, device=device)))
        self.prior_logvar.append(nn.Parameter(torch.zeros(self.u_dim, device=device)))
        return self.num_tasks - 1

    def task_prior(self, tasks: torch.Tensor, mix: tuple[torch.Tensor, torch.Tensor] | None = None):
        """(mu_t, logvar_t) [B, U] for task ids [B]; with mix = (other task ids [B], lam [B]) the prior of a mixed
        sample is interpolated: mu = lam mu_t + (1 - lam) mu_o, sigma^2 likewise."""
        mu, logvar = torch.stack(list(self.prior_mu)), torch.stack(list(self.prior_logvar))
        m, lv = mu[tasks], logvar[tasks]
        if mix is not None:
            other, lam = mix
            lam = lam.view(-1, 1)
            m = lam * m + (1 - lam) * mu[other]
            lv = torch.log(lam * lv.exp() + (1 - lam) * logvar[other].exp())
        return m, lv

    def encode(self, x: torch.Tensor):
        h = self.encoder(x)
        mu_z, logvar_z = self.to_z(h).chunk(2, dim=1)
        mu_u, logvar_u = self.to_u(h).chunk(2, dim=1)
        return h, (mu_z, logvar_z.clamp(-10, 10)), (mu_u, logvar_u.clamp(-10, 10))

    def decode_logits(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.decoder_in(torch.cat([z, u], dim=1)).view(-1, 4 * self.width, 4, 4))

    @staticmethod
    def to_image(logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) * 2 - 1

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior-mean reconstruction in [-1, 1]."""
        _, (mu_z, _), (mu_u, _) = self.encode(x)
        return self.to_image(self.decode_logits(mu_z, mu_u))

    def sample(self, tasks: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images of the given task ids: z ~ N(0, I), u ~ p(u | t)."""
        device = self.to_u.weight.device
        # drawn on the generator's own device, then moved: a CPU generator gives the same images on any device
        draw_on = generator.device if generator is not None else device
        z = torch.randn(len(tasks), self.z_dim, generator=generator, device=draw_on).to(device)
        mu, logvar = self.task_prior(tasks)
        u = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=generator, device=draw_on).to(device)
        return self.to_image(self.decode_logits(z, u))


def vae_loss_terms(model: TaskVAE, x: torch.Tensor, tasks: torch.Tensor, beta: float,
                   mix: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per-sample beta-VAE terms for images x [B, C, H, W] in [-1, 1] of tasks [B]:
        recon = sum over pixels of BCE(decoder logits, (x + 1) / 2)
        kl_z  = KL(q(z | x) || N(0, I)),  kl_u = KL(q(u | x) || p(u | t)), each summed over latent dimensions
        loss  = recon + beta * (kl_z + kl_u)
    Returns a dict of [B] tensors plus "h" (encoder features), "mu_z" and "mu_u" (posterior means) and "x_hat", the
    reconstruction [B, C, H, W] in [-1, 1] (the decoder's Bernoulli mean at the sampled z, u; with its gradient)."""
    h, (mu_z, lv_z), (mu_u, lv_u) = model.encode(x)
    z = mu_z + (0.5 * lv_z).exp() * torch.randn_like(mu_z)
    u = mu_u + (0.5 * lv_u).exp() * torch.randn_like(mu_u)
    logits = model.decode_logits(z, u)
    recon = F.binary_cross_entropy_with_logits(logits, (x + 1) / 2, reduction="none").flatten(1).sum(1)
    kl_z = gaussian_kl(mu_z, lv_z)
    kl_u = gaussian_kl(mu_u, lv_u, *model.task_prior(tasks, mix))
    return {"recon": recon, "kl_z": kl_z, "kl_u": kl_u, "loss": recon + beta * (kl_z + kl_u), "h": h, "mu_z": mu_z,
            "mu_u": mu_u, "x_hat": model.to_image(logits)}
