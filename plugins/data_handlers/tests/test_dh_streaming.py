"""Every built-in handler works on streamed data (``dataprocessor.streaming: true``, a datasets
IterableDataset) and gives the same input_ids/labels as without streaming, for every data file
format that can hold its data; what cannot stream is refused before training."""

from __future__ import annotations

import itertools
import json
import textwrap

import pyarrow as pa
import pytest
from datasets import Dataset

from fmtune.commands import load_config, validate
from fmtune.testing import run_cli, torchrun, write_jsonl
from fmtune_data_handlers.handlers import BUILTIN
from fmtune_data_handlers.plugin import prepare

N = 8  # examples compared
IO = [{"input": f"question {w}", "output": f"the answer is {w}", "id": str(i)}
      for i, w in enumerate(("one", "two", "three", "four", "five", "six", "seven", "eight",
                             "nine", "ten"))]
TEXT = [{"text": f"question: what is {w}? answer: {w}"} for w in ("one", "two", "three", "four",
                                                                  "five", "six", "seven", "eight",
                                                                  "nine", "ten")]
CHAT = [{"messages": [{"role": "system", "content": "be brief please"},
                      {"role": "user", "content": f"hello there {i}"},
                      {"role": "assistant", "content": "the quick fox"},
                      {"role": "user", "content": "and then?"},
                      {"role": "assistant", "content": f"jumps over {i}"}]} for i in range(10)]
TOKENS = [{"input_ids": list(range(5, 5 + n))} for n in range(2, 12)]


def handler(name: str, **arguments) -> str:
    return textwrap.indent(f"- name: {name}\n  arguments: {json.dumps(arguments)}\n", " " * 6)


MASKING = handler("tokenize_and_apply_input_masking", remove_columns="all", batched=False,
                  fn_kwargs={"input_column_name": "input", "output_column_name": "output"})
TEMPLATE = "{{input}} Label: {{output}}"
# handler -> (records, data_handlers YAML, flags)
CASES = {
    "tokenize_and_apply_input_masking": (IO, MASKING, []),
    "tokenize": (TEXT, handler("tokenize", remove_columns="all", batched=True,
                               fn_kwargs={"text_column_name": "text",
                                          "response_template": " answer:"}), []),
    "tokenize (whole text)": (TEXT, handler("tokenize", remove_columns="all",
                                            fn_kwargs={"text_column_name": "text"}), []),
    "apply_custom_jinja_template": (
        IO, handler("apply_custom_jinja_template", remove_columns="all", batched=False,
                    fn_kwargs={"formatted_text_column_name": "formatted_text",
                               "template": TEMPLATE}),
        ["--dataset_text_field", "formatted_text", "--response_template", " Label:"]),
    "apply_custom_data_formatting_template": (
        IO, handler("apply_custom_data_formatting_template", remove_columns="all",
                    fn_kwargs={"formatted_text_column_name": "formatted_text",
                               "template": TEMPLATE}),
        ["--dataset_text_field", "formatted_text", "--response_template", " Label:"]),
    "apply_tokenizer_chat_template": (
        CHAT, handler("apply_tokenizer_chat_template", remove_columns="all",
                      fn_kwargs={"formatted_text_column_name": "formatted_chat_data",
                                 "conversation_column_name": "messages"}),
        ["--dataset_text_field", "formatted_chat_data", "--response_template", "<|assistant|>",
         "--instruction_template", "<|user|>"]),
    "tokenize_and_apply_chat_template_with_masking": (
        CHAT, handler("tokenize_and_apply_chat_template_with_masking", remove_columns="all",
                      batched=False, fn_kwargs={"conversation_column": "messages"}), []),
    "skip_samples_with_large_columns": (
        IO, handler("skip_samples_with_large_columns",
                    fn_kwargs={"column_name": "input", "max_allowed_length": 13}) + MASKING, []),
    "duplicate_columns": (
        TOKENS, handler("duplicate_columns", batched=False,
                        fn_kwargs={"existing_column_name": "input_ids",
                                   "new_column_name": "labels"}), []),
    "rename_columns": (
        [{"question": r["input"], "answer": r["output"]} for r in IO],
        handler("rename_columns", column_mapping={"question": "input", "answer": "output"})
        + MASKING, []),
    "select_columns": (IO, handler("select_columns", column_names=["input", "output"])
                       + MASKING, []),
    "remove_columns": (IO, handler("remove_columns", column_names=["id"]) + MASKING, []),
}
FLAT = {"tokenize_and_apply_input_masking", "tokenize", "tokenize (whole text)",
        "apply_custom_jinja_template",
        "apply_custom_data_formatting_template", "skip_samples_with_large_columns",
        "rename_columns", "select_columns", "remove_columns"}  # records CSV can hold


