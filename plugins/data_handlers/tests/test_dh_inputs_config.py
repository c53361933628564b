"""Input formats, data_config YAML (handlers, sampling, splits), and the error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fmtune import hookimpl
from fmtune.commands import load_config, validate
from fmtune.config import ConfigError
from fmtune.testing import run_cli, write_jsonl
from fmtune_data_handlers.plugin import prepare

RECS = [{"input": f"question {i}", "output": f"answer {i}"} for i in range(6)]


def configure(tmp_path, *flags, plugins=()):
    config, pm, _, _ = load_config(["--plugins", "data_handlers", "--model_name_or_path", "m",
                                    "--output_dir", str(tmp_path / "o"), *flags],
                                   extra_plugins=list(plugins))
    return config, pm


def run(tmp_path, tok, *flags, plugins=()):
    config, pm = configure(tmp_path, *flags, plugins=plugins)
    validate(config, pm)
    return prepare(config, tok, pm)


def write_formats(folder):
    import pandas as pd
    from datasets import Dataset

    folder.mkdir()
    write_jsonl(folder / "a.jsonl", RECS[:2])
    (folder / "b.json").write_text(json.dumps(RECS[2:3]))
    pd.DataFrame(RECS[3:4]).to_csv(folder / "c.csv", index=False)
    Dataset.from_list(RECS[4:5]).to_parquet(str(folder / "d.parquet"))
    ds = Dataset.from_list(RECS[5:6])
    ds.save_to_disk(str(folder / "e_arrow"))
    arrow = next((folder / "e_arrow").glob("*.arrow"))
    arrow.rename(folder / "e.arrow")
    import shutil
    shutil.rmtree(folder / "e_arrow")


def test_every_file_format_folder_glob_and_list(tmp_path, chat_tok):
    folder = tmp_path / "data"
    write_formats(folder)
    inputs = set()
    for ext in ("jsonl", "json", "csv", "parquet", "arrow"):
        (path,) = folder.glob(f"*.{ext}")
        p = run(tmp_path, chat_tok, "--training_data_path", str(path))
        inputs.add(chat_tok.decode(p.train[0]["input_ids"]))
    assert len(inputs) == 5
    p = run(tmp_path, chat_tok, "--training_data_path", f"{folder}/a.jsonl,{folder}/d.parquet")
    assert len(p.train) == 3
    p = run(tmp_path, chat_tok, "--training_data_path", f"{folder}/*.json*")
    assert len(p.train) == 3
    with pytest.raises(ConfigError, match="mixes file types"):
        run(tmp_path, chat_tok, "--training_data_path", str(folder))


def test_hub_id_not_cached_is_a_clear_error(tmp_path, fmtune_tiny_model):
    # HF_HUB_OFFLINE is read when datasets is imported: a fresh process, as a user runs it
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "fmtune"), "preprocess",
                          "--model_name_or_path", fmtune_tiny_model, "--output_dir",
                          str(tmp_path / "o"), "--training_data_path", "no-such/dataset"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "fmtune: error: no-such/dataset: no such file or folder, and not a loadable Hugging Face "
        "dataset (not in the local cache and HF_HUB_OFFLINE is set)")
    assert not (tmp_path / "o" / "train_dataset").exists()


@pytest.mark.parametrize("content,flags,needle", [
    ('{"input": "a", "output": "b"}\n{"input": "a", "output": "b"\n', [], "data.jsonl:2: invalid JSON"),
    ("", [], "no records"),
    ('{"input": "a"}\n', [], "cannot tell the data format from columns ['input']"),
    ('{"text": "x"}\n', ["--dataset_text_field", "body"], "missing column 'body'"),
    ('{"q": "x"}\n', ["--data_formatter_template", "{{q}} {{a}}"], "template field missing: 'a' is undefined"),
    ('{"text": "x y"}\n', ["--dataset_text_field", "text", "--response_template", "Z:"],
     "no usable training examples (1 dropped: response_template not found)"),
])
def test_data_errors(tmp_path, chat_tok, content, flags, needle):
    (tmp_path / "data.jsonl").write_text(content)
    with pytest.raises(ConfigError) as err:
        run(tmp_path, chat_tok, "--training_data_path", str(tmp_path / "data.jsonl"), *flags)
    assert needle in str(err.value)


def test_text_field_and_formatter_exclusive_and_data_required(tmp_path):
    res = run_cli(["train", "--plugins", "data_handlers", "--model_name_or_path", "m",
                   "--output_dir", "o", "--dataset_text_field", "t",
                   "--data_formatter_template", "{{t}}"])
    assert res.exit_code == 2
    assert "training_data_path or data_config_path is required" in res.stderr
    assert "dataset_text_field and data_formatter_template are exclusive" in res.stderr


def data_config(tmp_path, text):
    path = tmp_path / "data_config.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_data_config_handlers_sampling_and_split(tmp_path, chat_tok):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(40)])
    write_jsonl(tmp_path / "io.jsonl", [{"input": f"in{i}", "output": f"out{i}"} for i in range(40)])
    cfg = data_config(tmp_path, """
        dataprocessor:
          type: default
          sampling_stopping_strategy: first_exhausted
          seed: 7
        datasets:
          - name: qa
            data_paths: [qa.jsonl]
            sampling: 0.5
            split: {train: 0.75, validation: 0.25}
            data_handlers:
              - name: rename_columns
                arguments:
                  fn_kwargs: {column_mapping: {question: input, answer: output}}
              - name: tokenize_and_apply_input_masking
                arguments:
                  remove_columns: all
                  batched: true
          - name: io
            data_paths: [io.jsonl]
            sampling: 0.5
            data_handlers:
              - name: tokenize_and_apply_input_masking
                arguments: {remove_columns: all}
    """)
    p = run(tmp_path, chat_tok, "--data_config_path", cfg)
    assert len(p.validation) == 10 and p.counts["validation"] == {"ok": 10}
    assert p.counts["train"] == {"ok": 70}
    texts = [chat_tok.decode(r["input_ids"]) for r in p.train]
    qa = [t for t in texts if t.startswith("q")]
    io = [t for t in texts if t.startswith("in")]
    # interleaved 50/50 until the first dataset runs out (30 qa rows)
    assert len(qa) == 30 and 20 <= len(io) <= 40
    assert set(p.train.column_names) == {"input_ids", "labels", "attention_mask"}


def test_data_config_concatenation_and_filters(tmp_path, chat_tok):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "hello there", "id": 1},
                                        {"text": "the quick brown fox jumps over", "id": 2}])
    cfg = data_config(tmp_path, f"""
        datasets:
          - name: one
            data_paths: [{tmp_path / 't.jsonl'}]
            data_handlers:
              - name: skip_samples_with_large_columns
                arguments: {{fn_kwargs: {{column_name: text, max_allowed_length: 12}}}}
              - name: duplicate_columns
                arguments: {{fn_kwargs: {{old_column: text, new_column: copy}}}}
              - name: select_columns
                arguments: {{fn_kwargs: {{column_names: [copy]}}}}
              - name: apply_custom_jinja_template
                arguments: {{fn_kwargs: {{template: "say {{{{ copy }}}}", formatted_text_column_name: t2}}}}
              - name: tokenize
                arguments: {{fn_kwargs: {{text_column_name: t2}}, remove_columns: all}}
          - name: two
            data_paths: [{tmp_path / 't.jsonl'}]
            data_handlers:
              - name: remove_columns
                arguments: {{fn_kwargs: {{column_names: [id]}}}}
              - name: tokenize
                arguments: {{remove_columns: all}}
    """)
    p = run(tmp_path, chat_tok, "--data_config_path", cfg)
    texts = [chat_tok.decode(r["input_ids"]) for r in p.train]
    assert texts == ["say hello there<|endoftext|>", "hello there<|endoftext|>",
                     "the quick brown fox jumps over<|endoftext|>"]


@pytest.mark.parametrize("text,needle", [
    ("datasets:\n  - name: a\n    data_paths: [x.jsonl]\n    data_handlers:\n"
     "      - name: tokenize_and_apply_input_maskin\n",
     "datasets[0].data_handlers[0].name: unknown data handler 'tokenize_and_apply_input_maskin' "
     "(did you mean 'tokenize_and_apply_input_masking'?)"),
    ("datasets:\n  - name: a\n    data_path: [x.jsonl]\n", "datasets[0].data_path: unknown key "
     "(did you mean 'data_paths'?)"),
    ("datasets:\n  - name: a\n    data_paths: [x]\n    sampling: 0.5\n  - name: b\n"
     "    data_paths: [y]\n    sampling: 0.3\n", "sampling ratios must sum to 1, got 0.5 + 0.3 = 0.8"),
    ("datasets:\n  - name: a\n    data_paths: [x]\n    data_handlers:\n      - name: tokenize\n"
     "        arguments: {batchd: true}\n", "datasets[0].data_handlers[0].arguments.batchd: unknown key"),
    ("dataprocessor:\n  streaming: true\ndatasets:\n  - name: a\n    data_paths: [x]\n",
     "dataprocessor.streaming needs max_steps"),
    ("datasets: []\n", "datasets: required, a non-empty list"),
])
def test_invalid_data_config_names_the_key_path(tmp_path, text, needle):
    cfg = data_config(tmp_path, text)
    res = run_cli(["train", "--plugins", "data_handlers", "--model_name_or_path", "m",
                   "--output_dir", str(tmp_path / "o"), "--data_config_path", cfg])
    assert res.exit_code == 2
    assert f"{cfg}: " in res.stderr and needle in res.stderr


class TicketPlugin:
    """An in-test plugin adding a handler for an in-house format."""

    @hookimpl
    def register_data_handlers(self, register):
        def tickets(batch, **_):
            return {"input": [f"{t['subject']}: {t['body']}" for t in batch["ticket"]],
                    "output": batch["resolution"]}
        register("ticket_to_input_output", tickets, "map")


def test_third_party_handler_and_duplicates(tmp_path, chat_tok):
    write_jsonl(tmp_path / "t.jsonl", [{"ticket": {"subject": "hello", "body": "there"},
                                        "resolution": "fixed"}])
    cfg = data_config(tmp_path, """
        datasets:
          - name: tickets
            data_paths: [t.jsonl]
            data_handlers:
              - name: ticket_to_input_output
                arguments: {remove_columns: all}
              - name: tokenize_and_apply_input_masking
                arguments: {remove_columns: all}
    """)
    p = run(tmp_path, chat_tok, "--data_config_path", cfg, plugins=[TicketPlugin()])
    assert chat_tok.decode(p.train[0]["input_ids"]) == "hello: there fixed<|endoftext|>"

    class Clash:
        @hookimpl
        def register_data_handlers(self, register):
            register("tokenize", lambda b: b)

    with pytest.raises(ConfigError, match="data handler 'tokenize' is registered by both"):
        run(tmp_path, chat_tok, "--data_config_path", cfg, plugins=[TicketPlugin(), Clash()])


def test_streaming(tmp_path, chat_tok):
    write_jsonl(tmp_path / "io.jsonl", RECS)
    cfg = data_config(tmp_path, """
        dataprocessor: {streaming: true}
        datasets:
          - name: io
            data_paths: [io.jsonl]
            data_handlers:
              - name: tokenize_and_apply_input_masking
                arguments: {remove_columns: [input, output]}
    """)
    p = run(tmp_path, chat_tok, "--data_config_path", cfg, "--max_steps", "3")
    rows = list(p.train)
    assert len(rows) == 6 and set(rows[0]) == {"input_ids", "labels", "attention_mask"}
