"""Config schemas and loading: `opt`/`section` declare keys with defaults, help and ranges; `load_config` merges
defaults < --config YAML < dotted overrides; `--help` and the docs tables are generated from the schema;
resume checks compare a run's saved config with the current one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common import plugins
from common.distributed import _dist_on, all_gather_objects
from common.errors import UserError
from common.registry import Registry, compose_schema, plugin_scope, registries_of, schema_plugins


# ----------------------------------------------------------------------------------------------------------------
# Config: dataclass schema -> OmegaConf structured config. Defaults < YAML (--config) < dotted overrides.
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of a numeric or categorical config key, declared once beside the key (`opt(..., ge=0)`).
    `check_ranges` checks every key of a loaded config against its Range before any work; `--help` and the docs
    table show `describe()`. Bounds: ge (>=), gt (>), le (<=), lt (<). `choices`: the allowed values; a Registry
    (common.registry) counts as the names it holds when the check runs, so an entry registered later (by a plugin)
    is accepted, and --help lists the entries with their help. A float is also refused when NaN or infinite, unless
    `allow_inf` (NaN never passes). For a list, every number in it is checked. `why`: what a bad value would do,
    added to the error message."""
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


_NOT_GIVEN = object()


def opt(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,  # noqa: A002
        le: float | None = None, lt: float | None = None, choices: Any = None, allow_inf: bool = False,
        why: str = "", before: Any = _NOT_GIVEN) -> Any:
    """A config field with its one-line description (shown by --help and in the docs) and, for a number or a
    name from a fixed set, its valid values (see `Range`; checked by `check_ranges` when the config is loaded).
    "help" reads best at the call site.

    `before`: for a key added after runs were saved, or whose default changed, the value those runs had (what the
    code did before). A resume compares a saved config that lacks the key as having this value, and names it when a
    saved value equals it (`config_differences`, `check_resume_config`): the one record of changed defaults, for
    every program."""
    metadata: dict[str, Any] = {"help": help}
    if before is not _NOT_GIVEN:
        metadata["before"] = before
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
        plugins: list[str] = opt([], "modules or .py files imported before the config is read: KD methods, agents, "
                                     "strategies or losses they register (with their own keys) work like built-in ones "
                                     "(common/plugins.py)")

    return RunConfig


def _schema_leaves(schema: type, prefix: str = ""):
    """Yield (dotted key, dataclasses.Field, default) for every leaf field of a dataclass schema, composed with the
    sections of what the registries hold now (common.registry.compose_schema)."""
    if not prefix:
        schema = compose_schema(schema)
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


def registry_choices(valid: Range | None) -> str:
    """For a key that selects a registry entry (`opt(..., choices=REGISTRY)`): "name: help; ..." of what the registry
    holds now, built-in and plugin entries alike ("" for any other key). --help and the docs list it."""
    return valid.choices.describe() if valid is not None and isinstance(valid.choices, Registry) else ""


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
            own = " (an entry of your own is registered from a file named by run.plugins)" \
                if isinstance(valid.choices, Registry) else ""
            return f"unknown {key} '{value}'; choose one of {options}{own}"
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
    with _own_plugins(schema):
        for key, f, _ in _schema_leaves(schema):
            message = range_error(key, OmegaConf.select(cfg, key), f.metadata.get("range"))
            if message is not None:
                raise UserError(message)


def _own_plugins(schema: type):
    """The plugin scope of a schema (common.registry.plugin_scope): a registry key accepts the built-in entries and
    those of the config's own plugins, not those another config loaded in this process imported."""
    return plugin_scope(schema_plugins(compose_schema(schema)) or frozenset())


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
    lines = [(doc or "").strip(), "", f"usage: {prog} [--config FILE.yaml ...] [key=value ...]", "",
             "Values come from the defaults below, then each --config FILE.yaml in order, then key=value overrides.",
             "", "keys (type, valid values = default: description); a float is never NaN or infinite:"]
    with _own_plugins(schema):
        _help_keys(schema, lines)
    return "\n".join(lines)


