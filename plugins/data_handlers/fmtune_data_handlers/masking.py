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


def encode(tokenizer, examples: list[Segments], max_length: int, add_eos: bool = True,
           add_special_tokens: bool = True) -> dict[str, list[Any]]:
    """Tokenize segmented examples into input_ids/labels/attention_mask/status columns."""
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "attention_mask": [], "status": []}
    if not examples:
        return out
    prefix, suffix = _specials(tokenizer) if add_special_tokens else ([], [])
    texts = ["".join(t for t, _ in segs) for segs in examples]
    enc = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    eos = tokenizer.eos_token_id
    for segs, ids, offsets in zip(examples, enc["input_ids"], enc["offset_mapping"]):
        spans, pos = [], 0
        for text, trained in segs:
            spans.append((pos, pos + len(text), trained))
            pos += len(text)
        bounds = {s for s, _, _ in spans[1:]}
        crosses = any(a < b < z for a, z in offsets for b in bounds)
        if crosses:
            ids, labels = _by_segment(tokenizer, segs, prefix, suffix)
        else:
            labels = []
            for tid, (a, z) in zip(ids, offsets):
                trained = z > a and any(t and s <= a and z <= e for s, e, t in spans)
                labels.append(tid if trained else IGNORE)
        ids = list(ids)
        completion = any(t and text for text, t in segs)
        if add_eos and eos is not None and completion and (not ids or ids[-1] != eos):
            ids.append(eos)
            labels.append(eos)
        status = "ok"
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            status = "truncated"
        if not any(label != IGNORE for label in labels):
            status = ("dropped: no trained token left after truncation to max_seq_length"
                      if status == "truncated" else "dropped: nothing to train on")
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["attention_mask"].append([1] * len(ids))
        out["status"].append(status)
    return out


def join(prompt: str, completion: str) -> str:
    """fms-hf-tuning's separator between input and output: a space unless one is there."""
    if prompt and completion and not prompt[-1].isspace() and not completion[0].isspace():
        return " "
    return ""
