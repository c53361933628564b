"""Finding, loading and listing plugins.

Plugins are entry points in the group ``fmtune``; the entry point's name is
what users type in ``--plugins``. Only the plugins a run names are imported,
so a broken plugin cannot take down other runs. The core's own behaviour is a
set of default plugins (``fmtune.default_plugins``) registered first, whose
implementations are ``trylast``. No torch here.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import weakref
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pluggy

from . import hookspecs
from .config import ConfigError

GROUP = "fmtune"

DEFAULT_PLUGINS = (
    "fmtune.default_plugins.options",
    "fmtune.default_plugins.model",
    "fmtune.default_plugins.data",
    "fmtune.default_plugins.training",
    "fmtune.default_plugins.logs",
    "fmtune.default_plugins.plots",
)


class PluginError(ConfigError):
    """A requested plugin is missing or broken (exit code 2)."""


@dataclass
class PluginInfo:
    name: str
    value: str
    distribution: str | None
    version: str | None
    entry_point: Any

    def load(self) -> Any:
        return self.entry_point.load()

    def core_requirement(self) -> str | None:
        """The plugin distribution's requirement on ``fmtune`` (e.g. ``fmtune<0.2,>=0.1``)."""
        return core_requirement(getattr(self.entry_point, "dist", None))

    def incompatibility(self) -> str | None:
        """Why this plugin cannot run with the installed core, or None."""
        return incompatibility(getattr(self.entry_point, "dist", None))


def core_requirement(dist: Any) -> str | None:
    """``dist``'s requirement on the ``fmtune`` distribution, or None (no torch, no import)."""
    if dist is None:
        return None
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    for line in dist.requires or ():
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) == "fmtune" and (req.marker is None
                                                        or req.marker.evaluate({"extra": ""})):
            return str(req)
    return None


def incompatibility(dist: Any) -> str | None:
    """Why the distribution ``dist`` cannot run with this core (its ``fmtune`` requirement is
    not met by the installed version), or None."""
    text = core_requirement(dist)
    if text is None:
        return None
    from packaging.requirements import Requirement

    from . import __version__

    if Requirement(text).specifier.contains(__version__, prereleases=True):
        return None
    return (f"{dist.metadata['Name']} {dist.version} requires {text}, but fmtune {__version__} "
            "is installed")


def installed() -> dict[str, PluginInfo]:
    """Installed plugins by name, from entry point metadata only (imports nothing)."""
    found: dict[str, PluginInfo] = {}
    for ep in metadata.entry_points(group=GROUP):
        dist = getattr(ep, "dist", None)
        found.setdefault(ep.name, PluginInfo(
            ep.name, ep.value,
            dist.metadata["Name"] if dist else None,
            dist.version if dist else None,
            ep,
        ))
    return dict(sorted(found.items()))


IMPLIED_GROUP = "fmtune.implied_by"
_TRUE_WORDS = {"true", "yes", "1", "on"}


@dataclass
class Implication:
    """A plugin's declaration that an option (with a value, or any value) asks for it: an entry
    point ``"OPTION" = "PLUGIN"`` or ``"OPTION:VALUE" = "PLUGIN"`` in the group
    ``fmtune.implied_by`` of the plugin's distribution (``"peft_method:lora" = "lora"``,
    ``"data_config_path" = "data_handlers"``): ``OPTION`` alone, any value of the option asks
    for the plugin (it owns the option); ``OPTION:VALUE``, only that value (case-insensitive;
    ``true`` also matches yes/1/on); a VALUE with ``*`` is a pattern for the whole value
    (``"training_data_path:*.arrow"``). Read from metadata: nothing is imported."""

    option: str
    value: str | None
    plugin: str
    distribution: str | None


def implications() -> list[Implication]:
    out = []
    for ep in metadata.entry_points(group=IMPLIED_GROUP):
        option, _, value = ep.name.partition(":")
        dist = getattr(ep, "dist", None)
        out.append(Implication(option.strip(), value.strip().lower() or None, ep.value.strip(),
                               dist.metadata["Name"] if dist else None))
    return out


