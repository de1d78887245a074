"""Shared plumbing for every script: config, errors, run directory, checkpoints, distributed set-up, logging.

Nothing here knows about distillation. `train_student.py`, `train_student_rl.py` and `gan_vae/` all build on it:

    cfg = parse_config(TrainConfig, argv, prog="train_student.py", doc=__doc__)   # defaults < --config < a.b=c
    dist = setup_distributed()                # no process group unless launched by torchrun (RANK set)
    seed_everything(cfg.train.seed, dist.rank)
    plan = plan_run_dir(cfg.run.out_dir, cfg.run.name, cfg.run.resume, "train_student.py")  # checks, no writes
    with claim_run_dir(plan, "train_student.py", dist) as run_dir:   # created, locked, run.json written
        ...
        save_checkpoint(state, run_dir / "checkpoints" / "last.pt")   # temp file + rename
"""
from __future__ import annotations

import dataclasses
import datetime
import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as torch_dist
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


# ----------------------------------------------------------------------------------------------------------------
# Errors the user can fix: a one-paragraph message and exit code 2, never a traceback.
# ----------------------------------------------------------------------------------------------------------------
class UserError(Exception):
    """An error caused by the user's input (config, data, checkpoint). Printed as `error: <message>`, exit 2."""


def user_error_message(exc: BaseException) -> str:
    """The user-facing text of a UserError, also when a DataLoader worker re-raised it with its traceback glued on."""
    text = str(exc)
    marker = "UserError: "
    if "Traceback" in text and marker in text:  # re-raised from a worker: keep only the original message
        text = text[text.rindex(marker) + len(marker):]
    return text.strip()


