"""Bad records and bad handler arguments: one line naming the file and line (or the data_config
key), and fmtune output folders inside a data folder are not read as data."""

from __future__ import annotations

import json
import logging
import textwrap

import pytest
from datasets import Dataset

from fmtune import hookimpl
from fmtune.commands import load_config, validate
from fmtune.config import ConfigError
from fmtune.testing import run_cli, write_jsonl
from fmtune_data_handlers.loading import DataError, expand, utf8_error
from fmtune_data_handlers.plugin import prepare

RECS = [{"input": f"question {i}", "output": f"answer {i}"} for i in range(6)]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi"}]


def run(tmp_path, tok, *flags, plugins=()):
    config, pm, _, _ = load_config(["--plugins", "data_handlers", "--model_name_or_path", "m",
                                    "--output_dir", str(tmp_path / "o"), *flags],
                                   extra_plugins=list(plugins))
    validate(config, pm)
    return prepare(config, tok, pm)


def error(tmp_path, tok, *flags, plugins=()) -> str:
    with pytest.raises(ConfigError) as e:
        run(tmp_path, tok, *flags, plugins=plugins)
    return str(e.value)


def data_config(tmp_path, text: str) -> str:
    path = tmp_path / "data_config.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


# ------------------------------------------------------------------ not UTF-8


def test_utf8_checked_in_chunks_with_line_and_offset(tmp_path):
    path, ok = tmp_path / "d.jsonl", tmp_path / "ok.jsonl"
    good = '{"input": "café", "output": "ü"}\n'.encode()
    path.write_bytes(good * 3 + b'{"input": "\xe9t\xe9", "output": "x"}\n')
    ok.write_bytes(good * 5)
    offset = len(good) * 3 + len(b'{"input": "')
    for chunk in (1, 3, 7, 1 << 20):  # a character cut by a chunk's end is no error
        assert utf8_error(str(path), chunk) == (
            f"{path}:4: not UTF-8 text (byte 0xe9 at offset {offset}); convert the file to UTF-8")
        assert utf8_error(str(ok), chunk) is None
    path.write_bytes(good + "é".encode()[:1])  # the file ends inside a character
    assert utf8_error(str(path), 4).startswith(f"{path}:2: not UTF-8 text (byte 0xc3 at offset "
                                               f"{len(good)})")


@pytest.mark.parametrize("name, content", [
    ("d.jsonl", b'{"input": "a", "output": "b"}\n{"input": "caf\xe9", "output": "x"}\n'),
    ("d.csv", b'input,output\na,b\ncaf\xe9,x\n'),
])
def test_latin1_file_is_refused_before_loading(tmp_path, chat_tok, name, content):
    (tmp_path / name).write_bytes(content)
    at = content.index(0xe9)
    line = content.count(b"\n", 0, at) + 1
    assert error(tmp_path, chat_tok, "--training_data_path", str(tmp_path / name)) == \
        f"{tmp_path / name}:{line}: not UTF-8 text (byte 0xe9 at offset {at}); " \
        "convert the file to UTF-8"


# ------------------------------------------------- a bad record: file and line


