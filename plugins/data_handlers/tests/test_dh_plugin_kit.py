"""What a handler plugin gets: the registry hook this plugin owns, the run's config (plugin
options) in handlers, ``--data_handlers`` on a single file, column types checked as data loads,
and handler errors that name the file and line."""

from __future__ import annotations

import json
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fmtune import hookimpl
from fmtune.commands import load_config, validate
from fmtune.config import ConfigError
from fmtune.testing import run_cli, write_jsonl
from fmtune_data_handlers import hookspecs
from fmtune_data_handlers.loading import JSON_CHUNK, DataError, RecordError
from fmtune_data_handlers.plugin import prepare

RECS = [{"input": f"question {i}", "output": f"answer {i}"} for i in range(6)]
TICKETS = [{"ticket": {"subject": f"subject {i}", "body": "the dog"}, "resolution": "fixed"}
           for i in range(5)]


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


def decoded(tok, prepared, split="train") -> list[str]:
    return [tok.decode(r["input_ids"], skip_special_tokens=True) for r in getattr(prepared, split)]


class Tickets:
    """An in-test handler plugin with an option its handler reads from the run's config."""

    @hookimpl
    def add_options(self, register):
        register("ticket_prefix", str, "ticket", "What the prompt starts with.")

    @hookimpl
    def register_data_handlers(self, register, config):
        assert config.ticket_prefix is not None  # the run's config, at registration too

        def tickets(batch, config, separator=": "):
            return {"input": [f"[{config.ticket_prefix}] {t['subject']}{separator}{t['body']}"
                              for t in batch["ticket"]],
                    "output": batch["resolution"]}

        register("ticket_to_input_output", tickets)


# ------------------------------------------------------------- the registry


def test_the_registry_hook_is_this_plugins(tmp_path):
    from fmtune import hookspecs as core

    assert not hasattr(core, "register_data_handlers")
    assert hasattr(hookspecs.register_data_handlers, "fmtune_spec")
    config, pm, _, _ = load_config(["--plugins", "data_handlers", "--model_name_or_path", "m",
                                    "--output_dir", str(tmp_path / "o")])
    assert pm.hook.register_data_handlers.has_spec()

    class Wrapper:
        @hookimpl(wrapper=True)
        def register_data_handlers(self, register):
            return (yield)

    class BadKind:
        @hookimpl
        def register_data_handlers(self, register):
            register("x", lambda b: b, "mapp")

    write_jsonl(tmp_path / "d.jsonl", RECS)
    args = ["train", "--plugins", "data_handlers", "--model_name_or_path", "m", "--output_dir",
            str(tmp_path / "o"), "--training_data_path", str(tmp_path / "d.jsonl"),
            "--data_handlers", "x"]
    res = run_cli(args, plugins=[Wrapper()])
    assert res.exit_code == 2 and "register_data_handlers cannot be a wrapper" in res.stderr
    res = run_cli(args, plugins=[BadKind()])
    assert res.exit_code == 2
    assert "data handler 'x': kind must be one of map, filter, dataset, got 'mapp'" in res.stderr


# ----------------------------------------------------- config in handlers


def test_handler_reads_a_plugin_option_from_a_data_config_and_on_one_file(tmp_path, chat_tok):
    write_jsonl(tmp_path / "t.jsonl", TICKETS)
    cfg = data_config(tmp_path, """
        datasets:
          - name: tickets
            data_paths: [t.jsonl]
            data_handlers:
              - name: ticket_to_input_output
                arguments: {remove_columns: all, fn_kwargs: {separator: " - "}, num_proc: 2}
    """)
    p = run(tmp_path, chat_tok, "--data_config_path", cfg, "--ticket_prefix", "help",
            plugins=[Tickets()])
    # (num_proc: the config is pickled into the worker processes)
    assert decoded(chat_tok, p) == [f"[help] subject {i} - the dog fixed" for i in range(5)]
    # one file, no data_config: the handler, then tokenizing as the flags say
    write_jsonl(tmp_path / "v.jsonl", TICKETS[:2])
    p = run(tmp_path, chat_tok, "--training_data_path", str(tmp_path / "t.jsonl"),
            "--validation_data_path", str(tmp_path / "v.jsonl"),
            "--data_handlers", "ticket_to_input_output", plugins=[Tickets()])
    assert decoded(chat_tok, p)[0] == "[ticket] subject 0: the dog fixed"
    assert decoded(chat_tok, p, "validation")[1] == "[ticket] subject 1: the dog fixed"
    labels = p.train[0]["labels"]
    assert chat_tok.decode([t for t in labels if t != -100]) == " fixed<|endoftext|>"
    # config is fmtune's to pass: not a fn_kwarg
    bad = data_config(tmp_path, """
        datasets:
          - name: tickets
            data_paths: [t.jsonl]
            data_handlers:
              - name: ticket_to_input_output
                arguments: {fn_kwargs: {config: 1}}
    """)
    assert "fn_kwargs.config: data handler 'ticket_to_input_output' (dataset 'tickets') takes " \
        "no argument 'config'" in error(tmp_path, chat_tok, "--data_config_path", bad,
                                        plugins=[Tickets()])


