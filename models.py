"""Models and losses: the frozen teacher, the student, and the knowledge-distillation loss.

Models are created by name through `timm.create_model`; configs name them as strings. Losses are pure functions
of tensors with the formula in the docstring.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import UserError, load_state_strict


# ----------------------------------------------------------------------------------------------------------------
# Knowledge distillation loss (Hinton et al., 2015).
# ----------------------------------------------------------------------------------------------------------------
def kd_loss_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                  alpha: float, temperature: float) -> dict[str, torch.Tensor]:
    """The terms of `kd_loss` as a dict: `ce`, `kd` (the T²-scaled KL, zero when alpha = 1) and `loss`."""
    s = student_logits.float()
    ce = F.cross_entropy(s, labels)
    if alpha >= 1.0:
        return {"ce": ce, "kd": torch.zeros_like(ce), "loss": ce}
    if teacher_logits is None:
        raise ValueError("kd_loss needs teacher_logits when alpha < 1")
    t = teacher_logits.float()
    log_p_s = F.log_softmax(s / temperature, dim=1)
    log_p_t = F.log_softmax(t / temperature, dim=1)
    # KL(p_t || p_s) = sum_i p_t(i) (log p_t(i) - log p_s(i)), summed over classes, averaged over the batch.
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    kd = temperature**2 * kl
    return {"ce": ce, "kd": kd, "loss": alpha * ce + (1.0 - alpha) * kd}


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
            alpha: float, temperature: float) -> torch.Tensor:
    """Knowledge-distillation loss, a scalar averaged over the batch.

        L = alpha * CE(z_s, y) + (1 - alpha) * T^2 * KL( softmax(z_t / T) || softmax(z_s / T) )

    with CE the mean cross-entropy and KL(p || q) = sum_i p_i (log p_i - log q_i) summed over the C classes, then
    averaged over the B samples. The T^2 factor keeps the soft-target gradients on the scale of the CE gradients.

    Shapes: student_logits, teacher_logits [B, C] (any float dtype, computed in float32), labels int64 [B].
    alpha = 1 is plain cross-entropy and accepts teacher_logits=None."""
    return kd_loss_terms(student_logits, teacher_logits, labels, alpha, temperature)["loss"]


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
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise UserError(f"{path} does not hold a state dict")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


class FrozenTeacher(nn.Module):
    """A teacher that never trains: no gradients, always in eval mode (BatchNorm uses running statistics) whatever
    `.train()` is called on it. Its logits are restricted to the dataset's classes with one `index_select`.

    forward(x [B, 3, H, W]) -> logits [B, C], C = len(class_index) or the model's own number of outputs."""

    def __init__(self, model: nn.Module, class_index: list[int] | None):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        index = torch.as_tensor(class_index if class_index is not None else [], dtype=torch.long)
        self.register_buffer("class_index", index, persistent=False)
        self.restrict = class_index is not None

    def train(self, mode: bool = True) -> "FrozenTeacher":
        # Deliberately ignore `mode`: a frozen teacher with training-mode BatchNorm gives wrong soft targets.
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return logits.index_select(1, self.class_index) if self.restrict else logits


def teacher_output_classes(state: dict[str, torch.Tensor], model: nn.Module) -> int | None:
    """Number of outputs of the classifier stored in `state`, for the model's classifier key (timm's cfg)."""
    key = model.default_cfg.get("classifier", "fc") if hasattr(model, "default_cfg") else "fc"
    weight = state.get(f"{key}.weight")
    return int(weight.shape[0]) if weight is not None else None


def create_teacher(cfg, class_names: list[str]) -> FrozenTeacher:
    """The frozen teacher for a dataset with these class names.

    - hub weights (`teacher.pretrained=true`), or a local state dict (`teacher.checkpoint`, e.g. a teacher trained
      by train_student.py with kd.alpha=1), or random weights;
    - a teacher with exactly len(class_names) outputs is used as is; a 1000-way ImageNet teacher is restricted to
      the dataset's classes through timm's mini-ImageNet synset and index lists (checked at start-up)."""
    from data import imagenet_class_index
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
    return FrozenTeacher(model, class_index)
