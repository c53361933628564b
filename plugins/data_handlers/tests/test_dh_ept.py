"""--ept (extended pre-training): raw text tokenized whole, EOS after each document,
concatenated and cut into max_seq_length blocks, every token trained; .txt/.jsonl/.parquet
files, folders and globs; a resumed run continues at the right block."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fmtune import hookimpl
from fmtune.testing import (build_llama_tokenizer, build_tiny_model, run_cli, train, train_argv,
                            write_jsonl)


DOCS = ["the quick brown fox jumps over the lazy dog",
        "le chat rouge voit un chien",
        "what is two plus two? four",
        "hello there, how can I help?",
        "a small red cat sees a big old dog"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama with the sentencepiece-style tokenizer (BOS added, EOS id 2)."""
    folder = tmp_path_factory.mktemp("ept-llama")
    build_llama_tokenizer(folder, DOCS * 3, vocab_size=400)
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from fmtune.testing import TINY_LLAMA

    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, vocab_size=vocab, bos_token_id=1,
                                 eos_token_id=2, pad_token_id=None)).save_pretrained(folder)
    return str(folder)


def _stream(model_dir: str, docs: list[str]) -> list[int]:
    """The expected token stream: each document as the tokenizer encodes it (BOS first),
    then EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [t for d in docs for t in tok(d)["input_ids"] + [tok.eos_token_id]]


def _rows(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def _preprocess(model: str, data: str, out: Path, *extra: str) -> list[dict]:
    res = run_cli(["preprocess", "--model_name_or_path", model, "--training_data_path", data,
                   "--output_dir", str(out), "--ept", "true", "--max_seq_length", "8", *extra])
    assert res.exit_code == 0, res.stderr[-2000:]
    return _rows(out / "train_dataset")


def test_blocks_are_the_concatenated_documents_cut_every_max_seq_length(llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "corpus.jsonl", [{"text": d} for d in DOCS])
    rows = _preprocess(llama_dir, data, tmp_path / "out")
    stream = _stream(llama_dir, DOCS)
    assert stream[0] == 1 and stream.count(1) == len(DOCS) and stream.count(2) == len(DOCS)
    expected = [stream[i:i + 8] for i in range(0, len(stream), 8)]
    assert [r["input_ids"] for r in rows] == expected  # in data order, none dropped
    assert all(len(r["input_ids"]) == 8 for r in rows[:-1]) and 0 < len(rows[-1]["input_ids"]) <= 8
    assert sum(len(r["input_ids"]) for r in rows) == len(stream)  # every token kept
    for r in rows:  # every token trained
        assert r["labels"] == r["input_ids"] and r["attention_mask"] == [1] * len(r["input_ids"])
    # exact ids of the first block, independently of the stream helper: <s> the quick ...
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(Path(llama_dir) / "tokenizer.json"))
    assert rows[0]["input_ids"] == raw.encode(DOCS[0]).ids[:8]


def test_txt_folder_glob_and_parquet(llama_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text(DOCS[0] + "\n" + DOCS[1] + "\n", encoding="utf-8")
    (corpus / "sub" / "b.txt").write_text(DOCS[2] + "\n", encoding="utf-8")
    stream = _stream(llama_dir, DOCS[:3])
    want = [stream[i:i + 8] for i in range(0, len(stream), 8)]
    # a folder: its .txt files, a row per line, in path order
    assert [r["input_ids"] for r in _preprocess(llama_dir, str(corpus), tmp_path / "o1")] == want
    # a glob
    got = _preprocess(llama_dir, str(corpus / "**" / "*.txt"), tmp_path / "o2")
    assert [r["input_ids"] for r in got] == want
    # parquet with --dataset_text_field
    pq.write_table(pa.table({"body": DOCS[:3]}), tmp_path / "c.parquet")
    got = _preprocess(llama_dir, str(tmp_path / "c.parquet"), tmp_path / "o3",
                      "--dataset_text_field", "body")
    assert [r["input_ids"] for r in got] == want


def test_without_ept_a_folders_txt_files_are_not_data(llama_dir, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"input": "what is two plus two?", "output": "four"}])
    (folder / "README.txt").write_text("notes about the data\n")
    res = run_cli(["preprocess", "--model_name_or_path", llama_dir, "--training_data_path",
                   str(folder), "--output_dir", str(tmp_path / "out")])
    assert res.exit_code == 0, res.stderr[-2000:]
    assert len(_rows(tmp_path / "out" / "train_dataset")) == 1


@pytest.mark.parametrize("extra,message", [
    (["--packing", "true"], "ept and packing are exclusive"),
    (["--dataset_text_field", "text", "--response_template", " A:"], "does not apply"),
])
def test_ept_conflicts_are_one_line_errors(llama_dir, tmp_path, extra, message):
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": DOCS[0]}])
    res = run_cli(["preprocess", "--model_name_or_path", llama_dir, "--training_data_path", data,
                   "--output_dir", str(tmp_path / "out"), "--ept", "true", *extra])
    assert res.exit_code == 2 and message in res.stderr


def test_ept_needs_a_text_column(llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", [{"input": "a", "output": "b"}])
    res = run_cli(["preprocess", "--model_name_or_path", llama_dir, "--training_data_path", data,
                   "--output_dir", str(tmp_path / "out"), "--ept", "true"])
    assert res.exit_code != 0 and "--ept trains raw text: no 'text' column" in res.stderr


class Batches:
    """An in-test plugin: records the input_ids of every batch the Trainer collates."""

    def __init__(self) -> None:
        self.seen: list[list[list[int]]] = []

    @hookimpl
    def build_collator(self, tokenizer, config):
        from transformers import DataCollatorForSeq2Seq

        pad = DataCollatorForSeq2Seq(tokenizer, padding=True)

        def collate(features):
            self.seen.append([list(f["input_ids"]) for f in features])
            return pad(features)
        return collate


def test_resume_continues_at_the_right_block(tmp_path):
    texts = [f"{a} {b}" for a in DOCS for b in DOCS]
    model = build_tiny_model(tmp_path / "model", texts)
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    common = ["--plugins", "data_handlers", "--ept", "true", "--max_seq_length", "32",
              "--per_device_train_batch_size", "2",
              "--num_train_epochs", "2", "--save_strategy", "steps", "--save_steps", "3"]
    whole = Batches()
    train([*train_argv(model, data, tmp_path / "a"), *common], plugins=[whole])
    blocks = len(_ept_rows(model, data, tmp_path / "pre"))
    steps = len(whole.seen)
    assert steps == 2 * ((blocks + 1) // 2) and steps >= 8  # two epochs of the blocks
    # the run resumed from step 3 and from a checkpoint in the second epoch sees exactly the
    # batches the uninterrupted run saw after it
    for ckpt in (3, (steps // 2 // 3 + 1) * 3):
        resumed = Batches()
        train([*train_argv(model, data, tmp_path / f"r{ckpt}"), *common,
               "--resume_from_checkpoint", str(tmp_path / "a" / f"checkpoint-{ckpt}")],
              plugins=[resumed])
        assert resumed.seen == whole.seen[ckpt:]
    first_epoch = sorted(map(tuple, (ids for batch in whole.seen[:steps // 2] for ids in batch)))
    assert first_epoch == sorted(map(tuple, (r["input_ids"] for r in _ept_rows(model, data, tmp_path / "pre"))))


def _ept_rows(model, data, out):
    if not (Path(out) / "train_dataset").exists():
        res = run_cli(["preprocess", "--model_name_or_path", model, "--training_data_path", data,
                       "--output_dir", str(out), "--ept", "true", "--max_seq_length", "32"])
        assert res.exit_code == 0, res.stderr[-2000:]
    return _rows(Path(out) / "train_dataset")


def test_streamed_ept_gives_the_same_blocks(llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCS])
    cfg = tmp_path / "dc.yaml"
    cfg.write_text(json.dumps({"dataprocessor": {"type": "default", "streaming": True},
                               "datasets": [{"name": "c", "data_paths": [data]}]}))
    res = run_cli(["preprocess", "--model_name_or_path", llama_dir, "--data_config_path",
                   str(cfg), "--output_dir", str(tmp_path / "s"), "--ept", "true",
                   "--max_seq_length", "8", "--max_steps", "3"])
    assert res.exit_code == 0, res.stderr[-2000:]
    stream = _stream(llama_dir, DOCS)
    assert [r["input_ids"] for r in _rows(tmp_path / "s" / "train_dataset")] == \
        [stream[i:i + 8] for i in range(0, len(stream), 8)]