def _given(yaml_values: dict, cli_pairs: list, options: set[str]) -> list[tuple[str, list]]:
    """``(option, values)`` the user gave; command-line names may be unique prefixes. Plus
    ``("chat_records", [FIELD])`` when the training file is JSON/JSONL whose first record is a
    chat (FIELD holds role/content turns) and the user chose no text field: the core's own
    reader takes input/output and text records, so chat data asks for the plugin that declares
    ``"chat_records:FIELD"`` (fms-hf-tuning reads chat data with no flag)."""
    given = []
    for key, value in yaml_values.items():
        values = value if isinstance(value, list) else [value]
        given.append((str(key), values))
    for name, values in cli_pairs:
        name = name.replace("-", "_")
        hits = [o for o in options if o.startswith(name)]
        if name not in options and len(hits) == 1:
            name = hits[0]
        given.append((name, ["true"] if values is None else values))
    if "chat_records" in options:
        given += _chat_records(given)
    return given


def _chat_records(given: list[tuple[str, list]]) -> list[tuple[str, list]]:
    names = {n for n, _ in given}
    if names & {"dataset_text_field", "data_formatter_template", "data_config_path"}:
        return []
    paths = [v for n, vs in given if n == "training_data_path" for v in vs]
    if len(paths) != 1 or not str(paths[0]).lower().endswith((".jsonl", ".json")):
        return []
    try:
        with open(paths[0], encoding="utf-8") as f:
            if str(paths[0]).lower().endswith(".jsonl"):
                first = json.loads(next((line for line in f if line.strip()), "null"))
            else:  # a JSON list: only its first element is decoded, from the file's head
                head = f.read(1 << 20).lstrip()
                first = json.JSONDecoder().raw_decode(head[1:].lstrip())[0] \
                    if head.startswith("[") else None
    except (OSError, ValueError, UnicodeDecodeError):
        return []  # the data checks report it
    if not isinstance(first, dict) or "input" in first:
        return []
    turns = [k for k, v in first.items() if isinstance(v, list) and v
             and isinstance(v[0], dict) and "role" in v[0]]
    return [("chat_records", turns)] if turns else []


def _matches(specs: list[Implication], given: list[tuple[str, list]],
             wanted) -> list[tuple[Implication, str]]:
    """``(implication, reason)`` for each spec (kept by ``wanted``) an option the user gave
    asks for, first match per plugin, in the order the user wrote them."""
    found: dict[str, tuple[Implication, str]] = {}
    for option, values in given:
        words = []
        for v in values:
            words += [w.strip().lower() for w in str(v).split(",") if w.strip()]
        mine = [s for s in specs if s.option == option and wanted(s)]
        hits = [s for s in mine if s.value is None]  # the option is the plugin's: any value
        for word in words:  # in the order the user wrote them
            hits += [s for s in mine if s.value is not None and "*" not in s.value and (
                s.value == word or (s.value in _TRUE_WORDS and word in _TRUE_WORDS))]
        for value in values:  # patterns match whole values (paths may hold commas)
            hits += [s for s in mine if s.value and "*" in s.value
                     and fnmatch.fnmatchcase(str(value).lower(), s.value)]
        for spec in hits:
            if spec.plugin not in found:
                reason = f"--{option}" + (f" {spec.value}" if spec.value else "")
                if option == "chat_records":
                    reason = f"chat records (turns in {spec.value!r}) in training_data_path"
                found[spec.plugin] = (spec, reason)
    return list(found.values())


def implied(yaml_values: dict, cli_pairs: list, active: list[str],
            available: dict[str, PluginInfo] | None = None) -> list[tuple[str, str]]:
    """``(plugin, reason)`` for each installed plugin that an option asks for (see
    :class:`Implication`), unless a plugin of the same distribution is already active (its
    options then say which of its methods runs). A value that names no installed plugin is
    left to :func:`not_installed` and the option's own check."""
    specs = implications()
    if not specs:
        return []
    available = installed() if available is None else available
    active_dists = {available[n].distribution for n in active if n in available}
    given = _given(yaml_values, cli_pairs, {s.option for s in specs})
    return [(spec.plugin, reason) for spec, reason in _matches(
        specs, given, lambda s: s.plugin not in active and s.plugin in available
        and s.distribution not in active_dists)]


