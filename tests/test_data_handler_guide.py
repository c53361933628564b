"""docs/plugins.md, "Writing a data handler": its plugin module, data_config and command lines
are taken from the doc and run, so the guide cannot drift from what fmtune does."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from fmtune.commands import load_config, validate
from fmtune.config import ConfigError
from fmtune.testing import doc_blocks, doc_module, write_jsonl

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
SECTION = "## Writing a data handler"
TICKETS = [
    {"ticket": {"product": "fox", "subject": "hello", "thread": ["a", "b", "the dog"]},
     "resolution": "fixed"},
    {"ticket": {"product": "cat", "subject": "help", "thread": []}, "resolution": "no"}]


def blocks(lang: str) -> list[str]:
    return doc_blocks(DOC, SECTION, lang)


@pytest.fixture
def tickets_plugin():
    module = doc_module(DOC, SECTION, "fmtune_tickets")
    assert module.fmtune_plugins == ["data_handlers"]
    return module


def prepared(tmp_path, line: str, model: str, plugin):
    """The data a command line of the guide trains on (``fmtune train`` up to the data)."""
    from fmtune_data_handlers.plugin import prepare

    argv = shlex.split(line)
    assert argv[:2] == ["fmtune", "train"] and argv[2:4] == ["--plugins", "tickets"]
    argv = [model if a == "MODEL" else str(tmp_path / a) if a in ("tickets.yaml", "out")
            else a for a in argv[4:]]
    config, pm, _, _ = load_config(["--plugins", "data_handlers", *argv],
                                   extra_plugins=[plugin])
    validate(config, pm)
    tok = AutoTokenizer.from_pretrained(model)
    return tok, prepare(config, tok, pm)


def test_the_guide_runs(tmp_path, monkeypatch, fmtune_tiny_model, tickets_plugin):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "tickets.jsonl", TICKETS)
    (data_config,) = blocks("yaml")
    (tmp_path / "tickets.yaml").write_text(data_config)
    with_config, one_file = [line for line in blocks("console")[0].splitlines() if line]

    tok, p = prepared(tmp_path, with_config, fmtune_tiny_model, tickets_plugin)
    prompt = "[support] hello: b | the dog\nresolution:"  # --ticket_prefix, max_thread: 2
    row = p.train[0]
    assert row["input_ids"] == tok(prompt)["input_ids"] + \
        tok(" fixed", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]) \
        == " fixed" + tok.eos_token

    tok, p = prepared(tmp_path, one_file, fmtune_tiny_model, tickets_plugin)
    assert [tok.decode(r["input_ids"]) for r in p.train] == [
        "[ticket] hello: a | b | the dog\nresolution: fixed" + tok.eos_token,
        "[ticket] help: \nresolution: no" + tok.eos_token]

    # the error convention: a record the handler refuses is named by file and line
    write_jsonl(tmp_path / "tickets.jsonl", TICKETS + [{"ticket": {"subject": 4},
                                                        "resolution": "x"}])
    with pytest.raises(ConfigError) as e:
        prepared(tmp_path, one_file, fmtune_tiny_model, tickets_plugin)
    assert str(e.value) == "tickets.jsonl:3: field 'ticket.subject' must be a string"
