"""Summarise finished runs: mean and spread of their results over seeds, as a markdown table.

    python summarize.py runs/quickstart_student_s*
    python summarize.py runs/quickstart_student_s* --keys test/acc1 test/acc1_last

Each argument is a run directory holding results.json; a `label_only/` run inside it (from kd.baseline=true)
is summarised too. Runs whose names differ only by a trailing `_s<seed>` or `__s<seed>...` form one row.
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


def collect(paths: list[str]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for p in map(Path, paths):
        for run in (p, p / "label_only"):
            if (run / "results.json").is_file():
                groups.setdefault(group_name(run), []).append(json.loads((run / "results.json").read_text()))
    return groups


def table(groups: dict[str, list[dict]], keys: list[str]) -> str:
    lines = ["| runs | n | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name, results in groups.items():
        cells = []
        for key in keys:
            values = [r[key] for r in results if isinstance(r.get(key), (int, float))]
            if not values:
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
    args = parser.parse_args()
    groups = collect(args.runs)
    if not groups:
        print("error: none of these directories holds a results.json", file=sys.stderr)
        sys.exit(2)
    print(table(groups, args.keys))
    print("\nmean ± sample standard deviation over the runs of each row")


if __name__ == "__main__":
    main()
