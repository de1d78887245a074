"""Checkpoints: save (atomic) and load with clear errors, strict state loading through DDP/compile wrappers, freeze.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from common.errors import UserError
from common.files import atomic_write
from common.rundir import require_entries


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temp file, fsynced, renamed; loaded strictly.
# ----------------------------------------------------------------------------------------------------------------
def save_checkpoint(state: dict, path: Path) -> None:
    """Atomically write `state` with torch.save: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as fh:
        torch.save(state, fh)


def load_checkpoint(path: Path, required: tuple[str, ...] = (), program: str = "this program") -> dict:
    """A checkpoint (a dict) as torch.save wrote it, on the CPU. A file that is missing, empty, unreadable
    (truncated, or not a torch file), that holds something other than a dict (a bare tensor), or that lacks one of
    the `required` entries is a UserError naming it."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory; give a checkpoint file (such as a run's "
                        "checkpoints/last.pt or student.safetensors)")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes): its write was cut short (a full disk, a copy that "
                        "stopped). Use another checkpoint, e.g. an earlier copy or the run's best.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or foreign file: many exception types
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise UserError(f"cannot read checkpoint {path}: it is truncated or not a PyTorch checkpoint "
                        f"({type(exc).__name__}: {first})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a checkpoint (a dict with 'model', "
                        "'optimizer', ... entries, as this repository's programs save it)")
    require_entries(ckpt, required, path, program)
    return ckpt


WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile's OptimizedModule; DDP and DataParallel


def unwrap_module(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside torch.compile (`_orig_mod`) and DDP / DataParallel (`module`) wrappers, nested in
    any order."""
    while True:
        inner = getattr(module, "_orig_mod", None)
        if inner is None and isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            inner = module.module
        if inner is None:
            return module
        module = inner


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """A state dict saved through wrappers, with the prefixes they add removed: `_orig_mod.` (a torch.compile'd
    module) and `module.` (DDP), nested in any order. A prefix is removed only when every key carries it, so a
    model whose own first submodule is called `module` keeps its keys."""
    state = dict(state_dict)
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_state_strict(module: torch.nn.Module, state_dict: dict, what: str) -> None:
    """`module.load_state_dict(state_dict, strict=True)`, with a short message naming the mismatch. Weights saved
    from a compiled or DDP-wrapped model load into a plain one and the reverse (see `strip_wrapper_prefixes`)."""
    try:
        unwrap_module(module).load_state_dict(strip_wrapper_prefixes(state_dict), strict=True)
    except RuntimeError as exc:
        text = str(exc)
        missing = re.findall(r'Missing key\(s\) in state_dict: (.*?)(?:\.\s|$)', text)
        detail = text.splitlines()[1].strip() if len(text.splitlines()) > 1 else text
        hint = f" (missing: {missing[0][:200]})" if missing else ""
        raise UserError(f"{what} does not match the model built from the config: {detail[:400]}{hint}. "
                        "Was it saved from a different model or number of classes?") from None


# ----------------------------------------------------------------------------------------------------------------
# Frozen modules: a teacher, a replay generator, a copy kept as a distillation target.
# ----------------------------------------------------------------------------------------------------------------
def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (BatchNorm on its running statistics, no dropout, no spectral-norm power iteration) and no gradient
    for any parameter. Returns the module, so `freeze(copy.deepcopy(model))` keeps a fixed copy in one step."""
    module.eval()
    module.requires_grad_(False)
    return module


def unfreeze(module: torch.nn.Module) -> torch.nn.Module:
    """The inverse of `freeze`: training mode and gradients for every parameter."""
    module.train()
    module.requires_grad_(True)
    return module

