"""The run lifecycle: one training run in its run directory (`run_training`: plan, check, lock, build, resume, fit,
report), the checks made before anything is written, the teacher a run trains first (`prepare_teacher`,
teacher.prepare), and the test-split evaluation of a saved student (`evaluate_checkpoint`, eval.checkpoint)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import kd_methods
from common import plugins
from common.checkpoint import load_checkpoint, load_state_strict
from common.config import RESUME_SAFE_KEYS, check_resume_config, config_differences, parse_config, to_plain
from common.distributed import DistInfo, barrier, broadcast_object, on_main_rank
from common.errors import UserError, check
from common.files import save_config
from common.metrics import MetricLogger
from common.rundir import (check_program, checkpoint_program, claim_run_dir, default_run_name, make_dirs, plan_run_dir,
                           read_saved_config, require_entries, run_files, run_name, update_run_record)
from engine.build import input_changes
from engine.schema import Config, unread_teacher_keys, validate
from engine.evaluation import evaluate
from engine.optim import autocast_for
from engine.report import plot_run, print_results, run_label
from engine.state import TRAIN_CHECKPOINT_KEYS
from engine.trainer import Trainer
from imagedata.augment import AugSpec
from imagedata.image_sources import check_data_path, load_splits
from imagedata.samplers import ShardSampler
from imagedata.views import EvalViews, make_loader
from models import create_student


class TrainingRun(Protocol):
    """What `run_training` runs: engine.trainer.Trainer, or a run that composes one (engine.curriculum_run).
    Made as make_run(cfg, dist, run_dir); `script` (a class attribute) names the program ("train_student")."""

    script: str
    start_epoch: int

    def load_state(self, ckpt: dict, path: Path) -> None: ...

    def fit(self, logger: MetricLogger) -> None: ...

    def final_report(self) -> dict: ...

    @property
    def inputs(self) -> dict: ...  # engine.build.input_record: what it read, recorded in run.json and checkpoints


# Keys a resumed run may change: none of them changes a number the run prints. Where files go (run.*, the cache
# and pre-decoded folders, whose contents are fingerprinted), logging (log.*), loader processes (every view is a
# pure function of seed, epoch and index), profiling, the latency report, the separate label-only baseline, and
# train.compile (the same model, traced: it changes rounding only, and a run whose compile broke must be able to
# continue eagerly), and teacher.cache_fill (lazy and eager fill the cache with the same bytes).
# Everything else (train.epochs included: it sets the cosine schedule; train.device: it sets train.amp=auto) must
# match the run's config.
TRAIN_RESUME_SAFE_KEYS = (*RESUME_SAFE_KEYS, "data.workers", "data.preprocess_dir", "teacher.cache_dir",
                          "teacher.cache_fill", "train.profile", "train.compile", "eval.*", "kd.baseline")


def unread_teacher_patterns(cfg) -> tuple[str, ...]:
    """The teacher.* keys that `cfg` does not read (engine.schema.unread_teacher_keys): a resume or an evaluation lets
    them differ from the run's saved config, which may hold values that an older version accepted unread (a
    label-only run with the teacher keys of its config file)."""
    return tuple(f"teacher.{key}" for key in unread_teacher_keys(cfg))


def output_dirs(cfg) -> dict[str, Path]:
    """The folders outside the run directory that this config writes to, by config key."""
    dirs = {}
    if kd_methods.uses_teacher(cfg) and cfg.teacher.mode == "cached":
        dirs["teacher.cache_dir"] = Path(cfg.teacher.cache_dir or Path(cfg.run.out_dir) / "teacher_cache")
    if cfg.data.preprocessed:
        dirs["data.preprocess_dir"] = Path(cfg.data.preprocess_dir or Path(cfg.run.out_dir) / "predecoded")
    return dirs


def check_resumable(ckpt: dict | None, path: Path | None, cfg, run_dir: Path, program: str) -> None:
    """Before anything is built or written: `ckpt` (None when a run that stopped before its first checkpoint is
    restarted) must be a training checkpoint of `program` (e.g. "train_student.py"), and the run's config must
    match `cfg` up to TRAIN_RESUME_SAFE_KEYS."""
    if ckpt is not None:  # the program first: another program's checkpoint lacks these entries for that reason
        check_program(checkpoint_program(ckpt), program, f"checkpoint {path}")
        require_entries(ckpt, TRAIN_CHECKPOINT_KEYS, path, program)
    saved = ckpt.get("config") if ckpt is not None else read_saved_config(run_dir)
    kd_methods.check_saved_method(saved)
    check_resume_config(saved, cfg, str(path if ckpt is not None else run_dir / "config.yaml"),
                        (*TRAIN_RESUME_SAFE_KEYS, *unread_teacher_patterns(cfg)))
    branch = ckpt is not None and Path(run_dir).resolve() not in Path(path).resolve().parents
    if branch and ckpt["epoch"] >= cfg.train.epochs:
        raise UserError(f"run.resume={path} has trained {ckpt['epoch']} of train.epochs={cfg.train.epochs} epochs, so "
                        f"a new run from it ({run_dir}) would train nothing and have no results of its own. Raise "
                        "train.epochs to train on from it, or evaluate it: eval.checkpoint=<its best.pt>")


def check_inputs_unchanged(ckpt: dict, path: Path, cfg, dist: DistInfo) -> None:
    """Before anything is written: a resume from `ckpt` (read from `path`) refuses data or a teacher.checkpoint file
    that changed since the checkpoint's run read them (engine.build.input_changes), naming the split or file:
    continuing would train the remaining epochs on other images or other soft targets. The main rank compares."""
    recorded = ckpt.get("inputs")
    if not isinstance(recorded, dict):  # a checkpoint from before the record: nothing to compare with
        return

    def compare() -> None:
        changes = input_changes(recorded, cfg)
        if changes:
            raise UserError(f"cannot resume from {path}: what its run read changed since: {'; '.join(changes)}. "
                            "Continuing would train the remaining epochs on other inputs than the first ones. Restore "
                            "them, or start a new run on these: drop run.resume and pick a new run.name")
    on_main_rank(compare, dist)


def check_inputs(cfg) -> None:
    """Files the config names that this run only reads: checked before its run directory is created."""
    if cfg.data.path and cfg.data.name != "synthetic":
        check_data_path(Path(cfg.data.path))
    teacher = Path(cfg.teacher.checkpoint)
    if kd_methods.uses_teacher(cfg) and cfg.teacher.checkpoint and not teacher.is_file():
        raise UserError(f"teacher.checkpoint={teacher} does not exist. Train that teacher first, with "
                        "train_student.py and a config whose run writes it (e.g. `python train_student.py --config "
                        "configs/quickstart_teacher.yaml` writes runs/quickstart_teacher/student.safetensors), or "
                        "set teacher.prepare=<that config> so this command trains it first")


def run_training(cfg, dist: DistInfo, make_run=Trainer, label: str | None = None) -> dict:
    """Train one student as configured, write its run directory, return results.json's content. `make_run`: a
    TrainingRun class (default engine.trainer.Trainer); `label`: the run's row in the printed table (a
    ROW_MEANINGS key; by default `run_label(cfg)`).

    Everything checkable is checked before the run directory is created or touched: where it goes and what it
    resumes from (common.rundir.plan_run_dir), the checkpoint and the run's config, the files the config names, the
    output folders. The directory is then locked for the run's lifetime (common.rundir.claim_run_dir), and one this
    call created is removed again if the run stops with a UserError before its first epoch is logged (bad data)."""
    program = f"{make_run.script}.py"
    cfg.run.name = broadcast_object(run_name(cfg.run, lambda: default_run_name(
        make_run.script, cfg.data.name.split("/")[-1], cfg.train.seed)))
    plan = plan_run_dir(cfg.run.out_dir, cfg.run.name, cfg.run.resume, program, restart_without_checkpoint=True,
                        dist=dist)
    resume_from = plan.checkpoint
    ckpt = load_checkpoint(resume_from) if resume_from is not None else None
    if cfg.run.resume:
        check_resumable(ckpt, resume_from, cfg, plan.run_dir, program)
    check_inputs(cfg)
    if ckpt is not None:
        check_inputs_unchanged(ckpt, resume_from, cfg, dist)
    make_dirs({"run.out_dir": Path(cfg.run.out_dir)}, dist, probe=True)
    # created, not probed: a shared read-only cache that holds what this run needs is read without writing; a build
    # probes its folder first (teacher_cache, predecode)
    make_dirs(output_dirs(cfg), dist)
    with claim_run_dir(plan, program, dist, plugins.record(cfg.run.plugins)) as run_dir:
        if dist.is_main:  # written now, so a run killed before its first checkpoint can be resumed (and checked)
            save_config(cfg, run_dir)
        run: TrainingRun = make_run(cfg, dist, run_dir)
        if ckpt is not None:  # first: it compares what the run reads (the teacher's hub weights) with the record
            run.load_state(ckpt, resume_from)
            del ckpt
            if dist.is_main:
                print(f"resumed from {resume_from} at epoch {run.start_epoch}")
        if dist.is_main:
            update_run_record(run_dir, {"inputs": run.inputs})
        results = fit_and_report(run, cfg, dist, run_dir)
        if dist.is_main:
            plot_run(run_dir)
            print_results(f"{run.script}: {run_dir}", {label or run_label(cfg): results})
    return results


def fit_and_report(run: TrainingRun, cfg, dist: DistInfo, run_dir: Path) -> dict:
    """Every epoch from run.start_epoch into metrics.jsonl (cut back to that epoch first), then the final report."""
    logger = MetricLogger(run_dir / "metrics.jsonl", dist.is_main,
                          run_dir / "tensorboard" if cfg.log.tensorboard else None)
    logger.truncate_after(run.start_epoch)
    run.fit(logger)
    results = run.final_report()
    logger.close()
    return results


# eval.checkpoint: the keys that may differ from the config saved in the checkpoint. None of them changes the number
# measured: where files go, logging, loader processes, the device and precision it runs at, the evaluation batch
# size, and train.compile (a checkpoint trained compiled is evaluated eagerly). Every other key either sets what is
# measured (data.*, student.*) or is not read by an evaluation (kd.*, teacher.*, the other training keys), and is
# refused rather than ignored.
EVAL_SAFE_KEYS = (*RESUME_SAFE_KEYS, "eval.*", "data.workers", "data.preprocess_dir", "teacher.cache_dir",
                  "train.device", "train.amp", "train.eval_batch_size", "train.compile")


def check_evaluation_config(saved: dict | None, cfg, path: Path) -> None:
    """eval.checkpoint: refuse a config that differs from the one saved in the checkpoint (None: a .safetensors or a
    bare state dict, which records none) outside EVAL_SAFE_KEYS, naming every such key with both values."""
    allowed = (*EVAL_SAFE_KEYS, *unread_teacher_patterns(cfg))
    diffs = config_differences(saved, cfg, allowed) if saved is not None else []
    if diffs:
        listed = "; ".join(f"{key} = {json.dumps(old)} in the checkpoint, {json.dumps(new)} now"
                           for key, old, new in diffs)
        raise UserError(f"eval.checkpoint={path} was trained with another config: {listed}. An evaluation measures "
                        "the checkpoint with the data and student it was trained with, and reads no other key, so "
                        "these would change the number or do nothing. Give the run's own config (--config "
                        "<run>/config.yaml); only " + ", ".join(EVAL_SAFE_KEYS) + " may differ")


def evaluate_checkpoint(cfg, dist: DistInfo) -> dict:
    """`eval.checkpoint=PATH`: test-split accuracy of a saved student (best.pt, last.pt or .safetensors), with the
    config the checkpoint records (`check_evaluation_config`). Trains nothing and writes no run directory. A
    checkpoint that records the data its run read (`inputs`) is refused when that dataset's test split changed since."""
    from models import load_state_file
    path = Path(cfg.eval.checkpoint)
    state = load_state_file(path)  # before the data: a wrong path fails at once
    if path.suffix != ".safetensors":
        check_evaluation_config(load_checkpoint(path).get("config"), cfg, path)
    check_test_split_unchanged(path, cfg, dist)
    splits = load_splits(cfg.data)
    student = create_student(cfg, len(splits["train"].class_names)).to(dist.device)
    load_state_strict(student, state, f"eval.checkpoint={cfg.eval.checkpoint}")
    loader = make_loader(EvalViews(splits["test"], AugSpec.from_cfg(cfg.data)),
                         ShardSampler(len(splits["test"]), dist.world_size, dist.rank), cfg.train.eval_batch_size,
                         cfg.data.workers, dist.device)
    res = evaluate(student, loader, dist.device, False, autocast_for(cfg.train.amp, dist.device),
                   len(splits["train"].class_names))
    out = {"test/acc1": res["acc1"], "test/acc5": res["acc5"], "test/n": res["n"], "checkpoint": cfg.eval.checkpoint}
    if dist.is_main:
        print(json.dumps(out))
    return out


