"""Preference data: ``prompt`` / ``chosen`` / ``rejected`` records, tokenized for TRL.

Records come from JSON or JSONL files (the core's reader: errors name the file
and line). Each of the three fields is plain text or a list of chat messages
(``{"role", "content"}``):

* **text**: ``prompt + chosen`` and ``prompt + rejected`` as written (TRL's
  convention: put the separating space where you want it); EOS is appended to
  each completion;
* **chat**: rendered with the tokenizer's chat template (or ``--chat_template``);
  the prompt with ``add_generation_prompt=True``, each completion as the turns
  that follow it. When one field is a list of messages, a plain-text prompt
  becomes one user message and a plain-text completion one assistant message.
  Without ``prompt``, chat ``chosen``/``rejected`` conversations are split at
  their longest common prefix of turns (TRL's ``extract_prompt``).

The rows hold TRL's pre-tokenized columns ``prompt_ids``, ``chosen_ids`` and
``rejected_ids``. The prompt is tokenized alone, exactly as a model sees it at
inference; a completion's tokens are the joint tokenization's tail when the
prompt's tokens are a prefix of it, otherwise the completion tokenized alone
(no token spans the boundary). Completions are cut so that prompt + completion
fits ``max_seq_length``; a pair whose prompt alone fills it is dropped, as is
a pair whose chosen and rejected tokens are equal (nothing to prefer).
"""

from __future__ import annotations

import logging
from typing import Any

from fmtune.records import Counts, DataError, chat_messages, read_records, record_where

log = logging.getLogger("fmtune")
FIELDS = ("prompt", "chosen", "rejected")


def parse_record(path: str, rec: dict, index: int) -> tuple[bool, dict[str, Any]]:
    """``(is_chat, {"prompt", "chosen", "rejected"})`` with strings or message lists."""
    where = record_where(path, rec, index)
    values: dict[str, Any] = {}
    for name in FIELDS:
        if name not in rec:
            if name == "prompt":
                continue
            raise DataError(f"{where}: missing field {name!r}")
        value = rec[name]
        if isinstance(value, dict):  # a single message
            value = [value]
        if isinstance(value, list):
            values[name] = chat_messages(value, where, name)
        elif isinstance(value, str):
            values[name] = value
        else:
            raise DataError(f"{where}: field {name!r} must be a string or a list of chat messages, "
                            f"got {type(value).__name__}")
    chat = any(isinstance(v, list) for v in values.values())
    if "prompt" not in values:
        if not chat:
            raise DataError(f"{where}: missing field 'prompt' (only chat conversations can leave "
                            "the prompt implicit in chosen/rejected)")
        from trl.data_utils import extract_prompt

        if not (isinstance(values["chosen"], list) and isinstance(values["rejected"], list)):
            raise DataError(f"{where}: without 'prompt', 'chosen' and 'rejected' must both be "
                            "chat conversations")
        values = extract_prompt(values)
        if not values["prompt"]:
            raise DataError(f"{where}: 'chosen' and 'rejected' share no first turns to use as "
                            "the prompt; add a 'prompt' field")
    if chat:
        for name, role in (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant")):
            if isinstance(values[name], str):
                values[name] = [{"role": role, "content": values[name]}]
    return chat, values


def _completion_ids(tokenizer, prompt_ids: list[int], full_ids: list[int], completion: str) -> list[int]:
    """The joint tokenization's tail when it starts with the prompt's tokens, else the
    completion tokenized alone (so no token spans the boundary)."""
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return full_ids[len(prompt_ids):]
    return tokenizer(completion, add_special_tokens=False)["input_ids"]


def tokenize_record(tokenizer, chat: bool, values: dict[str, Any], chat_template: str | None,
                    where: str) -> dict[str, list[int]]:
    """TRL's ``prompt_ids``/``chosen_ids``/``rejected_ids`` for one parsed record; an error the
    chat template raises for it is a :class:`DataError` naming the record."""
    try:
        return _tokenize_record(tokenizer, chat, values, chat_template, where)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - jinja2's errors, and what templates raise
        import jinja2

        if not isinstance(e, jinja2.TemplateError):
            raise
        from fmtune.records import template_error

        what = "--chat_template" if chat_template is not None else "the tokenizer's chat template"
        raise DataError(f"{where}: {what}: {template_error(e)}") from None


def _tokenize_record(tokenizer, chat: bool, values: dict[str, Any], chat_template: str | None,
                     where: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    if chat:
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where}: chat messages need a chat template: the tokenizer has "
                            "none; set --chat_template")
        prompt_text = tokenizer.apply_chat_template(
            values["prompt"], tokenize=False, add_generation_prompt=True, chat_template=chat_template)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        out["prompt_ids"] = prompt_ids
        for name in ("chosen", "rejected"):
            full_text = tokenizer.apply_chat_template(
                values["prompt"] + values[name], tokenize=False, chat_template=chat_template)
            if not full_text.startswith(prompt_text):
                raise DataError(f"{where}: field {name!r}: the chat template renders the prompt "
                                "differently when the answer follows it, so the trained answer "
                                "would not continue the prompt seen at inference")
            full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
            out[f"{name}_ids"] = _completion_ids(tokenizer, prompt_ids, full_ids,
                                                 full_text[len(prompt_text):])
        return out
    prompt = values["prompt"]
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    out["prompt_ids"] = prompt_ids
    eos = tokenizer.eos_token_id
    for name in ("chosen", "rejected"):
        completion = values[name]
        full_ids = tokenizer(prompt + completion, add_special_tokens=True)["input_ids"]
        ids = _completion_ids(tokenizer, prompt_ids, full_ids, completion)
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        out[f"{name}_ids"] = ids
    return out


