"""Exact loss masks from text segments.

Every example is a list of ``(text, trained)`` segments: the prompt parts are
not trained, the completion parts (outputs, assistant turns) are. The joined
text is tokenized once with offsets; a token is trained when its characters
lie inside a trained segment. When a token would span the boundary between two
segments (e.g. ``Label:`` + ``no`` merged), the example is instead tokenized
segment by segment and concatenated, so no token ever crosses a boundary and
the trained tokens decode exactly to the completion text.

Texts are cut to what ``max_length`` tokens can reach before they are tokenized
(``fmtune.records.char_budget``, ``cut``): the segments of an example keep at most that many
characters in all, counted from the start, so a 50 MB record is not tokenized whole; the first
``max_length`` tokens, and whether the row counts as truncated, stay the same.

Each encoded row gets a ``status`` used for the counts shown by ``fmtune data
preview``: ``ok``, ``truncated``, or ``dropped: <reason>``.
"""

from __future__ import annotations

import sys
from typing import Any

from fmtune.records import char_budget, cut

IGNORE = -100
Segments = list[tuple[str, bool]]


def _specials(tokenizer) -> tuple[list[int], list[int]]:
    """Ids the tokenizer adds around a text (e.g. BOS), as (prefix, suffix)."""
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    at = next((i for i in range(len(with_sp)) if with_sp[i:i + len(plain)] == plain), 0)
    return with_sp[:at], with_sp[at + len(plain):]


def budget_for(tokenizer, max_length: int | None) -> int | None:
    """Characters of an example worth tokenizing when it is cut to ``max_length`` tokens
    (None: no limit)."""
    if not max_length or max_length >= sys.maxsize:
        return None
    return char_budget(tokenizer, max_length)


def cut_segments(segs: Segments, budget: int | None) -> Segments:
    """The segments cut cumulatively to ``budget`` characters in all: the segment that reaches
    the budget is cut, those after it are dropped."""
    if budget is None or sum(len(t) for t, _ in segs) <= budget:
        return segs
    out, left = [], budget
    for text, trained in segs:
        if left <= 0:
            break
        text = cut(text, left)
        out.append((text, trained))
        left -= len(text)
    return out


def _by_segment(tokenizer, segs: Segments, prefix: list[int], suffix: list[int]):
    """Ids and trained token ranges, tokenizing each segment on its own."""
    ids, trained = list(prefix), []
    for text, is_trained in segs:
        if not text:
            continue
        part = tokenizer(text, add_special_tokens=False)["input_ids"]
        if is_trained:
            trained.append((len(ids), len(ids) + len(part)))
        ids += part
    return ids + suffix, trained


def _first_token_from(c2t, c: int, n_chars: int) -> int | None:
    """The first token at or after character ``c`` (None: no token there)."""
    while c < n_chars:
        t = c2t(c)
        if t is not None:
            return t
        c += 1
    return None


def _trained_ranges(enc, n_chars: int, spans: list[tuple[int, int, bool]]):
    """Trained token ranges from character spans via the encoding's char->token map (no
    per-token Python loop); None when a token crosses a span boundary."""
    c2t = enc.char_to_token
    for s, _, _ in spans[1:]:
        if 0 < s < n_chars:
            before = c2t(s - 1)
            if before is not None and before == c2t(s):
                return None
    last = n_chars - 1  # the token after the last character that has one (special tokens follow)
    while last >= 0 and c2t(last) is None:
        last -= 1
    end_tok = c2t(last) + 1 if last >= 0 else 0
    out = []
    for s, e, trained in spans:
        if trained and e > s:
            a = _first_token_from(c2t, s, n_chars)
            z = _first_token_from(c2t, e, n_chars)
            out.append((end_tok if a is None else a, end_tok if z is None else z))
    return out


def encode(tokenizer, examples: list[Segments], max_length: int, add_eos: bool = True,
           add_special_tokens: bool = True, status: dict[int, str] | None = None) -> dict[str, Any]:
    """Tokenize segmented examples into input_ids/labels/attention_mask/status columns.

    The token columns are built as Arrow arrays from flat buffers (see ``_rows``): converting
    millions of Python ints row by row was a third of the preprocessing time. ``status``
    overrides the status of some rows (e.g. a response template not found).
    """
    import itertools

    import numpy as np

    prefix, suffix = _specials(tokenizer) if add_special_tokens and examples else ([], [])
    budget = budget_for(tokenizer, max_length)  # a 50 MB record is not tokenized whole
    if budget is not None:
        examples = [cut_segments(segs, budget) for segs in examples]
    texts = ["".join([t for t, _ in segs]) for segs in examples]
    # The Rust tokenizer directly: ids and offsets without per-token Python conversion.
    encodings = (tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
                 if examples else [])
    eos = tokenizer.eos_token_id
    rows, statuses, starts, ends = [], [], [], []
    offset = 0
    for segs, enc in zip(examples, encodings):
        spans, pos = [], 0
        for text, trained in segs:
            spans.append((pos, pos + len(text), trained))
            pos += len(text)
        ids = enc.ids
        trained = _trained_ranges(enc, pos, spans)
        if trained is None:  # a token spans a boundary: tokenize segment by segment
            ids, trained = _by_segment(tokenizer, segs, prefix, suffix)
        completion = any(t and text for text, t in segs)
        if add_eos and eos is not None and completion and (not ids or ids[-1] != eos):
            ids.append(eos)
            trained.append((len(ids) - 1, len(ids)))
        row_status = "ok"
        if len(ids) > max_length:
            ids = ids[:max_length]
            trained = [(a, min(z, max_length)) for a, z in trained if a < max_length]
            row_status = "truncated"
        trained = [(a, z) for a, z in trained if z > a]
        if not trained:
            row_status = ("dropped: no trained token left after truncation to max_seq_length"
                          if row_status == "truncated" else "dropped: nothing to train on")
        for a, z in trained:
            starts.append(offset + a)
            ends.append(offset + z)
        rows.append(ids)
        statuses.append(row_status)
        offset += len(ids)
    for i, s in (status or {}).items():
        statuses[i] = s
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=offset)
    bounds = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, rows), dtype=np.int64, count=len(rows)), out=bounds[1:])
    if offset >= 2**31:
        raise ValueError("one batch of data handler output holds 2**31 tokens or more; "
                         "use a smaller batch_size")
    depth = np.zeros(offset + 1, dtype=np.int32)  # +1 at each trained range's start, -1 at its end
    np.add.at(depth, np.asarray(starts, dtype=np.int64), 1)
    np.add.at(depth, np.asarray(ends, dtype=np.int64), -1)
    labels = np.where(np.cumsum(depth[:-1]) > 0, flat, IGNORE)
    # the element types datasets gives these columns (input_ids int32, attention_mask int8)
    return {"input_ids": _rows(bounds, flat.astype(np.int32)), "labels": _rows(bounds, labels),
            "attention_mask": _rows(bounds, np.ones(offset, dtype=np.int8)), "status": statuses}


def _rows(bounds, values):
    """One list column from flat values and row bounds, as an Arrow-backed pandas Series:
    a column type ``Dataset.map`` accepts (also streaming) and that fmtune's batched maps
    write without converting it to Python (processing.ArrowBatches)."""
    import pandas as pd
    import pyarrow as pa

    column = pa.ListArray.from_arrays(pa.array(bounds, pa.int32()), pa.array(values))
    return pd.Series(column, dtype=pd.ArrowDtype(column.type))