def write_data(folder, records, fmt: str) -> str:
    path = folder / f"data.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, records)
    elif fmt == "json":
        path.write_text(json.dumps(records))
    elif fmt == "parquet":
        Dataset.from_list(records).to_parquet(str(path))
    elif fmt == "csv":
        Dataset.from_list(records).to_csv(str(path), index=False)
    else:  # an Arrow IPC stream, as datasets writes them
        table = pa.Table.from_pylist(records)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    return path.name


def config_file(tmp_path, records, handlers: str, fmt: str, streaming: bool, extra="") -> str:
    name = write_data(tmp_path, records, fmt)
    path = tmp_path / f"data_config_{streaming}.yaml"
    path.write_text(f"dataprocessor:\n  type: default\n  streaming: {str(streaming).lower()}\n"
                    f"datasets:\n  - name: ds\n    data_paths: [{name}]\n{extra}"
                    f"    data_handlers:\n{handlers}")
    return str(path)


def first_rows(tmp_path, tok, cfg, flags) -> list:
    config, pm, _, _ = load_config(["--plugins", "data_handlers", "--model_name_or_path", "m",
                                    "--output_dir", str(tmp_path / "o"), "--max_steps", "1",
                                    "--data_config_path", cfg, *flags])
    validate(config, pm)
    train = prepare(config, tok, pm).train
    return [(list(r["input_ids"]), list(r["labels"])) for r in itertools.islice(train, N)]


def test_every_handler_has_a_case():
    assert {name.split(" (")[0] for name in CASES} == set(BUILTIN)


@pytest.mark.parametrize("name,fmt", [(name, fmt) for name in sorted(CASES)
                                      for fmt in ("jsonl", "json", "parquet", "arrow", "csv")
                                      if fmt != "csv" or name in FLAT])
def test_streaming_gives_the_same_examples(tmp_path, chat_tok, name, fmt):
    records, handlers, flags = CASES[name]
    want = first_rows(tmp_path, chat_tok, config_file(tmp_path, records, handlers, fmt, False),
                      flags)
    got = first_rows(tmp_path, chat_tok, config_file(tmp_path, records, handlers, fmt, True),
                     flags)
    assert len(want) == (7 if name == "skip_samples_with_large_columns" else N)
    assert got == want


def refused(tmp_path, cfg, *flags) -> str:
    res = run_cli(["train", "--model_name_or_path", "m", "--data_config_path", cfg,
                   "--output_dir", str(tmp_path / "o"), "--max_steps", "1", *flags])
    assert res.exit_code == 2, res.stderr
    (line,) = [ln for ln in res.stderr.splitlines() if "error" in ln]
    assert f"{cfg}: " in line
    return line


def test_what_cannot_stream_is_refused_before_training(tmp_path):
    cfg = config_file(tmp_path, IO, MASKING, "jsonl", True,
                      extra="    split: {train: 0.8, validation: 0.2}\n")
    assert "datasets[0].split: dataset 'ds' is streamed, and a stream splits only whole" \
        in refused(tmp_path, cfg)
    cfg = config_file(tmp_path, IO, MASKING, "jsonl", True)
    assert "dataprocessor.streaming: packing groups examples by length" \
        in refused(tmp_path, cfg, "--packing")