def same_data_source(saved_data: dict, data_cfg) -> bool:
    """Whether a saved config's data section names the dataset `data_cfg` names (data.name, and data.path as a
    resolved path), so that a changed fingerprint means changed data rather than another dataset."""
    def where(path) -> str:
        return str(Path(path).resolve()) if path else ""
    return (saved_data.get("name") == data_cfg.name and where(saved_data.get("path")) == where(data_cfg.path)
            and saved_data.get("synthetic") in (None, to_plain(data_cfg.synthetic)))


def saved_record(path: Path) -> dict:
    """A saved student's record of its run: a .pt checkpoint itself, or the JSON entries in a .safetensors file's
    metadata (engine.report.save_student_safetensors); {} where there are none."""
    if path.suffix != ".safetensors":
        return load_checkpoint(path)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as fh:
        metadata = fh.metadata() or {}
    try:
        return {key: json.loads(value) for key, value in metadata.items() if key in ("config", "inputs")}
    except ValueError:
        return {}


def check_test_split_unchanged(path: Path, cfg, dist: DistInfo) -> None:
    """eval.checkpoint: refuse a checkpoint whose run read this dataset with another test split (changed or
    repainted images), naming it. Evaluating on another dataset on purpose (other data.name or data.path) is not
    compared; a checkpoint from before the record (or a file from elsewhere) carries nothing to compare."""
    ckpt = saved_record(path)
    recorded, saved = ckpt.get("inputs"), ckpt.get("config")
    if not (isinstance(recorded, dict) and isinstance(saved, dict) and isinstance(saved.get("data"), dict)
            and same_data_source(saved["data"], cfg.data)):
        return

    def compare() -> None:
        changes = input_changes(recorded, cfg, splits=("test",), teacher=False)
        if changes:
            raise UserError(f"eval.checkpoint={path}: the data changed since its run read it: {'; '.join(changes)}. "
                            "Its accuracy on these images would be reported as the run's. Restore the data, or "
                            "evaluate on another dataset on purpose (another data.path)")
    on_main_rank(compare, dist)


