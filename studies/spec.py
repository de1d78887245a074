"""The study file (configs/studies/<name>.yaml) and the runs it makes, checked before anything is submitted.

    program: train_student              # studies.programs.PROGRAMS: train_student, train_student_rl, gan_vae
    configs: [configs/quickstart.yaml]  # the program's --config files, in order (paths from the repository root)
    overrides: [kd.baseline=false]      # key=value for every row, before the row's own
    seeds: [0, 1, 2]                    # train.seed of each run of a row
    reference: kd                       # the row every other is paired with, seed by seed
    metrics: [test/acc1, train_samples] # results.json keys (or paths such as recon_mse[1][0]), or derived metrics
                                        # (a name, or {name: metric}: the name is the metric's in the tables)
    gap: {metric: forgetting, lower: noreplay, upper: oracle}   # optional (here a gan_vae study's): the column
                                        # "gap closed on <metric>, <lower> → <upper> (%)", per row the mean ± sd
                                        # over seeds s of 100·(L_s − X_s)/(L_s − U_s), X, L, U: the row's, the lower
                                        # and the upper row's value; metric: a name in metrics; lower, upper: two
                                        # reported rows (the table names them by label)
    resources: {threads: 1, gpus: 0, nodes: 1, time_min: 60}   # per run; a row may set its own
    slurm: {partition: gpu, account: lab}                      # defaults of --executor slurm
    rows:
      kd: [kd.method=kd]                # name: overrides
      dkd:                              # or name: a mapping
        overrides: [kd.method=dkd]
        configs: [...]                  # instead of the study's configs
        seeds: [0]                      # instead of the study's seeds
        after: {row: kd, checkpoint: last}   # start from that row's run (same seed) checkpoint, with that
                                             # row's overrides, then this row's own; without `checkpoint`,
                                             # only wait for that run to finish
        label: "DKD (Zhao et al.)"      # the row's name in the tables
        program: train_student          # instead of the study's (e.g. a teacher the other rows distil from)
        report: false                   # leave the row out of the summary (e.g. a teacher the others need)
        resources: {threads: 2}

Every run is the program with the configs, the study's and the row's overrides (a branch row's: its parent's,
then its own), then train.seed=<seed> run.out_dir=<study folder>/runs run.name=<row>_s<seed>; each row is loaded
and checked with the program's own config loader (load_config and its validate) here, once per row (the other
seeds' train.seed against its range). Anything wrong (an unknown key, a row `after:` names that does not exist, a
cycle of `after:`, an override the program refuses) is a UserError: `error: ...`, exit 2, nothing submitted. So
is a `gap:` with another key, a metric not in metrics, a row that is not a reported row of the study, or lower =
upper.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import yaml

from common.config import schema_ranges
from common.errors import UserError, user_error_message
from studies.programs import PROGRAMS, Program, checkpoint_name_ok
from studies.summary import Gap

ROOT = Path(__file__).resolve().parent.parent
STUDY_KEYS = ("program", "configs", "overrides", "seeds", "reference", "metrics", "resources", "slurm", "rows",
              "description", "gap")
ROW_KEYS = ("program", "overrides", "configs", "seeds", "after", "label", "report", "resources")
AFTER_KEYS = ("row", "checkpoint")
SLURM_KEYS = ("partition", "account", "qos", "constraint", "signal_delay_s", "setup")
GAP_KEYS = ("metric", "lower", "upper")


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one run asks for: CPU threads (OMP_NUM_THREADS; cores per task on SLURM), GPUs per node (one DDP
    task per GPU), nodes, and its time limit in minutes (SLURM --time; the local executor sets none)."""
    threads: int = 1
    gpus: int = 0
    nodes: int = 1
    time_min: int = 60

    @property
    def tasks_per_node(self) -> int:
        return max(1, self.gpus)


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    program_name: str
    program: Program
    label: str
    configs: tuple[str, ...]
    overrides: tuple[str, ...]
    seeds: tuple[int, ...]
    after: str | None
    checkpoint: str | None
    report: bool
    resources: Resources


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of a study: its row and seed, the program's arguments, where it writes, and what it waits for
    (`parent`, a run of the `after:` row) or starts from (`branch`, that run's checkpoint)."""
    name: str
    row: str
    seed: int
    command: tuple[str, ...]
    args: tuple[str, ...]
    run_dir: Path
    log: Path
    parent: str | None
    branch: Path | None
    resources: Resources
    digest: str


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    path: Path
    digest: str
    program_name: str
    program: Program
    rows: dict[str, Row]  # each with its program (the study's, unless the row names another)
    reference: str
    metrics: tuple[tuple[str, str], ...]  # (label, metric)
    gap: Gap | None  # the gap column, its rows by label (as the values name them)
    slurm: dict
    folder: Path
    runs: dict[str, PlannedRun]

    def finished(self, run: PlannedRun) -> bool:
        return self.rows[run.row].program.finished(run.run_dir)

    def ordered_runs(self) -> list[PlannedRun]:
        """Every run after the run it waits for (rows in `after:` order, seeds in order)."""
        order: list[PlannedRun] = []
        for row in _row_order(self.rows):
            order += [r for r in self.runs.values() if r.row == row]
        return order


def run_name(row: str, seed: int) -> str:
    return f"{row}_s{seed}"


def _fail(path: Path, message: str) -> UserError:
    return UserError(f"study file {path}: {message}")


def _strings(value, what: str, path: Path) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, f"{what} must be a list of strings, got {value!r}")
    return tuple(value)


