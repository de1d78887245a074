"""A Trainer's checkpoint: what a resume needs (`trainer_state`), putting it back (`load_trainer_state`, each rank's
random stream included) and writing checkpoints/{best,last}.pt at the end of an epoch (`save_checkpoints`)."""
from __future__ import annotations

import sys
from pathlib import Path

from common import plugins
from common.checkpoint import load_state_strict, save_checkpoint
from common.config import to_plain
from common.distributed import all_gather_objects
from common.errors import UserError
from common.rng import rng_state, seed_everything, set_rng_state, state_digest, trace
from common.rundir import require_entries

# What load_trainer_state reads from a checkpoint: one without these is not a training checkpoint.
TRAIN_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "best_acc1", "best_epoch", "sampler")


def trainer_state(t, next_epoch: int, rng_per_rank: list[dict] | None = None) -> dict:
    """Everything a resume of Trainer `t` needs. `rng_per_rank`: every rank's RNG state, in rank order
    (`save_checkpoints` gathers them); by default this process's alone, which is all a single process has."""
    return {"model": t.student.state_dict(), "method": t.method.state_dict(), "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(), "scaler": t.scaler.state_dict(),
            "epoch": next_epoch, "best_acc1": t.best_acc1, "best_epoch": t.best_epoch,
            "rng_per_rank": rng_per_rank or [rng_state()], "sampler": {"epoch": t.train_sampler.epoch},
            "temperature": t.temperature, "config": to_plain(t.cfg), "extra": t.extra_state(),
            "program": f"{t.script}.py", "inputs": t.inputs,
            plugins.RECORD: plugins.record(t.cfg.run.plugins)}


def load_trainer_state(t, ckpt: dict, path: Path) -> None:
    """Trainer `t` as `ckpt` (read from `path`, named in messages) left it; its hooks get their extra state."""
    require_entries(ckpt, TRAIN_CHECKPOINT_KEYS, path, f"{t.script}.py")
    check_same_hub_teacher(t, ckpt, path)
    load_state_strict(t.student, ckpt["model"], f"checkpoint {path}")
    load_state_strict(t.method, ckpt.get("method", {}), f"checkpoint {path} (kd.method={t.cfg.kd.method})")
    try:
        t.optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as exc:
        raise UserError(f"the optimizer state in {path} does not fit train.optimizer="
                        f"{t.cfg.train.optimizer}: {exc}") from None
    t.scheduler.load_state_dict(ckpt["scheduler"])
    t.scaler.load_state_dict(ckpt["scaler"])
    t.start_epoch, t.best_acc1, t.best_epoch = ckpt["epoch"], ckpt["best_acc1"], ckpt["best_epoch"]
    t.train_sampler.set_epoch(ckpt["sampler"]["epoch"])
    t.temperature = ckpt.get("temperature", t.temperature)
    if not (ckpt.get("rng_per_rank") or ckpt.get("rng")):
        require_entries(ckpt, ("rng_per_rank",), path, f"{t.script}.py")
    # "rng": rank 0's alone, in older checkpoints
    restore_rng_states(t.cfg.train.seed, t.dist, t.start_epoch, ckpt.get("rng_per_rank") or [ckpt["rng"]], path)
    trace("rng_restored", {"epoch": t.start_epoch, "digest": state_digest(rng_state())})
    t.load_extra_state(ckpt.get("extra", {}))


def check_same_hub_teacher(t, ckpt: dict, path: Path) -> None:
    """The teacher's hub weights (teacher.pretrained=true without teacher.checkpoint), recorded by their digest when
    the run built its teacher, must be the ones this resume built: another revision on the hub, or another copy in
    the local cache, would distil the remaining epochs from another teacher. (A teacher.checkpoint file is compared
    before any work, engine.build.input_changes; hub weights are known only once loaded.)"""
    recorded = (ckpt.get("inputs") or {}).get("teacher_hub_weights")
    now = t.inputs.get("teacher_hub_weights")
    if recorded and now and recorded != now:
        raise UserError(f"cannot resume from {path}: the hub weights of teacher.name={t.cfg.teacher.name} changed "
                        "since its run loaded them (another revision on the hub or in the local cache), so the "
                        "remaining epochs would distil another teacher. Restore the cached weights, pin them with "
                        "teacher.checkpoint=<file>, or start a new run: drop run.resume and pick a new run.name")


def restore_rng_states(seed: int, dist, start_epoch: int, per_rank: list[dict], path: Path) -> None:
    """Each rank continues its own saved random stream. A checkpoint from a different number of processes
    resumes too: ranks it has a state for restore theirs, the others start a fresh stream seeded from
    (train.seed, epoch, rank), and rank 0 warns that the run is no longer the uninterrupted one."""
    rank, world = dist.rank, dist.world_size
    if rank < len(per_rank):
        set_rng_state(per_rank[rank])
    else:
        seed_everything(seed + 7919 * start_epoch, rank)
    if len(per_rank) != world and dist.is_main:
        print(f"warning: {path} holds the random state of {len(per_rank)} process(es); this run has {world}. "
              f"Training continues from epoch {start_epoch}; ranks without a saved random state start one "
              "seeded from (train.seed, epoch, rank). The global batch (processes x train.batch_size) and the "
              "shards change, so the numbers will differ from an uninterrupted run", file=sys.stderr)


def save_checkpoints(t, epoch: int, improved: bool) -> None:
    """After epoch `epoch`: last.pt (resumes at epoch + 1), and best.pt (the student alone) when val/acc1
    `improved`. A collective (every rank's random state is gathered); rank 0 writes."""
    own = rng_state()
    trace("rng_saved", {"epoch": epoch + 1, "digest": state_digest(own)})
    rng_per_rank = all_gather_objects(own)
    if not t.dist.is_main:
        return
    ckpt_dir = t.run_dir / "checkpoints"
    if improved:
        save_checkpoint({"model": t.student.state_dict(), "epoch": epoch, "val/acc1": t.best_acc1,
                         "config": to_plain(t.cfg), "inputs": t.inputs,
                         plugins.RECORD: plugins.record(t.cfg.run.plugins)}, ckpt_dir / "best.pt")
    save_checkpoint(trainer_state(t, epoch + 1, rng_per_rank), ckpt_dir / "last.pt")
