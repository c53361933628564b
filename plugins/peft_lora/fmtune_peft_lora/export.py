"""Saving adapters, merging them into their base, and exporting them for vLLM.

vLLM's LoRA loader (``vllm/lora``: ``PEFTHelper``, ``LoRAModel.from_local_checkpoint``)
takes ``adapter_config.json`` + ``adapter_model.safetensors`` holding only
``lora_A``/``lora_B`` (and ``lora_embedding_A``/``_B``) tensors, refuses
``modules_to_save``, DoRA and LoRA biases, and takes the embeddings of tokens
added during training from ``new_embeddings.safetensors`` (``input_embeddings``
and ``output_embeddings``, one row per new token, in id order: the layout
fms-hf-tuning's ``post_process_vLLM_adapters_new_tokens`` writes).
"""

from __future__ import annotations

from typing import Any

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager

from fmtune.config import ConfigError
from fmtune.records import read_json_object, write_json

log = logging.getLogger("fmtune")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
NEW_EMBEDDINGS = "new_embeddings.safetensors"
INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in")
OUTPUT_EMBEDDINGS = ("lm_head", "embed_out")
EMBEDDING_NAMES = (*INPUT_EMBEDDINGS, *OUTPUT_EMBEDDINGS)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja")
# a folder holding one of these has a processor (image processor + tokenizer) AutoProcessor loads
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


# base model types whose vLLM implementation takes no LoRA adapter (no SupportsLoRA)
VLLM_NO_LORA = {"mllama": "Llama 3.2 Vision (MllamaForConditionalGeneration)"}