# fmtune's first-party plugin distributions and what their flags imply, so that a flag asking
# for one that is not installed names the distribution to pip install. Data, not code: the core
# imports no plugin; tests/test_implied_plugins.py rebuilds it from plugins/*/pyproject.toml
# and fails when it drifts (FMTUNE_WRITE_DOCS=1 rewrites it).
KNOWN_FILE = Path(__file__).with_name("known_plugins.json")


def known_distributions() -> dict[str, dict[str, Any]]:
    """``{distribution: {"plugins": [...], "implied_by": {"OPTION[:VALUE]": plugin}}}``."""
    try:
        return json.loads(KNOWN_FILE.read_text())
    except (OSError, ValueError):
        return {}


def provider_of(option: str) -> tuple[str, str] | None:
    """``(plugin, distribution)`` of the first-party plugin that owns ``option`` (declares it in
    ``fmtune.implied_by`` for any value), from the catalog; None when none does."""
    for dist, info in known_distributions().items():
        plugin = info.get("implied_by", {}).get(option)
        if plugin:
            return plugin, dist
    return None


def distribution_of(plugin: str) -> str | None:
    """The first-party distribution that provides ``plugin`` (None when unknown)."""
    for dist, info in known_distributions().items():
        if plugin in info.get("plugins", ()):
            return dist
    return None


def not_installed(yaml_values: dict, cli_pairs: list,
                  available: dict[str, PluginInfo] | None = None) -> list[str]:
    """One line for each first-party plugin an option asks for that is not installed:
    ``--peft_method lora needs plugin 'lora': pip install fmtune-peft-lora``."""
    available = installed() if available is None else available
    specs = []
    for dist, info in known_distributions().items():
        for key, plugin in info.get("implied_by", {}).items():
            option, _, value = key.partition(":")
            specs.append(Implication(option, value.lower() or None, plugin, dist))
    given = _given(yaml_values, cli_pairs, {s.option for s in specs})
    return [f"{reason} needs plugin {spec.plugin!r}, which is not installed: "
            f"pip install {spec.distribution}"
            for spec, reason in _matches(specs, given, lambda s: s.plugin not in available)]


def new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for modname in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(modname), name=f"default:{modname.rsplit('.', 1)[1]}")
    return pm


