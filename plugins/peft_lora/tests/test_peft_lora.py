"""LoRA end to end: what trains, what is saved, loading back with peft, merge, resume, continue."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fmtune import hookimpl
from fmtune.testing import generate, run_cli

TEXTS = ["translate: the red cat sees a dog =", "hello there"]
LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def logits(model, tok, texts=TEXTS):
    model.eval()
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def base_key(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


@pytest.fixture(scope="module")
def lora_run(fmtune_tiny_model, data, tmp_path_factory, peft_helpers):
    out = tmp_path_factory.mktemp("lora") / "out"
    rec = peft_helpers.train(peft_helpers.train_args(
        fmtune_tiny_model, data, out, "--plugins", "lora", "--target_modules", "all-linear",
        "--r", "8", "--max_steps", "8"))
    return rec, out


def test_only_adapter_parameters_train_and_loss_falls(lora_run, fmtune_tiny_model):
    rec, out = lora_run
    base = AutoModelForCausalLM.from_pretrained(fmtune_tiny_model).state_dict()
    trainable = {n for n, p in rec.model.named_parameters() if p.requires_grad}
    expected = {f"base_model.model.model.layers.{i}.{blk}.{m}.lora_{ab}.default.weight"
                for i in range(2) for m in LINEARS for ab in "AB"
                for blk in (("self_attn",) if m[0] in "qkvo" else ("mlp",))}
    assert trainable == expected
    for name, p in rec.model.named_parameters():
        if name in trainable:
            if ".lora_B." in name:  # initialized to zero: it moved
                assert p.abs().sum() > 0, name
        else:
            assert torch.equal(p, base[base_key(name)]), name
    assert len(rec.losses) == 8 and rec.losses[-1] < rec.losses[0] - 0.5


def test_layers_adapted_are_the_targets_and_not_lm_head(lora_run):
    rec, _ = lora_run
    adapted = {n.rsplit(".", 1)[-1] for n, m in rec.model.named_modules() if isinstance(m, LoraLinear)}
    assert adapted == set(LINEARS)
    assert type(rec.model.base_model.model.lm_head) is torch.nn.Linear  # all-linear skips lm_head


def test_saved_adapter_loads_with_peft_and_gives_the_trained_logits(lora_run, fmtune_tiny_model):
    rec, out = lora_run
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(out))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 32
    assert sorted(cfg["target_modules"]) == LINEARS
    assert cfg["base_model_name_or_path"] == os.path.abspath(fmtune_tiny_model)
    saved = load_file(out / "adapter_model.safetensors")
    assert len(saved) == 2 * 2 * len(LINEARS) and all(".lora_" in k for k in saved)
    tok = AutoTokenizer.from_pretrained(out)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(fmtune_tiny_model), out)
    torch.testing.assert_close(logits(loaded, tok), logits(rec.model, tok), rtol=0, atol=1e-6)


def test_merge_gives_the_adapter_model_logits(lora_run, fmtune_tiny_model, tmp_path):
    rec, out = lora_run
    res = run_cli(["merge", fmtune_tiny_model, str(out), str(tmp_path / "merged")])
    assert res.exit_code == 0, res.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())
    # merged weights = base + B @ A * scaling: equal to the adapter model within float32 rounding
    torch.testing.assert_close(logits(merged, tok), logits(rec.model, tok), rtol=0, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(fmtune_tiny_model).state_dict()
    changed = {k.rsplit(".", 2)[-2] for k, v in merged.state_dict().items()
               if not torch.equal(v, base[k])}
    assert changed == set(LINEARS)
    # BASE is optional: the adapter names its base
    res = run_cli(["merge", str(out), str(tmp_path / "merged2")])
    assert res.exit_code == 0, res.stderr
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged2").state_dict()
    assert all(torch.equal(again[k], v) for k, v in merged.state_dict().items())
    # an existing, non-empty target is refused, nothing is overwritten
    res = run_cli(["merge", str(out), str(tmp_path / "merged")])
    assert res.exit_code == 2
    assert res.stderr.strip() == (f"fmtune: error: {tmp_path / 'merged'} exists and is not empty: "
                                  "choose a new folder")


def test_generate_on_the_adapter_folder(lora_run, fmtune_tiny_model):
    rec, out = lora_run
    res = run_cli(["generate", "--model", str(out), "--text", TEXTS[0], "--max_new_tokens", "6",
                   "--jsonl"])
    assert res.exit_code == 0, res.stderr
    tok = AutoTokenizer.from_pretrained(out)
    import json

    assert [json.loads(line)["output"] for line in res.stdout.split("\n")[:-1]] == \
        generate(rec.model, tok, [TEXTS[0]], 6)


def test_export_vllm_plain_lora(lora_run, tmp_path):
    _, out = lora_run
    res = run_cli(["export-vllm", str(out), str(tmp_path / "v")])
    assert res.exit_code == 0, res.stderr
    assert sorted(os.listdir(tmp_path / "v")) == ["adapter_config.json", "adapter_model.safetensors",
                                                  "tokenizer.json", "tokenizer_config.json"]
    assert (load_file(tmp_path / "v" / "adapter_model.safetensors").keys()
            == load_file(out / "adapter_model.safetensors").keys())
    assert "28 LoRA tensors, 0 new-token embeddings" in res.stdout


def test_bad_target_module_lists_the_linear_layers(fmtune_tiny_model, data, tmp_path, peft_helpers):
    out = tmp_path / "o"
    res = run_cli(peft_helpers.train_args(fmtune_tiny_model, data, out, "--plugins", "lora",
                                          "--target_modules", "q_proj,qkv_proj"))
    assert res.exit_code == 2
    assert res.stderr.strip() == (
        "fmtune: error: invalid config: target_modules: no module named 'qkv_proj' in "
        "LlamaForCausalLM; its linear layers are: down_proj, gate_proj, k_proj, lm_head, o_proj, "
        "q_proj, up_proj, v_proj")
    assert not out.exists()  # refused before data, model or output folder
    res = run_cli(peft_helpers.train_args(fmtune_tiny_model, data, out, "--plugins", "lora",
                                          "--target_modules", "input_layernorm"))
    assert res.exit_code == 2
    assert "target_modules: 'input_layernorm' is a LlamaRMSNorm; LoRA adapts linear and " \
           "embedding layers" in res.stderr


def wrapped(argv):
    """Config -> tokenizer -> model -> wrap_peft through the hooks, as `fmtune train` does."""
    from fmtune.commands import load_config, validate

    config, pm, _, _ = load_config(argv)
    validate(config, pm)
    tok = pm.hook.load_tokenizer(config=config)
    model = pm.hook.load_model(config=config, tokenizer=tok)
    return pm.hook.wrap_peft(model=model, config=config, tokenizer=tok), config


def test_options_reach_peft(fmtune_tiny_model, tmp_path):
    data = tmp_path / "x.jsonl"  # paths are checked in validation; the data is never read here
    data.write_text('{"input": "a", "output": "b"}\n')
    common = ["--model_name_or_path", fmtune_tiny_model, "--training_data_path", str(data),
              "--output_dir", str(tmp_path), "--plugins", "lora"]
    model, _ = wrapped([*common, "--target_modules", "q_proj,lm_head", "--r", "4",
                        "--lora_alpha", "16", "--use_rslora", "true", "--use_dora", "true",
                        "--modules_to_save", "embed_tokens", "--lora_dropout", "0.1"])
    inner = model.base_model.model
    assert isinstance(inner.lm_head, LoraLinear)  # lm_head is adapted when listed
    q = inner.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoraLinear) and not isinstance(inner.model.layers[0].self_attn.v_proj,
                                                         LoraLinear)
    assert q.r["default"] == 4 and q.scaling["default"] == pytest.approx(16 / math.sqrt(4))
    assert q.lora_dropout["default"].p == 0.1
    assert "default" in q.lora_magnitude_vector  # DoRA
    assert type(inner.model.embed_tokens).__name__ == "ModulesToSaveWrapper"
    # defaults: fms-hf-tuning's r/alpha/dropout, peft's targets for llama (q_proj, v_proj)
    model, _ = wrapped(common)
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert adapted == {"q_proj", "v_proj"}
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.r["default"] == 8 and q.scaling["default"] == 32 / 8
    assert q.lora_dropout["default"].p == 0.05


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_adapters_are_saved_for_the_original_base(init, fmtune_tiny_model, data,
                                                               tmp_path, peft_helpers):
    out = tmp_path / "out"
    rec = peft_helpers.train(peft_helpers.train_args(
        fmtune_tiny_model, data, out, "--plugins", "lora", "--init_lora_weights", init, "--r", "4",
        "--max_steps", "4"))
    assert rec.losses[-1] < rec.losses[0]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True  # converted: rank 2r, plain LoRA
    tok = AutoTokenizer.from_pretrained(out)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(fmtune_tiny_model), out)
    # the training model had its base rewritten by the init; the converted adapter on the
    # untouched base gives the same function (float32 products: 1e-4)
    torch.testing.assert_close(logits(loaded, tok), logits(rec.model, tok), rtol=0, atol=1e-4)


def adapter_tensors(folder):
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


class StopAt:
    """In-test plugin: training 'dies' after a step (the checkpoint of that step is lost)."""

    def __init__(self, step):
        self.step = step

    @hookimpl
    def on_step(self, run):
        if run.state.global_step >= self.step:
            return {"should_training_stop": True}


def test_resume_from_adapter_checkpoint_matches_uninterrupted(fmtune_tiny_model, data, tmp_path,
                                                               peft_helpers):
    def args(out):
        return peft_helpers.train_args(fmtune_tiny_model, data, out, "--plugins", "lora",
                                       "--max_steps", "6", "--save_strategy", "steps",
                                       "--save_steps", "2", "--lr_scheduler_type", "constant",
                                       "--lora_dropout", "0")

    whole = tmp_path / "whole"
    peft_helpers.train(args(whole))
    cut = tmp_path / "cut"
    peft_helpers.train(args(cut), plugins=[StopAt(4)])
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= set(
        os.listdir(cut / "checkpoint-2"))
    shutil.rmtree(cut / "checkpoint-4")
    (cut / "run_summary.json").unlink()  # as if killed: a completed run's rerun does nothing
    rec = peft_helpers.train(args(cut))
    summary = json.loads((cut / "run_summary.json").read_text())
    assert summary["resumed_from"] == str(cut / "checkpoint-2") and summary["global_step"] == 6
    a, b = adapter_tensors(whole), adapter_tensors(cut)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert len(rec.losses) == 4  # steps 3-6 only


def test_continue_training_from_an_adapter(lora_run, fmtune_tiny_model, data, tmp_path, peft_helpers):
    first, src = lora_run
    # learning rate 0: the continued adapter is exactly the one it started from
    out = tmp_path / "still"
    peft_helpers.train(peft_helpers.train_args(
        fmtune_tiny_model, data, out, "--plugins", "lora", "--continue_from_adapter", str(src),
        "--learning_rate", "0", "--max_steps", "2"))
    a, b = adapter_tensors(src), adapter_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # (peft keeps target_modules as a set: the saved list's order follows string hashing)
    assert sorted(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == \
        sorted(json.loads((src / "adapter_config.json").read_text())["target_modules"])
    # training on: it starts where the first run ended, not from scratch
    rec = peft_helpers.train(peft_helpers.train_args(
        fmtune_tiny_model, data, tmp_path / "more", "--plugins", "lora", "--continue_from_adapter",
        str(src), "--max_steps", "2"))
    assert rec.losses[0] < first.losses[0] - 0.5
    # options that contradict the adapter are refused (not silently ignored)
    res = run_cli(peft_helpers.train_args(
        fmtune_tiny_model, data, tmp_path / "bad", "--plugins", "lora", "--continue_from_adapter",
        str(src), "--r", "4"))
    assert res.exit_code == 2
    assert f"continue_from_adapter: r is 4 here but 8 in {src}; drop the option" in res.stderr
    res = run_cli(peft_helpers.train_args(
        fmtune_tiny_model, data, tmp_path / "bad", "--plugins", "lora", "--continue_from_adapter",
        str(tmp_path)))
    assert res.exit_code == 2
    assert f"continue_from_adapter: {tmp_path} has no adapter_config.json" in res.stderr


def test_failed_pissa_run_leaves_no_initial_adapter_behind(fmtune_tiny_model, data, tmp_path,
                                                           peft_helpers):
    from fmtune_peft_lora.build import INITIAL_ADAPTER

    class Boom:
        folder = None

        @hookimpl
        def on_step(self, run):
            Boom.folder = run.config.stash[INITIAL_ADAPTER]
            assert os.path.isfile(os.path.join(Boom.folder, "adapter_config.json"))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_cli(peft_helpers.train_args(fmtune_tiny_model, data, tmp_path / "o", "--plugins",
                                        "lora", "--init_lora_weights", "pissa", "--max_steps", "2"),
                plugins=[Boom()])
    assert Boom.folder and not os.path.exists(Boom.folder)  # removed by on_train_error


def test_exclude_modules_and_layers_to_transform(fmtune_tiny_model, data, tmp_path, peft_helpers):
    """peft LoraConfig fields fms-hf-tuning exposes: exclude_modules, layers_to_transform."""
    import json

    rec = peft_helpers.train(peft_helpers.train_args(
        fmtune_tiny_model, data, tmp_path / "out", "--peft_method", "lora", "--max_steps", "1",
        "--target_modules", "all-linear", "--exclude_modules", "o_proj", "down_proj",
        "--layers_to_transform", "1"))
    adapted = sorted(n.removeprefix("base_model.model.model.") for n, m in
                     rec.model.named_modules() if hasattr(m, "lora_A") and "lora_A" not in n
                     and "lora_B" not in n)
    assert adapted == [f"layers.1.{m}" for m in ("mlp.gate_proj", "mlp.up_proj",
                                                 "self_attn.k_proj", "self_attn.q_proj",
                                                 "self_attn.v_proj")]
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [1] and sorted(cfg["exclude_modules"]) == [
        "down_proj", "o_proj"]


def test_silogen_merge_and_vllm_flags(lora_run, fmtune_tiny_model, tmp_path):
    """Silogen's `merge_adapter basemodel peftmodel outpath --tokenizer T --device_map D` and
    `create_vllm_compatible_adapter [--training-config C] model_path`, with fmtune's names."""
    import shutil

    rec, out = lora_run
    other_tok = tmp_path / "tok"
    tok = AutoTokenizer.from_pretrained(fmtune_tiny_model)
    tok.add_tokens(["<|silogen|>"])
    tok.save_pretrained(other_tok)
    res = run_cli(["merge", fmtune_tiny_model, str(out), str(tmp_path / "merged"),
                   "--tokenizer", str(other_tok), "--device_map", "cpu"])
    assert res.exit_code == 0, res.stderr
    saved = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert saved.convert_tokens_to_ids("<|silogen|>") == len(tok) - 1
    res = run_cli(["merge", str(out), str(tmp_path / "m2"), "--device_map", "{bad"])
    assert res.exit_code == 2 and "--device_map: not a JSON mapping" in res.stderr
    adapter = tmp_path / "adapter"
    shutil.copytree(out, adapter)
    cfg = tmp_path / "silogen.yaml"
    cfg.write_text("run_conf: {}\n")
    res = run_cli(["export-vllm", "--training-config", str(cfg), str(adapter)])
    assert res.exit_code == 0, res.stderr
    assert (adapter / "vllm" / "adapter_model.safetensors").is_file()
    assert (adapter / "adapter_model.safetensors").read_bytes() == \
        (out / "adapter_model.safetensors").read_bytes()  # the original is kept
