"""Each architecture trains in full and with LoRA (and QLoRA on one), the loss falls, the saved
folder reloads with its processor and generates from an image as the trained model did; a toy
task is learnt to >= 90% held-out exact match."""

from __future__ import annotations

import json
import os

import pytest

from fmtune.testing import train, train_argv, write_jsonl
from fmtune_vision.inference import exact_match, generate, load_for_inference, question
from fmtune_vision.testing import QUESTION, draw_shape, shape_records


def adapted_layers(peft_model) -> set[str]:
    return {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}


def linear_layers(peft_model) -> set[str]:
    """The base model's linear layers (as peft names them inside the wrapped model), but the
    output layer."""
    import torch

    head = peft_model.get_output_embeddings()
    return {n.removesuffix(".base_layer") for n, m in peft_model.named_modules()
            if type(m) is torch.nn.Linear and m is not head and ".lora_" not in n
            and "lm_head" not in n}


def answers(model, processor, image):
    return generate(model, processor, [question(QUESTION)], [[image]], max_new_tokens=4)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_trains_saves_reloads_and_generates(arch, method, vlm, shapes, tmp_path):
    out = tmp_path / "out"
    plugins = "vision" if method == "full" else "vision,lora"
    rec = train(train_argv(vlm(arch), shapes, out, "--plugins", plugins, "--max_steps", "4",
                           *(["--learning_rate", "1e-3"] if method == "full" else [])))
    assert len(rec.losses) == 4 and rec.losses[-1] < rec.losses[0]
    summary = json.loads((out / "run_summary.json").read_text())
    answered = summary["hooks_answered"]
    assert answered["prepare_data"]["answered_by"] == "vision"
    assert answered["load_model"]["answered_by"] == "vision"
    assert "vision" in answered["save"]["wrappers"]
    for name in ("processor_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    if method == "lora":  # the language model's linear layers, all of them, nothing else
        adapted = adapted_layers(rec.model)
        assert adapted == {n for n in linear_layers(rec.model) if ".language_model." in n}
    image = draw_shape("green", "square", seed=3)
    model, processor = load_for_inference(str(out))
    if method == "lora":
        from peft import PeftModel

        assert isinstance(model, PeftModel)
    trained = rec.model.eval()
    assert answers(model, processor, image) == answers(trained, processor, image)


def test_qlora_quantizes_the_language_model_only(arch, vlm, shapes, tmp_path):
    """bitsandbytes 4-bit on CPU, every architecture: the language model's linear layers (all
    of them, Mllama's cross-attention layers too) are 4-bit, the vision tower, the projector
    and the output layer are not; only the adapter trains, and the loss falls."""
    import bitsandbytes as bnb
    import torch

    rec = train(train_argv(vlm(arch), shapes, tmp_path / "out", "--plugins", "vision,qlora",
                           "--max_steps", "2"))
    assert len(rec.losses) == 2 and rec.losses[-1] < rec.losses[0]
    base = rec.model.get_base_model()
    four_bit = {n.removesuffix(".base_layer") for n, m in base.named_modules()
                if isinstance(m, bnb.nn.Linear4bit)}
    # every 4-bit layer carries LoRA and every LoRA layer is 4-bit: the language model's
    assert four_bit == {n.removeprefix("base_model.model.") for n in adapted_layers(rec.model)}
    assert four_bit and all(".language_model." in n for n in four_bit)
    plain = [n for n, m in base.named_modules() if type(m) is torch.nn.Linear
             and ".lora_" not in n]
    assert not [n for n in plain if ".language_model." in n]
    from fmtune_vision.models import part_of

    assert {"vision_tower", "projector"} <= {part_of(n) for n in plain}
    assert type(base.get_output_embeddings()) is torch.nn.Linear
    trainable = {n for n, p in rec.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_vision_lora_parts_select_the_vision_tower_and_projector(vlm, shapes, tmp_path):
    rec = train(train_argv(vlm("llava"), shapes, tmp_path / "out", "--plugins", "vision,lora",
                           "--max_steps", "1", "--vision_lora_parts",
                           "vision_tower,projector"))
    assert adapted_layers(rec.model) == {n for n in linear_layers(rec.model)
                                         if ".vision_tower." in n or ".multi_modal_projector." in n}
    assert rec.losses


def test_toy_task_colour_of_the_shape(vlm, tmp_path):
    """64 drawn shapes, 60 steps on the cheapest architecture (LLaVA 1.5): the colour of 24
    unseen images is answered exactly in >= 90% of the cases."""
    data = write_jsonl(tmp_path / "train.jsonl", shape_records(tmp_path / "img", 64, seed=1))
    held_out = shape_records(tmp_path / "held", 24, seed=2)
    out = tmp_path / "out"
    train(train_argv(vlm("llava"), data, out, "--plugins", "vision", "--max_steps", "60",
                     "--learning_rate", "3e-3", "--per_device_train_batch_size", "8",
                     "--logging_steps", "10"))
    model, processor = load_for_inference(str(out))
    accuracy, predictions = exact_match(model, processor, held_out, max_new_tokens=3)
    assert accuracy >= 0.9, predictions
    assert os.path.isfile(out / "model.safetensors")
