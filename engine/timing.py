"""Where a training epoch's time goes: `StepTimer` (data wait, compute, the rest) and `start_profiler`
(`train.profile`: a torch.profiler trace of a few steps)."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from tqdm import tqdm


class StepTimer:
    """Splits an epoch into data wait (blocked on the loader), compute (forward, backward, optimiser step) and the
    rest. On CUDA, compute is the GPU time between events recorded around each step, read once at the end of the
    epoch (no per-step synchronisation); on CPU it is wall time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.data_s, self.compute_wall_s, self._t0 = 0.0, 0.0, 0.0
        self.events: list[tuple] = []

    @contextlib.contextmanager
    def data_wait(self):
        t0 = time.perf_counter()
        yield
        self.data_s += time.perf_counter() - t0

    def compute_begins(self) -> None:
        if self.cuda:
            self.events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.events[-1][0].record()
        else:
            self._t0 = time.perf_counter()

    def compute_ends(self) -> None:
        if self.cuda:
            self.events[-1][1].record()
        else:
            self.compute_wall_s += time.perf_counter() - self._t0

    def totals(self) -> tuple[float, float]:
        """(data wait s, compute s)."""
        if self.cuda:
            torch.cuda.synchronize()
            return self.data_s, sum(a.elapsed_time(b) for a, b in self.events) / 1000
        return self.data_s, self.compute_wall_s


def start_profiler(folder: Path, device: torch.device, rank: int, is_main: bool):
    """torch.profiler over training steps 3-7 (1 skipped, 1 warm-up, 5 recorded), trace in `folder`."""
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities, schedule=schedule(skip_first=1, wait=0, warmup=1, active=5, repeat=1),
                   on_trace_ready=tensorboard_trace_handler(str(folder), worker_name=f"rank{rank}"),
                   record_shapes=False, with_stack=False)
    prof.start()
    if is_main:
        tqdm.write(f"profiling training steps 3-7 into {folder}")
    return prof
