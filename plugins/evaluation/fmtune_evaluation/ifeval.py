"""IFEval prompts files: checked before anything runs, with lm-eval's own instruction registry.

A prompts file is JSONL (or a JSON list) in IFEval's format, one prompt per record::

    {"key": 1001, "prompt": "Write ... without commas.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}

``kwargs`` holds one mapping per instruction (the arguments of its checker; IFEval's own file
writes ``null`` for the unused ones). A record that lm-eval could not score is a one-line
error naming the file, the line and the field.
"""

from __future__ import annotations

from typing import Any

from fmtune.config import ConfigError
from fmtune.records import read_records, record_where

from .offline import seed_langdetect, use_punkt


def registry() -> dict[str, Any]:
    use_punkt()  # lm-eval's IFEval modules download punkt_tab at import when it is missing
    seed_langdetect()
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT

    return INSTRUCTION_DICT


def check_prompts(path: str) -> int:
    """The number of prompts in ``path``; a :class:`ConfigError` for the first bad record."""
    from fmtune.config import suggest

    known = registry()
    records = read_records(path)
    for i, rec in enumerate(records):
        where = record_where(path, rec, i)
        for name, kind in (("key", int), ("prompt", str), ("instruction_id_list", list),
                           ("kwargs", list)):
            if name not in rec:
                raise ConfigError(f"{where}: missing field {name!r} (an IFEval prompt has key, "
                                  "prompt, instruction_id_list and kwargs)")
            if not isinstance(rec[name], kind) or isinstance(rec[name], bool):
                raise ConfigError(f"{where}: field {name!r} must be {kind.__name__}, got "
                                  f"{type(rec[name]).__name__}")
        ids, kwargs = rec["instruction_id_list"], rec["kwargs"]
        if not ids:
            raise ConfigError(f"{where}: field 'instruction_id_list' is empty")
        if len(kwargs) != len(ids):
            raise ConfigError(f"{where}: field 'kwargs' has {len(kwargs)} entries for "
                              f"{len(ids)} instruction{'s' if len(ids) != 1 else ''} (one "
                              "mapping per instruction)")
        for n, (iid, args) in enumerate(zip(ids, kwargs), 1):
            if iid not in known:
                raise ConfigError(f"{where}: field 'instruction_id_list': unknown instruction "
                                  f"{iid!r}{suggest(str(iid), known)}")
            if not isinstance(args, dict):
                raise ConfigError(f"{where}: field 'kwargs' entry {n} must be a mapping, got "
                                  f"{type(args).__name__}")
            checker = known[iid](iid)
            try:  # as lm-eval's scoring does: None values dropped
                checker.build_description(**{k: v for k, v in args.items() if v})
            except (TypeError, ValueError, KeyError) as e:
                raise ConfigError(f"{where}: field 'kwargs' entry {n} ({iid}): "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                                  ) from None
    return len(records)


def verdicts(record: dict[str, Any], response: str) -> dict[str, Any]:
    """lm-eval's IFEval scoring of one ``response`` to one prompt record: the strict and loose
    verdicts per instruction and for the whole prompt (what its metrics average)."""
    registry()
    from lm_eval.tasks.ifeval.utils import process_results

    return process_results(record, [response])