def _seeds(value, what: str, path: Path) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and s >= 0 for s in value):
        raise _fail(path, f"{what} must be a non-empty list of seeds (integers >= 0), got {value!r}")
    if len(set(value)) != len(value):
        raise _fail(path, f"{what} lists a seed twice: {value}")
    return tuple(value)


def _unknown(keys, allowed, where: str, path: Path) -> None:
    unknown = [k for k in keys if k not in allowed]
    if unknown:
        raise _fail(path, f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(str, unknown))} {where}; "
                          f"the keys are {', '.join(allowed)}")


def _resources(value, base: Resources, where: str, path: Path) -> Resources:
    if value is None:
        return base
    if not isinstance(value, dict):
        raise _fail(path, f"resources {where} must be a mapping, got {value!r}")
    fields = [f.name for f in dataclasses.fields(Resources)]
    _unknown(value, fields, f"in resources {where}", path)
    for key, v in value.items():
        low = 0 if key == "gpus" else 1
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise _fail(path, f"resources.{key} {where} must be an integer >= {low}, got {v!r}")
    return dataclasses.replace(base, **value)


def _row(name, value, study: dict, path: Path) -> Row:
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise _fail(path, f"row name {name!r}: letters, digits, _ and - only (it names run directories)")
    if isinstance(value, list) or value is None:
        value = {"overrides": value or []}
    if not isinstance(value, dict):
        raise _fail(path, f"row {name}: a list of overrides or a mapping, got {value!r}")
    _unknown(value, ROW_KEYS, f"in row {name}", path)
    after = value.get("after")
    if after is not None:
        if not isinstance(after, dict) or "row" not in after:
            raise _fail(path, f"row {name}: after: takes {{row: <row>, checkpoint: <name>}}, got {after!r}")
        _unknown(after, AFTER_KEYS, f"in row {name}'s after:", path)
    report = value.get("report", True)
    if not isinstance(report, bool):
        raise _fail(path, f"row {name}: report is true or false, got {report!r}")
    configs = value["configs"] if "configs" in value else study.get("configs")
    program = value.get("program", study["program"])
    if program not in PROGRAMS:
        raise _fail(path, f"row {name}: unknown program '{program}'; one of {', '.join(PROGRAMS)}")
    return Row(name=name, program_name=program, program=PROGRAMS[program], label=str(value.get("label", name)),
               configs=_strings(configs, f"configs of row {name}", path),
               overrides=_strings(study.get("overrides"), "overrides", path)
               + _strings(value.get("overrides"), f"overrides of row {name}", path),
               seeds=_seeds(value["seeds"], f"seeds of row {name}", path) if "seeds" in value
               else _seeds(study.get("seeds"), "seeds", path),
               after=None if after is None else str(after["row"]),
               checkpoint=None if after is None or after.get("checkpoint") is None else str(after["checkpoint"]),
               report=report,
               resources=_resources(value.get("resources"), _resources(study.get("resources"), Resources(),
                                                                       "of the study", path), f"of row {name}", path))