def test_bad_field_named_by_file_and_line(tmp_path, chat_tok):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", RECS[:3])
    write_jsonl(folder / "b.jsonl", RECS[:3])
    (folder / "c.jsonl").write_text(  # blank lines are not records: the line is the file's
        "\n".join(json.dumps(r) for r in RECS[:2]) + "\n\n\n"
        + json.dumps({"input": "x", "output": None}) + "\n")
    assert error(tmp_path, chat_tok, "--training_data_path", str(folder / "c.jsonl")) == \
        f"{folder / 'c.jsonl'}:5: field 'output' must be a string, got NoneType"
    write_jsonl(folder / "c.jsonl", RECS[:1] + [{"input": "x", "output": None}])
    assert error(tmp_path, chat_tok, "--training_data_path", str(folder)) == \
        f"{folder / 'c.jsonl'}:2: field 'output' must be a string, got NoneType"
    (tmp_path / "list.json").write_text(json.dumps(RECS[:2] + [{"input": None, "output": "y"}]))
    assert error(tmp_path, chat_tok, "--training_data_path", str(tmp_path / "list.json")) == \
        f"{tmp_path / 'list.json'}: record 3: field 'input' must be a string, got NoneType"
    Dataset.from_list([{"text": "a"}, {"text": "b"}, {"text": None}]).to_parquet(
        str(tmp_path / "t.parquet"))
    assert error(tmp_path, chat_tok, "--training_data_path", str(tmp_path / "t.parquet"),
                 "--dataset_text_field", "text") == \
        f"{tmp_path / 't.parquet'}: record 3: field 'text' must be a string, got NoneType"
    (tmp_path / "t.csv").write_text('text,n\n"two\nlines",1\nb,2\n,3\n')
    assert error(tmp_path, chat_tok, "--training_data_path", str(tmp_path / "t.csv"),
                 "--dataset_text_field", "text") == \
        f"{tmp_path / 't.csv'}:5: field 'text' must be a string, got NoneType"


def test_mixed_types_are_decoded_not_trained_as_json(tmp_path, chat_tok):
    """datasets stores a JSON field of mixed types as JSON text ('"b"'); handlers get the
    values, as from Dataset.map: strings train as they are, the number is refused."""
    write_jsonl(tmp_path / "d.jsonl", RECS[:2] + [{"input": "x", "output": ["a list"]}])
    assert error(tmp_path, chat_tok, "--training_data_path", str(tmp_path / "d.jsonl")) == \
        f"{tmp_path / 'd.jsonl'}:3: field 'output' must be a string, got list"
    write_jsonl(tmp_path / "d.jsonl", RECS[:2] + [{"input": "x", "output": "y", "n": 1},
                                                  {"input": "z", "output": "w", "n": "one"}])
    p = run(tmp_path, chat_tok, "--training_data_path", str(tmp_path / "d.jsonl"))
    assert chat_tok.decode(p.train[3]["input_ids"], skip_special_tokens=True) == "z w"
    # with blank lines datasets cannot load such a file: the clash is named instead
    (tmp_path / "d.jsonl").write_text('{"input": "a", "output": "b"}\n\n'
                                      '{"input": "c", "output": 3}\n')
    assert error(tmp_path, chat_tok, "--training_data_path", str(tmp_path / "d.jsonl")) == (
        f"{tmp_path / 'd.jsonl'}:3: field 'output' is a number here and a string at "
        f"{tmp_path / 'd.jsonl'}:1; give a field one type in all records")


def test_bad_record_found_after_split_rename_and_in_validation(tmp_path, chat_tok):
    recs = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(20)]
    recs[13]["a"] = ["a list"]
    write_jsonl(tmp_path / "qa.jsonl", recs)
    cfg = data_config(tmp_path, f"""
        datasets:
          - name: qa
            data_paths: [{tmp_path / 'qa.jsonl'}]
            split: {{train: 0.5, validation: 0.5}}
            data_handlers:
              - name: rename_columns
                arguments: {{column_mapping: {{q: input, a: output}}}}
              - name: tokenize_and_apply_input_masking
                arguments: {{remove_columns: all, batch_size: 3}}
    """)
    assert error(tmp_path, chat_tok, "--data_config_path", cfg) == \
        f"{tmp_path / 'qa.jsonl'}:14: field 'output' must be a string, got list"
    write_jsonl(tmp_path / "train.jsonl", RECS)
    write_jsonl(tmp_path / "valid.jsonl", RECS[:2] + [{"input": 1, "output": "z"}])
    assert error(tmp_path, chat_tok, "--training_data_path", str(tmp_path / "train.jsonl"),
                 "--validation_data_path", str(tmp_path / "valid.jsonl")) == \
        f"{tmp_path / 'valid.jsonl'}:3: field 'input' must be a string, got int"


