"""Plugins: user code imported before the config is read, so that what it registers works from the command line.

    python train_student.py run.plugins=[my_methods.py] kd.method=nkd kd.nkd.gamma=1.5
    python train_student.py run.plugins=[mypackage.kd_extras]          # an importable module

Each `run.plugins` item is a path to a `.py` file (relative to the working directory) or a dotted module name; one
item may be given without brackets (`run.plugins=my_methods.py`). Its import registers entries (common.registry)
with their config sections; the config is then composed and checked. The items come from the `--config` YAML file
and the `run.plugins=[...]` override (the override wins, as for every key). They are saved in the run's
config.yaml, so `--config <run>/config.yaml` imports them again.

A run's plugins are part of the run. Each item's file is hashed (SHA-256) when it is imported, and the run records
them (`record`: run.json at its start, and every checkpoint). A resume (run.resume=auto, or a checkpoint path) and
an evaluation of a checkpoint (eval.checkpoint) whose command line names no run.plugins import the run's own
(`recorded_plugins`), from the paths it recorded, and refuse one that is gone or whose content changed; a resume that
names run.plugins must name files of the same content. Plugins are per config: what one registers is seen only by a
config that names it (common.registry.plugin_scope), never by another config loaded in the same process.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from common.errors import UserError
from common.registry import registering_for

KEY = "run.plugins"
RECORD = "plugins"  # the entry of run.json and of checkpoints that records a run's plugins (`record`)
_loaded: dict[str, Any] = {}  # item (a resolved path or a module name) -> its module: each is imported once
_records: dict[str, dict] = {}  # the same key -> {"path": the file imported, "module": a module item's name,
#                                 "sha256": the file's digest when it was imported}
_recorded_items: dict[str, str] = {}  # an item of a run imported from the path the run recorded -> that key


def requested(config_file: str | list[str] | None, overrides: list[str]) -> list[str]:
    """The run.plugins items of YAML files (in order: a later one's value replaces an earlier one's) and key=value
    overrides, read without the schema (which they extend). Anything unreadable is left for load_config to report."""
    return named(config_file, overrides) or []


def named(config_file: str | list[str] | None, overrides: list[str]) -> list[str] | None:
    """`requested`, or None when neither a file nor an override sets run.plugins at all."""
    found = raw_value(config_file, overrides, KEY)
    return None if found is None else _as_list(*found)


def raw_value(config_file: str | list[str] | None, overrides: list[str], key: str) -> tuple[Any, str] | None:
    """(value, where it was set) of a dotted key as the YAML files and then the overrides set it (the last one
    wins), read without the schema; None when none sets it. Anything unreadable is left for load_config."""
    found = None
    files = [str(f) for f in ([config_file] if isinstance(config_file, (str, Path)) else list(config_file or []))]
    for path in (f for f in files if f and Path(f).is_file()):
        try:
            value = OmegaConf.select(OmegaConf.load(path), key, default=_ABSENT)
        except Exception:  # noqa: BLE001 - load_config names the problem with the file
            value = _ABSENT
        if value is not _ABSENT:
            found = (OmegaConf.to_container(value) if OmegaConf.is_config(value) else value, path)
    for item in overrides:
        if item.split("=", 1)[0].strip() == key and "=" in item:
            try:
                value = OmegaConf.select(OmegaConf.from_dotlist([item]), key)
            except Exception:  # noqa: BLE001
                continue
            found = (OmegaConf.to_container(value) if OmegaConf.is_config(value) else value, f"'{item}'")
    return found


_ABSENT = object()


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


def key_of(item: str) -> str:
    """What identifies an item: the resolved path of a .py file, or the module name."""
    return str(Path(item).resolve()) if _is_path(item) else item


def keys(items: list[str]) -> frozenset[str]:
    """The keys of items (`key_of`): the plugin scope of a config that names them (common.registry)."""
    return frozenset(key_of(item) for item in items)


def _is_path(item: str) -> bool:
    return item.endswith(".py") or "/" in item or "\\" in item


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _load_one(item: str) -> Any:
    """Import `item` (a .py file or a module name) once, as plugin `key_of(item)`."""
    is_path = _is_path(item)
    key = key_of(item)
    if key in _loaded:
        return _loaded[key]
    if is_path:
        path = Path(item)
        if not path.is_file():
            raise UserError(f"{KEY}: plugin file {item} does not exist (a path is relative to the working directory)")
        name = f"kd_plugin_{path.stem}_{hashlib.sha256(key.encode()).hexdigest()[:8]}"
        record = {"path": str(path.resolve()), "sha256": file_sha256(path)}
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # so that its classes pickle and its dataclasses resolve their annotations
        try:
            with registering_for(key):
                spec.loader.exec_module(module)
        except UserError:
            sys.modules.pop(name, None)
            raise
        except Exception as exc:
            sys.modules.pop(name, None)
            raise UserError(f"{KEY}: importing plugin file {item} failed: {type(exc).__name__}: {exc}") from exc
    else:
        origin = _module_file(item)
        record = {"module": item, "path": origin, "sha256": file_sha256(origin) if origin else None}
        try:
            with registering_for(key):
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
    _records[key] = record
    return module


def _module_file(name: str) -> str | None:
    """The file a module name would be imported from (None when it has none, or cannot be found: the import says)."""
    try:
        spec = importlib.util.find_spec(name)
    except Exception:  # noqa: BLE001 - a missing parent package: the import names it
        return None
    origin = getattr(spec, "origin", None) if spec is not None else None
    return origin if origin and Path(origin).is_file() else None


def record(items: list[str]) -> list[dict]:
    """What a run records of its plugins (run.json and checkpoints): per item, as its config names it, the file
    imported and its SHA-256 when it was imported (so a file edited during the run is not recorded as the new one)."""
    out = []
    for item in items:
        known = _records.get(_recorded_items.get(item) or key_of(item))
        if known is None:  # imported some other way: its file as it is now
            path = str(Path(item).resolve()) if _is_path(item) else _module_file(item)
            known = {"path": path, "sha256": file_sha256(path) if path and Path(path).is_file() else None}
        out.append({"item": item, **known})
    return out


# ----------------------------------------------------------------------------------------------------------------
# The plugins of the run a command continues or evaluates
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunPlugins:
    """The plugins of a run that a command continues (`continues`: run.resume=auto) or starts from / evaluates (a
    checkpoint): `items` as its config names them, `recorded` their `record` (None for a run made before runs
    recorded it), and `source`, the file they were read from, for messages."""
    items: list[str]
    recorded: list[dict] | None
    source: str
    continues: bool


def recorded_plugins(schema: type, config_file: Any, overrides: list[str]) -> RunPlugins | None:
    """The plugins of the run that this command line continues (run.resume=auto: <run.out_dir>/<run.name>'s
    run.json, else its config.yaml), starts from (run.resume=<checkpoint>) or evaluates (eval.checkpoint=<file>: a
    checkpoint's own record, or for a weights file the run directory it lies in); None when it does none of these
    or the run cannot be read (the program names what is wrong then)."""
    resume = raw_value(config_file, overrides, "run.resume")
    resume = resume[0] if resume is not None else ""
    if resume == "auto":
        name = raw_value(config_file, overrides, "run.name")
        out_dir = raw_value(config_file, overrides, "run.out_dir")
        out_dir = out_dir[0] if out_dir is not None else _default(schema, "run.out_dir")
        if name is None or not name[0] or not isinstance(name[0], str) or not isinstance(out_dir, str):
            return None
        return of_run_dir(Path(out_dir) / name[0])
    if isinstance(resume, str) and resume:
        return _of_checkpoint(Path(resume))
    evaluated = raw_value(config_file, overrides, "eval.checkpoint")
    if evaluated is not None and isinstance(evaluated[0], str) and evaluated[0]:
        return _of_checkpoint(Path(evaluated[0]))
    return None


def _default(schema: type, key: str) -> Any:
    value: Any = schema
    for part in key.split("."):
        fields = {f.name: f for f in dataclasses.fields(value)} if dataclasses.is_dataclass(value) else {}
        if part not in fields:
            return None
        f = fields[part]
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return value


def of_run_dir(run_dir: Path, continues: bool = True) -> RunPlugins | None:
    """The plugins of the run in `run_dir`: its run.json's record, else (an older run) its config.yaml's items."""
    record_file, config_file = run_dir / "run.json", run_dir / "config.yaml"
    try:
        recorded = json.loads(record_file.read_text()).get(RECORD) if record_file.is_file() else None
    except (OSError, ValueError, AttributeError):
        recorded = None  # the program names a damaged run.json
    if _is_record(recorded):
        return RunPlugins([r["item"] for r in recorded], recorded, str(record_file), continues)
    try:
        saved = OmegaConf.to_container(OmegaConf.load(config_file)) if config_file.is_file() else None
        items = saved["run"].get("plugins") or []
    except Exception:  # noqa: BLE001 - no config, or a damaged one: the program names it
        return None
    return RunPlugins(_as_list(items, str(config_file)), None, str(config_file), continues)


def _of_checkpoint(path: Path) -> RunPlugins | None:
    if not path.is_file():
        return None
    try:
        import torch
        ckpt = None if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=False,
                                                                      mmap=True)
    except Exception:  # noqa: BLE001 - not a torch checkpoint: the program names what is wrong with it
        return None
    if not isinstance(ckpt, dict):  # weights alone (student.safetensors): the run directory they lie in
        return of_run_dir(path.parent, continues=False)
    recorded = ckpt.get(RECORD)
    if _is_record(recorded):
        return RunPlugins([r["item"] for r in recorded], recorded, str(path), continues=False)
    config = ckpt.get("config")
    items = config.get("run", {}).get("plugins") if isinstance(config, dict) else None
    return RunPlugins(_as_list(items or [], str(path)), None, str(path), continues=False) if items else None


def _is_record(recorded: Any) -> bool:
    """Whether `recorded` is what `record` writes (anything else is read as no record)."""
    return isinstance(recorded, list) and all(isinstance(r, dict) and isinstance(r.get("item"), str)
                                              and isinstance(r.get("path") or r.get("module"), str) for r in recorded)


def load_recorded(run: RunPlugins) -> list[Any]:
    """Import the run's own plugins from the files it recorded, refusing one that is gone or changed since."""
    if run.recorded is None:  # a run from before the record: its items as its config names them
        for item in run.items:
            if _is_path(item) and not Path(item).is_file():
                raise UserError(f"the run's plugin {item} ({KEY} in {run.source}) does not exist (a path is relative "
                                f"to the working directory): restore it, or name it with {KEY}=[<its path>]")
        return load(run.items)
    modules = []
    for rec in run.recorded:
        _check_unchanged(rec, run.source)
        modules.append(_load_one(rec.get("module") or rec["path"]))
        _recorded_items[rec["item"]] = key_of(rec.get("module") or rec["path"])
    return modules


def recorded_keys(run: RunPlugins) -> frozenset[str]:
    """The plugin keys (`key_of`) under which `load_recorded` imports the run's plugins."""
    if run.recorded is None:
        return keys(run.items)
    return frozenset(key_of(rec.get("module") or rec["path"]) for rec in run.recorded)


def _check_unchanged(rec: dict, source: str) -> None:
    path = rec.get("path")
    what = f"the run's plugin {path or rec.get('module')} ({KEY}: {rec['item']}, recorded in {source})"
    if path is None or rec.get("sha256") is None:
        return  # a module without a file of its own: nothing to compare
    if not Path(path).is_file():
        raise UserError(f"{what} no longer exists. The run's results come from its code, so it is needed to continue "
                        "or evaluate it: restore the file, or start a new run")
    now = file_sha256(path)
    if now != rec["sha256"]:
        raise UserError(f"{what} has changed since the run started (SHA-256 {rec['sha256'][:12]}… then, "
                        f"{now[:12]}… now): continuing or evaluating the run with other code would mix two versions "
                        "in one set of results. Restore the file as it was, or start a new run")


def check_same_as_recorded(run: RunPlugins, items: list[str]) -> None:
    """A resume that names run.plugins itself must name files of the same content as the run's own (after `load`)."""
    if run.recorded is None:
        return
    named_paths = {r["path"] for r in record(items) if r.get("path")}
    for rec in run.recorded:
        if rec.get("path") in named_paths:
            _check_unchanged(rec, run.source)  # the same file, edited: named as such
    before = sorted(r.get("sha256") or r["item"] for r in run.recorded)
    now = sorted(r.get("sha256") or r["item"] for r in record(items))
    if before != now:
        listed = ", ".join(r["path"] or r["item"] for r in run.recorded) or "none"
        raise UserError(f"{KEY}={json.dumps(items)} is not what the run was made with ({listed}, recorded in "
                        f"{run.source}): continuing it with other plugins would mix two sets of code in one set of "
                        f"results. Leave {KEY} out (the run's own are imported), or start a new run")
