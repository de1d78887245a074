"""Re-evaluate a saved continual run from its per-task checkpoints.

    python -m gan_vae.evaluate runs/<run>
    python -m gan_vae.evaluate runs/<run> train.device=cuda     # only keys that cannot change a number: EVALUATE_KEYS

Rebuilds every row R[i][·] from the state after task i with the run's own config (FID features, sample counts,
seeds; an override of any other key is refused, naming it: a new run measures other settings), then rewrites
results.json (keeping the run's time/wall_s), forgetting_report.md and the heatmaps, and prints the report. The
state after task i is the run's checkpoints/task_i.pt or, for a run started from another run's task checkpoint
(run.resume=<run>/checkpoints/task_<k>.pt), the other run's checkpoints of the tasks before it, as the run
recorded them (path and SHA-256); a missing or replaced one is refused, never skipped. With the run's own config
the matrices are reproduced exactly: every evaluation draws its samples from a generator seeded by (seed, task,
evaluated task). Everything it reads is checked before the work starts, the task files and the FID features
against the fingerprints the checkpoints recorded.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from tqdm import tqdm

from common import plugins
from common.checkpoint import load_checkpoint
from common.cli import run_cli
from common.config import config_differences, load_config, to_plain
from common.distributed import setup_distributed
from common.errors import UserError
from common.files import write_json
from common.rundir import lock_run_dir, make_dirs
from gan_vae import forgetting
from gan_vae.continual import (ContinualConfig, ContinualRun, changed_config_keys, check_read_keys, check_run_paths,
                               check_same_data, check_same_fid_features, file_digest, validate)

# The keys an evaluation may override: where it runs and where it reads from, none of which changes what is measured
# (the data and the FID features it reads are checked against the run's fingerprints). Every other key was fixed by
# the run: another seed or test split, another network, other FID settings would measure something else.
EVALUATE_KEYS = ("train.device", "data.root", "fid.cache_dir", "fid.inception_path")


def own_task_checkpoints(run_dir: Path) -> dict[int, Path]:
    """The run's own checkpoints/task_<i>.pt, by task index (read from the name, never from the sort order)."""
    found = {}
    for path in (run_dir / "checkpoints").glob("task_*.pt"):
        match = re.fullmatch(r"task_(\d+)\.pt", path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def task_checkpoints(run_dir: Path) -> list[tuple[Path, str | None]]:
    """(checkpoint, expected SHA-256 or None) holding the state after each finished task 0..T-1, in order: the run's
    own task_<i>.pt, and for tasks it inherited by starting from another run's checkpoint, that run's files as the
    record in its latest checkpoint names them. Refuses, naming the files, when one is missing."""
    own = own_task_checkpoints(run_dir)
    latest = own[max(own)] if own else run_dir / "checkpoints" / "last.pt"
    if not latest.is_file():
        raise UserError(f"{run_dir}/checkpoints holds no task_<i>.pt: no finished task to evaluate")
    ckpt = load_checkpoint(latest)
    inherited = ckpt.get("inherited_tasks", []) if isinstance(ckpt, dict) else []  # others: refused below
    done = max(own) + 1 if own else len(inherited)
    if done == 0:
        raise UserError(f"{run_dir}/checkpoints holds no task_<i>.pt: no finished task to evaluate")
    sources, missing = [], []
    for i in range(done):
        if i in own:
            sources.append((own[i], None))
        elif i < len(inherited) and Path(inherited[i]["path"]).is_file():
            sources.append((Path(inherited[i]["path"]), inherited[i].get("sha256")))
        else:
            missing.append(f"task {i}: " + (f"{inherited[i]['path']} (this run started from it)"
                                             if i < len(inherited) else str(run_dir / "checkpoints" / f"task_{i}.pt")))
    if missing:
        raise UserError(f"{run_dir} has finished {done} tasks, but the state after some is gone: "
                        f"{'; '.join(missing)}. Evaluation needs every task's checkpoint; restore the file(s), or "
                        "keep the results.json the run wrote (a run started from another run's checkpoint by an older "
                        "gan_vae, which kept no record of it, cannot be re-evaluated)")
    return sources


def check_task_checkpoint(ckpt: dict, path: Path, i: int, digest: str | None, saved, cfg) -> None:
    """The checkpoint at `path` holds the state after task i of this run: written at that task's end, with the
    task list and fixed keys of the run's config.yaml (`saved`), and, for one inherited from another run, the very
    file the run started from (`digest`)."""
    if digest is not None and file_digest(path) != digest:
        raise UserError(f"{path} is not the file this run started from (its content changed since: the run it belongs "
                        f"to was continued or replaced), so it no longer holds this run's state after task {i}. "
                        "Restore it, or keep the results.json the run wrote")
    if not isinstance(ckpt, dict) or "projections" not in ckpt or "progress" not in ckpt:
        raise UserError(f"{path} is not a task checkpoint of this gan_vae (an older version's, or another "
                        "program's file); it cannot be evaluated")
    if ckpt["progress"] != {"task": i + 1, "phase": "decide", "step": 0}:
        raise UserError(f"{path} does not hold the state at the end of task {i} (it was written at task "
                        f"{ckpt['progress'].get('task')}, {ckpt['progress'].get('phase')} step "
                        f"{ckpt['progress'].get('step')}); restore the run's own task_{i}.pt")
    if ckpt.get("tasks") != list(cfg.data.tasks):
        raise UserError(f"{path} was made with data.tasks={ckpt.get('tasks')}, not {list(cfg.data.tasks)} as in "
                        "the run's config.yaml; it belongs to another run")
    changed = changed_config_keys(ckpt.get("config", {}), saved, branching=True)
    if changed:
        listing = "; ".join(f"{k} = {json.dumps(o)} (the run's config.yaml: {json.dumps(n)})" for k, o, n in changed)
        raise UserError(f"{path} was made with {listing}; it belongs to another run")


def read_previous_results(path: Path) -> dict:
    """The results.json a run wrote (what re-evaluation keeps from it: the run's time/wall_s), read before the
    work, so that a damaged file stops evaluation at once and not after it."""
    if not path.exists():
        return {}
    try:
        kept = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} cannot be read ({type(exc).__name__}: {exc}); it was probably written only in part. "
                        "Move it away (its time/wall_s is lost) and run gan_vae.evaluate again, which writes a new "
                        "one") from None
    if not isinstance(kept, dict):
        raise UserError(f"{path} holds a {type(kept).__name__}, not the results of a run; move it away and run "
                        "gan_vae.evaluate again")
    return kept


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    run_dir = Path(argv[0])
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a gan_vae run directory (no config.yaml)")
    run_plugins = plugins.of_run_dir(run_dir)
    if run_plugins is not None:  # the run's own, from the files it recorded: refused when gone or changed
        plugins.load_recorded(run_plugins)
    saved = load_config(ContinualConfig, str(run_dir / "config.yaml"))  # the run's own config
    cfg = load_config(ContinualConfig, str(run_dir / "config.yaml"), argv[1:])
    check_overrides(saved, cfg, run_dir)
    validate(cfg, unread=False)  # what the run's own config.yaml holds was accepted when it started
    check_read_keys(cfg, {key for key, *_ in config_differences(to_plain(saved), cfg, ())})
    make_dirs({"the run directory": run_dir}, probe=True)  # before the work: it rewrites results.json at the end
    check_run_paths(run_dir, len(cfg.data.tasks))  # and the report and heatmaps
    lock = lock_run_dir(run_dir)  # not while the run trains, nor beside another evaluation of it
    try:
        evaluate_run(run_dir, cfg, saved)
    finally:
        lock.release()


