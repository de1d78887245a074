"""Plugins: user code imported before the config is read, so that what it registers works from the command line.

    python train_student.py run.plugins=[my_methods.py] kd.method=nkd kd.nkd.gamma=1.5
    python train_student.py run.plugins=[mypackage.kd_extras]          # an importable module

Each `run.plugins` item is a path to a `.py` file (relative to the working directory) or a dotted module name; one
item may be given without brackets (`run.plugins=my_methods.py`). Its import registers entries (common.registry)
with their config sections; the config is then composed and checked. The items come from the `--config` YAML file
and the `run.plugins=[...]` override (the override wins, as for every key). They are saved in the run's
config.yaml, so `--config <run>/config.yaml` imports them again; a resume (run.resume=auto) repeats the run's
command line, run.plugins included.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from common.errors import UserError

KEY = "run.plugins"
_loaded: dict[str, Any] = {}  # item (a resolved path or a module name) -> its module: each is imported once


def requested(config_file: str | list[str] | None, overrides: list[str]) -> list[str]:
    """The run.plugins items of YAML files (in order: a later one's value replaces an earlier one's) and key=value
    overrides, read without the schema (which they extend). Anything unreadable is left for load_config to report."""
    items: list[str] = []
    files = [config_file] if isinstance(config_file, str) else list(config_file or [])
    for path in (f for f in files if f and Path(f).is_file()):
        try:
            value = OmegaConf.select(OmegaConf.load(path), KEY)
        except Exception:  # noqa: BLE001 - load_config names the problem with the file
            value = None
        if value is not None:
            items = _as_list(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value, path)
    for item in overrides:
        if item.split("=", 1)[0].strip() == KEY and "=" in item:
            try:
                value = OmegaConf.select(OmegaConf.from_dotlist([item]), KEY)
            except Exception:  # noqa: BLE001
                continue
            items = _as_list(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value, f"'{item}'")
    return items


def _as_list(value: Any, source: str) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UserError(f"{KEY} ({source}) takes a list of module names or .py paths, e.g. {KEY}=[my_methods.py]")


def load(items: list[str]) -> list[Any]:
    """Import every item once (a .py path or a module name); UserError naming the item when it cannot be."""
    return [_load_one(item) for item in items]


def _load_one(item: str) -> Any:
    is_path = item.endswith(".py") or "/" in item or "\\" in item
    key = str(Path(item).resolve()) if is_path else item
    if key in _loaded:
        return _loaded[key]
    if is_path:
        path = Path(item)
        if not path.is_file():
            raise UserError(f"{KEY}: plugin file {item} does not exist (a path is relative to the working directory)")
        name = f"kd_plugin_{path.stem}_{hashlib.sha256(key.encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # so that its classes pickle and its dataclasses resolve their annotations
        try:
            spec.loader.exec_module(module)
        except UserError:
            sys.modules.pop(name, None)
            raise
        except Exception as exc:
            sys.modules.pop(name, None)
            raise UserError(f"{KEY}: importing plugin file {item} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(item)
        except ModuleNotFoundError as exc:
            if exc.name and item.startswith(exc.name):
                raise UserError(f"{KEY}: no module named '{item}' (give a module importable from here, or a path to "
                                "a .py file)") from None
            raise UserError(f"{KEY}: importing {item} failed: {exc}") from exc
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"{KEY}: importing {item} failed: {type(exc).__name__}: {exc}") from exc
    _loaded[key] = module
    return module
