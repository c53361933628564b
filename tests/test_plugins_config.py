"""Plugin selection and errors, strict config, YAML + CLI precedence, help without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fmtune import hookimpl
from fmtune.cli import load_config
from fmtune.config import ConfigError
from fmtune.plugins import PluginError
from fmtune.testing import run_cli

GOOD_PLUGIN = """
    from fmtune import hookimpl

    @hookimpl
    def add_options(register):
        register("fake_rank", int, 8, "A plugin option.")
        register("fake_mode", str, "a", "Choice.", choices=("a", "b"))
"""

BROKEN_PLUGIN = """
    raise ImportError("this plugin is broken on purpose")
"""

MISSPELLED_HOOK = """
    from fmtune import hookimpl

    @hookimpl
    def on_stepp(run):
        pass
"""

BASE = ["--model_name_or_path", "m", "--training_data_path", "d.jsonl", "--output_dir", "o"]


def test_missing_plugin_is_exit_2_naming_installed(install_fake_plugin):
    install_fake_plugin("goodone", GOOD_PLUGIN)
    res = run_cli(["train", "--plugins", "goodon", *BASE])
    assert res.exit_code == 2
    assert "plugin 'goodon' is not installed" in res.stderr
    assert "did you mean 'goodone'" in res.stderr
    assert "installed plugins: " in res.stderr and "goodone" in res.stderr


def test_broken_plugin_named_is_exit_2_unnamed_is_harmless(install_fake_plugin):
    install_fake_plugin("broken", BROKEN_PLUGIN)
    install_fake_plugin("goodone", GOOD_PLUGIN)
    res = run_cli(["train", "--plugins", "broken", *BASE])
    assert res.exit_code == 2
    assert "plugin 'broken'" in res.stderr and "failed to load" in res.stderr
    assert "broken on purpose" in res.stderr
    # not named: never imported, the config resolves
    config, pm, _, _ = load_config(["--plugins", "goodone", *BASE])
    assert config.fake_rank == 8
    assert "fmtune_fake_broken" not in sys.modules
    # `fmtune plugins` lists it with a warning and still exits 0
    res = run_cli(["plugins"])
    assert res.exit_code == 0
    assert "broken (fmtune-fake-broken 1.2.3)" in res.stdout
    assert "warning: failed to load: ImportError: this plugin is broken on purpose" in res.stdout
    rows = {r["name"]: r for r in json.loads(run_cli(["plugins", "--json"]).stdout)}
    assert rows["goodone"]["hooks"] == ["add_options"]
    assert rows["goodone"]["version"] == "1.2.3"
    assert rows["goodone"]["distribution"] == "fmtune-fake-goodone"
    assert rows["broken"]["error"].startswith("ImportError")
    assert rows["default:training"]["hooks"] == ["build_collator", "build_trainer", "save"]


def test_misspelled_hook_is_an_error(install_fake_plugin):
    install_fake_plugin("typo", MISSPELLED_HOOK)
    with pytest.raises(PluginError, match="on_stepp"):
        load_config(["--plugins", "typo", *BASE])


def test_plugins_from_yaml_and_cli_overrides(tmp_path, install_fake_plugin):
    install_fake_plugin("goodone", GOOD_PLUGIN)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("plugins: [goodone]\nfake_rank: 16\nlearning_rate: 0.001\n"
                   "model_name_or_path: from-yaml\nnum_train_epochs: 2\n")
    config, _, _, _ = load_config(["--config", str(cfg), "--learning_rate", "3e-4",
                                   "--fake_mode=b", "--gradient_checkpointing"])
    assert config.plugins == ["goodone"]
    assert config.fake_rank == 16 and config.source("fake_rank") == str(cfg)
    assert config.learning_rate == 3e-4 and config.source("learning_rate") == "command line"
    assert config.fake_mode == "b"
    assert config.gradient_checkpointing is True
    assert config.model_name_or_path == "from-yaml"
    assert config.num_train_epochs == 2.0
    assert config.per_device_train_batch_size == 8 and config.source("per_device_train_batch_size") == "default"
    # --plugins on the CLI replaces the YAML list: the plugin's keys become unknown
    with pytest.raises(ConfigError, match="'fake_rank' belongs to plugin 'goodone'"):
        load_config(["--config", str(cfg), "--plugins", ""])


def test_unknown_keys_did_you_mean_and_owner_hint(tmp_path, install_fake_plugin):
    install_fake_plugin("goodone", GOOD_PLUGIN)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learnig_rate: 0.1\nfake_rank: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(["--config", str(cfg), "--num_train_epocs", "2"])
    msg = str(err.value)
    assert f"{cfg}: unknown option 'learnig_rate' (did you mean 'learning_rate'?)" in msg
    assert f"{cfg}: option 'fake_rank' belongs to plugin 'goodone', which is not active; " \
           "add --plugins goodone" in msg
    assert "command line: unknown option 'num_train_epocs' (did you mean 'num_train_epochs'?)" in msg
    res = run_cli(["train", "--learnig_rate", "1"])
    assert res.exit_code == 2 and "did you mean 'learning_rate'" in res.stderr


@pytest.mark.parametrize("argv,needle", [
    (["--learning_rate", "fast"], "learning_rate must be a number, got 'fast'"),
    (["--max_steps", "1.5"], "max_steps must be an integer"),
    (["--gradient_checkpointing", "maybe"], "gradient_checkpointing must be true/false"),
    (["--lr_scheduler_type", "cosin"], "lr_scheduler_type must be one of"),
    (["--max_steps"], "--max_steps needs a value"),
    (["stray"], "--output_dir takes one value, got 2"),  # BASE ends with --output_dir X
])
def test_bad_values(argv, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config([*BASE, *argv])
    with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
        load_config(["stray", *BASE])


def test_validate_config_reports_all_problems_at_once():
    res = run_cli(["train", "--dataset_text_field", "text", "--data_formatter_template", "{{a}}",
                   "--eval_strategy", "steps", "--per_device_train_batch_size", "0"])
    assert res.exit_code == 2
    for needle in ("model_name_or_path is required", "training_data_path is required",
                   "output_dir is required", "exclusive", "needs validation_data_path",
                   "per_device_train_batch_size must be >= 1"):
        assert needle in res.stderr


def test_plugin_validate_config_and_options_in_help():
    class Strict:
        @hookimpl
        def add_options(self, register):
            register("strictness", int, 1, "How strict.")

        @hookimpl
        def validate_config(self, config):
            if config.strictness > 3:
                return f"strictness must be <= 3, got {config.strictness}"

    res = run_cli(["train", *BASE, "--strictness", "5"], plugins=[Strict()])
    assert res.exit_code == 2 and "strictness must be <= 3, got 5" in res.stderr
    res = run_cli(["train", "--help"], plugins=[Strict()])
    assert res.exit_code == 0
    assert "--strictness INT" in res.stdout and "--learning_rate FLOAT" in res.stdout


def test_duplicate_option_between_plugins_is_an_error():
    class Dup:
        @hookimpl
        def add_options(self, register):
            register("learning_rate", float, 1.0, "clash")

    with pytest.raises(ConfigError, match="option 'learning_rate' is registered by both"):
        load_config(BASE, extra_plugins=[Dup()])


def _imports_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json\n"
                          "print(json.dumps(sorted(m for m in sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("argv", [["--help"], ["plugins"], ["--version"], ["train", "--help"]])
def test_help_and_plugins_do_not_import_torch(argv):
    mods = _imports_after(
        "import contextlib, io\nfrom fmtune.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()): main({argv!r})")
    assert "torch" not in mods and "transformers" not in mods


def test_console_script_version_and_unknown_command():
    exe = os.path.join(os.path.dirname(sys.executable), "fmtune")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("fmtune 0.")
    out = subprocess.run([exe, "trian"], capture_output=True, text=True)
    assert out.returncode == 2 and "did you mean 'train'" in out.stderr


COMMAND_PLUGIN = """
    def hello(argv):
        print("hello", *argv)
        return 3

    def broken(argv):
        raise AssertionError("never called")
