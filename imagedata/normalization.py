"""Input normalisation: uint8 images -> the float input a model was trained on, with that model's mean and std.

A timm model's `pretrained_cfg` (`model_cfg`: or `default_cfg`, its older name) names the mean and std its weights
expect (ImageNet's for most CNNs, 0.5 for many ViTs); a model without them gets ImageNet's. The student's inputs
are normalised with the student's statistics (`normalize_batch(..., input_norm(student))`); the teacher
(`models.FrozenTeacher`) receives that same batch and re-expresses it in its own statistics (`renormalize`) only
when the two differ.
"""
from __future__ import annotations

import functools

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_NORM = (IMAGENET_MEAN, IMAGENET_STD)

Norm = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) per channel, on the [0, 1] pixel scale


def model_cfg(model: torch.nn.Module) -> dict:
    """The timm config a model carries: its `pretrained_cfg`, else its `default_cfg` (timm's older name, which timm's
    builder still sets as an alias of the first; a model made outside that builder may have either one), else {}.
    The teacher loader (the classifier's name, `models.teacher_output_classes`) and normalisation (mean and std)
    both read this one config."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def pretrained_norm(pretrained_cfg: dict | None) -> Norm:
    """(mean, std) from a timm `pretrained_cfg` dict, ImageNet's when it names none."""
    cfg = pretrained_cfg or {}
    if cfg.get("mean") is None or cfg.get("std") is None:
        return IMAGENET_NORM
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])


def named_norm(name: str) -> Norm:
    """(mean, std) of the `pretrained_cfg` that `timm.create_model(name)` attaches, without building the model."""
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(name)
    return pretrained_norm(cfg.to_dict() if cfg is not None else None)


def input_norm(model: torch.nn.Module) -> Norm:
    """The (mean, std) `model` expects its input normalised with: the `input_norm` a model declares (a
    `models.FrozenTeacher` takes the student's), else its timm config's (`model_cfg`), else ImageNet's."""
    declared = getattr(model, "input_norm", None)
    return declared if declared is not None else pretrained_norm(model_cfg(model))


def _pixel_scale(norm: Norm, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(255 mean, 255 std) as float32 [1, 3, 1, 1] on `device`: the statistics on the uint8 pixel scale. Made once
    per (statistics, device) and kept: a host-to-device copy per batch would stall the GPU stream every step."""
    return _pixel_scale_cached(tuple(map(tuple, norm)), torch.device(device))


@functools.lru_cache(maxsize=64)
def _pixel_scale_cached(norm: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = norm
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)


def normalize_batch(images: torch.Tensor, device: torch.device, channels_last: bool,
                    norm: Norm = IMAGENET_NORM) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 (x - 255 mean) / (255 std) with norm = (mean, std), on `device`."""
    x = images.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, std = _pixel_scale(norm, device)
    return (x.float() - mean) / std


def renormalize(x: torch.Tensor, source: Norm, target: Norm) -> torch.Tensor:
    """A batch normalised with `source` (by `normalize_batch`) as `normalize_batch` would have normalised the same
    uint8 pixels with `target`: float32 [B, 3, H, W] -> float32 [B, 3, H, W].

    Pixels p = round(x * 255 std_s + 255 mean_s), then (p - 255 mean_t) / (255 std_t). The rounding is exact
    because the input came from uint8 pixels: x * std_s + mean_s is off from the integer by a few float32 ulps of
    255 (under 1e-4), far below 0.5. So the teacher sees bit for bit what normalising with its own statistics gives,
    rather than the algebraically equal (x std_s + mean_s - mean_t) / std_t with its own rounding."""
    mean_s, std_s = _pixel_scale(source, x.device)
    mean_t, std_t = _pixel_scale(target, x.device)
    pixels = (x.float() * std_s + mean_s).round_()
    return (pixels - mean_t) / std_t
