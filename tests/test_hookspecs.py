"""The plugin contract's machinery: plugin-owned hook specs (``add_hookspecs``), collecting a
plugin registry (``fmtune.plugins.collect``), plugins that need other plugins
(``fmtune_plugins``), the typed specs, and every hook documented with its real signature."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path

import pluggy
import pytest

from fmtune import hookimpl, hookspecs
from fmtune.cli import load_config
from fmtune.config import ConfigError
from fmtune.hookspecs import CONTROL_FLAGS, ControlDecision, hookspec
from fmtune.plugins import (PluginError, active, collect, hook_names, load, new_manager,
                            record_answers)
from fmtune.testing import run_cli

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--model_name_or_path", "m", "--training_data_path", "d.jsonl", "--output_dir", "o"]


class WidgetSpecs:
    """A registry hook owned by an in-test plugin."""

    @staticmethod
    @hookspec
    def register_widgets(register, config, tokenizer):
        """``register(name, obj)``."""


class Owner:
    """Owns ``register_widgets`` and registers two widgets itself."""

    __name__ = "owner"

    @hookimpl
    def add_hookspecs(self, pluginmanager):
        pluginmanager.add_hookspecs(WidgetSpecs)

    @hookimpl
    def register_widgets(self, register):
        register("gear", 1)
        register("lever", 2)


def manager(*plugins):
    pm = new_manager()
    for p in plugins:
        pm.register(p, name=getattr(p, "__name__", None))
    return pm


# ----------------------------------------------------------------- collect


def test_collect_calls_each_implementation_with_the_arguments_it_names():
    seen = {}

    class Third:
        __name__ = "third"

        @hookimpl
        def register_widgets(self, config, register):  # any order, by name
            seen["config"] = config
            register("spring", config["size"])

    pm = manager(Owner(), Third())
    found = collect(pm, "register_widgets", "widget", config={"size": 3}, tokenizer="unused")
    assert found == {"gear": 1, "lever": 2, "spring": 3}
    assert list(found) == ["gear", "lever", "spring"]  # registration order
    assert found.owners == {"gear": "owner", "lever": "owner", "spring": "third"}
    assert seen == {"config": {"size": 3}}
    # no implementation and no spec: nothing to collect
    assert collect(pm, "register_nothing", "thing") == {}


@pytest.mark.parametrize("opts", [{"wrapper": True}, {"hookwrapper": True}])
def test_collect_refuses_a_wrapper(opts):
    class Wrapping:
        __name__ = "wrapping"

        @hookimpl(**opts)
        def register_widgets(self, register):
            register("sneaky", 0)
            yield

    with pytest.raises(PluginError) as e:
        collect(manager(Owner(), Wrapping()), "register_widgets", "widget")
    assert str(e.value).startswith("plugin 'wrapping': register_widgets cannot be a wrapper")
    assert "\n" not in str(e.value)


def test_collect_names_both_plugins_of_a_duplicate():
    class Clash:
        __name__ = "clash"

        @hookimpl
        def register_widgets(self, register):
            register("gear", 9)

    with pytest.raises(PluginError) as e:
        collect(manager(Owner(), Clash()), "register_widgets", "widget")
    assert str(e.value) == "widget 'gear' is registered by both 'owner' and 'clash'"
    assert isinstance(e.value, ConfigError)


def test_collect_reports_a_failing_or_unanswerable_implementation_in_one_line():
    class Raising:
        __name__ = "raising"

        @hookimpl
        def register_widgets(self, register):
            raise ValueError("no widgets\ntoday")

    with pytest.raises(PluginError) as e:
        collect(manager(Owner(), Raising()), "register_widgets", "widget")
    assert str(e.value) == "plugin 'raising': register_widgets failed: ValueError: no widgets today"

    class Needy:
        __name__ = "needy"

        @hookimpl
        def register_widgets(self, register, tokenizer):
            register("x", tokenizer)

    with pytest.raises(PluginError) as e:  # the caller supplies no tokenizer: no TypeError
        collect(manager(Owner(), Needy()), "register_widgets", "widget", config=None)
    assert str(e.value) == ("plugin 'needy': register_widgets(register, tokenizer) asks for "
                            "'tokenizer', which the caller does not supply (it supplies config, "
                            "register)")


def test_collect_can_report_every_problem_and_check_and_make_entries():
    class Messy:
        __name__ = "messy"

        @hookimpl
        def register_widgets(self, register):
            register("", 1)
            register("big", 1000)
            register("odd", "seven")
            register("kinded", 4, kind="fast")
            register("gear", 5)

    problems: list[str] = []

    def make(value, kind="slow"):
        if not isinstance(value, int):
            raise TypeError(f"a widget is a number, got {value!r}")
        return (value, kind)

    def check(name, entry):
        return f"widget {name!r} is too big" if entry[0] > 100 else None

    found = collect(manager(Owner(), Messy()), "register_widgets", "widget", check=check,
                    make=make, problems=problems)
    assert found == {"gear": (1, "slow"), "lever": (2, "slow"), "kinded": (4, "fast")}
    assert problems == [
        "plugin 'messy': widget name must be a non-empty string, got ''",
        "plugin 'messy': widget 'big' is too big",
        "plugin 'messy': widget 'odd': a widget is a number, got 'seven'",
        "widget 'gear' is registered by both 'owner' and 'messy'",
    ]
    # without make: register takes (name, obj)
    class Kinded:
        __name__ = "kinded"

        @hookimpl
        def register_widgets(self, register):
            register("kinded", 4, kind="fast")

    with pytest.raises(PluginError, match=r"plugin 'kinded': widget 'kinded': register takes "
                                          r"\(name, obj\), got 3 arguments"):
        collect(manager(Owner(), Kinded()), "register_widgets", "widget")


def test_add_options_is_collected_the_same_way():
    """The core's own option registry: a wrapper is refused (it was silently dropped) and an
    implementation without ``register`` runs (it was a TypeError traceback)."""

    class Wrapped:
        @hookimpl(wrapper=True)
        def add_options(self, register):
            register("wrapped_option", int, 1, "never seen")
            return (yield)

    res = run_cli(["train", *BASE], plugins=[Wrapped()])
    assert res.exit_code == 2 and "add_options cannot be a wrapper" in res.stderr
    assert "Traceback" not in res.stderr

    class NoArgs:
        __name__ = "noargs"

        @hookimpl
        def add_options(self):
            self.called = True

    plugin = NoArgs()
    config, _, _, _ = load_config(BASE, extra_plugins=[plugin])
    assert plugin.called is True and config.model_name_or_path == "m"


# ------------------------------------------------------------- add_hookspecs


def test_a_plugin_adds_its_specs_and_earlier_implementations_are_validated():
    class Early:
        __name__ = "early"

        @hookimpl
        def register_widgets(self, regster):  # misspelled argument
            pass

    pm = new_manager()
    pm.register(Early(), name="early")  # no spec yet: nothing to check
    with pytest.raises(pluggy.PluginValidationError, match="regster"):
        pm.register(Owner(), name="owner")  # its spec arrives: Early is checked

    pm = manager(Owner())
    assert pm.hook.register_widgets.spec.argnames == ("register", "config", "tokenizer")


PLUGIN_OWNER = """
    from fmtune import hookimpl
    from fmtune.hookspecs import hookspec

    class Specs:
        @staticmethod
        @hookspec
        def register_gizmos(register):
            "register(name, obj)"

    @hookimpl
    def add_hookspecs(pluginmanager):
        pluginmanager.add_hookspecs(Specs)

    @hookimpl
    def add_options(register):
        register("gizmo_size", int, 1, "Size of the gizmos.")