def _inherit_overrides(rows: dict[str, Row], shared: int) -> dict[str, Row]:
    """A branch row (after: with a checkpoint) continues its parent row's run, so it runs with the parent's
    overrides (the study's, each ancestor's own) and then its own; the first `shared` of every row's overrides are
    the study's. A row that only waits (after: without a checkpoint) keeps its own."""
    out = dict(rows)
    for name in _row_order(rows):
        row = rows[name]
        if row.after is not None and row.checkpoint is not None:
            out[name] = dataclasses.replace(row, overrides=out[row.after].overrides + row.overrides[shared:])
    return out


def _row_order(rows: dict[str, Row]) -> list[str]:
    """Rows with every row after the row it names in `after:` (file order otherwise)."""
    order: list[str] = []
    for name in rows:
        chain, row = [], name
        while row is not None and row not in order:
            chain.append(row)
            row = rows[row].after
        order += reversed(chain)
    return order


def _check_after(rows: dict[str, Row], path: Path) -> None:
    for name, row in rows.items():
        if row.after is not None and row.after not in rows:
            raise _fail(path, f"row {name}: after: names row '{row.after}', which the study does not have "
                              f"(rows: {', '.join(rows)})")
    for name in rows:
        seen, row = [name], rows[name].after
        while row is not None:
            if row in seen:
                raise _fail(path, f"the rows' after: form a cycle: {' -> '.join(seen[seen.index(row):] + [row])}")
            seen.append(row)
            row = rows[row].after


def _metrics(value, path: Path) -> tuple[tuple[str, str], ...]:
    """A list of metric names, or of one-key mappings {label: metric}."""
    if not isinstance(value, list) or not value:
        raise _fail(path, f"metrics must be a non-empty list, got {value!r}")
    out = []
    for item in value:
        if isinstance(item, str):
            out.append((item, item))
        elif isinstance(item, dict) and len(item) == 1 and all(isinstance(x, str) for x in (*item, *item.values())):
            out.append(next(iter(item.items())))
        else:
            raise _fail(path, f"metrics: each is a name or {{label: metric}}, got {item!r}")
    return tuple(out)


