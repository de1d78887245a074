"""study.py and the studies package: bad study files stop before any submission, a tiny study end to end on the
local executor (summary = hand computation, a failing row, continuing, an edited row), a preempted run requeued by
submitit's checkpoint hook equals an uninterrupted one, a branch row equals the same run made by hand, and the
SLURM submission script (a stand-in sbatch)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import statistics
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY_LABEL_ONLY, call_main, read_metrics, run_script

# a run of a few seconds: labels only (no teacher), 1 epoch
FAST = [a for a in TINY_LABEL_ONLY if not a.startswith("train.epochs=")] + ["train.epochs=1"]


def study_file(tmp_path: Path, name: str = "tiny", **entries) -> Path:
    study = {"program": "train_student", "overrides": FAST, "seeds": [0, 1], "reference": "a",
             "metrics": ["test/acc1", "train_samples"], "rows": {"a": [], "b": ["train.lr=0.003"]}, **entries}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def study_main(*args):
    import study
    return call_main(study.main, list(args))


# ---------------------------------------------------------------------------------------------------------------
# Bad study files: error and exit 2, nothing submitted
# ---------------------------------------------------------------------------------------------------------------
BAD = {
    "unknown key": ({"sede": [0]}, "unknown key sede at the top level"),
    "unknown row key": ({"rows": {"a": {"overide": []}}}, "unknown key overide in row a"),
    "after: an unknown row": ({"rows": {"a": [], "b": {"after": {"row": "z", "checkpoint": "last"}}}},
                              "after: names row 'z'"),
    "cycle": ({"rows": {"a": {"after": {"row": "b"}}, "b": {"after": {"row": "a"}}}}, "form a cycle: a -> b -> a"),
    "refused override": ({"rows": {"a": [], "b": ["kd.temprature=2"]}}, "row b (seed 0): the program refuses"),
    "refused value": ({"rows": {"a": [], "b": ["train.lr=-1"]}}, "train.lr"),
    "unknown reference": ({"reference": "c"}, "reference 'c' is not a row"),
    "bad checkpoint name": ({"rows": {"a": [], "b": {"after": {"row": "a", "checkpoint": "task_1_teacher"}}}},
                            "is not a checkpoint this program writes"),
    "gap: unknown key": ({"gap": {"metric": "test/acc1", "lower": "a", "upper": "b", "uper": "b"}},
                         "unknown key uper in gap"),
    "gap: missing key": ({"gap": {"metric": "test/acc1", "lower": "a"}}, "gap: missing key upper"),
    "gap: unknown row": ({"gap": {"metric": "test/acc1", "lower": "a", "upper": "c"}}, "gap: upper 'c' is not a row"),
    "gap: unreported row": ({"rows": {"a": [], "b": {"report": False}}, "gap": {"metric": "test/acc1", "lower": "b",
                                                                               "upper": "a"}},
                            "gap: lower row 'b' has report: false"),
    "gap: metric not in metrics": ({"gap": {"metric": "val/acc1", "lower": "a", "upper": "b"}},
                                   "gap: metric 'val/acc1' is not one of the study's metrics"),
    "gap: a metric's path, not its name": ({"metrics": [{"acc": "test/acc1"}],
                                            "gap": {"metric": "test/acc1", "lower": "a", "upper": "b"}},
                                           "gap: metric 'test/acc1' is not one of the study's metrics (acc)"),
    "gap: lower = upper": ({"gap": {"metric": "test/acc1", "lower": "a", "upper": "a"}},
                           "gap: lower and upper are the same row"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_study_file_stops_before_any_submission(tmp_path, case):
    entries, message = BAD[case]
    proc = study_main(str(study_file(tmp_path, **entries)), "--out", str(tmp_path / "out"), "--executor", "debug")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()  # nothing submitted, not even a folder


# ---------------------------------------------------------------------------------------------------------------
# The statistics, by hand
# ---------------------------------------------------------------------------------------------------------------
def test_summary_statistics_against_a_hand_computation():
    from studies.summary import markdown_table, summarize
    values = [{"row": r, "seed": s, "metric": "acc", "value": v, "reference": r == "ref"}
              for r, s, v in [("ref", 0, 70.0), ("ref", 1, 72.0), ("ref", 2, 71.0),
                              ("new", 0, 73.0), ("new", 1, 73.5), ("new", 2, 75.0)]]
    new = next(e for e in summarize(values) if e["row"] == "new")
    d = [3.0, 1.5, 4.0]
    half = 4.302652729911275 * statistics.stdev(d) / math.sqrt(3)  # t_{0.975, 2}
    assert new["mean"] == pytest.approx(73.8333333333) and new["sd"] == pytest.approx(statistics.stdev([73, 73.5, 75]))
    assert (new["diff_mean"], new["pairs"]) == (pytest.approx(statistics.mean(d)), 3)
    assert (new["ci_low"], new["ci_high"]) == (pytest.approx(statistics.mean(d) - half),
                                              pytest.approx(statistics.mean(d) + half))
    assert "| new | 0, 1, 2 | 73.83 ± 1.04 | +2.83 [-0.29, +5.96] |" in markdown_table(summarize(values))
    # a metric a seed has no value of (epochs_to_X never reached) counts the seeds that have one
    reach = [{"row": "ref", "seed": s, "metric": "epochs_to_70", "value": v, "reference": True}
             for s, v in [(0, 8), (1, None), (2, 10)]]
    assert "| ref | 0, 1, 2 | 9 ± 1.41 (2 of 3) | - |" in markdown_table(summarize(reach))


# ---------------------------------------------------------------------------------------------------------------
# The gap column (gap: {metric, lower, upper}), by hand
# ---------------------------------------------------------------------------------------------------------------
def forgetting_values(table: dict[str, list]) -> list[dict]:
    return [{"row": row, "seed": seed, "metric": "forgetting", "value": value, "reference": row == "default"}
            for row, seeds in table.items() for seed, value in enumerate(seeds)]


# seed 2: the bounds are equal, no gap to close; `worse` is beyond the lower bound on seed 0, beyond the upper on 1
GAP_VALUES = forgetting_values({"noreplay": [40.0, 42.0, 30.0], "oracle": [10.0, 12.0, 30.0],
                                "default": [25.0, 27.0, 20.0], "worse": [46.0, 6.0, 35.0]})


def test_gap_shares_against_a_hand_computation():
    from studies.summary import gap_shares, gap_ties
    shares = gap_shares(GAP_VALUES, "forgetting", "noreplay", "oracle")
    # (L - X) / (L - U) * 100: (40 - 25) / 30 = 50%, (42 - 27) / 30 = 50%; (40 - 46) / 30 = -20%, (42 - 6) / 30 = 120%
    assert shares == {"noreplay": {0: 0.0, 1: 0.0}, "oracle": {0: 100.0, 1: 100.0}, "default": {0: 50.0, 1: 50.0},
                      "worse": {0: pytest.approx(-20.0), 1: pytest.approx(120.0)}}
    assert str(shares["noreplay"][0]) == "0.0"  # not -0.0
    assert gap_ties(GAP_VALUES, "forgetting", "noreplay", "oracle") == [2]


def test_gap_column_in_the_markdown_table():
    from studies.summary import Gap, markdown, summarize
    gap = Gap(metric="forgetting", lower="noreplay", upper="oracle")
    text = markdown(GAP_VALUES, "x", gap)
    assert ("| row | seeds | forgetting | Δ forgetting vs default [95% CI] "
            "| gap closed on forgetting, noreplay → oracle (%) |") in text
    assert text.count(" (2 of 3) |\n") == 4  # every row: the shares of seeds 0 and 1
    assert "| default | 0, 1, 2 | 24.00 ± 3.61 | - | 50.00 (2 of 3) |" in text
    assert f"| 50.00 ± {statistics.stdev([-20, 120]):.2f} (2 of 3) |" in text  # worse: -20% and 120%
    assert "| noreplay | 0, 1, 2 | 37.33 ± 6.43 | +13.33 [+6.16, +20.50] | 0.00 (2 of 3) |" in text
    assert "Seed 2 left out: noreplay and oracle have the same forgetting there" in " ".join(text.split())
    entry = next(e for e in summarize(GAP_VALUES, gap) if e["row"] == "worse" and e["gap"] is True)
    assert (entry["n"], entry["mean"], entry["diff_mean"]) == (2, pytest.approx(50.0), None)
    # without a tie, no word of one; without a gap, the table of before
    no_tie = [v for v in GAP_VALUES if v["seed"] != 2]
    assert "left out" not in markdown(no_tie, "x", gap) and "| 50.00 |" in markdown(no_tie, "x", gap)
    assert "gap closed" not in markdown(GAP_VALUES, "x")


def test_a_studys_gap_goes_into_its_summary_and_published_blocks(tmp_path):
    """gap: in the study file -> gap.csv (per-seed shares), summary.csv and summary.md; --publish writes
    <name>.gap.json next to <name>.csv, and the doc block is regenerated from those two alone."""
    import csv

    from studies.spec import load_study
    from studies.summary import publish, refresh_blocks, write_summary
    rows = {"low": [], "high": ["train.lr=0.003"], "mid": {"overrides": ["train.lr=0.002"], "label": "middle"}}
    study = load_study(study_file(tmp_path, rows=rows, reference="low", metrics=[{"acc": "test/acc1"}],
                                  gap={"metric": "acc", "lower": "low", "upper": "high"}), tmp_path / "out")
    for (row, seed), acc in {("low", 0): 70.0, ("low", 1): 60.0, ("high", 0): 80.0, ("high", 1): 80.0,
                             ("mid", 0): 72.5, ("mid", 1): 75.0}.items():  # mid: 25% and 75% of the gap
        study.runs[f"{row}_s{seed}"].run_dir.mkdir(parents=True)
        (study.runs[f"{row}_s{seed}"].run_dir / "results.json").write_text(json.dumps({"test/acc1": acc}))
    write_summary(study)
    column = "gap closed on acc, low → high (%)"
    shares = [(r["row"], r["seed"], r["metric"], float(r["value"]))
              for r in csv.DictReader((study.folder / "gap.csv").open())]
    assert shares == [("low", "0", column, 0.0), ("low", "1", column, 0.0), ("high", "0", column, 100.0),
                      ("high", "1", column, 100.0), ("middle", "0", column, 25.0), ("middle", "1", column, 75.0)]
    summary = {(r["row"], r["metric"]): r for r in csv.DictReader((study.folder / "summary.csv").open())}
    assert float(summary[("middle", column)]["mean"]) == 50.0
    assert float(summary[("middle", column)]["sd"]) == pytest.approx(statistics.stdev([25.0, 75.0]))
    assert "| middle | 0, 1 | 73.75 ± 1.77 | +8.75 [-70.66, +88.16] | 50.00 ± 35.36 |" in \
        (study.folder / "summary.md").read_text()
    published = tmp_path / "published"
    publish(study, published)
    assert json.loads((published / "tiny.gap.json").read_text()) == {"metric": "acc", "lower": "low",
                                                                      "upper": "high"}
    block, _ = refresh_blocks("<!-- study:tiny -->\n<!-- /study:tiny -->", published)
    assert column in block and "| middle | 0, 1 | 73.75 ± 1.77 | +8.75 [-70.66, +88.16] | 50.00 ± 35.36 |" in block


def test_generated_blocks_are_replaced_between_their_markers(tmp_path):
    from studies.summary import markdown, refresh_blocks, values_csv
    values = [{"row": "a", "seed": 0, "metric": "m", "value": 1.0, "reference": True}]
    (tmp_path / "x.csv").write_text(values_csv(values))
    text = "intro\n<!-- study:x -->\nold table\n<!-- /study:x -->\nafter\n"
    new, names = refresh_blocks(text, tmp_path)
    assert names == ["x"] and new == f"intro\n<!-- study:x -->\n{markdown(values, 'x')}<!-- /study:x -->\nafter\n"


def test_generated_blocks_in_the_docs_are_up_to_date():
    """Every <!-- study:NAME --> block of README.md and docs/*.md equals what docs/studies/NAME.csv generates
    (refresh with python study.py --update-docs)."""
    from studies.summary import doc_files, refresh_blocks
    stale = [p for p in doc_files() if refresh_blocks(p.read_text())[0] != p.read_text()]
    assert not stale, f"stale generated study blocks in {stale}: run python study.py --update-docs"


# ---------------------------------------------------------------------------------------------------------------
# A tiny study end to end, local executor
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the failing row fails for want of CUDA")
def test_tiny_study_end_to_end_on_the_local_executor(tmp_path):
    rows = {"a": [], "b": ["train.lr=0.003"], "broken": {"overrides": ["train.device=cuda"], "seeds": [0]}}
    path = study_file(tmp_path, rows=rows)
    out = tmp_path / "out"
    proc = study_main(str(path), "--out", str(out))  # in this process; each run is a process of its own
    folder = out / "tiny"
    # the failing row: named with its log, the others finish, exit code 1
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"error: broken_s0: failed; its log: {folder / 'logs' / 'broken_s0.log'}" in proc.stderr
    assert "no CUDA device" in (folder / "logs" / "broken_s0.log").read_text()
    # the summary's numbers are those of the runs' results.json, by hand
    res = {(r, s): json.loads((folder / "runs" / f"{r}_s{s}" / "results.json").read_text())
           for r in "ab" for s in (0, 1)}
    table = {(row["row"], row["metric"]): row for row in
             __import__("csv").DictReader((folder / "summary.csv").open())}
    for r in "ab":
        acc = [res[(r, s)]["test/acc1"] for s in (0, 1)]
        assert float(table[(r, "test/acc1")]["mean"]) == statistics.mean(acc)
        assert float(table[(r, "test/acc1")]["sd"]) == statistics.stdev(acc)
    d = [res[("b", s)]["test/acc1"] - res[("a", s)]["test/acc1"] for s in (0, 1)]
    half = 12.706204736174698 * statistics.stdev(d) / math.sqrt(2)  # t_{0.975, 1}
    assert float(table[("b", "test/acc1")]["diff_mean"]) == pytest.approx(statistics.mean(d), abs=1e-12)
    assert float(table[("b", "test/acc1")]["ci_high"]) == pytest.approx(statistics.mean(d) + half, abs=1e-9)
    samples = sum(m["train/samples"] for m in read_metrics(folder / "runs" / "a_s0"))
    assert float(table[("a", "train_samples")]["mean"]) == samples
    assert (folder / "summary.png").stat().st_size > 0 and (folder / "summary.md").is_file()
    # the run records the study that made it
    assert json.loads((folder / "runs" / "a_s0" / "run.json").read_text())["study"]["row"] == "a"
    # --status: one line per run
    status = study_main(str(path), "--out", str(out), "--status").stdout.splitlines()
    assert [ln.split()[:2] for ln in status] == [["a_s0", "done"], ["a_s1", "done"], ["b_s0", "done"],
                                                  ["b_s1", "done"], ["broken_s0", "failed"]]
    assert status[0].split()[-1] == str(folder / "logs" / "a_s0.log")
    # continuing (the failing row taken out of the file): nothing new is submitted
    del rows["broken"]
    path = study_file(tmp_path, rows=rows)
    again = study_main(str(path), "--out", str(out))
    assert again.returncode == 0 and "4 finished or in flight, 0 to run" in again.stdout, again.stdout
    assert len(list((folder / "submitit").glob("*_submitted.pkl"))) == 5
    # an edited row: refused, nothing submitted
    rows["b"] = ["train.lr=0.004"]
    edited = study_main(str(study_file(tmp_path, rows=rows)), "--out", str(out))
    assert edited.returncode == 2 and "changed since these runs" in edited.stderr and "b_s0, b_s1" in edited.stderr
    assert len(list((folder / "submitit").glob("*_submitted.pkl"))) == 5


# ---------------------------------------------------------------------------------------------------------------
# Preemption: submitit's checkpoint hook requeues the run with run.resume=auto, and its numbers are unchanged
# ---------------------------------------------------------------------------------------------------------------
def test_the_checkpoint_hook_resubmits_the_run_with_resume_auto(tmp_path):
    from studies.job import RunJob
    from studies.spec import load_study
    study = load_study(study_file(tmp_path), tmp_path / "out")
    job = RunJob(study.runs["a_s0"], "f", "d")
    assert not any(a.startswith("run.resume=") for a in job.command())
    delayed = job.checkpoint()
    (study.runs["a_s0"].run_dir / "checkpoints").mkdir(parents=True)
    (study.runs["a_s0"].run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    assert delayed.function.resume == "auto" and delayed.function.command()[-1] == "run.resume=auto"
    assert delayed.function.run == job.run and (delayed.args, delayed.kwargs) == ((), {})


def _comparable(run_dir: Path):
    """metrics.jsonl and results.json less what measures the machine (time/*, latencies)."""
    def keep(d: dict) -> dict:
        return {k: v for k, v in d.items() if not k.startswith("time/") and "latency" not in k}
    return ([keep(m) for m in read_metrics(run_dir)], keep(json.loads((run_dir / "results.json").read_text())))


def test_a_preempted_local_job_is_requeued_and_equals_an_uninterrupted_run(tmp_path):
    """SIGUSR2 to the job's process, as SLURM sends it before a preemption or the time limit: submitit calls the
    checkpoint hook (the program stopped, its last checkpoint kept), the local controller requeues the job, and
    it continues with run.resume=auto to the numbers of an uninterrupted run, every digit."""
    import submitit

    from studies.execute import prepare_environment
    from studies.job import RunJob, read_events
    from studies.spec import load_study
    study = load_study(study_file(tmp_path, overrides=[*FAST[:-1], "train.epochs=2"], seeds=[0]), tmp_path / "out")
    run = study.runs["a_s0"]
    prepare_environment()
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=5)
    job = executor.submit(RunJob(run, "f", "d"))
    deadline = time.time() + 240
    while time.time() < deadline and not ((run.run_dir / "checkpoints" / "last.pt").is_file()
                                          and (run.run_dir / "metrics.jsonl").is_file()):
        time.sleep(0.05)
    assert len(read_metrics(run.run_dir)) < 2, "the run finished before it could be preempted"
    os.kill(next(e["pid"] for e in read_events(run) if e["event"] == "start"), signal.SIGUSR2)
    assert job.result()["run"] == "a_s0"
    events = [(e["event"], e.get("resume")) for e in read_events(run)]
    assert events == [("start", ""), ("requeue", None), ("start", "auto"), ("end", None)], events
    assert "resumed from" in run.log.read_text()
    # the same run, uninterrupted
    reference = RunJob(dataclasses.replace(run, name="ref", run_dir=tmp_path / "ref", log=tmp_path / "ref.log",
                                           args=run.args[:-2] + (f"run.out_dir={tmp_path}", "run.name=ref")), "f", "d")
    reference()
    assert _comparable(run.run_dir) == _comparable(tmp_path / "ref")


# ---------------------------------------------------------------------------------------------------------------
# A branch row (gan_vae: from the parent's task_1_teacher.pt), on the debug executor
# ---------------------------------------------------------------------------------------------------------------
def test_a_branch_row_runs_with_its_parents_overrides_then_its_own(tmp_path):
    """A branch continues its parent's run, so it inherits the parent's keys (a branch of a row with overrides was
    refused by the program before: `... changes its keys teacher.steps`); a row that only waits keeps its own."""
    from studies.spec import load_study
    rows = {"a": [], "t": ["train.lr=0.003"],
            "b": {"overrides": ["train.weight_decay=0.001"], "after": {"row": "t", "checkpoint": "last"}},
            "bb": {"overrides": ["train.lr=0.004"], "after": {"row": "b", "checkpoint": "last"}},
            "wait": {"overrides": ["train.weight_decay=0.002"], "after": {"row": "t"}},
            "plain": {"overrides": ["train.weight_decay=0.003"], "after": {"row": "a", "checkpoint": "last"}}}
    study = load_study(study_file(tmp_path, rows=rows, seeds=[0]), tmp_path / "out")

    def keys(run):  # the overrides after the study's own (FAST), before train.seed
        args = study.runs[run].args
        return list(args[len(FAST):args.index("train.seed=0")])
    assert keys("b_s0") == ["train.lr=0.003", "train.weight_decay=0.001"]
    assert keys("bb_s0") == ["train.lr=0.003", "train.weight_decay=0.001", "train.lr=0.004"]
    assert keys("wait_s0") == ["train.weight_decay=0.002"]
    assert keys("plain_s0") == ["train.weight_decay=0.003"]  # a parent without overrides: as before


def test_a_branch_row_equals_the_same_run_made_by_hand(tmp_path):
    import numpy as np
    from test_gan_vae import _domain
    for i, kind in enumerate(("discs", "crosses")):
        x, y = _domain(kind, 120, i)
        np.savez(tmp_path / f"{kind}.npz", images=x, labels=y)
    tiny = [f"data.tasks=[{tmp_path / 'discs.npz'},{tmp_path / 'crosses.npz'}]", "teacher.steps=4", "student.steps=4",
            "teacher.width=8", "student.width=8", "teacher.batch_size=16", "student.batch_size=16", "fid.samples=24",
            "fid.classifier_epochs=1", "log.every_steps=2", "log.sample_every=4", f"fid.cache_dir={tmp_path / 'fid'}"]
    rows = {"full": [], "prev0": {"overrides": ["kd.previous_weight=0"], "after": {"row": "full",
                                                                                  "checkpoint": "task_1_teacher"}}}
    path = study_file(tmp_path, program="gan_vae", overrides=tiny, seeds=[0], reference="full",
                      metrics=["recon_mse[1][0]", "forgetting"], rows=rows)
    proc = study_main(str(path), "--out", str(tmp_path / "out"), "--executor", "debug")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = tmp_path / "out" / "tiny" / "runs"
    branch = runs / "full_s0" / "checkpoints" / "task_1_teacher.pt"
    assert f"run.resume={branch}" in (tmp_path / "out" / "tiny" / "logs" / "prev0_s0.log").read_text()
    hand = run_script("-m", "gan_vae.continual", *tiny, "kd.previous_weight=0", "train.seed=0",
                      f"run.out_dir={tmp_path}", "run.name=hand", f"run.resume={branch}",
                      env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})  # the study's runs: one thread
    assert hand.returncode == 0, hand.stderr[-2000:]
    assert _comparable(runs / "prev0_s0") == _comparable(tmp_path / "hand")


# ---------------------------------------------------------------------------------------------------------------
# SLURM: the submission script, through a stand-in sbatch
# ---------------------------------------------------------------------------------------------------------------
def test_slurm_submission_script(tmp_path, monkeypatch):
    """sbatch, srun and sacct stand-ins on PATH: sbatch records its script and prints a job id. Resources, the
    preemption signal, requeue, one task per GPU for a 2-GPU row, and a branch row's dependency on its parent."""
    bin_dir, scripts = tmp_path / "bin", tmp_path / "scripts"
    bin_dir.mkdir()
    scripts.mkdir()
    (bin_dir / "sbatch").write_text(f"""#!/bin/sh
n=$(ls {scripts} | wc -l); id=$((4200 + n)); cp "$1" {scripts}/$id.sh; echo "Submitted batch job $id"\n""")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sacct").write_text("#!/bin/sh\nexit 1\n")  # no accounting: a submitted job counts as in flight
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    rows = {"a": [], "ddp": {"overrides": [], "resources": {"gpus": 2, "threads": 4}},
            "c": {"after": {"row": "a", "checkpoint": "last"}, "seeds": [0]}}
    path = study_file(tmp_path, rows=rows, seeds=[0], slurm={"partition": "gpu", "signal_delay_s": 90})
    proc = study_main(str(path), "--out", str(tmp_path / "out"), "--executor", "slurm", "--account", "lab",
                      "--time-min", "30")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in scripts.iterdir()) == ["4200.sh", "4201.sh", "4202.sh"]  # a_s0, ddp_s0, c_s0
    a, ddp, c = ((scripts / f"{i}.sh").read_text() for i in (4200, 4201, 4202))
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --time=30", "#SBATCH --signal=USR2@90",
                 "#SBATCH --requeue", "#SBATCH --nodes=1", "#SBATCH --gpus-per-node=2", "#SBATCH --ntasks-per-node=2",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --job-name=tiny:ddp_s0"):
        assert line in ddp.splitlines(), (line, ddp)
    assert "#SBATCH --ntasks-per-node=1" in a.splitlines() and "gpus-per-node" not in a
    assert "#SBATCH --dependency=afterok:4200" in c.splitlines() and "dependency" not in a
    assert "gpus-per-node" not in c and "#SBATCH --cpus-per-task=1" in c.splitlines()  # nothing left from ddp_s0
    assert "srun --unbuffered" in ddp and "submitit.core._submit" in ddp
    # the same command again: every run is in flight, nothing is submitted twice
    again = study_main(str(path), "--out", str(tmp_path / "out"), "--executor", "slurm", "--account", "lab")
    assert again.returncode == 0 and len(list(scripts.iterdir())) == 3, again.stdout


def test_a_multi_gpu_task_gets_torchruns_variables(monkeypatch):
    """Task 3 of a 2-node, 2-GPU-per-node SLURM job: RANK, WORLD_SIZE, LOCAL_RANK and the master address, which
    common.distributed.setup_distributed reads as under torchrun."""
    from studies.job import task_environment
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "77", "SLURM_NTASKS": "4",
                       "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
                       "SLURM_JOB_NODELIST": "gpu[01-02]"}.items():
        monkeypatch.setenv(key, value)
    env = task_environment()
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "gpu01"}
    assert 20000 <= int(env["MASTER_PORT"]) <= 60000


# ---------------------------------------------------------------------------------------------------------------
# The repository's study files
# ---------------------------------------------------------------------------------------------------------------
def test_the_repositorys_study_files_are_valid(tmp_path, shared_data):
    """Every configs/studies/*.yaml passes the checks a submission makes (each run through its program's config
    loader), every branch row of the gan_vae ablation changes only what a branch at task_1_teacher may change
    (the student phase's sections), as gan_vae.continual checks when the run starts, and every full run of it names
    its experts' steps and critic steps."""
    from gan_vae.continual import STUDENT_PHASE_SECTIONS
    from studies.spec import load_study
    studies = {p.stem: load_study(p, tmp_path) for p in sorted((ROOT / "configs" / "studies").glob("*.yaml"))}
    assert {"kd_methods", "curriculum_a", "curriculum_b", "curriculum_c", "gan_vae_ablation"} <= set(studies)
    ablation = studies["gan_vae_ablation"]
    trunks = {"teacher600", "teacher1200", "ncrit3"}  # the reference, the default of 2026-12-07, the default
    assert ablation.reference == "teacher600" and not any(ablation.rows[t].after for t in trunks)
    for row in ablation.rows.values():
        if row.after is not None:
            assert row.after in trunks and row.checkpoint == "task_1_teacher", row.name
            trunk = set(ablation.rows[row.after].overrides)
            assert trunk <= set(row.overrides), row.name  # a branch runs with its trunk's keys
            assert all(o.split(".")[0] in STUDENT_PHASE_SECTIONS for o in set(row.overrides) - trunk), row.name
        else:  # a full run names the experts' budget, so that a change of the default leaves it what was measured
            assert {"teacher.steps", "teacher.n_critic"} <= {o.split("=")[0] for o in row.overrides}, row.name


def test_the_start_line_counts_only_the_rows_chosen_by_rows(tmp_path, monkeypatch):
    """--rows a: the runs of the other rows are neither finished nor in flight, so the start line does not count
    them as such (it said "2 finished or in flight" for a study where nothing had run)."""
    from studies import execute
    monkeypatch.setattr(execute, "run_here", lambda *a, **k: [])  # submit nothing: only the start line matters
    done = study_main(str(study_file(tmp_path)), "--out", str(tmp_path / "out"), "--rows", "a")
    assert done.returncode == 0, done.stderr
    line = next(s for s in done.stdout.splitlines() if s.startswith("[study] tiny:"))
    assert "4 runs (2 of them in --rows a), 0 finished or in flight, 2 to run" in line, line


def test_a_run_whose_local_job_is_gone_is_submitted_again(tmp_path):
    """A record without a live job (the study command was interrupted before the job started) is 'stopped', not
    in flight: the next command submits it again instead of waiting for it forever."""
    import subprocess
    import sys

    from studies.execute import _record, in_flight, run_state
    from studies.spec import load_study
    study = load_study(study_file(tmp_path, seeds=[0]), tmp_path / "out")
    run = study.runs["a_s0"]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _record(study, run, "local", str(gone.pid))
    assert run_state(study, run) == ("stopped", 0) and not in_flight(study, run)
    _record(study, run, "local", str(os.getpid()))  # a controller alive, the job not started yet
    assert run_state(study, run) == ("queued", 0) and in_flight(study, run)


def test_a_run_another_study_command_took_after_this_one_planned_is_not_started_again(tmp_path):
    """Two study commands on one folder (a second one started for some rows while the first waits for cores): a run
    the first planned but the second has submitted since (its controller alive, the job queued or running) is not
    submitted a second time into the same run directory; nor is one that has finished meanwhile."""
    import subprocess
    import sys

    from studies.execute import _record, run_here
    from studies.spec import load_study
    study = load_study(study_file(tmp_path, seeds=[0, 1], rows={"a": []}), tmp_path / "out")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # the other command, alive
    try:
        _record(study, study.runs["a_s0"], "local", str(other.pid))
        done = study.runs["a_s1"].run_dir
        done.mkdir(parents=True)
        (done / "results.json").write_text("{}")
        said = []
        failures = run_here("local", study, [study.runs["a_s0"], study.runs["a_s1"]], max_cores=1,
                            say=said.append)
    finally:
        other.kill()
        other.wait()
    assert failures == []
    assert said == ["[study] a_s0: queued by another study command; not started here",
                    "[study] a_s1: done by another study command; not started here"]
    assert not study.runs["a_s0"].run_dir.exists() and (done / "results.json").read_text() == "{}"


def test_a_row_waits_for_its_parents_job_to_end_not_only_for_its_results(tmp_path):
    """train_student.py writes results.json before student.safetensors: a row distilling from a teacher row must
    not start while the teacher's job still runs."""
    from studies.execute import parent_ready
    from studies.spec import load_study
    study = load_study(study_file(tmp_path, seeds=[0], rows={"a": [], "b": {"after": {"row": "a"}}}), tmp_path / "o")
    parent = study.runs["a_s0"].run_dir
    parent.mkdir(parents=True)
    (parent / "results.json").write_text("{}")
    assert not parent_ready(study, study.runs["b_s0"], {"a_s0"})
    assert parent_ready(study, study.runs["b_s0"], set())


def test_the_compact_block_holds_the_named_metrics_and_the_first_ones_paired_difference(tmp_path):
    """<!-- study:x metrics=acc,gap --> (the README's form): one line per row, mean ± sd of each named metric,
    then the first metric's paired difference against the reference, hand-computed here; an unknown metric stops
    with the ones the values hold."""
    from common.errors import UserError
    from studies.summary import Gap, refresh_blocks, values_csv
    values = [{"row": r, "seed": s, "metric": m, "value": v, "reference": r == "low"}
              for r, s, m, v in [("low", 0, "acc", 70.0), ("low", 0, "loss", 1.0), ("low", 1, "acc", 60.0),
                                 ("low", 1, "loss", 2.0), ("high", 0, "acc", 80.0), ("high", 0, "loss", 0.5),
                                 ("high", 1, "acc", 80.0), ("high", 1, "loss", 0.5)]]
    (tmp_path / "x.csv").write_text(values_csv(values))
    (tmp_path / "x.gap.json").write_text(json.dumps({"metric": "acc", "lower": "low", "upper": "high"}))
    new, names = refresh_blocks("<!-- study:x metrics=acc,gap -->\nold\n<!-- /study:x -->\n", tmp_path)
    # low: 65 ± 7.07; high: 80 (sd 0, no ± shown); paired differences 10 and 20: mean 15, sd 7.071, t(0.975, 1) = 12.706
    half = 12.7062047 * statistics.stdev([10.0, 20.0]) / 2 ** 0.5
    assert names == ["x"]
    assert new.splitlines()[1:5] == [
        "| row | acc | gap closed on acc, low → high (%) | Δ acc vs low [95% CI] |", "|---|---|---|---|",
        "| low | 65.00 ± 7.07 | 0.00 | - |",
        f"| high | 80.00 | 100 | +15.00 [{-half + 15:+.2f}, {half + 15:+.2f}] |"]
    assert "Mean ± sd over seeds 0, 1 (values: docs/studies/x.csv),\nfrom `python study.py configs/studies/x.yaml`" in new
    with pytest.raises(UserError, match="names accuracy, which docs/studies/x.csv does not hold; it holds acc, loss"):
        refresh_blocks("<!-- study:x metrics=accuracy -->\n<!-- /study:x -->", tmp_path)
    # first=N keeps the first N rows in the study's order and says how many there are
    new, _ = refresh_blocks("<!-- study:x metrics=acc first=1 -->\nold\n<!-- /study:x -->\n", tmp_path)
    assert new.splitlines()[1:5] == ["| row | acc | Δ acc vs low [95% CI] |", "|---|---|---|",
                                     "| low | 65.00 ± 7.07 | - |", ""]
    assert "The first 1 of 2 rows; mean ± sd over seeds 0, 1" in new and new.endswith("<!-- /study:x -->\n")
    new, _ = refresh_blocks("<!-- study:x metrics=acc first=2 -->\nold\n<!-- /study:x -->\n", tmp_path)
    assert "| high |" in new and "Mean ± sd over seeds 0, 1" in new
    with pytest.raises(UserError, match="keeps no row"):
        refresh_blocks("<!-- study:x metrics=acc first=0 -->\n<!-- /study:x -->", tmp_path)
    with pytest.raises(UserError, match="name its metrics too"):
        refresh_blocks("<!-- study:x first=1 -->\n<!-- /study:x -->", tmp_path)


def test_a_generated_blocks_prose_lines_are_at_most_120_characters():
    """The note under a generated table is wrapped at 120 characters (tests/test_docs.py's limit for prose), even for
    a long study name and a gap's note; the table lines themselves are not prose."""
    from studies.summary import Gap, markdown
    values = [{"row": r, "seed": s, "metric": "forgetting", "value": v, "reference": r == "default"}
              for r, s, v in [("default", 0, 20.0), ("default", 1, 30.0), ("lower bound", 0, 50.0),
                              ("lower bound", 1, 60.0), ("upper bound", 0, 2.0), ("upper bound", 1, 3.0)]]
    text = markdown(values, "a_study_with_a_rather_long_name_ablation", Gap("forgetting", "lower bound", "upper bound"))
    prose = [line for line in text.splitlines() if line and not line.startswith("|")]
    assert len(prose) >= 3 and all(len(line) <= 120 for line in prose)
    assert "docs/studies/a_study_with_a_rather_long_name_ablation.csv" in text  # a path is never broken
