"""Tiny vision-language models (one per architecture) and drawn-shape data, built once per
session, locally."""

from __future__ import annotations

import pytest

from fmtune.testing import write_jsonl
from fmtune_vision.testing import ARCHITECTURES, shape_records, tiny_vlm_builder


@pytest.fixture(scope="session")
def vlm(tmp_path_factory):
    """``vlm(arch)``: the folder of a tiny random-init model of ``arch`` and its processor."""
    return tiny_vlm_builder(tmp_path_factory)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A JSONL file of 8 "what colour is the shape?" conversations with their PNG images."""
    folder = tmp_path_factory.mktemp("shapes")
    return write_jsonl(folder / "train.jsonl", shape_records(folder / "img", 8))


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param
