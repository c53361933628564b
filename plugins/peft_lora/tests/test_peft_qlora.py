"""QLoRA: LoRA on a base loaded 4-bit/8-bit by bitsandbytes (which runs on CPU since 0.48)."""

from __future__ import annotations

import json
import math
import os

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from fmtune_peft_lora.quant import keep_generic_cpu_path
from fmtune.testing import load_for_inference, run_cli, wrapped_model

LINEARS = {"down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"}


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def load_4bit(path):
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu")
    keep_generic_cpu_path(model)  # hidden size 32: too narrow for the avx512_bf16 packed path
    return model


@pytest.fixture(scope="module")
def qlora_run(fmtune_tiny_model, data, tmp_path_factory, peft_helpers):
    out = tmp_path_factory.mktemp("qlora") / "out"
    rec = peft_helpers.train(peft_helpers.train_args(
        fmtune_tiny_model, data, out, "--plugins", "qlora", "--target_modules", "all-linear",
        "--max_steps", "8"))
    return rec, out


def test_qlora_trains_lora_on_4bit_layers(qlora_run, fmtune_tiny_model):
    rec, out = qlora_run
    assert rec.losses[-1] < rec.losses[0] - 0.5
    layers = lora_layers(rec.model)
    assert {n.rsplit(".", 1)[-1] for n in layers} == LINEARS and len(layers) == 14
    fresh = dict(load_4bit(fmtune_tiny_model).named_modules())
    for name, layer in layers.items():
        base = layer.get_base_layer()
        assert type(base) is bnb.nn.Linear4bit, name
        state = base.weight.quant_state
        assert state.quant_type == "nf4" and state.nested  # nf4, double quantization
        assert base.compute_dtype == torch.float32
        # the packed 4-bit weights did not move: they equal a fresh quantized load's
        key = name.removeprefix("base_model.model.")
        assert base.weight.dtype == torch.uint8 and torch.equal(base.weight, fresh[key].weight)
        assert layer.lora_B["default"].weight.abs().sum() > 0  # zero-initialized: it trained
    trainable = {n for n, p in rec.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert type(rec.model.base_model.model.lm_head) is torch.nn.Linear  # not quantized


def test_qlora_adapter_loads_with_peft(qlora_run, fmtune_tiny_model):
    rec, out = qlora_run
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(["translate: the red cat sees a dog =", "hello there"], return_tensors="pt",
              padding=True)
    rec.model.eval()
    with torch.no_grad():
        trained = rec.model(**enc).logits
        # on the same 4-bit base, the saved adapter is the trained model
        on_4bit = PeftModel.from_pretrained(load_4bit(fmtune_tiny_model), out).eval()
        torch.testing.assert_close(on_4bit(**enc).logits, trained, rtol=0, atol=1e-5)
    # and it loads on the full-precision base (fmtune generate / evaluate, merge)
    model, _ = load_for_inference(str(out))
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer) is \
        torch.nn.Linear
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == os.path.abspath(fmtune_tiny_model)


@pytest.mark.parametrize("extra, layer_type, quant_type", [
    (["--bnb_4bit_quant_type", "fp4", "--bnb_4bit_use_double_quant", "false"], bnb.nn.Linear4bit,
     "fp4"),
    (["--load_in_8bit", "true"], bnb.nn.Linear8bitLt, None),
])
def test_quantization_options(extra, layer_type, quant_type, fmtune_tiny_model, tmp_path):
    model = wrapped_model(fmtune_tiny_model, tmp_path, "--plugins", "qlora", *extra)
    layers = lora_layers(model)
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"q_proj", "v_proj"}  # peft's llama default
    for layer in layers.values():
        base = layer.get_base_layer()
        assert type(base) is layer_type
        if quant_type:
            assert base.weight.quant_state.quant_type == quant_type
            assert not base.weight.quant_state.nested
        else:
            assert base.weight.dtype == torch.int8


def test_alora_on_a_4bit_base(fmtune_tiny_model, tmp_path):
    model = wrapped_model(fmtune_tiny_model, tmp_path, "--plugins", "alora,qlora",
                    "--alora_invocation_string", " answer:", "--r", "4")
    assert model.peft_config["default"].alora_invocation_tokens
    assert model.peft_config["default"].r == 4
    assert all(type(m.get_base_layer()) is bnb.nn.Linear4bit for m in lora_layers(model).values())


