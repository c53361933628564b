"""Small file helpers shared by the core and plugins: nothing is ever half-written."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename. A ``path`` that is a
    folder is a :class:`~fmtune.config.ConfigError` (nothing written); the temporary file does
    not outlive a failed write."""
    if os.path.isdir(path):
        from .config import ConfigError

        raise ConfigError(f"{path}: is a folder; give the path of a file to write")
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path: str, data: Any, **dump_kwargs: Any) -> None:
    """``json.dump`` (indented) to ``path`` atomically."""
    write_atomic(path, json.dumps(data, indent=2, **dump_kwargs))


def folder_problem(path: str) -> str | None:
    """Why a run cannot write into the folder ``path`` (creating it if needed), checked without
    writing anything; None when it can. The reason reads after ``"{path}: "``."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            return "exists and is not a folder"
        return None if os.access(path, os.W_OK | os.X_OK) else "the folder is not writable"
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"cannot create it, {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot create it, {existing} is not writable"
    return None


def decode_utf8(raw: bytes, path: Any) -> str:
    """``raw`` (a file's bytes) as text; bytes that are not UTF-8 raise ValueError with the
    one-line message ``PATH:LINE: not UTF-8 text (byte 0xNN at offset N); convert ...``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                         f"{e.start}); convert the file to UTF-8") from None


def read_json_object(path: str) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def restart_jsonl(path: str, keep_until: int | None, step_of) -> None:
    """Start the JSON-lines file ``path`` over; when resuming (``keep_until`` is the resumed
    step), keep its lines whose ``step_of(record)`` is at most that step, in order (lines that
    do not parse are dropped). Written atomically."""
    kept: list[str] = []
    if keep_until is not None and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    if step_of(json.loads(line)) <= keep_until:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue
    write_atomic(path, "".join(kept))
