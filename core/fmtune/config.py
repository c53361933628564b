"""Typed options, the resolved config, and strict parsing of YAML + CLI.

One set of names serves YAML keys and CLI flags (``--learning_rate 1e-4`` and
``learning_rate: 1e-4``); the CLI wins over the file, the file over defaults.
Unknown names are errors with a did-you-mean hint. No torch here.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from .stash import Stash


class ConfigError(Exception):
    """A problem with the user's config or flags; the CLI prints it and exits 2."""


_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


@dataclass
class Option:
    name: str
    type: type
    default: Any
    help: str
    plugin: str
    choices: tuple | None = None
    aliases: tuple[str, ...] = ()
    shared: bool = False
    cli_unescape: bool = False
    weak: bool = False
    true_words: tuple[str, ...] = ()  # more spellings of "true" (padding_free huggingface)
    words: tuple[str, ...] = ()  # words accepted besides the type (an int option's "auto")

    def convert(self, value: Any, where: str) -> Any:
        """Convert a YAML value or CLI string to this option's type."""
        if value is None:
            return None
        if self.words and isinstance(value, str) and value.strip().lower() in self.words:
            return value.strip().lower()
        t = self.type
        out: Any
        try:
            if t is bool:
                if isinstance(value, bool):
                    out = value
                elif str(value).strip().lower() in (*_TRUE, *self.true_words):
                    out = True
                elif str(value).strip().lower() in _FALSE:
                    out = False
                else:
                    raise ValueError
            elif t is list:
                if isinstance(value, str):
                    out = [v.strip() for v in value.split(",") if v.strip()]
                elif isinstance(value, (list, tuple)):
                    out = [str(v) for v in value]
                else:
                    raise ValueError
            elif t is dict:
                out = json.loads(value) if isinstance(value, str) else value
                if not isinstance(out, dict):
                    raise ValueError
            elif t is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                out = int(value)
            elif t is float:
                if isinstance(value, bool):
                    raise ValueError
                out = float(value)
            else:
                if isinstance(value, (dict, list)):
                    raise ValueError
                out = str(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{where}: {self.name} must be {self.type_name()}, got {value!r}"
            ) from None
        if self.choices and out not in self.choices:
            raise ConfigError(
                f"{where}: {self.name} must be one of {', '.join(map(str, self.choices))}; got {out!r}"
            )
        return out

    def type_name(self) -> str:
        if self.words:
            return " or ".join([self._type_name(), *self.words])
        return self._type_name()

    def _type_name(self) -> str:
        return {bool: "true/false", list: "a list (space- or comma-separated on the CLI)",
                dict: "a mapping (JSON on the CLI)", int: "an integer",
                float: "a number", str: "a string"}[self.type]


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` for ``fmtune`` sub-commands: a usage error is a
    :class:`ConfigError` (``fmtune: error: merge: argument --dtype: invalid choice ...``, one
    line, exit 2) instead of argparse's usage text and its own ``fmtune merge: error:`` line."""

    def error(self, message: str):
        command = self.prog.removeprefix("fmtune").strip()
        raise ConfigError(f"{command + ': ' if command else ''}{' '.join(message.split())} "
                          f"(see {self.prog} --help)")


def parse_bool(value: Any) -> bool:
    """``true/false/yes/no/1/0/on/off`` (any case) as a bool; argparse ``type=`` friendly."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"not a boolean: {value!r}")


class OptionRegistry:
    """All options of the active plugins, keyed by name (aliases resolve to names)."""

    def __init__(self) -> None:
        self.options: dict[str, Option] = {}
        self.aliases: dict[str, str] = {}

    def register_for(self, plugin: str):
        def register(name: str, type: type | str = str, default: Any = None, help: str = "",
                     choices: Iterable | None = None, aliases: Iterable[str] = (),
                     shared: bool = False, cli_unescape: bool = False,
                     weak: bool = False, true_words: Iterable[str] = (),
                     words: Iterable[str] = ()) -> None:
            """``shared=True``: plugins that all declare the option shared (with the same type)
            get one option, the first registration's; otherwise a second owner is an error.
            ``cli_unescape=True``: ``\\n``/``\\t`` typed on the command line become the
            characters (templates, as in fms-hf-tuning). ``weak=True`` (the TrainingArguments
            table): a later registration of the same name by a plugin replaces it, and a weak
            registration of a name already taken is dropped."""
            t = _TYPES[type] if isinstance(type, str) else type
            if t not in _TYPES.values():
                raise TypeError(f"plugin {plugin!r}: option {name!r} has unsupported type {t!r}")
            first = self.options.get(name)
            if shared and first is not None and first.shared and first.type is t:
                return
            if weak and (first is not None or name in self.aliases):
                return
            if first is not None and first.weak:
                self._drop(name)
            for n in (name, *aliases):
                if n in self.options or n in self.aliases:
                    owner = self.options.get(n) or self.options[self.aliases[n]]
                    raise ConfigError(
                        f"option {n!r} is registered by both {owner.plugin!r} and {plugin!r}"
                    )
            self.options[name] = Option(name, t, default, help, plugin,
                                        tuple(choices) if choices else None, tuple(aliases),
                                        shared, cli_unescape, weak, tuple(true_words),
                                        tuple(words))
            for a in aliases:
                self.aliases[a] = name
        return register

    def _drop(self, name: str) -> None:
        opt = self.options.pop(name)
        for a in opt.aliases:
            self.aliases.pop(a, None)

    def resolve(self, name: str) -> Option | None:
        name = name.replace("-", "_")
        if name in self.options:
            return self.options[name]
        if name in self.aliases:
            return self.options[self.aliases[name]]
        return None

    def resolve_flag(self, name: str) -> Option | None:
        """A command-line name: exact, an alias, or (as argparse, which fms-hf-tuning's
        HfArgumentParser is) an unambiguous prefix of one option's names (``--data_config``
        for ``--data_config_path``). An ambiguous prefix is a ConfigError naming the options."""
        opt = self.resolve(name)
        if opt is not None or not name:
            return opt
        name = name.replace("-", "_")
        hits = {self.options[self.aliases.get(n, n)].name
                for n in self.known_names() if n.startswith(name)}
        if len(hits) > 1:
            raise ConfigError(f"command line: --{name} is ambiguous: it could be "
                              f"{', '.join('--' + h for h in sorted(hits))}")
        return self.options[hits.pop()] if hits else None

    def known_names(self) -> list[str]:
        return [*self.options, *self.aliases]


class Config:
    """The resolved configuration: ``config.learning_rate``; ``config.source('x')``."""

    def __init__(self, values: dict[str, Any], sources: dict[str, str], plugins: list[str],
                 config_file: str | None = None) -> None:
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_sources", dict(sources))
        object.__setattr__(self, "plugins", list(plugins))
        object.__setattr__(self, "config_file", config_file)
        # per-run plugin state (fmtune.stash): lives and dies with this run's config
        object.__setattr__(self, "stash", Stash())

    def __getattr__(self, name: str) -> Any:
        try:  # (via __dict__: pickle and copy look names up before _values is set)
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(
                f"config has no option {name!r} (is the plugin that owns it active?)"
            ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self._values[name] = value
        self._sources[name] = "set by a plugin"

    def set_from(self, name: str, value: Any, source: str) -> None:
        """Set ``name`` as if it came from ``source`` (a translation of the user's own value,
        e.g. a transformers-4 option name: it then counts as the user's)."""
        self._values[name] = value
        self._sources[name] = source

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name, default)

    def source(self, name: str) -> str:
        return self._sources.get(name, "default")

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def __repr__(self) -> str:
        return f"Config({self._values!r})"


# a YAML file may reuse a node through anchors and aliases; the document it expands to is
# bounded (a few hundred bytes of nested aliases can otherwise expand to gigabytes)
YAML_MAX_NODES = 200_000


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (the second would
    silently win)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node) -> int:
    """Nodes in the document once every alias is expanded; raises yaml.YAMLError past
    YAML_MAX_NODES or for a recursive alias. Shared nodes are counted once per use, in time
    proportional to the distinct nodes (memoized)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        children = ([c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode)
                    else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if done:
            active.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > YAML_MAX_NODES:
                raise yaml.YAMLError(f"the document expands to more than {YAML_MAX_NODES:,} "
                                     "values through anchors and aliases; refused")
            continue
        if key in active:
            raise yaml.YAMLError("an alias refers to a node that contains it (a recursive "
                                 "document); refused")
        active.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def load_yaml_text(text: str) -> Any:
    """Parse one YAML document safely: plain data only (safe loader), a key written twice in a
    mapping refused, and the size the document expands to through aliases bounded. Errors are
    ``yaml.YAMLError`` (with ``problem``/``problem_mark`` where the parser gives them)."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found")
    from .files import decode_utf8

    try:
        text = decode_utf8(p.read_bytes(), path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        data = load_yaml_text(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line} invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of option: value")
    plugins = data.get("plugins")
    if plugins is not None and not (isinstance(plugins, str) or (
            isinstance(plugins, list) and all(isinstance(n, str) for n in plugins))):
        raise ConfigError(f"{path}: plugins must be a string (a,b) or a list of plugin names, "
                          f"got {plugins!r}")
    return data


def suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_cli_flags(argv: list[str]) -> list[tuple[str, list[str] | None]]:
    """Split the command line the way transformers' ``HfArgumentParser`` (argparse) reads it:
    ``--name value``, ``--name=value``, ``--name v1 v2 ...`` (every value up to the next
    ``--flag``) and a bare ``--flag``; in order. Values are checked against the options in
    :func:`resolve`."""
    out: list[tuple[str, list[str] | None]] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"unexpected argument {tok!r} (options are written --name value)")
        i += 1
        if "=" in tok:
            name, value = tok[2:].split("=", 1)
            out.append((name, [value]))
            continue
        values = []
        while i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        out.append((tok[2:], values or None))
    return out


_ESCAPES = re.compile(r"\\(n|t|r|\\)")
_ESCAPED = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape_cli(value: str) -> str:
    """``\\n``, ``\\t``, ``\\r`` and ``\\\\`` typed in a shell become the characters, as
    fms-hf-tuning does for templates given on its command line (``--response_template
    "\\n### Label:"``); YAML has its own escapes and is left alone."""
    return _ESCAPES.sub(lambda m: _ESCAPED[m.group(1)], value)


@dataclass
class Sources:
    """Raw inputs to resolve: the YAML mapping and the CLI pairs."""

    yaml_values: dict[str, Any] = field(default_factory=dict)
    yaml_path: str | None = None
    cli_pairs: list[tuple[str, list[str] | None]] = field(default_factory=list)


def resolve(registry: OptionRegistry, src: Sources, plugins: list[str],
            owner_hint=lambda name: None) -> Config:
    """Merge defaults < YAML < CLI into a :class:`Config`, strictly.

    ``owner_hint(name)`` may return the names of installed-but-inactive
    plugins that own an unknown option, for the error message.
    """
    values = {name: opt.default for name, opt in registry.options.items()}
    sources = {name: "default" for name in registry.options}
    problems: list[str] = []

    def unknown(name: str, where: str) -> str:
        owners = owner_hint(name) or []
        if len(owners) == 1:
            return (f"{where}: option {name!r} belongs to plugin {owners[0]!r}, which is not "
                    f"active; add --plugins {','.join([*plugins, owners[0]])}")
        if owners:
            return (f"{where}: option {name!r} belongs to plugins "
                    f"{', '.join(repr(o) for o in owners)}, none of them active; add one of them "
                    "to --plugins")
        return f"{where}: unknown option {name!r}{suggest(name, registry.known_names())}"

    where_yaml = src.yaml_path or "config"
    for key, value in src.yaml_values.items():
        if key in ("plugins",):
            continue
        opt = registry.resolve(str(key))
        if opt is None:
            problems.append(unknown(str(key), where_yaml))
            continue
        try:
            values[opt.name] = opt.convert(value, where_yaml)
            sources[opt.name] = where_yaml
        except ConfigError as e:
            problems.append(str(e))

    for name, raw in src.cli_pairs:
        try:
            opt = registry.resolve_flag(name)
        except ConfigError as e:
            problems.append(str(e))
            continue
        if opt is None:
            problems.append(unknown(name, "command line"))
            continue
        if raw is None:
            if opt.type is not bool:
                problems.append(f"command line: --{name} needs a value ({opt.type_name()})")
                continue
            raw = ["true"]
        if opt.cli_unescape:
            raw = [unescape_cli(v) for v in raw]
        if opt.type is list:
            value = raw if len(raw) > 1 else raw[0]  # one value may be comma-separated
        elif len(raw) == 1:
            value = raw[0]
        else:
            problems.append(f"command line: --{opt.name} takes one value, got {len(raw)}: "
                            f"{' '.join(raw)}")
            continue
        try:
            values[opt.name] = opt.convert(value, "command line")
            sources[opt.name] = "command line"
        except ConfigError as e:
            problems.append(str(e))

    if problems:
        raise ConfigError("\n".join(problems))
    return Config(values, sources, plugins, src.yaml_path)
