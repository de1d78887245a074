"""A study's summary: per row and metric, the mean ± sample sd over seeds, and the paired per-seed difference
against the reference row with its 95% t interval; written as markdown, CSV and a plot into the study folder.

`values.csv` holds every (row, seed, metric, value); the tables are computed from it alone (`summarize`), so the
generated blocks of the docs (`<!-- study:NAME -->` ... `<!-- /study:NAME -->` in README.md or docs/*.md) are
refreshed, and checked for staleness, from the committed docs/studies/<NAME>.csv. A block opened with
`<!-- study:NAME metrics=A,B -->` is the compact form the README uses: one line per row, the named metrics' mean ± sd
(`gap` names the gap column) and the first metric's paired difference against the reference; `first=N` after the
metrics keeps the study's first N rows, in the study file's order. A study with a `gap:` adds a
column computed from the same values (`gap_shares`); its metric and rows are published next to the values, in
docs/studies/<NAME>.gap.json.

Reading a run (results.json, sums over metrics.jsonl, its seed) is `read_run`; summarize.py uses it too.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import statistics
import textwrap
from pathlib import Path

from common.errors import UserError, check
from common.files import write_json, write_text_atomic
from common.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ROOT / "docs" / "studies"
BLOCK = re.compile(r"(?P<open><!-- study:(?P<name>[\w-]+)(?: metrics=(?P<metrics>[^ >]+))?"
                   r"(?: first=(?P<first>\d+))? -->\n)(?P<body>.*?)(?P<close><!-- /study:(?P=name) -->)", re.S)


# ----------------------------------------------------------------------------------------------------------------
# Reading runs
# ----------------------------------------------------------------------------------------------------------------
def read_metrics_lines(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def run_seed(run_dir: Path) -> int | None:
    """train.seed from the run's config.yaml, else the `_s<seed>` of its (or its parent's) name."""
    config = Path(run_dir) / "config.yaml"
    if config.is_file():
        import yaml
        seed = ((yaml.safe_load(config.read_text()) or {}).get("train") or {}).get("seed")
        if isinstance(seed, int):
            return seed
    run_dir = Path(run_dir)
    name = run_dir.name if run_dir.name != "label_only" else run_dir.parent.name
    match = re.search(r"(?:_s|__s)(\d+)(?:__[\w-]+)?$", name)
    return int(match.group(1)) if match else None


def read_run(run_dir: Path, reach: float | None = None) -> dict:
    """results.json of a run, with its `seed`, `train_samples` (the sum of every epoch's train/samples: every
    sample that reached the loss) and, with `reach`, `epochs_to_<reach>` (first 1-based epoch with
    val/acc1 >= reach; None when never)."""
    result = json.loads((Path(run_dir) / "results.json").read_text())
    result["seed"] = run_seed(run_dir)
    lines = read_metrics_lines(run_dir)
    if lines and all("train/samples" in m for m in lines):
        result["train_samples"] = sum(m["train/samples"] for m in lines)
    if reach is not None:
        result[f"epochs_to_{reach:g}"] = epochs_to(lines, reach)
    return result


def epochs_to(lines: list[dict], reach: float) -> int | None:
    hit = [m["epoch"] + 1 for m in lines if m.get("val/acc1", -math.inf) >= reach]
    return hit[0] if hit else None


# derived metrics, by name: (results.json, metrics.jsonl lines) -> number or None
METRICS = Registry("study metric", "metrics")


@METRICS.register("train_samples", help="samples that reached the loss, summed over the run's epochs")
def train_samples(results: dict, lines: list[dict]) -> float | None:
    return sum(m["train/samples"] for m in lines) if lines and all("train/samples" in m for m in lines) else None


@METRICS.register("forgetting", help="gan_vae: change of task 0's reconstruction MSE from after task 0 to after "
                                     "task 1, in %")
def forgetting(results: dict, lines: list[dict]) -> float | None:
    before, after = results["recon_mse"][0][0], results["recon_mse"][1][0]
    return 100 * (after - before) / before


def metric_value(name: str, results: dict, lines: list[dict]) -> float | None:
    """A metric of one run: a registered derived metric, `epochs_to_<X>`, or a results.json key with optional
    indices (`recon_mse[1][0]`). UserError when the run has no such value."""
    if name in METRICS:
        return METRICS[name](results, lines)
    match = re.fullmatch(r"epochs_to_(\d+(?:\.\d+)?)", name)
    if match:
        return epochs_to(lines, float(match.group(1)))
    match = re.fullmatch(r"([^\[\]]+)((?:\[\d+\])*)", name)
    if not match or match.group(1) not in results:
        raise UserError(f"metric '{name}': not in results.json (keys: {', '.join(results)}) nor a derived metric "
                        f"({', '.join(METRICS)}, epochs_to_<X>)")
    value = results[match.group(1)]
    for index in map(int, re.findall(r"\[(\d+)\]", match.group(2))):
        value = value[index] if isinstance(value, list) and index < len(value) else None
    if value is not None and not isinstance(value, (int, float)):
        raise UserError(f"metric '{name}' is not a number in results.json: {value!r}")
    return value


def collect_values(study) -> list[dict]:
    """Every (row, seed, metric, value) of the study's finished runs of reported rows, in row and seed order."""
    out = []
    for run in study.ordered_runs():
        row = study.rows[run.row]
        if not row.report or not study.finished(run):
            continue
        results = json.loads((run.run_dir / "results.json").read_text())
        lines = read_metrics_lines(run.run_dir)
        for label, metric in study.metrics:
            out.append({"row": row.label, "seed": run.seed, "metric": label,
                        "value": metric_value(metric, results, lines),
                        "reference": run.row == study.reference})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Statistics (pure)
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Gap:
    """A study's `gap:`: the column of the share of the gap between a lower-bound and an upper-bound row on one
    metric that each row closes. Metric and rows as the values name them (the metric's name, the rows' labels)."""
    metric: str
    lower: str
    upper: str

    @property
    def column(self) -> str:
        return f"gap closed on {self.metric}, {self.lower} → {self.upper} (%)"


