"""The core's default data path: exact token ids and loss masks, and its errors."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from fmtune.cli import load_config
from fmtune.records import DataError, build_dataset
from fmtune.testing import write_jsonl

IGNORE = -100


@pytest.fixture(scope="module")
def tok(fmtune_tiny_model):
    return AutoTokenizer.from_pretrained(fmtune_tiny_model)


def config_for(tmp_path, data, *flags):
    path = write_jsonl(tmp_path / "data.jsonl", data) if not isinstance(data, str) else data
    config, _, _, _ = load_config(["--model_name_or_path", "m", "--output_dir", str(tmp_path / "o"),
                                   "--training_data_path", path, *flags])
    return config, path


def trained(row):
    return [t for t, l in zip(row["input_ids"], row["labels"]) if l != IGNORE]


def test_input_output_masks_exact(tmp_path, tok):
    recs = [{"input": "translate: the red cat =", "output": "le chat rouge"},
            {"input": "question: what is two plus two? answer:", "output": " four"}]
    config, path = config_for(tmp_path, recs)
    ds = build_dataset(config, tok, path)
    assert len(ds) == 2
    eos = tok.eos_token_id
    for row, rec in zip(ds, recs):
        prompt = tok(rec["input"])["input_ids"]
        sep = "" if rec["output"].startswith(" ") else " "
        completion = tok(sep + rec["output"], add_special_tokens=False)["input_ids"] + [eos]
        assert row["input_ids"] == prompt + completion
        assert row["labels"] == [IGNORE] * len(prompt) + completion
        assert row["attention_mask"] == [1] * len(row["input_ids"])
        assert tok.decode(trained(row)) == sep + rec["output"] + tok.eos_token


def test_text_field_whole_sequence_and_response_template(tmp_path, tok):
    recs = [{"text": "question: what is two plus two? answer: four"}]
    config, path = config_for(tmp_path, recs, "--dataset_text_field", "text")
    row = build_dataset(config, tok, path)[0]
    ids = tok(recs[0]["text"])["input_ids"] + [tok.eos_token_id]
    assert row["input_ids"] == ids and row["labels"] == ids

    config, path = config_for(tmp_path, recs, "--dataset_text_field", "text",
                              "--response_template", " answer:")
    row = build_dataset(config, tok, path)[0]
    prompt = tok("question: what is two plus two? answer:")["input_ids"]
    assert row["input_ids"][: len(prompt)] == prompt
    assert row["labels"][: len(prompt)] == [IGNORE] * len(prompt)
    assert tok.decode(trained(row)) == " four" + tok.eos_token


def test_no_token_spans_the_boundary(tmp_path, tok):
    # The template ends inside a word: a joint tokenization would merge across it.
    recs = [{"text": "the quick brown fox jumps over the lazy dog."}]
    config, path = config_for(tmp_path, recs, "--dataset_text_field", "text",
                              "--response_template", "the qu")
    row = build_dataset(config, tok, path)[0]
    prompt = tok("the qu")["input_ids"]
    completion = tok("ick brown fox jumps over the lazy dog.", add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == prompt + completion + [tok.eos_token_id]
    assert tok.decode(trained(row)) == "ick brown fox jumps over the lazy dog." + tok.eos_token


def test_formatter_template(tmp_path, tok):
    recs = [{"q": "what is two plus two?", "a": "four"}]
    config, path = config_for(tmp_path, recs, "--data_formatter_template",
                              "question: {{q}} answer: {{ a }}", "--response_template", " answer:")
    row = build_dataset(config, tok, path)[0]
    assert tok.decode(row["input_ids"]) == "question: what is two plus two? answer: four" + tok.eos_token
    assert tok.decode(trained(row)) == " four" + tok.eos_token


def test_truncation_and_drops_are_counted_not_silent(tmp_path, tok, caplog):
    recs = [{"text": "question: a answer: b"}, {"text": "no template here"},
            {"text": "question: " + "the quick brown fox " * 20 + "answer: yes"}]
    config, path = config_for(tmp_path, recs, "--dataset_text_field", "text",
                              "--response_template", " answer:", "--max_seq_length", "16")
    with caplog.at_level("WARNING", logger="fmtune"):
        ds = build_dataset(config, tok, path)
    assert len(ds) == 1
    assert "dropped 1 of 3 records: response_template not found" in caplog.text
    assert "dropped 1 of 3 records: no trained token left after truncation" in caplog.text


@pytest.mark.parametrize("content,flags,needle", [
    ('{"input": "a", "output": "b"}\n{"input": "a" "output": "b"}\n', [], "data.jsonl:2: invalid JSON"),
    ('{"input": "a", "output": "b"}\n{"input": "a"}\n', [], "data.jsonl:2: missing field 'output'"),
    ('{"input": "a", "output": 3}\n', [], "data.jsonl:1: field 'output' must be a string"),
    ('\n\n', [], "data.jsonl: no records"),
    ('{"q": "x"}\n', ["--data_formatter_template", "{{q}} {{a}}"],
     "data.jsonl:1: data_formatter_template field 'a' missing from the record"),
    ('{"text": "x y"}\n', ["--dataset_text_field", "text", "--response_template", "Z:"],
     "no usable records (1 response_template not found)"),
])
def test_data_errors_name_file_line_and_field(tmp_path, tok, content, flags, needle):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    config, _ = config_for(tmp_path, str(path), *flags)
    with pytest.raises(DataError) as err:
        build_dataset(config, tok, str(path))
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_json_array_file(tmp_path, tok):
    path = tmp_path / "data.json"
    path.write_text('[{"input": "a", "output": "b"}, ["not", "an", "object"]]')
    config, _ = config_for(tmp_path, str(path))
    with pytest.raises(DataError, match=r"data.json: record 2: expected an object"):
        build_dataset(config, tok, str(path))


def test_non_utf8_and_binary_files_are_one_line_errors(tmp_path):
    from fmtune.records import read_records

    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"input": "a", "output": "b"}\n{"input": "caf\xe9", "output": "b"}\n')
    with pytest.raises(DataError) as err:
        read_records(str(latin))
    assert str(err.value) == (f"{latin}:2: not UTF-8 text (byte 0xe9 at offset 44); convert "
                              "the file to UTF-8")
    arrow = tmp_path / "tokenized.arrow"
    arrow.write_bytes(b"\xff\xffARROW1\x00")
    with pytest.raises(DataError, match=r"tokenized.arrow: the core reads JSON and JSONL records "
                                        r"only; a .arrow file needs a data plugin"):
        read_records(str(arrow))


def test_paths_checked_before_anything_loads(tmp_path):
    """A file where a folder goes, a missing data file, a model path typo, an output_dir inside
    the data folder: one line each, exit 2, before torch or the tokenizer load."""
    from fmtune.testing import run_cli

    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "data").mkdir()
    cases = [
        (["--output_dir", str(afile)], f"output_dir {afile}: exists and is not a folder"),
        (["--output_dir", str(afile / "sub")], f"output_dir {afile / 'sub'}: cannot create it, "
                                                f"{afile} is a file"),
        (["--save_model_dir", str(afile)], f"save_model_dir {afile}: exists and is not a "
                                           "folder"),
        (["--model_name_or_path", "./typo-model"], "model_name_or_path ./typo-model: no such "
                                                   "folder"),
        (["--training_data_path", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
        (["--training_data_path", str(tmp_path / "data"), "--output_dir",
          str(tmp_path / "data" / "run")], "is inside training_data_path"),
    ]
    for extra, needle in cases:
        argv = ["train", "--model_name_or_path", str(tmp_path), "--training_data_path",
                str(afile), "--output_dir", str(tmp_path / "out"), *extra]
        res = run_cli(argv)
        assert res.exit_code == 2 and needle in res.stderr, (extra, res.stderr)
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "data" / "run").exists()


def test_do_dataprocessing_only_writes_parquet_shards(fmtune_tiny_model, tmp_path):
    """fms-hf-tuning's --do_dataprocessing_only: output_dir/train_dataset/ds_0000N.parquet with
    the processed columns, no model loaded, no training."""
    import pyarrow.parquet as pq

    from fmtune.testing import DEMO_RECORDS, run_cli

    data = write_jsonl(tmp_path / "d.jsonl", DEMO_RECORDS)
    out = tmp_path / "out"
    res = run_cli(["train", "--model_name_or_path", fmtune_tiny_model, "--training_data_path",
                   data, "--validation_data_path", data, "--output_dir", str(out),
                   "--do_dataprocessing_only", "True", "--num_train_dataset_shards", "2"])
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in (out / "train_dataset").iterdir()) == [
        "ds_00000.parquet", "ds_00001.parquet"]
    rows = [r for f in sorted((out / "train_dataset").iterdir())
            for r in pq.read_table(f).to_pylist()]
    assert len(rows) == len(DEMO_RECORDS) and {"input_ids", "labels"} <= set(rows[0])
    assert len(list((out / "validation_dataset").iterdir())) == 1
    assert not (out / "run_summary.json").exists() and not list(out.glob("checkpoint-*"))
    assert "data processed, no training" in res.stdout
