"""Shared fixtures of the evaluation plugin's tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny models here run much faster on one thread than on two when the CPUs are
    shared (two threads then wait on each other at every small op); restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
