"""docs/silogen.md's key-by-key tables are generated from the translator's tables in
fmtune.silogen (``doc_tables()``), between marker comments. The test fails when the doc drifts
from the code (regenerate: FMTUNE_WRITE_DOCS=1 .venv/bin/python -m pytest
tests/test_silogen_doc.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fmtune import silogen
from fmtune.testing import check_generated

DOC = Path(__file__).resolve().parents[1] / "docs" / "silogen.md"
BEGIN = "<!-- BEGIN generated: silogen.doc_tables() -->"
END = "<!-- END generated: silogen.doc_tables() -->"


def render(current: str) -> str:
    """``current`` with the text between the markers replaced by ``silogen.doc_tables()``."""
    assert current.count(BEGIN) == 1 and current.count(END) == 1, \
        f"docs/silogen.md must hold the markers {BEGIN!r} and {END!r} once each"
    head, rest = current.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{silogen.doc_tables()}{END}{tail}"


def test_silogen_doc_matches_the_code():
    check_generated(DOC, render(DOC.read_text(encoding="utf-8")), "docs/silogen.md")


def _documented() -> str:
    return silogen.doc_tables()


@pytest.mark.parametrize("prefix,keys", [
    ("run_conf", silogen.RUN_KEYS), ("data_conf", silogen.DATA_CONF_KEYS[2:]),
    ("sft_args", silogen.SFT_KEYS), ("batchsize_conf", silogen.BATCH_KEYS),
    ("overrides", silogen.OVERRIDE_KEYS), ("tracking", silogen.TRACKING_KEYS),
    ("peft_conf", silogen.PEFT_KEYS), ("quant_conf", silogen.QUANT_KEYS),
    ("run_conf.model_args", tuple(silogen.MODEL_ARG_OPTIONS)),
    ("model_conf", silogen.GEN_MODEL_KEYS), ("hf_gen_params", tuple(silogen.GEN_DEFAULTS)),
])
def test_every_key_the_translators_accept_has_a_row(prefix, keys):
    text = _documented()
    for key in keys:
        if key == "model_args":
            continue  # its keys have rows of their own
        assert re.search(rf"`{re.escape(prefix)}\.{re.escape(key)}[`:]", text), \
            f"{prefix}.{key} has no row in silogen.doc_tables()"


def test_fixed_defaults_and_dpo_options_come_from_the_tables():
    text = _documented()
    for key, default in silogen.LORA_FIXED.items():
        assert f"`{key}: {silogen._md(default)}`" in text
    for key, default in silogen.MODEL_ARG_DEFAULTS.items():
        if key != "device_map":
            assert f"`{key}: {silogen._md(default)}`" in text
    for key in silogen.DPO_ARGS:
        assert f"`training_args.{key}`" in text
    for name in silogen.CHAT_TEMPLATES:
        assert f"`{name}`" in text
    for key in silogen.GEN_OUTPUT_KEYS:
        assert f"| `{key}` |" in text


def test_a_key_without_a_note_or_a_stale_note_is_an_error(monkeypatch):
    notes = dict(silogen.KEY_NOTES)
    del notes["run_conf.tokenizer"]
    monkeypatch.setattr(silogen, "KEY_NOTES", notes)
    with pytest.raises(KeyError, match="no row for run_conf.tokenizer"):
        silogen.doc_tables()
    monkeypatch.setattr(silogen, "KEY_NOTES", {**silogen.KEY_NOTES, "run_conf.tokenizer": "x",
                                               "run_conf.gone": "y"})
    with pytest.raises(KeyError, match="no key table has run_conf.gone"):
        silogen.doc_tables()
