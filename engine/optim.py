"""Optimisation of a run: mixed precision (`train.amp`), the optimizer (`train.optimizer`) and the learning-rate
schedule (linear warm-up, then cosine; `train.lr`, `train.min_lr`, `train.warmup_epochs`)."""
from __future__ import annotations

import contextlib
import math

import torch


def resolve_amp(amp: str, device: torch.device) -> str:
    """`train.amp` as it runs: 'auto' is bf16 on a CUDA device that computes bf16 natively (Ampere and newer), fp16
    (with the GradScaler) on older GPUs, where bf16 is emulated and slow, and off on CPU."""
    if amp != "auto":
        return amp
    if device.type != "cuda":
        return "off"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def autocast_for(amp: str, device: torch.device):
    """A zero-argument factory of the autocast context for `train.amp` (see `resolve_amp` for 'auto')."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_amp(amp, device))
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, nesterov=True, weight_decay=t.weight_decay)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def lr_at(progress: float, epochs: float, warmup_epochs: float, lr: float, min_lr: float) -> float:
    """Learning rate after `progress` epochs (fractional): linear warm-up to lr over warmup_epochs, then cosine
    from lr to min_lr at `epochs`. A function of progress in epochs rather than of a step counter, so that epochs
    of different lengths (curriculum subsets) still follow one schedule."""
    if progress < warmup_epochs:
        return lr * progress / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    t = min(1.0, (progress - warmup_epochs) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: torch.Tensor,
                   module: torch.nn.Module, grad_clip: float) -> None:
    """Backward through `loss` (scaled for fp16), clip `module`'s gradient norm to grad_clip (0: off), step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()


class CosineSchedule:
    """Sets the optimizer's learning rate from training progress (see `lr_at`); its state is that progress."""

    def __init__(self, optimizer: torch.optim.Optimizer, train_cfg):
        self.optimizer, self.cfg, self.progress = optimizer, train_cfg, 0.0
        self.set_progress(0.0)

    def set_progress(self, progress: float) -> None:
        self.progress = progress
        lr = lr_at(progress, self.cfg.epochs, self.cfg.warmup_epochs, self.cfg.lr, self.cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"progress": self.progress}

    def load_state_dict(self, state: dict) -> None:
        self.set_progress(state["progress"])
