"""Summarise finished runs: mean and spread of their results over seeds, as a markdown table.

    python summarize.py runs/quickstart_student_s*
    python summarize.py runs/quickstart_student_s* --keys test/acc1 test/acc1_last
    python summarize.py runs/cur_*_s* --reach 70     # plus epochs to reach 70% validation top-1
    python summarize.py runs/cur_a_*_s* --keys test/acc1 --paired cur_a_random_subset cur_a_all

For a whole comparison, use a study (python study.py configs/studies/<name>.yaml, docs/studies.md): it runs the
rows and seeds and writes this summary with 95% intervals. This command summarises any run directories; reading a
run is studies.summary.read_run.

Each argument is a run directory holding results.json; a `label_only/` run inside it (from kd.baseline=true)
is summarised too. Runs whose names differ only by a trailing `_s<seed>` or `__s<seed>...` form one row.
From metrics.jsonl come `train_samples` (the samples that reached the loss over the whole run: the sum of every
epoch's `train/samples`, written by train_student.py and train_student_rl.py) and, with --reach X, `epochs_to_X`
(first epoch, 1-based, with val/acc1 >= X). A cell is mean ± sample standard deviation over the row's runs, or
the value itself when every run has the same.

--paired ROW...: for each reference row, the paired per-seed difference of --paired-key (default: the first of
--keys) of every row against it: d_s = row(seed s) - reference(seed s) over the seeds both rows have, shown as
mean ± sample sd (number of pairs). The seed is `train.seed` from the run's config.yaml (else the `_s<seed>` of
its name). A reference may be named in full or by its last part (`random_subset` for `cur_a_random_subset`).
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

from studies.summary import read_run, run_seed  # noqa: F401 - the reading of runs lives in the study package


def group_name(run_dir: Path) -> str:
    name = run_dir.name if run_dir.name != "label_only" else f"{run_dir.parent.name}/label_only"
    return re.sub(r"(_s\d+|__s\d+__[\w-]+)(?=/|$)", "", name)


def run_summary(run: Path, reach: float | None) -> dict:
    return read_run(run, reach)


def collect(paths: list[str], reach: float | None = None) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for p in map(Path, paths):
        for run in (p, p / "label_only"):
            if (run / "results.json").is_file():
                groups.setdefault(group_name(run), []).append(run_summary(run, reach))
    return groups


def fmt_value(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:.2f}"


def table(groups: dict[str, list[dict]], keys: list[str]) -> str:
    lines = ["| runs | n | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name, results in groups.items():
        cells = []
        for key in keys:
            values = [r[key] for r in results if isinstance(r.get(key), (int, float))]
            missing = sum(1 for r in results if key in r and r[key] is None)  # e.g. never reached the accuracy
            if missing:
                cells.append(f"{statistics.mean(values):.1f} ({len(values)}/{len(results)} reached)" if values
                             else f"never ({len(results)} runs)")
            elif not values:
                cells.append("-")
            elif len(set(values)) == 1:  # one run, or every run the same (e.g. an exact sample budget)
                cells.append(fmt_value(values[0]))
            else:
                cells.append(f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}")
        lines.append(f"| {name} | {len(results)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def resolve_row(groups: dict[str, list[dict]], name: str) -> str:
    if name in groups:
        return name
    matches = [g for g in groups if g.endswith("_" + name)]
    if len(matches) != 1:
        raise SystemExit(f"error: --paired {name}: {'no' if not matches else 'more than one'} row matches "
                         f"(rows: {', '.join(groups)})")
    return matches[0]


def paired_differences(row: list[dict], reference: list[dict], key: str) -> list[float]:
    """row(seed) - reference(seed) for every seed both have a value of `key` for, in seed order."""
    ref = {r["seed"]: r[key] for r in reference if r.get("seed") is not None and isinstance(r.get(key), (int, float))}
    mine = {r["seed"]: r[key] for r in row if r.get("seed") is not None and isinstance(r.get(key), (int, float))}
    return [mine[s] - ref[s] for s in sorted(set(mine) & set(ref))]


def paired_table(groups: dict[str, list[dict]], references: list[str], key: str) -> str:
    lines = ["| runs | " + " | ".join(f"{key} − {ref}" for ref in references) + " |",
             "|---|" + "---|" * len(references)]
    for name, results in groups.items():
        cells = []
        for ref in references:
            diffs = paired_differences(results, groups[ref], key)
            if name == ref or not diffs:
                cells.append("-")
            elif len(diffs) == 1:
                cells.append(f"{diffs[0]:+.2f} (1)")
            else:
                cells.append(f"{statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f} ({len(diffs)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--keys", nargs="+", default=["test/acc1", "test/acc5", "test/acc1_last", "val/acc1_best",
                                                       "teacher/test_acc1"], help="results.json keys to show")
    parser.add_argument("--reach", type=float, default=None, help="also report epochs to reach this val/acc1 (%%)")
    parser.add_argument("--paired", nargs="+", default=[], metavar="ROW",
                        help="also print each row's paired per-seed difference against these rows")
    parser.add_argument("--paired-key", default=None, help="the key of the paired differences (default: first of "
                                                           "--keys)")
    args = parser.parse_args()
    groups = collect(args.runs, args.reach)
    extra = [k for k in ("train_samples",) + ((f"epochs_to_{args.reach:g}",) if args.reach is not None else ())
             if any(k in r for rs in groups.values() for r in rs)]
    args.keys = args.keys + [k for k in extra if k not in args.keys]
    if not groups:
        print("error: none of these directories holds a results.json", file=sys.stderr)
        sys.exit(2)
    print(table(groups, args.keys))
    print("\nmean ± sample standard deviation over the runs of each row (one value: the same in every run); "
          "train_samples: samples that reached the loss, summed over epochs")
    if args.paired:
        key = args.paired_key or args.keys[0]
        print("\n" + paired_table(groups, [resolve_row(groups, r) for r in args.paired], key))
        print(f"\npaired per-seed differences of {key}: row − reference on the same seed, mean ± sample standard "
              "deviation (number of seeds)")


if __name__ == "__main__":
    main()
