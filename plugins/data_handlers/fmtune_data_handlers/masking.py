"""Exact loss masks from text segments.

Every example is a list of ``(text, trained)`` segments: the prompt parts are
not trained, the completion parts (outputs, assistant turns) are. The joined
text is tokenized once with offsets; a token is trained when its characters
lie inside a trained segment. When a token would span the boundary between two
segments (e.g. ``Label:`` + ``no`` merged), the example is instead tokenized
segment by segment and concatenated, so no token ever crosses a boundary and
the trained tokens decode exactly to the completion text.

Each encoded row gets a ``status`` used for the counts shown by ``fmtune data
preview``: ``ok``, ``truncated``, or ``dropped: <reason>``.
"""

from __future__ import annotations

from typing import Any

IGNORE = -100
Segments = list[tuple[str, bool]]


def _specials(tokenizer) -> tuple[list[int], list[int]]:
    """Ids the tokenizer adds around a text (e.g. BOS), as (prefix, suffix)."""
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    at = next((i for i in range(len(with_sp)) if with_sp[i:i + len(plain)] == plain), 0)
    return with_sp[:at], with_sp[at + len(plain):]


def _by_segment(tokenizer, segs: Segments, prefix: list[int], suffix: list[int]):
    ids, labels = list(prefix), [IGNORE] * len(prefix)
    for text, trained in segs:
        if not text:
            continue
        part = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if trained else [IGNORE] * len(part)
    return ids + suffix, labels + [IGNORE] * len(suffix)


def _label(enc, n_chars: int, spans: list[tuple[int, int, bool]]) -> list[int] | None:
    """Labels from character spans via the encoding's char->token map (no per-token Python
    loop); None when a token crosses a span boundary."""
    ids = enc.ids
    last = n_chars - 1
    while last >= 0 and enc.char_to_token(last) is None:
        last -= 1
    end_tok = enc.char_to_token(last) + 1 if last >= 0 else 0

    def first_token_from(c: int) -> int:
        while c < n_chars:
            t = enc.char_to_token(c)
            if t is not None:
                return t
            c += 1
        return end_tok

    for s, _, _ in spans[1:]:
        if 0 < s < n_chars:
            before = enc.char_to_token(s - 1)
            if before is not None and before == enc.char_to_token(s):
                return None
    labels = [IGNORE] * len(ids)
    for s, e, trained in spans:
        if trained and e > s:
            a, z = first_token_from(s), first_token_from(e)
            labels[a:z] = ids[a:z]
    return labels


def encode(tokenizer, examples: list[Segments], max_length: int, add_eos: bool = True,
           add_special_tokens: bool = True) -> dict[str, list[Any]]:
    """Tokenize segmented examples into input_ids/labels/attention_mask/status columns."""
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "attention_mask": [], "status": []}
    if not examples:
        return out
    prefix, suffix = _specials(tokenizer) if add_special_tokens else ([], [])
    texts = ["".join(t for t, _ in segs) for segs in examples]
    # The Rust tokenizer directly: ids and offsets without per-token Python conversion.
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
    eos = tokenizer.eos_token_id
    for segs, enc in zip(examples, encodings):
        spans, pos = [], 0
        for text, trained in segs:
            spans.append((pos, pos + len(text), trained))
            pos += len(text)
        ids = enc.ids
        labels = _label(enc, pos, spans)
        if labels is None:  # a token spans a boundary: tokenize segment by segment
            ids, labels = _by_segment(tokenizer, segs, prefix, suffix)
        completion = any(t and text for text, t in segs)
        if add_eos and eos is not None and completion and (not ids or ids[-1] != eos):
            ids = ids + [eos]
            labels.append(eos)
        status = "ok"
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            status = "truncated"
        if all(label == IGNORE for label in labels):
            status = ("dropped: no trained token left after truncation to max_seq_length"
                      if status == "truncated" else "dropped: nothing to train on")
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["attention_mask"].append([1] * len(ids))
        out["status"].append(status)
    return out
