"""transformers 4 TrainingArguments names that transformers 5 removed (fms-hf-tuning users and
HF example scripts still type them): each is carried over to transformers 5's spelling, or, when
nothing replaces it, accepted at its old default and refused with the reason otherwise."""

from __future__ import annotations

import json

import pytest

from fmtune.cli import load_config
from fmtune.pipeline import training_arguments, validate
from fmtune.testing import run_cli, write_jsonl
from fmtune.training_options import LEGACY, names


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("d") / "train.jsonl",
                       [{"input": f"the cat {i}", "output": "sees"} for i in range(8)])


def args_for(data, tmp_path, *argv):
    config, pm, _, _ = load_config(["--model_name_or_path", "m", "--training_data_path", data,
                                    "--output_dir", str(tmp_path / "o"), *argv])
    validate(config, pm)
    return config, training_arguments(config)


def test_every_legacy_name_is_absent_from_the_installed_transformers_and_is_an_option():
    config, _, _, _ = load_config(["--model_name_or_path", "m", "--output_dir", "o"])
    for name in LEGACY:
        assert name not in names(), f"{name} is a TrainingArguments field again: drop it"
        assert name in config


@pytest.mark.parametrize("argv,field,value", [
    (["--no_cuda"], "use_cpu", True),
    (["--per_gpu_train_batch_size", "3"], "per_device_train_batch_size", 3),
    (["--per_gpu_eval_batch_size", "5"], "per_device_eval_batch_size", 5),
    (["--adafactor", "True"], "optim", "adafactor"),
    (["--group_by_length"], "train_sampling_strategy", "group_by_length"),
    (["--include_inputs_for_metrics"], "include_for_metrics", ["inputs"]),
    (["--torchdynamo", "inductor"], "torch_compile_backend", "inductor"),
    (["--push_to_hub_model_id", "tuned", "--push_to_hub_organization", "acme"],
     "hub_model_id", "acme/tuned"),
])
def test_a_transformers_4_name_reaches_transformers_5s_field(data, tmp_path, argv, field, value):
    _, args = args_for(data, tmp_path, *argv)
    got = getattr(args, field)
    assert (got.value if hasattr(got, "value") else got) == value


def test_overwrite_output_dir_starts_over_as_in_hf_example_scripts(data, tmp_path):
    config, _ = args_for(data, tmp_path, "--overwrite_output_dir")
    assert config.resume_from_checkpoint == "false"


def test_fsdp_layer_names_go_into_fsdp_config(data, tmp_path):
    config, _, _, _ = load_config(["--model_name_or_path", "m", "--training_data_path", data,
                                   "--output_dir", str(tmp_path), "--fsdp_min_num_params",
                                   "1000", "--fsdp_transformer_layer_cls_to_wrap",
                                   "LlamaDecoderLayer"])
    from fmtune.training_options import translate_legacy

    assert translate_legacy(config) == []
    assert config.fsdp_config == {"min_num_params": 1000,
                                  "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}


@pytest.mark.parametrize("argv,line", [
    (["--save_safetensors", "False"], "save_safetensors False: removed in transformers 5 "
     "(transformers 5 always saves safetensors)"),
    (["--past_index", "2"], "past_index 2: removed in transformers 5 (no replacement)"),
    (["--fp16_backend", "apex"], "fp16_backend 'apex': removed in transformers 5"),
])
def test_a_removed_field_with_a_new_value_is_one_line_exit_2(data, tmp_path, argv, line):
    out = tmp_path / "o"
    res = run_cli(["train", "--model_name_or_path", "m", "--training_data_path", data,
                   "--output_dir", str(out), *argv])
    assert res.exit_code == 2 and line in res.stderr
    assert not out.exists()


def test_a_removed_field_at_its_old_default_trains(fmtune_tiny_model, data, tmp_path):
    """HF example scripts pass --save_safetensors True and --overwrite_output_dir: a run."""
    out = tmp_path / "o"
    res = run_cli(["train", "--model_name_or_path", fmtune_tiny_model, "--training_data_path",
                   data, "--output_dir", str(out), "--max_steps", "1", "--save_safetensors",
                   "True", "--overwrite_output_dir", "--per_gpu_train_batch_size", "2",
                   "--no_cuda"])
    assert res.exit_code == 0, res.stderr[-2000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == 1