def split_names(names: Any) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (order kept, duplicates dropped)."""
    if names is None:
        return []
    items = names.split(",") if isinstance(names, str) else [str(n) for n in names]
    out: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if part and part not in out:
                out.append(part)
    return out


def load(names: list[str], pm: pluggy.PluginManager | None = None) -> pluggy.PluginManager:
    """A plugin manager with the defaults plus the named plugins, checked.

    A missing or broken plugin is a :class:`PluginError` naming what is installed.
    """
    pm = pm or new_manager()
    available = installed()
    listing = ", ".join(available) or "none"
    for name in names:
        info = available.get(name)
        if info is None:
            from .config import suggest
            dist = distribution_of(name)
            install = f" (pip install {dist})" if dist else ""
            raise PluginError(
                f"plugin {name!r} is not installed{install}{suggest(name, available)}; "
                f"installed plugins: {listing}"
            )
        why = info.incompatibility()
        if why:  # checked before importing: an incompatible plugin may not even import
            raise PluginError(f"plugin {name!r} is incompatible with this fmtune: {why}; install "
                              f"a {info.distribution} release made for fmtune {_version()}, or a "
                              f"fmtune that matches its requirement")
        try:
            obj = info.load()
        except Exception as e:  # noqa: BLE001 - any import failure is reported the same way
            raise PluginError(
                f"plugin {name!r} ({info.value}) failed to load: {type(e).__name__}: {e}; "
                f"installed plugins: {listing}"
            ) from e
        if pm.is_registered(obj):
            continue
        pm.register(obj, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(f"plugin hook error: {e}") from e
    return pm


def hook_names(obj: Any) -> list[str]:
    """The fmtune hooks a plugin object implements."""
    specs = {n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "fmtune_spec")}
    return sorted(n for n in specs if hasattr(getattr(obj, n, None), "fmtune_impl"))


def describe() -> list[dict[str, Any]]:
    """Everything ``fmtune plugins`` shows: defaults, then installed plugins."""
    rows: list[dict[str, Any]] = []
    from . import __version__
    for modname in DEFAULT_PLUGINS:
        mod = importlib.import_module(modname)
        rows.append({"name": f"default:{modname.rsplit('.', 1)[1]}", "entry_point": modname,
                     "distribution": "fmtune", "version": __version__,
                     "hooks": hook_names(mod), "error": None})
    for info in installed().values():
        row = {"name": info.name, "entry_point": info.value, "distribution": info.distribution,
               "version": info.version, "requires_fmtune": info.core_requirement(), "hooks": [],
               "error": None}
        why = info.incompatibility()
        if why:  # not imported: it was not made for this core
            row["error"] = f"incompatible, not loaded: {why}"
            rows.append(row)
            continue
        try:
            row["hooks"] = hook_names(info.load())
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    return rows


def _version() -> str:
    from . import __version__

    return __version__


def plugin_versions(pm: pluggy.PluginManager) -> dict[str, str | None]:
    """Active non-default plugins with their distribution versions."""
    avail = installed()
    return {name: (avail[name].version if name in avail else None)
            for name, _ in pm.list_name_plugin() if not name.startswith("default:")}


# Which plugin answered each firstresult hook of a run (and which wrappers ran around it).
_ANSWERS: "weakref.WeakKeyDictionary[pluggy.PluginManager, dict]" = weakref.WeakKeyDictionary()


def record_answers(pm: pluggy.PluginManager) -> dict[str, dict[str, Any]]:
    """Start (or restart) recording, for every *firstresult* hook call made through ``pm``,
    the plugin whose implementation returned the result and the wrappers that ran around it.

    Returns the dict that fills in: ``{hook: {"answered_by": name or None, "wrappers":
    [names]}}`` (the last call of a hook wins). Calling it again for the same manager starts a
    new, empty dict (one per run); the tracing itself is installed once per manager through
    pluggy's ``add_hookcall_monitoring``.
    """
    answers: dict[str, dict[str, Any]] = {}
    first_time = pm not in _ANSWERS
    _ANSWERS[pm] = answers
    if not first_time:
        return answers
    manager = weakref.ref(pm)
    pending: list[list[tuple[Any, Any]]] = []  # functions swapped in, per call in flight

    def firstresult(hook_name: str) -> bool:
        spec = getattr(getattr(pm.hook, hook_name, None), "spec", None)
        return bool(spec and spec.opts.get("firstresult"))

    def before(hook_name, hook_impls, kwargs):
        if not firstresult(hook_name):
            return
        target = _ANSWERS.get(manager())
        if target is None:
            pending.append([])
            return
        record = target[hook_name] = {"answered_by": None, "wrappers": []}
        swapped = []
        for impl in reversed(hook_impls):  # pluggy's call order
            if impl.wrapper or impl.hookwrapper:
                record["wrappers"].append(impl.plugin_name)
                continue
            original = impl.function

            def recorded(*args, _fn=original, _name=impl.plugin_name):
                result = _fn(*args)
                if result is not None and record["answered_by"] is None:
                    record["answered_by"] = _name
                return result

            impl.function = recorded
            swapped.append((impl, original))
        pending.append(swapped)

    def after(outcome, hook_name, hook_impls, kwargs):
        if firstresult(hook_name):
            for impl, original in pending.pop():
                impl.function = original

    pm.add_hookcall_monitoring(before, after)
    return answers
