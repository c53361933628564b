"""The command-line grammar of transformers' HfArgumentParser (argparse), which fms-hf-tuning's
users type: bare booleans, True/False values, space-separated lists, --a=b, JSON dicts,
unambiguous prefixes, shell-typed escapes in templates; and every TrainingArguments field."""

from __future__ import annotations

import pytest

from fmtune.cli import load_config
from fmtune.config import ConfigError

BASE = ["--model_name_or_path", "m", "--output_dir", "o"]


def parse(*argv, plugins=()):
    extra = ["--plugins", ",".join(plugins)] if plugins else []
    config, _, _, _ = load_config([*extra, *BASE, *argv])
    return config


def test_booleans_bare_and_valued():
    c = parse("--gradient_checkpointing", "--use_cpu", "False", "--bf16=true")
    assert (c.gradient_checkpointing, c.use_cpu, c.bf16) == (True, False, True)
    assert c.source("bf16") == "command line" and c.source("fp16") == "default"


def test_space_separated_and_comma_separated_lists():
    c = parse("--tokenizer_train_files", "a.txt", "b.txt", "--label_names", "labels")
    assert c.tokenizer_train_files == ["a.txt", "b.txt"] and c.label_names == ["labels"]
    assert parse("--tokenizer_train_files", "a.txt,b.txt").tokenizer_train_files == ["a.txt",
                                                                                     "b.txt"]


def test_prefixes_like_argparse():
    c = parse("--num_train_epoch", "2", "--per_device_train", "3", "--response_templ", "x")
    assert (c.num_train_epochs, c.per_device_train_batch_size, c.response_template) == (2.0, 3,
                                                                                        "x")
    with pytest.raises(ConfigError, match=r"--per_device is ambiguous: it could be "
                                          r"--per_device_eval_batch_size, "
                                          r"--per_device_train_batch_size"):
        parse("--per_device", "3")


def test_templates_unescaped_as_fms_hf_tuning_does():
    c = parse("--response_template", "\\n### Label:", "--data_formatter_template",
              "### Input: {{input}}\\n\\n### Response:", "--dataset_text_field", "a\\nb")
    assert c.response_template == "\n### Label:"
    assert c.data_formatter_template == "### Input: {{input}}\n\n### Response:"
    assert c.dataset_text_field == "a\\nb"  # not a template: left as typed


def test_every_training_arguments_field_is_an_option():
    from transformers import TrainingArguments
    import dataclasses

    c = parse("--logging_strategy", "epoch", "--report_to", "none", "--lr_scheduler_kwargs",
              '{"min_lr": 1e-6}', "--adam_beta1", "0.8", "--save_only_model",
              "--neftune_noise_alpha", "5", "--dataloader_num_workers", "0")
    assert c.logging_strategy == "epoch" and c.lr_scheduler_kwargs == {"min_lr": 1e-6}
    assert (c.adam_beta1, c.save_only_model, c.neftune_noise_alpha) == (0.8, True, 5.0)
    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    missing = sorted(f for f in fields if f not in c and not f.startswith("_"))
    assert missing == [], missing


@pytest.mark.parametrize("argv,needle", [
    (["--logging_strategy", "often"], "logging_strategy must be one of no, steps, epoch"),
    (["--adam_beta1", "high"], "adam_beta1 must be a number, got 'high'"),
    (["--bf16", "maybe"], "bf16 must be true/false"),
    (["--learning_rate", "1", "2"], "--learning_rate takes one value, got 2: 1 2"),
    (["--lr_scheduler_kwargs", "{oops"], "lr_scheduler_kwargs must be a mapping"),
    (["--save_strategy"], "--save_strategy needs a value"),
])
def test_bad_values_are_one_line_errors(argv, needle):
    with pytest.raises(ConfigError) as err:
        parse(*argv)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_training_arguments_receive_what_the_user_set(tmp_path):
    from fmtune.pipeline import training_arguments

    c = parse("--output_dir", str(tmp_path), "--logging_strategy", "epoch", "--adam_beta2",
              "0.95", "--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs",
              '{"min_lr": 1e-6}', "--save_only_model", "true", "--use_cpu")
    args = training_arguments(c)
    assert (args.logging_strategy, args.adam_beta2, args.save_only_model) == ("epoch", 0.95, True)
    assert args.lr_scheduler_kwargs == {"min_lr": 1e-6}
    # transformers' own checks become one-line errors
    bad = parse("--output_dir", str(tmp_path), "--use_cpu", "--load_best_model_at_end",
                "--eval_strategy", "steps", "--save_strategy", "epoch")
    with pytest.raises(ConfigError, match="transformers refused the training options"):
        training_arguments(bad)


@pytest.mark.parametrize("argv,needle", [
    (["--num_train_epochs", "0"], "num_train_epochs must be > 0 (or give max_steps), got 0.0"),
    (["--num_train_epochs", "-1"], "num_train_epochs must be > 0"),
    (["--max_steps", "0"], "max_steps must be a positive number of steps"),
    (["--learning_rate", "inf"], "learning_rate must be a finite number >= 0, got inf"),
    (["--learning_rate", "nan"], "learning_rate must be a finite number >= 0, got nan"),
    (["--logging_steps", "0"], "logging_steps must be > 0"),
    (["--save_steps", "-5"], "save_steps must be > 0"),
])
def test_values_that_would_train_nothing_or_diverge_are_refused(argv, needle, tmp_path):
    """fms-hf-tuning (transformers) refuses these, or trains nothing and reports success."""
    from fmtune.testing import run_cli

    res = run_cli(["train", *BASE[:2], "--output_dir", str(tmp_path / "o"),
                   "--training_data_path", "d.jsonl", *argv])
    assert res.exit_code == 2 and needle in res.stderr, res.stderr
    assert not (tmp_path / "o").exists()
    # max_steps overrides epochs, as in transformers
    c = parse("--num_train_epochs", "0", "--max_steps", "3")
    assert (c.num_train_epochs, c.max_steps) == (0.0, 3)


def test_fms_acceleration_flags_are_refused_with_what_to_use(tmp_path):
    from fmtune.testing import run_cli

    res = run_cli(["train", *BASE[:2], "--output_dir", str(tmp_path / "o"),
                   "--training_data_path", "d.jsonl", "--fast_kernels", "True", "True", "True"])
    assert res.exit_code == 2
    assert ("fast_kernels: fms-acceleration's fast_kernels is not part of fmtune; use "
            "--use_liger_kernel") in res.stderr
    # multipack is served (data_handlers, with --padding_free, as fms-hf-tuning needs it)
    res = run_cli(["train", *BASE[:2], "--output_dir", str(tmp_path / "o"),
                   "--training_data_path", "d.jsonl", "--multipack", "16"])
    assert res.exit_code == 2 and (
        "--multipack needs --padding_free (as in fms-hf-tuning): a multipack batch is given to "
        "the model as one row without padding") in res.stderr, res.stderr


def test_embedding_size_multiple_of(fmtune_tiny_model, tmp_path):
    """fms-hf-tuning's embedding_size_multiple_of: rows rounded up after the tokenizer grew."""
    from fmtune.testing import DEMO_RECORDS, train, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", DEMO_RECORDS)
    rec = train(["train", "--model_name_or_path", fmtune_tiny_model, "--training_data_path", data,
                 "--output_dir", str(tmp_path / "o"), "--max_steps", "1",
                 "--embedding_size_multiple_of", "64"])
    rows = rec.model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows >= 400 > rows - 64
