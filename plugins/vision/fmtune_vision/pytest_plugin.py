"""pytest fixtures for tests that need a vision-language model (``pytest11`` entry point).

* ``fmtune_vision_model`` - folder of a tiny random-init LLaVA 1.5 and its processor, built
  once per session (:func:`fmtune_vision.testing.build_tiny_vlm`);
* ``fmtune_vision_data`` - a JSONL file of 8 "what colour is the shape?" conversations
  (``messages`` + ``images``) with their drawn PNG images.

Nothing heavy is imported until a fixture is used.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def fmtune_vision_model(tmp_path_factory):
    from .testing import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("vision") / "llava", "llava")


@pytest.fixture(scope="session")
def fmtune_vision_data(tmp_path_factory):
    from fmtune.testing import write_jsonl

    from .testing import shape_records

    folder = tmp_path_factory.mktemp("vision_data")
    return write_jsonl(folder / "train.jsonl", shape_records(folder / "img", 8))