def test_bad_record_in_a_stream(tmp_path, chat_tok):
    write_jsonl(tmp_path / "a.jsonl", RECS)
    write_jsonl(tmp_path / "b.jsonl", RECS[:1] + [{"input": "x", "output": None}])
    cfg = data_config(tmp_path, f"""
        dataprocessor: {{streaming: true}}
        datasets:
          - name: s
            data_paths: ["{tmp_path / 'a.jsonl'}", "{tmp_path / 'b.jsonl'}"]
            data_handlers:
              - name: tokenize_and_apply_input_masking
                arguments: {{remove_columns: all, batched: false}}
    """)
    with pytest.raises(DataError, match=f"^{tmp_path / 'b.jsonl'}:2: field 'output' must be a "
                                        "string, got NoneType$"):
        list(run(tmp_path, chat_tok, "--data_config_path", cfg, "--max_steps", "1").train)


def test_handlers_never_see_the_row_numbers(tmp_path, chat_tok):
    seen = []

    def spy(batch, **_):
        seen.append(("map", sorted(batch)))
        return {"input": batch["q"], "output": batch["a"]}

    def spy_record(record, **_):
        seen.append(("record", sorted(record)))
        if record["q"] == "c":
            from fmtune_data_handlers.loading import RecordError

            raise RecordError(0, "field 'q' is 'c'")
        return record

    def spy_filter(batch, **_):
        seen.append(("filter", sorted(batch)))
        return [True] * len(batch["q"])

    def spy_dataset(dataset, **_):
        seen.append(("dataset", sorted(dataset.column_names)))
        return dataset

    class Plugin:
        @hookimpl
        def register_data_handlers(self, register):
            register("spy", spy)
            register("spy_record", spy_record)
            register("spy_filter", spy_filter, "filter")
            register("spy_dataset", spy_dataset, "dataset")

    write_jsonl(tmp_path / "qa.jsonl", [{"q": "a", "a": "b"}, {"q": "c", "a": "d"}])

    def config(first):
        return data_config(tmp_path, f"""
            datasets:
              - name: qa
                data_paths: [{tmp_path / 'qa.jsonl'}]
                data_handlers:
                  - name: {first}
                    arguments: {{batched: false}}
                  - name: spy_filter
                  - name: spy_dataset
                  - name: select_columns
                    arguments: {{column_names: [q, a]}}
                  - name: spy
                    arguments: {{remove_columns: all}}
                  - name: tokenize_and_apply_input_masking
                    arguments: {{remove_columns: all}}
        """)

    p = run(tmp_path, chat_tok, "--data_config_path", config("spy_filter"), plugins=[Plugin()])
    assert seen == [("filter", ["a", "q"])] * 3 + [("dataset", ["a", "q"]), ("map", ["a", "q"])]
    assert p.train.column_names == ["input_ids", "labels", "attention_mask"]
    seen.clear()
    assert error(tmp_path, chat_tok, "--data_config_path", config("spy_record"),
                 plugins=[Plugin()]) == f"{tmp_path / 'qa.jsonl'}:2: field 'q' is 'c'"
    assert seen == [("record", ["a", "q"])] * 2


# ------------------------------------------------------------------ chat roles


@pytest.mark.parametrize("handler", ["tokenize_and_apply_chat_template_with_masking",
                                     "apply_tokenizer_chat_template"])
def test_unknown_chat_role_is_refused(tmp_path, chat_tok, handler):
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 2 + [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "gpt", "content": "hello"}]}])
    cfg = data_config(tmp_path, f"""
        datasets:
          - name: chat
            data_paths: [{tmp_path / 'chat.jsonl'}]
            data_handlers:
              - name: {handler}
                arguments: {{fn_kwargs: {{conversation_column_name: messages}}}}
    """)
    assert error(tmp_path, chat_tok, "--data_config_path", cfg, "--dataset_text_field",
                 "formatted_chat_data").startswith(
        f"{tmp_path / 'chat.jsonl'}:3: field 'messages': message 2 has role 'gpt'; the roles are "
        "system, user, assistant, tool (")


