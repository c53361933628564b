"""Finding, loading and listing plugins; collecting plugin registries.

Plugins are entry points in the group ``fmtune``; the entry point's name is
what users type in ``--plugins``. Only the plugins a run names (and the plugins
they declare they need, ``fmtune_plugins = [...]`` in the plugin module) are
imported, so a broken plugin cannot take down other runs. The core's own
behaviour is a set of default plugins (``fmtune.default_plugins``) registered
first, whose implementations are ``trylast``. :func:`collect` gathers any
plugin-owned registry (``register(name, obj)`` hooks). No torch here.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

import pluggy

from . import hookspecs
from .config import ConfigError

log = logging.getLogger("fmtune")

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


def implications(group: str = IMPLIED_GROUP) -> list[Implication]:
    out = []
    for ep in metadata.entry_points(group=group):
        option, _, value = ep.name.partition(":")
        dist = getattr(ep, "dist", None)
        out.append(Implication(option.strip(), value.strip().lower() or None, ep.value.strip(),
                               dist.metadata["Name"] if dist else None))
    return out


HANDLES_GROUP = "fmtune.handles"


def _handled(plugins: Collection[str]) -> set[tuple[str, str | None]]:
    """``(option, value)`` keys that one of ``plugins`` handles itself: entry points
    ``"OPTION[:VALUE]" = "PLUGIN"`` in the group ``fmtune.handles`` (a plugin that reads the
    training data itself declares ``"training_data_path:*.parquet"``). While such a plugin is
    active (chosen, or implied by another option), the same key in ``fmtune.implied_by`` asks
    for no other plugin, installed or not. Read from metadata: nothing is imported."""
    return {(s.option, s.value) for s in implications(HANDLES_GROUP) if s.plugin in plugins}


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
    # a text field or template chooses the reader; fms-hf-tuning's --dataset_image_field says
    # the conversations hold images (the plugin it implies reads them)
    if names & {"dataset_text_field", "data_formatter_template", "data_config_path",
                "dataset_image_field"}:
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
    :class:`Implication`), unless the option selects among the plugins of a distribution one of
    which is already active (its options then say which of its methods runs). A value that names no installed plugin is
    left to :func:`not_installed` and the option's own check."""
    specs = implications()
    if not specs:
        return []
    available = installed() if available is None else available
    active_dists = {available[n].distribution for n in active if n in available}
    # an option that several plugins of one distribution declare selects among them
    # (peft_method: lora, alora, prompt_tuning): with one of them active it asks for no other;
    # a distribution's other plugins (a data handler and a tracker shipped together) are
    # implied as any plugin is
    per_option = Counter((s.distribution, s.option) for s in specs)
    given = _given(yaml_values, cli_pairs, {s.option for s in specs})
    found = [(spec, reason) for spec, reason in _matches(
        specs, given, lambda s: s.plugin not in active and s.plugin in available
        and not (s.distribution in active_dists and per_option[s.distribution, s.option] > 1))]
    # what the active plugins and those implied handle themselves asks for no other plugin
    handled = _handled({*active, *(spec.plugin for spec, _ in found)})
    return [(spec.plugin, reason) for spec, reason in found
            if (spec.option, spec.value) not in handled]


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
                  available: dict[str, PluginInfo] | None = None,
                  active: Collection[str] = ()) -> list[str]:
    """One line for each first-party plugin an option asks for that is not installed:
    ``--peft_method lora needs plugin 'lora': pip install fmtune-peft-lora``. Chat records
    found in the training file are a guess, not an option the user typed: with plugins of
    the user's own choosing active (one of them may read them: ``vision``), they ask for
    nothing, and a reader that cannot read them says so."""
    available = installed() if available is None else available
    # the plugins that will be active (chosen, or implied by an option) may handle an
    # option themselves (fmtune.handles: a plugin that reads its own data files)
    handled = _handled({*active, *(p for p, _ in implied(yaml_values, cli_pairs, list(active),
                                                          available))})
    specs = []
    for dist, info in known_distributions().items():
        for key, plugin in info.get("implied_by", {}).items():
            option, _, value = key.partition(":")
            if option == "chat_records" and active:
                continue
            if (option, value.lower() or None) in handled:
                continue
            specs.append(Implication(option, value.lower() or None, plugin, dist))
    given = _given(yaml_values, cli_pairs, {s.option for s in specs})
    return [f"{reason} needs plugin {spec.plugin!r}, which is not installed: "
            f"pip install {spec.distribution}"
            for spec, reason in _matches(specs, given, lambda s: s.plugin not in available)]


