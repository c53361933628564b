"""``fmtune preprocess`` and ``fmtune data preview`` (entry points in ``fmtune.commands``).

``fmtune data preview`` hands a run to an active plugin that reads its data itself and shows
it its own way: an entry point named after the plugin in the group ``fmtune.data_preview``
(``vision = "fmtune_vision.cli:data_preview"``), ``function(argv) -> exit code`` called with
``--n N --color WHEN`` and the train options. Nothing of that plugin is imported here.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from fmtune.commands import CommandParser, load_config, train_help, validate

from . import plugin

NAME = "data_handlers"
IGNORE = -100
PREVIEW_GROUP = "fmtune.data_preview"


def _setup(argv: list[str], prog: str):
    config, pm, want_help, registry = load_config(argv, activate=[NAME])
    if want_help:
        print(train_help(registry, [n for n, _ in pm.list_name_plugin()
                                    if not n.startswith("default:")]).replace(
            "usage: fmtune train", f"usage: {prog}", 1))
        return None
    validate(config, pm)
    tokenizer = pm.hook.load_tokenizer(config=config)
    return config, tokenizer, plugin.prepare(config, tokenizer, pm)


SHARD_ROWS = 500_000
# the column types of non-streamed output (datasets' defaults for the token columns)
TOKEN_TYPES = {"input_ids": "int32", "labels": "int64", "attention_mask": "int8"}


def _write_parquet(ds, folder: str, split: str) -> int:
    """``ds`` as parquet shards of at most SHARD_ROWS rows; returns the number of rows. A
    stream (``dataprocessor.streaming``) has no length: it is written batch by batch."""
    if hasattr(ds, "__len__"):
        shards = max(1, len(ds) // SHARD_ROWS + (len(ds) % SHARD_ROWS > 0))
        for k in range(shards):
            ds.shard(shards, k, contiguous=True).to_parquet(
                os.path.join(folder, f"{split}-{k:05d}-of-{shards:05d}.parquet"))
        return len(ds)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tqdm.auto import tqdm

    bar = tqdm(desc=f"writing {split}_dataset", unit=" rows", disable=None)  # off when not a tty
    parts, writer, rows, in_shard = [], None, 0, 0
    for batch in ds.iter(batch_size=10_000):
        table = pa.table({c: pa.array(v, pa.list_(pa.type_for_alias(TOKEN_TYPES[c]))
                                      if c in TOKEN_TYPES else None)
                          for c, v in batch.items()})
        while table.num_rows:
            if writer is None:
                parts.append(os.path.join(folder, f".part-{len(parts)}.parquet"))
                writer, in_shard = pq.ParquetWriter(parts[-1], table.schema), 0
            take = table.slice(0, SHARD_ROWS - in_shard)
            writer.write_table(take)
            in_shard += take.num_rows
            rows += take.num_rows
            bar.update(take.num_rows)
            table = table.slice(take.num_rows)
            if in_shard == SHARD_ROWS:
                writer.close()
                writer = None
    bar.close()
    if writer is not None:
        writer.close()
    for k, part in enumerate(parts):
        os.replace(part, os.path.join(folder, f"{split}-{k:05d}-of-{len(parts):05d}.parquet"))
    return rows


def _counts_line(counts: dict[str, int]) -> str:
    kept = counts.get("ok", 0) + counts.get("truncated", 0)
    parts = [f"{kept} kept", f"{counts.get('truncated', 0)} truncated at max_seq_length"]
    dropped = {s: n for s, n in counts.items() if s.startswith("dropped")}
    parts.append(f"{sum(dropped.values())} dropped" + (
        " (" + "; ".join(f"{n} {s.removeprefix('dropped: ')}" for s, n in dropped.items()) + ")"
        if dropped else ""))
    return ", ".join(parts)


def _remove_stale_temporaries(out: str) -> None:
    """The ``.preprocess-PID-*`` folders a killed ``fmtune preprocess`` left in ``out`` (its
    process is gone); those of a live process are left alone."""
    for name in os.listdir(out):
        parts = name.split("-")
        if not (name.startswith(".preprocess-") and len(parts) >= 3 and parts[1].isdigit()):
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's live process
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        print(f"removed {os.path.join(out, name)}, left by a preprocess that was killed",
              file=sys.stderr)


def preprocess(argv: list[str]) -> int:
    """fmtune preprocess [train options]: write tokenized parquet for `fmtune train`."""
    ready = _setup(argv, "fmtune preprocess")
    if ready is None:
        return 0
    config, tokenizer, prepared = ready
    out = config.output_dir
    os.makedirs(out, exist_ok=True)
    _remove_stale_temporaries(out)
    tmp = tempfile.mkdtemp(prefix=f".preprocess-{os.getpid()}-", dir=out)
    try:
        written = {}
        for split, ds in (("train", prepared.train), ("validation", prepared.validation)):
            if ds is None:
                continue
            folder = os.path.join(tmp, f"{split}_dataset")
            os.makedirs(folder)
            written[split] = _write_parquet(ds, folder, split)
        for split in written:
            final = os.path.join(out, f"{split}_dataset")
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(tmp, f"{split}_dataset"), final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for split, n in written.items():
        counts = prepared.counts[split]
        print(f"{split}: {_counts_line(counts) if counts else 'streamed, not counted'} -> "
              f"{os.path.join(out, f'{split}_dataset')} ({n} rows)")
    return 0


def mark(tokenizer, ids, labels, color: bool) -> str:
    """Decoded text with the trained tokens in green (terminal) or [[brackets]]."""
    groups: list[tuple[bool, list[int]]] = []
    for tid, lab in zip(ids, labels):
        trained = lab != IGNORE
        if groups and groups[-1][0] == trained:
            groups[-1][1].append(tid)
        else:
            groups.append((trained, [tid]))
    parts = []
    for trained, toks in groups:
        text = tokenizer.decode(toks)
        if trained:
            text = f"\033[1;32m{text}\033[0m" if color else f"[[{text}]]"
        parts.append(text)
    return "".join(parts)


def _data_parser() -> CommandParser:
    """``fmtune data``'s grammar: a usage error is one ``fmtune: error:`` line, exit 2."""
    ap = CommandParser(prog="fmtune data", description="Data commands of the data_handlers "
                       "plugin.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    preview = sub.add_parser(
        "preview", add_help=False, allow_abbrev=False, help="show processed examples with the "
        "trained tokens marked, and what was kept, truncated and dropped",
        description="fmtune data preview [--n N] [--color auto|always|never] [train options]: "
        "shows processed examples with the trained tokens marked, and what was kept, "
        "truncated and dropped. --help lists the train options.")
    preview.add_argument("--n", type=int, default=3, help="examples to show (default 3)")
    preview.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    return ap


