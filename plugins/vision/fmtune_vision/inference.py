"""Generation from images: load a trained folder (full model, or adapter over its base) with
its processor, and answer conversations with images, greedily."""

from __future__ import annotations

import json
import os
from typing import Any

from fmtune.config import ConfigError

from . import images as imgs


def load_for_inference(path: str, base: str | None = None, trust_remote_code: bool = False
                       ) -> tuple[Any, Any]:
    """``(model, processor)`` of a trained folder: a full model, or a LoRA adapter over its
    base (``base`` or the adapter's ``base_model_name_or_path``); the processor is the
    folder's (saved with the model), else the base's."""
    from transformers import AutoModelForImageTextToText

    from fmtune.models import from_pretrained

    adapter = os.path.join(path, "adapter_config.json")
    if os.path.isfile(adapter):
        with open(adapter, encoding="utf-8") as f:
            base = base or json.load(f).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{adapter}: no base_model_name_or_path; give the base model")
        from peft import PeftModel

        from fmtune.models import quant_method, without_unused_gptqmodel

        model = from_pretrained(AutoModelForImageTextToText.from_pretrained, base, "model",
                                trust_remote_code=trust_remote_code)
        rows = model.get_input_embeddings().weight.shape[0]
        processor = _processor(path, base, trust_remote_code)
        if len(processor.tokenizer) > rows:
            model.resize_token_embeddings(len(processor.tokenizer))
        with without_unused_gptqmodel(quant_method(model)):
            model = PeftModel.from_pretrained(model, path)
    else:
        model = from_pretrained(AutoModelForImageTextToText.from_pretrained, path, "model",
                                trust_remote_code=trust_remote_code)
        processor = _processor(path, None, trust_remote_code)
    model.eval()
    return model, processor


def _processor(path: str, base: str | None, trust_remote_code: bool):
    from transformers import AutoProcessor

    from fmtune.models import from_pretrained

    folder = path if os.path.isfile(os.path.join(path, "processor_config.json")) or not base \
        else base
    return from_pretrained(AutoProcessor.from_pretrained, folder, "processor",
                           trust_remote_code=trust_remote_code)


def question(prompt: str, n_images: int = 1) -> list[dict]:
    """One user turn: ``n_images`` image parts, then the prompt."""
    return [{"role": "user", "content": [{"type": "image"}] * n_images
             + [{"type": "text", "text": prompt}]}]


def generate(model, processor, conversations: list[list[dict]], images: list[list],
             max_new_tokens: int = 64, chat_template: str | None = None) -> list[str]:
    """The greedy answer to each conversation (its last turn is the user's) given its images
    (PIL images or references: paths, bytes, data URLs)."""
    import torch

    from .data import parse_messages

    tok = processor.tokenizer
    answers = []
    for messages, pics in zip(conversations, images):
        messages = parse_messages(messages, "generate", "messages")
        batch = model_inputs(model, processor, messages, pics, chat_template)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        answers.append(tok.decode(out[0, batch["input_ids"].shape[1]:],
                                  skip_special_tokens=True).strip())
    return answers


def model_inputs(model, processor, messages: list[dict], pics: list,
                 chat_template: str | None = None):
    """The model's inputs (a batch of one, on the model's device) for a conversation whose last
    turn is the user's, with its images (PIL images or references), as :func:`generate` and
    the tests build them: the chat template's generation prompt, then the processor."""
    from .models import NESTED_IMAGES

    tok = processor.tokenizer
    nested = getattr(model.config, "model_type", None) in NESTED_IMAGES
    text = processor.apply_chat_template(messages, chat_template=chat_template,
                                         tokenize=False, add_generation_prompt=True)
    pics = [p if hasattr(p, "convert") else imgs.load(_ref(p)) for p in pics]
    kwargs: dict[str, Any] = {}
    if pics:
        kwargs["images"] = [pics] if nested else pics
    add_special = not (tok.bos_token and text.startswith(tok.bos_token))
    batch = processor(text=[text], return_tensors="pt", add_special_tokens=add_special,
                      **kwargs)
    batch.pop("token_type_ids", None)
    return batch.to(model.device)


def _ref(value: Any) -> str:
    path, data = imgs.resolve(value, os.path.join(os.getcwd(), "x"))
    return imgs.reference(path, data, None)


def exact_match(model, processor, records: list[dict], text_field: str = "messages",
                image_field: str = "images", max_new_tokens: int = 8) -> tuple[float, list[str]]:
    """``(accuracy, predictions)``: each record's conversation up to its last assistant turn is
    answered; exact match of the answer with that turn's text (stripped)."""
    conversations, pics, wanted = [], [], []
    for rec in records:
        msgs = rec[text_field]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        content = msgs[last]["content"]
        wanted.append(content if isinstance(content, str) else "".join(
            p.get("text", "") for p in content))
        conversations.append(msgs[:last])
        pics.append(imgs.as_list(rec.get(image_field)))
    predictions = generate(model, processor, conversations, pics, max_new_tokens)
    hits = sum(p == w.strip() for p, w in zip(predictions, wanted))
    return hits / max(len(records), 1), predictions
