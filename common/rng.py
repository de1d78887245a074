"""Seeding and random state: `seed_everything`, save/restore of every stream, `rng_isolated` for optional steps,
and the test trace (KD_TRACE_DIR) with state digests.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as torch_dist

from common.distributed import _dist_on

# Test instrumentation: with KD_TRACE_DIR=<folder> in the environment, every rank appends what it applied (the
# curriculum decision and selection of each epoch, digests of the weights it evaluates with, of the RNG states it
# saved and restored) to <folder>/<kind>.rank<r>.jsonl, so a test can compare ranks. Off (one lookup) otherwise.
TRACE_ENV = "KD_TRACE_DIR"


def trace_dir() -> Path | None:
    value = os.environ.get(TRACE_ENV, "")
    return Path(value) if value else None


def trace(kind: str, record: dict) -> None:
    """Append `record` to <KD_TRACE_DIR>/<kind>.rank<r>.jsonl; nothing without KD_TRACE_DIR."""
    folder = trace_dir()
    if folder is None:
        return
    rank = torch_dist.get_rank() if _dist_on() else 0
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{kind}.rank{rank}.jsonl", "a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")


def state_digest(obj: Any) -> str:
    """SHA-256 (16 hex digits) of nested dicts, lists and tuples of tensors, arrays and scalars: equal digests mean
    equal dtypes, shapes and bytes (used to compare weights and RNG states across ranks)."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, dict):
            for key in sorted(x, key=str):
                h.update(f"<{key}>".encode())
                feed(x[key])
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for item in x:
                feed(item)
            h.update(b"]")
        elif isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, np.ndarray):
            h.update(f"{x.dtype}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        else:
            h.update(repr(x).encode())

    feed(obj)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Seeds and RNG state.
# ----------------------------------------------------------------------------------------------------------------
def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch; each rank gets its own stream (seed + rank)."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this process's device only: a resume may see another number of devices
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda_device" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_device"])


@contextmanager
def rng_isolated() -> Iterator[None]:
    """Run the block without moving any random stream of the caller: Python's, NumPy's global, torch's CPU and this
    process's CUDA device's states are saved on entry and restored on exit (exceptions included).

    For steps that may or may not run (a teacher cache or pre-decoded copy built now or reused, a randomly
    initialised teacher, a latency probe, a difficulty refresh): whatever they draw (a DataLoader's base seed, a
    layer's init) must not shift training's draws, or a run that reuses a cache would not reproduce the run that
    built it. torch.random.fork_rng covers torch only."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)