def per_seed(values: list[dict], row: str, metric: str) -> dict[int, float]:
    """{seed: value} of one row and metric; a seed without a value (None) is left out."""
    return {v["seed"]: v["value"] for v in values
            if v["row"] == row and v["metric"] == metric and v["value"] is not None}


def gap_shares(values: list[dict], metric: str, lower: str, upper: str) -> dict[str, dict[int, float]]:
    """Per row (first-seen order) and seed s where the row, `lower` and `upper` all have a value of `metric`: the
    share of the lower -> upper gap that the row closes, in percent,

        share_s = 100 · (L_s − X_s) / (L_s − U_s)

    with X_s, L_s, U_s the row's, the lower row's and the upper row's value on seed s: 0 for the lower row, 100 for
    the upper row, below 0 beyond the lower bound, above 100 beyond the upper. A seed with L_s = U_s has no share
    (left out; `gap_ties` names them)."""
    low, up = per_seed(values, lower, metric), per_seed(values, upper, metric)
    return {row: {s: 100 * (low[s] - x) / (low[s] - up[s]) + 0.0  # + 0.0: the lower row's -0.0 (L < U) reads 0
                  for s, x in per_seed(values, row, metric).items() if s in low and s in up and low[s] != up[s]}
            for row in dict.fromkeys(v["row"] for v in values)}