def test_roles_the_template_names_are_allowed(tmp_path, chat_tok):
    conv = [{"role": "developer", "content": "be brief"}, *CHAT[1:]]
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv}])
    assert "message 1 has role 'developer'" in error(
        tmp_path, chat_tok, "--training_data_path", str(tmp_path / "chat.jsonl"))
    template = ("{% for m in messages %}{% if m['role'] == 'developer' %}<|system|>"
                "{% else %}<|{{ m['role'] }}|>{% endif %}{{ m['content'] }}<|end|>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    p = run(tmp_path, chat_tok, "--training_data_path", str(tmp_path / "chat.jsonl"),
            "--chat_template", template)
    assert p.counts["train"] == {"ok": 1}


@pytest.mark.parametrize("template, roles", [
    ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}", ()),
    ("{% for m in messages %}{% if m.role == 'developer' %}D{% endif %}{% endfor %}",
     ("developer",)),
    ("{% for m in messages %}{% if m['role'] in ['ipython', 'tool'] %}T{% endif %}{% endfor %}",
     ("ipython",)),
    ("{% for m in messages %}{% set role = m.role %}{% if role|lower == 'tool_response' %}R"
     "{% endif %}{% endfor %}", ("tool_response",)),
    ("{{ (messages | selectattr('role', 'equalto', 'documents') | list)[0] }}", ("documents",)),
])
def test_template_roles(template, roles):
    from fmtune_data_handlers.chat import template_roles

    assert template_roles(template) == roles


# ----------------------------------------------------------- fn_kwargs, sampling


def test_fn_kwargs_must_be_the_handlers_arguments(tmp_path, chat_tok):
    write_jsonl(tmp_path / "d.jsonl", RECS)

    def handler(batch, **_):
        return batch

    def loose(batch, **kwargs):
        return batch

    class Plugin:
        @hookimpl
        def register_data_handlers(self, register):
            register("strict_one", handler)
            register("loose_one", loose)

    def config(name, kwargs):
        return data_config(tmp_path, f"""
            datasets:
              - name: d
                data_paths: [{tmp_path / 'd.jsonl'}]
                data_handlers:
                  - name: {name}
                    arguments: {{fn_kwargs: {kwargs}}}
                  - name: tokenize_and_apply_input_masking
        """)

    cfg = config("tokenize_and_apply_input_masking", "{output_colum_name: output}")
    assert error(tmp_path, chat_tok, "--data_config_path", cfg) == (
        f"invalid config: {cfg}: datasets[0].data_handlers[0].arguments.fn_kwargs."
        "output_colum_name: data handler 'tokenize_and_apply_input_masking' (dataset 'd') takes "
        "no argument 'output_colum_name' (did you mean 'output_column_name'?); it takes "
        "max_seq_length, input_column_name, output_column_name, add_eos_token")
    cfg = config("tokenize", "{tokenizer: gpt2, text_column_name: input}")
    assert "fn_kwargs.tokenizer: data handler 'tokenize'" in error(
        tmp_path, chat_tok, "--data_config_path", cfg)
    cfg = config("strict_one", "{x: 1}")
    assert "takes no argument 'x'; it takes none" in error(
        tmp_path, chat_tok, "--data_config_path", cfg, plugins=[Plugin()])
    cfg = config("loose_one", "{x: 1}")  # **kwargs: the handler takes any key
    assert run(tmp_path, chat_tok, "--data_config_path", cfg,
               plugins=[Plugin()]).counts["train"] == {"ok": 6}


