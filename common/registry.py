"""One idiom for everything that comes in kinds: KD methods, agents, curriculum strategies, gan_vae student losses.

    KD_METHODS = Registry("KD method", key="kd.method", sections="kd")

    @dataclass
    class DKDConfig:                                      # the entry's own keys, with ranges, next to its code
        alpha: float = opt(1.0, "TCKD weight", ge=0)

    @KD_METHODS.register("dkd", config=DKDConfig, help="Decoupled KD (Zhao et al. CVPR 2022)")
    class DKD(KDMethod): ...

An entry is a class or a function. Registering it is the whole of adding it: the key that names it (`kd.method`)
accepts it, its config section (`kd.dkd.*`) joins the schema when the config is loaded (`compose_schema`), with its
keys' ranges checked and listed by `--help` and the docs tables, and its `validate(cfg)` (a classmethod or
staticmethod, optional) runs before any work. An entry defined outside the repository is registered the same way
from a plugin file named by `run.plugins` (common.plugins), imported before the config is read. What a plugin
registers belongs to it: a config sees the built-in entries and those of its own plugins only (`plugin_scope`), so
another config loaded in the same process neither accepts its names nor gains its sections.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Callable

from common.errors import UserError


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    obj: Any                        # the class or function registered
    config: type | None             # its config section (a dataclass), or None when it has no keys of its own
    help: str                       # one line: what it is and where it comes from
    plugin: str | None = None       # the run.plugins item (its key, common.plugins) whose import registered it


# ----------------------------------------------------------------------------------------------------------------
# Plugins are per config: an entry registered while a run.plugins item was imported belongs to that plugin, and is
# seen only inside the scope of a config that names it. Built-in entries (registered outside any plugin's import)
# are seen everywhere. Outside every scope (the run itself, once its config is checked) every entry is seen.
# ----------------------------------------------------------------------------------------------------------------
_registering: list[str] = []            # the plugin being imported (innermost last)
_scope: frozenset[str] | None = None    # the plugins whose entries are seen; None: every entry


@contextmanager
def registering_for(plugin: str) -> Iterator[None]:
    """While a plugin is imported (common.plugins): what it registers belongs to it."""
    _registering.append(plugin)
    try:
        yield
    finally:
        _registering.pop()


@contextmanager
def plugin_scope(plugins: Iterable[str] | None) -> Iterator[None]:
    """Every registry sees its built-in entries and those of `plugins` alone (None: leave the scope as it is), so
    that a config is composed and checked against its own plugins, not against those another config imported."""
    global _scope
    before = _scope
    if plugins is not None:
        _scope = frozenset(plugins)
    try:
        yield
    finally:
        _scope = before


def schema_plugins(schema: Any) -> frozenset[str] | None:
    """The plugins a composed schema was composed with (`compose_schema`); None for any other class."""
    return getattr(schema, "__dict__", {}).get(_PLUGINS_ATTR)


def config_plugins(cfg: Any) -> frozenset[str]:
    """The plugins of a loaded config (its schema's): an entry of another config's plugin is no part of it."""
    from omegaconf import OmegaConf
    try:
        schema = OmegaConf.get_type(cfg)
    except Exception:  # noqa: BLE001 - not an OmegaConf config: no plugins of its own
        return frozenset()
    return schema_plugins(schema) or frozenset()


class Registry:
    """name -> entry. `kind` names it in messages ("KD method"), `key` is the config key that selects an entry
    ("kd.method"), and `sections` the config section under which each entry's own section goes ("kd": kd.<name>.*).
    Iterating, `in` and `len` see the names, so a Registry serves as `opt(..., choices=REGISTRY)`: the check and
    `--help` then follow whatever is registered when the config is loaded.

    `shared`: the dotted keys outside the entries' own sections that some entries read and others do not
    ("kd.alpha"). An entry declares the ones it reads as `reads`, a tuple or a classmethod `reads(cfg)` (none when
    it declares nothing); common.config.check_unread_keys refuses the others, and another entry's section, set away
    from their defaults, and a resume compares only what the selected entry reads."""

    def __init__(self, kind: str, key: str, sections: str | None = None, shared: tuple[str, ...] = ()):
        self.kind, self.key, self.sections, self.shared = kind, key, sections, tuple(shared)
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, *, config: type | None = None, help: str = "") -> Callable[[Any], Any]:  # noqa: A002
        """Decorator: `@REGISTRY.register("name", config=Section, help="...")` over a class or a function."""
        if config is not None and not dataclasses.is_dataclass(config):
            raise TypeError(f"{self.kind} '{name}': config must be a dataclass (its keys declared with "
                            "common.config.opt)")

        def add(obj: Any) -> Any:
            if name in self._entries and self._entries[name].obj is obj:
                return obj  # the same object again (its module imported twice): the entry stays as it was
            if name in self._entries:
                raise UserError(f"{self.kind} '{name}' is registered twice: by {_origin(self._entries[name].obj)} and "
                                f"by {_origin(obj)}; rename one of them")
            self._entries[name] = Entry(name, obj, config, help or _first_line(obj),
                                        _registering[-1] if _registering else None)
            if isinstance(obj, type):
                obj.name = name
            return obj
        return add

    def unregister(self, name: str) -> Entry:
        """Remove an entry (tests that register one of their own take it out again); the removed Entry."""
        if name not in self._entries:
            self.entry(name)  # the UserError naming the choices
        return self._entries.pop(name)

    # ---- lookup (what the current plugin scope sees) ----------------------------------------------------------
    def _seen(self) -> dict[str, Entry]:
        if _scope is None:
            return dict(self._entries)
        return {n: e for n, e in self._entries.items() if e.plugin is None or e.plugin in _scope}

    def __getitem__(self, name: str) -> Any:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry:
        seen = self._seen()
        if name not in seen:
            raise UserError(f"unknown {self.key} '{name}'; choose one of {', '.join(seen)} (an entry of your "
                            "own is registered from a file named by run.plugins)")
        return seen[name]

    def __contains__(self, name: object) -> bool:
        return name in self._seen()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._seen()))

    def __len__(self) -> int:
        return len(self._seen())

    def items(self) -> list[tuple[str, Any]]:
        return [(name, e.obj) for name, e in self._seen().items()]

    def entries(self) -> list[Entry]:
        return list(self._seen().values())

    def entries_of(self, cfg: Any) -> list[Entry]:
        """The entries a loaded config sees: the built-in ones and its own plugins' (`config_plugins`)."""
        with plugin_scope(config_plugins(cfg)):
            return self.entries()

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self._seen())})"

    # ---- what the config and the docs read -----------------------------------------------------------------------
    def describe(self) -> str:
        """One line per entry, for --help and the docs: `name: help`."""
        return "; ".join(f"{e.name}: {e.help}" if e.help else e.name for e in self._seen().values())

    def reads(self, cfg: Any, name: str) -> tuple[str, ...]:
        """The `shared` keys that entry `name` reads under `cfg` (its `reads` declaration)."""
        declared = getattr(self.entry(name).obj, "reads", ())
        return tuple(declared(cfg) if callable(declared) else declared)

    def validate(self, cfg: Any, name: str) -> None:
        """The selected entry's `validate(cfg)`, when it has one: checks that involve several keys (UserError)."""
        check = getattr(self.entry(name).obj, "validate", None)
        if callable(check):
            check(cfg)


