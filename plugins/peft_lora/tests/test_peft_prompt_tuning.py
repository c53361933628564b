"""Prompt tuning: trained virtual tokens; nothing else changes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fmtune.commands import load_config, validate
from fmtune.testing import generate, run_cli

INIT_TEXT = "translate: the"

def placeholder_data(folder) -> str:
    """A one-record data file: validation checks the data path exists; these tests never read it."""
    from fmtune.testing import DEMO_RECORDS, write_jsonl

    return write_jsonl(folder / "x.jsonl", DEMO_RECORDS[:1])



@pytest.fixture(scope="module")
def pt_run(responsive_model, data, tmp_path_factory, peft_helpers):
    out = tmp_path_factory.mktemp("pt") / "out"
    rec = peft_helpers.train(peft_helpers.train_args(
        responsive_model, data, out, "--plugins", "prompt_tuning", "--num_virtual_tokens", "6",
        "--prompt_tuning_init", "TEXT", "--prompt_tuning_init_text", INIT_TEXT,
        "--learning_rate", "0.1", "--max_steps", "12"))
    return rec, out


def test_text_init_copies_the_text_token_embeddings(fmtune_tiny_model, tmp_path):
    config, pm, _, _ = load_config([
        "--model_name_or_path", fmtune_tiny_model, "--training_data_path", placeholder_data(tmp_path),
        "--output_dir", str(tmp_path), "--plugins", "prompt_tuning", "--num_virtual_tokens", "6",
        "--prompt_tuning_init", "TEXT", "--prompt_tuning_init_text", INIT_TEXT])
    validate(config, pm)
    tok = pm.hook.load_tokenizer(config=config)
    model = pm.hook.load_model(config=config, tokenizer=tok)
    words = model.get_input_embeddings().weight.detach().clone()
    peft_model = pm.hook.wrap_peft(model=model, config=config, tokenizer=tok)
    ids = tok(INIT_TEXT)["input_ids"]
    assert 1 < len(ids) < 6
    expected = words[(ids * 6)[:6]]  # the text's tokens, repeated to 6 virtual tokens
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight, expected)
    assert [n for n, p in peft_model.named_parameters() if p.requires_grad] == \
        ["prompt_encoder.default.embedding.weight"]


def test_prompt_tuning_trains_only_the_virtual_tokens(pt_run, responsive_model):
    rec, out = pt_run
    # 8 records, batch 4: steps 1-2 and 11-12 each see every record once
    assert len(rec.losses) == 12 and sum(rec.losses[-2:]) / 2 < sum(rec.losses[:2]) / 2 - 1.0
    base = AutoModelForCausalLM.from_pretrained(responsive_model).state_dict()
    inner = rec.model.base_model.state_dict()
    assert inner.keys() == base.keys() and all(torch.equal(inner[k], base[k]) for k in base)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 6
    assert cfg["tokenizer_name_or_path"] == os.path.abspath(out)  # not a deleted temp folder
    saved = load_file(out / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape == (6, 64)
    assert torch.equal(saved["prompt_embeddings"],
                       rec.model.prompt_encoder["default"].embedding.weight)


def test_saved_prompt_adapter_loads_and_generates(pt_run, responsive_model):
    rec, out = pt_run
    tok = AutoTokenizer.from_pretrained(out)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(responsive_model),
                                       out).eval()
    enc = tok(["hello there"], return_tensors="pt")
    rec.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc).logits, rec.model(**enc).logits, rtol=0, atol=1e-6)
    res = run_cli(["generate", "--model", str(out), "--text", "hello there", "--max_new_tokens", "5",
                   "--jsonl"])
    assert res.exit_code == 0, res.stderr
    # --jsonl: one escaped record per line, whatever characters the random model generates
    assert [json.loads(line)["output"] for line in res.stdout.split("\n")[:-1]] == \
        generate(rec.model, tok, ["hello there"], 5)


def test_prompt_adapters_are_not_merged_or_exported_for_vllm(pt_run, tmp_path):
    _, out = pt_run
    res = run_cli(["merge", str(out), str(tmp_path / "m")])
    assert res.exit_code == 2
    assert res.stderr.strip() == (f"fmtune: error: {out}: a PROMPT_TUNING adapter has no weights "
                                  "to merge (prompt tuning prepends trained virtual tokens); "
                                  "serve it with peft")
    res = run_cli(["export-vllm", str(out), str(tmp_path / "v")])
    assert res.exit_code == 2
    assert res.stderr.strip() == (
        f"fmtune: error: {out}: vLLM cannot serve this adapter: vLLM serves LoRA adapters only, "
        "this is a prompt tuning adapter (serve it with peft: fmtune generate, or "
        "AutoPeftModelForCausalLM)")


def test_prompt_tuning_config_errors(fmtune_tiny_model, data, tmp_path, peft_helpers):
    def err(*extra):
        res = run_cli(peft_helpers.train_args(fmtune_tiny_model, data, tmp_path / "o", *extra))
        assert res.exit_code == 2 and not (tmp_path / "o").exists()
        return res.stderr.strip()

    assert err("--plugins", "prompt_tuning", "--prompt_tuning_init", "TEXT") == \
        "fmtune: error: invalid config: prompt_tuning_init TEXT needs prompt_tuning_init_text"
    assert err("--plugins", "prompt_tuning", "--prompt_tuning_init_text", "hi") == (
        "fmtune: error: invalid config: prompt_tuning_init_text is set but prompt_tuning_init is "
        "RANDOM: set prompt_tuning_init TEXT to use it")
    assert err("--plugins", "lora,prompt_tuning") == (
        "fmtune: error: invalid config: --plugins lora,prompt_tuning: prompt_tuning cannot be "
        "combined with lora; use one PEFT method per run")
