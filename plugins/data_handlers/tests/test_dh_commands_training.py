"""preprocess -> parquet -> train; preview marks; added tokens; padding-free and packing
give the same logits as unpacked examples (no attention across examples)."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fmtune.testing import run_cli, write_jsonl
from fmtune_data_handlers.packing import FlatteningCollator, pack

CONV = [{"role": "user", "content": "what is two plus two?"},
        {"role": "assistant", "content": "four"}]


@pytest.fixture
def chat_data(tmp_path):
    return write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONV}] * 6 + [{"messages": CONV[:1]}])


def test_preprocess_writes_parquet_and_train_reads_it_back(tmp_path, chat_model_dir, chat_data):
    out = tmp_path / "pre"
    valid = write_jsonl(tmp_path / "v.jsonl", [{"messages": CONV}] * 2)
    res = run_cli(["preprocess", "--model_name_or_path", chat_model_dir, "--output_dir", str(out),
                   "--training_data_path", chat_data, "--validation_data_path", valid])
    assert res.exit_code == 0, res.stderr
    assert f"train: 6 kept, 0 truncated at max_seq_length, 1 dropped (1 no assistant turn) -> " \
           f"{out}/train_dataset (6 rows)" in res.stdout
    files = os.listdir(out / "train_dataset")
    assert files == ["train-00000-of-00001.parquet"]
    table = pq.read_table(out / "train_dataset" / files[0])
    assert table.column_names == ["input_ids", "labels", "attention_mask"]
    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    row = table.slice(0, 1).to_pylist()[0]
    assert row["input_ids"] == tok(tok.apply_chat_template(CONV, tokenize=False),
                                   add_special_tokens=False)["input_ids"]
    assert tok.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l != -100]) == \
        "four<|end|>\n"
    assert len(pq.read_table(out / "validation_dataset" / os.listdir(out / "validation_dataset")[0])) == 2
    # fmtune train takes the folder back (pretokenized), core data path or plugin
    res = run_cli(["train", "--plugins", "data_handlers", "--model_name_or_path", chat_model_dir,
                   "--training_data_path", str(out / "train_dataset"), "--output_dir",
                   str(tmp_path / "run"), "--max_steps", "2", "--per_device_train_batch_size", "3",
                   "--save_strategy", "no", "--logging_steps", "1"])
    assert res.exit_code == 0, res.stderr
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["train_tokens"] == 6 * len(row["input_ids"])


def test_preprocess_removes_what_a_killed_preprocess_left(tmp_path, chat_model_dir, chat_data):
    """kill -9 during `fmtune preprocess` leaves its .preprocess-PID-* folder; the next
    preprocess into the folder removes it (its process is gone) and keeps a live one's."""
    import subprocess
    import sys

    out = tmp_path / "pre"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / f".preprocess-{dead.pid}-abc" / "train_dataset").mkdir(parents=True)
    live = out / f".preprocess-{os.getpid()}-xyz"
    live.mkdir()
    res = run_cli(["preprocess", "--model_name_or_path", chat_model_dir, "--output_dir", str(out),
                   "--training_data_path", chat_data])
    assert res.exit_code == 0, res.stderr
    assert sorted(os.listdir(out)) == [live.name, "train_dataset"]
    assert "left by a preprocess that was killed" in res.stderr


def test_preview_marks_trained_tokens_and_counts(tmp_path, chat_model_dir, chat_data):
    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    n = len(tok(tok.apply_chat_template(CONV, tokenize=False), add_special_tokens=False)["input_ids"])
    n_answer = len(tok("four<|end|>", add_special_tokens=False)["input_ids"])
    res = run_cli(["data", "preview", "--n", "1", "--model_name_or_path", chat_model_dir,
                   "--training_data_path", chat_data, "--max_seq_length", str(n - 1)])
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "trained tokens are marked [[ ]]"
    assert lines[2] == f"--- example 1: {n - 1} tokens, {n_answer} trained"
    assert "\n".join(lines[3:7]) == "<|user|>\nwhat is two plus two?<|end|>\n<|assistant|>\n[[four<|end|>]]"
    assert lines[-1] == ("train: 6 kept, 6 truncated at max_seq_length, 1 dropped "
                         "(1 no assistant turn)")
    res = run_cli(["data", "preview", "--n", "1", "--model_name_or_path", chat_model_dir,
                   "--training_data_path", chat_data])
    assert "<|assistant|>\n[[four<|end|>\n]]" in res.stdout
    assert res.stdout.splitlines()[-1] == ("train: 6 kept, 0 truncated at max_seq_length, "
                                           "1 dropped (1 no assistant turn)")
    res = run_cli(["data", "preview", "--color", "always", "--n", "1", "--model_name_or_path",
                   chat_model_dir, "--training_data_path", chat_data])
    assert "<|assistant|>\n\x1b[1;32mfour<|end|>\n\x1b[0m" in res.stdout


