"""Turning ``training_data_path`` values into a ``datasets.Dataset``.

Accepts JSON, JSONL, Parquet, Arrow and CSV files, folders of them, folders written by
``save_to_disk``, globs, several paths (a list, or comma-separated), and Hugging Face
dataset ids (from the local cache; no download when ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from typing import Any

from fmtune.records import DataError  # bad data: the message names file, record and field

log = logging.getLogger("fmtune")

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow",
            ".csv": "csv", ".txt": "text"}
# a folder's .txt files are data only for --ept (raw-text corpora); elsewhere a README.txt next
# to the data files is not data. A .txt file or glob named as data is always loaded (a row per line).
FOLDER_TXT = ".txt"


class RecordError(DataError):
    """What a handler raises for one bad record of its batch: ``index`` is the record's position
    in the batch (0 for an unbatched handler's record), ``problem`` what is wrong with it
    (``field 'output' must be a string, got int``). fmtune replaces the batch position by the
    record's file and line (``data.jsonl:7: field 'output' must be ...``)."""

    def __init__(self, index: int, problem: str) -> None:
        super().__init__(index, problem)
        self.index, self.problem = index, problem

    def __str__(self) -> str:
        return f"record {self.index + 1} of this batch: {self.problem}"


# A column fmtune adds to every loaded dataset (the row's number in load order), so that a
# record a handler refuses is named by its file and line. Handlers never see it; it is
# dropped after the handlers.
ROW = "__fmtune_row__"


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


# what `fmtune train` writes into its output_dir (any one of them marks an fmtune run folder),
# and the split folders of `fmtune preprocess` with their shards
RUN_FILES = ("fmtune_config.json", "run_summary.json", "training_logs.jsonl")
PREPROCESSED = ("train_dataset", "validation_dataset")
_SHARD = re.compile(r"(train|validation)-\d{5}-of-\d{5}\.parquet$")


def output_folder(folder: str) -> str | None:
    """Why ``folder`` is an fmtune output folder (a run's output_dir, or the output_dir of
    ``fmtune preprocess``), whose files are not data; None when it is not one."""
    for name in RUN_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return f"an fmtune run's output folder (holds {name})"
    for name in PREPROCESSED:
        sub = os.path.join(folder, name)
        try:
            names = os.listdir(sub) if os.path.isdir(sub) else []
        except OSError:
            continue
        if names and all(_SHARD.match(n) for n in names):
            return f"an fmtune preprocess output folder (holds {name}/)"
    return None


def _refuse_output_folder(path: str) -> None:
    why = output_folder(path)
    if why:
        hint = (f"give {os.path.join(path, 'train_dataset')}" if "preprocess" in why else
                "give the data files or a folder of them, and keep output_dir out of it")
        raise DataError(f"{path}: is {why}, not a data folder; {hint}")


def _in_output_folder(folder: str, base: str, why: dict[str, str | None]) -> bool:
    """Whether ``folder`` or a folder above it, up to ``base`` (where a glob starts), is an
    fmtune output folder; ``why`` caches the answers by folder."""
    while True:
        if folder not in why:
            why[folder] = output_folder(folder or ".")
        if why[folder]:
            return True
        if os.path.abspath(folder or ".") == base or os.path.dirname(folder) == folder:
            return False
        folder = os.path.dirname(folder)


def expand(path: str, quiet: bool = False, txt: bool = False) -> list[str]:
    """Files behind a path, folder or glob (sorted); [] when none exist. A ``save_to_disk``
    folder inside a folder counts with its Arrow files only, not its JSON metadata.

    fmtune output folders (a run's output_dir: fmtune_config.json, training_logs.jsonl,
    checkpoints; ``fmtune preprocess``'s shards) inside the folder, or on a glob's path, are
    not data: skipped, with a log line (``quiet``: without). The folder given being one is
    an error."""
    if any(c in path for c in "*?["):
        base = os.path.abspath(os.path.dirname(re.split(r"[*?[]", path, maxsplit=1)[0]) or ".")
        found, why = [], {}  # folder -> why it is an output folder (None: it is not)
        for p in sorted(glob.glob(path, recursive=True)):
            if os.path.isfile(p) and not _in_output_folder(os.path.dirname(p), base, why):
                found.append(p)
        for folder, reason in why.items():
            if reason and not quiet:
                log.warning("%s: skipped, %s, not data", folder, reason)
        return found
    if os.path.isdir(path):
        _refuse_output_folder(path)
        found = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            if root != path:
                why = output_folder(root)
                if why:
                    if not quiet:
                        log.warning("%s: skipped, %s, not data", root, why)
                    dirs[:] = []
                    continue
            if saved_kind(root) == "dataset":
                found += _saved_arrow_files(root)
                dirs[:] = []
                continue
            found += sorted(os.path.join(root, f) for f in files
                            if os.path.splitext(f)[1] in BUILDERS and
                            (txt or os.path.splitext(f)[1] != FOLDER_TXT) and
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


def _json_records(path: str):
    """(where, record) of a JSON list or JSONL file: ``path:line`` or ``path: record N``."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):
            for i, rec in enumerate(json.load(f), 1):
                yield f"{path}: record {i}", rec
            return
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{lineno}", json.loads(line)


def json_kind(value) -> str | None:
    if value is None:
        return None
    for kind, name in ((bool, "a boolean"), (str, "a string"), ((int, float), "a number"),
                       (list, "a list"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def raise_type_clash(files: list[str]) -> None:
    """The first record whose field has another JSON type than the field's first value (a
    field of mixed types, which datasets' JSON loader may fail on), as one line."""
    first: dict[str, tuple[str, str]] = {}  # field -> (kind, where)
    try:
        for path in files:
            for where, rec in _json_records(path):
                for name, value in rec.items() if isinstance(rec, dict) else ():
                    kind = json_kind(value)
                    if kind is None:
                        continue
                    seen = first.setdefault(name, (kind, where))
                    if seen[0] != kind:
                        raise DataError(_clash(where, name, kind, seen[0], seen[1]))
    except (OSError, ValueError):
        return


def _clash(where: str, name: str, kind: str, other: str, other_where: str) -> str:
    return (f"{where}: field {name!r} is {kind} here and {other} at {other_where}; give a "
            "field one type in all records")


# datasets' JSON loader reads a file this many bytes at a time. A field's type is the one it
# has in the first chunk of the first file (a field of mixed types there is kept as JSON values,
# datasets' Json type); later chunks and files are cast to it: 3 becomes "3", and in a chunk
# that itself mixes types every value becomes JSON text ('"b"').
JSON_CHUNK = 10 << 20
_PA_KINDS = {"string": "a string", "number": "a number", "boolean": "a boolean",
             "object": "an object", "array": "a list"}
_CHANGED = re.compile(r"Column\((.*)\) changed from (\w+) to (\w+)")


def _keeps_json(feature) -> bool:
    """Whether datasets keeps (part of) a field as JSON values: they reach handlers as read."""
    from datasets import Json, LargeList, List

    if isinstance(feature, Json):
        return True
    if isinstance(feature, dict):
        return any(_keeps_json(f) for f in feature.values())
    return isinstance(feature, (List, LargeList)) and _keeps_json(feature.feature)


def _json_lines(path: str):
    """A JSON/JSONL file as something pyarrow's JSON Lines reader reads (a JSON list is
    converted, as datasets converts it)."""
    import io

    with open(path, encoding="utf-8") as f:
        if f.read(4096).lstrip().startswith("["):
            f.seek(0)
            return io.BytesIO("\n".join(json.dumps(r) for r in json.load(f)).encode())
    return path


def _values_at(value, parts: list[str]):
    if not parts:
        yield value
    elif parts[0] == "[]" and isinstance(value, list):
        for v in value:
            yield from _values_at(v, parts[1:])
    elif isinstance(value, dict) and parts[0] in value:
        yield from _values_at(value[parts[0]], parts[1:])


def _first_with(files: list[str], parts: list[str], kind: str) -> str | None:
    for path in files:
        for where, rec in _json_records(path):
            if any(json_kind(v) == kind for v in _values_at(rec, parts)):
                return where
    return None


def raise_cast_types(files: list[str], features) -> None:
    """A value datasets would cast to its field's type (see :data:`JSON_CHUNK`; ``3`` in a
    later file or past the first 10 MB would arrive as ``"3"``), as one line naming the record,
    the field and both types. Read with pyarrow's JSON reader against the loaded types (the
    records are looked at only to name the one). One file of one chunk needs no check: datasets
    types each field from all of its values."""
    if not features or (len(files) == 1 and os.path.getsize(files[0]) <= JSON_CHUNK):
        return
    import pyarrow as pa
    import pyarrow.json as paj
    from datasets import Features

    checked = Features({n: f for n, f in features.items() if not _keeps_json(f)})
    if not checked:
        return
    options = paj.ParseOptions(explicit_schema=checked.arrow_schema,
                               unexpected_field_behavior="ignore")
    for k, path in enumerate(files):
        try:
            for _ in paj.open_json(_json_lines(path), parse_options=options):
                pass
        except (pa.ArrowInvalid, OSError, ValueError) as e:
            found = _CHANGED.search(str(e))
            if not found or found.group(2) not in _PA_KINDS or found.group(3) not in _PA_KINDS:
                continue  # not a type clash: the loader's business
            parts = [p for p in found.group(1).split("/") if p]
            name = "".join(p if p == "[]" or not i else f".{p}" for i, p in enumerate(parts))
            was, now = _PA_KINDS[found.group(2)], _PA_KINDS[found.group(3)]
            where = _first_with([path], parts, now)
            if where:
                first = _first_with(files[:k + 1], parts, was) or "the first records"
                raise DataError(_clash(where, name, now, was, first)) from None


def _arrow_kind(t) -> str | None:
    import pyarrow as pa

    if pa.types.is_null(t):
        return None
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "a string"
    if pa.types.is_boolean(t):
        return "a boolean"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "a number"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return "a list"
    if pa.types.is_struct(t):
        return "an object"
    return str(t)


def _types_clash(a, b) -> bool:
    """Whether datasets would cast values of Arrow type ``b`` to ``a`` across kinds (a null
    type, of an all-null or empty column, clashes with nothing)."""
    ka, kb = _arrow_kind(a), _arrow_kind(b)
    if ka is None or kb is None:
        return False
    if ka != kb:
        return True
    if ka == "a list":
        return _types_clash(a.value_type, b.value_type)
    if ka == "an object":
        names = {f.name for f in b}
        return any(_types_clash(f.type, b.field(f.name).type) for f in a if f.name in names)
    return False


def _arrow_schema(path: str, kind: str | None):
    import pyarrow as pa

    if (kind or BUILDERS.get(os.path.splitext(path)[1])) == "parquet":
        import pyarrow.parquet as pq

        return pq.read_schema(path)
    try:  # datasets writes Arrow IPC streams; other tools write IPC files
        with pa.memory_map(path) as source:
            return pa.ipc.open_stream(source).schema
    except pa.ArrowInvalid:
        with pa.memory_map(path) as source:
            return pa.ipc.open_file(source).schema


def raise_schema_clash(files: list[str], kind: str | None = None) -> None:
    """A Parquet/Arrow file whose column has another kind of type than in the dataset's first
    file (datasets would cast it: 3 becomes "3"), as one line naming both files. ``kind``:
    "parquet" or "arrow" (None: by each file's extension)."""
    first: dict[str, tuple[Any, str]] = {}  # column -> (type, file)
    for path in files if len(files) > 1 else ():
        try:
            schema = _arrow_schema(path, kind)
        except (OSError, ValueError):  # the loader reports an unreadable file
            return
        for f in schema:
            seen = first.setdefault(f.name, (f.type, path))
            if _types_clash(seen[0], f.type):
                raise DataError(
                    f"{path}: column {f.name!r} is {_arrow_kind(f.type)} ({f.type}) here and "
                    f"{_arrow_kind(seen[0])} ({seen[0]}) in {seen[1]}; give a column one type "
                    "in all files")


def utf8_error(path: str, chunk_size: int = 1 << 20) -> str | None:
    """Where a text file stops being UTF-8, as 'path:line: not UTF-8 text (byte 0x.. at offset
    N)' (the core reader's words), else None. Read in chunks: a data file can be larger than
    memory, and pyarrow's readers load invalid bytes that fail only when a handler reads them."""
    offset, lines, carry = 0, 0, b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            data = carry + chunk
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as e:
                if chunk and e.reason == "unexpected end of data" and e.end == len(data):
                    carry = data[e.start:]  # a character cut by the chunk: decided next round
                    data = data[:e.start]
                else:
                    line = lines + data.count(b"\n", 0, e.start) + 1
                    return (f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                            f"{offset + e.start}); convert the file to UTF-8")
            if not chunk:
                return None
            lines += data.count(b"\n")
            offset += len(data)


TEXT_KINDS = ("json", "csv", "text")


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
        if kind in TEXT_KINDS:
            err = utf8_error(f)
            if err:
                raise DataError(err)
    if kind in ("parquet", "arrow"):
        raise_schema_clash(files, kind)
    try:
        ds = load_dataset(kind, data_files=files, split="train", streaming=streaming)
    except Exception as e:  # noqa: BLE001 - pyarrow/datasets raise many types
        if kind == "json":  # name the file and line, which pyarrow's message does not
            raise_json_errors(files)
            raise_type_clash(files)
        raise DataError(f"{files[0]}: cannot be read as {kind}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if streaming and kind == "json":
        # a stream reads lazily: check the files now, so a bad line fails before training
        raise_json_errors(files)
    if kind == "json":
        raise_cast_types(files, ds.features)
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
        if kind == "text":
            return ["text"]
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
        try:
            files = expand(path, quiet=True)
        except DataError:  # reported when the data loads
            continue
        if files:
            cols = file_columns(files[0], builder)
            if cols is not None:
                found[files[0]] = cols
    return found


class Origins:
    """Where the rows of one loaded dataset come from: the row numbers of the :data:`ROW`
    column (from 0, in load order) back to a file and line, for error messages. Files are
    read again only when a record is refused."""

    def __init__(self) -> None:
        # (rows, None when not known (a stream); kind; the files, or a folder or hub id)
        self.parts: list[tuple[int | None, str, list[str] | str]] = []

    def add(self, ds, kind: str, source: list[str] | str) -> None:
        self.parts.append((len(ds) if hasattr(ds, "__len__") else None, kind, source))

    def where(self, row: int) -> str | None:
        """``path:line`` (JSONL, CSV), ``path: record N`` (a JSON list, Parquet, Arrow, a
        save_to_disk folder, a hub dataset), or None when it cannot be told."""
        start = 0
        for n, kind, source in self.parts:
            if n is not None and row - start >= n:
                start += n
                continue
            if not isinstance(source, list):
                return f"{source}: record {row - start + 1}" if n is not None else None
            for path in source:  # counted file by file
                place, count = _record_in_file(path, kind, row - start)
                if place or count is None:
                    return place
                start += count
            if n is not None:
                return None
        return None


def _record_in_file(path: str, kind: str, k: int) -> tuple[str | None, int | None]:
    """(where record ``k`` (from 0) of the file is, None when the file has fewer records;
    the file's number of records, None when unknown)."""
    try:
        if kind == "json":
            n = 0
            for where, _ in _json_records(path):
                if n == k:
                    return where, None
                n += 1
            return None, n
        if kind == "text":  # datasets' text builder: a row per line
            with open(path, encoding="utf-8") as f:
                n = sum(1 for _ in f)
            return (f"{path}:{k + 1}" if k < n else None), n
        if kind == "csv":
            import csv

            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.reader(f)
                next(reader, None)  # the header
                n, line = 0, reader.line_num + 1
                for record in reader:
                    if record:
                        if n == k:
                            return f"{path}:{line}", None
                        n += 1
                    line = reader.line_num + 1
                return None, n
        if kind == "parquet":
            import pyarrow.parquet as pq

            n = pq.ParquetFile(path).metadata.num_rows
        elif kind == "arrow":
            import pyarrow as pa

            with pa.memory_map(path) as source:
                try:
                    n = pa.ipc.open_stream(source).read_all().num_rows
                except pa.ArrowInvalid:
                    n = pa.ipc.open_file(source).read_all().num_rows
        else:
            return None, None
        return (f"{path}: record {k + 1}" if k < n else None), n
    except (OSError, ValueError, UnicodeDecodeError):
        return None, None


def add_row_numbers(ds):
    """``ds`` with the :data:`ROW` column (each row's number in load order)."""
    if hasattr(ds, "__len__"):
        import numpy as np

        return ds.add_column(ROW, np.arange(len(ds), dtype=np.int32 if len(ds) < 2**31
                                            else np.int64))
    return ds.map(lambda batch, idx: {ROW: idx}, with_indices=True, batched=True)


def load_paths(paths: Any, builder: str | None = None, streaming: bool = False,
               split: str | None = None, origins: Origins | None = None, txt: bool = False):
    """One dataset from one or more paths/folders/globs/hub ids (concatenated).

    ``split`` (a data_config's ``dataset_split_name``) picks a named split of a hub id or of a
    folder in the Hub's layout (``data/train_sft-00000-of-00001.parquet``); files have one.
    With ``origins``, the dataset gets the :data:`ROW` column and ``origins`` what maps it
    back to files and lines. ``txt``: a folder's .txt files are data too (``--ept``).
    """
    from datasets import concatenate_datasets

    parts, loaded = [], []  # the datasets, and (file, kind) of the files loaded for them
    for path in split_paths(paths):
        if os.path.isdir(path) and saved_kind(path):
            parts.append(load_saved(path, streaming, split))
            if origins is not None:
                origins.add(parts[-1], "saved", path)
            continue
        if split and split != "train" and os.path.isdir(path):
            parts.append(load_hub(path, streaming, split))
            if origins is not None:
                origins.add(parts[-1], "hub", path)
            continue
        files = expand(path, txt=txt)
        if files and split and split != "train":
            raise DataError(f"{path}: dataset_split_name {split!r}: a data file has only the "
                            "split 'train' (named splits come from a hub id or a folder)")
        if files:
            parts.append(load_files(files, builder, streaming))
            loaded += [(f, builder or BUILDERS[os.path.splitext(f)[1]]) for f in files]
            if origins is not None:
                origins.add(parts[-1], builder or BUILDERS[os.path.splitext(files[0])[1]],
                            files)
        elif any(c in path for c in "*?[") or path.startswith((".", "/", "~")) or \
                os.path.splitext(path)[1] in BUILDERS:
            raise DataError(f"{path}: no such file, folder or matching files")
        else:
            parts.append(load_hub(path, streaming, split or "train"))
            if origins is not None:
                origins.add(parts[-1], "hub", path)
    if not parts:
        raise DataError("no data path given")
    if len(parts) == 1:
        ds = parts[0]
    else:
        try:
            ds = concatenate_datasets(parts)
        except ValueError as e:
            # a field of another type in another path's files
            raise_type_clash([f for f, kind in loaded if kind == "json"])
            raise_schema_clash([f for f, kind in loaded if kind in ("parquet", "arrow")])
            raise DataError(f"{', '.join(split_paths(paths))}: cannot be combined (different "
                            f"columns?): {e}") from None
    return add_row_numbers(ds) if origins is not None else ds
