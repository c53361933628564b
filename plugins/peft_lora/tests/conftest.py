"""Fixtures for the PEFT plugin tests: tiny models built here, data, a recorder plugin."""

from __future__ import annotations

import pytest

from fmtune import hookimpl
from fmtune.testing import (DEMO_RECORDS, DEMO_TEXTS, RunRecorder, build_tiny_model, train,
                            train_argv, write_jsonl)

RECORDS = DEMO_RECORDS
NEW_TOKENS = ["<|tool|>", "<|result|>"]


@pytest.fixture(scope="session")
def tied_model(tmp_path_factory):
    """A tiny Llama whose lm_head is tied to its input embeddings."""
    return build_tiny_model(tmp_path_factory.mktemp("tied-llama"), DEMO_TEXTS,
                            tie_word_embeddings=True)


@pytest.fixture(scope="session")
def responsive_model(tmp_path_factory):
    """A tiny Llama initialized with std 0.2 instead of 0.02: its outputs depend on the context
    enough for prompt tuning (which only adds context) to move the loss in a few steps."""
    return build_tiny_model(tmp_path_factory.mktemp("responsive-llama"), DEMO_TEXTS,
                            initializer_range=0.2)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", RECORDS)


@pytest.fixture(scope="session")
def tool_data(tmp_path_factory):
    """Records that use two tokens the base tokenizer does not have."""
    recs = [{"input": f"{r['input']} <|tool|>", "output": f"<|result|> {r['output']}"}
            for r in RECORDS]
    return write_jsonl(tmp_path_factory.mktemp("tool-data") / "train.jsonl", recs)


class AddTokens:
    """In-test plugin: the run's tokenizer gets NEW_TOKENS (as a data plugin would add them)."""

    @hookimpl(wrapper=True)
    def load_tokenizer(self, config):
        tok = yield
        tok.add_special_tokens({"additional_special_tokens": NEW_TOKENS})
        return tok


@pytest.fixture(scope="session")
def peft_helpers():
    """``train_args``, ``train``, ``Recorder``, ``AddTokens`` for the test modules (importlib
    mode: test files cannot import this conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(train_args=train_argv, train=train, Recorder=RunRecorder,
                           AddTokens=AddTokens, RECORDS=RECORDS, NEW_TOKENS=NEW_TOKENS)
