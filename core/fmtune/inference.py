"""Loading a trained model (full or adapter folder) and greedy generation."""

from __future__ import annotations

import json
import os
from typing import Any

from .config import ConfigError


def load_for_inference(path: str):
    """``(model, tokenizer)`` from a full-model folder or a peft adapter folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hub import from_pretrained

    if not os.path.isdir(path):
        raise ConfigError(f"{path}: no such model folder")
    adapter_cfg = os.path.join(path, "adapter_config.json")
    if os.path.isfile(adapter_cfg):
        from peft import AutoPeftModelForCausalLM

        with open(adapter_cfg, encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
        tok_src = path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else base
        if not tok_src:
            raise ConfigError(f"{path}: adapter folder has no tokenizer and no base model path")
        tokenizer = from_pretrained(AutoTokenizer.from_pretrained, tok_src, "tokenizer")
        try:
            model = AutoPeftModelForCausalLM.from_pretrained(path)
        except OSError as e:
            raise ConfigError(f"{path}: cannot load the adapter or its base model {base}: {e}") from None
    elif os.path.isfile(os.path.join(path, "config.json")):
        tokenizer = from_pretrained(AutoTokenizer.from_pretrained, path, "tokenizer")
        model = from_pretrained(AutoModelForCausalLM.from_pretrained, path, "model")
    else:
        raise ConfigError(f"{path}: neither a model folder (config.json) nor an adapter folder "
                          "(adapter_config.json)")
    model.eval()
    return model, tokenizer


def generate(model: Any, tokenizer: Any, texts: list[str], max_new_tokens: int = 64) -> list[str]:
    """Greedy continuation of each text (the new text only, special tokens removed)."""
    import torch

    outputs = []
    device = next(model.parameters()).device
    for text in texts:
        enc = tokenizer(text, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        new = out[0, enc["input_ids"].shape[1]:]
        outputs.append(tokenizer.decode(new, skip_special_tokens=True))
    return outputs


def exact_match(model: Any, tokenizer: Any, records: list[dict], max_new_tokens: int = 64):
    """Fraction of ``{"input", "output"}`` records whose greedy output equals ``output``."""
    preds = generate(model, tokenizer, [r["input"] for r in records], max_new_tokens)
    hits = [p.strip() == str(r["output"]).strip() for p, r in zip(preds, records)]
    return sum(hits) / len(records), preds