def run_cli(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Run `main(argv)` as a command-line program: UserError becomes a short message and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except UserError as exc:
        end_progress_bars()
        print(f"error: {user_error_message(exc)}", file=sys.stderr)
        cleanup_distributed()
        sys.exit(2)
    except KeyboardInterrupt:
        end_progress_bars()
        print("interrupted; the last checkpoint is kept and `run.resume=auto` continues from it", file=sys.stderr)
        cleanup_distributed()
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - only torch.compile's failures are translated; the rest re-raise
        end_progress_bars()  # a traceback, too, starts on its own line
        if not is_compile_failure(exc):
            raise
        print(f"error: {compile_failure_message(exc)}", file=sys.stderr)
        cleanup_distributed()
        sys.exit(2)


def end_progress_bars() -> None:
    """Close every tqdm bar still open (the loop that raised never reached its `close`), leaving each one's last
    state on its own line: a message printed next starts on a fresh line instead of being glued onto the bar's
    (a bar redraws with a carriage return and no newline), and the bar shows where the run stopped."""
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.leave = True
        bar.close()


def is_compile_failure(exc: BaseException) -> bool:
    """Whether an exception comes from torch.compile (dynamo tracing, or the inductor backend compiling the graph:
    a missing or broken C++ / CUDA compiler, an unsupported operation). Only a run with train.compile=true can
    raise one."""
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:  # a torch without dynamo
        return False
    return isinstance(exc, TorchDynamoException) or type(exc).__name__ in ("CppCompileError", "CUDACompileError")


def compile_failure_message(exc: BaseException) -> str:
    """What failed, in a line, and the way out."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = lines[0][:300] if lines else ""
    return (f"torch.compile failed (train.compile=true): {type(exc).__name__}: {detail}. Nothing of this epoch "
            "was saved; checkpoints of earlier epochs are kept. train.compile=false trains the same model eagerly "
            "(a run stopped here continues with run.resume=auto train.compile=false)")


# ----------------------------------------------------------------------------------------------------------------
# Config: dataclass schema -> OmegaConf structured config. Defaults < YAML (--config) < dotted overrides.
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of a numeric or categorical config key, declared once beside the key (`opt(..., ge=0)`).
    `check_ranges` checks every key of a loaded config against its Range before any work; `--help` and the README
    table show `describe()`. Bounds: ge (>=), gt (>), le (<=), lt (<). `choices`: the allowed values; a registry
    (a dict from name to component) counts as its keys when the check runs, so an entry registered later is
    accepted. A float is also refused when NaN or infinite, unless `allow_inf` (NaN never passes). For a list, every
    number in it is checked. `why`: what a bad value would do, added to the error message."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: Any = None
    allow_inf: bool = False
    why: str = ""

    def describe(self) -> str:
        """"> 0", "in [0, 1)", "one of a, b" (empty: any number)."""
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        high = ("]", self.le) if self.le is not None else (")", self.lt) if self.lt is not None else None
        if low and high:
            return f"in {low[0]}{_number(low[1])}, {_number(high[1])}{high[0]}"
        if low:
            return f"{'>=' if low[0] == '[' else '>'} {_number(low[1])}"
        if high:
            return f"{'<=' if high[0] == ']' else '<'} {_number(high[1])}"
        return ""

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and not self.allow_inf)):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def opt(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,  # noqa: A002
        le: float | None = None, lt: float | None = None, choices: Any = None, allow_inf: bool = False,
        why: str = "") -> Any:
    """A config field with its one-line description (shown by --help and in the README) and, for a number or a
    name from a fixed set, its valid values (see `Range`; checked by `check_ranges` when the config is loaded).
    "help" reads best at the call site."""
    metadata: dict[str, Any] = {"help": help}
    if any(v is not None for v in (ge, gt, le, lt, choices)) or allow_inf:
        metadata["range"] = Range(ge, gt, le, lt, choices, allow_inf, why)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type) -> Any:
    """A nested config section."""
    return dataclasses.field(default_factory=cls)


def run_config(script: str, tag: str, checkpoint_path: str = "or a checkpoint path") -> type:
    """The `run` section every entry point shares (out_dir, name, resume), with its --help text naming the script's
    default run name, `default_run_name(script, tag, seed)`, and what its run.resume does with a checkpoint path.
    Subclass it at module level (with more run.* keys, or none): pickle finds a config's dataclass by module and
    name, which a class made in here does not have."""

    @dataclasses.dataclass
    class RunConfig:
        out_dir: str = opt("runs", "parent directory of run directories")
        name: str = opt("", f"run directory name (default {script}__{tag}__s<seed>__<time>)")
        resume: str = opt("", f"'auto' continues <out_dir>/<name> from checkpoints/last.pt; {checkpoint_path}")

    return RunConfig


def _schema_leaves(schema: type, prefix: str = ""):
    """Yield (dotted key, dataclasses.Field, default) for every leaf field of a dataclass schema."""
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
            yield from _schema_leaves(f.type, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            yield from _schema_leaves(type(default), key + ".")
            continue
        yield key, f, default


def iter_schema(schema: type, prefix: str = ""):
    """Yield (dotted key, type name, default, help) for every leaf field of a dataclass schema."""
    for key, f, default in _schema_leaves(schema, prefix):
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        yield key, type_name, default, f.metadata.get("help", "")


def schema_ranges(schema: type) -> dict[str, Range]:
    """Dotted key -> its declared Range, for every leaf of the schema that declares one."""
    return {key: f.metadata["range"] for key, f, _ in _schema_leaves(schema) if "range" in f.metadata}


def _numbers_in(value: Any) -> list:
    """The numbers of a value: itself, or every number in a (nested) list. Booleans are not numbers here."""
    if isinstance(value, (list, tuple, ListConfig)):
        return [x for item in value for x in _numbers_in(item)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def range_error(key: str, value: Any, valid: Range | None) -> str | None:
    """The message for `key=value` when the value is outside `valid` (or is a NaN or infinite float, which no key
    takes unless its Range allows infinity); None when it is fine."""
    if valid is not None and valid.choices is not None:
        if value in valid.choices:
            return None
        options = ", ".join(str(c) for c in valid.choices)
        if isinstance(value, str):
            return f"unknown {key} '{value}'; choose one of {options}"
        return f"{key}={value} must be one of {options}"
    valid = valid or Range()
    plain = to_plain(value) if isinstance(value, ListConfig) else value
    numbers = _numbers_in(plain)
    bad = [x for x in numbers if not valid.contains(x)]
    if not bad:
        return None
    wanted = valid.describe()
    non_finite = isinstance(bad[0], float) and not math.isfinite(bad[0])
    verb = "be a finite number" if non_finite else "lie" if wanted.startswith("in ") else "be"
    wanted = f"{verb} {wanted}".rstrip()
    why = f": {valid.why}" if valid.why else ""
    if isinstance(plain, list):
        return f"{key}={plain}: every number in it must {wanted} ({bad[0]} is not){why}"
    return f"{key}={bad[0]} must {wanted}{why}"


def check_ranges(cfg: DictConfig, schema: type | None = None) -> None:
    """Refuse, with a UserError naming the key, the first value of `cfg` outside its key's declared Range, and any
    NaN or infinite float. Runs when a config is loaded (and again in the scripts' validate, for a config changed
    in code): every section is checked, also those of components (KD methods, agents) the run does not select, so
    that a bad value fails at once, not late in a run. `schema`: the config's dataclass (by default its own)."""
    schema = schema or OmegaConf.get_type(cfg)
    for key, f, _ in _schema_leaves(schema):
        message = range_error(key, OmegaConf.select(cfg, key), f.metadata.get("range"))
        if message is not None:
            raise UserError(message)


def _restore_yaml_booleans(cfg: DictConfig, schema: type) -> None:
    """YAML 1.1 reads a bare off / no / false as a boolean, which a string key stores as "False" (on / yes / true:
    "True"): `train.amp=off` arrives as "False". A key with choices gets back the one choice that was meant."""
    words = {"False": ("off", "no", "false"), "True": ("on", "yes", "true")}
    for key, valid in schema_ranges(schema).items():
        value = OmegaConf.select(cfg, key)
        if valid.choices is None or not isinstance(value, str) or value not in words or value in valid.choices:
            continue
        meant = [c for c in valid.choices if c in words[value]]
        if len(meant) == 1:
            OmegaConf.update(cfg, key, meant[0])


def config_help(schema: type, prog: str, doc: str | None) -> str:
    lines = [(doc or "").strip(), "", f"usage: {prog} [--config FILE.yaml] [key=value ...]", "",
             "Values come from the defaults below, then --config FILE.yaml, then key=value overrides.",
             "", "keys (type, valid values = default: description); a float is never NaN or infinite:"]
    ranges = schema_ranges(schema)
    for key, type_name, default, text in iter_schema(schema):
        valid = ranges[key].describe() if key in ranges else ""
        lines.append(f"  {key} ({type_name}{', ' + valid if valid else ''}) = {json.dumps(default)}\n      {text}")
    return "\n".join(lines)


def config_markdown(schema: type, base: type | None = None) -> str:
    """The configuration reference as a markdown table (pasted into the README; a test keeps them in sync).
    With `base`, only the keys the schema adds to it."""
    skip = {key for key, *_ in iter_schema(base)} if base is not None else set()
    ranges = schema_ranges(schema)
    rows = ["| key | type | valid values | default | meaning |", "|---|---|---|---|---|"]
    for key, type_name, default, text in iter_schema(schema):
        if key in skip:
            continue
        valid = ranges[key].describe() if key in ranges else ""
        valid, text = (s.replace("<", "\\<").replace("|", "\\|") for s in (valid, text))  # <split>: an HTML tag
        rows.append(f"| `{key}` | {type_name} | {valid} | `{json.dumps(default)}` | {text} |")
    return "\n".join(rows)


def _flow(value: Any) -> str:
    """A value as written on the command line and in YAML flow style: kd, 4.0, true, [0.5, 0.9], \"\"."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if value != "" else '""'


def _check_sections(cfg: DictConfig, incoming: Any, source: str, prefix: str = "") -> None:
    """Refuse a single value (or a list, or null) given to a whole section, e.g. `kd=3` or `kd: 3` in a YAML file,
    naming the section and a key inside it (OmegaConf's own error names no key)."""
    if not isinstance(incoming, dict):
        return
    for name, value in incoming.items():
        if not isinstance(name, str) or name not in cfg:
            continue  # an unknown key: the merge names it
        path = f"{prefix}{name}"
        if not isinstance(cfg[name], DictConfig):
            if isinstance(value, dict) and not isinstance(cfg[name], ListConfig):
                raise UserError(f"'{path}' is a key, not a section, so it cannot hold keys ({source}): give it "
                                f"one value, e.g. {path}={_flow(OmegaConf.to_container(cfg, resolve=False)[name])}")
            continue  # a leaf: the merge checks its type
        if isinstance(value, dict):
            _check_sections(cfg[name], value, source, path + ".")
            continue
        keys = OmegaConf.to_container(cfg[name], resolve=False)
        leaf = next((k for k, v in keys.items() if not isinstance(v, dict)), next(iter(keys)))
        example = _flow(keys[leaf]) if not isinstance(keys[leaf], dict) else "..."
        nested = f"{leaf}: {example}"
        for part in reversed(path.split(".")):
            nested = f"{part}: {{{nested}}}"
        raise UserError(f"'{path}' is a section of the config, not a key, so it cannot take the value "
                        f"{json.dumps(value)} ({source}): set the keys inside it, e.g. {path}.{leaf}={example} "
                        f"(in a YAML file: `{nested}`); run with --help to list the keys of {path}")


def _config_error(exc: OmegaConfBaseException, source: str) -> UserError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0]
    if "not in" in msg or "Key '" in msg and "not" in msg:
        return UserError(f"unknown config key '{key}' ({source}); run with --help to list every key")
    return UserError(f"bad value for config key '{key}' ({source}): {msg}")


def load_config(schema: type, config_file: str | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Build the config: schema defaults, then the YAML file, then dotted `key=value` overrides.

    Unknown keys, values of the wrong type and values outside a key's declared range (`opt(..., ge=0)`, see
    `check_ranges`) raise UserError naming the key, before the caller does any work."""
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    if config_file is not None:
        path = Path(config_file)
        if not str(config_file):
            raise UserError("--config needs a YAML file")
        if path.is_dir():
            raise UserError(f"config file {path} is a directory; --config takes a YAML file, e.g. a run's "
                            "config.yaml")
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as exc:  # yaml errors have many types
            detail = " ".join(str(exc).split())
            if "Invalid loaded object type" in detail:  # OmegaConf's word for a top-level number or boolean
                raise UserError(f"config file {path} holds a single value at its top level; it must map config "
                                "keys to values, e.g. `kd: {temperature: 2}`, one key per line") from None
            raise UserError(f"config file {path} is not valid YAML: {detail}") from None
        # A file whose top level is a list or a scalar cannot be merged into the keys; an empty file (or one of
        # comments only) is almost always the wrong file, so it is named rather than silently ignored.
        if not isinstance(file_cfg, DictConfig):
            raise UserError(f"config file {path} holds a list at its top level; it must map config keys to values, "
                            "e.g. `kd: {temperature: 2}`, one key per line")
        if len(file_cfg) == 0:
            raise UserError(f"config file {path} is empty: write config keys and values in it (e.g. "
                            "`kd: {temperature: 2}`), or leave out --config to use the defaults")
        _check_sections(cfg, OmegaConf.to_container(file_cfg, resolve=False), f"in {path}")
        try:
            cfg = OmegaConf.merge(cfg, file_cfg)
        except OmegaConfBaseException as exc:
            raise _config_error(exc, f"in {path}") from None
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"cannot parse argument '{item}': overrides look like key=value, e.g. kd.temperature=2")
        try:
            incoming = OmegaConf.from_dotlist([item])
            _check_sections(cfg, OmegaConf.to_container(incoming, resolve=False), f"override '{item}'")
            cfg = OmegaConf.merge(cfg, incoming)
        except OmegaConfBaseException as exc:
            raise _config_error(exc, f"override '{item}'") from None
    _restore_yaml_booleans(cfg, schema)
    check_ranges(cfg, schema)
    return cfg


def parse_config(schema: type, argv: list[str], prog: str, doc: str | None = None) -> DictConfig:
    """Command-line front end of `load_config`: handles --help, --config FILE and key=value overrides."""
    if any(a in ("-h", "--help") for a in argv):
        print(config_help(schema, prog, doc))
        sys.exit(0)
    config_file, overrides, it = None, [], iter(argv)
    for arg in it:
        if arg == "--config":
            config_file = next(it, None)
            if config_file is None:
                raise UserError("--config needs a YAML file")
        elif arg.startswith("--config="):
            config_file = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise UserError(f"unknown option '{arg}'; options are --help and --config FILE, the rest is key=value")
        else:
            overrides.append(arg)
    return load_config(schema, config_file, overrides)


def check(condition: bool, message: str) -> None:
    """Validate a config value: raise UserError(message) when the condition does not hold."""
    if not condition:
        raise UserError(message)


def to_plain(cfg: DictConfig | ListConfig) -> Any:
    return OmegaConf.to_container(cfg, resolve=True)


# ----------------------------------------------------------------------------------------------------------------
# Distributed: one code path for `python script.py` (no process group) and `torchrun` (RANK in the environment).
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistInfo:
    """Initialise DDP when launched by torchrun (NCCL on GPU, gloo on CPU); otherwise a single process, no group."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if "RANK" not in os.environ:
        return DistInfo(device=torch.device("cuda" if want_cuda else "cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if want_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not torch_dist.is_initialized():
        # device_id binds NCCL's communicator to this rank's GPU up front (no guess at the first barrier)
        torch_dist.init_process_group(backend="nccl" if want_cuda else "gloo",
                                      timeout=datetime.timedelta(minutes=60), device_id=dev if want_cuda else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def cleanup_distributed() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def _dist_on() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def barrier() -> None:
    if _dist_on():
        torch_dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks, in place; a no-op in a single process."""
    if _dist_on():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s value of a picklable object, on every rank."""
    if not _dist_on():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers into every rank's module (a no-op in a single process)."""
    if _dist_on():
        for tensor in module.state_dict().values():
            torch_dist.broadcast(tensor, src=src)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's value of a picklable object, in rank order."""
    if not _dist_on():
        return [obj]
    out: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (BatchNorm running statistics) into every rank's module; a no-op in a single
    process. DDP broadcasts buffers only at the start of a training forward, so after an epoch each rank still holds
    the statistics its own last batch left: call this before any evaluation of the unwrapped model."""
    if _dist_on():
        for tensor in module.buffers():
            torch_dist.broadcast(tensor, src=src)


# Test instrumentation: with KD_TRACE_DIR=<folder> in the environment, every rank appends what it applied (the
# curriculum decision and selection of each epoch, digests of the weights it evaluates with, of the RNG states it
# saved and restored) to <folder>/<kind>.rank<r>.jsonl, so a test can compare ranks. Off (one lookup) otherwise.
TRACE_ENV = "KD_TRACE_DIR"


def trace_dir() -> Path | None:
    value = os.environ.get(TRACE_ENV, "")
    return Path(value) if value else None


def trace(kind: str, record: dict) -> None:
    """Append `record` to <KD_TRACE_DIR>/<kind>.rank<r>.jsonl; nothing without KD_TRACE_DIR."""
    folder = trace_dir()
    if folder is None:
        return
    rank = torch_dist.get_rank() if _dist_on() else 0
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{kind}.rank{rank}.jsonl", "a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")


def state_digest(obj: Any) -> str:
    """SHA-256 (16 hex digits) of nested dicts, lists and tuples of tensors, arrays and scalars: equal digests mean
    equal dtypes, shapes and bytes (used to compare weights and RNG states across ranks)."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, dict):
            for key in sorted(x, key=str):
                h.update(f"<{key}>".encode())
                feed(x[key])
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for item in x:
                feed(item)
            h.update(b"]")
        elif isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, np.ndarray):
            h.update(f"{x.dtype}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        else:
            h.update(repr(x).encode())

    feed(obj)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Seeds and RNG state.
# ----------------------------------------------------------------------------------------------------------------
def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch; each rank gets its own stream (seed + rank)."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this process's device only: a resume may see another number of devices
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda_device" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_device"])


@contextmanager
def rng_isolated() -> Iterator[None]:
    """Run the block without moving any random stream of the caller: Python's, NumPy's global, torch's CPU and this
    process's CUDA device's states are saved on entry and restored on exit (exceptions included).

    For steps that may or may not run (a teacher cache or pre-decoded copy built now or reused, a randomly
    initialised teacher, a latency probe, a difficulty refresh): whatever they draw (a DataLoader's base seed, a
    layer's init) must not shift training's draws, or a run that reuses a cache would not reproduce the run that
    built it. torch.random.fork_rng covers torch only."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


# ----------------------------------------------------------------------------------------------------------------
# Run directory.
# ----------------------------------------------------------------------------------------------------------------
def default_run_name(script: str, tag: str, seed: int) -> str:
    return f"{script}__{tag}__s{seed}__{time.strftime('%Y%m%d-%H%M%S')}"


def run_name(run_cfg, default: Callable[[], str]) -> str:
    """run.name, or `default()` (a new timestamped name) when it is empty; run.resume=auto needs the name of the run
    it continues, since a new name would never hold one."""
    if run_cfg.name:
        return run_cfg.name
    if run_cfg.resume == "auto":
        raise UserError(f"run.resume=auto continues the run named by run.name, which is empty: set run.name to the "
                        f"run's directory name (a folder of run.out_dir={run_cfg.out_dir})")
    return default()


def on_main_rank(fn: Callable[[], Any], dist: DistInfo | None = None) -> Any:
    """Run `fn()` on the main rank only and give its return value to every rank. A UserError it raises is raised
    on every rank, so no rank is left waiting at a barrier for a rank that stopped."""
    dist = dist or DistInfo()
    outcome: tuple[str, Any] = ("ok", None)
    if dist.is_main:
        try:
            outcome = ("ok", fn())
        except UserError as exc:
            outcome = ("error", str(exc))
    outcome = broadcast_object(outcome)
    if outcome[0] == "error":
        raise UserError(outcome[1])
    return outcome[1]


def make_dirs(dirs: dict[str, Path | str], dist: DistInfo | None = None, probe: bool = False) -> None:
    """Create each directory (parents included) on the main rank. One that cannot be created (a parent is a
    regular file, no permission, a read-only filesystem) stops every rank with a UserError naming its config key,
    before anything is computed. With `probe`, a file is also written and removed in each, which catches an
    existing directory that cannot be written."""
    def create() -> None:
        for key, folder in dirs.items():
            folder = Path(folder)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                if probe:
                    test = folder / f".write-test-{os.getpid()}"
                    test.write_bytes(b"")
                    test.unlink()
            except OSError as exc:
                raise UserError(f"cannot write to {folder} ({key}): {exc.strerror or exc}. Set {key} to a folder "
                                "this user can create and write") from None
    on_main_rank(create, dist)


# A run directory records the program that made it (run.json), and is locked (run.lock) by the process that writes
# it. Files it holds before its first epoch ends are written at start-up and are worth nothing on their own: a
# fresh run may take over a directory holding only these (and empty folders), and a directory this process created
# is removed again when the run stops with a UserError before it wrote anything else.
RUN_RECORD, RUN_LOCK = "run.json", "run.lock"
START_UP_FILES = frozenset({"config.yaml", RUN_RECORD, RUN_LOCK})

# Run directories and checkpoints from before run.json carry no record of their program; their config's sections
# tell (first match wins: train_student_rl.py's schema extends train_student.py's).
LEGACY_PROGRAM_SECTIONS = (("train_student_rl.py", {"curriculum", "agent"}), ("gan_vae.continual", {"fid"}),
                           ("train_student.py", {"kd", "eval"}))


def run_files(run_dir: Path) -> Iterator[Path]:
    """Every file below `run_dir` except its lock (nothing when it does not exist)."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        yield from (p for p in run_dir.rglob("*") if p != run_dir / RUN_LOCK and not p.is_dir())


def holds_results(run_dir: Path) -> bool:
    """Whether `run_dir` holds anything a run produced (a metrics line, a checkpoint, a result) beyond the
    START_UP_FILES."""
    run_dir = Path(run_dir)
    return any(p.parent != run_dir or p.name not in START_UP_FILES for p in run_files(run_dir))


def infer_program(config: Any) -> str | None:
    """The program whose config has these sections (LEGACY_PROGRAM_SECTIONS); None when none matches."""
    if not isinstance(config, dict):
        return None
    return next((program for program, sections in LEGACY_PROGRAM_SECTIONS if sections <= set(config)), None)


def read_run_record(run_dir: Path) -> dict:
    """run.json of a run directory ({} when it has none)."""
    path = Path(run_dir) / RUN_RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise UserError(f"cannot read {path} (the record of which program made the run): {exc}. Restore it, or "
                        "start a new run with another run.name") from None
    if not isinstance(record, dict):
        raise UserError(f"{path} is not the record of a run (a JSON object with a 'program' entry); restore it, or "
                        "start a new run with another run.name")
    return record


def run_program(run_dir: Path) -> str | None:
    """The program that made `run_dir`: its run.json's, or for an older run the one its config.yaml belongs to."""
    return read_run_record(run_dir).get("program") or infer_program(read_saved_config(run_dir))


def checkpoint_program(ckpt: dict) -> str | None:
    """The program that wrote a checkpoint: its own record, or for an older checkpoint the one its config belongs
    to (None for a file with neither, such as a bare state dict)."""
    return ckpt.get("program") or infer_program(ckpt.get("config"))


def check_program(made_by: str | None, program: str, what: str) -> None:
    """Refuse a run directory or checkpoint (`what`) that another program made: its config and state have sections
    this program lacks or reads differently, and continuing it here would drop them (and rewrite config.yaml
    without them). None (unknown) passes."""
    if made_by is None or made_by == program:
        return
    raise UserError(f"{what} was made by another script, {made_by}; {program} cannot continue it or start from it "
                    f"(it would drop or misread what {made_by} saved, and rewrite config.yaml without it). Continue "
                    f"it with {made_by}, or start a new {program} run: another run.name and no run.resume")


def require_entries(ckpt: dict, keys: tuple[str, ...], path: Path | str, program: str) -> None:
    """A UserError naming the first of `keys` the checkpoint lacks: it is not a training checkpoint of `program`."""
    missing = [key for key in keys if key not in ckpt]
    if missing:
        raise UserError(f"{path} is not a training checkpoint of {program} (no '{missing[0]}' entry"
                        f"{f', nor {len(missing) - 1} more' if len(missing) > 1 else ''}); resume from the "
                        "checkpoints/last.pt of one of its runs")


@dataclasses.dataclass
class RunPlan:
    """Where a run goes and what it starts from, decided and checked before anything is written (`plan_run_dir`).

    checkpoint: what to load (None: a fresh run, or a run stopped before its first checkpoint, restarted);
    continues: the directory's own run goes on (run.resume=auto, or a checkpoint inside the directory), as opposed
    to a new run, which may start from another run's checkpoint (recorded in its run.json);
    stamp: the checkpoint's (mtime, size) when planned, compared again once the directory is locked."""
    run_dir: Path
    checkpoint: Path | None
    continues: bool
    stamp: tuple[int, int] | None = None


def _stamp(path: Path | None) -> tuple[int, int] | None:
    if path is None or not path.is_file():
        return None
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def plan_run_dir(out_dir: str, name: str, resume: str, program: str | None = None,
                 restart_without_checkpoint: bool = False, dist: DistInfo | None = None) -> RunPlan:
    """Check where `<out_dir>/<name>/` stands against `resume` and what to resume from; nothing is written.

    `resume` is "" (fresh run: the directory must hold no run's results, so nothing is overwritten), "auto"
    (continue from `checkpoints/last.pt`) or a checkpoint path. A path inside the directory continues its run from
    that checkpoint; any other path starts a NEW run from it, so the directory must hold no run yet (continuing one
    run from another's checkpoint would splice the two). A run directory that `program` did not make is refused
    (None skips that check).

    With `resume="auto"` and no `last.pt`: when the run directory holds a run and `restart_without_checkpoint` is
    set, the run stopped before its first checkpoint, so the plan's checkpoint is None and the caller starts it from
    the beginning (reusing what it finished, such as a teacher cache, and re-doing any epoch it logged); otherwise
    that is an error ("nothing to resume"). Callers that set it must drop the metrics lines a restarted run logged
    before."""
    run_dir = Path(out_dir) / name
    if resume == "auto":
        ckpt: Path | None = run_dir / "checkpoints" / "last.pt"
        if not ckpt.is_file():
            if not (restart_without_checkpoint and any(run_files(run_dir))):
                raise UserError(f"run.resume=auto but {ckpt} does not exist: nothing to resume. "
                                "Check run.out_dir and run.name, or drop run.resume to start a new run")
            ckpt = None
            if (dist or DistInfo()).is_main:
                print(f"run.resume=auto: {run_dir} has no checkpoint yet (it stopped before its first epoch "
                      "ended); starting it from the beginning")
        if program is not None:
            check_program(run_program(run_dir), program, f"the run directory {run_dir}")
        return RunPlan(run_dir, ckpt, True, _stamp(ckpt))
    if resume:
        ckpt = Path(resume)
        if ckpt.is_dir():
            raise UserError(f"run.resume={resume} is a directory: give a checkpoint file in it (e.g. "
                            f"{ckpt / 'checkpoints' / 'last.pt'}), or continue a run with run.name=<its directory> "
                            "run.resume=auto")
        if not ckpt.is_file():
            raise UserError(f"run.resume={resume}: no such checkpoint file")
        if run_dir.resolve() in ckpt.resolve().parents:  # one of the run's own checkpoints
            if program is not None:
                check_program(run_program(run_dir), program, f"the run directory {run_dir}")
            return RunPlan(run_dir, ckpt, True, _stamp(ckpt))
        if holds_results(run_dir):
            raise UserError(f"run.resume={resume} starts a new run from that checkpoint, but {run_dir} already holds "
                            "a run: continuing it from another run's checkpoint would splice two runs into one "
                            "directory (its epochs, checkpoints and config.yaml replaced). Give the new run another "
                            "run.name (empty: a new timestamped one), or continue that run with run.resume=auto")
        return RunPlan(run_dir, ckpt, False, _stamp(ckpt))
    if holds_results(run_dir):
        raise UserError(f"{run_dir} already holds a run. Continue it with run.resume=auto, "
                        "or pick another run.name so nothing is overwritten")
    return RunPlan(run_dir, None, False)


def _check_plan_still_holds(plan: RunPlan) -> None:
    """Under the lock: nothing changed since `plan_run_dir` looked (another process could have written meanwhile)."""
    if not plan.continues and holds_results(plan.run_dir):
        raise UserError(f"{plan.run_dir} already holds a run (another process started it just now). Continue it "
                        "with run.resume=auto, or pick another run.name so nothing is overwritten")
    last = plan.run_dir / "checkpoints" / "last.pt"
    if plan.continues and _stamp(plan.checkpoint or last) != plan.stamp:
        raise UserError(f"another process wrote {plan.checkpoint or last} while this one was starting; run the "
                        "command again to continue from the newest checkpoint")


def lock_run_dir(run_dir: Path) -> Any:
    """An exclusive lock on `run_dir` (its run.lock, holding our pid) for this process, or a UserError naming the
    process that holds it: two processes writing one run directory would mix their checkpoints and metrics."""
    import socket

    from filelock import FileLock, Timeout
    path = Path(run_dir) / RUN_LOCK
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = path.read_text().strip()
        except OSError:
            holder = ""
        raise UserError(f"{run_dir} is in use by another process ({holder or 'pid unknown'}, holding {path}): two "
                        "processes writing one run directory would mix their checkpoints and metrics. Wait for it "
                        "to finish (or stop it), or pick another run.name") from None
    path.write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
    return lock


@contextmanager
def claim_run_dir(plan: RunPlan, program: str, dist: DistInfo) -> Iterator[Path]:
    """Create the planned run directory (and its checkpoints/, probed for writing), lock it for as long as the
    block runs, record `program` (and the checkpoint a new run starts from) in run.json, and yield it. A UserError
    that leaves the block before the run wrote anything but its START_UP_FILES removes a directory this call
    created, so a failed start leaves no empty run behind. Only the main rank creates, locks and writes; a refusal
    reaches every rank."""
    run_dir, held = plan.run_dir, {}
    created = dist.is_main and not run_dir.exists()

    def take() -> None:
        held["lock"] = lock_run_dir(run_dir)
        _check_plan_still_holds(plan)
        if plan.continues and read_run_record(run_dir).get("program"):
            return
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if plan.continues:  # an older run, from before the record (its program was checked from its config)
            record = {"program": program, "recorded_on_resume": now}
        else:
            record = {"program": program, "started": now,
                      **({"started_from": str(plan.checkpoint.resolve())} if plan.checkpoint else {})}
        write_json(run_dir / RUN_RECORD, record)

    try:
        make_dirs({"run.out_dir": run_dir / "checkpoints"}, dist, probe=True)
        on_main_rank(take, dist)
        barrier()
        yield run_dir
    except UserError:
        if created and "lock" in held and not holds_results(run_dir):
            held.pop("lock").release()
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        if "lock" in held:
            held["lock"].release()


def prepare_run_dir(out_dir: str, name: str, resume: str, dist: DistInfo,
                    restart_without_checkpoint: bool = False) -> tuple[Path, Path | None]:
    """`plan_run_dir` (no program check), then create the directory unlocked: (run_dir, checkpoint to resume from).
    For tools and tests; the entry points claim theirs with `claim_run_dir`."""
    plan = plan_run_dir(out_dir, name, resume, None, restart_without_checkpoint, dist)
    make_dirs({"run.out_dir": plan.run_dir / "checkpoints"}, dist, probe=True)
    barrier()
    return plan.run_dir, plan.checkpoint


def read_saved_config(run_dir: Path) -> dict | None:
    """The config a run directory was started with (its config.yaml) as a plain dict; None when it has none."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:  # yaml errors have many types
        raise UserError(f"cannot read {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path} is not a run's config (a mapping of config sections); restore it, or start a new "
                        "run with another run.name")
    return saved


# Keys that never change a number a run prints: where files go, what is logged, how often. Scripts extend this.
RESUME_SAFE_KEYS = ("run.*", "log.*")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def config_differences(saved: dict, current: DictConfig | dict, allowed: tuple[str, ...] = RESUME_SAFE_KEYS
                       ) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every dotted key whose value differs, skipping keys that match a
    pattern of `allowed` (fnmatch: "log.*", "data.workers"). A key the saved config lacks (one the schema gained
    since) counts as having the schema's default; a key only the saved config has is ignored."""
    import fnmatch
    now = _flatten(to_plain(current) if isinstance(current, (DictConfig, ListConfig)) else current)
    before = _flatten(saved)
    schema = OmegaConf.get_type(current) if isinstance(current, DictConfig) else None
    defaults = ({key: default for key, _, default, _ in iter_schema(schema)}
                if schema is not None and dataclasses.is_dataclass(schema) else {})
    diffs = []
    for key, value in now.items():
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in allowed):
            continue
        old = before.get(key, defaults.get(key, "<absent>"))
        if old != value:
            diffs.append((key, old, value))
    return diffs


def check_same_config_on_all_ranks(cfg: DictConfig, allowed: tuple[str, ...] = ()) -> None:
    """At start-up of a multi-process (multi-node) launch: every rank must have been given the same config. A
    collective (all ranks call it); a no-op in a single process. Every rank raises the same UserError, naming the
    first key (in schema order) on which some rank differs from rank 0, with both values."""
    if not _dist_on():
        return
    configs = all_gather_objects(to_plain(cfg))
    for rank, other in enumerate(configs[1:], start=1):
        diffs = config_differences(configs[0], other, allowed)
        if diffs:
            key, ours, theirs = diffs[0]
            more = f" (and {len(diffs) - 1} more key(s))" if len(diffs) > 1 else ""
            raise UserError(f"the processes of this launch were given different configs: {key} = {json.dumps(ours)} "
                            f"on rank 0 but {json.dumps(theirs)} on rank {rank}{more}. Start every node with the "
                            "same --config file and the same overrides (only the torchrun flags may differ)")


def check_resume_config(saved: dict | None, current: DictConfig, source: str,
                        allowed: tuple[str, ...] = RESUME_SAFE_KEYS) -> None:
    """Refuse to continue a run with a config that would change its results: a UserError naming every key whose
    value differs from the run's (`saved`: the checkpoint's or config.yaml's config; None skips the check), with
    both values and how to start a new run instead. Keys matching `allowed` may differ."""
    if saved is None:
        return
    diffs = config_differences(saved, current, allowed)
    if not diffs:
        return
    listed = "; ".join(f"{key} = {json.dumps(old)} in the run, {json.dumps(new)} now" for key, old, new in diffs)
    safe = ", ".join(allowed)
    raise UserError(f"cannot resume from {source}: the run was made with a different config, and continuing it "
                    f"with this one would mix two configs in one set of results. Differences: {listed}. Resume "
                    f"with the run's values (only {safe} may change), or start a new run with the new values: "
                    "drop run.resume and pick a new run.name")


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def write_failure(exc: BaseException, path: Path, kept: str) -> UserError | None:
    """The UserError for a write of `path` that the disk refused (full, over quota, read-only, an I/O error), saying
    what was kept (`kept`); None when `exc` is no such failure. torch.save's zip writer may report a full disk as a
    RuntimeError of its own ("unexpected pos", "file write failed"), with the OSError only in its context, or not at
    all: then a disk with no free space left is taken to be the cause."""
    path = Path(path)
    chain = list(_exception_chain(exc))
    os_error = next((e for e in chain if isinstance(e, OSError) and e.errno), None)
    code = os_error.errno if os_error is not None else None
    if code is None and any(isinstance(e, RuntimeError) and "inline_container" in str(e) for e in chain):
        try:
            code = errno.ENOSPC if shutil.disk_usage(path.parent).free == 0 else None
        except OSError:
            code = None
    if code is None:
        return None
    if code in DISK_FULL_ERRNOS:
        what = f"the disk is full ({os.strerror(code)}) at {path.parent}"
        fix = "Free some space there (or move run.out_dir to another disk)"
    else:
        what = f"{os.strerror(code)}"
        fix = "Make that folder writable"
    return UserError(f"cannot write {path}: {what}. {kept}. {fix}, then continue the run with run.resume=auto")


@contextmanager
def atomic_write(path: Path, mode: str = "w") -> Iterator[IO]:
    """Open `<path>.tmp` for writing (mode "w" or "wb"); on a clean exit flush, fsync and rename it over `path`, so
    a reader or a crash mid-write finds the old file or the new one, never half of one (os.replace is atomic on
    POSIX). On an error the temp file is removed and `path` is left as it was; a write the disk refused (full, over
    quota, read-only) becomes a UserError saying so. The one atomic writer: checkpoints, JSON, configs, metrics and
    exported weights all go through it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        kept = (f"Nothing was replaced: the earlier {path.name} is kept" if path.exists() else
                f"Nothing was written (there was no earlier {path.name})")
        failure = write_failure(exc, path, kept)
        if failure is not None:
            raise failure from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_write(path) as fh:
        fh.write(text)


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    """The resolved config, re-runnable with --config (run.resume is cleared so a re-run starts afresh)."""
    plain = to_plain(cfg)
    if isinstance(plain.get("run"), dict) and "resume" in plain["run"]:
        plain["run"]["resume"] = ""
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(plain)))


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temp file, fsynced, renamed; loaded strictly.
# ----------------------------------------------------------------------------------------------------------------
def save_checkpoint(state: dict, path: Path) -> None:
    """Atomically write `state` with torch.save: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as fh:
        torch.save(state, fh)


def load_checkpoint(path: Path, required: tuple[str, ...] = (), program: str = "this program") -> dict:
    """A checkpoint (a dict) as torch.save wrote it, on the CPU. A file that is missing, empty, unreadable
    (truncated, or not a torch file), that holds something other than a dict (a bare tensor), or that lacks one of
    the `required` entries is a UserError naming it."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory; give a checkpoint file (such as a run's "
                        "checkpoints/last.pt or student.safetensors)")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes): its write was cut short (a full disk, a copy that "
                        "stopped). Use another checkpoint, e.g. an earlier copy or the run's best.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or foreign file: many exception types
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise UserError(f"cannot read checkpoint {path}: it is truncated or not a PyTorch checkpoint "
                        f"({type(exc).__name__}: {first})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a checkpoint (a dict with 'model', "
                        "'optimizer', ... entries, as this repository's programs save it)")
    require_entries(ckpt, required, path, program)
    return ckpt


WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile's OptimizedModule; DDP and DataParallel


def unwrap_module(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside torch.compile (`_orig_mod`) and DDP / DataParallel (`module`) wrappers, nested in
    any order."""
    while True:
        inner = getattr(module, "_orig_mod", None)
        if inner is None and isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            inner = module.module
        if inner is None:
            return module
        module = inner


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """A state dict saved through wrappers, with the prefixes they add removed: `_orig_mod.` (a torch.compile'd
    module) and `module.` (DDP), nested in any order. A prefix is removed only when every key carries it, so a
    model whose own first submodule is called `module` keeps its keys."""
    state = dict(state_dict)
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_state_strict(module: torch.nn.Module, state_dict: dict, what: str) -> None:
    """`module.load_state_dict(state_dict, strict=True)`, with a short message naming the mismatch. Weights saved
    from a compiled or DDP-wrapped model load into a plain one and the reverse (see `strip_wrapper_prefixes`)."""
    try:
        unwrap_module(module).load_state_dict(strip_wrapper_prefixes(state_dict), strict=True)
    except RuntimeError as exc:
        text = str(exc)
        missing = re.findall(r'Missing key\(s\) in state_dict: (.*?)(?:\.\s|$)', text)
        detail = text.splitlines()[1].strip() if len(text.splitlines()) > 1 else text
        hint = f" (missing: {missing[0][:200]})" if missing else ""
        raise UserError(f"{what} does not match the model built from the config: {detail[:400]}{hint}. "
                        "Was it saved from a different model or number of classes?") from None


# ----------------------------------------------------------------------------------------------------------------
# Frozen modules: a teacher, a replay generator, a copy kept as a distillation target.
# ----------------------------------------------------------------------------------------------------------------
def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (BatchNorm on its running statistics, no dropout, no spectral-norm power iteration) and no gradient
    for any parameter. Returns the module, so `freeze(copy.deepcopy(model))` keeps a fixed copy in one step."""
    module.eval()
    module.requires_grad_(False)
    return module


def unfreeze(module: torch.nn.Module) -> torch.nn.Module:
    """The inverse of `freeze`: training mode and gradients for every parameter."""
    module.train()
    module.requires_grad_(True)
    return module


# ----------------------------------------------------------------------------------------------------------------
# Metrics: one JSON line per epoch, TensorBoard behind a flag.
# ----------------------------------------------------------------------------------------------------------------
class MetricLogger:
    """Appends one JSON object per line to `metrics.jsonl` (main rank only) and mirrors scalars to TensorBoard."""

    def __init__(self, path: Path, enabled: bool, tensorboard_dir: Path | None = None):
        self.path, self.enabled, self.writer = Path(path), enabled, None
        if enabled and tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(tensorboard_dir))

    def keep_where(self, keep: Callable[[dict], bool]) -> None:
        """Rewrite the file, atomically, with only the lines whose record satisfies `keep` (each kept line as it
        was written): a resumed run drops what it logged after its checkpoint, since it logs that again. A
        half-written last line (a run stopped while writing it) is dropped too."""
        if not (self.enabled and self.path.exists()):
            return
        kept = []
        for number, line, record in jsonl_lines(self.path, announce=True):
            try:
                if keep(record):
                    kept.append(line)
            except (KeyError, TypeError, ValueError) as exc:
                raise UserError(f"{self.path} line {number} is not a record this run wrote (it lacks "
                                f"{type(exc).__name__}: {exc}), so the file was edited or damaged. Fix or remove that "
                                "line, then resume again") from None
        write_text_atomic(self.path, "".join(ln + "\n" for ln in kept))

    def truncate_after(self, epoch: int) -> None:
        """Keep only lines with `epoch` < the given one: a resumed run re-does epochs past its checkpoint."""
        self.keep_where(lambda record: record["epoch"] < epoch)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as exc:
            failure = write_failure(exc, self.path, "The lines before are kept (the last may be half-written, which "
                                                    "run.resume=auto drops), and so are the checkpoints")
            raise (failure or exc) from None
        if self.writer is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def jsonl_lines(path: Path, announce: bool = False) -> list[tuple[int, str, dict]]:
    """(line number, line, record) for every non-blank line of a JSONL file written by MetricLogger. The file is
    only ever appended to, so a last line that does not parse was cut off by a kill or a full disk: it is dropped
    (with a note when `announce`). Any other line that is not a JSON object means damage: a UserError naming the
    file and the line."""
    lines = [(n, ln) for n, ln in enumerate(Path(path).read_text(errors="replace").splitlines(), start=1)
             if ln.strip("\x00 \t")]
    out = []
    for i, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError as exc:
            record, detail = None, str(exc)
        else:
            detail = f"a JSON {type(record).__name__}, not an object"
        if isinstance(record, dict):
            out.append((number, line, record))
        elif i == len(lines) - 1:
            if announce:
                print(f"note: dropped the half-written last line ({number}) of {path}: the run was stopped while "
                      "writing it, and logs that epoch again", file=sys.stderr)
        else:
            raise UserError(f"{path} line {number} is damaged ({detail}); only the last line of this append-only "
                            "file can be half-written (by a kill), so the file was edited or corrupted. Fix or remove "
                            "that line, then run again")
    return out


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL metrics file (see `jsonl_lines`: a half-written last line is left out)."""
    return [record for _, _, record in jsonl_lines(path)]


def plot_curves(records: list[dict], path: Path, panels: list[tuple[str, list[str]]]) -> None:
    """One PNG with a panel per (title, [metric keys]) against epoch; keys absent from the records are skipped."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    epochs = [r["epoch"] + 1 for r in records]
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            if any(key in r for r in records):
                ax.plot(epochs, [r.get(key, float("nan")) for r in records], marker="o", ms=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