def prepare_teacher(cfg, dist: DistInfo) -> None:
    """`teacher.prepare`: train the teacher with that config unless teacher.checkpoint exists (then it is reused).
    The teacher run lands in this run.out_dir; a teacher run that was stopped is continued (run.resume=auto)."""
    checkpoint = Path(cfg.teacher.checkpoint)
    check(bool(cfg.teacher.checkpoint), "teacher.prepare needs teacher.checkpoint: the student.safetensors that the "
                                        "teacher run writes, which this run then distils from")
    if checkpoint.is_file():
        if dist.is_main:
            print(f"teacher: reusing {checkpoint}")
        return
    teacher_cfg, run_dir = teacher_run_config(cfg, checkpoint)
    if dist.is_main:
        print(f"teacher: {checkpoint} does not exist yet; training it first with {Path(cfg.teacher.prepare)} "
              f"(into {run_dir})")
    run_training(teacher_cfg, dist, label="teacher")
    barrier()  # rank 0 writes student.safetensors at the very end of the teacher run
    check(checkpoint.is_file(), f"the teacher run {run_dir} ended without writing {checkpoint}")


def teacher_run_config(cfg, checkpoint: Path):
    """The train_student.py config of teacher.prepare's run (in this run.out_dir, on this train.device), checked
    to write `checkpoint`, and its run directory; continued (run.resume=auto) when it had started."""
    source = Path(cfg.teacher.prepare)
    check(source.is_file(), f"teacher.prepare={cfg.teacher.prepare} is not a file (a config that trains the teacher)")
    teacher_cfg = parse_config(Config, ["--config", str(source), f"run.out_dir={cfg.run.out_dir}",
                                        f"train.device={cfg.train.device}"], prog="train_student.py")
    validate(teacher_cfg)
    check(not teacher_cfg.teacher.prepare, f"{source} sets teacher.prepare itself: one level only")
    run_dir = Path(teacher_cfg.run.out_dir) / (teacher_cfg.run.name or "")
    writes = run_dir / "student.safetensors"
    check(bool(teacher_cfg.run.name) and writes.resolve() == checkpoint.resolve(),
          f"teacher.prepare={source} writes {writes}, but teacher.checkpoint={checkpoint}: set run.name in {source} "
          "and teacher.checkpoint so that they agree")
    if any(run_files(run_dir)):  # a teacher run that was stopped: continue it
        teacher_cfg.run.resume = "auto"
    return teacher_cfg, run_dir
