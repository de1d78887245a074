"""Summarise finished runs: mean and spread of their results over seeds, as a markdown table.

    python summarize.py runs/quickstart_student_s*
    python summarize.py runs/quickstart_student_s* --keys test/acc1 test/acc1_last
    python summarize.py runs/cur_*_s* --reach 70     # plus epochs to reach 70% validation top-1

Each argument is a run directory holding results.json; a `label_only/` run inside it (from kd.baseline=true)
is summarised too. Runs whose names differ only by a trailing `_s<seed>` or `__s<seed>...` form one row.
From metrics.jsonl come `train_samples` (training samples seen over the run, when the run logged
curriculum/num_samples) and, with --reach X, `epochs_to_X` (first epoch, 1-based, with val/acc1 >= X).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path


def group_name(run_dir: Path) -> str:
    name = run_dir.name if run_dir.name != "label_only" else f"{run_dir.parent.name}/label_only"
    return re.sub(r"(_s\d+|__s\d+__[\w-]+)(?=/|$)", "", name)


def run_summary(run: Path, reach: float | None) -> dict:
    result = json.loads((run / "results.json").read_text())
    metrics_path = run / "metrics.jsonl"
    if metrics_path.is_file():
        metrics = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
        if metrics and all("curriculum/num_samples" in m for m in metrics):
            result["train_samples"] = sum(m["curriculum/num_samples"] for m in metrics)
        if reach is not None:
            hit = [m["epoch"] + 1 for m in metrics if m["val/acc1"] >= reach]
            result[f"epochs_to_{reach:g}"] = hit[0] if hit else None
    return result


def collect(paths: list[str], reach: float | None = None) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for p in map(Path, paths):
        for run in (p, p / "label_only"):
            if (run / "results.json").is_file():
                groups.setdefault(group_name(run), []).append(run_summary(run, reach))
    return groups


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
            elif len(values) == 1:
                cells.append(f"{values[0]:.2f}")
            else:
                cells.append(f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}")
        lines.append(f"| {name} | {len(results)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--keys", nargs="+", default=["test/acc1", "test/acc5", "test/acc1_last", "val/acc1_best",
                                                       "teacher/test_acc1"], help="results.json keys to show")
    parser.add_argument("--reach", type=float, default=None, help="also report epochs to reach this val/acc1 (%%)")
    args = parser.parse_args()
    groups = collect(args.runs, args.reach)
    extra = [k for k in ("train_samples",) + ((f"epochs_to_{args.reach:g}",) if args.reach is not None else ())
             if any(k in r for rs in groups.values() for r in rs)]
    args.keys = args.keys + [k for k in extra if k not in args.keys]
    if not groups:
        print("error: none of these directories holds a results.json", file=sys.stderr)
        sys.exit(2)
    print(table(groups, args.keys))
    print("\nmean ± sample standard deviation over the runs of each row")


if __name__ == "__main__":
    main()
