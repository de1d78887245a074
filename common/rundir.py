"""Run directories: naming, planning (every check before any write), claiming and locking (run.lock, run.json
with the program), and which program made a run or checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import OmegaConf

from common.distributed import DistInfo, barrier, on_main_rank
from common.errors import UserError
from common.files import write_json
from common.locked_build import probe_writable


# ----------------------------------------------------------------------------------------------------------------
# Run directory.
# ----------------------------------------------------------------------------------------------------------------
def default_run_name(script: str, tag: str, seed: int) -> str:
    return f"{script}__{tag}__s{seed}__{time.strftime('%Y%m%d-%H%M%S')}"


def run_name(run_cfg, default: Callable[[], str]) -> str:
    """run.name, or `default()` (a new timestamped name) when it is empty; run.resume=auto needs the name of the run
    it continues, since a new name would never hold one."""
    if run_cfg.name:
        return run_cfg.name
    if run_cfg.resume == "auto":
        raise UserError(f"run.resume=auto continues the run named by run.name, which is empty: set run.name to the "
                        f"run's directory name (a folder of run.out_dir={run_cfg.out_dir})")
    return default()


def make_dirs(dirs: dict[str, Path | str], dist: DistInfo | None = None, probe: bool = False) -> None:
    """Create each directory (parents included) on the main rank. One that cannot be created (a parent is a
    regular file, no permission, a read-only filesystem) stops every rank with a UserError naming its config key,
    before anything is computed. With `probe`, a file is also written and removed in each
    (`locked_build.probe_writable`), which catches an existing directory that cannot be written."""
    def create() -> None:
        for key, folder in dirs.items():
            if probe:
                probe_writable(Path(folder), key)
                continue
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"cannot write to {folder} ({key}): {exc.strerror or exc}. Set {key} to a folder "
                                "this user can create and write") from None
    on_main_rank(create, dist)


# A run directory records the program that made it (run.json), and is locked (run.lock) by the process that writes
# it. Files it holds before its first epoch ends are written at start-up and are worth nothing on their own: a
# fresh run may take over a directory holding only these (and empty folders), and a directory this process created
# is removed again when the run stops with a UserError before it wrote anything else.
RUN_RECORD, RUN_LOCK = "run.json", "run.lock"
START_UP_FILES = frozenset({"config.yaml", RUN_RECORD, RUN_LOCK})

# Run directories and checkpoints from before run.json carry no record of their program; their config's sections
# tell (first match wins: train_student_rl.py's schema extends train_student.py's).
LEGACY_PROGRAM_SECTIONS = (("train_student_rl.py", {"curriculum", "agent"}), ("gan_vae.continual", {"fid"}),
                           ("train_student.py", {"kd", "eval"}))


# The paths a run reads back or rewrites on a resume (every program's; "checkpoints" is a folder, the rest files).
# Something of another kind at one of them (a directory at checkpoints/last.pt, a dangling link at metrics.jsonl)
# would be taken for "no such file" and overwritten, or fail half-way through the run: `check_run_file_kinds`
# refuses it before anything is touched.
RUN_FILE_PATHS = ("config.yaml", RUN_RECORD, RUN_LOCK, "metrics.jsonl", "results.json", "student.safetensors",
                  "curriculum.jsonl", "experts.json", "checkpoints/last.pt", "checkpoints/best.pt", "curves.png",
                  "curriculum.png", "forgetting_report.md")
RUN_FOLDERS = ("checkpoints", "difficulty", "tensorboard", "label_only")


def _kind(path: Path) -> str:
    """What is at `path`, following links: "file", "folder", "missing", "dangling link" or "special file"."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "dangling link" if path.is_symlink() else "missing"
    except OSError:
        return "special file"
    return "file" if stat.S_ISREG(mode) else "folder" if stat.S_ISDIR(mode) else "special file"


