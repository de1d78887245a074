"""A gan_vae student loss term from a plugin file: total variation of the student's reconstruction.

    python -m gan_vae.continual --config configs/gan_vae_shared_data.yaml run.plugins=[examples/plugins/tv_loss.py] \
        student.tv.weight=0.01

This file alone adds the term: its key student.tv.weight (range-checked, listed by --help), its place in the
student's loss (after the built-in terms), and its value in metrics.jsonl as student/tv. The run's config.yaml
records run.plugins, so `python -m gan_vae.evaluate` imports it again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.config import opt
from gan_vae.losses import STUDENT_LOSSES, StudentStep, TermValue


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of each image of x [B, C, H, W], [B]:

        TV(x) = sum_{c,i,j} |x[c, i+1, j] - x[c, i, j]| + |x[c, i, j+1] - x[c, i, j]|

    the discrete form of the total variation of Rudin, Osher and Fatemi, "Nonlinear total variation based noise
    removal algorithms", Physica D 60 (1992), with the l1 norm of the gradient (anisotropic): summed over pixels,
    like the reconstruction term it sits beside."""
    down = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().flatten(1).sum(1)
    right = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1).sum(1)
    return down + right


@dataclass
class TVConfig:
    weight: float = opt(0.01, "weight of the total variation of the student's reconstruction (0: adds nothing)",
                        ge=0)


@STUDENT_LOSSES.register("tv", config=TVConfig, help="total variation of the reconstruction (Rudin et al. 1992)")
def tv(step: StudentStep) -> TermValue:
    """L = mean_b TV(x_hat_b), x_hat: the reconstruction of the step's training forward (models.vae_loss_terms).
    Not row-weighted: it smooths the student's own output and distils no teacher."""
    return TermValue(total_variation(step.vae["x_hat"]).mean())