def test_data_handlers_flag_checked_before_anything_loads(tmp_path, chat_tok):
    write_jsonl(tmp_path / "t.jsonl", TICKETS)
    message = error(tmp_path, chat_tok, "--training_data_path", str(tmp_path / "t.jsonl"),
                    "--data_handlers", "ticket_to_input_outptu", plugins=[Tickets()])
    assert "data_handlers[0]: unknown data handler 'ticket_to_input_outptu' (did you mean " \
        "'ticket_to_input_output'?)" in message
    cfg = data_config(tmp_path, "datasets:\n  - name: t\n    data_paths: [t.jsonl]\n")
    assert "data_handlers and data_config_path are exclusive" in error(
        tmp_path, chat_tok, "--data_config_path", cfg, "--data_handlers",
        "ticket_to_input_output", plugins=[Tickets()])
    # the flag alone activates the plugin, as --data_config_path does
    res = run_cli(["train", "--model_name_or_path", "m", "--output_dir", str(tmp_path / "o"),
                   "--training_data_path", str(tmp_path / "t.jsonl"), "--data_handlers",
                   "nope"])
    assert res.exit_code == 2 and "unknown data handler 'nope'" in res.stderr


# --------------------------------------------------------- column types


def test_a_record_of_another_type_in_one_file_reaches_handlers_as_its_value(tmp_path, chat_tok):
    """One file datasets reads in one chunk: a field of mixed types is kept as its values
    (datasets' Json type), so a handler sees ``3``, never JSON text, and the built-in handlers
    name the record."""
    recs = RECS[:3] + [{"input": "x", "output": 3}] + RECS[3:]
    write_jsonl(tmp_path / "train.jsonl", recs)
    assert error(tmp_path, chat_tok, "--training_data_path", str(tmp_path / "train.jsonl")) == \
        f"{tmp_path / 'train.jsonl'}:4: field 'output' must be a string, got int"
    seen = []

    class Spy:
        @hookimpl
        def register_data_handlers(self, register):
            def spy(batch):
                seen.extend(batch["output"])
                return {"output": [str(o) for o in batch["output"]]}
            register("spy", spy)

    p = run(tmp_path, chat_tok, "--training_data_path", str(tmp_path / "train.jsonl"),
            "--data_handlers", "spy", plugins=[Spy()])
    assert seen == ["answer 0", "answer 1", "answer 2", 3, "answer 3", "answer 4", "answer 5"]
    assert decoded(chat_tok, p)[3] == "x 3"


def test_a_value_datasets_would_cast_is_a_file_line_error(tmp_path, chat_tok):
    """datasets types a JSON field from the first chunk of the first file and casts later
    files and chunks to it (3 became "3", and a later chunk that mixes types became JSON text):
    a one-line error naming the record, the field and both types."""
    folder = tmp_path / "data"
    folder.mkdir()
    a, b = folder / "a.jsonl", folder / "b.jsonl"
    write_jsonl(a, RECS[:2])
    write_jsonl(b, RECS[2:5] + [{"input": "x", "output": 3}])
    message = (f"{b}:4: field 'output' is a number here and a string at {a}:1; give a field "
               "one type in all records")
    # one load of both files (a folder), or a load per path then combined
    assert error(tmp_path, chat_tok, "--training_data_path", str(folder)) == message
    assert error(tmp_path, chat_tok, "--training_data_path", f"{a},{b}") == message
    # b first: its field is kept as JSON values (mixed in the first chunk), a's strings are
    # cast to them: the handler gets 3 and names its record
    b.rename(folder / "0.jsonl")
    assert error(tmp_path, chat_tok, "--training_data_path", str(folder)) == \
        f"{folder / '0.jsonl'}:4: field 'output' must be a string, got int"
    (folder / "0.jsonl").rename(b)
    # a nested field (chat messages), and JSON lists
    write_jsonl(a, [{"messages": [{"role": "user", "content": "hi"}]}])
    write_jsonl(b, [{"messages": [{"role": "user", "content": "hi"}]},
                    {"messages": [{"role": "user", "content": 2}]}])
    assert error(tmp_path, chat_tok, "--training_data_path", str(folder)) == (
        f"{b}:2: field 'messages[].content' is a number here and a string at {a}:1; give a "
        "field one type in all records")
    (tmp_path / "lists").mkdir()
    la, lb = tmp_path / "lists" / "a.json", tmp_path / "lists" / "b.json"
    la.write_text(json.dumps(RECS[:2]))
    lb.write_text(json.dumps(RECS[2:4] + [{"input": "x", "output": True}]))
    assert error(tmp_path, chat_tok, "--training_data_path", str(tmp_path / "lists")) == (
        f"{lb}: record 3: field 'output' is a boolean here and a string at {la}: record 1; "
        "give a field one type in all records")


