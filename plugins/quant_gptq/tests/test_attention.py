"""The attention options (core: use_flash_attn, flash_attn_implementation, attn_implementation):
what a model is loaded with, and the logged fallback when flash attention cannot run here.
(The gpt-oss fallback, eager because it has no sdpa, is checked in test_mxfp4.py.)"""

from __future__ import annotations

import contextlib
import importlib.util
import logging

import pytest
import torch

from fmtune.commands import load_config, validate
from fmtune.testing import run_cli

def placeholder_data(folder) -> str:
    """A one-record data file: validation checks the data path exists; these tests never read it."""
    from fmtune.testing import DEMO_RECORDS, write_jsonl

    return write_jsonl(folder / "x.jsonl", DEMO_RECORDS[:1])



@contextlib.contextmanager
def fmtune_log():
    """The fmtune logger's records (the CLI stops it from propagating to pytest's caplog)."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("fmtune")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def load(model_dir, tmp_path, *extra):
    config, pm, _, _ = load_config(["--model_name_or_path", model_dir, "--training_data_path",
                                    placeholder_data(tmp_path), "--output_dir", str(tmp_path), *extra])
    validate(config, pm)
    with fmtune_log() as records:
        model = pm.hook.load_model(config=config, tokenizer=pm.hook.load_tokenizer(config=config))
    return model, [r for r in records if "requested but" in r]


def unavailable(module: str, package: str) -> str | None:
    """Why a flash implementation cannot run on this machine (what the fallback must say)."""
    if importlib.util.find_spec(module) is None:
        return f"{package} is not installed"
    if not torch.cuda.is_available():
        return "no GPU is present"
    return None


@pytest.mark.parametrize("extra, wanted, module, package", [
    (["--use_flash_attn", "true"], "flash_attention_2", "flash_attn", "the flash-attn package"),
    (["--flash_attn_implementation", "flash_attention_3"], "flash_attention_3",
     "flash_attn_interface", "the flash-attn 3 package (flash_attn_interface)"),
    (["--use_flash_attn", "true", "--flash_attn_implementation",
      "kernels-community/vllm-flash-attn3"], "kernels-community/vllm-flash-attn3", "kernels",
     "the kernels package (hub kernels)"),
])
def test_flash_attention_falls_back_to_sdpa_and_says_why(extra, wanted, module, package,
                                                         fmtune_tiny_model, tmp_path):
    reason = unavailable(module, package)
    if reason is None:
        pytest.fail(f"{wanted} can run on this machine: this test expects a CPU machine")
    model, fallbacks = load(fmtune_tiny_model, tmp_path, *extra)
    assert fallbacks == [f"{wanted} requested but {reason}: using sdpa instead"]
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("extra, expected", [
    ([], "sdpa"),  # transformers' default for Llama
    (["--attn_implementation", "eager"], "eager"),
    (["--use_flash_attn", "true", "--flash_attn_implementation", "eager"], "eager"),
    (["--flash_attn_implementation", "sdpa"], "sdpa"),
])
def test_attention_choices_without_fallback(extra, expected, fmtune_tiny_model, tmp_path):
    model, fallbacks = load(fmtune_tiny_model, tmp_path, *extra)
    assert fallbacks == []
    assert model.config._attn_implementation == expected


def test_attention_option_errors(fmtune_tiny_model, tmp_path):
    def err(*extra):
        res = run_cli(["train", "--model_name_or_path", fmtune_tiny_model, "--training_data_path",
                       placeholder_data(tmp_path), "--output_dir", str(tmp_path / "o"), *extra])
        assert res.exit_code == 2 and not (tmp_path / "o").exists()
        return res.stderr.strip().removeprefix("fmtune: error: invalid config: ")

    assert err("--flash_attn_implementation", "fa2") == (
        "flash_attn_implementation must be flash_attention_2, flash_attention_3, sdpa, eager or "
        "a kernels hub repo (org/name); got 'fa2'")
    assert err("--use_flash_attn", "false", "--flash_attn_implementation", "sdpa") == (
        "flash_attn_implementation sdpa with use_flash_attn false: drop one of them")
    assert err("--use_flash_attn", "true", "--attn_implementation", "eager") == (
        "attn_implementation eager conflicts with use_flash_attn/flash_attn_implementation "
        "(flash_attention_2): set one of them")
