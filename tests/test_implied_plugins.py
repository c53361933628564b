"""fms-hf-tuning flags that name a feature activate the installed plugin that declares them
(entry point group ``fmtune.implied_by``), with one log line naming it and its version."""

from __future__ import annotations

import logging

import pytest

from fmtune.cli import load_config
from fmtune.config import ConfigError
from fmtune.plugins import implications, installed

BASE = ["--model_name_or_path", "m", "--output_dir", "o"]


def activated(*argv):
    config, pm, _, _ = load_config([*BASE, *argv])
    return config.plugins


def test_first_party_declarations_name_installed_plugins():
    names = installed()
    specs = {(s.option, s.value): s.plugin for s in implications()}
    assert specs[("peft_method", "lora")] == "lora" and specs[("trackers", "aim")] == "aim"
    assert specs[("data_config_path", None)] == "data_handlers"
    assert all(plugin in names for plugin in specs.values())


@pytest.mark.parametrize("argv,plugins", [
    (["--peft_method", "lora"], ["lora"]),
    (["--peft_method", "pt"], ["prompt_tuning"]),
    (["--peft_method", "none"], []),
    (["--trackers", "aim", "mlflow"], ["aim", "mlflow"]),
    (["--tracker", "aim"], ["aim"]),  # a prefix of --trackers, as argparse takes it
    (["--packing", "True"], ["data_handlers"]),
    (["--packing", "False"], ["data_handlers"]),  # the option is the plugin's
    (["--trainer_controller_config_file", "rules.yaml"], ["trainer_controller"]),
    (["--quantization_method", "mxfp4"], ["mxfp4"]),
    (["--plugins", "qlora", "--peft_method", "lora"], ["qlora"]),  # its own family decides
    (["--training_data_path", "data/Twitter_tokenized.ARROW"], ["data_handlers"]),  # pattern
    (["--training_data_path", "data/train.jsonl"], []),  # the core reads JSON/JSONL
])
def test_flags_activate_their_plugin(argv, plugins):
    assert activated(*argv) == plugins


def test_yaml_keys_activate_too_and_the_activation_is_logged(tmp_path, caplog):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("peft_method: lora\ndata_config_path: d.yaml\n")
    with caplog.at_level(logging.INFO, logger="fmtune"):
        assert activated("--config", str(cfg)) == ["lora", "data_handlers"]
    lines = [r.getMessage() for r in caplog.records if "activates plugin" in r.getMessage()]
    assert lines[0].startswith("--peft_method lora activates plugin 'lora' (fmtune-peft-lora ")
    assert len(lines) == 2


def test_a_tracker_that_is_not_installed_is_an_error():
    from fmtune.pipeline import validate

    config, pm, _, _ = load_config([*BASE, "--trackers", "wandb"])
    with pytest.raises(ConfigError, match="trackers: no installed tracker plugin named 'wandb'"):
        validate(config, pm)


def test_padding_free_huggingface_as_fms_hf_tuning_writes_it():
    config, _, _, _ = load_config([*BASE, "--padding_free", "huggingface"])
    assert config.plugins == ["data_handlers"] and config.padding_free is True


def _catalog_from_sources() -> dict:
    """plugins/*/pyproject.toml -> {distribution: {plugins, implied_by}} (what
    core/fmtune/known_plugins.json must hold)."""
    import tomllib
    from pathlib import Path

    out = {}
    for pyproject in sorted(Path(__file__).parents[1].glob("plugins/*/pyproject.toml")):
        data = tomllib.loads(pyproject.read_text())
        eps = data["project"].get("entry-points", {})
        out[data["project"]["name"]] = {
            "plugins": sorted(eps.get("fmtune", {})),
            "implied_by": dict(sorted(eps.get("fmtune.implied_by", {}).items())),
        }
    return out


def test_known_plugins_catalog_matches_the_plugins_pyprojects():
    """The core's catalog of first-party distributions is data generated from the plugins'
    own declarations (FMTUNE_WRITE_DOCS=1 rewrites it)."""
    import json

    from fmtune.plugins import KNOWN_FILE
    from fmtune.testing import check_generated

    check_generated(KNOWN_FILE, json.dumps(_catalog_from_sources(), indent=1) + "\n",
                    "core/fmtune/known_plugins.json")