def check_run_file_kinds(run_dir: Path) -> None:
    """Refuse a run directory where a path of RUN_FILE_PATHS holds anything but a file (or RUN_FOLDERS anything but
    a folder), naming it: reading it as "absent" would restart a finished run over its own results."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for rel, want in [*((d, "folder") for d in RUN_FOLDERS), *((f, "file") for f in RUN_FILE_PATHS)]:
        found = _kind(run_dir / rel)
        if found not in ("missing", want):
            raise UserError(f"{run_dir / rel} is a {found}, not a {want}: the run keeps its {rel} there. Nothing was "
                            f"touched. Move it out of the way (or restore the run's {want}), then run again")


def run_files(run_dir: Path) -> Iterator[Path]:
    """Every file below `run_dir` except its lock (nothing when it does not exist)."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        yield from (p for p in run_dir.rglob("*") if p != run_dir / RUN_LOCK and not p.is_dir())


def holds_results(run_dir: Path) -> bool:
    """Whether `run_dir` holds anything a run produced (a metrics line, a checkpoint, a result) beyond the
    START_UP_FILES."""
    run_dir = Path(run_dir)
    return any(p.parent != run_dir or p.name not in START_UP_FILES for p in run_files(run_dir))


def infer_program(config: Any) -> str | None:
    """The program whose config has these sections (LEGACY_PROGRAM_SECTIONS); None when none matches."""
    if not isinstance(config, dict):
        return None
    return next((program for program, sections in LEGACY_PROGRAM_SECTIONS if sections <= set(config)), None)


def read_run_record(run_dir: Path) -> dict:
    """run.json of a run directory ({} when it has none)."""
    path = Path(run_dir) / RUN_RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise UserError(f"cannot read {path} (the record of which program made the run): {exc}. Restore it, or "
                        "start a new run with another run.name") from None
    if not isinstance(record, dict):
        raise UserError(f"{path} is not the record of a run (a JSON object with a 'program' entry); restore it, or "
                        "start a new run with another run.name")
    return record


def update_run_record(run_dir: Path, entries: dict) -> None:
    """Add `entries` to run.json (main rank; the run directory is claimed): what the run read, for the record."""
    write_json(Path(run_dir) / RUN_RECORD, {**read_run_record(run_dir), **entries})


def run_program(run_dir: Path) -> str | None:
    """The program that made `run_dir`: its run.json's, or for an older run the one its config.yaml belongs to."""
    return read_run_record(run_dir).get("program") or infer_program(read_saved_config(run_dir))


def checkpoint_program(ckpt: dict) -> str | None:
    """The program that wrote a checkpoint: its own record, or for an older checkpoint the one its config belongs
    to (None for a file with neither, such as a bare state dict)."""
    return ckpt.get("program") or infer_program(ckpt.get("config"))


def check_program(made_by: str | None, program: str, what: str) -> None:
    """Refuse a run directory or checkpoint (`what`) that another program made: its config and state have sections
    this program lacks or reads differently, and continuing it here would drop them (and rewrite config.yaml
    without them). None (unknown) passes."""
    if made_by is None or made_by == program:
        return
    raise UserError(f"{what} was made by another script, {made_by}; {program} cannot continue it or start from it "
                    f"(it would drop or misread what {made_by} saved, and rewrite config.yaml without it). Continue "
                    f"it with {made_by}, or start a new {program} run: another run.name and no run.resume")


def require_entries(ckpt: dict, keys: tuple[str, ...], path: Path | str, program: str) -> None:
    """A UserError naming the first of `keys` the checkpoint lacks: it is not a training checkpoint of `program`."""
    missing = [key for key in keys if key not in ckpt]
    if missing:
        raise UserError(f"{path} is not a training checkpoint of {program} (no '{missing[0]}' entry"
                        f"{f', nor {len(missing) - 1} more' if len(missing) > 1 else ''}); resume from the "
                        "checkpoints/last.pt of one of its runs")


@dataclasses.dataclass
class RunPlan:
    """Where a run goes and what it starts from, decided and checked before anything is written (`plan_run_dir`).

    checkpoint: what to load (None: a fresh run, or a run stopped before its first checkpoint, restarted);
    continues: the directory's own run goes on (run.resume=auto, or a checkpoint inside the directory), as opposed
    to a new run, which may start from another run's checkpoint (recorded in its run.json);
    stamp: the checkpoint's (mtime, size) when planned, compared again once the directory is locked."""
    run_dir: Path
    checkpoint: Path | None
    continues: bool
    stamp: tuple[int, int] | None = None