def build_preference_dataset(config, tokenizer, path: str):
    """A ``datasets.Dataset`` of TRL's pre-tokenized preference columns, and its counts."""
    from datasets import Dataset

    records = read_records(path)
    counts = Counts()
    max_len = config.max_seq_length
    from fmtune.records import resolve_chat_template

    chat_template = resolve_chat_template(config.get("chat_template"))
    columns: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for i, rec in enumerate(records):
        where = record_where(path, rec, i)
        chat, values = parse_record(path, rec, i)
        row = tokenize_record(tokenizer, chat, values, chat_template, where)
        for name in ("chosen_ids", "rejected_ids"):
            if not row[name]:
                raise DataError(f"{where}: field {name.removesuffix('_ids')!r} has no tokens")
        room = max_len - len(row["prompt_ids"])
        if room <= 0:
            counts.drop("prompt fills max_seq_length")
            continue
        if len(row["chosen_ids"]) > room or len(row["rejected_ids"]) > room:
            counts.truncated += 1
            row["chosen_ids"] = row["chosen_ids"][:room]
            row["rejected_ids"] = row["rejected_ids"][:room]
        if row["chosen_ids"] == row["rejected_ids"]:
            counts.drop("chosen equals rejected")
            continue
        counts.kept += 1
        for name, ids in row.items():
            columns[name].append(ids)
    for reason, n in counts.dropped.items():
        log.warning("%s: dropped %d of %d records: %s", path, n, len(records), reason)
    if counts.truncated:
        log.warning("%s: %d records truncated to max_seq_length=%d", path, counts.truncated, max_len)
    if not counts.kept:
        raise DataError(f"{path}: no usable preference records ({counts.line()})")
    log.info("%s: %d preference pairs", path, counts.kept)
    if chat_template is not None and tokenizer.chat_template != chat_template:
        tokenizer.chat_template = chat_template  # saved with the model: generate --chat uses it
    return Dataset.from_dict(columns), counts


def prepare(config, tokenizer):
    """``(train, eval_or_None, {split: Counts})``."""
    train, train_counts = build_preference_dataset(config, tokenizer, config.training_data_path)
    evalset, counts = None, {"train": train_counts}
    if config.validation_data_path:
        evalset, counts["validation"] = build_preference_dataset(config, tokenizer,
                                                                 config.validation_data_path)
    return train, evalset, counts
