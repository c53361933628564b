"""Vision-language models: the processor, the model (full precision or bitsandbytes 4/8-bit),
the parts of the model (language model, vision tower, projector) and the LoRA targets."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from fmtune.config import ConfigError
from fmtune.models import (device_map, ensure_pad_token, fit_to_tokenizer, from_pretrained,
                           resolve_attn_implementation, resolve_dtype)

log = logging.getLogger("fmtune")

# model_type -> what fmtune knows of it; fms-hf-tuning's vision models
ONE_IMAGE = ("llava", "llava_next")   # LLaVA 1.5, LLaVA-Next, Granite Vision: one image each
NESTED_IMAGES = ("mllama",)            # the processor takes a list of images per conversation
# module path component -> part (plugin.PARTS)
PART_OF = {"language_model": "language_model", "vision_tower": "vision_tower",
           "vision_model": "vision_tower", "multi_modal_projector": "projector"}


@dataclass
class Arch:
    model_type: str
    class_name: str

    @property
    def one_image(self) -> bool:
        return self.model_type in ONE_IMAGE

    @property
    def nested(self) -> bool:
        return self.model_type in NESTED_IMAGES


def model_path(config) -> str:
    path = config.model_name_or_path
    return os.path.dirname(path) or "." if os.path.isfile(path) else path


def model_config(config) -> Any:
    from transformers import AutoConfig

    kwargs = {"cache_dir": config.cache_dir} if config.get("cache_dir") else {}
    return from_pretrained(AutoConfig.from_pretrained, model_path(config), "model config",
                           trust_remote_code=config.trust_remote_code, **kwargs)


def arch_of(model_cfg) -> Arch:
    from transformers import AutoModelForImageTextToText

    cls = AutoModelForImageTextToText._model_mapping.get(type(model_cfg), None)
    if cls is None:
        raise ConfigError(f"vision: {model_cfg.model_type} is not an image-text-to-text model "
                          "of the installed transformers (AutoModelForImageTextToText); the "
                          "vision plugin trains models such as LLaVA, LLaVA-Next, Granite "
                          "Vision and Llama 3.2 Vision")
    return Arch(model_cfg.model_type, cls.__name__)


def load_processor(config) -> Any:
    from transformers import AutoProcessor

    path = config.tokenizer_name_or_path or model_path(config)
    kwargs = {"cache_dir": config.cache_dir} if config.get("cache_dir") else {}
    processor = from_pretrained(AutoProcessor.from_pretrained, path, "processor",
                                trust_remote_code=config.trust_remote_code, **kwargs)
    tok = getattr(processor, "tokenizer", None)
    if tok is None or getattr(processor, "image_processor", None) is None:
        raise ConfigError(f"vision: {path} has no image processor and tokenizer "
                          "(preprocessor_config.json, tokenizer files): AutoProcessor loaded a "
                          f"{type(processor).__name__}")
    ensure_pad_token(tok)
    return processor


def part_of(name: str) -> str | None:
    """The part (:data:`PARTS`) a module path lies in, or None (the output layer, ...)."""
    for piece in name.split("."):
        if piece in PART_OF:
            return PART_OF[piece]
    return None


def linear_modules(model, parts: list[str]) -> list[str]:
    """Full names of the linear layers of ``parts`` (never the output layer)."""
    import torch

    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted(n for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and m is not out and part_of(n) in parts)


def meta_model(model_cfg) -> Any:
    """The model's structure on the meta device (no weights), for checks before loading."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    with init_empty_weights():
        return AutoModelForImageTextToText.from_config(model_cfg)


def bnb_config(config, arch: Arch, model_cfg) -> Any:
    """qlora's 4-bit (or 8-bit) settings for the language model; the vision tower, the
    projector and the output layer stay unquantized (as QLoRA for LLaVA does)."""
    import torch
    from transformers import BitsAndBytesConfig

    skip = _unquantized(model_cfg)
    if config.get("load_in_8bit"):
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    compute = config.get("bnb_4bit_compute_dtype") or "auto"
    compute = resolve_dtype(config.torch_dtype) if compute == "auto" else getattr(torch, compute)
    return BitsAndBytesConfig(load_in_4bit=True,
                              bnb_4bit_quant_type=config.get("bnb_4bit_quant_type") or "nf4",
                              bnb_4bit_use_double_quant=bool(config.get(
                                  "bnb_4bit_use_double_quant", True)),
                              bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=skip)


def _unquantized(model_cfg) -> list[str]:
    model = meta_model(model_cfg)
    tops = {n for n, _ in model.named_modules() if n and part_of(n) in ("vision_tower",
                                                                          "projector")}
    names = sorted({n for n in tops if part_of(n.rsplit(".", 1)[0]) is None})  # outermost
    return names + ["lm_head"]


def load_model(config, tokenizer) -> Any:
    """The model for a run: ``AutoModelForImageTextToText`` in ``torch_dtype`` (random weights
    with ``random_init_weights``; 4/8-bit language model with ``--plugins qlora``), fitted to
    the tokenizer."""
    from transformers import AutoModelForImageTextToText, set_seed

    cfg = model_config(config)
    arch = arch_of(cfg)
    dtype = resolve_dtype(config.torch_dtype)
    kwargs: dict[str, Any] = {}
    attn = resolve_attn_implementation(config)
    if attn:
        kwargs["attn_implementation"] = attn
    if config.random_init_weights:
        set_seed(config.seed)
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype, **kwargs)
        log.info("built %s with random weights (seed %d)", type(model).__name__, config.seed)
    else:
        if config.get("cache_dir"):
            kwargs["cache_dir"] = config.cache_dir
        if "qlora" in config.plugins:
            kwargs["quantization_config"] = bnb_config(config, arch, cfg)
            kwargs["device_map"] = device_map(config)
        model = from_pretrained(AutoModelForImageTextToText.from_pretrained, model_path(config),
                                "model", trust_remote_code=config.trust_remote_code,
                                dtype=dtype, **kwargs)
        if "qlora" in config.plugins:
            bits = "8-bit" if config.get("load_in_8bit") else "4-bit"
            log.info("loaded %s with a %s language model (bitsandbytes); vision tower and "
                     "projector unquantized", arch.class_name, bits)
    return fit_to_tokenizer(model, tokenizer, config)
