"""The programs a study can run, by name (a registry): how to start one, its config loader and checks, what a
finished run looks like, its progress, and which of its checkpoints a branch row may start from."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable

import yaml

from common.config import load_config
from common.registry import Registry


@dataclasses.dataclass(frozen=True)
class Program:
    """`command`: what follows `python` (a script of the repository, or -m and a module); `schema` and `validate`:
    the program's own config schema and checks (imported when first used); `finished(run_dir)`: whether the run
    has written all its results; `branch_checkpoints`: a regular expression of the checkpoint names (in
    <run>/checkpoints/, without .pt) that a new run may start from (run.resume=<path>)."""
    command: tuple[str, ...]
    schema: Callable[[], type]
    validate: Callable[[Any], None]
    finished: Callable[[Path], bool]
    branch_checkpoints: str

    def load(self, config_files: list[str], overrides: list[str]):
        """The run's config through the program's own loader and checks (UserError on a refused key or value)."""
        cfg = load_config(self.schema(), config_files, overrides)
        self.validate(cfg)
        return cfg


PROGRAMS = Registry("study program", "program")


def _results(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "results.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:  # being written (atomic writes make this rare) or damaged: not finished
        return None


def results_written(run_dir: Path) -> bool:
    """train_student.py and train_student_rl.py write results.json once, at the end of the run."""
    return _results(run_dir) is not None


def every_task_done(run_dir: Path) -> bool:
    """gan_vae.continual rewrites results.json after every task: finished when it has done all of the config's."""
    results, config = _results(run_dir), Path(run_dir) / "config.yaml"
    if results is None or not config.is_file():
        return False
    tasks = ((yaml.safe_load(config.read_text()) or {}).get("data") or {}).get("tasks") or []
    return results.get("tasks_done") == len(tasks)


def _kd_schema():
    from engine.schema import Config
    return Config


def _kd_validate(cfg) -> None:
    from engine.schema import validate
    validate(cfg)


def _rl_schema():
    from engine.rl_schema import RLConfig
    return RLConfig


def _rl_validate(cfg) -> None:
    from engine.rl_schema import validate_rl
    validate_rl(cfg)


def _gan_vae_schema():
    from gan_vae.continual import ContinualConfig
    return ContinualConfig


def _gan_vae_validate(cfg) -> None:
    from gan_vae.continual import validate
    validate(cfg)


PROGRAMS.register("train_student", help="train_student.py: distil a teacher into a student")(
    Program(("train_student.py",), _kd_schema, _kd_validate, results_written, r"last|best"))
PROGRAMS.register("train_student_rl", help="train_student_rl.py: KD with a curriculum chosen by an agent")(
    Program(("train_student_rl.py",), _rl_schema, _rl_validate, results_written, r"last|best"))
PROGRAMS.register("gan_vae", help="python -m gan_vae.continual: continual teacher-student generative learning")(
    Program(("-m", "gan_vae.continual"), _gan_vae_schema, _gan_vae_validate, every_task_done,
            r"task_\d+(_teacher)?|last"))


def progress(run_dir: Path) -> str:
    """Where a run stands, from the last line of its metrics.jsonl: 'epoch N' (1-based) or 'task T <phase> step S'
    (gan_vae); '' before its first line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return ""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    try:
        last = json.loads(lines[-1]) if lines else {}
    except ValueError:
        return ""
    if "task" in last and "phase" in last:
        return f"task {last['task']} {last['phase']} step {last.get('step')}"
    if "epoch" in last:
        return f"epoch {last['epoch'] + 1}"
    return ""


def checkpoint_name_ok(program: Program, name: str) -> bool:
    return re.fullmatch(program.branch_checkpoints, name) is not None
