"""Public API for plugins: loading models and tokenizers the way the core does.

Documented in docs/plugins.md ("Utilities for plugins"); names listed there are stable within
a minor version. Importing this module is cheap (torch and transformers load inside the
functions).

The core's default ``load_tokenizer``/``load_model`` hooks (:mod:`fmtune.default_plugins.model`)
call :func:`load_tokenizer` and :func:`load_full_model`; a plugin's own loader (a quantized
base, an adapter) reuses the pieces: :func:`resolve_dtype`, :func:`resolve_attn_implementation`,
:func:`device_map`, :func:`from_pretrained` and, last, :func:`fit_to_tokenizer`.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from .hub import from_pretrained, quant_method, without_unused_gptqmodel

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("fmtune")

__all__ = ["device_map", "ensure_pad_token", "fit_to_tokenizer", "from_pretrained", "load_full_model", "quant_method",
           "resolve_attn_implementation", "resolve_dtype", "without_unused_gptqmodel"]


def resolve_dtype(name: str) -> Any:
    """The ``torch.dtype`` for ``torch_dtype`` (``auto``: bfloat16 on a bf16 GPU, else float32)."""
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


FLASH_PACKAGES = {"flash_attention_2": ("flash_attn", "the flash-attn package"),
                  "flash_attention_3": ("flash_attn_interface", "the flash-attn 3 package "
                                        "(flash_attn_interface)")}


def flash_requested(config: Config) -> str | None:
    """``flash_attn_implementation`` (fms-hf-tuning's name, default flash_attention_2) when
    ``use_flash_attn`` is on or it is set explicitly, else None."""
    explicit = "flash_attn_implementation" in config and \
        config.source("flash_attn_implementation") != "default"
    if config.get("use_flash_attn") or explicit:
        return config.get("flash_attn_implementation") or "flash_attention_2"
    return None


def requested_attn_implementation(config: Config) -> str | None:
    """What the options ask for: the flash implementation (:func:`flash_requested`), else
    ``attn_implementation`` (None: transformers' default)."""
    return flash_requested(config) or config.get("attn_implementation")


def supports_sdpa(model_config: Any) -> bool:
    """Whether the causal-LM class of ``model_config`` implements sdpa (gpt-oss does not)."""
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping.get(type(model_config), None)
    return bool(getattr(cls, "_supports_sdpa", True)) if cls is not None else True


def resolve_attn_implementation(config: Config, model_config: Any = None) -> str | None:
    """The attention implementation to ask transformers for; fallbacks are logged.

    A flash implementation (flash_attention_2/3, or a kernels hub repo such as
    ``kernels-community/vllm-flash-attn3``) needs its package and a CUDA GPU; without them
    the run uses sdpa (eager for a ``model_config`` whose model has no sdpa) and says why.
    """
    wanted = requested_attn_implementation(config)
    if wanted in (None, "eager", "sdpa"):
        return wanted
    import importlib.util

    import torch

    module, package = FLASH_PACKAGES.get(wanted, ("kernels", "the kernels package (hub kernels)"))
    if importlib.util.find_spec(module) is None:
        reason = f"{package} is not installed"
    elif not torch.cuda.is_available():
        reason = "no GPU is present"
    elif config.get("use_cpu"):
        reason = "use_cpu is set"
    else:
        log.info("attention implementation: %s", wanted)
        return wanted
    fallback = "sdpa"
    if model_config is not None and not supports_sdpa(model_config):
        fallback = "eager"
        reason += f" ({model_config.model_type} models have no sdpa attention)"
    log.warning("%s requested but %s: using %s instead", wanted, reason, fallback)
    return fallback


def load_tokenizer(config: Config) -> Any:
    """The run's tokenizer (the core's ``load_tokenizer``): trained byte-level BPE with
    ``tokenizer_train_files``, else loaded from ``tokenizer_name_or_path`` or the model; a
    tokenizer without a pad token pads with eos."""
    if config.tokenizer_train_files:
        from .bpe import train_bpe_tokenizer

        log.info("training a byte-level BPE tokenizer (vocab %d) on %s",
                 config.tokenizer_vocab_size, ", ".join(config.tokenizer_train_files))
        tok = train_bpe_tokenizer(config.tokenizer_train_files, config.tokenizer_vocab_size)
    else:
        from .hub import load_tokenizer as load

        tok = load(config.tokenizer_name_or_path or config.model_name_or_path,
                   trust_remote_code=config.trust_remote_code, cache_dir=config.get("cache_dir"))
    return ensure_pad_token(tok)


def ensure_pad_token(tok: Any) -> Any:
    """``tok`` with a pad token: its eos token when it has none (one info line); a
    :class:`~fmtune.config.ConfigError` when it has neither."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            from .config import ConfigError

            raise ConfigError("the tokenizer has neither a pad nor an eos token")
        log.info("tokenizer has no pad token: using eos %r for padding", tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


def load_full_model(config: Config, tokenizer: Any) -> Any:
    """The core's ``load_model``: ``model_name_or_path`` in ``torch_dtype`` with the resolved
    attention implementation (or, with ``random_init_weights``, its architecture with random
    weights sized to ``tokenizer``), fitted to the tokenizer (:func:`fit_to_tokenizer`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    dtype = resolve_dtype(config.torch_dtype)
    kwargs = {}
    path = config.model_name_or_path
    if config.random_init_weights and os.path.isfile(path):
        path = os.path.dirname(path) or "."
    model_config: Any = None
    if config.random_init_weights or requested_attn_implementation(config) not in (
            None, "eager", "sdpa"):  # a flash request may fall back: to what the model has
        model_config = from_pretrained(AutoConfig.from_pretrained, path, "model config",
                                       trust_remote_code=config.trust_remote_code)
    attn = resolve_attn_implementation(config, model_config)
    if attn:
        kwargs["attn_implementation"] = attn
    if config.random_init_weights:
        model_config.vocab_size = len(tokenizer)
        model_config.eos_token_id = tokenizer.eos_token_id
        model_config.pad_token_id = tokenizer.pad_token_id
        model_config.bos_token_id = tokenizer.bos_token_id
        set_seed(config.seed)
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype,
                                                 trust_remote_code=config.trust_remote_code,
                                                 **kwargs)
        log.info("built %s with random weights (seed %d)", type(model).__name__, config.seed)
    else:
        if config.get("cache_dir"):
            kwargs["cache_dir"] = config.cache_dir
        model = from_pretrained(AutoModelForCausalLM.from_pretrained, path, "model",
                                trust_remote_code=config.trust_remote_code, dtype=dtype, **kwargs)
    return fit_to_tokenizer(model, tokenizer, config)


def fit_to_tokenizer(model: Any, tokenizer: Any, config: Config | None = None) -> Any:
    """What every model loader does after loading (plugins' loaders too): embeddings resized
    to the tokenizer's size (rounded up to ``embedding_size_multiple_of`` when the run's
    ``config`` sets it, as fms-hf-tuning does), generation pad/eos ids from the tokenizer."""
    multiple = int(config.get("embedding_size_multiple_of") or 1) if config is not None else 1
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows or (multiple > 1 and rows % multiple):
        target = -(-max(len(tokenizer), rows) // multiple) * multiple
        log.info("resizing embeddings to %d rows (tokenizer: %d tokens%s)", target,
                 len(tokenizer), f", a multiple of {multiple}" if multiple > 1 else "")
        model.resize_token_embeddings(target)  # grows only: no existing row is dropped
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def device_map(config: Config) -> Any:
    """For loaders that place weights themselves (quantized bases): one whole model per
    process, on this process's GPU, else the CPU."""
    import torch

    if torch.cuda.is_available() and not config.use_cpu:
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return "cpu"
