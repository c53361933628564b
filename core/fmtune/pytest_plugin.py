"""pytest fixtures for plugin authors (registered through the ``pytest11`` entry point).

* ``fmtune_tiny_model`` - folder with a random-init tiny Llama and its BPE tokenizer
  (session-scoped, built once, no download);
* ``fmtune_run`` - :func:`fmtune.testing.run_cli`: ``fmtune_run(["train", ...], plugins=[obj])``.

The texts the tiny tokenizer is trained on are :data:`fmtune.testing.DEMO_TEXTS`.
"""

from __future__ import annotations

import pytest

from .testing import DEMO_TEXTS

__all__ = ["DEMO_TEXTS", "fmtune_run", "fmtune_tiny_model"]


@pytest.fixture(scope="session")
def fmtune_tiny_model(tmp_path_factory):
    from fmtune.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), DEMO_TEXTS)


@pytest.fixture
def fmtune_run():
    from fmtune.testing import run_cli

    return run_cli
