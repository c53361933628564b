"""GPTQ-LoRA: LoRA (the lora plugin) on a checkpoint really quantized by gptqmodel (on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from gptqmodel.nn_modules.qlinear import BaseQuantLinear
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.gptq import GPTQLoraLinear
from transformers import AutoModelForCausalLM, AutoTokenizer

from fmtune.testing import generate, run_cli, wrapped_model

LINEARS = {"down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"}
PROMPT = "what is two plus two?"


def load_gptq(path):
    """The GPTQ checkpoint as any transformers user loads it (gptqmodel picks the kernel)."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu")


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.fixture(scope="module")
def gptq_run(fmtune_gptq_model, data, tmp_path_factory, helpers):
    out = tmp_path_factory.mktemp("gptq") / "out"
    rec = helpers.train(helpers.train_args(
        fmtune_gptq_model, data, out, "--plugins", "gptq,lora", "--target_modules", "all-linear",
        "--max_steps", "8"))
    return rec, out


def test_the_fixture_is_a_real_gptq_checkpoint(fmtune_gptq_model):
    cfg = json.loads(open(os.path.join(fmtune_gptq_model, "config.json")).read())
    quant = cfg["quantization_config"]
    assert (quant["quant_method"], quant["bits"], quant["group_size"]) == ("gptq", 4, 32)
    model = load_gptq(fmtune_gptq_model)
    packed = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
              if isinstance(m, BaseQuantLinear)}
    assert packed == LINEARS
    q = model.model.layers[0].self_attn.q_proj
    assert q.qweight.dtype == torch.int32 and q.qweight.shape == (64 * 4 // 32, 64)  # 8 per int32
    assert type(model.lm_head) is torch.nn.Linear  # lm_head stays full precision


def test_gptq_lora_trains_over_frozen_gptq_layers(gptq_run, fmtune_gptq_model):
    rec, out = gptq_run
    assert rec.losses[-1] < rec.losses[0] - 0.3, rec.losses
    layers = lora_layers(rec.model)
    assert {n.rsplit(".", 1)[-1] for n in layers} == LINEARS and len(layers) == 14
    fresh = dict(load_gptq(fmtune_gptq_model).named_modules())
    for name, layer in layers.items():
        assert type(layer) is GPTQLoraLinear, name  # peft's LoRA layer for GPTQ bases
        base = layer.get_base_layer()
        assert isinstance(base, BaseQuantLinear), name
        # the packed 4-bit weights and their scales did not move: equal to a fresh load's
        key = name.removeprefix("base_model.model.")
        assert torch.equal(base.qweight, fresh[key].qweight), name
        assert torch.equal(base.scales, fresh[key].scales), name
        assert layer.lora_B["default"].weight.abs().sum() > 0  # zero-initialized: it trained
    trainable = {n for n, p in rec.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert "gptq" in rec.result.stderr and "14 GPTQ layers (4-bit, group size 32)" in \
        rec.result.stderr


def test_adapter_reloads_over_the_gptq_base_and_generates(gptq_run, fmtune_gptq_model):
    rec, out = gptq_run
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == os.path.abspath(fmtune_gptq_model)
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(["translate: the red cat sees a dog =", "hello there"], return_tensors="pt",
              padding=True)
    rec.model.eval()
    reloaded = PeftModel.from_pretrained(load_gptq(fmtune_gptq_model), out)
    # gptqmodel 7.6's CPU kernel (TorchAtenLinear) fixes its matmul path at a layer's first
    # forward: after a training-mode forward it keeps it, while a first no-grad forward picks
    # another path whose logits differ by ~3e-3. The trained model's first forward was in
    # training, so the reloaded one starts the same way before the exact comparison.
    reloaded.train()
    reloaded(**enc)
    reloaded.eval()
    assert isinstance(reloaded.base_model.model.model.layers[1].mlp.down_proj.base_layer,
                      BaseQuantLinear)
    one = tok([PROMPT], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**enc).logits, rec.model(**enc).logits,
                                   rtol=0, atol=1e-5)
        gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False,
                   pad_token_id=tok.pad_token_id)
        trained_ids = rec.model.generate(**one, **gen)
        reloaded_ids = reloaded.generate(**one, **gen)
    assert trained_ids.shape[1] == one["input_ids"].shape[1] + 6
    assert torch.equal(reloaded_ids, trained_ids)
    # `fmtune generate` loads the adapter folder (and the GPTQ base it names) by itself
    res = run_cli(["generate", "--model", str(out), "--text", PROMPT, "--max_new_tokens", "6"])
    assert res.exit_code == 0, res.stderr[-2000:]
    expected = generate(rec.model, tok, [PROMPT], max_new_tokens=6)[0]
    assert res.stdout == expected + "\n"  # only the text: gptqmodel's banner goes to stderr


def test_fms_hf_tuning_flags_are_mapped(fmtune_gptq_model, data, tmp_path, helpers):
    """--auto_gptq triton_v2 --torch_dtype float16, as an fms-hf-tuning GPTQ-LoRA command."""
    rec = helpers.train(helpers.train_args(
        fmtune_gptq_model, data, tmp_path / "out", "--plugins", "gptq,lora",
        "--auto_gptq", "triton_v2", "--torch_dtype", "float16", "--max_steps", "2"))
    if torch.cuda.is_available():
        assert "fmtune: auto_gptq triton_v2: gptq_backend gptq_triton" in rec.result.stderr
    else:  # the triton kernel needs a GPU: the fallback is said, never silent
        assert ("fmtune: auto_gptq triton_v2 asks for gptqmodel's triton kernel, which needs a "
                "CUDA GPU, but no GPU is present: using gptq_backend auto_trainable instead"
                ) in rec.result.stderr.splitlines()
    model = rec.model.base_model.model
    assert model.model.embed_tokens.weight.dtype == torch.float16
    assert model.model.layers[0].self_attn.q_proj.base_layer.scales.dtype == torch.float16
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    assert len(rec.losses) == 2