def test_qlora_random_init_saves_the_base_it_trained_on(fmtune_tiny_model, data, tmp_path,
                                                        peft_helpers):
    out = tmp_path / "out"
    rec = peft_helpers.train(peft_helpers.train_args(
        fmtune_tiny_model, data, out, "--plugins", "qlora", "--random_init_weights", "true",
        "--max_steps", "2"))
    base_dir = out / "base_model"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base_dir)
    saved_base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert type(saved_base.model.layers[0].mlp.up_proj) is torch.nn.Linear  # full precision
    # the adapter on that base (quantized again) is the trained model
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(["hello there"], return_tensors="pt")
    rec.model.eval()
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(load_4bit(base_dir), out).eval()
        torch.testing.assert_close(loaded(**enc).logits, rec.model(**enc).logits, rtol=0, atol=1e-5)


def test_qlora_config_errors(fmtune_tiny_model, data, tmp_path, peft_helpers):
    def err(*extra):
        res = run_cli(peft_helpers.train_args(fmtune_tiny_model, data, tmp_path / "o", *extra))
        assert res.exit_code == 2 and not (tmp_path / "o").exists()
        return res.stderr.strip()

    assert err("--plugins", "qlora", "--init_lora_weights", "pissa") == (
        "fmtune: error: invalid config: init_lora_weights pissa rewrites the base weights, which "
        "a 4/8-bit base cannot take: use it without qlora")
    assert err("--plugins", "qlora", "--load_in_8bit", "true", "--bnb_4bit_quant_type", "fp4") == (
        "fmtune: error: invalid config: load_in_8bit is set, so bnb_4bit_quant_type (4-bit "
        "options) would be ignored: remove them")
    assert err("--plugins", "qlora", "--peft_method", "none") == (
        "fmtune: error: invalid config: peft_method none with qlora: a 4/8-bit base cannot be "
        "trained in full")


# ------------------------------------ bitsandbytes' avx512_bf16 CPU path, forced either way


@pytest.fixture(scope="module")
def narrow_model(tmp_path_factory):
    """Hidden size 32: every linear layer is narrower than bitsandbytes' block of 64."""
    from fmtune.testing import DEMO_TEXTS, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("narrow"), DEMO_TEXTS, hidden_size=32,
                            intermediate_size=32, num_attention_heads=2, num_key_value_heads=2)


@pytest.mark.parametrize("avx512bf16", [True, False], ids=["avx512bf16-cpu", "other-cpu"])
def test_eval_forward_on_either_cpu_kind(narrow_model, avx512bf16):
    """bitsandbytes picks its CPU path per layer from the processor
    (``support_avx512bf16_for_cpu``); both values are forced here so that both run on any
    machine. The plugin's loader keeps too-narrow layers (hidden size 32 < block 64) on the
    generic path: eval-mode logits are then the same on both kinds of CPU."""
    logits = {}
    for guarded in (False, True):
        model = AutoModelForCausalLM.from_pretrained(
            narrow_model, device_map="cpu", quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32)).eval()
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers
        for layer in layers:
            layer.support_avx512bf16_for_cpu = avx512bf16
        if guarded:
            switched = keep_generic_cpu_path(model)
            assert switched == (len(layers) if avx512bf16 else 0)
        ids = torch.tensor([[1, 5, 9, 13]])
        with torch.no_grad():
            if avx512bf16 and not guarded:  # the crash the guard exists for
                with pytest.raises(RuntimeError, match="invalid for input of size"):
                    model(input_ids=ids)
                continue
            logits[guarded] = model(input_ids=ids).logits
    assert torch.isfinite(logits[True]).all()
    if not avx512bf16:
        assert torch.equal(logits[True], logits[False])


def test_qlora_evaluates_during_training_on_an_avx512bf16_cpu(narrow_model, data, tmp_path,
                                                              peft_helpers, monkeypatch):
    """Evaluation in eval mode without grad is where the packed path starts: a QLoRA run with a
    validation set evaluates through the plugin's loader whatever the processor says."""
    monkeypatch.setattr(bnb.nn.Linear4bit, "__init__", _forcing_avx512bf16(
        bnb.nn.Linear4bit.__init__))
    rec = peft_helpers.train(peft_helpers.train_args(
        narrow_model, data, tmp_path / "out", "--plugins", "qlora", "--max_steps", "2",
        "--validation_data_path", data, "--eval_strategy", "steps", "--eval_steps", "1"))
    assert rec.result.exit_code == 0
    lines = (tmp_path / "out" / "training_logs.jsonl").read_text().splitlines()
    evals = [r["data"]["value"] for r in map(json.loads, lines) if r["name"] == "validation_loss"]
    assert len(evals) == 2 and all(map(math.isfinite, evals)), lines


def _forcing_avx512bf16(init):
    def forced(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.support_avx512bf16_for_cpu = True
    return forced