def check_overrides(saved, cfg, run_dir: Path) -> None:
    """Refuse, naming them, the overrides that would change what the run measured: every key but EVALUATE_KEYS
    whose value (after the overrides) differs from the run's config.yaml. An override equal to the run's value
    changes nothing and passes."""
    changed = config_differences(to_plain(saved), cfg, EVALUATE_KEYS)
    if changed:
        listing = "; ".join(f"{k} = {json.dumps(n)} (the run's config.yaml: {json.dumps(o)})" for k, o, n in changed)
        raise UserError(f"gan_vae.evaluate re-measures {run_dir} as the run was made, and these overrides would "
                        f"change what it measured: {listing}. It takes only {', '.join(EVALUATE_KEYS)}. To measure "
                        "other settings, start a new run with them (python -m gan_vae.continual, another run.name)")


def evaluate_run(run_dir: Path, cfg, saved) -> None:
    """Check every file evaluation reads, then rebuild the matrices and write results.json and the report."""
    cfg.run.out_dir = str(run_dir.parent)
    dist = setup_distributed(cfg.train.device)
    previous = read_previous_results(run_dir / "results.json")
    sources = task_checkpoints(run_dir)
    checkpoints = []
    for i, (path, digest) in enumerate(sources):  # all of them before any work
        ckpt = load_checkpoint(path)
        check_task_checkpoint(ckpt, path, i, digest, saved, cfg)
        checkpoints.append((path, ckpt))
    run = ContinualRun(cfg, None, dist.device)  # reads the task files: checked against what each checkpoint saw
    for path, ckpt in checkpoints:
        check_same_data(ckpt, path, run.data, cfg, "re-evaluating")
    run.build_fid()
    for path, ckpt in checkpoints:
        check_same_fid_features(ckpt, path, run.evaluation.features_digest, "re-evaluating")
    evaluator, fid_info = run.evaluation.evaluator, run.evaluation.fid_info
    matrices = {}
    for i, (path, ckpt) in enumerate(tqdm(checkpoints, desc="re-evaluating task checkpoints", leave=False)):
        run = ContinualRun(cfg, None, dist.device)
        run.evaluation.evaluator, run.evaluation.fid_info = evaluator, fid_info
        run.load(ckpt, path)
        for key, row in run.evaluate(i).items():
            matrices.setdefault(key, []).append(row)
        tqdm.write(f"re-evaluated task {i}: {path}", file=sys.stderr)
    run.evaluation.matrices = matrices
    results = run.results()
    results.update({k: v for k, v in previous.items() if k.startswith("time/")})  # not measured again
    write_json(run_dir / "results.json", results)
    print(forgetting.report(results, list(cfg.data.tasks), run_dir))


if __name__ == "__main__":
    run_cli(main)