def test_preprocess_writes_a_stream(tmp_path, chat_model_dir):
    import pyarrow.parquet as pq

    tables = []
    for streaming in (False, True):
        cfg = config_file(tmp_path, IO, MASKING, "jsonl", streaming)
        out = tmp_path / f"pre_{streaming}"
        res = run_cli(["preprocess", "--model_name_or_path", chat_model_dir, "--max_steps", "1",
                       "--data_config_path", cfg, "--output_dir", str(out)])
        assert res.exit_code == 0, res.stderr
        assert f"-> {out}/train_dataset (10 rows)" in res.stdout
        tables.append(pq.read_table(out / "train_dataset" / "train-00000-of-00001.parquet"))
    assert "train: streamed, not counted" in res.stdout
    assert tables[0].schema.remove_metadata() == tables[1].schema.remove_metadata()
    assert tables[0].to_pylist() == tables[1].to_pylist()


STREAM_DRIVER = '''
import json, os, sys
from fmtune import hookimpl
from fmtune.cli import main

class Seen:
    rows = []
    @hookimpl
    def on_train_begin(self, run):
        run.model.register_forward_pre_hook(lambda m, a, kw: self.rows.append(
            (kw["input_ids"][0].tolist(), kw["position_ids"][0].tolist())), with_kwargs=True)
    @hookimpl
    def on_train_end(self, run):
        with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as f:
            json.dump(self.rows, f)

sys.exit(main(sys.argv[2:], extra_plugins=[Seen()]))
'''


def test_two_processes_each_train_their_share_of_a_stream(tmp_path, chat_model_dir, chat_tok):
    """Several processes on a stream with padding-free batches (rows of different lengths):
    each process reads the stream and trains its share; every example once over the epoch.
    (accelerate's default for streams, process 0 sending slices of concatenated batches,
    stopped such a run with a RuntimeError.)"""
    write_jsonl(tmp_path / "d.jsonl", [{"input": r["input"] + " x" * i, "output": r["output"]}
                                       for i, r in enumerate(IO * 2)])
    cfg = tmp_path / "stream.yaml"
    cfg.write_text(json.dumps({"dataprocessor": {"streaming": True},
                               "datasets": [{"name": "d", "data_paths": [str(tmp_path /
                                                                             "d.jsonl")]}]}))
    (tmp_path / "driver.py").write_text(STREAM_DRIVER)
    torchrun(tmp_path / "driver.py", str(tmp_path), "train", "--model_name_or_path",
             chat_model_dir, "--data_config_path", str(cfg), "--output_dir",
             str(tmp_path / "out"), "--padding_free", "huggingface",
             "--per_device_train_batch_size", "2", "--max_steps", "5", "--save_strategy", "no",
             cwd=tmp_path)

    def examples(rows):  # a padding-free row split where its positions restart
        out = []
        for ids, positions in rows:
            for t, p in zip(ids, positions):
                if p == 0:
                    out.append([])
                out[-1].append(t)
        return out

    ranks = [examples(json.loads((tmp_path / f"rank{r}.json").read_text())) for r in (0, 1)]
    assert [len(r) for r in ranks] == [10, 10]  # 5 steps x 2 examples on each
    config, pm, _, _ = load_config(["--plugins", "data_handlers", "--model_name_or_path", "m",
                                    "--output_dir", str(tmp_path / "o"), "--training_data_path",
                                    str(tmp_path / "d.jsonl")])
    validate(config, pm)
    every = [list(r["input_ids"]) for r in prepare(config, chat_tok, pm).train]
    assert sorted(ranks[0] + ranks[1]) == sorted(every)  # disjoint, and all 20 of them
