"""The continual learner's ablation on ../shared/data (MNIST, then Fashion-MNIST), over seeds.

For each seed, the full run of configs/gan_vae_shared_data.yaml with the replay of the defaults before issue 18
(student.self_replay=0: the experts replay alone; runs/gv_s<seed>), then one new run per row that
starts from that run's checkpoint at the end of the task-1 teacher phase (checkpoints/task_1_teacher.pt) with the
row's student.* / kd.* overrides: every row of a seed shares task 0 and the task-1 expert, and differs only in how
the student learns task 1. A row marked `from task 0` starts from task_0_teacher.pt instead (it changes the student
of task 0 too, and trains the task-1 expert again, identically). Finished runs (results.json with every task) are
skipped, so an interrupted ablation continues where it stopped. Every run has OMP_NUM_THREADS=1: the numbers do not
depend on the machine's core count, only on the row and the seed. Runs go `--jobs` at a time; logs in
runs/logs/<run>.log. The table (mean ± sd over the seeds) is printed and written to runs/gan_vae_ablation.md.

    python scripts/gan_vae_ablation.py                       # every row, seeds 0 1 2, two runs at a time
    python scripts/gan_vae_ablation.py --rows default prev0  # some rows
    python scripts/gan_vae_ablation.py --table-only          # the table of what has finished
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/gan_vae_shared_data.yaml"
# every run starts from the defaults before issue 18 (replay from the experts alone); a row's overrides come after
BASE = ["student.self_replay=0"]
# name: (label, overrides, branch point); branch point None: the full run itself
ROWS = {
    "default": ("experts' replay only, `student.self_replay=0` (the default before; the full run)", [], None),
    "noreplay": ("no replay (`student.replay=false`)", ["student.replay=false"], "task_1_teacher"),
    "prev0": ("`kd.previous_weight=0`", ["kd.previous_weight=0"], "task_1_teacher"),
    "share75": ("replay share 0.75 (`student.replay_share=0.75`)", ["student.replay_share=0.75"], "task_1_teacher"),
    "self50": ("half the replay from the student's copy, `student.self_replay=0.5` (**the new default**)",
               ["student.self_replay=0.5"],
               "task_1_teacher"),
    "self100": ("all the replay from the student's copy (`student.self_replay=1`)", ["student.self_replay=1"],
                "task_1_teacher"),
    "self50_share75": ("`student.self_replay=0.5 student.replay_share=0.75`",
                       ["student.self_replay=0.5", "student.replay_share=0.75"], "task_1_teacher"),
    "self100_share75": ("`student.self_replay=1 student.replay_share=0.75`",
                        ["student.self_replay=1", "student.replay_share=0.75"], "task_1_teacher"),
    "self100_prev16": ("`student.self_replay=1 kd.previous_weight=16`",
                       ["student.self_replay=1", "kd.previous_weight=16"], "task_1_teacher"),
    "self100_steps300": ("`student.self_replay=1 student.steps=300`", ["student.self_replay=1", "student.steps=300"],
                         "task_1_teacher"),
    "freeze": ("fixed priors of finished tasks (`student.freeze_old_priors=true`)",
               ["student.freeze_old_priors=true"], "task_1_teacher"),
    "postkl": ("self-distillation of the whole posterior (`kd.previous_posterior=kl`)", ["kd.previous_posterior=kl"],
               "task_1_teacher"),
    "steps_half": ("task 1 trains 300 steps (`student.steps=300`)", ["student.steps=300"], "task_1_teacher"),
    "steps2x": ("task 1 trains 1,200 steps (`student.steps_per_earlier_task=600`)",
                ["student.steps_per_earlier_task=600"], "task_1_teacher"),
}


def row_arguments(row: str) -> list[str]:
    """A row's overrides after BASE, less the BASE keys that the row's choices leave unread (gan_vae.continual's
    unread_student_keys: `student.replay=false` reads no replay key, so the noreplay row drops
    `student.self_replay=0`, which the program would refuse as a key that does nothing)."""
    if str(ROOT) not in sys.path:  # run as python scripts/gan_vae_ablation.py
        sys.path.insert(0, str(ROOT))
    from common.config import load_config
    from gan_vae.continual import ContinualConfig, unread_student_keys
    overrides = ROWS[row][1]
    unread = unread_student_keys(load_config(ContinualConfig, ROOT / CONFIG, [*BASE, *overrides]))
    return [a for a in BASE if a.split("=")[0] not in unread] + overrides


def full_run(seed: int) -> str:
    return f"gv_s{seed}"


def run_name(row: str, seed: int) -> str:
    return full_run(seed) if ROWS[row][2] is None else f"gv_s{seed}_{row}"


def finished(out: Path, name: str) -> bool:
    path = out / name / "results.json"
    return path.is_file() and json.loads(path.read_text()).get("tasks_done") == 2


def launch(out: Path, name: str, args: list[str]) -> int:
    """One gan_vae.continual run, one thread, its output in runs/logs/<name>.log; its exit status."""
    if finished(out, name):
        print(f"[ablation] {name}: done, skipped", flush=True)
        return 0
    if (out / name / "checkpoints" / "last.pt").is_file():  # stopped midway: the run continues itself
        args = [a for a in args if not a.startswith("run.resume=")] + ["run.resume=auto"]
    elif (out / name).exists():  # stopped before its first checkpoint: nothing of it to keep
        shutil.rmtree(out / name)
    cmd = [sys.executable, "-m", "gan_vae.continual", "--config", CONFIG, f"run.out_dir={out}", f"run.name={name}",
           *args]
    print(f"[ablation] {name}: {' '.join(cmd[1:])}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    (out / "logs").mkdir(parents=True, exist_ok=True)
    with open(out / "logs" / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    print(f"[ablation] {name}: exit {rc}", flush=True)
    return rc


def run_all(out: Path, rows: list[str], seeds: list[int], jobs: int, full_runs: bool = True) -> bool:
    """The full runs (unless full_runs is False: then they must have written the rows' checkpoints), then the
    rows, `jobs` at a time."""
    if full_runs:
        with ThreadPoolExecutor(jobs) as pool:  # the full runs first: every row starts from one
            if not all(rc == 0 for rc in pool.map(lambda s: launch(out, full_run(s), [f"train.seed={s}", *BASE]), seeds)):
                return False
    work = [(run_name(r, s), [f"train.seed={s}", *row_arguments(r),
                              f"run.resume={out / full_run(s) / 'checkpoints' / (ROWS[r][2] + '.pt')}"])
            for r in rows if ROWS[r][2] is not None for s in seeds]
    with ThreadPoolExecutor(jobs) as pool:
        return all(rc == 0 for rc in pool.map(lambda w: launch(out, *w), work))


def measures(results: dict) -> dict:
    """What a row reports of one run: MNIST reconstruction MSE after task 0 and after task 1, its change (%),
    Fashion MSE, student FID on both after task 1, the FID sample counts and the student steps."""
    mse = results["recon_mse"]
    before, after = mse[0][0], mse[1][0]
    return {"mse_mnist": after, "forgetting": 100 * (after - before) / before, "mse_fashion": mse[1][1],
            "fid_mnist": results["student_fid"][1][0], "fid_fashion": results["student_fid"][1][1],
            "samples": results["student_fid_samples"][1], "mse_task0": before}


def cell(values: list[float], fmt: str, signed: bool = False) -> str:
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:{'+' if signed else ''}{fmt}} ± {sd:{fmt}}"


def table(out: Path, rows: list[str], seeds: list[int]) -> str:
    lines = ["| task 1 trained with | seeds | recon MSE MNIST | MNIST forgetting (%) | recon MSE Fashion | "
             "student FID MNIST | student FID Fashion | FID samples [real, fake] |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        done = [s for s in seeds if finished(out, run_name(r, s))]
        if not done:
            continue
        m = [measures(json.loads((out / run_name(r, s) / "results.json").read_text())) for s in done]
        samples = sorted({json.dumps(x["samples"]) for x in m})
        lines.append(f"| {ROWS[r][0]} | {', '.join(map(str, done))} | {cell([x['mse_mnist'] for x in m], '.5f')} | "
                     f"{cell([x['forgetting'] for x in m], '.1f', True)} | {cell([x['mse_fashion'] for x in m], '.5f')} "
                     f"| {cell([x['fid_mnist'] for x in m], '.2f')} | {cell([x['fid_fashion'] for x in m], '.2f')} | "
                     f"{' '.join(samples)} |")
    base = [measures(json.loads((out / full_run(s) / "results.json").read_text()))["mse_task0"]
            for s in seeds if finished(out, full_run(s))]
    head = (f"recon MSE on MNIST after task 0, the start of every row: {cell(base, '.5f')} "
            f"(seeds {', '.join(str(s) for s in seeds if finished(out, full_run(s)))})\n\n") if base else ""
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="train.seed of each repeat")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs", help="run.out_dir of every run")
    parser.add_argument("--table-only", action="store_true", help="print the table of the finished runs only")
    parser.add_argument("--rows-only", action="store_true",
                        help="run only the rows (each seed's full run has written its task_1_teacher.pt already)")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: at least 1 run at a time")
    ok = True if args.table_only else run_all(args.out.resolve(), args.rows, args.seeds, args.jobs,
                                              not args.rows_only)
    text = table(args.out, args.rows, args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gan_vae_ablation.md").write_text(text)
    print(text)
    if not ok:
        sys.exit("error: a run failed; see runs/logs/<run>.log")


if __name__ == "__main__":
    main()