def gap_ties(values: list[dict], metric: str, lower: str, upper: str) -> list[int]:
    """The seeds on which the lower and the upper row have the same value of `metric` (no gap to close)."""
    low, up = per_seed(values, lower, metric), per_seed(values, upper, metric)
    return sorted(s for s in low if s in up and low[s] == up[s])


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for one value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def paired_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float | None, float | None,
                                                                          float | None]:
    """Paired differences d_s = row(s) - reference(s) over seeds s: (mean, sd, low, high) with the two-sided t
    interval mean ± t_{(1+level)/2, n-1} · sd / sqrt(n); sd and the interval are None for one pair."""
    mean, sd = mean_sd(diffs)
    if sd is None:
        return mean, None, None, None
    from scipy import stats
    half = stats.t.ppf((1 + level) / 2, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return mean, sd, mean - half, mean + half


def summarize(values: list[dict], gap: Gap | None = None) -> list[dict]:
    """Per row and metric (in first-seen order): n, mean, sd, the per-seed values, and against the reference row
    (same metric, seeds both have): the paired mean difference, its sd, 95% t interval and number of pairs. With a
    gap, last per row: the gap's column as a metric (`gap` true), mean and sd of its per-seed shares, no
    difference."""
    rows = list(dict.fromkeys(v["row"] for v in values))
    metrics = list(dict.fromkeys(v["metric"] for v in values))
    reference = next((v["row"] for v in values if v["reference"]), None)
    shares_of = {} if gap is None else gap_shares(values, gap.metric, gap.lower, gap.upper)
    table = []
    for row in rows:
        for metric in metrics:
            mine = per_seed(values, row, metric)  # without the seeds of no value (epochs_to_X never reached)
            ref = per_seed(values, reference, metric)
            seeds_of_row = sorted({v["seed"] for v in values if v["row"] == row})
            entry = {"row": row, "metric": metric, "n": len(mine), "seeds": seeds_of_row, "mean": None, "sd": None,
                     "per_seed": mine, "diff_mean": None, "diff_sd": None, "ci_low": None, "ci_high": None,
                     "pairs": 0, "reference": reference, "gap": False}
            if mine:
                entry["mean"], entry["sd"] = mean_sd(list(mine.values()))
            seeds = sorted(set(mine) & set(ref))
            if row != reference and seeds:
                diffs = [mine[s] - ref[s] for s in seeds]
                entry["diff_mean"], entry["diff_sd"], entry["ci_low"], entry["ci_high"] = paired_interval(diffs)
                entry["pairs"] = len(seeds)
            table.append(entry)
        if gap is not None:
            shares = shares_of[row]
            entry = {"row": row, "metric": gap.column, "n": len(shares), "seeds": seeds_of_row, "mean": None,
                     "sd": None, "per_seed": shares, "diff_mean": None, "diff_sd": None, "ci_low": None,
                     "ci_high": None, "pairs": 0, "reference": reference, "gap": True}
            if shares:
                entry["mean"], entry["sd"] = mean_sd(list(shares.values()))
            table.append(entry)
    return table


# ----------------------------------------------------------------------------------------------------------------
# Output: values.csv, summary.csv, summary.md, summary.png
# ----------------------------------------------------------------------------------------------------------------
VALUE_FIELDS = ("row", "seed", "metric", "value", "reference")
SUMMARY_FIELDS = ("row", "metric", "n", "mean", "sd", "diff_mean", "diff_sd", "ci_low", "ci_high", "pairs",
                  "reference")


def values_csv(values: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, VALUE_FIELDS, lineterminator="\n")
    writer.writeheader()
    for v in values:
        writer.writerow({**v, "value": "" if v["value"] is None else repr(v["value"]),
                         "reference": int(v["reference"])})
    return out.getvalue()


def read_values_csv(text: str) -> list[dict]:
    def number(s: str):
        return None if s == "" else (int(s) if re.fullmatch(r"-?\d+", s) else float(s))
    return [{"row": r["row"], "seed": int(r["seed"]), "metric": r["metric"], "value": number(r["value"]),
             "reference": r["reference"] == "1"} for r in csv.DictReader(io.StringIO(text))]


def summary_csv(table: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, SUMMARY_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for entry in table:
        writer.writerow({k: ("" if entry[k] is None else entry[k]) for k in SUMMARY_FIELDS})
    return out.getvalue()


def _decimals(values: list[float]) -> int:
    """Three significant digits of the largest value, at least 2 decimals (0.01099 -> 5, 77.4 -> 2)."""
    top = max((abs(v) for v in values if v), default=1.0)
    return max(2, 2 - math.floor(math.log10(top)))


def _number(x: float, decimals: int, sign: bool = False) -> str:
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 100):
        return f"{int(x):+,}" if sign else f"{int(x):,}"
    return f"{x:+.{decimals}f}" if sign else f"{x:.{decimals}f}"


def _mean_sd_cell(e: dict, decimals: int) -> str:
    """A summary entry's "mean ± sd" (the mean alone for one seed or the same value on every seed), with "(n of N)"
    when some seeds have no value (e.g. never reached X)."""
    if e["mean"] is None:
        return "-"
    missing = f" ({e['n']} of {len(e['seeds'])})" if e["n"] < len(e["seeds"]) else ""
    if e["sd"] is None or e["sd"] == 0:
        return _number(e["mean"], decimals) + missing
    return f"{_number(e['mean'], decimals)} ± {_number(e['sd'], decimals)}{missing}"


def _difference_cell(e: dict, decimals: int, is_reference: bool) -> str:
    """A summary entry's paired difference against the reference: "mean [95% CI]", "(1 pair)", "(every pair)" when
    every pair differs by the same amount, "-" for the reference row or no pair."""
    if is_reference or e["diff_mean"] is None:
        return "-"
    mean = _number(e["diff_mean"], decimals, True)
    if e["ci_low"] is None:
        return f"{mean} (1 pair)"
    if e["diff_sd"] == 0:
        return f"{mean} (every pair)"
    return f"{mean} [{_number(e['ci_low'], decimals, True)}, {_number(e['ci_high'], decimals, True)}]"


def markdown_table(table: list[dict]) -> str:
    """One line per row: each metric's mean ± sd (n seeds), and its paired difference against the reference with
    the 95% t interval. A pure function of summarize's table."""
    rows = list(dict.fromkeys(e["row"] for e in table))
    metrics = list(dict.fromkeys(e["metric"] for e in table))
    gaps = {e["metric"] for e in table if e.get("gap")}  # a gap's column has no difference against the reference
    reference = table[0]["reference"] if table else None
    cell = {(e["row"], e["metric"]): e for e in table}
    decimals = {m: _decimals([e["mean"] for e in table if e["metric"] == m and e["mean"] is not None])
                for m in metrics}
    head = ["row", "seeds"] + [x for m in metrics
                               for x in ((m,) if m in gaps else (m, f"Δ {m} vs {reference} [95% CI]"))]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        seeds = cell[(row, metrics[0])]["seeds"]
        cells = [row, ", ".join(map(str, seeds))]
        for m in metrics:
            e, d = cell[(row, m)], decimals[m]
            cells.append(_mean_sd_cell(e, d))
            if m not in gaps:  # a gap's column has no difference against the reference
                cells.append(_difference_cell(e, d, row == reference))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(values: list[dict], study_name: str, gap: Gap | None = None) -> str:
    """The text of a generated block: the table and what its cells are."""
    table = summarize(values, gap)
    note = ("Mean ± sample sd over the seeds; Δ: the paired per-seed difference against the reference row, mean [95% "
            f"t interval], from `python study.py configs/studies/{study_name}.yaml` (values: "
            f"docs/studies/{study_name}.csv).")
    paragraphs = [note] + ([] if gap is None else [gap_note(values, gap).strip()])
    # prose lines of at most 120 characters (tests/test_docs.py), never broken inside a word or a path
    return markdown_table(table) + "\n" + "\n".join(
        textwrap.fill(x, 120, break_long_words=False, break_on_hyphens=False) for x in paragraphs) + "\n"


def markdown_compact(values: list[dict], study_name: str, metrics: list[str], gap: Gap | None = None,
                     first: int | None = None) -> str:
    """The README's form of a study's table: one line per row, the mean ± sd of each of `metrics` (the values'
    metric names; `gap` for the gap column), then the first metric's paired difference against the reference with
    its 95% t interval; with `first`, only the first that many rows (the note says how many there are). A metric
    the values do not hold is a UserError naming the ones they do."""
    table = summarize(values, gap)
    known = list(dict.fromkeys(e["metric"] for e in table if not e["gap"]))
    names = [gap.column if (m == "gap" and gap is not None) else m for m in metrics]
    wrong = [m for m, n in zip(metrics, names) if n not in known and not (gap is not None and n == gap.column)]
    if wrong:
        raise UserError(f"a <!-- study:{study_name} metrics=... --> block names {', '.join(wrong)}, which "
                        f"docs/studies/{study_name}.csv does not hold; it holds {', '.join(known)}"
                        + (", and gap" if gap is not None else ""))
    cell = {(e["row"], e["metric"]): e for e in table}
    rows = list(dict.fromkeys(e["row"] for e in table))
    every = len(rows)
    if first is not None:
        check(first >= 1, f"a <!-- study:{study_name} ... first={first} --> block keeps no row; use first=1 or more")
        rows = rows[:first]
    reference = table[0]["reference"] if table else None
    decimals = {n: _decimals([e["mean"] for e in table if e["metric"] == n and e["mean"] is not None]) for n in names}
    first = names[0]
    head = ["row", *names, f"Δ {first} vs {reference} [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row] + [_mean_sd_cell(cell[(row, n)], decimals[n]) for n in names]
        cells.append(_difference_cell(cell[(row, first)], decimals[first], row == reference))
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({v["seed"] for v in values})
    shown = f"The first {len(rows)} of {every} rows; mean" if len(rows) < every else "Mean"
    return ("\n".join(lines) + f"\n\n{shown} ± sd over seeds {', '.join(map(str, seeds))} (values: "
            f"docs/studies/{study_name}.csv),\nfrom `python study.py configs/studies/{study_name}.yaml`.\n")


def gap_note(values: list[dict], gap: Gap) -> str:
    """What the gap column is, and the seeds or rows it has no share of, if any."""
    note = (f"\n{gap.column}: per seed s, 100·(L_s − X_s)/(L_s − U_s), with X_s, L_s and U_s the row's, "
            f"{gap.lower}'s and {gap.upper}'s {gap.metric} on seed s (0: {gap.lower}, 100: {gap.upper}).")
    for row in (gap.lower, gap.upper):
        if not per_seed(values, row, gap.metric):
            note += f" No share on any seed: {row} has no value of {gap.metric}."
    ties = gap_ties(values, gap.metric, gap.lower, gap.upper)
    if ties:
        note += (f" Seed{'s' if len(ties) > 1 else ''} {', '.join(map(str, ties))} left out: {gap.lower} and "
                 f"{gap.upper} have the same {gap.metric} there, no gap to close.")
    return note


def plot(table: list[dict], path: Path) -> None:
    """One panel per metric: one point per seed, the mean and its 95% t interval, per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats
    rows = list(dict.fromkeys(e["row"] for e in table))
    metrics = list(dict.fromkeys(e["metric"] for e in table))
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4, 0.9 * len(rows) + 1) * len(metrics), 3.6),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for x, row in enumerate(rows):
            e = next(e for e in table if e["row"] == row and e["metric"] == metric)
            values = list(e["per_seed"].values())
            if not values:
                continue
            offsets = [(i - (len(values) - 1) / 2) * 0.08 for i in range(len(values))]
            ax.scatter([x + o for o in offsets], values, s=14, color="tab:blue", alpha=0.7, zorder=2)
            if e["sd"] is not None:
                half = stats.t.ppf(0.975, len(values) - 1) * e["sd"] / math.sqrt(len(values))
                ax.errorbar(x + 0.25, e["mean"], yerr=half, fmt="o", color="black", capsize=3, zorder=3)
            else:
                ax.plot(x + 0.25, e["mean"], "o", color="black")
        ax.set_xticks(range(len(rows)), rows, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("points: seeds; black: mean and 95% t interval", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gap_values(values: list[dict], gap: Gap) -> list[dict]:
    """The per-seed shares of `gap_shares` as values (metric: the gap's column), for gap.csv."""
    reference = {v["row"]: v["reference"] for v in values}
    return [{"row": row, "seed": seed, "metric": gap.column, "value": share, "reference": reference[row]}
            for row, shares in gap_shares(values, gap.metric, gap.lower, gap.upper).items()
            for seed, share in shares.items()]


def write_summary(study) -> list[dict]:
    """values.csv, summary.csv, summary.md and summary.png in the study folder, from its finished runs; with a gap,
    its per-seed shares in gap.csv."""
    values = collect_values(study)
    if not values:
        return []
    table = summarize(values, study.gap)
    study.folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(study.folder / "values.csv", values_csv(values))
    if study.gap is not None:
        write_text_atomic(study.folder / "gap.csv", values_csv(gap_values(values, study.gap)))
    else:
        (study.folder / "gap.csv").unlink(missing_ok=True)  # of an earlier version of the study file
    write_text_atomic(study.folder / "summary.csv", summary_csv(table))
    write_text_atomic(study.folder / "summary.md", f"# Study {study.name}\n\n"
                      + markdown(values, study.name, study.gap))
    plot(table, study.folder / "summary.png")
    return table


# ----------------------------------------------------------------------------------------------------------------
# Generated blocks of the docs
# ----------------------------------------------------------------------------------------------------------------
def doc_files(root: Path = ROOT) -> list[Path]:
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def refresh_blocks(text: str, published: Path = PUBLISHED) -> tuple[str, list[str]]:
    """`text` with every `<!-- study:NAME -->` block regenerated from published/NAME.csv; and the names."""
    names = []

    def body(match: re.Match) -> str:
        name = match.group("name")
        source = published / f"{name}.csv"
        if not source.is_file():
            raise UserError(f"a generated block names study '{name}', but {source} does not exist: publish it "
                            f"with python study.py configs/studies/{name}.yaml --publish")
        names.append(name)
        values, gap = read_values_csv(source.read_text()), read_gap(published, name)
        if match.group("first") and not match.group("metrics"):
            raise UserError(f"a <!-- study:{name} first=... --> block keeps the first rows of the compact form: name "
                            f"its metrics too, <!-- study:{name} metrics=A,B first=N -->")
        if match.group("metrics"):
            first = int(match.group("first")) if match.group("first") else None
            return match.group("open") + markdown_compact(values, name, match.group("metrics").split(","), gap,
                                                          first) + match.group("close")
        return match.group("open") + markdown(values, name, gap) + match.group("close")

    return BLOCK.sub(body, text), names


def update_docs(root: Path = ROOT, published: Path = PUBLISHED) -> list[Path]:
    """Regenerate every block in README.md and docs/*.md; the files that changed."""
    changed = []
    for path in doc_files(root):
        text = path.read_text()
        new, _ = refresh_blocks(text, published)
        if new != text:
            write_text_atomic(path, new)
            changed.append(path)
    return changed


def read_gap(published: Path, name: str) -> Gap | None:
    """The gap published with docs/studies/<name>.csv (<name>.gap.json), if the study has one."""
    path = published / f"{name}.gap.json"
    if not path.is_file():
        return None
    try:
        return Gap(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path}: not a gap ({{\"metric\", \"lower\", \"upper\"}}): {exc}; publish the study "
                        f"again") from None


def publish(study, published: Path = PUBLISHED) -> Path:
    """Copy the study's values.csv to docs/studies/<name>.csv (committed; the blocks are generated from it), and its
    gap's metric and rows to <name>.gap.json (none without a gap)."""
    source = study.folder / "values.csv"
    if not source.is_file():
        raise UserError(f"{source} does not exist: no run of the study has finished (run it first)")
    published.mkdir(parents=True, exist_ok=True)
    target = published / f"{study.name}.csv"
    write_text_atomic(target, source.read_text())
    if study.gap is not None:
        write_json(published / f"{study.name}.gap.json", dataclasses.asdict(study.gap))
    else:
        (published / f"{study.name}.gap.json").unlink(missing_ok=True)
    return target
