"""Public API for plugins: reading data files and records, reporting bad records, chat templates.

Documented in docs/plugins.md ("Utilities for plugins"); names listed there are stable within
a minor version. Importing this module is cheap (``datasets`` loads inside the functions).

It is also the core's default data path (the ``prepare_data`` hook of
:mod:`fmtune.default_plugins.data` calls :func:`build_dataset`): JSON/JSONL records,
tokenized with exact loss masks. Three record shapes, chosen by the options:

* ``input``/``output`` records (default): the input is masked (-100), the
  output and EOS are trained;
* ``dataset_text_field``: the whole text (+ EOS) is trained, or, with
  ``response_template``, only what follows the template;
* ``data_formatter_template``: each record is rendered from ``{{field}}``
  placeholders first, then treated like ``dataset_text_field``.

Prompt and completion are tokenized so that no token spans the boundary: the
joint tokenization is used when the prompt's own tokens are a prefix of it,
otherwise prompt and completion are tokenized separately and concatenated.
The data plugin (``plugins/data_handlers``) replaces this with many more
formats.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .chat_templates import markers as chat_template_markers
from .chat_templates import names as chat_template_names
from .chat_templates import resolve as resolve_chat_template
from .chat_templates import template_error
from .config import ConfigError
from .files import decode_utf8, folder_problem, read_json_object, restart_jsonl, write_json
from .truncation import char_budget, cut

if TYPE_CHECKING:
    from .config import Config

__all__ = ["IGNORE", "Counts", "DataError", "char_budget", "chat_messages",
           "chat_template_markers", "chat_template_names", "cut", "folder_problem", "join", "missing_eval_data", "read_json_object", "read_records",
           "record_where", "resolve_chat_template", "restart_jsonl", "template_error",
           "write_json"]

log = logging.getLogger("fmtune")
IGNORE = -100
_PLACEHOLDER = re.compile(r"\{\{\s*([^{}\s]+)\s*\}\}")


class DataError(ConfigError):
    """Bad training data: names the file, the record and the field (one line, exit 2)."""


OTHER_FORMATS = (".arrow", ".parquet", ".csv", ".tsv", ".feather")


class Records(list):
    """The records of one file (a list), with the file's ``path`` for error messages."""

    path: str = ""


