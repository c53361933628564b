"""Loading a trained model (full or adapter folder) and greedy generation."""

from __future__ import annotations

import json
import os
from typing import Any

from . import chat_templates
from .chat_templates import template_error
from .config import ConfigError


def load_for_inference(path: str, trust_remote_code: bool = False,
                       base_model_name_or_path: str | None = None):
    """``(model, tokenizer)`` from a full-model folder or a peft adapter folder.

    Whatever a library prints while loading (gptqmodel prints its banner and kernel choice on
    stdout) goes to stderr: `fmtune generate` keeps stdout for the generated text."""
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        return _load(path, trust_remote_code, base_model_name_or_path)


def _load(path: str, trust_remote_code: bool, base_override: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hub import from_pretrained

    if not os.path.isdir(path):
        raise ConfigError(f"{path}: no such model folder")
    adapter_cfg = os.path.join(path, "adapter_config.json")
    if base_override and not os.path.isfile(adapter_cfg):
        raise ConfigError(f"--base_model_name_or_path: {path} is not an adapter folder (no "
                          "adapter_config.json); only an adapter's base can be replaced")
    if base_override:
        model, tokenizer = _adapter_on(path, base_override, trust_remote_code)
    elif os.path.isfile(adapter_cfg):
        from peft import AutoPeftModelForCausalLM

        with open(adapter_cfg, encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
        tok_src = path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else base
        if not tok_src:
            raise ConfigError(f"{path}: adapter folder has no tokenizer and no base model path")
        tokenizer = from_pretrained(AutoTokenizer.from_pretrained, tok_src, "tokenizer",
                                    trust_remote_code=trust_remote_code)
        from .hub import quant_method, without_unused_gptqmodel

        try:
            with without_unused_gptqmodel(quant_method(base) if base and os.path.isdir(base)
                                          else None):
                model = AutoPeftModelForCausalLM.from_pretrained(
                    path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            if not trust_remote_code and "trust_remote_code" in str(e):
                from .hub import remote_code_refused

                raise ConfigError(remote_code_refused("base model", str(base))) from None
            raise ConfigError(f"{path}: cannot load the adapter or its base model {base}: {e}") from None
    elif os.path.isfile(os.path.join(path, "config.json")):
        tokenizer = from_pretrained(AutoTokenizer.from_pretrained, path, "tokenizer",
                                    trust_remote_code=trust_remote_code)
        model = from_pretrained(AutoModelForCausalLM.from_pretrained, path, "model",
                                trust_remote_code=trust_remote_code)
    else:
        raise ConfigError(f"{path}: neither a model folder (config.json) nor an adapter folder "
                          "(adapter_config.json)")
    model.eval()
    return model, tokenizer


def _adapter_on(path: str, base: str, trust_remote_code: bool):
    """The adapter in ``path`` over ``base`` instead of the base its adapter_config.json names
    (fms-hf-tuning's ``run_inference.py --base_model_name_or_path``: a machine-specific path
    saved at training time). Nothing on disk is changed."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .default_plugins.model import fit_to_tokenizer
    from .hub import from_pretrained, quant_method, without_unused_gptqmodel

    tok_src = path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else base
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, tok_src, "tokenizer",
                                trust_remote_code=trust_remote_code)
    model = from_pretrained(AutoModelForCausalLM.from_pretrained, base, "base model",
                            trust_remote_code=trust_remote_code)
    fit_to_tokenizer(model, tokenizer)
    try:
        with without_unused_gptqmodel(quant_method(model)):
            return PeftModel.from_pretrained(model, path), tokenizer
    except (OSError, ValueError, RuntimeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: the adapter does not fit the base model {base}: "
                          f"{first}") from None


def read_prompts(path: str) -> list[str]:
    """Prompts for ``fmtune generate --text_file``.

    ``.json``: a list of strings or of ``{"input": ...}`` objects; ``.jsonl``: one JSON string
    or ``{"input": ...}`` object per line; any other file: one prompt per line (blank lines
    skipped, the line break removed). Errors name the file and the line or record.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: text file not found")
    from .files import decode_utf8

    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = decode_utf8(raw, path)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    def one(item: Any, where: str) -> str:
        if isinstance(item, dict):
            if "input" not in item:
                raise ConfigError(f"{where}: missing field 'input'")
            item = item["input"]
        if not isinstance(item, str):
            raise ConfigError(f"{where}: expected a string or an object with a string 'input', "
                              f"got {type(item).__name__}")
        return item

    prompts: list[str] = []
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(data, list):
            raise ConfigError(f"{path}: expected a JSON list of strings or of {{\"input\"}} objects")
        prompts = [one(item, f"{path}: record {i}") for i, item in enumerate(data, 1)]
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
                prompts.append(one(item, f"{path}:{lineno}"))
            else:
                prompts.append(line)
    if not prompts:
        raise ConfigError(f"{path}: no prompts")
    return prompts


def render_chat(tokenizer: Any, texts: list[str], chat_template: str | None = None,
                model_path: str = "the model") -> list[str]:
    """Each text as one user message, rendered with the chat template and the assistant's
    generation prompt (``--chat``)."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"--chat: the tokenizer of {model_path} has no chat template; pass "
                          "--chat_template")
    what = "--chat_template" if chat_template is not None else f"the chat template of {model_path}"
    why = chat_template_problem(chat_template) if chat_template is not None else None
    if why:
        raise ConfigError(f"{what}: {why}")
    out = []
    for i, text in enumerate(texts, 1):
        try:
            out.append(tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True,
                chat_template=chat_template))
        except Exception as e:  # noqa: BLE001 - jinja2's errors, and what templates raise
            raise ConfigError(f"{what}: prompt {i}: {template_error(e)}") from None
    return out


def chat_template_problem(template: str) -> str | None:
    """Why the Jinja chat ``template`` cannot be compiled (transformers' sandboxed environment,
    as ``apply_chat_template`` compiles it), or None. Cheap: no torch, no rendering."""
    if not isinstance(template, str):
        return f"must be a string, got {type(template).__name__}"
    return chat_templates.problem(template)


def generate(model: Any, tokenizer: Any, texts: list[str], max_new_tokens: int = 64,
             add_special_tokens: bool = True) -> list[str]:
    """Greedy continuation of each text (the new text only, special tokens removed).

    ``add_special_tokens=False`` for texts rendered by a chat template (which has its own)."""
    import torch

    if max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    outputs = []
    device = next(model.parameters()).device
    for text in texts:
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens).to(device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        new = out[0, enc["input_ids"].shape[1]:]
        outputs.append(tokenizer.decode(new, skip_special_tokens=True))
    return outputs


def exact_match(model: Any, tokenizer: Any, records: list[dict], max_new_tokens: int = 64):
    """Fraction of ``{"input", "output"}`` records whose greedy output equals ``output``;
    a record without string ``input`` and ``output`` is a :class:`ConfigError` naming it (before
    anything is generated)."""
    check_records(records, getattr(records, "path", None))
    preds = generate(model, tokenizer, [r["input"] for r in records], max_new_tokens)
    hits = [p.strip() == str(r["output"]).strip() for p, r in zip(preds, records)]
    return sum(hits) / len(records), preds


def check_records(records: list[dict], path: str | None = None) -> None:
    """Every record has string ``input`` and ``output`` fields (what ``evaluate`` compares);
    otherwise a one-line :class:`ConfigError` naming the record (line) and the field."""
    from .default_plugins.data import record_where

    for i, rec in enumerate(records):
        for name in ("input", "output"):
            if isinstance(rec.get(name), str):
                continue
            where = record_where(path or "data", rec, i)
            if name in rec:
                raise ConfigError(f"{where}: field {name!r} must be a string, got "
                                  f"{type(rec[name]).__name__}")
            hint = " (a chat record: evaluate compares input/output records)" if any(
                isinstance(v, list) for v in rec.values()) else ""
            raise ConfigError(f"{where}: missing field {name!r}{hint}")