@pytest.mark.parametrize("argv,line", [
    (["--peft_method", "lora"], "--peft_method lora needs plugin 'lora', which is not "
     "installed: pip install fmtune-peft-lora"),
    (["--tracker", "aim"], "--trackers aim needs plugin 'aim', which is not installed: "
     "pip install fmtune-aim"),
    (["--data_config", "d.yaml"], "--data_config_path needs plugin 'data_handlers', which is "
     "not installed: pip install fmtune-data-handlers"),
])
def test_a_flag_whose_plugin_is_not_installed_names_the_distribution(monkeypatch, argv, line):
    """As a user with only the core installed sees it: one line, the pip command."""
    import fmtune.plugins as plugins

    everything = plugins.installed()
    dist = {"lora": "fmtune-peft-lora", "aim": "fmtune-aim",
            "data_handlers": "fmtune-data-handlers"}[line.split("'")[1]]
    monkeypatch.setattr(plugins, "installed", lambda: {
        n: i for n, i in everything.items() if i.distribution != dist})
    with pytest.raises(ConfigError) as err:
        load_config([*BASE, *argv])
    assert str(err.value) == line


def test_plugins_names_a_missing_first_party_plugins_distribution(monkeypatch):
    import fmtune.plugins as plugins

    everything = plugins.installed()
    monkeypatch.setattr(plugins, "installed", lambda: {
        n: i for n, i in everything.items() if n != "mlflow"})
    with pytest.raises(plugins.PluginError, match=r"plugin 'mlflow' is not installed "
                       r"\(pip install fmtune-mlflow\)"):
        plugins.load(["mlflow"])


def test_chat_records_activate_the_plugin_that_reads_them(tmp_path):
    """fms-hf-tuning reads chat data (a `messages` list of turns) with no flag; fmtune's core
    reads input/output and text records, so a chat training file activates the chat reader."""
    from fmtune.testing import write_jsonl

    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    conv = tmp_path / "conv.json"
    conv.write_text('[{"conversations": [{"role": "user", "content": "hi"}]}]')
    io = write_jsonl(tmp_path / "io.jsonl", [{"input": "a", "output": "b"}])
    assert activated("--training_data_path", chat) == ["data_handlers"]
    assert activated("--training_data_path", str(conv)) == ["data_handlers"]
    assert activated("--training_data_path", io) == []
    # a text field chosen by the user: the core reads the file
    assert activated("--training_data_path", chat, "--dataset_text_field", "x") == []


@pytest.mark.parametrize("argv", [
    ["--plugins", "vision"],
    ["--dataset_image_field", "images"],  # vision implied: it reads the file
])
def test_a_plugin_that_reads_the_data_itself_keeps_a_parquet_file_from_asking_for_another(
        monkeypatch, tmp_path, argv):
    """A parquet (or arrow) training file asks for data_handlers, unless an active plugin
    declares it reads such files itself (entry point group ``fmtune.handles``: vision reads
    parquet conversations): then data_handlers is neither activated nor required."""
    import fmtune.plugins as plugins
    from fmtune.testing import write_jsonl

    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "images": []}])
    data = ["--training_data_path", "train.parquet", "--validation_data_path", "dev.ARROW"]
    assert activated(*argv, *data) == ["vision"]
    assert activated(*argv, "--training_data_path", chat) == ["vision"]
    everything = plugins.installed()
    monkeypatch.setattr(plugins, "installed", lambda: {
        n: i for n, i in everything.items() if i.distribution != "fmtune-data-handlers"})
    assert activated(*argv, *data) == ["vision"]
    # a plugin that does not read the data itself: the file still asks for data_handlers
    with pytest.raises(ConfigError) as err:
        load_config([*BASE, "--plugins", "lora", *data])
    assert str(err.value) == (
        "--training_data_path *.parquet needs plugin 'data_handlers', which is not installed: "
        "pip install fmtune-data-handlers")


def test_handles_declarations_name_their_own_plugin():
    """``fmtune.handles`` entry points name a plugin of their own distribution (a plugin
    cannot declare what another one handles)."""
    from fmtune.plugins import HANDLES_GROUP

    names = installed()
    specs = implications(HANDLES_GROUP)
    assert ("training_data_path", "*.parquet", "vision") in {
        (s.option, s.value, s.plugin) for s in specs}
    assert all(names[s.plugin].distribution == s.distribution for s in specs)
