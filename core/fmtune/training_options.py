"""Every field of the installed transformers' ``TrainingArguments`` as a fmtune option.

The option table (name, type, default, choices, help) is what transformers' own
``HfArgumentParser(TrainingArguments)`` builds, so a field means on fmtune's command line what
it means on fms-hf-tuning's. Building it imports torch (seconds), so ``--help`` and option
parsing read a JSON table instead: the one shipped in this package when it was made for the
installed transformers version (``training_options.json``, written by
``python -m fmtune.training_options``), else one built once and cached under
``$XDG_CACHE_HOME/fmtune/`` (``~/.cache/fmtune``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger("fmtune")

SHIPPED = Path(__file__).with_name("training_options.json")
GROUP = "TrainingArguments"


def transformers_version() -> str:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "none"


def _jsonable(value: Any) -> Any:
    value = getattr(value, "value", value)  # enums
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def build() -> dict[str, Any]:
    """The table from the installed transformers (imports torch)."""
    import argparse

    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(TrainingArguments)
    dict_fields = set(getattr(TrainingArguments, "_VALID_DICT_FIELDS", ()))
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.type is None:
            continue  # --help, and the --no_X complements of True-default booleans
        kind = getattr(action.type, "__name__", "")
        if action.dest in dict_fields or kind == "dict":
            type_name = "dict"
        elif action.nargs == "+":
            type_name = "list"
        elif kind == "string_to_bool":
            type_name = "bool"
        elif action.type in (int, float):
            type_name = kind
        else:
            type_name = "str"
        choices = [_jsonable(c) for c in action.choices] if action.choices else None
        rows.append({"name": action.dest, "type": type_name, "default": _jsonable(action.default),
                     "choices": choices, "help": " ".join((action.help or "").split())})
    return {"transformers": transformers_version(), "options": rows}


def _cache_file(version: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fmtune"
    return root / f"training_options-{version}.json"


@functools.cache
def table() -> list[dict[str, Any]]:
    """The rows for the installed transformers version (shipped, cached, or built now)."""
    version = transformers_version()
    for path in (SHIPPED, _cache_file(version)):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("transformers") == version:
            return data["options"]
    log.info("building the TrainingArguments option table for transformers %s (once)", version)
    data = build()
    path = _cache_file(version)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: rebuilt next time, still correct
        log.info("could not cache the option table in %s: %s", path, e)
    return data["options"]


def names() -> set[str]:
    return {row["name"] for row in table()}


def register_all(register, skip: set[str]) -> None:
    """Register every row except ``skip`` (options the caller registers itself) as a weak option:
    a plugin that registers the same name takes it over."""
    for row in table():
        if row["name"] in skip:
            continue
        help_text = row["help"] or f"transformers TrainingArguments.{row['name']}."
        register(row["name"], row["type"], row["default"], help_text, choices=row["choices"],
                 weak=True)


def main() -> None:
    """Write the shipped table for the installed transformers (run after `make lock`)."""
    data = build()
    SHIPPED.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {SHIPPED} for transformers {data['transformers']}: "
          f"{len(data['options'])} options")


if __name__ == "__main__":
    main()