def _help_keys(schema: type, lines: list[str]) -> None:
    ranges = schema_ranges(schema)
    for key, type_name, default, text in iter_schema(schema):
        valid = ranges[key].describe() if key in ranges else ""
        lines.append(f"  {key} ({type_name}{', ' + valid if valid else ''}) = {json.dumps(default)}\n      {text}")
        entries = registry_choices(ranges.get(key))
        if entries:
            lines.append(f"      {key} choices: {entries}")


def config_markdown(schema: type, base: type | None = None) -> str:
    """The configuration reference as a markdown table (pasted into the docs; a test keeps them in sync).
    With `base`, only the keys the schema adds to it."""
    skip = {key for key, *_ in iter_schema(base)} if base is not None else set()
    ranges = schema_ranges(schema)
    rows = ["| key | type | valid values | default | meaning |", "|---|---|---|---|---|"]
    for key, type_name, default, text in iter_schema(schema):
        if key in skip:
            continue
        valid = ranges[key].describe() if key in ranges else ""
        entries = registry_choices(ranges.get(key))
        text = f"{text}. Choices: {entries}" if entries else text
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
            if isinstance(value, dict):
                what = "a list" if isinstance(cfg[name], ListConfig) else "one value"
                raise UserError(f"'{path}' is a key, not a section, so it cannot hold keys ({source}): give it "
                                f"{what}, e.g. {path}={_flow(OmegaConf.to_container(cfg, resolve=False)[name])}")
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


def _check_interpolations(cfg: DictConfig) -> None:
    """Resolve every `${...}` of the merged config once, so that one that cannot be resolved (a key that does not
    exist, a circular reference, an unset `${oc.env:...}`, a value of the wrong type for its key) is a UserError
    naming the key as written, before the range check reads the values. The config keeps its interpolations."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        written = _flatten(OmegaConf.to_container(cfg, resolve=False)).get(key, "?")
        detail = " ".join(str(exc).split("\n")[0].split())
        raise UserError(f"config key '{key}' = {written} cannot be resolved: {detail}. An interpolation ${{a.b}} "
                        "takes the value of the key a.b, which must exist, must not lead back to this key, and must "
                        "have this key's type; ${oc.env:NAME} needs the environment variable NAME set (or a default: "
                        "${oc.env:NAME,default})") from None


def _config_error(exc: OmegaConfBaseException, source: str) -> UserError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0]
    if "not in" in msg or "Key '" in msg and "not" in msg:
        return UserError(f"unknown config key '{key}' ({source}); run with --help to list every key")
    return UserError(f"bad value for config key '{key}' ({source}): {msg}")


def _read_config_file(config_file: str) -> tuple[DictConfig, Path]:
    """The --config YAML file as a DictConfig of keys, or a UserError saying what is wrong with it."""
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
    return file_cfg, path


def _one_plugin_as_list(incoming: DictConfig) -> None:
    """`run.plugins=my_methods.py` (one item, not a list) means `run.plugins=[my_methods.py]`, and `run.plugins=`
    (empty or null) none, as common.plugins reads them."""
    section_name, key = plugins.KEY.split(".")
    run = incoming.get(section_name) if isinstance(incoming, DictConfig) else None
    if not isinstance(run, DictConfig) or key not in run:
        return  # absent, or a value given to the whole section (_check_sections names it)
    value = run[key]
    if value is None or isinstance(value, str):
        run[key] = [value] if value else []


def load_config(schema: type, config_file: str | Path | list[str | Path] | None = None,
                overrides: list[str] | None = None) -> DictConfig:
    """Build the config: schema defaults, then the YAML file (or files, in order: a later one overrides an earlier
    one's keys, e.g. a data config and then a KD preset of configs/methods/), then dotted `key=value` overrides.

    Unknown keys, values of the wrong type and values outside a key's declared range (`opt(..., ge=0)`, see
    `check_ranges`) raise UserError naming the key, before the caller does any work. The plugins that the file or
    the overrides name (run.plugins) are imported first, or, for a command that continues a run, starts from its
    checkpoint or evaluates one without naming any, the run's own (`load_plugins`); the schema gets the config
    sections of the built-in registry entries and of these plugins' entries alone (common.registry.compose_schema,
    plugin_scope): what another config's plugins registered is no part of this one."""
    files = [config_file] if isinstance(config_file, (str, Path)) else list(config_file or [])
    own, implied = load_plugins(schema, files, overrides or [])
    with plugin_scope(own):
        cfg = _load_config(compose_schema(schema), files, overrides)
    if implied is not None:  # the run's own plugins, imported for it: the config names them, as the run's did
        cfg.run.plugins = implied
    return cfg


