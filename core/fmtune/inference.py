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

    from .models import fit_to_tokenizer
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
    return render_turns(tokenizer, [[{"role": "user", "content": t}] for t in texts],
                        chat_template, model_path, item="prompt")


def chat_template_problem(template: str) -> str | None:
    """Why the Jinja chat ``template`` cannot be compiled (transformers' sandboxed environment,
    as ``apply_chat_template`` compiles it), or None. Cheap: no torch, no rendering."""
    if not isinstance(template, str):
        return f"must be a string, got {type(template).__name__}"
    return chat_templates.problem(template)


def generate(model: Any, tokenizer: Any, texts: list[str], max_new_tokens: int = 64,
             add_special_tokens: bool = True, progress: bool = False) -> list[str]:
    """Greedy continuation of each text (the new text only, special tokens removed).

    ``add_special_tokens=False`` for texts rendered by a chat template (which has its own);
    ``progress`` shows a progress bar on stderr."""
    import sys

    import torch
    from tqdm.auto import tqdm

    if max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    outputs = []
    device = next(model.parameters()).device
    for text in tqdm(texts, desc="generating", unit="record", file=sys.stderr,
                     disable=not progress or len(texts) < 2, leave=False):
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
    from .records import record_where

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


# ------------------------------------------------------------- chat / metrics
#
# `fmtune evaluate --chat`: chat records ({"messages": [..., {"role": "assistant", ...}]}) are
# scored by rendering every turn before the last with the model's chat template (the one
# training saved with the tokenizer, or --chat_template) and the assistant's generation prompt,
# generating greedily, and comparing with the last (assistant) turn.

METRICS = ("exact_match", "contains", "regex")
METRIC_HELP = ("exact_match: the stripped output equals the reference; contains: the "
               "reference occurs in the output; regex: the reference is a Python regular "
               "expression found in the output (re.search; anchor it with ^...$)")


def chat_examples(records: list[dict], path: str | None = None,
                  field: str = "messages") -> list[tuple[list[dict], str]]:
    """``(turns before the answer, the answer)`` of each chat record; a record without the
    field, with turns that are not role/content mappings, or whose last turn is not the
    assistant's is a one-line :class:`ConfigError` naming the file, line and field."""
    from .records import chat_messages, record_where

    out = []
    for i, rec in enumerate(records):
        where = record_where(path or "data", rec, i)
        if field not in rec:
            hint = " (an input/output record: leave out --chat)" if "input" in rec else ""
            raise ConfigError(f"{where}: missing field {field!r}{hint}")
        turns = chat_messages(rec[field], where, field)
        if turns[-1]["role"] != "assistant":
            raise ConfigError(f"{where}: field {field!r}: the last turn must be the assistant's "
                              f"answer to score against, got role {turns[-1]['role']!r}")
        if len(turns) < 2:
            raise ConfigError(f"{where}: field {field!r}: no turn before the assistant's answer")
        out.append((turns[:-1], turns[-1]["content"]))
    return out


def check_metric(metric: str, references: list[str], wheres: list[str]) -> None:
    """``regex`` references must compile (checked before any model loads)."""
    import re

    if metric not in METRICS:
        raise ConfigError(f"--metric {metric!r}: choose from {', '.join(METRICS)}")
    if metric != "regex":
        return
    for ref, where in zip(references, wheres):
        try:
            re.compile(ref)
        except re.error as e:
            raise ConfigError(f"{where}: the reference is not a valid regular expression "
                              f"(--metric regex): {e}") from None


def matches(prediction: str, reference: str, metric: str) -> bool:
    import re

    if metric == "contains":
        return reference.strip() in prediction
    if metric == "regex":
        return re.search(reference, prediction) is not None
    return prediction.strip() == reference.strip()


