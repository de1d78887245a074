"""Run, continue or inspect a study: every run of a study file (configs/studies/<name>.yaml), through submitit.

    python study.py configs/studies/kd_methods.yaml                  # run or continue it here (local executor)
    python study.py configs/studies/kd_methods.yaml --status         # one line per run: state, epoch or task, log
    python study.py configs/studies/kd_methods.yaml --rows kd fitnet # only these rows
    python study.py configs/studies/kd_methods.yaml --summary        # the summary of the finished runs only
    python study.py configs/studies/kd_methods.yaml --executor slurm --partition gpu --account lab --time-min 120
    python study.py configs/studies/kd_methods.yaml --publish        # docs/studies/kd_methods.csv + the doc blocks
    python study.py --update-docs                                    # regenerate every <!-- study:NAME --> block

Everything lands in <--out>/<name>/ (default runs/studies/<name>/): runs/<row>_s<seed>/ (each program's own run
directory), logs/<run>.log, records/, submitit/, and the summary (summary.md, summary.csv, values.csv,
summary.png, and gap.csv for a study with a gap:). Running the command again continues the study: finished runs
are never repeated, runs that stopped continue from their last checkpoint. The study file format is in studies/spec.py, the guide in docs/studies.md.
Exit codes: 0 all runs finished (or, on SLURM, submitted), 1 a run failed (its log is named), 2 a bad study file
or option (nothing submitted).
"""
from __future__ import annotations

import argparse
import sys

from common.cli import run_cli
from common.errors import UserError
from studies import execute, summary
from studies.spec import load_study


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="study.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", nargs="?", help="the study file, configs/studies/<name>.yaml")
    parser.add_argument("--executor", choices=("local", "slurm", "debug"), default="local")
    parser.add_argument("--out", default="runs/studies", help="parent folder of study folders")
    parser.add_argument("--status", action="store_true", help="where each run stands; submits nothing")
    parser.add_argument("--summary", action="store_true", help="write the summary of finished runs; submits nothing")
    parser.add_argument("--publish", action="store_true", help="copy the summary's values to docs/studies/ and "
                                                               "regenerate the doc blocks; submits nothing")
    parser.add_argument("--update-docs", action="store_true", help="regenerate every doc block from docs/studies/")
    parser.add_argument("--rows", nargs="+", metavar="ROW", help="run only these rows (a row waits for the run "
                                                                  "it starts from, which must have finished)")
    parser.add_argument("--max-cores", type=int, default=None, help="local: cores the runs may use at once "
                                                                    "(default: all of this machine's)")
    slurm = parser.add_argument_group("slurm (override the study file's slurm: and resources:)")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--gpus", type=int, help="GPUs per run (one DDP task each)")
    slurm.add_argument("--nodes", type=int, help="nodes per run")
    slurm.add_argument("--time-min", type=int, help="time limit of each run, minutes")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse's own usage error: exit 2 before anything, as a bad study file
        if exc.code not in (0, None):
            raise UserError("bad command line (see python study.py --help)") from None
        raise
    if args.update_docs:
        for path in summary.update_docs():
            print(f"updated {path}")
        if not args.study:
            return
    if not args.study:
        raise UserError("give a study file, e.g. python study.py configs/studies/kd_methods.yaml")
    study = with_cli_resources(load_study(args.study, args.out), args)  # every check before any submission
    execute.check_unchanged(study)
    if args.status:
        print("\n".join(execute.status_lines(study)))
        return
    if args.summary or args.publish:
        report_summary(study)
        if args.publish:
            print(f"published {summary.publish(study)}")
            for path in summary.update_docs():
                print(f"updated {path}")
        return
    sys.exit(run_study(study, args))


def with_cli_resources(study, args):
    """The command line's --gpus / --nodes / --time-min override every row's resources."""
    import dataclasses
    changes = {k: v for k, v in (("gpus", args.gpus), ("nodes", args.nodes), ("time_min", args.time_min))
               if v is not None}
    if not changes:
        return study
    runs = {n: dataclasses.replace(r, resources=dataclasses.replace(r.resources, **changes))
            for n, r in study.runs.items()}
    return dataclasses.replace(study, runs=runs)


def run_study(study, args) -> int:
    """Submit what has not finished and is not in flight; the exit code."""
    unknown = sorted(set(args.rows or ()) - set(study.rows))
    if unknown:
        raise UserError(f"--rows: {', '.join(unknown)} not in the study (rows: {', '.join(study.rows)})")
    chosen = [r for r in study.ordered_runs() if not args.rows or r.row in args.rows]
    todo = [r for r in chosen if not study.finished(r) and not execute.in_flight(study, r)]
    execute._check_resources(args.executor, study, todo)
    rows = f" ({len(chosen)} of them in --rows {' '.join(args.rows)})" if args.rows else ""
    print(f"[study] {study.name}: {len(study.runs)} runs{rows}, {len(chosen) - len(todo)} finished or in flight, "
          f"{len(todo)} to run ({args.executor}); folder {study.folder}")
    execute.prepare_environment()
    if args.executor == "slurm":
        options = execute.SlurmOptions(**{**study.slurm, **{k: getattr(args, k) for k in ("partition", "account",
                                                                                          "qos")
                                                            if getattr(args, k)}})
        for run, job_id in execute.submit_slurm(study, todo, options):
            print(f"[study] {run.name}: SLURM job {job_id} (log {run.log})")
        print(f"[study] submitted; `python study.py {study.path} --status` shows the runs, and the same command "
              "again, once they have ended, writes the summary")
        return 0
    failures = execute.run_here(args.executor, study, todo, args.max_cores) if todo else []
    report_summary(study)
    for run, message in failures:
        print(f"error: {run.name}: {message}", file=sys.stderr)
    return 1 if failures else 0


def report_summary(study) -> None:
    table = summary.write_summary(study)
    if table:
        print((study.folder / "summary.md").read_text())
        print(f"[study] summary: {study.folder / 'summary.md'}, summary.csv, values.csv, summary.png")
    else:
        print("[study] no run has finished yet: no summary")


if __name__ == "__main__":
    run_cli(main)
