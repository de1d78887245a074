"""Submitting a study's runs through submitit, and where each run stands (--status).

Executors: `local` (submitit.LocalExecutor: each run a process of this machine, as many at once as the cores
allow with each run's declared threads; this command waits for them), `slurm` (submitit.SlurmExecutor: every run
submitted at once, a branch row with --dependency=afterok on the run it starts from; this command returns after
submitting), `debug` (submitit.DebugExecutor: in this process, one run after another, for tests).

Records, in <study folder>/records/: <run>.json (the study file and the run's digest, the executor and job id, written
at submission) and <run>.events.jsonl (studies.job). A run is never submitted twice: one that finished
(the program's `finished`) or is in flight (a local job whose process is alive, a SLURM job not ended) is left
alone. A run whose digest differs from the current study file's (its row was edited) is refused before anything is
submitted: docs/studies.md says why and what to do.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import submitit

from common.errors import UserError
from common.files import write_json
from studies.job import RunJob, read_events
from studies.programs import progress
from studies.spec import ROOT, PlannedRun, Study

SLURM_ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                "REQUEUE_HOLD", "REQUEUE_FED", "UNKNOWN")


LOCAL_TIMEOUT_MIN = 7 * 24 * 60


@dataclasses.dataclass
class SlurmOptions:
    """--executor slurm's settings: the study file's `slurm:` section, then the command line."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_delay_s: int = 120
    setup: list | None = None


def record_path(study: Study, run: PlannedRun) -> Path:
    return study.folder / "records" / f"{run.name}.json"


def read_record(study: Study, run: PlannedRun) -> dict:
    import json
    path = record_path(study, run)
    return json.loads(path.read_text()) if path.is_file() else {}


