"""Turning ``training_data_path`` values into a ``datasets.Dataset``.

Accepts JSON, JSONL, Parquet, Arrow and CSV files, folders of them, folders written by
``save_to_disk``, globs, several paths (a list, or comma-separated), and Hugging Face
dataset ids (from the local cache; no download when ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from fmtune.config import ConfigError

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow",
            ".csv": "csv"}


class DataError(ConfigError):
    """Bad data: the message names the file, the record and the field."""


def split_paths(paths: Any) -> list[str]:
    if paths is None:
        return []
    if isinstance(paths, str):
        paths = [p for p in paths.split(",")]
    return [str(p).strip() for p in paths if str(p).strip()]


# what ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` write next to the Arrow files
SAVED_DATASET = ("state.json", "dataset_info.json")
SAVED_DICT = "dataset_dict.json"


def saved_kind(folder: str) -> str | None:
    """"dataset" or "dict" for a folder written by ``save_to_disk``, else None."""
    if all(os.path.isfile(os.path.join(folder, f)) for f in SAVED_DATASET):
        return "dataset"
    if os.path.isfile(os.path.join(folder, SAVED_DICT)):
        return "dict"
    return None


def _saved_arrow_files(folder: str) -> list[str]:
    """The Arrow files of a ``save_to_disk`` folder, in the order its state.json lists them."""
    try:
        with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
            names = [d["filename"] for d in json.load(f)["_data_files"]]
        return [os.path.join(folder, n) for n in names]
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".arrow"))


def expand(path: str) -> list[str]:
    """Files behind a path, folder or glob (sorted); [] when none exist. A ``save_to_disk``
    folder inside a folder counts with its Arrow files only, not its JSON metadata."""
    if any(c in path for c in "*?["):
        return sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    if os.path.isdir(path):
        found = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            if saved_kind(root) == "dataset":
                found += _saved_arrow_files(root)
                dirs[:] = []
                continue
            found += sorted(os.path.join(root, f) for f in files
                            if os.path.splitext(f)[1] in BUILDERS and
                            not (f == SAVED_DICT and saved_kind(root) == "dict"))
        return found if saved_kind(path) else sorted(found)
    return [path] if os.path.isfile(path) else []


def load_saved(folder: str, streaming: bool = False, split: str | None = None):
    """A ``save_to_disk`` folder as the dataset it holds (of a DatasetDict: ``split``, by
    default "train"), without the format it was saved with."""
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(folder)
    except Exception as e:  # noqa: BLE001 - datasets/pyarrow raise many types
        raise DataError(f"{folder}: cannot be read as a save_to_disk folder: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if isinstance(ds, DatasetDict):
        want = split or "train"
        if want not in ds:
            raise DataError(f"{folder}: the saved DatasetDict has no split {want!r} (splits: "
                            f"{', '.join(ds)}); set dataset_split_name in the data_config")
        ds = ds[want]
    elif split and split != "train":
        raise DataError(f"{folder}: dataset_split_name {split!r}: a saved Dataset (not a "
                        "DatasetDict) has only the split 'train'")
    ds = ds.with_format(None)
    if len(ds) == 0:
        raise DataError(f"{folder}: no records")
    return ds.to_iterable_dataset() if streaming else ds


def _json_error(path: str) -> str | None:
    """The first malformed line of a JSON/JSONL file, as 'path:line: message'. JSONL is read
    line by line (a streamed dataset can be larger than memory)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096)
        if path.endswith(".json") and head.lstrip().startswith("["):
            try:
                json.loads(head + f.read())
            except json.JSONDecodeError as e:
                return f"{path}:{e.lineno}: invalid JSON: {e.msg}"
            return None
        f.seek(0)
        empty = True
        for lineno, line in enumerate(f, 1):
            if line.strip():
                empty = False
                try:
                    if not isinstance(json.loads(line), dict):
                        return f"{path}:{lineno}: expected a JSON object"
                except json.JSONDecodeError as e:
                    return f"{path}:{lineno}: invalid JSON: {e.msg}"
    return f"{path}: no records" if empty else None


def raise_json_errors(files: list[str]) -> None:
    for f in files:
        err = _json_error(f)
        if err:
            raise DataError(err)