def render_turns(tokenizer: Any, conversations: list[list[dict]],
                 chat_template: str | None = None, model_path: str = "the model",
                 item: str = "record") -> list[str]:
    """Each conversation rendered with the chat template and the assistant's generation
    prompt; an error names the ``item`` (record, prompt) by its number."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"--chat: the tokenizer of {model_path} has no chat template; pass "
                          "--chat_template")
    what = "--chat_template" if chat_template is not None else f"the chat template of {model_path}"
    why = chat_template_problem(chat_template) if chat_template is not None else None
    if why:
        raise ConfigError(f"{what}: {why}")
    out = []
    for i, turns in enumerate(conversations, 1):
        try:
            out.append(tokenizer.apply_chat_template(
                turns, tokenize=False, add_generation_prompt=True, chat_template=chat_template))
        except Exception as e:  # noqa: BLE001 - jinja2's errors, and what templates raise
            raise ConfigError(f"{what}: {item} {i}: {template_error(e)}") from None
    return out


def turn_end(tokenizer: Any, chat_template: str | None = None) -> str | None:
    """The text the chat template writes after an assistant's answer (``<|im_end|>`` for
    chatml), when it is not a special token that generation stops at or decoding drops: a
    chat answer ends there. None when the template writes nothing after it."""
    sentinel = "\u2063fmtune-answer\u2063"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": sentinel}],
            tokenize=False, chat_template=chat_template)
    except Exception:  # noqa: BLE001 - the prompts rendered; a template may refuse this one
        return None
    after = text.partition(sentinel)[2].strip()
    marker = after.split()[0] if after else ""
    return marker or None


def score(model: Any, tokenizer: Any, prompts: list[str], references: list[str],
          metric: str = "exact_match", max_new_tokens: int = 64,
          add_special_tokens: bool = True, stop: str | None = None
          ) -> tuple[float, list[str], list[bool]]:
    """``(accuracy, predictions, hits)`` of greedy outputs against the references; each
    output is cut at ``stop`` (a chat template's end of turn, :func:`turn_end`)."""
    preds = generate(model, tokenizer, prompts, max_new_tokens, add_special_tokens,
                     progress=True)
    if stop:
        preds = [p.split(stop, 1)[0] for p in preds]
    hits = [matches(p, r, metric) for p, r in zip(preds, references)]
    return (sum(hits) / len(hits) if hits else 0.0), preds, hits


# --------------------------------------------------------- evaluate's outputs


def task_plugin(flag: str = "--tasks") -> Any:
    """The installed plugin that owns the ``eval_tasks`` option (entry point group
    ``fmtune.implied_by``), loaded; it provides ``prepare_tasks`` (``fmtune evaluate
    --tasks``). None installed: a one-line error naming the distribution to install, from the
    catalog of first-party plugins (the core names no plugin)."""
    from . import plugins as plugin_mod

    found = plugin_mod.implied({"eval_tasks": ["tasks"]}, [], [])
    if not found:
        owner = plugin_mod.provider_of("eval_tasks")
        what = (f"plugin {owner[0]!r}, which is not installed: pip install {owner[1]}" if owner
                else "a plugin that runs lm-eval tasks, and none is installed")
        raise ConfigError(f"{flag} needs {what}")
    name = found[0][0]
    plugin = plugin_mod.load([name]).get_plugin(name)
    if not callable(getattr(plugin, "prepare_tasks", None)):
        raise ConfigError(f"{flag}: plugin {name!r} owns eval_tasks but has no prepare_tasks")
    return plugin


def write_record_scores(output_path: str, records: list[dict], references: list[str],
                        predictions: list[str], hits: list[bool], accuracy: float,
                        **about: Any) -> tuple[str, str]:
    """OUTPUT/records.jsonl (one line per record: where, prompt, reference, prediction,
    correct) and OUTPUT/records.json (the score, and ``about``: data, model, metric...), each
    written atomically; returns their paths."""
    import sys

    from .files import write_atomic, write_json
    from .records import record_where

    os.makedirs(output_path, exist_ok=True)
    data = str(about.get("data") or getattr(records, "path", "") or "data")
    lines = []
    for i, (rec, ref, pred, hit) in enumerate(zip(records, references, predictions, hits)):
        asked = rec.get("messages") if about.get("chat") else rec.get("input")
        lines.append(json.dumps({"record": record_where(data, rec, i), "prompt": asked,
                                 "reference": ref, "prediction": pred, "correct": hit},
                                ensure_ascii=False) + "\n")
    per_record = os.path.join(output_path, "records.jsonl")
    write_atomic(per_record, "".join(lines))
    summary = os.path.join(output_path, "records.json")
    write_json(summary, {**about, "score": accuracy, "correct": sum(hits), "total": len(hits),
                         "records": os.path.basename(per_record)}, ensure_ascii=False)
    print(f"fmtune: wrote {summary} and {per_record}", file=sys.stderr)
    return summary, per_record