def _stamp(path: Path | None) -> tuple[int, int] | None:
    if path is None or not path.is_file():
        return None
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def _plan_auto(run_dir: Path, program: str | None, restart_without_checkpoint: bool,
               dist: DistInfo | None) -> RunPlan:
    """`plan_run_dir` with run.resume=auto: continue from checkpoints/last.pt (or restart, see there)."""
    ckpt: Path | None = run_dir / "checkpoints" / "last.pt"
    if not ckpt.is_file():
        if not (restart_without_checkpoint and any(run_files(run_dir))):
            raise UserError(f"run.resume=auto but {ckpt} does not exist: nothing to resume. "
                            "Check run.out_dir and run.name, or drop run.resume to start a new run")
        ckpt = None
        if (dist or DistInfo()).is_main:
            print(f"run.resume=auto: {run_dir} has no checkpoint yet (it stopped before its first epoch "
                  "ended); starting it from the beginning")
    if program is not None:
        check_program(run_program(run_dir), program, f"the run directory {run_dir}")
    return RunPlan(run_dir, ckpt, True, _stamp(ckpt))


def plan_run_dir(out_dir: str, name: str, resume: str, program: str | None = None,
                 restart_without_checkpoint: bool = False, dist: DistInfo | None = None) -> RunPlan:
    """Check where `<out_dir>/<name>/` stands against `resume` and what to resume from; nothing is written.

    `resume` is "" (fresh run: the directory must hold no run's results, so nothing is overwritten), "auto"
    (continue from `checkpoints/last.pt`) or a checkpoint path. A path inside the directory continues its run from
    that checkpoint; any other path starts a NEW run from it, so the directory must hold no run yet (continuing one
    run from another's checkpoint would splice the two). A run directory that `program` did not make is refused
    (None skips that check).

    With `resume="auto"` and no `last.pt`: when the run directory holds a run and `restart_without_checkpoint` is
    set, the run stopped before its first checkpoint, so the plan's checkpoint is None and the caller starts it from
    the beginning (reusing what it finished, such as a teacher cache, and re-doing any epoch it logged); otherwise
    that is an error ("nothing to resume"). Callers that set it must drop the metrics lines a restarted run logged
    before."""
    run_dir = Path(out_dir) / name
    check_run_file_kinds(run_dir)
    if resume == "auto":
        return _plan_auto(run_dir, program, restart_without_checkpoint, dist)
    if resume:
        ckpt = Path(resume)
        if ckpt.is_dir():
            raise UserError(f"run.resume={resume} is a directory: give a checkpoint file in it (e.g. "
                            f"{ckpt / 'checkpoints' / 'last.pt'}), or continue a run with run.name=<its directory> "
                            "run.resume=auto")
        if not ckpt.is_file():
            raise UserError(f"run.resume={resume}: no such checkpoint file")
        if run_dir.resolve() in ckpt.resolve().parents:  # one of the run's own checkpoints
            if program is not None:
                check_program(run_program(run_dir), program, f"the run directory {run_dir}")
            return RunPlan(run_dir, ckpt, True, _stamp(ckpt))
        if holds_results(run_dir):
            raise UserError(f"run.resume={resume} starts a new run from that checkpoint, but {run_dir} already holds "
                            "a run: continuing it from another run's checkpoint would splice two runs into one "
                            "directory (its epochs, checkpoints and config.yaml replaced). Give the new run another "
                            "run.name (empty: a new timestamped one), or continue that run with run.resume=auto")
        return RunPlan(run_dir, ckpt, False, _stamp(ckpt))
    if holds_results(run_dir):
        raise UserError(f"{run_dir} already holds a run. Continue it with run.resume=auto, "
                        "or pick another run.name so nothing is overwritten")
    return RunPlan(run_dir, None, False)


