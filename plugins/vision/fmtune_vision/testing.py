"""Tiny vision-language models and processors built locally (no download), for tests.

``build_tiny_vlm(folder, arch)`` saves a random-init model of one of :data:`ARCHITECTURES`
(vision tower + projector + language model) and its processor: an image processor config, the
project's byte-level BPE tokenizer (:func:`fmtune.testing.build_tokenizer`) with the image token
and the chat markers added, and a chat template that places the image placeholders. The folder
loads with ``AutoProcessor.from_pretrained`` and ``AutoModelForImageTextToText.from_pretrained``.
``draw_shape`` and ``shape_records`` draw the coloured-shape images the tests train on.
"""

from __future__ import annotations

import os
from typing import Any

from fmtune.testing import DEMO_TEXTS, build_tokenizer

#: the architectures :func:`build_tiny_vlm` builds (fms-hf-tuning's supported vision models)
ARCHITECTURES = ("llava", "llava_next", "granite_vision", "mllama")

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
           "yellow": (230, 210, 30)}
SHAPES = ("square", "circle", "triangle")
IMAGE_SIZE = 32

QUESTION = "what colour is the shape?"
VOCAB_TEXTS = [
    *DEMO_TEXTS,
    *[f"{QUESTION} {c}. what shape is it? {s}. describe the picture: a {c} {s}."
      for c in COLOURS for s in SHAPES] * 3,
]

# chat templates: one per family, each rendering content lists of {"type": "text"|"image"}
# (a plain string content is text); IMAGE stands for the family's image placeholder
_CONTENT = ("{%- if message['content'] is string -%}{{ message['content'] }}"
            "{%- else -%}{%- for part in message['content'] -%}"
            "{%- if part['type'] == 'image' -%}{{ IMAGE }}"
            "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
            "{%- endfor -%}{%- endif -%}")


def _content(image: str) -> str:
    return _CONTENT.replace("IMAGE", repr(image))


# LLaVA 1.5 (llava-hf): "USER: <image>\nquestion ASSISTANT: answer<eos>"
LLAVA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}" + _content("") + "{{ '\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' }}" + _content("<image>\n") + "{{ ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}" + _content("")
    + "{{ '<|endoftext|>' }}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}")
# Granite 3.2 Vision: "<|user|>\n<image>\nquestion\n<|assistant|>\nanswer<eos>\n"
GRANITE_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\n' }}" + _content("<image>\n")
    + "{%- if message['role'] == 'assistant' -%}{{ '<|endoftext|>' }}{%- endif -%}{{ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}")
# Llama 3.2 Vision: header tokens, <|image|> where the image is, <|eot_id|> after each turn
MLLAMA_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    + _content("<|image|>") + "{{ '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif -%}")

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=8)


def _tokenizer(arch: str):
    tok = build_tokenizer(VOCAB_TEXTS, vocab_size=400)
    if arch == "mllama":
        tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": [
            "<|image|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|python_tag|>"]})
        tok.eos_token = "<|eot_id|>"  # the end of an assistant turn stops generation
    else:
        extra = ["<image>"] + (["<|system|>", "<|user|>", "<|assistant|>"]
                               if arch == "granite_vision" else [])
        tok.add_special_tokens({"additional_special_tokens": extra})
    return tok


def _image_mean_std(siglip: bool) -> dict[str, Any]:
    if siglip:
        return dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return dict(image_mean=[0.48145466, 0.4578275, 0.40821073],
                image_std=[0.26862954, 0.26130258, 0.27577711])