def _gap(value, rows: dict[str, Row], metrics: tuple[tuple[str, str], ...], path: Path) -> Gap | None:
    """`gap: {metric, lower, upper}`: one of the study's metrics (by its name) and two different reported rows (by
    name); the Gap names the rows by label, as the values and tables do."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _fail(path, f"gap takes {{metric: <metric>, lower: <row>, upper: <row>}}, got {value!r}")
    _unknown(value, GAP_KEYS, "in gap", path)
    missing = [k for k in GAP_KEYS if k not in value]
    if missing:
        raise _fail(path, f"gap: missing key {', '.join(missing)} (it takes {', '.join(GAP_KEYS)})")
    wrong = [f"{k}: {value[k]!r}" for k in GAP_KEYS if not isinstance(value[k], str)]
    if wrong:
        raise _fail(path, f"gap: metric, lower and upper are names, got {', '.join(wrong)}")
    names = [name for name, _ in metrics]
    if value["metric"] not in names:
        raise _fail(path, f"gap: metric '{value['metric']}' is not one of the study's metrics ({', '.join(names)})")
    for key in ("lower", "upper"):
        if value[key] not in rows:
            raise _fail(path, f"gap: {key} '{value[key]}' is not a row (rows: {', '.join(rows)})")
        if not rows[value[key]].report:
            raise _fail(path, f"gap: {key} row '{value[key]}' has report: false, so no values to measure the gap by")
    lower, upper = rows[value["lower"]], rows[value["upper"]]
    if lower.label == upper.label:
        raise _fail(path, f"gap: lower and upper are the same row ('{lower.label}'); the gap lies between two rows")
    return Gap(metric=value["metric"], lower=lower.label, upper=upper.label)


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _config_path(name: str) -> str:
    path = Path(name)
    return str(path if path.is_absolute() else ROOT / path)


def load_study(path: str | Path, out: str | Path = "runs/studies") -> Study:
    """Read and check a study file, and plan its runs (in <out>/<file stem>/runs); UserError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no study file {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise _fail(path, f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise _fail(path, "must be a mapping of study keys")
    _unknown(data, STUDY_KEYS, "at the top level", path)
    for key in ("program", "rows", "seeds", "reference", "metrics"):
        if key not in data:
            raise _fail(path, f"missing key '{key}'")
    if not isinstance(data["rows"], dict) or not data["rows"]:
        raise _fail(path, "rows must be a non-empty mapping of row name -> overrides")
    if data["program"] not in PROGRAMS:
        raise _fail(path, f"unknown program '{data['program']}'; one of {', '.join(PROGRAMS)}")
    rows = {name: _row(name, value, data, path) for name, value in data["rows"].items()}
    _check_after(rows, path)
    rows = _inherit_overrides(rows, len(data.get("overrides") or []))
    if data["reference"] not in rows:
        raise _fail(path, f"reference '{data['reference']}' is not a row (rows: {', '.join(rows)})")
    metrics = _metrics(data["metrics"], path)
    gap = _gap(data.get("gap"), rows, metrics, path)
    slurm = data.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise _fail(path, f"slurm must be a mapping, got {slurm!r}")
    _unknown(slurm, SLURM_KEYS, "in slurm", path)
    program = PROGRAMS[data["program"]]
    folder = (Path(out) / path.stem).resolve()
    runs = _plan(rows, folder, path)
    return Study(name=path.stem, path=path, digest=file_digest(path), program_name=data["program"], program=program,
                 rows=rows, reference=data["reference"], metrics=metrics, gap=gap,
                 slurm=slurm, folder=folder, runs=runs)


def _plan(rows: dict[str, Row], folder: Path, path: Path) -> dict[str, PlannedRun]:
    runs: dict[str, PlannedRun] = {}
    for row_name in _row_order(rows):
        row = rows[row_name]
        program = row.program
        for seed in row.seeds:
            name = run_name(row_name, seed)
            parent = None
            if row.after is not None:
                parent_row = rows[row.after]
                parent_seed = seed if seed in parent_row.seeds else (
                    parent_row.seeds[0] if len(parent_row.seeds) == 1 else None)
                if parent_seed is None:
                    raise _fail(path, f"row {row_name} seed {seed}: its after: row {row.after} has no run of seed "
                                      f"{seed} (and more than one seed, so none to share)")
                parent = run_name(row.after, parent_seed)
            if row.checkpoint is not None and not checkpoint_name_ok(program, row.checkpoint):
                raise _fail(path, f"row {row_name}: after: checkpoint '{row.checkpoint}' is not a checkpoint this "
                                  f"program writes (names matching {program.branch_checkpoints})")
            branch = (folder / "runs" / parent / "checkpoints" / f"{row.checkpoint}.pt"
                      if parent is not None and row.checkpoint is not None else None)
            configs = tuple(_config_path(c) for c in row.configs)
            args = (*(a for c in configs for a in ("--config", c)), *row.overrides, f"train.seed={seed}",
                    f"run.out_dir={folder / 'runs'}", f"run.name={name}")
            try:
                if seed == row.seeds[0]:  # the whole config once per row; the other seeds differ in train.seed only
                    program.load(list(configs), [*row.overrides, f"train.seed={seed}",
                                                 f"run.out_dir={folder / 'runs'}", f"run.name={name}"])
                else:
                    check_seed(program, seed)
            except UserError as exc:
                raise _fail(path, f"row {row_name} (seed {seed}): the program refuses its config: "
                                  f"{user_error_message(exc)}") from None
            digest = run_digest(program.command, configs, args, runs[parent].digest if parent else None,
                                row.checkpoint)
            runs[name] = PlannedRun(name=name, row=row_name, seed=seed, command=program.command, args=args,
                                    run_dir=folder / "runs" / name, log=folder / "logs" / f"{name}.log",
                                    parent=parent, branch=branch, resources=row.resources, digest=digest)
    return runs


def check_seed(program: Program, seed: int) -> None:
    """train.seed's declared range, as load_config checks it."""
    valid = schema_ranges(program.schema()).get("train.seed")
    if valid is not None and not valid.contains(seed):
        raise UserError(f"train.seed={seed}: {valid.describe()}")


def run_digest(command, configs, args, parent_digest: str | None, checkpoint: str | None) -> str:
    """What decides a run's numbers: the program, its config files' contents, its arguments, and the run (and
    checkpoint) it starts from. A changed study file changes the digest of exactly the runs it changes."""
    record = {"command": list(command), "configs": {c: file_digest(Path(c)) for c in configs}, "args": list(args),
              "parent": parent_digest, "checkpoint": checkpoint}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