def load_plugins(schema: type, files: list, overrides: list[str]) -> tuple[frozenset[str], list[str] | None]:
    """Import the config's plugins (common.plugins): (their keys, the config's plugin scope; the run's items when
    they were imported for it, else None). A command that continues a run, starts from its checkpoint or evaluates
    one, and names no run.plugins, gets the run's own (checked to be there and unchanged); one that continues a run
    (run.resume=auto) and names them must name files of the same content."""
    named = plugins.named(files, overrides)
    run = plugins.recorded_plugins(schema, files, overrides)
    if run is not None and named is None and run.items:
        plugins.load_recorded(run)
        return plugins.recorded_keys(run), list(run.items)
    items = named or []
    plugins.load(items)
    if run is not None and run.continues:
        plugins.check_same_as_recorded(run, items)
    return plugins.keys(items), None


def _load_config(schema: type, files: list, overrides: list[str] | None) -> DictConfig:
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    for config_file in files:
        file_cfg, path = _read_config_file(config_file)
        _one_plugin_as_list(file_cfg)
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
            _one_plugin_as_list(incoming)
            _check_sections(cfg, OmegaConf.to_container(incoming, resolve=False), f"override '{item}'")
            cfg = OmegaConf.merge(cfg, incoming)
        except OmegaConfBaseException as exc:
            raise _config_error(exc, f"override '{item}'") from None
    _check_interpolations(cfg)
    _restore_yaml_booleans(cfg, schema)
    check_ranges(cfg, schema)
    check_unread_keys(cfg)
    return cfg


def parse_config(schema: type, argv: list[str], prog: str, doc: str | None = None) -> DictConfig:
    """Command-line front end of `load_config`: handles --help, --config FILE (repeatable: merged in order) and
    key=value overrides."""
    config_files, overrides, it = [], [], iter(argv)
    for arg in it:
        if arg == "--config":
            config_file = next(it, None)
            if config_file is None:
                raise UserError("--config needs a YAML file")
            config_files.append(config_file)
        elif arg.startswith("--config="):
            config_files.append(arg.split("=", 1)[1])
        elif arg in ("-h", "--help"):
            continue
        elif arg.startswith("-"):
            raise UserError(f"unknown option '{arg}'; options are --help and --config FILE, the rest is key=value")
        else:
            overrides.append(arg)
    if any(a in ("-h", "--help") for a in argv):  # after the plugins that the arguments name: --help lists theirs too
        with plugin_scope(load_plugins(schema, config_files, overrides)[0]):
            print(config_help(compose_schema(schema), prog, doc))
        sys.exit(0)
    return load_config(schema, config_files, overrides)


def to_plain(cfg: DictConfig | ListConfig) -> Any:
    return OmegaConf.to_container(cfg, resolve=True)


