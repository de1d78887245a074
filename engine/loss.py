"""The loss a training step backpropagates and the epoch's loss accounting: a KD method's (weight, value) terms
summed, the DDP weighting that excludes padded duplicates (`masked_loss_terms`), and `EpochTotals`, the per-epoch
sums behind metrics.jsonl's train/loss, train/loss_<term> and train/acc1."""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

import kd_methods
from common.distributed import all_reduce_sum
from common.errors import UserError
from kd_methods import LossTerms


def weighted_sum(terms: LossTerms) -> torch.Tensor:
    """sum_k w_k * v_k over a method's (weight, value) terms: the loss it trains on."""
    return sum(weight * value for weight, value in terms.values())


def masked_loss_terms(compute: Callable[[torch.Tensor | None], LossTerms], valid: torch.Tensor, step_valid: int,
                      world_size: int) -> tuple[LossTerms, torch.Tensor, torch.Tensor]:
    """One rank's loss for a training step whose batch may hold padded duplicates (valid[i] = False).

    `compute(keep)` returns the method's terms, each a mean over the rows `keep` (None: all rows). With V_r this
    rank's valid samples, n_r = |V_r|, W ranks and n = sum_r n_r the step's valid samples over all ranks
    (`step_valid`), the loss to backpropagate is

        L_r = (W / n) * sum_{i in V_r} l_i = (n_r W / n) * mean_{i in V_r} l_i,   l_i = the per-sample loss,

    so that DDP's gradient average (1/W) sum_r grad L_r = grad (1/n) sum_{i in V} l_i: the mean over the step's
    valid samples, padding excluded. When every rank's batch is full and valid (always in one process) the factor
    is 1 and L_r is the plain batch mean. (A term that is a statistic of the batch, such as DIST's intra-class
    relation, is computed over each rank's valid samples.) Returns (terms, mean loss over V_r for logging, L_r); a
    rank with no valid sample gets zero terms and a zero loss that still reaches every parameter (DDP)."""
    n_valid = int(valid.sum())
    scale = n_valid * world_size / step_valid
    if n_valid == len(valid) and scale == 1.0:
        terms = compute(None)
        loss = weighted_sum(terms)
        return terms, loss, loss
    if n_valid == 0:
        terms = compute(None)
        zero = weighted_sum(terms) * 0.0
        return {name: (weight, torch.zeros_like(value)) for name, (weight, value) in terms.items()}, zero, zero
    terms = compute(valid)  # `compute` moves the mask to its tensors' device
    loss = weighted_sum(terms)
    return terms, loss, loss * scale


def rows_of(tensors: dict, keep: torch.Tensor) -> dict:
    """The rows `keep` of every tensor in a dict (None entries stay None)."""
    return {k: (None if v is None else v[keep]) for k, v in tensors.items()}



class EpochTotals:
    """Sums over one epoch's steps on this rank, kept on the device (float64: [loss, one per term, correct]) so that
    a step costs no host synchronisation; the sample count is kept on the host. `reduce` adds every rank's."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: torch.Tensor | None = None  # float64 [loss, one per term, correct, count], made at the first step
        self.names: list[str] = []
        self.count = 0  # samples that reached the loss on this rank

    @torch.no_grad()
    def add(self, logits: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, terms: LossTerms,
            mean_loss: torch.Tensor) -> None:
        """One step: `mean_loss` and each term are means over this rank's valid samples, so they weigh by n."""
        n = int(valid.sum())
        correct = (logits.argmax(1) == y)
        correct = correct.sum() if n == len(valid) else correct[valid.to(self.device)].sum()
        if self.sums is None:
            self.names = list(terms)
            self.sums = torch.zeros(len(self.names) + 3, dtype=torch.float64, device=self.device)
        self.sums[:-1] += torch.stack([mean_loss.detach() * n, *(terms[k][1].detach() * n for k in self.names),
                                       correct.double()]).double()
        self.count += n

    def running_loss(self) -> float:
        """This rank's mean loss so far (one host synchronisation)."""
        return self.sums[0].item() / max(self.count, 1)

    def reduce(self) -> tuple[dict, float]:
        """(train/loss, train/loss_<term>, train/acc1, train/samples over all ranks; the sample count)."""
        sums = self.sums
        sums[-1] = self.count
        all_reduce_sum(sums)
        n = sums[-1].item()
        return {"train/loss": sums[0].item() / n,
                **{f"train/loss_{name}": sums[1 + i].item() / n for i, name in enumerate(self.names)},
                "train/acc1": 100 * sums[-2].item() / n, "train/samples": int(round(n))}, n


def teacher_targets(method, teacher, device: torch.device, x: torch.Tensor, batch: dict, online: bool) -> dict:
    """What `method` reads from the teacher for this batch, on the device: from the cache, replayed with the batch
    ({"logits", "features"}, None where absent), or from the teacher now (online: `method.teacher_online`)."""
    if online:
        return method.teacher_online(teacher, x)
    return {name: (batch[f"teacher_{name}"].to(device, non_blocking=True) if f"teacher_{name}" in batch else None)
            for name in kd_methods.TEACHER_OUTPUTS}


def check_finite(running_loss: float, epoch: int, step: int, run_dir: Path | None) -> None:
    """A hard stop on a non-finite loss, before anything is saved (the last good checkpoint stays)."""
    if not math.isfinite(running_loss):
        raise UserError(
            f"the training loss became non-finite ({running_loss}) at epoch {epoch + 1}, step {step + 1}. "
            "Stopped without saving; the last good checkpoint is kept in "
            f"{run_dir / 'checkpoints' if run_dir else 'the run directory'}. "
            "Start a new run (another run.name) with a lower train.lr or with train.grad_clip set: both change "
            "results, so run.resume refuses them")