@pytest.mark.parametrize("sampling", ["0", "0.0", "1.5"])
def test_sampling_must_be_in_0_1(tmp_path, chat_tok, sampling):
    write_jsonl(tmp_path / "d.jsonl", RECS)
    cfg = data_config(tmp_path, f"""
        datasets:
          - name: d
            data_paths: [{tmp_path / 'd.jsonl'}]
            sampling: {sampling}
    """)
    assert f"{cfg}: datasets[0].sampling: must be in (0, 1], got {float(sampling):g}" in \
        error(tmp_path, chat_tok, "--data_config_path", cfg).replace(".0", "")


def test_data_command_usage_errors_are_one_line():
    for argv, needle in ((["data"], "data: a sub-command is required: preview"),
                         (["data", "previw"], "data: argument COMMAND: invalid choice: 'previw'"),
                         (["data", "preview", "--n", "x"],
                          "data preview: argument --n: invalid int value: 'x'")):
        res = run_cli(argv)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and \
            lines[0].startswith(f"fmtune: error: {needle}"), res.stderr
    assert run_cli(["data", "--help"]).exit_code == 0


# ------------------------------------------ fmtune output folders are not data


def fake_run(folder, *, marker="fmtune_config.json"):
    """What a previous `fmtune train` left in its output_dir."""
    (folder / "checkpoint-1").mkdir(parents=True)
    (folder / marker).write_text("{}")
    write_jsonl(folder / "training_logs.jsonl", [{"step": 1, "loss": 2.0}])
    (folder / "checkpoint-1" / "trainer_state.json").write_text("{}")
    (folder / "config.json").write_text("{}")


@pytest.mark.parametrize("marker", ["fmtune_config.json", "run_summary.json"])
def test_a_run_folder_inside_the_data_folder_is_skipped(tmp_path, chat_tok, caplog, marker):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", RECS)
    fake_run(data / "run1", marker=marker)
    fake_run(data / "deep" / "run2")
    write_jsonl(data / "deep" / "more.jsonl", RECS[:2])
    with caplog.at_level(logging.WARNING, logger="fmtune"):
        assert expand(str(data)) == [str(data / "deep" / "more.jsonl"), str(data / "train.jsonl")]
    assert f"{data / 'run1'}: skipped, an fmtune run's output folder (holds " in caplog.text
    assert f"{data / 'deep' / 'run2'}: skipped" in caplog.text
    assert expand(str(data / "**" / "*.json*")) == [str(data / "deep" / "more.jsonl"),
                                                    str(data / "train.jsonl")]
    assert run(tmp_path, chat_tok, "--training_data_path", str(data)).counts["train"] == \
        {"ok": 8}


def test_preprocess_output_inside_the_data_folder_is_skipped(tmp_path, chat_tok, caplog):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", RECS)
    prep = data / "prep" / "train_dataset"
    prep.mkdir(parents=True)
    Dataset.from_list([{"input_ids": [1, 2], "labels": [1, 2]}]).to_parquet(
        str(prep / "train-00000-of-00001.parquet"))
    with caplog.at_level(logging.WARNING, logger="fmtune"):
        assert expand(str(data)) == [str(data / "train.jsonl")]
    assert "prep: skipped, an fmtune preprocess output folder (holds train_dataset/)" in \
        caplog.text
    assert expand(str(prep)) == [str(prep / "train-00000-of-00001.parquet")]  # given: data
    with pytest.raises(DataError, match=f"{data / 'prep'}: is an fmtune preprocess output "
                                        f"folder .*; give {prep}$"):
        expand(str(data / "prep"))


def test_a_run_folder_given_as_data_is_refused(tmp_path, chat_tok):
    fake_run(tmp_path / "run")
    write_jsonl(tmp_path / "run" / "train.jsonl", RECS)
    assert error(tmp_path, chat_tok, "--training_data_path", str(tmp_path / "run")) == (
        f"{tmp_path / 'run'}: is an fmtune run's output folder (holds fmtune_config.json), not "
        "a data folder; give the data files or a folder of them, and keep output_dir out of it")
    assert run(tmp_path, chat_tok, "--training_data_path",
               str(tmp_path / "run" / "train.jsonl")).counts["train"] == {"ok": 6}
