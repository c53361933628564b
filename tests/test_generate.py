"""`fmtune generate` on a full model folder and on a peft adapter folder."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from fmtune.testing import run_cli

PROMPT = "translate: the red cat"


def test_generate_full_model(fmtune_tiny_model):
    res = run_cli(["generate", "--model", fmtune_tiny_model, "--text", PROMPT,
                   "--max_new_tokens", "5"])
    assert res.exit_code == 0, res.stderr
    tok = AutoTokenizer.from_pretrained(fmtune_tiny_model)
    model = AutoModelForCausalLM.from_pretrained(fmtune_tiny_model).eval()
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    expected = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert res.stdout == expected + "\n"


def test_generate_adapter_folder(fmtune_tiny_model, tmp_path):
    tok = AutoTokenizer.from_pretrained(fmtune_tiny_model)
    base = AutoModelForCausalLM.from_pretrained(fmtune_tiny_model)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    peft_model.eval()
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = peft_model.generate(**enc, max_new_tokens=6, do_sample=False,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        with peft_model.disable_adapter():
            plain = peft_model.generate(**enc, max_new_tokens=6, do_sample=False,
                                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    expected = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert not torch.equal(out, plain)  # the adapter matters, so the test can tell
    res = run_cli(["generate", "--model", str(tmp_path / "adapter"), "--text", PROMPT,
                   "--max_new_tokens", "6"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout == expected + "\n"


def test_generate_errors(tmp_path):
    res = run_cli(["generate", "--model", str(tmp_path / "missing"), "--text", "x"])
    assert res.exit_code == 2 and "no such model folder" in res.stderr
    res = run_cli(["generate", "--model", str(tmp_path), "--text", "x"])
    assert res.exit_code == 2 and "neither a model folder" in res.stderr
