"""train_tokens counts every trained token exactly, also with padding-free batches and packing
when the pad token is the eos token (llama tokenizers): transformers' "non-padding" count
(``input_ids != pad_token_id`` for a batch without attention_mask) used to leave out each
example's eos."""

from __future__ import annotations

import json

import pytest

from fmtune.testing import DEMO_RECORDS, DEMO_TEXTS, build_tiny_model, run_cli, write_jsonl


@pytest.fixture(scope="module")
def pad_is_eos_model(tmp_path_factory):
    """The tiny Llama with a tokenizer whose pad token is its eos token."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("pad_is_eos") / "model"
    build_tiny_model(folder, DEMO_TEXTS)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["pad_token_id"] = tok.eos_token_id
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder), tok


@pytest.mark.parametrize("mode", [[], ["--padding_free"], ["--packing", "--max_seq_length",
                                                              "64"]],
                         ids=["padded", "padding_free", "packing"])
def test_train_tokens_are_exact_when_pad_is_eos(pad_is_eos_model, tmp_path, mode):
    model, tok = pad_is_eos_model
    assert tok.pad_token_id == tok.eos_token_id
    records = DEMO_RECORDS[:4]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    out = tmp_path / "out"
    res = run_cli(["train", "--plugins", "data_handlers", "--model_name_or_path", model,
                   "--training_data_path", data, "--output_dir", str(out),
                   "--per_device_train_batch_size", "4", "--num_train_epochs", "1",
                   "--save_strategy", "no", "--logging_steps", "1", *mode])
    assert res.exit_code == 0, res.stderr
    # each record: its input, " " + its output, and the eos the data path appends
    n_tokens = sum(len(tok(r["input"])["input_ids"]) +
                   len(tok(" " + r["output"], add_special_tokens=False)["input_ids"]) + 1
                   for r in records)
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == 1
    assert summary["train_tokens"] == n_tokens