# Keys that never change a number a run prints: where files go, what is logged, how often. Scripts extend this.
RESUME_SAFE_KEYS = ("run.*", "log.*")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def unread_keys(cfg: DictConfig) -> dict[str, tuple[Registry, str]]:
    """The keys that the components a config selects do not read, each with the registry (common.registry) and the
    entry that makes it unread: the registry's `shared` keys that its selected entry does not declare in `reads`
    (kd.alpha under kd.method=dkd), and the keys of the other entries' sections (kd.dist.beta under kd.method=dkd).
    Empty for a config without such registries (or a plain dict)."""
    schema = OmegaConf.get_type(cfg) if isinstance(cfg, DictConfig) else None
    if schema is None or not dataclasses.is_dataclass(schema):
        return {}
    leaves = [key for key, *_ in _schema_leaves(schema)]
    out: dict[str, tuple[Registry, str]] = {}
    for registry in registries_of(compose_schema(schema)):
        if registry.key not in leaves:
            continue  # not chosen by one config key (gan_vae's student losses: each term has its weight)
        name = OmegaConf.select(cfg, registry.key)
        if name not in registry:
            continue  # check_ranges names it
        reads = registry.reads(cfg, name)
        out.update({key: (registry, name) for key in registry.shared if key not in reads})
        prefix = f"{registry.sections}." if registry.sections else None
        for key in leaves if prefix else ():
            owner, _, rest = key.removeprefix(prefix).partition(".")
            if key.startswith(prefix) and rest and owner != name and owner in registry:
                out[key] = (registry, name)
    return out


def check_unread_keys(cfg: DictConfig) -> None:
    """Refuse, before any work, a key set away from its default that the selected components do not read
    (`unread_keys`): it would be recorded in config.yaml and change nothing. The message names what the selected
    entry reads and, for a shared key, the entries that read it."""
    unread = unread_keys(cfg)
    if not unread:
        return
    defaults = {key: default for key, _, default in _schema_leaves(OmegaConf.get_type(cfg))}
    for key, (registry, name) in unread.items():
        value = _plain(OmegaConf.select(cfg, key))
        if value == defaults[key]:
            continue
        chosen = f"{registry.key}={name}"
        reads = [k for k in registry.shared if k in registry.reads(cfg, name)]
        section = registry.entry(name).config
        if section is not None:
            own = ", ".join(f.name for f in dataclasses.fields(section))
            reads.append(f"its own {registry.sections}.{name}.* ({own})")
        listed = ", ".join(reads[:-1]) + " and " + reads[-1] if len(reads) > 1 else "".join(reads)
        what = f"{chosen} reads " + (listed if reads else f"none of {', '.join(registry.shared)}")
        prefix = f"{registry.sections}."
        owner = key.removeprefix(prefix).split(".")[0] if key.startswith(prefix) else None
        if owner in registry and owner != name and key not in registry.shared:
            instead = f"; it is a key of {registry.key}={owner}"
        else:
            readers = [n for n in registry if key in registry.reads(cfg, n)]
            instead = f"; {', '.join(readers)} read it" if readers else ""
        raise UserError(f"{key}={_flow(value)} is not read by {chosen}, so it would change nothing: {what}. Leave "
                        f"{key} at its default {_flow(defaults[key])}, or choose another {registry.kind}{instead}")