def test_add_special_tokens_resizes_the_model(tmp_path, fmtune_tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", [{"input": "hello <|ticket|>", "output": "there"}] * 4)
    out = tmp_path / "run"
    res = run_cli(["train", "--plugins", "data_handlers", "--model_name_or_path", fmtune_tiny_model,
                   "--training_data_path", data, "--output_dir", str(out), "--max_steps", "1",
                   "--add_special_tokens", "<|ticket|>,<|other|>", "--save_strategy", "no"])
    assert res.exit_code == 0, res.stderr
    base = AutoTokenizer.from_pretrained(fmtune_tiny_model)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(tok) == len(base) + 2
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert tok("hello <|ticket|>", add_special_tokens=False)["input_ids"][-1] == len(base)


def test_padding_free_and_packing_do_not_attend_across_examples(fmtune_tiny_model):
    tok = AutoTokenizer.from_pretrained(fmtune_tiny_model)
    model = AutoModelForCausalLM.from_pretrained(fmtune_tiny_model, attn_implementation="sdpa").eval()
    texts = ["hello there", "the quick brown fox jumps over the lazy dog.", "what is two plus two?"]
    rows = [{"input_ids": tok(t)["input_ids"], "labels": tok(t)["input_ids"]} for t in texts]
    batch = FlatteningCollator()(rows)
    assert batch["position_ids"][0].tolist() == [p for r in rows for p in range(len(r["input_ids"]))]
    starts = [0, len(rows[0]["input_ids"]), len(rows[0]["input_ids"]) + len(rows[1]["input_ids"])]
    assert [batch["labels"][0, s].item() for s in starts] == [-100, -100, -100]
    with torch.no_grad():
        flat = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in rows])
        leaky = model(input_ids=batch["input_ids"]).logits[0]  # plain causal over the whole row
    assert torch.allclose(flat, alone, atol=1e-5)
    assert not torch.allclose(leaky, alone, atol=1e-3)  # the check can tell the difference
    assert batch["use_cache"] is False  # with a KV cache transformers ignores the packing
    with torch.no_grad():
        cached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    assert not torch.allclose(cached, alone, atol=1e-3)

    from datasets import Dataset

    packed = pack(Dataset.from_list(rows * 3), max_length=24)
    assert all(len(r) <= 24 for r in packed["input_ids"])
    assert sum(len(r) for r in packed["input_ids"]) == 3 * sum(len(r["input_ids"]) for r in rows)
    batch = FlatteningCollator()([packed[0]])
    with torch.no_grad():
        got = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    pos = batch["position_ids"][0].tolist()
    cuts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    with torch.no_grad():
        want = torch.cat([model(input_ids=batch["input_ids"][:, a:b]).logits[0]
                          for a, b in zip(cuts, cuts[1:])])
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("flag", ["--padding_free", "--packing"])
def test_training_padding_free_and_packed(tmp_path, fmtune_tiny_model, flag):
    data = write_jsonl(tmp_path / "d.jsonl", [{"input": f"question {i % 3}", "output": "answer yes"}
                                             for i in range(24)])
    out = tmp_path / "run"
    res = run_cli(["train", "--plugins", "data_handlers", "--model_name_or_path", fmtune_tiny_model,
                   "--training_data_path", data, "--output_dir", str(out), "--max_steps", "12",
                   "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
                   "--logging_steps", "1", "--save_strategy", "no", "--max_seq_length", "32", flag])
    assert res.exit_code == 0, res.stderr
    losses = [json.loads(l)["data"]["value"] for l in open(out / "training_logs.jsonl")]
    assert len(losses) == 12 and losses[-1] < losses[0] * 0.7
