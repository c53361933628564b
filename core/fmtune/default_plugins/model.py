"""Default model and tokenizer loading (full fine-tuning needs nothing more)."""

from __future__ import annotations

import logging
import os

from fmtune import hookimpl

log = logging.getLogger("fmtune")


def resolve_dtype(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def resolve_attn_implementation(config) -> str | None:
    """The attention implementation to ask transformers for; fallbacks are logged."""
    wanted = "flash_attention_2" if config.use_flash_attn else config.attn_implementation
    if wanted != "flash_attention_2":
        return wanted
    import importlib.util

    import torch

    if importlib.util.find_spec("flash_attn") is None:
        reason = "the flash-attn package is not installed"
    elif not torch.cuda.is_available():
        reason = "no GPU is present"
    else:
        return wanted
    log.warning("flash_attention_2 requested but %s: using sdpa instead", reason)
    return "sdpa"


@hookimpl(trylast=True)
def load_tokenizer(config):
    if config.tokenizer_train_files:
        from fmtune.bpe import train_bpe_tokenizer

        log.info("training a byte-level BPE tokenizer (vocab %d) on %s",
                 config.tokenizer_vocab_size, ", ".join(config.tokenizer_train_files))
        tok = train_bpe_tokenizer(config.tokenizer_train_files, config.tokenizer_vocab_size)
    else:
        from transformers import AutoTokenizer

        from fmtune.hub import from_pretrained

        path = config.tokenizer_name_or_path or config.model_name_or_path
        tok = from_pretrained(AutoTokenizer.from_pretrained, path, "tokenizer")
    if tok.pad_token is None:
        if tok.eos_token is None:
            from fmtune.config import ConfigError

            raise ConfigError("the tokenizer has neither a pad nor an eos token")
        log.info("tokenizer has no pad token: using eos %r for padding", tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


@hookimpl(trylast=True)
def load_model(config, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    from fmtune.hub import from_pretrained

    dtype = resolve_dtype(config.torch_dtype)
    kwargs = {}
    attn = resolve_attn_implementation(config)
    if attn:
        kwargs["attn_implementation"] = attn
    path = config.model_name_or_path
    if config.random_init_weights:
        if os.path.isfile(path):
            path = os.path.dirname(path) or "."
        model_config = from_pretrained(AutoConfig.from_pretrained, path, "model config")
        model_config.vocab_size = len(tokenizer)
        model_config.eos_token_id = tokenizer.eos_token_id
        model_config.pad_token_id = tokenizer.pad_token_id
        model_config.bos_token_id = tokenizer.bos_token_id
        set_seed(config.seed)
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype, **kwargs)
        log.info("built %s with random weights (seed %d)", type(model).__name__, config.seed)
    else:
        model = from_pretrained(AutoModelForCausalLM.from_pretrained, path, "model",
                                dtype=dtype, **kwargs)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        log.info("resizing embeddings to the tokenizer's %d tokens", len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