def vllm_refusals(cfg: dict, model_type: str | None = None) -> list[str]:
    """Why vLLM cannot serve an adapter with this adapter_config (empty: it can), over a base of
    ``model_type`` when known."""
    out = []
    if model_type in VLLM_NO_LORA:
        out.append(f"vLLM serves no LoRA adapter on {VLLM_NO_LORA[model_type]}; merge the "
                   "adapter (fmtune merge) and serve the merged model")
    kind = cfg.get("peft_type")
    if kind != "LORA":
        what = "prompt tuning" if kind == "PROMPT_TUNING" else str(kind)
        out.append(f"vLLM serves LoRA adapters only, this is a {what} adapter (serve it with peft: "
                   "fmtune generate, or AutoPeftModelForCausalLM)")
        return out
    if cfg.get("use_dora"):
        out.append("vLLM does not implement DoRA (the magnitude vectors would be dropped); merge "
                   "the adapter (fmtune merge) and serve the merged model")
    if cfg.get("alora_invocation_tokens"):
        out.append("aLoRA: vLLM's LoRA path applies an adapter to every token, but this one is "
                   "valid only after its invocation tokens, so outputs would change; serve it "
                   "with peft (fmtune generate) or an activated-LoRA-capable server")
    if cfg.get("lora_bias") or cfg.get("bias", "none") != "none":
        out.append("vLLM does not load LoRA biases")
    saved = [m for m in (cfg.get("modules_to_save") or [])]
    if saved:
        out.append(f"modules_to_save {', '.join(saved)}: vLLM loads only LoRA matrices, not "
                   "modules trained in full; merge the adapter instead, or train new tokens "
                   "without modules_to_save (fmtune then trains only their embedding rows, which "
                   "vLLM loads from new_embeddings.safetensors)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "corda", "loftq")):
        out.append(f"init_lora_weights {init}: the adapter needs the base weights its "
                   "initialization changed; use the final adapter fmtune saved (converted to plain "
                   "LoRA), not a checkpoint")
    if cfg.get("layer_replication"):
        out.append("vLLM does not support layer_replication")
    return out


def check_new_dir(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"{out} exists and is not empty: choose a new folder")


@contextmanager
def atomic_dir(out: str):
    """Write into a temporary sibling of ``out``; move it into place only on success."""
    out = os.path.abspath(out)
    check_new_dir(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
    try:
        yield tmp
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def read_adapter_config(adapter: str) -> dict | None:
    """The adapter_config.json of an adapter folder (None: unreadable)."""
    return read_json_object(os.path.join(adapter, ADAPTER_CONFIG))


def _adapter_config(adapter: str) -> dict:
    path = os.path.join(adapter, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise ConfigError(f"{adapter}: not an adapter folder (no {ADAPTER_CONFIG})")
    cfg = read_adapter_config(adapter)
    if cfg is None:
        raise ConfigError(f"{path}: not a readable JSON object")
    return cfg


def _base_path(adapter: str, cfg: dict, base: str | None) -> str:
    base = base or cfg.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter}: {ADAPTER_CONFIG} names no base model; pass BASE")
    return base


def load_adapter_model(adapter: str, base: str | None = None, dtype: str = "float32",
                       trust_remote_code: bool = False, tokenizer_path: str | None = None,
                       device_map: Any = None):
    """``(peft_model, tokenizer)``: the base in full precision (resized to the adapter's tokenizer)
    with the adapter on top, loaded by peft's own loader. A vision-language base (LLaVA, Mllama,
    ...) is loaded whole, with ``AutoModelForImageTextToText`` (:func:`build.auto_model_class`)."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoTokenizer

    from fmtune.models import (fit_to_tokenizer, from_pretrained, quant_method,
                               without_unused_gptqmodel)

    from .build import auto_model_class

    cfg = _adapter_config(adapter)
    base = _base_path(adapter, cfg, base)
    has_tok = os.path.isfile(os.path.join(adapter, "tokenizer_config.json"))
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, adapter if has_tok else base,
                                "tokenizer", trust_remote_code=trust_remote_code)
    base_cfg = from_pretrained(AutoConfig.from_pretrained, base, "model",
                               trust_remote_code=trust_remote_code)
    extra = {"device_map": device_map} if device_map is not None else {}
    model = from_pretrained(auto_model_class(base_cfg).from_pretrained, base, "model",
                            trust_remote_code=trust_remote_code, dtype=getattr(torch, dtype),
                            **extra)
    fit_to_tokenizer(model, tokenizer)  # the adapter's tokenizer: its rows are what it trained
    try:
        with without_unused_gptqmodel(quant_method(model)):
            peft_model = PeftModel.from_pretrained(model, adapter)
    except (OSError, ValueError, RuntimeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{adapter}: the adapter does not fit the base model {base}: "
                          f"{first}") from None
    unloaded = _unloaded_tensors(adapter, peft_model)
    if unloaded:  # peft only warns: a merge would silently leave them out
        raise ConfigError(f"{adapter}: the adapter does not fit the base model {base} "
                          f"({type(model).__name__}): {len(unloaded)} of its tensors name no "
                          f"layer of it ({', '.join(unloaded[:3])})")
    if tokenizer_path:  # Silogen's merge_adapter --tokenizer: the tokenizer saved with it
        tokenizer = from_pretrained(AutoTokenizer.from_pretrained, tokenizer_path, "tokenizer",
                                    trust_remote_code=trust_remote_code)
    return peft_model, tokenizer


def _unloaded_tensors(adapter: str, peft_model) -> list[str]:
    """The tensors of the adapter's weights file that peft loaded into no layer of the model
    (an adapter trained on another structure of the base, e.g. a text-only class)."""
    path = os.path.join(adapter, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        return []  # adapter_model.bin: peft's own loader checked what it could
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        saved = list(f.keys())
    # save_embedding_layers=True: every key the adapter could hold (resized embeddings too),
    # without peft's hub look-up of the base config ("auto")
    loaded = set(get_peft_model_state_dict(peft_model, save_embedding_layers=True))
    return [k for k in saved if k not in loaded]


def _processor(adapter: str, base: str, model, trust_remote_code: bool):
    """The processor to save with a merged vision-language model: the adapter's (the vision
    plugin saves it with the adapter), else the base's; None for a text-only model whose
    adapter has no processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .build import auto_model_class

    own = any(os.path.isfile(os.path.join(adapter, f)) for f in PROCESSOR_FILES)
    if not own and auto_model_class(model.config) is not AutoModelForImageTextToText:
        return None

    from fmtune.models import from_pretrained

    return from_pretrained(AutoProcessor.from_pretrained, adapter if own else base, "processor",
                           trust_remote_code=trust_remote_code)


def merge(adapter: str, out: str, base: str | None = None, dtype: str = "float32",
          trust_remote_code: bool = False, tokenizer_path: str | None = None,
          device_map: Any = None) -> str:
    """Merge a LoRA adapter into its base; save the full model + tokenizer to ``out`` (and, for
    a vision-language model, its processor: the folder reloads with
    ``AutoModelForImageTextToText`` + ``AutoProcessor``)."""
    check_new_dir(out)
    cfg = _adapter_config(adapter)
    if cfg.get("peft_type") != "LORA":
        raise ConfigError(f"{adapter}: a {cfg.get('peft_type')} adapter has no weights to merge "
                          "(prompt tuning prepends trained virtual tokens); serve it with peft")
    if cfg.get("alora_invocation_tokens"):
        raise ConfigError(f"{adapter}: an aLoRA adapter acts only after its invocation tokens; "
                          "merged into the weights it would act on every token")
    model, tokenizer = load_adapter_model(adapter, base, dtype, trust_remote_code,
                                          tokenizer_path, device_map)
    processor = _processor(adapter, _base_path(adapter, cfg, base), model.get_base_model(),
                           trust_remote_code)
    merged = model.merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)  # its tokenizer too
        if processor is None or tokenizer_path:
            tokenizer.save_pretrained(tmp)
    return out


