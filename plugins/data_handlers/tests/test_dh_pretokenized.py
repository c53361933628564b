"""Text-format flags (response/instruction template, formatter template, text field) with
pretokenized data are refused before anything loads, as fms-hf-tuning refuses them."""

from __future__ import annotations

import textwrap

import pyarrow as pa
import pytest
from datasets import Dataset

from fmtune.commands import load_config, validate
from fmtune.testing import run_cli, write_jsonl

RECS = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}] * 4


def write(tmp_path, kind: str) -> str:
    if kind == "jsonl":
        return write_jsonl(tmp_path / "tok.jsonl", RECS)
    if kind == "parquet":
        Dataset.from_list(RECS).to_parquet(str(tmp_path / "tok.parquet"))
        return str(tmp_path / "tok.parquet")
    if kind == "arrow":  # an Arrow IPC stream, as datasets writes them
        table = pa.Table.from_pylist(RECS)
        with pa.OSFile(str(tmp_path / "tok.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        return str(tmp_path / "tok.arrow")
    folder = tmp_path / "train_dataset"  # fmtune preprocess's output
    folder.mkdir()
    Dataset.from_list(RECS).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    return str(folder)


def one_error_line(res) -> str:
    assert res.exit_code == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and lines[0].endswith("give untokenized data"), res.stderr
    return lines[0]


@pytest.mark.parametrize("kind,flags", [
    ("parquet", ["--response_template", " answer:"]),
    ("arrow", ["--dataset_text_field", "text"]),
    ("jsonl", ["--data_formatter_template", "{{input}} {{output}}"]),
    ("folder", ["--response_template", "<|assistant|>", "--instruction_template", "<|user|>"]),
])
def test_text_flags_with_pretokenized_training_data_are_refused(tmp_path, kind, flags):
    path = write(tmp_path, kind)
    res = run_cli(["train", "--plugins", "data_handlers", "--model_name_or_path", "m",
                   "--training_data_path", path, "--output_dir", str(tmp_path / "o"), *flags])
    line = one_error_line(res)
    given = " ".join(f for f in flags if f.startswith("--"))
    assert f"{given} do" in line and "not apply to pretokenized data" in line, line
    assert "has columns input_ids, labels" in line


def data_config(tmp_path, datasets: str) -> str:
    path = tmp_path / "data_config.yaml"
    path.write_text("dataprocessor: {type: default}\ndatasets:\n" + textwrap.dedent(datasets))
    return str(path)


def test_text_flags_with_a_pretokenized_data_config_are_refused(tmp_path):
    write(tmp_path, "parquet")
    cfg = data_config(tmp_path, """\
        - name: pretokenized
          data_paths: [tok.parquet]
    """)
    res = run_cli(["train", "--model_name_or_path", "m", "--data_config_path", cfg,
                   "--output_dir", str(tmp_path / "o"), "--response_template", " answer:"])
    line = one_error_line(res)
    assert f"{cfg}: --response_template does not apply to pretokenized data " \
           "(datasets[pretokenized]: " in line, line


def test_text_flags_apply_when_some_data_is_text(tmp_path):
    """A data_config mixing pretokenized and text datasets: the flags format the text ones."""
    write(tmp_path, "jsonl")
    write_jsonl(tmp_path / "text.jsonl", [{"text": "question: two? answer: four"}])
    cfg = data_config(tmp_path, """\
        - name: pretokenized
          data_paths: [tok.jsonl]
        - name: text
          data_paths: [text.jsonl]
    """)
    config, pm, _, _ = load_config(["--model_name_or_path", "m", "--data_config_path", cfg,
                                    "--output_dir", str(tmp_path / "o"), "--dataset_text_field",
                                    "text", "--response_template", " answer:"])
    validate(config, pm)  # no error
    config, pm, _, _ = load_config(["--plugins", "data_handlers", "--model_name_or_path", "m",
                                    "--output_dir", str(tmp_path / "o"), "--training_data_path",
                                    str(tmp_path / "text.jsonl"), "--dataset_text_field", "text"])
    validate(config, pm)