def _first_line(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.split("\n")[0].rstrip(".") if doc else ""


def _origin(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"


# ----------------------------------------------------------------------------------------------------------------
# Schema composition: a section dataclass lists the registries whose entries' sections it holds.
# ----------------------------------------------------------------------------------------------------------------
REGISTRIES_ATTR = "registries"


def holds_sections_of(*registries: Registry) -> Callable[[type], type]:
    """Class decorator for a config section: every entry of these registries that has a config gets its own
    sub-section here, named after the entry (`kd.dkd.*`), when the schema is composed."""
    def mark(cls: type) -> type:
        setattr(cls, REGISTRIES_ATTR, registries)
        return cls
    return mark


def registries_of(schema: type) -> list[Registry]:
    """Every registry whose entries' sections a section of `schema` holds (`holds_sections_of`), in schema order."""
    found = list(getattr(schema, REGISTRIES_ATTR, ()))
    for f in dataclasses.fields(schema):
        sub = f.type if isinstance(f.type, type) and dataclasses.is_dataclass(f.type) else None
        if sub is None and isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            sub = f.default_factory
        if sub is not None:
            found += [r for r in registries_of(sub) if r not in found]
    return found


_COMPOSED: dict[tuple, type] = {}
_BASE_ATTR = "_composed_from"
_PLUGINS_ATTR = "_plugins"


def compose_schema(schema: type) -> type:
    """`schema` with every registry entry's section added where a `holds_sections_of` section asks for it (recursively):
    the built-in entries' and those of the plugins in scope (`plugin_scope`; none outside a scope). A composed schema
    is composed again from its base with its own plugins (recorded on it), so a config never gains the sections of
    another config's plugins. The result is a dataclass subclass of each section, made once per set of entries and
    plugins and kept as an attribute of this module, so that a config pickles by reference; with no registry sections
    and no plugins the schema itself comes back."""
    own_plugins = schema_plugins(schema)
    plugins = own_plugins if own_plugins is not None else (_scope if _scope is not None else frozenset())
    with plugin_scope(plugins):
        return _compose(schema.__dict__.get(_BASE_ATTR, schema), plugins)


def _compose(schema: type, plugins: frozenset[str]) -> type:
    fields = []
    changed = False
    for f in dataclasses.fields(schema):
        sub = f.type if isinstance(f.type, type) and dataclasses.is_dataclass(f.type) else None
        if sub is None and f.default_factory is not dataclasses.MISSING and isinstance(f.default_factory, type) \
                and dataclasses.is_dataclass(f.default_factory):
            sub = f.default_factory
        if sub is None:
            continue
        composed = _compose(sub, frozenset())  # a section records no plugins: the top-level schema does
        if composed is not sub:
            changed = True
            fields.append((f.name, composed, dataclasses.field(default_factory=composed, metadata=f.metadata)))
    own = {f.name for f in dataclasses.fields(schema)}
    for registry in getattr(schema, REGISTRIES_ATTR, ()):
        for e in registry.entries():
            if e.config is None:
                continue
            if e.name in own:
                raise UserError(f"{registry.kind} '{e.name}' ({_origin(e.obj)}) cannot have a config section "
                                f"{registry.sections}.{e.name}: that is already a key of {registry.sections}; "
                                "rename it")
            changed = True
            fields.append((e.name, e.config, dataclasses.field(default_factory=e.config)))
            own.add(e.name)
    if not changed and not plugins:
        return schema
    signature = (schema, tuple((name, typ) for name, typ, _ in fields), plugins)
    if signature not in _COMPOSED:
        name = f"{schema.__name__}_{len(_COMPOSED)}"
        cls = dataclasses.make_dataclass(name, fields, bases=(schema,), namespace={"__module__": __name__})
        cls.__qualname__ = name
        setattr(cls, _BASE_ATTR, schema)
        setattr(cls, _PLUGINS_ATTR, plugins)
        setattr(sys.modules[__name__], name, cls)
        _COMPOSED[signature] = cls
    return _COMPOSED[signature]