class PluginManager(pluggy.PluginManager):
    """fmtune's plugin manager: pluggy's, plus what one run's plugin set needs to remember.

    ``active``: the installed plugins :func:`load` activated, in registration order (the
    plugins they need come before them); ``answers``: see :func:`record_answers`.
    """

    def __init__(self, project_name: str = hookspecs.PROJECT) -> None:
        super().__init__(project_name)
        self.active: list[str] = []
        self.answers: _Answers | None = None


def new_manager() -> PluginManager:
    """A manager with the core's hook specs and the default plugins registered.

    ``add_hookspecs`` is called historically: every plugin registered later adds its own
    specs as it registers (pytest's ``pytest_addhooks``).
    """
    pm = PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.hook.add_hookspecs.call_historic(kwargs={"pluginmanager": pm})
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

    A plugin module may declare the plugins it needs, ``fmtune_plugins = ["data_handlers"]``
    (pytest's ``pytest_plugins``): they are activated with it, before it, recursively, once
    each. A missing or broken plugin is a :class:`PluginError` naming what is installed (and
    the plugin that needs it). :func:`active` lists what was activated.
    """
    pm = pm or new_manager()
    available = installed()
    done = _active_list(pm)
    in_progress: list[str] = []

    def activate(name: str, needed_by: str | None) -> None:
        if name in done or name in in_progress:  # once each; a cycle ends here
            return
        obj = _import_plugin(name, available, needed_by)
        in_progress.append(name)
        for required in _required(name, obj):
            activate(required, name)
        in_progress.pop()
        if needed_by is not None and not pm.is_registered(obj):
            log.info("plugin %r activates plugin %r (it needs it)", needed_by, name)
        if not pm.is_registered(obj):
            try:
                pm.register(obj, name=name)
            except pluggy.PluginValidationError as e:
                raise PluginError(validation_error(pm, e)) from None
        done.append(name)

    for name in names:
        activate(name, None)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(pending_error(pm, e)) from None
    return pm


def active(pm: pluggy.PluginManager) -> list[str]:
    """The installed plugins :func:`load` activated in ``pm``: the named ones and the plugins
    they need, in registration order."""
    return list(_active_list(pm))


def _active_list(pm: pluggy.PluginManager) -> list[str]:
    found = getattr(pm, "active", None)
    if not isinstance(found, list):
        found = []
        setattr(pm, "active", found)  # a plain pluggy manager
    return found


def _import_plugin(name: str, available: dict[str, PluginInfo], needed_by: str | None) -> Any:
    listing = ", ".join(available) or "none"
    info = available.get(name)
    dist = distribution_of(name)
    install = f" (pip install {dist})" if dist else ""
    if info is None and needed_by is not None:
        raise PluginError(f"plugin {needed_by!r} needs plugin {name!r}{install}, which is not "
                          f"installed; installed plugins: {listing}")
    if info is None:
        from .config import suggest
        raise PluginError(
            f"plugin {name!r} is not installed{install}{suggest(name, available)}; "
            f"installed plugins: {listing}"
        )
    needed = f" (needed by plugin {needed_by!r})" if needed_by else ""
    why = info.incompatibility()
    if why:  # checked before importing: an incompatible plugin may not even import
        raise PluginError(f"plugin {name!r}{needed} is incompatible with this fmtune: {why}; "
                          f"install a {info.distribution} release made for fmtune {_version()}, "
                          f"or a fmtune that matches its requirement")
    try:
        return info.load()
    except Exception as e:  # noqa: BLE001 - any import failure is reported the same way
        raise PluginError(
            f"plugin {name!r}{needed} ({info.value}) failed to load: {type(e).__name__}: {e}; "
            f"installed plugins: {listing}"
        ) from e


def _required(name: str, obj: Any) -> list[str]:
    """The plugins ``obj`` declares it needs (``fmtune_plugins``: a list of names or "a,b")."""
    wanted = getattr(obj, "fmtune_plugins", None)
    if wanted is None:
        return []
    if not (isinstance(wanted, str) or (isinstance(wanted, (list, tuple))
                                        and all(isinstance(n, str) for n in wanted))):
        raise PluginError(f"plugin {name!r}: fmtune_plugins must be a list of plugin names, "
                          f"got {wanted!r}")
    return [n for n in split_names(wanted) if n != name]


def validation_error(pm: pluggy.PluginManager, e: pluggy.PluginValidationError) -> str:
    """pluggy's (multi-line) refusal of an implementation, as one line naming the plugin."""
    name = pm.get_name(e.plugin) or getattr(e.plugin, "__name__", None) or repr(e.plugin)
    text = " ".join(str(e).split())
    return f"plugin {name!r}: {text}"


def pending_error(pm: pluggy.PluginManager, e: pluggy.PluginValidationError) -> str:
    """One line for ``check_pending()``: the hook, the plugin that implements it and, when an
    installed plugin that is not active defines it, that plugin."""
    for hook_name, caller in vars(pm.hook).items():
        if hook_name.startswith("_") or caller.has_spec():
            continue
        impls = [i for i in caller.get_hookimpls() if not i.optionalhook]
        if not impls:
            continue
        plugin = impls[0].plugin_name
        owner = spec_owner(hook_name, exclude={n for n, _ in pm.list_name_plugin()})
        if owner:
            return (f"plugin {plugin!r} implements {hook_name}, which no active plugin defines "
                    f"(it is the hook of plugin {owner!r}: add --plugins {owner})")
        from .config import suggest

        known = [n for n, c in vars(pm.hook).items() if not n.startswith("_") and c.has_spec()]
        return (f"plugin {plugin!r} implements {hook_name}, which is not a hook of fmtune or of "
                f"any active plugin{suggest(hook_name, known)} (a hook of a plugin that is not "
                "active needs that plugin in --plugins)")
    return f"plugin hook error: {' '.join(str(e).split())}"


def spec_owner(hook_name: str, exclude: Collection[str] = ()) -> str | None:
    """The installed plugin (not in ``exclude``) whose ``add_hookspecs`` defines ``hook_name``,
    or None. Imports installed plugins: for error messages only."""
    for name, info in installed().items():
        if name in exclude or info.incompatibility():
            continue
        try:
            obj = info.load()
        except Exception:  # noqa: BLE001 - a broken plugin just owns nothing
            continue
        if not hasattr(getattr(obj, "add_hookspecs", None), f"{hookspecs.PROJECT}_impl"):
            continue
        probe = pluggy.PluginManager(hookspecs.PROJECT)
        probe.add_hookspecs(hookspecs)
        probe.hook.add_hookspecs.call_historic(kwargs={"pluginmanager": probe})
        try:
            probe.register(obj, name=name)
        except Exception:  # noqa: BLE001
            pass
        caller = getattr(probe.hook, hook_name, None)
        if caller is not None and caller.has_spec():
            return name
    return None


# ------------------------------------------------------------------ registries


class Registrations(dict):
    """What :func:`collect` returns: ``{name: obj}`` in call order, plus ``owners``
    (``{name: plugin}``, the plugin that registered each)."""

    owners: dict[str, str]


def call_each(pm: pluggy.PluginManager, hook_name: str,
              arguments: Callable[[str], dict[str, Any]], report: Callable[[str], None]) -> None:
    """Call every implementation of ``hook_name`` (in registration order: the core's
    ``trylast`` defaults first, ``tryfirst`` ones last) with the arguments it names from
    ``arguments(plugin_name)``. A wrapper, an argument nobody supplies, or an exception goes
    to ``report`` (one line naming the plugin and the hook); a :class:`ConfigError` raised
    inside (a registry's own refusal) propagates unchanged."""
    caller = getattr(pm.hook, hook_name, None)
    if caller is None:
        return
    for impl in caller.get_hookimpls():
        plugin = impl.plugin_name
        if impl.wrapper or impl.hookwrapper:
            report(f"plugin {plugin!r}: {hook_name} cannot be a wrapper (it is a registry: "
                   "register your entries in a plain implementation)")
            continue
        given = arguments(plugin)
        missing = [a for a in impl.argnames if a not in given]
        if missing:
            report(f"plugin {plugin!r}: {hook_name}({', '.join(impl.argnames)}) asks for "
                   f"{', '.join(map(repr, missing))}, which the caller does not supply "
                   f"(it supplies {', '.join(given) or 'nothing'})")
            continue
        try:
            impl.function(*[given[a] for a in impl.argnames])
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken plugin is reported, not a traceback
            report(f"plugin {plugin!r}: {hook_name} failed: {type(e).__name__}: "
                   f"{' '.join(str(e).split())}")


def collect(pm: pluggy.PluginManager, hook_name: str, what: str, /, *,
            check: Callable[[str, Any], str | None] | None = None,
            make: Callable[..., Any] | None = None,
            problems: list[str] | None = None, **kwargs: Any) -> Registrations:
    """Collect a plugin registry: ``{name: obj}`` from every implementation of ``hook_name``.

    Each implementation is called (in registration order) with a ``register(name, obj)``
    function plus those of ``kwargs`` it names (by argument name, as pluggy does); ``what``
    names an entry in messages (``"data handler"``). The result is a dict in call order
    whose ``owners`` maps each name to the plugin that registered it. Refused, with one line
    naming the plugin: a ``wrapper=True`` (or ``hookwrapper``) implementation, a required
    argument nobody supplies, an implementation that raises, a name that is not a non-empty
    string, a name registered twice (``"data handler 'x' is registered by both 'a' and
    'b'"``), and an entry ``check(name, obj)`` refuses (it returns the reason, reported as
    ``plugin 'a': REASON``).

    ``make``: when given, ``register(name, *args, **options)`` stores ``make(*args,
    **options)`` (its exception is the plugin's error). ``problems``: when given, every
    problem is appended to it and collecting goes on (report them all at once); otherwise the
    first one raises :class:`PluginError`. The owning plugin defines the hook with
    ``add_hookspecs``; a hook no plugin defines or implements collects nothing.
    """
    found = Registrations()
    found.owners = {}

    def report(message: str) -> None:
        if problems is None:
            raise PluginError(message)
        problems.append(message)

    def register_for(plugin: str) -> Callable[..., None]:
        def register(name: Any, *args: Any, **options: Any) -> None:
            if not isinstance(name, str) or not name:
                report(f"plugin {plugin!r}: {what} name must be a non-empty string, "
                       f"got {name!r}")
                return
            if make is not None:
                try:
                    obj = make(*args, **options)
                except ConfigError:
                    raise
                except Exception as e:  # noqa: BLE001 - the plugin's registration is wrong
                    report(f"plugin {plugin!r}: {what} {name!r}: {e}")
                    return
            elif len(args) != 1 or options:
                report(f"plugin {plugin!r}: {what} {name!r}: register takes (name, obj), "
                       f"got {len(args) + 1 + len(options)} arguments")
                return
            else:
                obj = args[0]
            if name in found:
                report(f"{what} {name!r} is registered by both {found.owners[name]!r} and "
                       f"{plugin!r}")
                return
            why = check(name, obj) if check is not None else None
            if why:
                report(f"plugin {plugin!r}: {why}")
                return
            found[name], found.owners[name] = obj, plugin

        return register

    call_each(pm, hook_name, lambda plugin: {**kwargs, "register": register_for(plugin)},
              report)
    return found


def hook_names(obj: Any) -> list[str]:
    """The hooks a plugin object implements: the core's and any plugin's (every function
    marked with ``fmtune.hookimpl``; ``specname`` respected)."""
    marker = f"{hookspecs.PROJECT}_impl"
    names = set()
    for attr in dir(obj):
        opts = getattr(getattr(obj, attr, None), marker, None)
        if isinstance(opts, dict):
            names.add(opts.get("specname") or attr)
    return sorted(names)


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
        row: dict[str, Any] = {
            "name": info.name, "entry_point": info.value, "distribution": info.distribution,
            "version": info.version, "requires_fmtune": info.core_requirement(), "hooks": [],
            "needs": [], "error": None}
        why = info.incompatibility()
        if why:  # not imported: it was not made for this core
            row["error"] = f"incompatible, not loaded: {why}"
            rows.append(row)
            continue
        try:
            obj = info.load()
            row["hooks"] = hook_names(obj)
            row["needs"] = _required(info.name, obj)
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


class _Answers:
    """Which plugin answered each firstresult hook of a run (and which wrappers ran around
    it); lives on its plugin manager (``pm.answers``), installed once per manager."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.answers: dict[str, dict[str, Any]] = {}
        hook = pm.hook
        pending: list[list[tuple[Any, Any]]] = []  # functions swapped in, per call in flight

        def firstresult(hook_name: str) -> bool:
            spec = getattr(getattr(hook, hook_name, None), "spec", None)
            return bool(spec and spec.opts.get("firstresult"))

        def before(hook_name: str, hook_impls: Sequence[Any], kwargs: Mapping[str, Any]
                   ) -> None:
            if not firstresult(hook_name):
                return
            record = self.answers[hook_name] = {"answered_by": None, "wrappers": []}
            swapped = []
            for impl in reversed(hook_impls):  # pluggy's call order
                if impl.wrapper or impl.hookwrapper:
                    record["wrappers"].append(impl.plugin_name)
                    continue
                original = impl.function

                def recorded(*args: Any, _fn: Any = original, _name: str = impl.plugin_name
                             ) -> Any:
                    result = _fn(*args)
                    if result is not None and record["answered_by"] is None:
                        record["answered_by"] = _name
                    return result

                impl.function = recorded
                swapped.append((impl, original))
            pending.append(swapped)

        def after(outcome: Any, hook_name: str, hook_impls: Sequence[Any],
                  kwargs: Mapping[str, Any]) -> None:
            if firstresult(hook_name):
                for impl, original in pending.pop():
                    impl.function = original

        pm.add_hookcall_monitoring(before, after)


def record_answers(pm: pluggy.PluginManager) -> dict[str, dict[str, Any]]:
    """Start (or restart) recording, for every *firstresult* hook call made through ``pm``,
    the plugin whose implementation returned the result and the wrappers that ran around it.

    Returns the dict that fills in: ``{hook: {"answered_by": name or None, "wrappers":
    [names]}}`` (the last call of a hook wins). Calling it again for the same manager starts a
    new, empty dict (one per run); the tracing itself is installed once per manager through
    pluggy's ``add_hookcall_monitoring`` and kept on the manager (``pm.answers``).
    """
    recorder = getattr(pm, "answers", None)
    if not isinstance(recorder, _Answers):
        recorder = _Answers(pm)
        setattr(pm, "answers", recorder)
    recorder.answers = {}
    return recorder.answers