def _split_key(key: str) -> tuple[str, str]:
    """``(module path, kind)`` for a saved adapter tensor name."""
    if key.endswith((".lora_A.weight", ".lora_B.weight")):
        return key.rsplit(".", 2)[0], "lora"
    if key.endswith((".lora_embedding_A", ".lora_embedding_B")):
        return key.rsplit(".", 1)[0], "lora"
    if key.endswith(".token_adapter.trainable_tokens_delta"):
        return key.rsplit(".", 2)[0], "new_tokens"
    if key.endswith(".base_layer.weight") and set(key.split(".")) & set(EMBEDDING_NAMES):
        # peft saves resized embeddings whole; vLLM takes the base rows from the base model
        return key.rsplit(".", 2)[0], "resized_base"
    return key, "other"


def export_vllm(adapter: str, out: str) -> dict:
    """Write ``adapter`` in the layout vLLM loads; return what was written. Refusals raise."""
    from safetensors.torch import load_file, save_file

    check_new_dir(out)
    cfg = _adapter_config(adapter)
    problems = vllm_refusals(cfg, _local_base_model_type(cfg))
    if problems:
        raise ConfigError(f"{adapter}: vLLM cannot serve this adapter: " + "; ".join(problems))
    weights_path = os.path.join(adapter, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights_path):
        raise ConfigError(f"{adapter}: no {ADAPTER_WEIGHTS}")
    tensors = load_file(weights_path)
    lora, new_rows, other, saved_rows = {}, {}, [], 0
    for key, value in tensors.items():
        module, kind = _split_key(key)
        if kind == "lora":
            lora[key] = value
        elif kind == "new_tokens":
            new_rows[module.rsplit(".", 1)[-1]] = value
        elif kind == "resized_base":
            saved_rows = max(saved_rows, value.shape[0])
        else:
            other.append(key)
    if other:
        raise ConfigError(f"{adapter}: vLLM cannot serve this adapter: it holds tensors that are "
                          f"not LoRA matrices ({', '.join(other[:5])})")
    if saved_rows and not new_rows and saved_rows > _base_vocab(adapter, cfg):
        raise ConfigError(f"{adapter}: vLLM cannot serve this adapter: its embeddings were resized "
                          "but no new-token rows were trained (trainable tokens), so vLLM would "
                          "have no embeddings for the added tokens; merge the adapter instead")
    written = {"lora_tensors": len(lora), "new_tokens": 0}
    indices = cfg.get("trainable_token_indices")
    embeddings = {}
    if new_rows:
        embeddings = _new_embeddings(adapter, cfg, indices, new_rows)
        written["new_tokens"] = int(embeddings["input_embeddings"].shape[0])
    vllm_cfg = {k: v for k, v in cfg.items() if k != "trainable_token_indices"}
    vllm_cfg["modules_to_save"] = None
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in lora.items()}, os.path.join(tmp, ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        if embeddings:
            save_file(embeddings, os.path.join(tmp, NEW_EMBEDDINGS), metadata={"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(vllm_cfg, f, indent=2)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(adapter, name)):
                shutil.copy(os.path.join(adapter, name), tmp)
    return written


def _local_base_model_type(cfg: dict) -> str | None:
    """The base's model type when its config is at hand (a folder, or in the cache); None
    otherwise (nothing is downloaded for it)."""
    from transformers import AutoConfig

    base = cfg.get("base_model_name_or_path")
    if not base:
        return None
    try:
        return AutoConfig.from_pretrained(base, local_files_only=True).model_type
    except Exception:  # noqa: BLE001 - not at hand, custom code, unreadable: not known
        return None


def _base_config(adapter: str, cfg: dict):
    """The base model's config, through the core's loader (clear error for an uncached id)."""
    from transformers import AutoConfig

    from fmtune.models import from_pretrained

    return from_pretrained(AutoConfig.from_pretrained, _base_path(adapter, cfg, None),
                           "base model config")


def _base_vocab(adapter: str, cfg: dict) -> int:
    return _base_config(adapter, cfg).get_text_config().vocab_size


def _new_embeddings(adapter: str, cfg: dict, indices, rows: dict) -> dict:
    """``input_embeddings`` / ``output_embeddings`` rows of the added tokens, in id order."""
    base_cfg = _base_config(adapter, cfg)
    vocab = base_cfg.get_text_config().vocab_size
    tied = bool(getattr(base_cfg, "tie_word_embeddings", False))
    if not isinstance(indices, dict):
        indices = {next(iter(rows)): indices}
    by_layer = {}
    for layer, ids in indices.items():
        leaf = layer.rsplit(".", 1)[-1]
        if sorted(ids) != list(range(vocab, vocab + len(ids))):
            raise ConfigError(f"{adapter}: vLLM takes only rows of tokens added after the base "
                              f"vocabulary ({vocab} tokens); trainable tokens {ids[:8]} of {leaf} "
                              "change base tokens: merge the adapter instead")
        order = sorted(range(len(ids)), key=lambda i: ids[i])
        by_layer[leaf] = rows[leaf][order]
    inputs = [v for k, v in by_layer.items() if k in INPUT_EMBEDDINGS]
    outputs = [v for k, v in by_layer.items() if k in OUTPUT_EMBEDDINGS]
    if len(inputs) != 1:
        raise ConfigError(f"{adapter}: cannot tell which trainable tokens are the input embeddings "
                          f"({', '.join(by_layer)})")
    if not outputs:
        if not tied:
            raise ConfigError(f"{adapter}: the new tokens' output-layer rows were not trained and "
                              "the base's embeddings are not tied")
        outputs = inputs
    return {"input_embeddings": inputs[0].clone().contiguous(),
            "output_embeddings": outputs[0].clone().contiguous()}  # tied: two copies on disk


def finish_saved_adapter(output_dir: str, config, base_dir: str | None = None) -> None:
    """Make a saved adapter self-contained: absolute base path, tokenizer path for prompt tuning."""
    path = os.path.join(output_dir, ADAPTER_CONFIG)
    cfg = _adapter_config(output_dir)
    base = base_dir or cfg.get("base_model_name_or_path") or config.model_name_or_path
    if base and os.path.isdir(base):
        base = os.path.abspath(base)
    cfg["base_model_name_or_path"] = base
    if cfg.get("tokenizer_name_or_path"):
        cfg["tokenizer_name_or_path"] = os.path.abspath(output_dir)
    write_json(path, cfg, sort_keys=True)
