"""Texts are cut to what max_seq_length tokens can reach before they are tokenized
(fmtune.records.char_budget): a huge record gives the same ids, labels and status as when it is
tokenized whole, and no text longer than the budget reaches the tokenizer."""

from __future__ import annotations

import pytest

from fmtune.commands import load_config
from fmtune.records import char_budget
from fmtune.testing import write_jsonl
from fmtune_data_handlers import handlers, masking
from fmtune_data_handlers.plugin import prepare

MAX = 128
FOX = "The quick brown fox jumps over the lazy dog. "
LONG = (FOX * (300_000 // len(FOX) + 1))[:300_000]  # ~300 KB


def as_lists(out: dict) -> dict:
    return {k: [list(v) if not isinstance(v, str) else v for v in col] for k, col in out.items()}


def whole(monkeypatch, fn):
    """``fn()`` with the cut disabled: every text is tokenized whole (the reference)."""
    with monkeypatch.context() as m:
        m.setattr(masking, "char_budget", lambda tokenizer, max_tokens: None)
        return fn()


CASES = {
    "text field": lambda tok: handlers.tokenize(
        {"text": [LONG, "short text"]}, tok, MAX),
    "text field, response template": lambda tok: handlers.tokenize(
        {"text": ["question: what is two plus two? answer: four " + LONG,  # trained, cut
                  LONG + " answer: four",  # the response lies past the budget
                  "question: " + LONG]},  # no response at all
        tok, MAX, response_template=" answer:"),
    "text field, segment by segment": lambda tok: handlers.tokenize(  # "qu|ick" merged
        {"text": [LONG, "The qu" + LONG]}, tok, MAX, response_template="The qu"),
    "text field, multi-turn": lambda tok: handlers.tokenize(
        {"text": ["<|user|> hi <|assistant|> " + LONG + " <|user|> more <|assistant|> yes"]},
        tok, MAX, response_template="<|assistant|>", instruction_template="<|user|>"),
    "input/output": lambda tok: handlers.tokenize_and_apply_input_masking(
        {"input": [LONG, "translate: the red cat =", "question:", "Label:"],
         "output": ["le chat", LONG, "four", " no" + LONG]}, tok, MAX),
    "chat": lambda tok: handlers.tokenize_and_apply_chat_template_with_masking(
        {"messages": [[{"role": "user", "content": LONG}, {"role": "assistant", "content": "four"}],
                      [{"role": "user", "content": "hi"}, {"role": "assistant", "content": LONG}],
                      [{"role": "system", "content": "be brief"},
                       {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
                       {"role": "user", "content": LONG}, {"role": "assistant", "content": "no"}]]},
        tok, MAX),
    "chat, templates": lambda tok: handlers.tokenize_and_apply_chat_template_with_masking(
        {"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": LONG}],
                      [{"role": "user", "content": LONG}, {"role": "assistant", "content": "x"}]]},
        tok, MAX, response_template="<|assistant|>\n", instruction_template="<|user|>"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cut_keeps_ids_labels_and_status(monkeypatch, chat_tok, case):
    got = as_lists(CASES[case](chat_tok))
    want = as_lists(whole(monkeypatch, lambda: CASES[case](chat_tok)))
    assert got == want
    assert "truncated" in got["status"]
    assert all(len(ids) <= MAX for ids in got["input_ids"])


class Spy:
    """Records the length of every text given to the tokenizer, from Python (``__call__``) and
    at the Rust backend (``encode``/``encode_batch``, which the masking code calls directly)."""

    def __init__(self, backend):
        self.backend, self.lengths = backend, []

    def see(self, texts):
        for t in [texts] if isinstance(texts, str) else texts:
            self.lengths.append(len(t) if isinstance(t, str) else sum(map(len, t)))

    def encode(self, text, *args, **kwargs):
        self.see(text)
        return self.backend.encode(text, *args, **kwargs)

    def encode_batch(self, texts, *args, **kwargs):
        self.see(texts)
        return self.backend.encode_batch(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.backend, name)


def run(tmp_path, tok, records, *flags):
    path = write_jsonl(tmp_path / "data.jsonl", records)
    config, pm, _, _ = load_config(["--plugins", "data_handlers", "--model_name_or_path", "m",
                                    "--output_dir", str(tmp_path / "o"), "--max_seq_length",
                                    str(MAX), "--training_data_path", path, *flags])
    p = prepare(config, tok, pm)
    return [(r["input_ids"], r["labels"]) for r in p.train], p.counts["train"]


PIPELINES = {
    "text field": ([{"text": LONG}, {"text": "question: two plus two? answer: four " + LONG}],
                   ["--dataset_text_field", "text", "--response_template", " answer:"]),
    "text field, segment by segment": ([{"text": LONG}],  # "The qu|ick": tokens cross
                                       ["--dataset_text_field", "text", "--response_template",
                                        "The qu"]),
    "input/output": ([{"input": LONG, "output": "x"}, {"input": "q", "output": LONG}], []),
    "chat": ([{"messages": [{"role": "user", "content": "hi"},
                            {"role": "assistant", "content": LONG}]},
              {"messages": [{"role": "user", "content": LONG},
                            {"role": "assistant", "content": "no"}]}], []),
}


@pytest.mark.parametrize("case", sorted(PIPELINES))
def test_no_text_longer_than_the_budget_is_tokenized(tmp_path, monkeypatch, chat_tok, case):
    records, flags = PIPELINES[case]
    want = whole(monkeypatch, lambda: run(tmp_path, chat_tok, records, *flags))
    spy = Spy(chat_tok._tokenizer)
    calls = []
    original = type(chat_tok).__call__

    def call(self, text=None, *args, **kwargs):
        calls.append(text)
        return original(self, text, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(type(chat_tok), "__call__", call)
        m.setattr(chat_tok, "_tokenizer", spy)
        got = run(tmp_path, chat_tok, records, *flags)
    assert got == want
    assert got[1].get("truncated")
    budget = char_budget(chat_tok, MAX)
    assert spy.lengths and max(spy.lengths) <= budget
    called = [t for c in calls for t in ([c] if isinstance(c, str) else c or [])]
    assert all(len(t) <= budget for t in called)
    if case.endswith("segment by segment"):  # the segments go through __call__
        assert max(map(len, called)) > MAX