def read_records(path: str) -> list[dict[str, Any]]:
    """Records of a .json (list of objects) or .jsonl file; errors name file and line. The list
    carries the file's ``path``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: data file not found")
    if p.suffix.lower() in OTHER_FORMATS:
        raise DataError(f"{path}: the core reads JSON and JSONL records only; a {p.suffix} file "
                        "needs a data plugin that reads it (`fmtune plugins` lists the installed "
                        "ones; the data plugin a file type asks for is activated when installed)")
    try:
        text = decode_utf8(p.read_bytes(), path)
    except ValueError as e:
        raise DataError(str(e)) from None
    records = Records()
    records.path = str(path)
    if p.suffix == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        for i, rec in enumerate(data, 1):
            if not isinstance(rec, dict):
                raise DataError(f"{path}: record {i}: expected an object, got {type(rec).__name__}")
            records.append(rec)
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected an object, got {type(rec).__name__}")
            rec["__line__"] = lineno
            records.append(rec)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def record_where(path: str, rec: dict, index: int) -> str:
    """Where a record is, for error messages: ``path:line`` (JSONL) or ``path: record N``."""
    line = rec.get("__line__")
    return f"{path}:{line}" if line else f"{path}: record {index + 1}"


def chat_messages(value: Any, where: str, field: str) -> list[dict]:
    """A record's list of chat messages checked: a non-empty list of objects whose ``role`` and
    ``content`` are strings (copies returned); anything else is a one-line :class:`DataError`
    naming ``where`` (see :func:`record_where`), the field and the message number."""
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else type(value).__name__
        raise DataError(f"{where}: field {field!r} must be a non-empty list of messages, "
                        f"got {got}")
    out = []
    for k, msg in enumerate(value, 1):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: field {field!r} message {k}: expected an object with "
                            f"role and content, got {type(msg).__name__}")
        for key in ("role", "content"):
            if not isinstance(msg.get(key), str):
                got = "missing" if key not in msg else f"a {type(msg[key]).__name__}"
                raise DataError(f"{where}: field {field!r} message {k}: {key!r} must be a "
                                f"string ({got})")
        out.append(dict(msg))
    return out


def _field(path: str, rec: dict, index: int, name: str) -> str:
    if name not in rec:
        raise DataError(f"{record_where(path, rec, index)}: missing field {name!r}"
                        f"{_chat_hint(rec)}")
    value = rec[name]
    if not isinstance(value, str):
        raise DataError(f"{record_where(path, rec, index)}: field {name!r} must be a string, "
                        f"got {type(value).__name__}")
    return value


def _chat_hint(rec: dict) -> str:
    """For a chat record (a list of role/content turns) given to the core's reader, which reads
    input/output and text records: the plugin that reads chat data, found in the catalog of
    first-party plugins by the option it owns (the core names no plugin)."""
    turns = [k for k, v in rec.items() if isinstance(v, list) and v and isinstance(v[0], dict)
             and "role" in v[0]]
    if not turns:
        return ""
    from .plugins import provider_of

    found = provider_of("dataset_conversation_field")
    plugin = f"--plugins {found[0]}" if found else "a data plugin"
    return (f" (it is a chat record: {turns[0]!r} holds the turns; chat data needs {plugin}, "
            "which fms-hf-tuning's chat flags --instruction_template/--dataset_conversation_field "
            "also activate)")


def render(template: str, path: str, rec: dict, index: int) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in rec:
            raise DataError(f"{record_where(path, rec, index)}: data_formatter_template field "
                            f"{name!r} missing from the record")
        return str(rec[name])
    return _PLACEHOLDER.sub(sub, template)


def join(prompt: str, completion: str) -> str:
    """The separator fms-hf-tuning puts between input and output: one space if neither has one."""
    if prompt and completion and not prompt.endswith((" ", "\n", "\t")) \
            and not completion.startswith((" ", "\n", "\t")):
        return " "
    return ""


@dataclass
class Counts:
    """What became of a file's records: ``kept``, ``truncated`` and ``dropped`` (reason ->
    count); ``line()`` says it in one line."""

    kept: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def line(self) -> str:
        dropped = sum(self.dropped.values())
        why = (" (" + "; ".join(f"{n} {r}" for r, n in self.dropped.items()) + ")") if dropped else ""
        return (f"{self.kept} kept, {self.truncated} truncated at max_seq_length, "
                f"{dropped} dropped{why}")


def tokenize_pairs(tokenizer, pairs: list[tuple[str, str]], max_len: int, counts: Counts,
                   eos: bool = True) -> dict[str, list]:
    """Tokenize (prompt, completion) pairs: prompt masked, completion (+EOS) trained."""
    eos_id = tokenizer.eos_token_id
    out: dict[str, list] = {"input_ids": [], "labels": [], "attention_mask": []}
    if not pairs:
        return out
    budget = char_budget(tokenizer, max_len)  # a 50 MB record is not tokenized whole
    prompts = [cut(p, budget) for p, _ in pairs]
    fulls = [cut(p + c, budget) for p, c in pairs]
    p_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"] if any(prompts) else [[] for _ in pairs]
    f_ids = tokenizer(fulls, add_special_tokens=True)["input_ids"]
    for (prompt, completion), pi, fi in zip(pairs, p_ids, f_ids):
        if not prompt:
            pi, ci = [], fi
        elif fi[: len(pi)] == pi:
            ci = fi[len(pi):]
        else:
            ci = tokenizer(cut(completion, budget), add_special_tokens=False)["input_ids"]
        if eos and eos_id is not None and (not ci or ci[-1] != eos_id):
            ci = ci + [eos_id]
        ids = pi + ci
        labels = [IGNORE] * len(pi) + ci
        if len(ids) > max_len:
            ids, labels = ids[:max_len], labels[:max_len]
            if all(l == IGNORE for l in labels):
                counts.drop("no trained token left after truncation to max_seq_length")
                continue
            counts.truncated += 1
        if not ci:
            counts.drop("empty completion")
            continue
        counts.kept += 1
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["attention_mask"].append([1] * len(ids))
    return out


def to_pairs(config, path: str, records: list[dict], counts: Counts) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    text_mode = config.dataset_text_field or config.data_formatter_template
    for i, rec in enumerate(records):
        if not text_mode:
            prompt = _field(path, rec, i, "input")
            completion = _field(path, rec, i, "output")
            pairs.append((prompt, join(prompt, completion) + completion))
            continue
        if config.data_formatter_template:
            text = render(config.data_formatter_template, path, rec, i)
        else:
            text = _field(path, rec, i, config.dataset_text_field)
        tpl = config.response_template
        if not tpl:
            pairs.append(("", text))
            continue
        at = text.find(tpl)
        if at < 0:
            counts.drop("response_template not found")
            continue
        cut = at + len(tpl)
        pairs.append((text[:cut], text[cut:]))
    return pairs


def build_dataset(config, tokenizer, path: str):
    from datasets import Dataset

    counts = Counts()
    records = read_records(path)
    pairs = to_pairs(config, path, records, counts)
    columns = tokenize_pairs(tokenizer, pairs, config.max_seq_length, counts)
    for reason, n in counts.dropped.items():
        log.warning("%s: dropped %d of %d records: %s", path, n, len(records), reason)
    if counts.truncated:
        log.warning("%s: %d records truncated to max_seq_length=%d", path, counts.truncated,
                    config.max_seq_length)
    if not counts.kept:
        reasons = "; ".join(f"{n} {r}" for r, n in counts.dropped.items())
        raise DataError(f"{path}: no usable records ({reasons})")
    log.info("%s: %d examples", path, counts.kept)
    return Dataset.from_dict(columns)


def missing_eval_data(config: Config, *data_options: str) -> str | None:
    """The problem when ``eval_strategy`` evaluates but none of ``data_options`` (default:
    ``validation_data_path``) is set, for ``validate_config``; None when fine."""
    strategy = config.get("eval_strategy") or "no"
    options = data_options or ("validation_data_path",)
    if strategy == "no" or any(config.get(name) for name in options):
        return None
    return f"eval_strategy={strategy} needs {' or '.join(options)}"