def config_differences(saved: dict, current: DictConfig | dict,
                       allowed: tuple[str, ...] = RESUME_SAFE_KEYS) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every dotted key whose value differs, skipping keys that match a
    pattern of `allowed` (fnmatch: "log.*", "data.workers") and keys that the current config's components do not read
    (`unread_keys`: another KD method's section, say). A key the saved config lacks (one the schema gained since)
    counts as having the value its `opt(..., before=...)` records (what the code did before the key existed), else
    the schema's default; a key only the saved config has is ignored."""
    import fnmatch
    now = _flatten(to_plain(current) if isinstance(current, (DictConfig, ListConfig)) else current)
    before = _flatten(saved)
    schema = OmegaConf.get_type(current) if isinstance(current, DictConfig) else None
    fields = ({key: (f, default) for key, f, default in _schema_leaves(schema)}
              if schema is not None and dataclasses.is_dataclass(schema) else {})
    unread = unread_keys(current) if isinstance(current, DictConfig) else {}
    diffs = []
    for key, value in now.items():
        if key in unread or any(fnmatch.fnmatchcase(key, pattern) for pattern in allowed):
            continue
        f, default = fields.get(key, (None, "<absent>"))
        old = before.get(key, f.metadata.get("before", default) if f is not None else default)
        if old != value:
            diffs.append((key, old, value))
    return diffs


def changed_default_note(schema: type, key: str, old: Any, saved_has_it: bool) -> str:
    """What a resume message adds when `old` is the value that `key`'s `opt(..., before=...)` records: the run was
    saved before the key existed, or before its default changed."""
    f = next((f for k, f, _ in _schema_leaves(schema) if k == key), None)
    if f is None or "before" not in f.metadata or f.metadata["before"] != old:
        return ""
    return (" (its default before it changed: resume with " if saved_has_it else
            " (saved before this key existed, the run did what it does now at this value: resume with ") + \
        f"{key}={_flow(old)})"


def unknown_saved_keys(saved: dict, current: DictConfig) -> list[str]:
    """What a run's saved config holds that the current config's schema lacks: keys (`kd.nkd.gamma`) and registry
    names (`kd.method=nkd`), as the plugins of the run had added them."""
    schema = OmegaConf.get_type(current)
    known = {key for key, *_ in iter_schema(schema)} if dataclasses.is_dataclass(schema) else set(_flatten(
        to_plain(current)))
    flat = _flatten(saved)
    unknown = [key for key in flat if key not in known and not any(k.startswith(key + ".") or key.startswith(k + ".")
                                                                   for k in known)]
    if dataclasses.is_dataclass(schema):
        with _own_plugins(schema):
            for key, valid in schema_ranges(schema).items():
                if isinstance(valid.choices, Registry) and key in flat and flat[key] not in valid.choices:
                    unknown.append(f"{key}={flat[key]}")
    return unknown


def check_saved_keys_known(saved: dict, current: DictConfig, source: str) -> None:
    """Refuse to continue a run whose saved config holds keys or registry names that the current schema lacks
    (`unknown_saved_keys`), naming them and the run's plugins that brought them: continuing would silently drop
    its component's keys or switch to a built-in one."""
    unknown = unknown_saved_keys(saved, current)
    if not unknown:
        return
    items = (saved.get("run") or {}).get("plugins") or [] if isinstance(saved.get("run"), dict) else []
    origin = (f"they come from the run's plugins {plugins.KEY}={json.dumps(items)}, which this command does not import"
              if items else "the run names no plugin: a version of this program that had them made it")
    raise UserError(f"cannot resume from {source}: the run's config holds {', '.join(unknown)}, which this "
                    f"program's config does not know now; {origin}. Continuing would drop them or switch to a "
                    f"built-in component. Resume without {plugins.KEY} (the run's own are imported) or with the same "
                    "files, or start a new run")


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
    check_saved_keys_known(saved, current, source)
    diffs = config_differences(saved, current, allowed)
    if not diffs:
        return
    schema = OmegaConf.get_type(current)
    present = _flatten(saved)
    listed = "; ".join(f"{key} = {json.dumps(old)} in the run{changed_default_note(schema, key, old, key in present)}"
                       f", {json.dumps(new)} now" for key, old, new in diffs)
    safe = ", ".join(allowed)
    raise UserError(f"cannot resume from {source}: the run was made with a different config, and continuing it "
                    f"with this one would mix two configs in one set of results. Differences: {listed}. Resume "
                    f"with the run's values (only {safe} may change), or start a new run with the new values: "
                    "drop run.resume and pick a new run.name")

