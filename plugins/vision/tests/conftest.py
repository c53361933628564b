"""Tiny vision-language models (one per architecture) and drawn-shape data, built once per
session, locally."""

from __future__ import annotations

import pytest

from fmtune.testing import write_jsonl
from fmtune_vision.testing import ARCHITECTURES, build_tiny_vlm, shape_records


@pytest.fixture(scope="session")
def vlm(tmp_path_factory):
    """``vlm(arch)``: the folder of a tiny random-init model of ``arch`` and its processor."""
    built = {}

    def get(arch: str) -> str:
        if arch not in built:
            built[arch] = build_tiny_vlm(tmp_path_factory.mktemp(arch) / "model", arch)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A JSONL file of 8 "what colour is the shape?" conversations with their PNG images."""
    folder = tmp_path_factory.mktemp("shapes")
    return write_jsonl(folder / "train.jsonl", shape_records(folder / "img", 8))


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param
