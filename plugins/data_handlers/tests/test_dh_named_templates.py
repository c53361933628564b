"""``--chat_template`` and ``dataprocessor.chat_template`` take a built-in name, a file or the
text (``fmtune.records.resolve_chat_template``), checked at config time; the template the chat
data is rendered with becomes the run's tokenizer's (so every save carries it), except a record-form
template or several different ones."""

from __future__ import annotations

import logging

import pytest

from fmtune.commands import load_config, validate
from fmtune.config import ConfigError
from fmtune.records import resolve_chat_template
from fmtune.testing import build_tokenizer, write_jsonl
from fmtune_data_handlers.plugin import keep_template, prepare

CHATML = resolve_chat_template("chatml")
CONV = [{"role": "user", "content": "what is two plus two?"},
        {"role": "assistant", "content": "four"}]
LIST_FORM = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
RECORD_FORM = LIST_FORM.replace("in messages", "in messages['messages']")


@pytest.fixture
def tok():
    return build_tokenizer(["what is two plus two four user assistant"])  # no chat template


def configured(tmp_path, *flags):
    config, pm, _, _ = load_config(["--plugins", "data_handlers", "--model_name_or_path", "m",
                                    "--output_dir", str(tmp_path / "o"), *flags])
    validate(config, pm)
    return config, pm


def ids_of(prepared):
    return [list(r["input_ids"]) for r in prepared.train]


def chatml_ids(tok):
    text = tok.apply_chat_template(CONV, chat_template=CHATML, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_flag_takes_a_name(tmp_path, tok):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONV}])
    config, pm = configured(tmp_path, "--training_data_path", data, "--chat_template", "chatml")
    prepared = prepare(config, tok, pm)
    assert ids_of(prepared) == [chatml_ids(tok)]
    assert prepared.chat_templates == [CHATML]


def test_data_config_chat_template_takes_a_name_or_a_file(tmp_path, tok):
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONV}])
    (tmp_path / "t.jinja").write_text(CHATML)
    for value in ("chatml", "t.jinja"):  # a file relative to the data_config's folder
        dc = tmp_path / "dc.yaml"
        dc.write_text(f"dataprocessor:\n  chat_template: {value}\n"
                      "datasets:\n  - name: chat\n    data_paths: [chat.jsonl]\n")
        config, pm = configured(tmp_path, "--data_config_path", str(dc))
        prepared = prepare(config, tok, pm)
        assert ids_of(prepared) == [chatml_ids(tok)], value
        assert prepared.chat_templates == [CHATML]


@pytest.mark.parametrize("proc, message", [
    ("chat_template: templates/chat.jinja",
     "dataprocessor.chat_template: templates/chat.jinja: file not found"),
    ("chat_template: chatm1", "dataprocessor.chat_template: 'chatm1' is not a built-in chat "
     "template"),
    ("chat_template_path: bad.jinja", "dataprocessor.chat_template_path: invalid Jinja (line 1)"),
])
def test_data_config_template_errors_at_config_time(tmp_path, proc, message):
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONV}])
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    dc = tmp_path / "dc.yaml"
    dc.write_text(f"dataprocessor:\n  {proc}\ndatasets:\n  - name: chat\n"
                  "    data_paths: [chat.jsonl]\n")
    with pytest.raises(ConfigError) as e:
        configured(tmp_path, "--data_config_path", str(dc))
    assert f"{dc}: {message}" in str(e.value)


def test_flag_errors_at_config_time(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONV}])
    with pytest.raises(ConfigError) as e:
        configured(tmp_path, "--training_data_path", data, "--chat_template", "chat.jinja")
    assert "chat_template: chat.jinja: file not found" in str(e.value)


def test_yaml_template_file_is_found_next_to_the_config(tmp_path, tok, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "t.jinja").write_text(CHATML)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONV}])
    cfg = tmp_path / "cfg" / "run.yaml"
    cfg.write_text(f"chat_template: t.jinja\ntraining_data_path: {data}\n")
    monkeypatch.chdir(tmp_path)
    config, pm = configured(tmp_path, "--config", str(cfg))
    assert prepare(config, tok, pm).chat_templates == [CHATML]


def test_keep_template(tok, caplog):
    keep_template(tok, [])
    assert not tok.chat_template
    with caplog.at_level(logging.WARNING, logger="fmtune"):
        keep_template(tok, [RECORD_FORM])
        assert not tok.chat_template and "record form" in caplog.text
        keep_template(tok, [LIST_FORM, CHATML])
        assert not tok.chat_template and "2 different chat templates" in caplog.text
        caplog.clear()
        keep_template(tok, [CHATML])
    assert tok.chat_template == CHATML
    assert "--add_special_tokens <|im_start|> <|im_end|>" in caplog.text
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fmtune"):
        keep_template(tok, [LIST_FORM])
    assert tok.chat_template == LIST_FORM and not caplog.text