def load_files(files: list[str], builder: str | None = None, streaming: bool = False):
    """One dataset from files of one format."""
    from datasets import load_dataset

    kinds = {builder or BUILDERS.get(os.path.splitext(f)[1]) for f in files}
    if None in kinds:
        bad = next(f for f in files if os.path.splitext(f)[1] not in BUILDERS)
        raise DataError(f"{bad}: unsupported file type (use {', '.join(sorted(BUILDERS))}, "
                        "or give a builder in the data_config)")
    if len(kinds) > 1:
        raise DataError(f"{files[0]}: mixes file types {sorted(kinds)} in one dataset")
    kind = kinds.pop()
    for f in files:
        if os.path.getsize(f) == 0:
            raise DataError(f"{f}: no records")
    try:
        ds = load_dataset(kind, data_files=files, split="train", streaming=streaming)
    except Exception as e:  # noqa: BLE001 - pyarrow/datasets raise many types
        if kind == "json":  # name the file and line, which pyarrow's message does not
            raise_json_errors(files)
        raise DataError(f"{files[0]}: cannot be read as {kind}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if streaming and kind == "json":
        # a stream reads lazily: check the files now, so a bad line fails before training
        raise_json_errors(files)
    if not streaming and len(ds) == 0:
        raise DataError(f"{', '.join(files)}: no records")
    return ds


def load_hub(name: str, streaming: bool = False, split: str = "train"):
    """A Hugging Face dataset id, or a local folder in the Hub's layout (for named splits)."""
    from datasets import load_dataset

    try:
        return load_dataset(name, split=split, streaming=streaming)
    except Exception as e:  # noqa: BLE001
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        why = ("not in the local cache and HF_HUB_OFFLINE is set" if offline
               else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise DataError(f"{name}: no such file or folder, and not a loadable Hugging Face "
                        f"dataset ({why})") from None


def _first_json_record(path: str) -> dict | None:
    """The first record of a JSON/JSONL file, reading no more than it needs (twice as much
    each try, so a huge first record costs linear time)."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        text, size = "", 1 << 16
        while True:
            chunk = f.read(size)
            text += chunk
            size *= 2
            body = text.lstrip()
            if body.startswith("["):
                body = body[1:].lstrip()
            try:
                obj, _ = decoder.raw_decode(body)
                return obj if isinstance(obj, dict) else None
            except json.JSONDecodeError:
                if not chunk:
                    return None


def file_columns(path: str, builder: str | None = None) -> list[str] | None:
    """The columns of one data file, read from its schema, header or first record without
    loading it (None: unknown, e.g. unreadable; the loader reports that later)."""
    kind = builder or BUILDERS.get(os.path.splitext(path)[1])
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        if kind == "arrow":
            import pyarrow as pa

            try:  # datasets writes Arrow IPC streams; other tools write IPC files
                with pa.memory_map(path) as source:
                    return list(pa.ipc.open_stream(source).schema.names)
            except pa.ArrowInvalid:
                with pa.memory_map(path) as source:
                    return list(pa.ipc.open_file(source).schema.names)
        if kind == "json":
            record = _first_json_record(path)
            return None if record is None else list(record)
        if kind == "csv":
            import csv

            with open(path, encoding="utf-8", newline="") as f:
                return next(csv.reader(f), None)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return None


def peek_columns(paths: Any, builder: str | None = None) -> dict[str, list[str]]:
    """``{file: columns}`` of the first file behind each local path (hub ids and unreadable
    files are left out): cheap enough for config validation."""
    found = {}
    for path in split_paths(paths):
        files = expand(path)
        if files:
            cols = file_columns(files[0], builder)
            if cols is not None:
                found[files[0]] = cols
    return found


def load_paths(paths: Any, builder: str | None = None, streaming: bool = False,
               split: str | None = None):
    """One dataset from one or more paths/folders/globs/hub ids (concatenated).

    ``split`` (a data_config's ``dataset_split_name``) picks a named split of a hub id or of a
    folder in the Hub's layout (``data/train_sft-00000-of-00001.parquet``); files have one.
    """
    from datasets import concatenate_datasets

    parts = []
    for path in split_paths(paths):
        if os.path.isdir(path) and saved_kind(path):
            parts.append(load_saved(path, streaming, split))
            continue
        if split and split != "train" and os.path.isdir(path):
            parts.append(load_hub(path, streaming, split))
            continue
        files = expand(path)
        if files and split and split != "train":
            raise DataError(f"{path}: dataset_split_name {split!r}: a data file has only the "
                            "split 'train' (named splits come from a hub id or a folder)")
        if files:
            parts.append(load_files(files, builder, streaming))
        elif any(c in path for c in "*?[") or path.startswith((".", "/", "~")) or \
                os.path.splitext(path)[1] in BUILDERS:
            raise DataError(f"{path}: no such file, folder or matching files")
        else:
            parts.append(load_hub(path, streaming, split or "train"))
    if not parts:
        raise DataError("no data path given")
    if len(parts) == 1:
        return parts[0]
    try:
        return concatenate_datasets(parts)
    except ValueError as e:
        raise DataError(f"{', '.join(split_paths(paths))}: cannot be combined (different "
                        f"columns?): {e}") from None
