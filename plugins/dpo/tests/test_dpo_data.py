"""Preference data: text and chat records tokenized into TRL's columns, errors, preview."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from fmtune.commands import load_config
from fmtune.testing import run_cli, write_jsonl
from fmtune_dpo.data import prepare

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def prepared(model, data, tmp_path, *extra):
    config, pm, _, _ = load_config(["--plugins", "dpo", "--model_name_or_path", model,
                                    "--training_data_path", data,
                                    "--output_dir", str(tmp_path / "out"), *extra])
    tok = pm.hook.load_tokenizer(config=config)
    return tok, prepare(config, tok)


def test_text_records_are_tokenized_like_inference(fmtune_tiny_model, tmp_path):
    recs = [{"prompt": "translate: the red cat =", "chosen": " le chat rouge",
             "rejected": " un chien"}]
    tok, (train, evalset, counts) = prepared(
        fmtune_tiny_model, write_jsonl(tmp_path / "p.jsonl", recs), tmp_path)
    assert evalset is None and counts["train"].kept == 1
    row = train[0]
    assert row["prompt_ids"] == tok(recs[0]["prompt"])["input_ids"]
    for name in ("chosen", "rejected"):
        full = tok(recs[0]["prompt"] + recs[0][name])["input_ids"]
        assert row["prompt_ids"] + row[f"{name}_ids"] == full + [tok.eos_token_id]
        assert tok.decode(row[f"{name}_ids"]) == recs[0][name] + tok.eos_token


def test_chat_records_use_the_chat_template(fmtune_tiny_model, tmp_path):
    recs = [
        {"prompt": [{"role": "user", "content": "hello there"}], "chosen": "hi, how can I help?",
         "rejected": [{"role": "assistant", "content": "no"}]},
        # no prompt: the shared first turns of chosen and rejected are the prompt
        {"chosen": [{"role": "user", "content": "two plus two?"},
                    {"role": "assistant", "content": "four"}],
         "rejected": [{"role": "user", "content": "two plus two?"},
                      {"role": "assistant", "content": "five"}]},
    ]
    tok, (train, _, _) = prepared(fmtune_tiny_model, write_jsonl(tmp_path / "c.jsonl", recs),
                                  tmp_path, "--chat_template", TEMPLATE)
    assert tok.decode(train[0]["prompt_ids"]) == "<|user|> hello there\n<|assistant|>"
    assert tok.decode(train[0]["chosen_ids"]) == " hi, how can I help?\n"
    assert tok.decode(train[0]["rejected_ids"]) == " no\n"
    assert tok.decode(train[1]["prompt_ids"]) == "<|user|> two plus two?\n<|assistant|>"
    assert tok.decode(train[1]["chosen_ids"]) == " four\n"
    assert tok.decode(train[1]["rejected_ids"]) == " five\n"


def test_truncation_and_drops_are_counted(fmtune_tiny_model, tmp_path):
    long_prompt = "the quick brown fox jumps over the lazy dog " * 4
    recs = [{"prompt": "hello", "chosen": " there", "rejected": " there"},
            {"prompt": long_prompt, "chosen": " yes", "rejected": " no"},
            {"prompt": "hello", "chosen": " the quick brown fox jumps over the lazy dog",
             "rejected": " no"}]
    tok, (train, _, counts) = prepared(fmtune_tiny_model, write_jsonl(tmp_path / "d.jsonl", recs),
                                       tmp_path, "--max_seq_length", "8")
    assert len(train) == 1
    assert len(train[0]["prompt_ids"]) + len(train[0]["chosen_ids"]) == 8
    assert counts["train"].line() == ("1 kept, 1 truncated at max_seq_length, 2 dropped "
                                      "(1 chosen equals rejected; 1 prompt fills max_seq_length)")


@pytest.mark.parametrize("records, message", [
    ([{"prompt": "a", "chosen": " b", "rejected": " c"}, {"prompt": "a", "chosen": " b"}],
     "p.jsonl:2: missing field 'rejected'"),
    ([{"prompt": "a", "chosen": 3, "rejected": " c"}],
     "p.jsonl:1: field 'chosen' must be a string or a list of chat messages, got int"),
    ([{"prompt": [{"content": "hi"}], "chosen": "b", "rejected": "c"}],
     "p.jsonl:1: field 'prompt' message 1: 'role' must be a string (missing)"),
    ([{"prompt": [{"role": "user", "content": "hi"}], "chosen": "b", "rejected": "c"}],
     "p.jsonl:1: chat messages need a chat template: the tokenizer has none; set --chat_template"),
    ([{"chosen": " b", "rejected": " c"}], "p.jsonl:1: missing field 'prompt'"),
])
def test_bad_records_stop_the_run_before_anything_is_written(records, message, fmtune_tiny_model,
                                                             tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", records)
    out = tmp_path / "out"
    res = run_cli(["train", "--plugins", "dpo", "--model_name_or_path", fmtune_tiny_model,
                   "--training_data_path", data, "--output_dir", str(out)])
    assert res.exit_code == 2
    assert message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--loss_type", "sigmoid,ipx"], "loss_type: unknown 'ipx'; TRL's DPO losses are sigmoid, "),
    (["--dataset_text_field", "text"], "dpo: dataset_text_field is not used with preference data"),
    (["--loss_type", "sigmoid,sft", "--loss_weights", "1"],
     "loss_weights has 1 values for 2 loss_type values"),
    (["--beta", "0"], "beta must be > 0, got 0.0"),
    (["--loss_type", "exo_pair"], "loss_type exo_pair needs label_smoothing > 0"),
])
def test_bad_options_are_config_errors(extra, message, fmtune_tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c"}])
    res = run_cli(["train", "--plugins", "dpo", "--model_name_or_path", fmtune_tiny_model,
                   "--training_data_path", data, "--output_dir", str(tmp_path / "out"), *extra])
    assert res.exit_code == 2 and message in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_preview_shows_the_tokenized_pairs(fmtune_tiny_model, tmp_path):
    recs = [{"prompt": "hello there", "chosen": " hi, how can I help?", "rejected": " no"},
            {"prompt": "hello", "chosen": " yes", "rejected": " yes"}]
    data = write_jsonl(tmp_path / "p.jsonl", recs)
    res = run_cli(["dpo", "preview", "--n", "5", "--color", "never", "--model_name_or_path",
                   fmtune_tiny_model, "--training_data_path", data])
    assert res.exit_code == 0, res.stderr
    tok = AutoTokenizer.from_pretrained(fmtune_tiny_model)
    n_prompt = len(tok("hello there")["input_ids"])
    n_chosen = len(tok(" hi, how can I help?", add_special_tokens=False)["input_ids"]) + 1
    assert res.stdout.splitlines() == [
        "trained tokens are marked [[ ]]", "",
        f"--- pair 1: prompt {n_prompt} tokens, chosen {n_chosen}, rejected 2",
        "chosen:   hello there[[ hi, how can I help?<|endoftext|>]]",
        "rejected: hello there[[ no<|endoftext|>]]",
        "",
        "train: 1 kept, 0 truncated at max_seq_length, 1 dropped (1 chosen equals rejected)",
    ]
    assert run_cli(["dpo"]).exit_code == 2
    help_res = run_cli(["dpo", "preview", "--help"])
    assert help_res.exit_code == 0 and "--beta FLOAT" in help_res.stdout