"""


def test_plugin_commands_are_listed_without_import_and_run(install_fake_plugin):
    install_fake_plugin("cmds", COMMAND_PLUGIN, commands={"hello": "hello", "trian": "broken"})
    res = run_cli(["--help"])
    assert "plugin commands" in res.stdout and "hello       from fmtune-fake-cmds" in res.stdout
    assert "fmtune_fake_cmds" not in sys.modules  # listing imported nothing
    res = run_cli(["hello", "a", "b"])
    assert res.exit_code == 3 and res.stdout == "hello a b\n"
    res = run_cli(["train", "--help"])  # core commands cannot be shadowed
    assert res.exit_code == 0 and "usage: fmtune train" in res.stdout


SHARED_A = """
    from fmtune import hookimpl

    @hookimpl
    def add_options(register):
        register("rank_shared", int, 8, "Shared by a family of plugins.", shared=True)
"""


def test_shared_options_and_several_owners(install_fake_plugin):
    install_fake_plugin("fama", SHARED_A)
    install_fake_plugin("famb", SHARED_A)
    config, _, _, _ = load_config(["--plugins", "fama,famb", *BASE, "--rank_shared", "4"])
    assert config.rank_shared == 4  # one option, registered by both
    with pytest.raises(ConfigError, match="option 'rank_shared' belongs to plugins 'fama', "
                                          "'famb', none of them active"):
        load_config([*BASE, "--rank_shared", "4"])

    class NotShared:
        @hookimpl
        def add_options(self, register):
            register("rank_shared", int, 8, "clash")

    with pytest.raises(ConfigError, match="option 'rank_shared' is registered by both"):
        load_config(["--plugins", "fama", *BASE], extra_plugins=[NotShared()])
