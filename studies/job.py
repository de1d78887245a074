"""One run of a study as a submitit job: `RunJob`, a submitit.helpers.Checkpointable.

The job starts the program (python <script> or python -m <module>) with the run's arguments, its output appended
to the run's log, and waits. When SLURM preempts it or its time limit nears, SLURM sends the job the signal of
`#SBATCH --signal=USR2@<s>` (the local executor sends the same before its timeout); submitit then calls
`RunJob.checkpoint`, which stops the program (its last checkpoint is on disk: every program resumes exactly) and
returns the resubmission, the same run with run.resume=auto, which submitit requeues. A run that starts again
after a stop continues from its own checkpoints/last.pt whatever it was submitted with; one stopped before its
first checkpoint starts over (from its branch checkpoint, if it has one).

A row with several GPUs runs one submitit task per GPU: each task starts the program with torchrun's variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, from submitit's TorchDistributedEnvironment), which
common.distributed.setup_distributed reads, exactly as under torchrun.

What a job does is appended to <study>/records/<run>.events.jsonl (start, end, requeue), which --status reads.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import submitit
from submitit.core.utils import DelayedSubmission

from common.rundir import update_run_record
from studies.spec import ROOT, PlannedRun

# the program each job of this process is running (not pickled with the job): RunJob.checkpoint stops it
_CHILDREN: dict[str, subprocess.Popen] = {}
STOP_GRACE_S = 60


class RunFailed(RuntimeError):
    """The program exited with an error: the message names the run's log."""


def events_path(run: PlannedRun) -> Path:
    return run.run_dir.parent.parent / "records" / f"{run.name}.events.jsonl"


def add_event(run: PlannedRun, event: str, **entries) -> None:
    path = events_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # one short line per write: appends do not interleave
        f.write(json.dumps({"event": event, "time": time.time(), **entries}) + "\n")


def read_events(run: PlannedRun) -> list[dict]:
    path = events_path(run)
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def task_environment() -> dict[str, str]:
    """torchrun's variables for this submitit task when the job has several tasks (DDP), else none."""
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job (a direct call): one process
        return {}
    if env.num_tasks <= 1:
        return {}
    dist = submitit.helpers.TorchDistributedEnvironment()
    return {"RANK": str(dist.rank), "WORLD_SIZE": str(dist.world_size), "LOCAL_RANK": str(dist.local_rank),
            "LOCAL_WORLD_SIZE": str(dist.local_world_size), "MASTER_ADDR": dist.master_addr,
            "MASTER_PORT": str(dist.master_port)}


@dataclasses.dataclass
class RunJob(submitit.helpers.Checkpointable):
    """Run `run` to its end. `resume`: "auto" in a resubmission (run.resume=auto)."""
    run: PlannedRun
    study_file: str = ""
    study_digest: str = ""
    resume: str = ""

    def start_args(self) -> list[str]:
        """The run.resume of this start: its own last.pt when it has one (whatever `resume` says), else its branch
        checkpoint, else none (a fresh start)."""
        if (self.run.run_dir / "checkpoints" / "last.pt").is_file():
            return ["run.resume=auto"]
        return [f"run.resume={self.run.branch}"] if self.run.branch is not None else []

    def command(self) -> list[str]:
        """The program's command line as this job starts it."""
        script = list(self.run.command)
        if not script[0].startswith("-"):
            script[0] = str(ROOT / script[0])
        return [sys.executable, *script, *self.run.args, *self.start_args()]

    def __call__(self) -> dict:
        dist_env = task_environment()
        rank = int(dist_env.get("RANK", 0))
        if rank == 0 and not (self.run.run_dir / "checkpoints" / "last.pt").is_file() and self.run.run_dir.exists():
            # stopped before its first checkpoint: nothing of it to keep, and a fresh start needs an empty place
            shutil.rmtree(self.run.run_dir)
        cmd = self.command()
        threads = str(self.run.resources.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1",
               **dist_env}
        log = self.run.log if rank == 0 else self.run.log.with_suffix(f".rank{rank}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as out:
            out.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}: {' '.join(cmd)}\n")
            out.flush()
            child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            _CHILDREN[self.run.name] = child
            if rank == 0:
                add_event(self.run, "start", pid=os.getpid(), host=socket.gethostname(), resume=self.resume)
            try:
                # poll, not child.wait(): wait() holds the Popen's lock while blocked, so that `checkpoint`, which
                # submitit calls from the signal handler in this very thread, could never wait for the child
                while (code := child.poll()) is None:
                    time.sleep(0.2)
            finally:
                _CHILDREN.pop(self.run.name, None)
        if rank == 0:
            add_event(self.run, "end", code=code)
            if code == 0:  # the run records which study made it (run.json), beside what the program recorded
                update_run_record(self.run.run_dir, {"study": {
                    "file": self.study_file, "file_digest": self.study_digest, "run_digest": self.run.digest,
                    "row": self.run.row, "seed": self.run.seed}})
        if code != 0:
            raise RunFailed(f"run {self.run.name} failed (exit code {code}); its log: {log}")
        return {"run": self.run.name, "log": str(log)}

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        """submitit's hook at a preemption or time limit: stop the program and resubmit the run with
        run.resume=auto."""
        child = _CHILDREN.get(self.run.name)
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGINT)  # run_cli: "interrupted; the last checkpoint is kept"
            try:
                child.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        add_event(self.run, "requeue")
        return DelayedSubmission(dataclasses.replace(self, resume="auto"))
