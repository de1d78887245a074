"""Distributed set-up (`setup_distributed`: torchrun's RANK decides; NCCL on CUDA, gloo on CPU), collectives that
do nothing without a process group, and the end of a process that ran one (`cleanup_distributed`, `end_process`).
"""
from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
import sys
import threading
from typing import Any, Callable, NoReturn

import torch
import torch.distributed as torch_dist

from common.errors import UserError


# ----------------------------------------------------------------------------------------------------------------
# Distributed: one code path for `python script.py` (no process group) and `torchrun` (RANK in the environment).
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# whether setup_distributed ran this process in a process group (which destroy_process_group does not undo: see
# end_process)
_RAN_GROUP = {"yes": False}


def setup_distributed(device: str = "auto") -> DistInfo:
    """Initialise DDP when launched by torchrun (NCCL on GPU, gloo on CPU); otherwise a single process, no group."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if "RANK" not in os.environ:
        return DistInfo(device=torch.device("cuda" if want_cuda else "cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if want_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    _RAN_GROUP["yes"] = True
    if not torch_dist.is_initialized():
        # device_id binds NCCL's communicator to this rank's GPU up front (no guess at the first barrier)
        torch_dist.init_process_group(backend="nccl" if want_cuda else "gloo",
                                      timeout=datetime.timedelta(minutes=60), device_id=dev if want_cuda else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def cleanup_distributed(wait_for_peers: bool = True) -> None:
    """Destroy the process group, once (later calls do nothing). `wait_for_peers`: first a barrier, so that no rank
    tears its group down while another still runs collectives with it (the end of a run that succeeded); an error
    path passes False, since the rank that failed may never reach that barrier."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        if wait_for_peers:
            torch_dist.barrier()
        torch_dist.destroy_process_group()


def ran_process_group() -> bool:
    """Whether this process was started in a process group (by setup_distributed), destroyed since or not."""
    return _RAN_GROUP["yes"]


def end_process(code: int) -> NoReturn:
    """Exit with `code`: `sys.exit(code)` in a single process; in a process that ran a process group, the group
    destroyed (after a barrier when `code` is 0: no rank leaves while another still runs a collective with it),
    the interpreter's own exit steps (non-daemon threads joined, atexit functions run, stdout and stderr
    flushed) and then `os._exit(code)`, without the interpreter's finalisation.

    Why: destroy_process_group does not end gloo's worker threads once DDP has wrapped a model (DDP keeps the group
    referenced after the model is gone, torch 2.14), so they outlive `main`. Such a thread releases the work of the
    last collective after that collective returned, and freeing that work's tensors takes the GIL. If the main
    thread has begun finalising by then (a rank with nothing left to do after its last collective, on a loaded
    machine), CPython ends the thread with pthread_exit, whose unwinding through C++ destructors calls
    std::terminate: "terminate called without an active exception", SIGABRT, exit code -6, after a run that had
    written everything. Skipping only the finalisation leaves nothing unwritten: every file this code base writes is
    closed by then (`with` blocks, MetricLogger.close), and what the interpreter would still do (threads, atexit,
    flushing) is done here first."""
    if not ran_process_group():
        sys.exit(code)
    cleanup_distributed(wait_for_peers=code == 0)  # normally done by `main` already; then this does nothing
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: the interpreter would skip it too
            pass
    os._exit(code)


def _dist_on() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def barrier() -> None:
    if _dist_on():
        torch_dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks, in place; a no-op in a single process."""
    if _dist_on():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s value of a picklable object, on every rank."""
    if not _dist_on():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers into every rank's module (a no-op in a single process)."""
    if _dist_on():
        for tensor in module.state_dict().values():
            torch_dist.broadcast(tensor, src=src)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's value of a picklable object, in rank order."""
    if not _dist_on():
        return [obj]
    out: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (BatchNorm running statistics) into every rank's module; a no-op in a single
    process. DDP broadcasts buffers only at the start of a training forward, so after an epoch each rank still holds
    the statistics its own last batch left: call this before any evaluation of the unwrapped model."""
    if _dist_on():
        for tensor in module.buffers():
            torch_dist.broadcast(tensor, src=src)


def on_main_rank(fn: Callable[[], Any], dist: DistInfo | None = None) -> Any:
    """Run `fn()` on the main rank only and give its return value to every rank. A UserError it raises is raised
    on every rank, so no rank is left waiting at a barrier for a rank that stopped."""
    dist = dist or DistInfo()
    outcome: tuple[str, Any] = ("ok", None)
    if dist.is_main:
        try:
            outcome = ("ok", fn())
        except UserError as exc:
            outcome = ("error", str(exc))
    outcome = broadcast_object(outcome)
    if outcome[0] == "error":
        raise UserError(outcome[1])
    return outcome[1]