def data(argv: list[str]) -> int:
    """fmtune data preview [--n N] [--color auto|always|never] [train options]."""
    ap = _data_parser()
    if argv[:1] and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        ap.error(f"unrecognized arguments: {argv[0]} (the sub-command comes first: "
                 "fmtune data preview [options])")
    args, rest = ap.parse_known_args(argv)  # -h prints the help and exits 0
    if args.command is None:
        ap.error("a sub-command is required: preview")
    if "--output_dir" not in " ".join(rest):  # preview writes nothing; the core wants a folder
        with tempfile.TemporaryDirectory(prefix="fmtune-preview-") as tmp:
            return data(argv + ["--output_dir", tmp])
    handler = _preview_handler(rest)
    if handler is not None:  # e.g. a vision run: image tokens shown where they sit
        return int(handler.load()(["--n", str(args.n), "--color", args.color, *rest]) or 0)
    ready = _setup(rest, "fmtune data preview")
    if ready is None:
        return 0
    config, tokenizer, prepared = ready
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    ds = prepared.train
    shown = ds.select(range(min(args.n, len(ds)))) if hasattr(ds, "select") else list(ds.take(args.n))
    legend = "green" if color else "[[ ]]"
    print(f"trained tokens are marked {legend}\n")
    for k, row in enumerate(shown):
        n_trained = sum(1 for lab in row["labels"] if lab != IGNORE)
        print(f"--- example {k + 1}: {len(row['input_ids'])} tokens, {n_trained} trained")
        print(mark(tokenizer, row["input_ids"], row["labels"], color))
    print()
    for split, counts in prepared.counts.items():
        if counts:
            print(f"{split}: {_counts_line(counts)}")
    return 0


def _preview_handler(rest: list[str]):
    """The ``fmtune.data_preview`` entry point of a plugin active in this run (named in
    ``--plugins``, or activated by an option such as ``--dataset_image_field``), or None."""
    from importlib import metadata

    handlers = {ep.name: ep for ep in metadata.entry_points(group=PREVIEW_GROUP)
                if ep.name != NAME}
    if not handlers or any(a in ("-h", "--help") for a in rest):
        return None
    config, _, _, _ = load_config(rest, activate=[NAME])
    return next((handlers[n] for n in config.plugins if n in handlers), None)
