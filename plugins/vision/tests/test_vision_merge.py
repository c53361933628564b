"""`fmtune merge` (the LoRA plugin's command) on a vision adapter: the base is loaded whole
(AutoModelForImageTextToText), the processor is saved with the merged model, the folder reloads
with the Auto classes and gives the adapter's logits; `fmtune generate --image` answers from it.
`fmtune export-vllm` writes the adapter's LoRA matrices under their full names."""

from __future__ import annotations

import json
import os

import pytest

from fmtune.testing import run_cli, train, train_argv
from fmtune_vision.inference import generate, load_for_inference, model_inputs, question
from fmtune_vision.testing import QUESTION, draw_shape

CLASSES = {"llava": "LlavaForConditionalGeneration",
           "llava_next": "LlavaNextForConditionalGeneration",
           "granite_vision": "LlavaNextForConditionalGeneration",
           "mllama": "MllamaForConditionalGeneration"}


def logits(model, processor, image):
    import torch

    with torch.no_grad():
        return model(**model_inputs(model, processor, question(QUESTION), [image])).logits


@pytest.fixture(scope="module")
def adapters(vlm, shapes, tmp_path_factory):
    """``adapter(arch)``: a LoRA adapter trained 3 steps on ``arch`` (once per module)."""
    made = {}

    def get(arch: str) -> str:
        if arch not in made:
            out = tmp_path_factory.mktemp(f"{arch}-lora") / "adapter"
            train(train_argv(vlm(arch), shapes, out, "--plugins", "vision,lora",
                             "--max_steps", "3"))
            made[arch] = str(out)
        return made[arch]

    return get


def test_merged_vision_adapter_reloads_with_the_auto_classes_and_gives_the_adapters_logits(
        arch, vlm, adapters, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    adapter, merged = adapters(arch), tmp_path / "merged"
    res = run_cli(["merge", adapter, str(merged)])
    assert res.exit_code == 0, res.stderr[-2000:]
    for name in ("config.json", "model.safetensors", "processor_config.json",
                 "tokenizer.json", "chat_template.jinja"):
        assert (merged / name).is_file(), name
    model = AutoModelForImageTextToText.from_pretrained(merged).eval()
    processor = AutoProcessor.from_pretrained(merged)
    assert type(model).__name__ == CLASSES[arch]
    assert not any("lora" in k for k in model.state_dict())
    peft_model, peft_processor = load_for_inference(adapter)  # PeftModel over the base
    from peft import PeftModel

    assert isinstance(peft_model, PeftModel)
    assert processor.tokenizer.get_vocab() == peft_processor.tokenizer.get_vocab()
    image = draw_shape("blue", "triangle", seed=5)
    want = logits(peft_model, peft_processor, image)
    got = logits(model, processor, image)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    base, _ = load_for_inference(vlm(arch))  # the adapter changed the outputs: not vacuous
    assert (logits(base, processor, image) - want).abs().max() > 1e-3
    # `fmtune generate --image` answers from the merged folder as the adapter does
    path = tmp_path / "q.png"
    image.save(path)
    res = run_cli(["generate", "--model", str(merged), "--image", str(path), "--text", QUESTION,
                   "--max_new_tokens", "3"])
    assert res.exit_code == 0, res.stderr[-2000:]
    assert res.stdout.strip() == generate(peft_model, peft_processor, [question(QUESTION)],
                                          [[str(path)]], max_new_tokens=3)[0]


def test_merge_refuses_an_adapter_whose_tensors_name_no_layer_of_the_base(vlm, adapters,
                                                                         tmp_path):
    """An adapter saved from the text-only structure of the model (``model.layers...``, as
    ``AutoModelForCausalLM`` builds Mllama) over the whole vision-language model: peft would
    only warn and the merge would leave the adapter out; fmtune says so in one line and writes
    nothing."""
    import shutil

    from safetensors.torch import load_file, save_file

    text_only = tmp_path / "text-only"
    shutil.copytree(adapters("llava"), text_only)
    weights = text_only / "adapter_model.safetensors"
    save_file({k.replace(".language_model.", "."): v for k, v in load_file(weights).items()},
              weights)
    cfg = json.loads((text_only / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj"]
    (text_only / "adapter_config.json").write_text(json.dumps(cfg))
    res = run_cli(["merge", str(text_only), str(tmp_path / "m")])
    assert res.exit_code == 2
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith(f"fmtune: error: {text_only}: the adapter does not fit the base model "
                           f"{vlm('llava')} (LlavaForConditionalGeneration): 28 of its tensors "
                           "name no layer of it (base_model.model.model.layers.0."), line
    assert not (tmp_path / "m").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".m.")]


def test_export_vllm_writes_a_llava_adapter_and_refuses_mllama(adapters, tmp_path):
    """vLLM's LLaVA loaders map the Hugging Face names (model.language_model...) to their own
    (hf_to_vllm_mapper): the adapter is written as saved, LoRA matrices only, with its
    tokenizer. vLLM's Mllama takes no LoRA: refused in one line, nothing written."""
    from safetensors.torch import load_file

    res = run_cli(["export-vllm", adapters("mllama"), str(tmp_path / "no")])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines()[-1] == (
        f"fmtune: error: {adapters('mllama')}: vLLM cannot serve this adapter: vLLM serves no "
        "LoRA adapter on Llama 3.2 Vision (MllamaForConditionalGeneration); merge the adapter "
        "(fmtune merge) and serve the merged model")
    assert not (tmp_path / "no").exists()
    adapter = adapters("llava")
    res = run_cli(["export-vllm", adapter, str(tmp_path / "vllm")])
    assert res.exit_code == 0, res.stderr[-2000:]
    saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    written = load_file(tmp_path / "vllm" / "adapter_model.safetensors")
    assert set(written) == set(saved) and all(".language_model." in k for k in written)
    cfg = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["modules_to_save"] is None
    assert (tmp_path / "vllm" / "tokenizer.json").is_file()


def test_vllm_export_of_a_llama_vision_adapter_is_refused_before_training(vlm, shapes,
                                                                         tmp_path):
    res = run_cli(["train", "--plugins", "vision,lora", "--model_name_or_path", vlm("mllama"),
                   "--training_data_path", shapes, "--output_dir", str(tmp_path / "out"),
                   "--lora_post_process_for_vllm", "true"])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines()[-1] == (
        "fmtune: error: invalid config: lora_post_process_for_vllm: vLLM serves no LoRA adapter "
        "on Llama 3.2 Vision (MllamaForConditionalGeneration); merge the adapter after training "
        "(fmtune merge) and serve the merged model")
    assert not (tmp_path / "out").exists()