def build_processor(arch: str):
    """The processor of a tiny ``arch`` model (tokenizer included)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import \
        LlavaNextImageProcessorPil
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tok = _tokenizer(arch)
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if arch == "llava":
        from transformers import LlavaProcessor

        ip = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size=size,
                                   **_image_mean_std(False))
        return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=VISION["patch_size"],
                              vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    if arch in ("llava_next", "granite_vision"):
        from transformers import LlavaNextProcessor

        siglip = arch == "granite_vision"
        ip = LlavaNextImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE} if not siglip else size, crop_size=size,
            image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE],
                                  [2 * IMAGE_SIZE, IMAGE_SIZE]],
            do_center_crop=not siglip, **_image_mean_std(siglip))
        return LlavaNextProcessor(
            image_processor=ip, tokenizer=tok, patch_size=VISION["patch_size"],
            vision_feature_select_strategy="default" if not siglip else "full",
            num_additional_image_tokens=0 if siglip else 1,
            chat_template=GRANITE_TEMPLATE if siglip else LLAVA_TEMPLATE)
    if arch == "mllama":
        from transformers import MllamaProcessor

        ip = MllamaImageProcessorPil(size=size, max_image_tiles=2, **_image_mean_std(False))
        return MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=MLLAMA_TEMPLATE)
    raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHITECTURES)}")


def build_config(arch: str, tok) -> Any:
    """The transformers config of a tiny ``arch`` model for tokenizer ``tok``."""
    ids = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.bos_token_id)
    if arch in ("llava", "llava_next"):
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

        vision = CLIPVisionConfig(**VISION, projection_dim=32)
        text = LlamaConfig(**TEXT, vocab_size=len(tok), **ids)
        image_token = tok.convert_tokens_to_ids("<image>")
        if arch == "llava":
            return LlavaConfig(vision_config=vision, text_config=text,
                               image_token_index=image_token, vision_feature_layer=-1,
                               vision_feature_select_strategy="default", **ids)
        return LlavaNextConfig(
            vision_config=vision, text_config=text, image_token_index=image_token,
            vision_feature_layer=-1, vision_feature_select_strategy="default",
            image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE],
                                  [2 * IMAGE_SIZE, IMAGE_SIZE]], **ids)
    if arch == "granite_vision":
        from transformers import GraniteConfig, LlavaNextConfig, SiglipVisionConfig

        vision = SiglipVisionConfig(**VISION)
        text = GraniteConfig(**TEXT, vocab_size=len(tok), embedding_multiplier=4.0,
                             logits_scaling=2.0, residual_multiplier=0.5,
                             attention_multiplier=0.125, **ids)
        # Granite Vision concatenates several vision layers' features (vision_feature_layer list)
        return LlavaNextConfig(
            vision_config=vision, text_config=text,
            image_token_index=tok.convert_tokens_to_ids("<image>"),
            vision_feature_layer=[-2, -1], vision_feature_select_strategy="full",
            image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE],
                                  [2 * IMAGE_SIZE, IMAGE_SIZE]], image_seq_length=16, **ids)
    if arch == "mllama":
        from transformers import MllamaConfig
        from transformers.models.mllama.configuration_mllama import (MllamaTextConfig,
                                                                      MllamaVisionConfig)

        vision = MllamaVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
            attention_heads=4, image_size=IMAGE_SIZE, patch_size=8, max_num_tiles=2,
            intermediate_layers_indices=[0], vision_output_dim=64,
            supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
        text = MllamaTextConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, cross_attention_layers=[1],
            vocab_size=len(tok), **ids)
        return MllamaConfig(vision_config=vision, text_config=text,
                            image_token_index=tok.convert_tokens_to_ids("<|image|>"))
    raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHITECTURES)}")


def build_tiny_vlm(folder: str | os.PathLike, arch: str, seed: int = 0) -> str:
    """Save a random-init tiny ``arch`` model and its processor to ``folder``; returns it."""
    import torch
    from transformers import AutoModelForImageTextToText

    processor = build_processor(arch)
    tok = processor.tokenizer
    cfg = build_config(arch, tok)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def tiny_vlm_builder(tmp_path_factory: Any):
    """``get(arch)``: the folder of a tiny model of ``arch`` (:func:`build_tiny_vlm`), built
    once under pytest's ``tmp_path_factory`` on first use (for a fixture)."""
    built: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in built:
            built[arch] = build_tiny_vlm(tmp_path_factory.mktemp(arch) / "model", arch)
        return built[arch]

    return get


def draw_shape(colour: str, shape: str, size: int = IMAGE_SIZE, seed: int = 0):
    """A ``size`` x ``size`` RGB image: one ``colour`` ``shape`` on a grey background, placed
    and sized by ``seed``."""
    import random

    from PIL import Image, ImageDraw

    rnd = random.Random(seed)
    img = Image.new("RGB", (size, size), (128, 128, 128))
    d = ImageDraw.Draw(img)
    r = rnd.randint(size // 4, size // 3)
    cx, cy = rnd.randint(r, size - r), rnd.randint(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour]
    if shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "circle":
        d.ellipse(box, fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def shape_records(folder: str | os.PathLike, n: int, seed: int = 0,
                  image_field: str = "images") -> list[dict]:
    """``n`` conversations asking the colour of a drawn shape (images saved as PNG in
    ``folder``), answer one word: fms-hf-tuning's vision format (``messages`` + ``image_field``)."""
    import random

    rnd = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    records = []
    for i in range(n):
        colour, shape = rnd.choice(list(COLOURS)), rnd.choice(SHAPES)
        path = os.path.join(str(folder), f"shape_{seed}_{i}.png")
        draw_shape(colour, shape, seed=rnd.randrange(1 << 30)).save(path)
        records.append({
            "messages": [
                {"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": [{"type": "text", "text": colour}]},
            ],
            image_field: [path],
        })
    return records