"""

PLUGIN_USER = """
    from fmtune import hookimpl

    fmtune_plugins = {needs!r}

    @hookimpl
    def register_gizmos(register):
        register("cog", 1)
"""


def test_a_hook_of_an_inactive_plugin_names_that_plugin(install_fake_plugin):
    install_fake_plugin("gizmoowner", PLUGIN_OWNER)
    install_fake_plugin("gizmouser", PLUGIN_USER.format(needs=[]))
    with pytest.raises(PluginError) as e:
        load(["gizmouser"])
    assert str(e.value) == ("plugin 'gizmouser' implements register_gizmos, which no active "
                            "plugin defines (it is the hook of plugin 'gizmoowner': add "
                            "--plugins gizmoowner)")
    pm = load(["gizmouser", "gizmoowner"])
    assert collect(pm, "register_gizmos", "gizmo") == {"cog": 1}
    # a hook nobody defines: a typo, with a suggestion
    pm = new_manager()

    class Typo:
        @hookimpl
        def on_stepp(self, run):
            pass

    pm.register(Typo(), name="typo")
    with pytest.raises(PluginError) as e:
        load([], pm)
    assert str(e.value).startswith("plugin 'typo' implements on_stepp, which is not a hook of "
                                   "fmtune or of any active plugin (did you mean 'on_step'?)")


def test_an_implementation_refused_at_registration_is_one_line():
    class BadArgs:
        __name__ = "badargs"

        @hookimpl
        def on_step(self, run, nonsense):
            pass

    res = run_cli(["train", *BASE], plugins=[BadArgs()])
    assert res.exit_code == 2
    (line,) = [x for x in res.stderr.splitlines() if "error" in x]
    assert line.startswith("fmtune: error: plugin 'badargs': ") and "nonsense" in line


# ------------------------------------------------------------ fmtune_plugins


def test_a_plugin_activates_the_plugins_it_needs(install_fake_plugin):
    install_fake_plugin("gizmoowner", PLUGIN_OWNER)
    install_fake_plugin("gizmouser", PLUGIN_USER.format(needs=["gizmoowner"]))
    pm = load(["gizmouser"])
    assert active(pm) == ["gizmoowner", "gizmouser"]  # the needed plugin first
    assert collect(pm, "register_gizmos", "gizmo") == {"cog": 1}
    # the needed plugin's options are flags; config.plugins lists it
    config, pm, _, _ = load_config(["--plugins", "gizmouser", "--gizmo_size", "3", *BASE])
    assert config.gizmo_size == 3 and config.plugins == ["gizmoowner", "gizmouser"]
    res = run_cli(["plugins", "--json"])
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["gizmouser"]["needs"] == ["gizmoowner"]
    assert rows["gizmouser"]["hooks"] == ["register_gizmos"]
    assert rows["gizmoowner"]["hooks"] == ["add_hookspecs", "add_options"]
    assert "needs: gizmoowner (activated with it)" in run_cli(["plugins"]).stdout


def test_needed_plugins_load_once_even_in_a_cycle(install_fake_plugin):
    install_fake_plugin("ping", "fmtune_plugins = 'pong'\n")
    install_fake_plugin("pong", "fmtune_plugins = ['ping', 'pong']\n")
    pm = load(["ping", "pong"])
    assert active(pm) == ["pong", "ping"]


def test_a_needed_plugin_that_is_missing_names_both(install_fake_plugin, monkeypatch):
    import fmtune.plugins as plugins

    install_fake_plugin("strange", "fmtune_plugins = [3]\n")
    with pytest.raises(PluginError, match=r"plugin 'strange': fmtune_plugins must be a list of "
                                          r"plugin names, got \[3\]"):
        load(["strange"])
    install_fake_plugin("tickets", "fmtune_plugins = ['data_handlers']\n")
    everything = plugins.installed()
    monkeypatch.setattr(plugins, "installed", lambda: {
        n: i for n, i in everything.items() if n != "data_handlers"})
    res = run_cli(["train", "--plugins", "tickets", *BASE])
    assert res.exit_code == 2
    assert res.stderr.splitlines()[-1].startswith(
        "fmtune: error: plugin 'tickets' needs plugin 'data_handlers' (pip install "
        "fmtune-data-handlers), which is not installed; installed plugins: ")


# -------------------------------------------------------------- typed specs


def test_control_decision_and_flags():
    assert CONTROL_FLAGS == ("should_training_stop", "should_epoch_stop", "should_save",
                             "should_evaluate", "should_log")
    assert ControlDecision.__total__ is False
    from fmtune.pipeline import CONTROL_FLAGS as pipeline_flags
    from fmtune_trainer_controller.events import CONTROL_FLAGS as tc_flags

    assert pipeline_flags is CONTROL_FLAGS and tc_flags is CONTROL_FLAGS


def test_the_core_names_no_plugin_concept_and_its_specs_are_typed():
    specs = {n: getattr(hookspecs, n) for n in dir(hookspecs)
             if hasattr(getattr(hookspecs, n), "fmtune_spec")}
    assert not [n for n in specs if n.startswith("register_")]
    assert not hasattr(hookspecs, "PLUGIN_CALLED")
    assert specs["add_hookspecs"].fmtune_spec["historic"] is True
    for name, fn in specs.items():
        sig = inspect.signature(fn)
        untyped = [p for p in sig.parameters.values() if p.annotation is inspect.Parameter.empty]
        assert not untyped and sig.return_annotation is not inspect.Signature.empty, name
        assert "Any" not in [p.annotation for p in sig.parameters.values()], name


def test_importing_the_contract_is_cheap():
    code = ("import sys, fmtune.hookspecs, fmtune.plugins, fmtune.stash, fmtune.config\n"
            "heavy = [m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_answers_live_on_the_manager():
    pm = new_manager()
    first = record_answers(pm)
    assert pm.answers.answers is first
    second = record_answers(pm)
    assert second == {} and second is not first and pm.answers.answers is second
    import fmtune.plugins as plugins

    assert not [n for n, v in vars(plugins).items() if type(v).__name__ == "WeakKeyDictionary"]


# --------------------------------------------------------------------- docs


SIGNATURE = re.compile(r"`(\w+)\(([^)`]*)\)`")


def spec_signatures(namespace) -> dict[str, list[str]]:
    return {n: list(inspect.signature(getattr(namespace, n)).parameters)
            for n in dir(namespace) if hasattr(getattr(namespace, n), "fmtune_spec")}


def documented(text: str) -> dict[str, list[list[str]]]:
    found: dict[str, list[list[str]]] = {}
    for name, args in SIGNATURE.findall(text):
        found.setdefault(name, []).append([a.strip() for a in args.split(",") if a.strip()])
    return found


def hooks_table() -> str:
    text = (ROOT / "docs/plugins.md").read_text()
    section = text.split("\n## The hooks\n", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line.split("|")[1] for line in section.splitlines()
                     if line.startswith("| `"))


def first_party_plugin_specs() -> dict[str, tuple[Path, dict[str, list[str]]]]:
    """``{plugin dir: (README, {hook: args})}`` for each first-party plugin that adds specs."""
    out = {}
    for pyproject in sorted(ROOT.glob("plugins/*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text())["project"]
        specs: dict[str, list[str]] = {}
        for name, value in project.get("entry-points", {}).get("fmtune", {}).items():
            plugin = EntryPoint(name, value, "fmtune").load()
            if not hasattr(getattr(plugin, "add_hookspecs", None), "fmtune_impl"):
                continue
            probe = pluggy.PluginManager("fmtune")
            plugin.add_hookspecs(probe)
            for name, caller in vars(probe.hook).items():
                if not name.startswith("_") and caller.has_spec():
                    specs[name] = list(inspect.signature(caller.spec.function).parameters)
        if specs:
            out[pyproject.parent.name] = (pyproject.parent / "README.md", specs)
    return out


def test_every_core_hook_is_in_the_docs_table_with_its_real_signature():
    table = documented(hooks_table())
    specs = spec_signatures(hookspecs)
    assert sorted(table) == sorted(specs)  # every hook, and nothing that is not one
    for name, args in specs.items():
        assert table[name] == [args], f"docs/plugins.md documents {name}{table[name]}, " \
                                      f"the spec is {name}({', '.join(args)})"


def test_every_plugin_owned_hook_is_in_its_plugins_readme():
    """A first-party plugin's own hooks are documented in its README (docs/plugins.md names
    the core's): `hook(arg, ...)` with the spec's arguments, in backticks."""
    owned = first_party_plugin_specs()
    assert "trainer_controller" in owned
    for readme, specs in owned.values():
        docs = documented(readme.read_text())
        for name, args in specs.items():
            assert args in docs.get(name, []), \
                f"{readme.relative_to(ROOT)} must document `{name}({', '.join(args)})`"


def test_plugins_lists_every_installed_plugins_hooks():
    rows = {r["name"]: r for r in json.loads(run_cli(["plugins", "--json"]).stdout)}
    tc = rows["trainer_controller"]["hooks"]
    assert {"add_hookspecs", "register_controller_metrics", "register_controller_operations",
            "on_step", "validate_config"} <= set(tc)
    from fmtune_trainer_controller import plugin

    assert hook_names(plugin) == tc
