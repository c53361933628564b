"""MXFP4 (gpt-oss): a checkpoint whose expert weights the test packs into MXFP4, loaded
dequantized by the mxfp4 plugin, then trained with LoRA or in full."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer, Mxfp4Config

from fmtune.commands import load_config, validate
from fmtune.testing import DEMO_TEXTS, generate, run_cli
from fmtune_quant_gptq.testing import build_mxfp4_model, e2m1

PROMPT = "what is two plus two?"

def placeholder_data(folder) -> str:
    """A one-record data file: validation checks the data path exists; these tests never read it."""
    from fmtune.testing import DEMO_RECORDS, write_jsonl

    return write_jsonl(folder / "x.jsonl", DEMO_RECORDS[:1])



@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory):
    """``(folder, expected)``: the packed checkpoint and the values it must load as."""
    return build_mxfp4_model(tmp_path_factory.mktemp("mxfp4"), DEMO_TEXTS)


def load_base(path):
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32)


def loaded(path, tmp_path, *extra):
    config, pm, _, _ = load_config(["--model_name_or_path", path, "--training_data_path",
                                    placeholder_data(tmp_path), "--output_dir", str(tmp_path), "--plugins",
                                    "mxfp4", "--dequantize", "true", *extra])
    validate(config, pm)
    tok = pm.hook.load_tokenizer(config=config)
    return pm.hook.load_model(config=config, tokenizer=tok)


def test_e2m1_codes():
    """The 16 e2m1 values of the OCP MX spec, decoded from their bits."""
    assert e2m1(torch.arange(16)).tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                                               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def test_the_checkpoint_has_the_gpt_oss_mxfp4_layout(mxfp4):
    from safetensors.torch import load_file

    path, expected = mxfp4
    cfg = json.loads(open(os.path.join(path, "config.json")).read())
    assert cfg["model_type"] == "gpt_oss" and cfg["quantization_config"]["quant_method"] == "mxfp4"
    state = load_file(os.path.join(path, "model.safetensors"))
    blocks = state["model.layers.0.mlp.experts.gate_up_proj_blocks"]
    scales = state["model.layers.0.mlp.experts.gate_up_proj_scales"]
    # 4 experts, 2 x 64 outputs, 64 inputs = 2 blocks of 32 values = 2 x 16 bytes
    assert blocks.dtype == torch.uint8 and blocks.shape == (4, 128, 2, 16)
    assert scales.dtype == torch.uint8 and scales.shape == (4, 128, 2)
    assert "model.layers.0.mlp.experts.gate_up_proj" not in state
    assert set(expected) == {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                             for p in ("gate_up_proj", "down_proj")}
    values = expected["model.layers.0.mlp.experts.gate_up_proj"]
    assert values.shape == (4, 64, 128)
    assert (values == 0).any() and (values > 0).any() and (values < 0).any()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_reproduces_the_packed_values_exactly(mxfp4, tmp_path, dtype):
    path, expected = mxfp4
    model = loaded(path, tmp_path, "--torch_dtype", dtype)
    params = dict(model.named_parameters())
    for name, values in expected.items():
        assert params[name].dtype == getattr(torch, dtype)
        assert torch.equal(params[name].to(torch.float32), values), name
    # dequantized: a plain model, trainable like any other
    assert not model.is_quantized and getattr(model.config, "quantization_config", None) is None
    assert all(p.dtype == getattr(torch, dtype) for p in params.values())


@pytest.fixture(scope="module")
def lora_run(mxfp4, data, tmp_path_factory, helpers):
    path, _ = mxfp4
    out = tmp_path_factory.mktemp("mxfp4-lora") / "out"
    rec = helpers.train(helpers.train_args(
        path, data, out, "--plugins", "mxfp4,lora", "--quantization_method", "mxfp4",
        "--dequantize", "true", "--target_modules", "all-linear", "--max_steps", "8",
        "--use_flash_attn", "true"))
    return rec, out


def test_lora_on_the_dequantized_model(lora_run, mxfp4):
    rec, out = lora_run
    path, expected = mxfp4
    assert rec.losses[-1] < rec.losses[0] - 0.3, rec.losses
    layers = {n for n, m in rec.model.named_modules() if isinstance(m, LoraLayer)}
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    params = dict(rec.model.named_parameters())
    for name, values in expected.items():  # frozen experts: still exactly the packed values
        assert torch.equal(params[f"base_model.model.{name}"], values)
    # gpt-oss has no sdpa attention: the flash-attn fallback is eager, and it says so
    assert rec.model.config._attn_implementation == "eager"
    assert ("fmtune: flash_attention_2 requested but the flash-attn package is not installed "
            "(gpt_oss models have no sdpa attention): using eager instead"
            in rec.result.stderr.splitlines()) or torch.cuda.is_available()


def test_lora_adapter_reloads_over_the_mxfp4_checkpoint_and_generates(lora_run, mxfp4):
    rec, out = lora_run
    path, _ = mxfp4
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == os.path.abspath(path)
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(["translate: the red cat sees a dog =", "hello there"], return_tensors="pt",
              padding=True)
    rec.model.eval()
    reloaded = PeftModel.from_pretrained(load_base(path), out).eval()
    one = tok([PROMPT], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**enc).logits, rec.model(**enc).logits,
                                   rtol=0, atol=1e-5)
        gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False,
                   pad_token_id=tok.pad_token_id)
        trained_ids = rec.model.generate(**one, **gen)
        assert torch.equal(reloaded.generate(**one, **gen), trained_ids)
    assert trained_ids.shape[1] == one["input_ids"].shape[1] + 6
    res = run_cli(["generate", "--model", str(out), "--text", PROMPT, "--max_new_tokens", "6"])
    assert res.exit_code == 0, res.stderr[-2000:]
    assert res.stdout.splitlines()[-1] == generate(rec.model, tok, [PROMPT], max_new_tokens=6)[0]


def test_full_fine_tuning_of_the_dequantized_model(mxfp4, data, tmp_path, helpers):
    path, expected = mxfp4
    out = tmp_path / "out"
    rec = helpers.train(helpers.train_args(path, data, out, "--plugins", "mxfp4",
                                           "--dequantize", "true", "--max_steps", "6",
                                           "--learning_rate", "1e-3"))
    assert rec.losses[-1] < rec.losses[0] - 0.1, rec.losses
    params = dict(rec.model.named_parameters())
    assert all(p.requires_grad for p in params.values())
    assert not torch.equal(params["model.layers.0.mlp.experts.down_proj"],
                           expected["model.layers.0.mlp.experts.down_proj"])  # trained too
    # saved as a plain full-precision model: no MXFP4 left, loads without the plugin
    saved = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in saved
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    rec.model.eval()
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok([PROMPT], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, rec.model(**enc).logits, rtol=0, atol=1e-6)


def test_mxfp4_config_errors(mxfp4, fmtune_tiny_model, data, tmp_path, helpers):
    path, _ = mxfp4

    def err(model, *extra):
        res = run_cli(helpers.train_args(model, data, tmp_path / "o", *extra))
        assert res.exit_code == 2 and not (tmp_path / "o").exists(), res.stderr[-2000:]
        return res.stderr.strip().removeprefix("fmtune: error: invalid config: ")

    if not torch.cuda.is_available():
        assert err(path, "--plugins", "mxfp4") == (
            "dequantize false: the MXFP4 weights cannot be trained here: there is no GPU, and "
            "MXFP4 kernels need a CUDA GPU (compute capability >= 7.5) with triton and the "
            "kernels package, and transformers' MXFP4 layers have no backward pass; add "
            "--dequantize true to load them dequantized and train that")
    assert err(path, "--plugins", "mxfp4,qlora", "--dequantize", "true", "--target_modules",
               "q_proj") == (
        "--plugins mxfp4,qlora: mxfp4 cannot be combined with qlora: the MXFP4 checkpoint is "
        "loaded dequantized and qlora would quantize it again with bitsandbytes; use --plugins "
        "mxfp4,lora")
    lines = err(path, "--plugins", "mxfp4,gptq,lora", "--dequantize", "true", "--target_modules",
                "q_proj").splitlines()
    assert lines[0] == "fmtune: error: invalid config:" and sorted(lines[1:]) == [
        "  - --plugins mxfp4,gptq,lora: gptq cannot be combined with mxfp4: a checkpoint is "
        "either GPTQ- or MXFP4-quantized; name the plugin of its format",
        "  - --plugins mxfp4,gptq,lora: mxfp4 cannot be combined with gptq: a checkpoint is "
        "either MXFP4- or GPTQ-quantized; name the plugin of its format"]
    assert err(fmtune_tiny_model, "--plugins", "mxfp4", "--dequantize", "true") == (
        f"model_name_or_path: {fmtune_tiny_model} is not an MXFP4 checkpoint (its config.json "
        "has no quantization_config); the mxfp4 plugin loads gpt-oss-style MXFP4 checkpoints; "
        "load a full-precision model without it")
    assert err(path, "--plugins", "mxfp4", "--dequantize", "true", "--random_init_weights",
               "true") == (
        "random_init_weights with mxfp4: the MXFP4 checkpoint's weights are the base; a random "
        "model has no MXFP4 weights")
    res = run_cli(helpers.train_args(path, data, tmp_path / "o", "--quantization_method",
                                     "mxfp4"))
    # fms-hf-tuning's flag activates the plugin, whose own check then speaks
    assert res.exit_code == 2, res.stderr
    assert "--quantization_method mxfp4 activates plugin 'mxfp4'" in res.stderr
    assert "add --dequantize true" in res.stderr