def test_past_the_first_chunk(tmp_path):
    """One JSONL file larger than datasets' 10 MB chunk, with a number in a text field after
    it: it used to arrive as "3"."""
    from fmtune_data_handlers.loading import load_files

    path = tmp_path / "big.jsonl"
    line = json.dumps({"input": "x" * 1000, "output": "y"}) + "\n"
    n = JSON_CHUNK // len(line) + 10
    path.write_text(line * n + json.dumps({"input": "z", "output": 3}) + "\n")
    with pytest.raises(DataError) as e:
        load_files([str(path)])
    assert str(e.value) == (f"{path}:{n + 1}: field 'output' is a number here and a string at "
                            f"{path}:1; give a field one type in all records")
    with pytest.raises(DataError, match=f"^{path}:{n + 1}: field 'output' is a number"):
        load_files([str(path)], streaming=True)


def test_parquet_files_of_different_column_types(tmp_path, chat_tok):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": ["a b", "c d"], "n": [None, None]}), a)
    pq.write_table(pa.table({"text": [3, 4], "n": [1, 2]}), b)
    assert error(tmp_path, chat_tok, "--training_data_path", f"{a},{b}",
                 "--dataset_text_field", "text") == (
        f"{b}: column 'text' is a number (int64) here and a string (string) in {a}; give a "
        "column one type in all files")


# ------------------------------------------------------ errors: file:line


def test_errors_name_the_line_after_a_handler_that_replaces_the_columns(tmp_path, chat_tok):
    """A handler that removes every column keeps the rows it was given: the next handler's
    bad record is named by file and line, not "record 4 of this batch"."""
    class Records:
        @hookimpl
        def register_data_handlers(self, register):
            def to_io(record):
                return {"input": record["ticket"]["subject"], "output": record["resolution"]}
            register("to_io", to_io)

    recs = [dict(t) for t in TICKETS]
    recs[3] = {**recs[3], "resolution": None}
    write_jsonl(tmp_path / "t.jsonl", recs)
    line4 = f"{tmp_path / 't.jsonl'}:4: field 'output' must be a string, got NoneType"
    for name, batched in (("ticket_to_input_output", "true"), ("to_io", "false")):
        cfg = data_config(tmp_path, f"""
            datasets:
              - name: tickets
                data_paths: [t.jsonl]
                data_handlers:
                  - name: {name}
                    arguments: {{remove_columns: all, batched: {batched}}}
                  - name: tokenize_and_apply_input_masking
                    arguments: {{remove_columns: all}}
        """)
        assert error(tmp_path, chat_tok, "--data_config_path", cfg,
                     plugins=[Tickets(), Records()]) == line4, name
    assert error(tmp_path, chat_tok, "--training_data_path", str(tmp_path / "t.jsonl"),
                 "--data_handlers", "ticket_to_input_output", plugins=[Tickets()]) == line4
    # a handler that returns a column of several types (a record's 3 passed on): named too
    recs[3] = {**recs[3], "resolution": 3}
    write_jsonl(tmp_path / "t.jsonl", recs)
    assert error(tmp_path, chat_tok, "--training_data_path", str(tmp_path / "t.jsonl"),
                 "--data_handlers", "ticket_to_input_output", plugins=[Tickets()]) == (
        f"{tmp_path / 't.jsonl'}:4: column 'output' returned by data_handlers[0] "
        "(ticket_to_input_output) is a number here and a string in earlier records; a handler "
        "returns one type per column")


def test_a_record_handler_raises_data_error_or_record_error(tmp_path, chat_tok):
    """A handler of one record (``batched: false``) raises ``DataError(problem)``; a batched one
    ``RecordError(index_in_batch, problem)``: either is the record's file and line."""
    class Strict:
        @hookimpl
        def register_data_handlers(self, register):
            def one(record):
                if record["input"] == "question 3":
                    raise DataError("field 'input' is question 3")
                return record

            def batch(batch):
                for i, text in enumerate(batch["input"]):
                    if text == "question 4":
                        raise RecordError(i, "field 'input' is question 4")
                return batch
            register("one", one)
            register("batch", batch)

    write_jsonl(tmp_path / "d.jsonl", RECS)
    for name, line in (("one", 4), ("batch", 5)):
        cfg = data_config(tmp_path, f"""
            datasets:
              - name: d
                data_paths: [d.jsonl]
                data_handlers:
                  - name: {name}
                    arguments: {{batched: {str(name == "batch").lower()}, batch_size: 2}}
        """)
        assert error(tmp_path, chat_tok, "--data_config_path", cfg, plugins=[Strict()]) == \
            f"{tmp_path / 'd.jsonl'}:{line}: field 'input' is question {line - 1}"