def test_alora_on_a_gptq_base(fmtune_gptq_model, tmp_path):
    model = wrapped_model(fmtune_gptq_model, tmp_path, "--plugins", "gptq,alora",
                    "--alora_invocation_string", " answer:", "--target_modules", "q_proj,v_proj")
    assert model.peft_config["default"].alora_invocation_tokens
    layers = lora_layers(model)
    assert len(layers) == 4
    assert all(isinstance(m.get_base_layer(), BaseQuantLinear) for m in layers.values())


def test_gptq_config_errors(fmtune_gptq_model, fmtune_tiny_model, data, tmp_path, helpers):
    def err(model, *extra):
        res = run_cli(helpers.train_args(model, data, tmp_path / "o", *extra))
        assert res.exit_code == 2 and not (tmp_path / "o").exists(), res.stderr[-2000:]
        return res.stderr.strip().removeprefix("fmtune: error: invalid config: ")

    assert err(fmtune_tiny_model, "--plugins", "gptq,lora") == (
        f"model_name_or_path: {fmtune_tiny_model} is not a GPTQ checkpoint (its config.json has "
        "no quantization_config); quantize it with gptqmodel first (see the fmtune-quant-gptq "
        "README), or train it with --plugins qlora (bitsandbytes quantizes on load)")
    assert err(fmtune_gptq_model, "--plugins", "gptq") == (
        "--plugins gptq: gptq trains LoRA adapters over the frozen GPTQ layers (a GPTQ base "
        "cannot be trained in full); add --plugins gptq,lora")
    assert err(fmtune_gptq_model, "--plugins", "gptq,lora", "--peft_method", "none") == (
        "peft_method none with gptq: gptq trains LoRA adapters over the frozen GPTQ layers (a "
        "GPTQ base cannot be trained in full)")
    assert err(fmtune_gptq_model, "--plugins", "gptq,qlora") == (
        "--plugins gptq,qlora: gptq cannot be combined with qlora: the checkpoint is already "
        "GPTQ-quantized and qlora would quantize the base again with bitsandbytes; use "
        "--plugins gptq,lora")
    assert err(fmtune_gptq_model, "--plugins", "gptq,prompt_tuning") == (
        "--plugins gptq,prompt_tuning: gptq cannot be combined with prompt_tuning: prompt tuning "
        "on a GPTQ base is not supported by fmtune; train LoRA (--plugins gptq,lora)")
    assert err(fmtune_gptq_model, "--plugins", "gptq,lora", "--auto_gptq", "exllama") == (
        "auto_gptq: fms-hf-tuning supports only the triton_v2 kernel, got 'exllama'; fmtune's "
        "equivalent is --gptq_backend (auto_trainable, auto, gptq_torch, gptq_torch_aten, "
        "gptq_triton, gptq_exllama_v2, gptq_marlin, gptq_machete, gptq_bitblas, "
        "gptq_torch_fused)")
    assert err(fmtune_gptq_model, "--plugins", "gptq,lora", "--auto_gptq", "triton_v2,false") == (
        "auto_gptq from_quantized false: quantizing while loading is not supported (as in "
        "fms-hf-tuning); quantize the model with gptqmodel first and pass the quantized "
        "checkpoint (see the fmtune-quant-gptq README)")
    assert err(fmtune_gptq_model, "--plugins", "gptq,lora", "--random_init_weights", "true") == (
        "random_init_weights with gptq: the GPTQ checkpoint's weights are the base; a random "
        "model is not GPTQ-quantized")
    if not torch.cuda.is_available():
        assert err(fmtune_gptq_model, "--plugins", "gptq,lora", "--gptq_backend",
                   "gptq_triton") == (
            "gptq_backend gptq_triton needs a CUDA GPU but no GPU is present; on CPU use "
            "auto_trainable, gptq_torch or gptq_torch_aten")
    # fms-hf-tuning's flag implies the plugin: --auto_gptq activates gptq (logged) and trains
    res = run_cli(helpers.train_args(fmtune_gptq_model, data, tmp_path / "o", "--plugins", "lora",
                                     "--auto_gptq", "triton_v2"))
    assert res.exit_code == 0, res.stderr[-2000:]
    assert "--auto_gptq activates plugin 'gptq' (fmtune-quant-gptq " in res.stderr
    assert "gptq" in json.loads((tmp_path / "o" / "run_summary.json").read_text())["plugins"]


BLOCK_GPTQMODEL = """
import sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "gptqmodel":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NotInstalled())  # as if gptqmodel were not installed
from fmtune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_gptqmodel_not_installed_says_the_pip_command(fmtune_gptq_model, data, tmp_path, helpers):
    args = helpers.train_args(fmtune_gptq_model, data, tmp_path / "o", "--plugins", "gptq,lora")
    res = subprocess.run([sys.executable, "-c", BLOCK_GPTQMODEL, *args], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        "fmtune: error: invalid config: gptq needs gptqmodel, not installed: pip install "
        "'gptqmodel==7.6.0' (tested with torch 2.14.1), or pip install fmtune-quant-gptq")
    assert not (tmp_path / "o").exists()
