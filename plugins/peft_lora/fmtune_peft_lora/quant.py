"""QLoRA: loading the base model 4-bit or 8-bit through bitsandbytes (transformers' integration)."""

from __future__ import annotations

import logging

from .build import base_model_dir

log = logging.getLogger("fmtune")


def bnb_config(config):
    import torch
    from transformers import BitsAndBytesConfig

    from fmtune.models import resolve_dtype

    if config.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = (resolve_dtype(config.torch_dtype) if config.bnb_4bit_compute_dtype == "auto"
               else getattr(torch, config.bnb_4bit_compute_dtype))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=config.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=compute)


# bitsandbytes' packed CPU layout (0.49+): 4-bit weights are repacked in blocks of 32 output
# rows, two values per byte, with one absmax per `blocksize` inputs
PACK_BLOCK_N = 32


def keep_generic_cpu_path(model) -> int:
    """Send 4-bit layers that bitsandbytes' packed CPU path cannot repack down its generic path.

    On a CPU with avx512_bf16, bitsandbytes (0.49+) repacks a ``Linear4bit``'s weights at its
    first forward in eval mode without grad (evaluation, generation): that needs out_features
    divisible by 32 and in_features by the quantization block (64), else
    ``RuntimeError: shape '[32, 0]' is invalid``. Layers of that shape (small models) keep the
    path every CPU takes in training; the others keep the fast path. The decision depends only on
    the layer's shape, so a run gives the same results on CPUs with and without avx512_bf16 for
    those layers. Returns how many layers were switched."""
    switched = 0
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            continue  # already repacked: it worked
        shape = getattr(state, "shape", None) or (module.out_features, module.in_features)
        block = getattr(state, "blocksize", None) or 64
        out_features, in_features = int(shape[0]), int(shape[-1])
        if out_features % PACK_BLOCK_N or in_features % block or in_features % 2:
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def load_quantized(config, tokenizer):
    """The base model with bitsandbytes linear layers (embeddings and lm_head stay unquantized)."""
    from transformers import AutoModelForCausalLM

    from fmtune.models import (device_map, fit_to_tokenizer, from_pretrained, load_full_model,
                               resolve_attn_implementation, resolve_dtype)

    path = config.model_name_or_path
    if config.random_init_weights:
        # quantization happens while loading weights: build the random model, save it (main
        # process, the others wait), reload it
        from accelerate import PartialState

        state = PartialState()
        path = base_model_dir(config)
        with state.main_process_first():
            if state.is_main_process:
                full = load_full_model(config, tokenizer)
                log.info("random_init_weights: saving the random base model to %s", path)
                full.save_pretrained(path)
                del full
    quant = bnb_config(config)
    kwargs = {"quantization_config": quant, "device_map": device_map(config),
              "dtype": resolve_dtype(config.torch_dtype),
              "trust_remote_code": config.trust_remote_code}
    attn = resolve_attn_implementation(config)
    if attn:
        kwargs["attn_implementation"] = attn
    model = from_pretrained(AutoModelForCausalLM.from_pretrained, path, "model", **kwargs)
    if config.random_init_weights:
        model.config._name_or_path = path
    fit_to_tokenizer(model, tokenizer, config)
    switched = keep_generic_cpu_path(model)
    if switched:
        log.info("%d 4-bit layers are too narrow for bitsandbytes' packed CPU kernels: they use "
                 "its generic path", switched)
    bits = "8-bit" if config.load_in_8bit else f"4-bit {config.bnb_4bit_quant_type}"
    log.info("loaded %s with %s linear layers (bitsandbytes)", path, bits)
    return model