def check_unchanged(study: Study) -> None:
    """Refuse to continue runs made from a different version of a row: their digest (program, config files'
    contents, arguments, branch) differs from the study file's now."""
    changed = [run.name for run in study.runs.values()
               if read_record(study, run).get("run_digest") not in (None, run.digest)]
    foreign = [run.name for run in study.runs.values()
               if not record_path(study, run).is_file() and run.run_dir.exists()]
    if changed:
        raise UserError(f"{study.path} changed since these runs of {study.folder} were made: {', '.join(changed)} "
                        "(their row's program, configs, overrides or branch differ now). A study never mixes runs "
                        "of two versions of a row: give the changed row a new name (its old runs stay, unused), or "
                        "delete those runs' directories under runs/ and records/ to remake them")
    if foreign:
        raise UserError(f"{', '.join(foreign)} in {study.folder / 'runs'} were not made by this study (no record in "
                        f"{study.folder / 'records'}); move them away, or give the study another --out")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def slurm_state(job_id: str) -> str:
    """sacct's state of a job ('UNKNOWN' when sacct does not answer)."""
    try:
        out = subprocess.run(["sacct", "-j", str(job_id), "-X", "-n", "-o", "State"], capture_output=True,
                             text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "UNKNOWN"
    return out[0].rstrip("+") if out else "UNKNOWN"


def run_state(study: Study, run: PlannedRun) -> tuple[str, int]:
    """(state, times requeued): done, running, queued, failed, stopped (submitted, but its job is gone: the study
    command was interrupted, or a SLURM job was cancelled) or not submitted."""
    if study.finished(run):
        requeues = sum(e["event"] == "requeue" for e in read_events(run))
        return "done", requeues
    record, events = read_record(study, run), read_events(run)
    requeues = sum(e["event"] == "requeue" for e in events)
    if not record:
        return "not submitted", 0
    last = events[-1] if events else None
    if last is not None and last["event"] == "end" and last.get("code") != 0:
        return "failed", requeues
    if record.get("executor") == "slurm":
        state = slurm_state(record["job_id"])
        if state not in SLURM_ACTIVE:
            return "stopped", requeues
        return ("running" if last is not None and last["event"] == "start" else "queued"), requeues
    starts = [e for e in events if e["event"] == "start"]
    if last is not None and last["event"] == "start" and starts[-1].get("host") == socket.gethostname() \
            and _alive(starts[-1]["pid"]):
        return "running", requeues
    # a local job's id is its controller's pid: alive, the job is about to start (or restart after a requeue)
    controller = str(record.get("job_id", ""))
    if record.get("executor") == "local" and controller.isdigit() and _alive(int(controller)) \
            and (last is None or last["event"] != "end"):
        return "queued", requeues
    return "stopped", requeues


def status_lines(study: Study) -> list[str]:
    lines = []
    for run in study.ordered_runs():
        state, requeues = run_state(study, run)
        where = progress(run.run_dir)
        text = state + (f", requeued {requeues}" if requeues else "")
        lines.append(f"{run.name:<28} {text:<22} {where:<26} {run.log}")
    return lines


def in_flight(study: Study, run: PlannedRun) -> bool:
    return run_state(study, run)[0] in ("running", "queued")


def _job(study: Study, run: PlannedRun) -> RunJob:
    return RunJob(run, str(study.path), study.digest)


def _record(study: Study, run: PlannedRun, executor: str, job_id: str) -> None:
    record_path(study, run).parent.mkdir(parents=True, exist_ok=True)
    write_json(record_path(study, run), {"study_file": str(study.path), "study_digest": study.digest,
                                         "run_digest": run.digest, "row": run.row, "seed": run.seed,
                                         "executor": executor, "job_id": str(job_id),
                                         "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def make_executor(kind: str, study: Study):
    folder = study.folder / "submitit"
    if kind == "local":
        return submitit.LocalExecutor(folder=folder)
    if kind == "debug":
        return submitit.DebugExecutor(folder=folder)
    if kind == "slurm":
        return submitit.SlurmExecutor(folder=folder)
    raise UserError(f"unknown executor '{kind}'; one of local, slurm, debug")


def _parameters(kind: str, study: Study, run: PlannedRun, slurm: SlurmOptions | None) -> dict:
    res = run.resources
    if kind == "local":
        # time_min is the cluster's limit: nothing preempts a run here, so no timeout stops (and requeues) it
        return {"timeout_min": LOCAL_TIMEOUT_MIN, "tasks_per_node": res.tasks_per_node, "gpus_per_node": res.gpus}
    if kind == "slurm":
        params = {"job_name": f"{study.name}:{run.name}", "time": res.time_min, "nodes": res.nodes,
                  "ntasks_per_node": res.tasks_per_node, "cpus_per_task": res.threads,
                  "signal_delay_s": slurm.signal_delay_s,
                  # requeueable even where the cluster's default is not: submitit's hook requeues with scontrol
                  "additional_parameters": {"requeue": True}}
        if res.gpus:
            params["gpus_per_node"] = res.gpus
        for key in ("partition", "account", "qos", "constraint", "setup"):
            if getattr(slurm, key):
                params[key] = getattr(slurm, key)
        return params
    return {}


def _check_resources(kind: str, study: Study, runs: list[PlannedRun]) -> None:
    for run in runs:
        if kind != "slurm" and run.resources.nodes > 1:
            raise UserError(f"run {run.name} asks for {run.resources.nodes} nodes; only --executor slurm has more "
                            "than one")
        if kind == "debug" and run.resources.gpus > 1:
            raise UserError(f"run {run.name} asks for {run.resources.gpus} GPUs (one DDP task each); the debug "
                            "executor runs one task")


def submit_slurm(study: Study, runs: list[PlannedRun], slurm: SlurmOptions) -> list[tuple[PlannedRun, str]]:
    """Submit every run at once; a run that starts from (or waits for) another depends on that run's job
    (afterok). Returns (run, job id) pairs."""
    job_ids: dict[str, str] = {}
    submitted = []
    for run in runs:
        params = _parameters("slurm", study, run, slurm)
        parent_job = job_ids.get(run.parent) if run.parent else None
        if run.parent and parent_job is None and not study.finished(study.runs[run.parent]):
            parent_job = read_record(study, study.runs[run.parent]).get("job_id")  # in flight from before
        if parent_job:
            params["dependency"] = f"afterok:{parent_job}"
        executor = make_executor("slurm", study)  # one per run: update_parameters keeps the previous run's values
        executor.update_parameters(**params)
        job = executor.submit(_job(study, run))
        job_ids[run.name] = job.job_id
        _record(study, run, "slurm", job.job_id)
        submitted.append((run, job.job_id))
    return submitted


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parent_ready(study: Study, run: PlannedRun, active: set[str]) -> bool:
    """Whether the run that `run` starts from (or waits for) has finished and its job has ended: a program writes
    results.json before its last files (train_student.py: student.safetensors, which a distilling row reads)."""
    return run.parent is None or (study.finished(study.runs[run.parent]) and run.parent not in active)


def run_here(kind: str, study: Study, runs: list[PlannedRun], max_cores: int | None = None,
             poll_s: float = 0.5, say=print) -> list[tuple[PlannedRun, str]]:
    """Run `runs` with the local or debug executor and wait for them: a run starts when the run it starts from
    has finished and its threads fit in the free cores (`max_cores`, default all; one run at least). A run whose
    parent failed is not started. Returns the failures: (run, message naming its log)."""
    executor = make_executor(kind, study)
    budget = max_cores or cores()
    waiting, active, failures = list(runs), {}, []
    failed_names: set[str] = set()
    try:
        while waiting or active:
            used = sum(r.resources.threads * r.resources.tasks_per_node for r in active)
            for run in list(waiting):
                if run.parent in failed_names:
                    waiting.remove(run)
                    failed_names.add(run.name)
                    failures.append((run, f"not run: it starts from {run.parent}, which failed"))
                    continue
                if run.parent and not parent_ready(study, run, {r.name for r in active}):
                    if not any(r.name == run.parent for r in [*waiting, *active]) and not in_flight(
                            study, study.runs[run.parent]):
                        waiting.remove(run)
                        failed_names.add(run.name)
                        failures.append((run, f"not run: it starts from {run.parent}, which has not finished"))
                    continue
                need = run.resources.threads * run.resources.tasks_per_node
                if active and used + need > budget:
                    continue
                # another study command, started after this one planned, may have taken the run since: two jobs
                # would then write one run directory
                state = run_state(study, run)[0]
                if state in ("done", "running", "queued"):
                    waiting.remove(run)
                    say(f"[study] {run.name}: {state} by another study command; not started here")
                    continue
                executor.update_parameters(**_parameters(kind, study, run, None))
                job = executor.submit(_job(study, run))
                _record(study, run, kind, job.job_id)
                say(f"[study] {run.name}: started (log {run.log})")
                waiting.remove(run)
                active[run] = job
                used += need
            for run, job in list(active.items()):
                if kind == "debug":  # DebugJob.done() would open pdb on an error; exception() just runs it
                    error = job.exception()
                elif job.done():
                    error = job.exception()
                else:
                    continue
                del active[run]
                if error is None:
                    say(f"[study] {run.name}: done")
                else:
                    failed_names.add(run.name)
                    failures.append((run, f"failed; its log: {run.log}"))
                    say(f"[study] {run.name}: failed; its log: {run.log}")
            if active:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        for job in active.values():
            job.cancel(check=False)
        raise
    return failures


def prepare_environment() -> None:
    """Jobs unpickle studies.job.RunJob: the repository must be importable in their processes (they inherit
    this environment, on SLURM through sbatch's default --export=ALL)."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *paths])
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
