"""fms-hf-tuning's documented command lines (../shared/seeds: README, training docs), typed
with only `python tuning/sft_trainer.py` replaced by `fmtune train`, on a tiny local model and
data in the documented shapes. Epochs are cut down; every flag is kept as written."""

from __future__ import annotations

import json

import pytest

from fmtune.testing import run_cli, write_jsonl

# (name, flags as written in the seeds after the model/data/output flags)
SEEDS = {
    "single-gpu (training.md, older README)": [
        "--num_train_epochs", "1", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4", "--gradient_accumulation_steps", "4",
        "--evaluation_strategy", "no", "--save_strategy", "epoch", "--learning_rate", "1e-5",
        "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine",
        "--logging_steps", "1", "--include_tokens_per_second", "--packing", "False",
        "--response_template", "\\n### Label:", "--dataset_text_field", "output"],
    "lora (older README)": [
        "--num_train_epochs", "1", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4", "--gradient_accumulation_steps", "4",
        "--save_strategy", "epoch", "--learning_rate", "1e-4", "--weight_decay", "0.",
        "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1",
        "--include_tokens_per_second", "--packing", "False", "--response_template",
        "\\n### Label:", "--dataset_text_field", "output", "--use_flash_attn", "False",
        "--torch_dtype", "float32", "--peft_method", "lora", "--logging_strategy", "epoch",
        "--r", "8", "--lora_dropout", "0.05", "--lora_alpha", "16",
        "--target_modules", "q_proj", "v_proj", "k_proj", "o_proj"],
    "formatter template (training.md)": [
        "--num_train_epochs", "1", "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "4", "--learning_rate", "1e-5",
        "--response_template", "\\n## Label:",
        "--data_formatter_template", "### Input: {{input}} \\n\\n## Label: {{output}}"],
}


@pytest.fixture(scope="module")
def seed_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("seed-data")
    single = write_jsonl(d / "twitter_complaints_single.jsonl", [
        {"output": f"### Text: the red cat sees {i}\n\n### Label: no complaint"}
        for i in range(16)])
    io = d / "twitter_complaints_io.json"
    io.write_text(json.dumps([{"input": f"the red cat {i}", "output": "no complaint"}
                              for i in range(16)]))
    return {"single": single, "io": str(io)}


@pytest.mark.parametrize("name", list(SEEDS))
def test_seed_command_runs(name, fmtune_tiny_model, seed_data, tmp_path):
    data = seed_data["io" if "formatter" in name else "single"]
    out = tmp_path / "out"
    res = run_cli(["train", "--model_name_or_path", fmtune_tiny_model,
                   "--tokenizer_name_or_path", fmtune_tiny_model, "--training_data_path", data,
                   "--output_dir", str(out), *SEEDS[name]])
    assert res.exit_code == 0, res.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == 1 and summary["train_tokens"] > 0
    # --packing implies the data plugin, --peft_method lora the lora plugin: no --plugins typed
    assert ("data_handlers" in summary["plugins"]) == ("--packing" in SEEDS[name])
    assert ("lora" in summary["plugins"]) == ("lora" in name)
    if "lora" in name:
        adapter = json.loads((out / "adapter_config.json").read_text())
        assert sorted(adapter["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
        assert (adapter["r"], adapter["lora_alpha"]) == (8, 16)


def test_seed_typo_fails_like_argparse(fmtune_tiny_model, seed_data, tmp_path):
    """training.md writes `--data_formatter_template:` (a stray colon): fms-hf-tuning's argparse
    refuses it, and so does fmtune, in one line."""
    res = run_cli(["train", "--model_name_or_path", fmtune_tiny_model, "--training_data_path",
                   seed_data["io"], "--output_dir", str(tmp_path / "o"),
                   "--data_formatter_template:", "### Input: {{input}}"])
    assert res.exit_code == 2
    assert "unknown option 'data_formatter_template:' (did you mean 'data_formatter_template'?)" \
        in res.stderr
    assert not (tmp_path / "o").exists()
