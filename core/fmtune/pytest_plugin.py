"""pytest fixtures for plugin authors (registered through the ``pytest11`` entry point).

* ``fmtune_tiny_model`` - folder with a random-init tiny Llama and its BPE tokenizer
  (session-scoped, built once, no download);
* ``fmtune_run`` - :func:`fmtune.testing.run_cli`: ``fmtune_run(["train", ...], plugins=[obj])``.
"""

from __future__ import annotations

import pytest

DEMO_TEXTS = [
    "translate: the red cat sees a dog = le chat rouge voit un chien",
    "question: what is two plus two? answer: four",
    "The quick brown fox jumps over the lazy dog.",
    "<|user|> hello there <|assistant|> hi, how can I help?",
    "input output label yes no true false positive negative",
] * 4


@pytest.fixture(scope="session")
def fmtune_tiny_model(tmp_path_factory):
    from fmtune.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), DEMO_TEXTS)


@pytest.fixture
def fmtune_run():
    from fmtune.testing import run_cli

    return run_cli
