"""Evaluation of a student: top-1 / top-5 / cross-entropy over a loader, counted once across DDP ranks, and the
inference latency of the final report (`eval.latency`)."""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn

from common.distributed import all_reduce_sum
from common.rng import state_digest, trace, trace_dir
from imagedata.normalization import input_norm, normalize_batch


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, channels_last: bool, autocast, num_classes: int) -> dict:
    """Top-1, top-5 and mean CE over the loader, each sample counted once across ranks (ShardSampler + all-reduce).
    Returns {"acc1", "acc5", "loss", "n"}."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss sum, count
    k = min(5, num_classes)
    for batch in loader:
        x = normalize_batch(batch["image"], device, channels_last, input_norm(model))
        y = batch["label"].to(device, non_blocking=True)
        with autocast():
            logits = model(x)
        logits = logits.float()
        top = logits.topk(k, dim=1).indices
        sums[0] += (top[:, 0] == y).sum()
        sums[1] += (top == y[:, None]).any(dim=1).sum()
        sums[2] += nn.functional.cross_entropy(logits, y, reduction="sum")
        sums[3] += y.numel()
    all_reduce_sum(sums)
    model.train(was_training)
    n = max(sums[3].item(), 1)
    return {"acc1": 100 * sums[0].item() / n, "acc5": 100 * sums[1].item() / n, "loss": sums[2].item() / n,
            "n": int(sums[3].item())}


@torch.no_grad()
def measure_latency(model: nn.Module, batch_size: int, image_size: int, device, channels_last: bool, autocast,
                    repeats: int = 5) -> float:
    """Median wall time (ms) of one eval-mode forward at this batch size, after one warm-up pass. The input comes
    from a generator of its own: a latency report (eval.latency) must not move the process's random streams."""
    model.eval()
    x = torch.randn(batch_size, 3, image_size, image_size, device=device,
                    generator=torch.Generator(device=device).manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast():
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def trace_weights(student: nn.Module, epoch: int, what: str, is_main: bool) -> None:
    """KD_TRACE_DIR (tests): the digest of the weights this rank evaluates with right now (`what`: validation,
    test or difficulty); rank 0 also keeps each epoch's validation weights for a single-process re-evaluation."""
    folder = trace_dir()
    if folder is None:
        return
    state = student.state_dict()
    trace("weights", {"pass": what, "epoch": epoch, "digest": state_digest(state)})
    if what == "validation" and is_main:
        torch.save(state, folder / f"weights_validation_e{epoch:03d}.pt")
