"""pytest fixtures for tests that need quantized checkpoints (``pytest11`` entry point).

* ``fmtune_gptq_model`` - folder of a 4-bit GPTQ checkpoint of ``fmtune_tiny_model`` (and its
  tokenizer), quantized once per session with gptqmodel on CPU (~25 s on 2 cores);
* ``fmtune_mxfp4_model`` - folder of a tiny gpt-oss model whose expert weights are MXFP4.

Nothing heavy is imported until a fixture is used.
"""

from __future__ import annotations

import os

import pytest

# gptqmodel sizes its CPU worker pool from this when it is imported; on 2-core machines its
# default asks for more workers than the CPU pool has. Set before any test imports gptqmodel.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


@pytest.fixture(scope="session")
def fmtune_gptq_model(tmp_path_factory, fmtune_tiny_model):
    from fmtune.testing import DEMO_TEXTS

    from .testing import build_gptq_model

    return build_gptq_model(tmp_path_factory.mktemp("gptq-llama"), fmtune_tiny_model,
                            DEMO_TEXTS * 2)


@pytest.fixture(scope="session")
def fmtune_mxfp4_model(tmp_path_factory):
    from fmtune.testing import DEMO_TEXTS

    from .testing import build_mxfp4_model

    return build_mxfp4_model(tmp_path_factory.mktemp("mxfp4-gpt-oss"), DEMO_TEXTS)[0]
