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
