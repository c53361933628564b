"""Activated LoRA: the adapter acts only from the invocation tokens on."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from fmtune.testing import generate, run_cli, write_jsonl

INVOCATION = " answer:"  # byte-level BPE: " answer" and ":" tokenize the same inside any text


@pytest.fixture(scope="module")
def alora_data(tmp_path_factory, peft_helpers):
    recs = [{"input": f"{r['input']}{INVOCATION}", "output": r["output"]}
            for r in peft_helpers.RECORDS]
    return write_jsonl(tmp_path_factory.mktemp("alora-data") / "train.jsonl", recs)


@pytest.fixture(scope="module")
def alora_run(fmtune_tiny_model, alora_data, tmp_path_factory, peft_helpers):
    out = tmp_path_factory.mktemp("alora") / "out"
    rec = peft_helpers.train(peft_helpers.train_args(
        fmtune_tiny_model, alora_data, out, "--plugins", "alora", "--alora_invocation_string",
        INVOCATION, "--target_modules", "q_proj,k_proj,v_proj,o_proj", "--max_steps", "8"))
    return rec, out


def test_alora_trains_and_saves_its_invocation_tokens(alora_run, fmtune_tiny_model):
    rec, out = alora_run
    assert rec.losses[-1] < rec.losses[0] - 0.5
    tok = AutoTokenizer.from_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["alora_invocation_tokens"] == tok.encode(INVOCATION, add_special_tokens=False)
    assert cfg["peft_type"] == "LORA" and len(cfg["alora_invocation_tokens"]) == 2


def test_before_the_invocation_the_model_is_the_base_model(alora_run, fmtune_tiny_model):
    _, out = alora_run
    tok = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(fmtune_tiny_model).eval()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(fmtune_tiny_model),
                                      out).eval()
    text = f"translate: the red cat sees a dog{INVOCATION} le chat rouge"
    ids = tok(text, return_tensors="pt")["input_ids"]
    inv = tok.encode(INVOCATION, add_special_tokens=False)
    start = next(i for i in range(ids.shape[1]) if ids[0, i:i + len(inv)].tolist() == inv)
    assert 5 < start < ids.shape[1] - 4
    with torch.no_grad():
        adapted, plain = model(input_ids=ids).logits, base(input_ids=ids).logits
    # positions before the invocation: exactly the base model's logits (the adapter is not
    # applied there, and causal attention keeps later positions out)
    assert torch.equal(adapted[0, :start], plain[0, :start])
    # from the invocation on, the trained adapter changes every position
    diff = (adapted[0, start:] - plain[0, start:]).abs().amax(dim=-1)
    assert bool((diff > 1e-3).all()), diff


def test_generate_on_the_alora_adapter(alora_run):
    rec, out = alora_run
    prompt = f"hello there{INVOCATION}"
    res = run_cli(["generate", "--model", str(out), "--text", prompt, "--max_new_tokens", "5"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout.splitlines() == generate(rec.model, AutoTokenizer.from_pretrained(out),
                                               [prompt], 5)


def test_examples_without_the_invocation_are_listed(fmtune_tiny_model, tmp_path, peft_helpers):
    recs = [{"input": f"{r['input']}{INVOCATION if i not in (2, 5) else ''}",
             "output": r["output"]} for i, r in enumerate(peft_helpers.RECORDS)]
    bad = write_jsonl(tmp_path / "bad.jsonl", recs)
    out = tmp_path / "o"
    res = run_cli(peft_helpers.train_args(fmtune_tiny_model, bad, out, "--plugins", "alora",
                                          "--alora_invocation_string", INVOCATION))
    assert res.exit_code == 2
    ids = AutoTokenizer.from_pretrained(fmtune_tiny_model).encode(INVOCATION,
                                                                  add_special_tokens=False)
    assert res.stderr.strip().splitlines()[-1] == (
        f"fmtune: error: alora: 2 of 8 training examples lack the invocation tokens of "
        f"' answer:' (ids {ids}): examples 3, 6 (1-based, after data processing and truncation "
        "to max_seq_length). Tokenizers can merge the invocation string with the text around "
        "it: start it with a special token or a newline.")
    assert "Loading weights" not in res.stderr and not out.exists()  # before the model loads


def test_alora_adapters_are_not_merged_or_exported_for_vllm(alora_run, tmp_path):
    _, out = alora_run
    res = run_cli(["merge", str(out), str(tmp_path / "m")])
    assert res.exit_code == 2
    assert res.stderr.strip() == (f"fmtune: error: {out}: an aLoRA adapter acts only after its "
                                  "invocation tokens; merged into the weights it would act on "
                                  "every token")
    res = run_cli(["export-vllm", str(out), str(tmp_path / "v")])
    assert res.exit_code == 2
    assert res.stderr.strip() == (
        f"fmtune: error: {out}: vLLM cannot serve this adapter: aLoRA: vLLM's LoRA path applies "
        "an adapter to every token, but this one is valid only after its invocation tokens, so "
        "outputs would change; serve it with peft (fmtune generate) or an "
        "activated-LoRA-capable server")
    assert not (tmp_path / "m").exists() and not (tmp_path / "v").exists()


def test_alora_config_errors(fmtune_tiny_model, alora_data, tmp_path, peft_helpers):
    def err(*extra):
        res = run_cli(peft_helpers.train_args(fmtune_tiny_model, alora_data, tmp_path / "o",
                                              *extra))
        assert res.exit_code == 2
        return res.stderr.strip()

    assert err("--plugins", "alora") == (
        "fmtune: error: invalid config: alora_invocation_string is required with alora (the "
        "text that switches the adapter on; every training example must contain it)")
    assert err("--plugins", "lora", "--peft_method", "alora") == (
        "fmtune: error: invalid config: peft_method alora needs --plugins alora (it owns "
        "alora_invocation_string)")
    assert "use_dora: peft's aLoRA does not support DoRA" in err(
        "--plugins", "alora", "--alora_invocation_string", INVOCATION, "--use_dora", "true")
