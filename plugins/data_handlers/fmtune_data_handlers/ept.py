"""Extended pre-training (``--ept``, fms-hf-tuning's "Extended Pre-Training").

Raw text (a ``text`` column, ``--dataset_text_field``, ``--data_formatter_template``, .txt
files: a row per line; or pretokenized ``input_ids``) is tokenized whole (no truncation), each
document followed by EOS (and preceded by BOS when the tokenizer adds one), the token stream is
concatenated across documents in data order and cut into blocks of ``max_seq_length`` tokens.
Every token is trained (``labels`` = ``input_ids``); the last block keeps the remainder, so no
token is dropped. Blocks are produced by a generator over the tokenized data, batch by batch:
written to datasets' cache as they come (non-streamed: a ``Dataset`` with a length, shuffled
and resumed by the Trainer like any other), or yielded lazily (``dataprocessor.streaming``).
"""

from __future__ import annotations

from typing import Any, Iterator

EPT_READ_BATCH = 1000


def blocks_of(ds, block: int) -> Iterator[dict[str, list[int]]]:
    """The blocks of ``ds``'s input_ids (rows in order), concatenated and cut every ``block``
    tokens; the last one holds the remainder."""
    import numpy as np

    carry = np.zeros(0, dtype=np.int64)
    for ids in _id_batches(ds):
        flat = np.concatenate([carry, ids]) if len(carry) else ids
        full = len(flat) // block * block
        for start in range(0, full, block):
            row = flat[start:start + block].tolist()
            yield {"input_ids": row, "labels": row, "attention_mask": [1] * block}
        carry = flat[full:]
    if len(carry):
        row = carry.tolist()
        yield {"input_ids": row, "labels": row, "attention_mask": [1] * len(row)}


def _id_batches(ds) -> Iterator[Any]:
    """input_ids of ``ds`` as flat numpy arrays, a batch of rows at a time."""
    import numpy as np

    if hasattr(ds, "with_format") and hasattr(ds, "__len__"):
        for table in ds.with_format("arrow").select_columns(["input_ids"]).iter(EPT_READ_BATCH):
            yield np.asarray(table.column("input_ids").combine_chunks().flatten(),
                             dtype=np.int64)
        return
    rows = []
    for row in ds:  # a stream
        rows.append(row["input_ids"])
        if len(rows) == EPT_READ_BATCH:
            yield np.fromiter((t for r in rows for t in r), dtype=np.int64)
            rows = []
    if rows:
        yield np.fromiter((t for r in rows for t in r), dtype=np.int64)


def _generate(ds, block: int):
    yield from blocks_of(ds, block)


def to_blocks(ds, block: int):
    """``ds`` (tokenized documents) as EPT blocks: a ``Dataset`` written block by block to
    datasets' cache, or an ``IterableDataset`` for a stream."""
    from datasets import Dataset, Features, IterableDataset, Sequence, Value

    features = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int64")),
                         "attention_mask": Sequence(Value("int8"))})
    if not hasattr(ds, "__len__"):
        return IterableDataset.from_generator(_generate, features=features,
                                              gen_kwargs={"ds": ds, "block": block})
    fingerprint = getattr(ds, "_fingerprint", None)
    return Dataset.from_generator(
        _generate, features=features, gen_kwargs={"ds": ds, "block": block},
        **({"fingerprint": f"ept-{block}-{fingerprint}"} if fingerprint else {}))