def _check_plan_still_holds(plan: RunPlan) -> None:
    """Under the lock: nothing changed since `plan_run_dir` looked (another process could have written meanwhile)."""
    check_run_file_kinds(plan.run_dir)
    if not plan.continues and holds_results(plan.run_dir):
        raise UserError(f"{plan.run_dir} already holds a run (another process started it just now). Continue it "
                        "with run.resume=auto, or pick another run.name so nothing is overwritten")
    last = plan.run_dir / "checkpoints" / "last.pt"
    if plan.continues and _stamp(plan.checkpoint or last) != plan.stamp:
        raise UserError(f"another process wrote {plan.checkpoint or last} while this one was starting; run the "
                        "command again to continue from the newest checkpoint")


def lock_run_dir(run_dir: Path) -> Any:
    """An exclusive lock on `run_dir` (its run.lock, holding our pid) for this process, or a UserError naming the
    process that holds it: two processes writing one run directory would mix their checkpoints and metrics."""
    import socket

    from filelock import FileLock, Timeout
    path = Path(run_dir) / RUN_LOCK
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = path.read_text().strip()
        except OSError:
            holder = ""
        raise UserError(f"{run_dir} is in use by another process ({holder or 'pid unknown'}, holding {path}): two "
                        "processes writing one run directory would mix their checkpoints and metrics. Wait for it "
                        "to finish (or stop it), or pick another run.name") from None
    path.write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
    return lock


@contextmanager
def claim_run_dir(plan: RunPlan, program: str, dist: DistInfo, plugins: list[dict] | None = None) -> Iterator[Path]:
    """Create the planned run directory (and its checkpoints/, probed for writing), lock it for as long as the
    block runs, record `program` (and the checkpoint a new run starts from, and its `plugins`: common.plugins.record)
    in run.json, and yield it. A UserError
    that leaves the block before the run wrote anything but its START_UP_FILES removes a directory this call
    created, so a failed start leaves no empty run behind. Only the main rank creates, locks and writes; a refusal
    reaches every rank."""
    run_dir, held = plan.run_dir, {}
    created = dist.is_main and not run_dir.exists()

    def take() -> None:
        held["lock"] = lock_run_dir(run_dir)
        _check_plan_still_holds(plan)
        if plan.continues and read_run_record(run_dir).get("program"):
            return
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if plan.continues:  # an older run, from before the record (its program was checked from its config)
            record = {"program": program, "recorded_on_resume": now}
        else:
            record = {"program": program, "started": now,
                      **({"started_from": str(plan.checkpoint.resolve())} if plan.checkpoint else {}),
                      **({"plugins": plugins} if plugins is not None else {})}
        write_json(run_dir / RUN_RECORD, record)

    try:
        make_dirs({"run.out_dir": run_dir / "checkpoints"}, dist, probe=True)
        on_main_rank(take, dist)
        barrier()
        yield run_dir
    except UserError:
        # deleted while still locked: released first, a second process could claim this fresh name in between,
        # and then have its live run directory deleted under it
        if created and "lock" in held and not holds_results(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        if "lock" in held:
            held["lock"].release()


def prepare_run_dir(out_dir: str, name: str, resume: str, dist: DistInfo,
                    restart_without_checkpoint: bool = False) -> tuple[Path, Path | None]:
    """`plan_run_dir` (no program check), then create the directory unlocked: (run_dir, checkpoint to resume from).
    For tools and tests; the entry points claim theirs with `claim_run_dir`."""
    plan = plan_run_dir(out_dir, name, resume, None, restart_without_checkpoint, dist)
    make_dirs({"run.out_dir": plan.run_dir / "checkpoints"}, dist, probe=True)
    barrier()
    return plan.run_dir, plan.checkpoint


def read_saved_config(run_dir: Path) -> dict | None:
    """The config a run directory was started with (its config.yaml) as a plain dict; None when it has none."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:  # yaml errors have many types
        raise UserError(f"cannot read {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path} is not a run's config (a mapping of config sections); restore it, or start a new "
                        "run with another run.name")
    return saved

