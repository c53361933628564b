"""Image + text conversations (fms-hf-tuning's vision format) to training rows.

A record holds a conversation in ``dataset_text_field`` (default ``messages``): OpenAI-style
messages whose ``content`` is a string or a list of ``{"type": "text", "text": ...}`` and
``{"type": "image"}`` parts, and its images in ``dataset_image_field`` (default ``images``; one
image or a list, see :mod:`fmtune_vision.images`), in order of the image parts. Files: JSONL,
JSON (a list), parquet or arrow.

Each conversation is rendered with the processor's chat template (or ``--chat_template``) and
tokenized; the assistant turns (found by rendering the conversation up to each of them, as a
prompt with the generation prompt and then with the turn) are trained, every other token is
``-100``, image placeholders included. The rows keep the rendered ``text``, its ``input_ids`` and
``labels`` with one placeholder token per image, and the image *references*; the collator
(:mod:`fmtune_vision.collator`) decodes the images, runs the processor (pixel values, the
placeholder expanded to the model's image tokens) and carries the labels over. ``max_seq_length``
counts the expanded image tokens (computed from the image sizes in the file headers): a
conversation is cut after its last image, or dropped when an image would be cut.

Every problem (a missing field, a missing or unreadable image, more image placeholders than
images) is one :class:`fmtune.records.DataError` naming the file, the line and the field,
before the model loads.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from fmtune.records import IGNORE, Counts, DataError, read_records, record_where

from . import images as imgs

log = logging.getLogger("fmtune")

DEFAULT_TEXT_FIELD = "messages"
DEFAULT_IMAGE_FIELD = "images"
FILE_TYPES = (".jsonl", ".json", ".parquet", ".arrow")
ROLES = ("system", "user", "assistant")


@dataclass
class Prepared:
    rows: dict[str, list] = field(default_factory=lambda: {
        "input_ids": [], "labels": [], "text": [], "images": [], "where": []})
    counts: Counts = field(default_factory=Counts)
    first_image_only: int = 0  # records of a one-image model that had more images
    misaligned: int = 0  # records whose prompt tokens are not a prefix of theirs


def read_source(path: str, image_field: str):
    """``(where, record, dataset)`` for each record of ``path``; ``dataset`` is the
    memory-mapped ``datasets.Dataset`` of a parquet/arrow file (images undecoded), else None."""
    low = path.lower()
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    if low.endswith((".jsonl", ".json")):
        for i, rec in enumerate(read_records(path)):
            yield record_where(path, rec, i), rec, None
        return
    if not low.endswith((".parquet", ".arrow")):
        raise DataError(f"{path}: vision data must be a {', '.join(FILE_TYPES)} file")
    ds = _undecoded(_load_table(path), image_field)
    for i in range(len(ds)):
        yield f"{path}: record {i + 1}", ds[i], ds


def _load_table(path: str):
    from datasets import Dataset

    try:
        if path.lower().endswith(".parquet"):
            return Dataset.from_parquet(path)
        return Dataset.from_file(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's many errors: one line naming the file
        raise DataError(f"{path}: not a readable {os.path.splitext(path)[1][1:]} file "
                        f"({' '.join(str(e).split())[:200]})") from None


def _undecoded(ds, column: str):
    """``ds`` with its image column (``datasets.Image``, or a list of them) left undecoded."""
    from datasets import Image

    feature = ds.features.get(column)
    if isinstance(feature, Image):
        return ds.cast_column(column, Image(decode=False))
    inner = getattr(feature, "feature", None)
    if isinstance(inner, Image):
        import copy

        undecoded = copy.deepcopy(feature)
        undecoded.feature = Image(decode=False)
        return ds.cast_column(column, undecoded)
    return ds


def parse_messages(value: Any, where: str, name: str) -> list[dict]:
    """The conversation with every content as a list of parts; :class:`DataError` naming the
    message otherwise."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {name!r} must be a non-empty list of messages, got "
                        f"{type(value).__name__ if value is not None else 'null'}")
    out = []
    for k, msg in enumerate(value, 1):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: field {name!r} message {k}: expected an object with role "
                            f"and content, got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: field {name!r} message {k}: role must be one of "
                            f"{', '.join(ROLES)}, got {role!r}")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise DataError(f"{where}: field {name!r} message {k}: content must be a string or "
                            f"a list of parts, got {type(content).__name__}")
        parts = []
        for j, part in enumerate(content, 1):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                if role == "assistant":
                    raise DataError(f"{where}: field {name!r} message {k} part {j}: an image in "
                                    "an assistant turn (models read images, they do not write "
                                    "them)")
                parts.append({"type": "image"})
            else:
                raise DataError(f"{where}: field {name!r} message {k} part {j}: expected "
                                "{\"type\": \"text\", \"text\": ...} or {\"type\": \"image\"}, "
                                f"got {part!r:.80}")
        out.append({"role": role, "content": parts})
    return out


def placeholders(messages: list[dict]) -> int:
    return sum(p["type"] == "image" for m in messages for p in m["content"])


def keep_first_image(messages: list[dict]) -> list[dict]:
    """The conversation with its image parts after the first removed."""
    seen = False
    out = []
    for m in messages:
        parts = []
        for p in m["content"]:
            if p["type"] == "image":
                if seen:
                    continue
                seen = True
            parts.append(p)
        out.append({"role": m["role"], "content": parts})
    return out


class Renderer:
    """Chat template rendering and tokenization with exact assistant masks."""

    def __init__(self, processor, chat_template: str | None) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.template = chat_template
        if chat_template is None and not getattr(processor, "chat_template", None):
            raise DataError("the processor has no chat template: set --chat_template")
        self.image_token = getattr(processor, "image_token", None)
        self.image_token_id = getattr(processor, "image_token_id", None)

    def render(self, messages: list[dict], generation: bool = False) -> str:
        return self.processor.apply_chat_template(
            messages, chat_template=self.template, tokenize=False,
            add_generation_prompt=generation)

    def spans(self, messages: list[dict], where: str, name: str) -> tuple[str, list, bool]:
        """The rendered conversation, the character spans of its assistant turns, and whether
        every prompt (up to an assistant turn, with the generation prompt) tokenizes as a
        prefix of the conversation (else a token spans the boundary: the model would be
        trained on a tokenization it never sees when generating)."""
        full = self.render(messages)
        spans, prompts = [], []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], generation=True) if i else self.render(
                [], generation=True)
            upto = self.render(messages[: i + 1])
            if not (full.startswith(upto) and upto.startswith(prompt)):
                raise DataError(f"{where}: field {name!r} message {i + 1}: the chat template "
                                "renders the conversation differently when the answer follows "
                                "the prompt, so the assistant turn cannot be located (the "
                                "trained answer would not continue the prompt seen at "
                                "inference)")
            # whitespace the template writes after the end of the turn is not the answer's
            spans.append((len(prompt), len(upto.rstrip())))
            prompts.append(prompt)
        ids = self._ids(full)
        aligned = all(ids[: len(p)] == p for p in map(self._ids, prompts))
        return full, spans, aligned

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=self.add_special(text))["input_ids"])

    def add_special(self, text: str) -> bool:
        """Whether tokenizing ``text`` adds the special tokens (not when the template already
        wrote the BOS)."""
        bos = self.tokenizer.bos_token
        return not (bos and text.startswith(bos))

    def tokenize(self, text: str, spans: list) -> tuple[list[int], list[int], list]:
        enc = self.tokenizer(text, add_special_tokens=self.add_special(text),
                             return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        labels = []
        for tid, (s, e) in zip(ids, offsets):
            trained = e > s and tid != self.image_token_id and any(
                a <= s and e <= b for a, b in spans)
            labels.append(tid if trained else IGNORE)
        return ids, labels, offsets


def image_token_counts(processor, sizes: list[tuple[int, int]]) -> list[int]:
    """How many tokens each image becomes in the model's input (from its size), via the
    processor; 1 each for models whose image token is not expanded (Mllama)."""
    if not sizes:
        return []
    counter = getattr(processor, "_get_num_multimodal_tokens", None)
    if counter is not None:
        try:
            counts = counter(image_sizes=[list(s) for s in sizes]).num_image_tokens
            if counts and len(counts) == len(sizes):
                return [int(c) for c in counts]
        except (AttributeError, TypeError, KeyError, NotImplementedError):
            pass
    return [1] * len(sizes)


def expanded_length(ids: list[int], image_id: int | None, counts: list[int]) -> int:
    n = sum(1 for t in ids if t == image_id) if image_id is not None else 0
    return len(ids) + sum(counts[:n]) - n


def fit(renderer: Renderer, text: str, spans: list, counts: list[int], max_len: int
        ) -> tuple[str, list[int], list[int], bool] | str:
    """``(text, ids, labels, truncated)`` fitting ``max_len`` model tokens, or the reason the
    conversation is dropped."""
    ids, labels, offsets = renderer.tokenize(text, spans)
    image_id = renderer.image_token_id
    if expanded_length(ids, image_id, counts) <= max_len:
        return text, ids, labels, False
    positions = [i for i, t in enumerate(ids) if t == image_id]
    for _ in range(4):  # re-tokenizing the cut text may change the tokens at the cut
        cut, total, seen = 0, 0, 0
        for i, t in enumerate(ids):
            extra = counts[seen] if t == image_id and seen < len(counts) else 1
            seen += t == image_id
            if total + extra > max_len:
                break
            total += extra
            cut = i + 1
        if positions and cut <= positions[-1]:
            return "an image beyond max_seq_length"
        text = text[: offsets[cut - 1][1]] if cut else ""
        ids, labels, offsets = renderer.tokenize(text, [(a, min(b, len(text))) for a, b in spans])
        positions = [i for i, t in enumerate(ids) if t == image_id]
        if expanded_length(ids, image_id, counts) <= max_len:
            return text, ids, labels, True
    return "could not be cut to max_seq_length"


def prepare_file(config, processor, path: str, split: str, one_image: bool,
                 chat_template: str | None) -> tuple[Prepared, Any]:
    """The rows of one data file and its memory-mapped dataset (parquet/arrow) or None."""
    text_field = config.get("dataset_text_field") or DEFAULT_TEXT_FIELD
    image_field = config.get("dataset_image_field") or DEFAULT_IMAGE_FIELD
    renderer = Renderer(processor, chat_template)
    out = Prepared()
    source = None
    for index, (where, rec, ds) in enumerate(read_source(path, image_field)):
        source = ds
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        if text_field not in rec:
            got = ", ".join(repr(k) for k in rec if k != "__line__") or "none"
            raise DataError(f"{where}: missing field {text_field!r} (the conversation, "
                            f"--dataset_text_field); fields: {got}")
        messages = parse_messages(rec[text_field], where, text_field)
        values = imgs.as_list(rec.get(image_field))
        wanted = placeholders(messages)
        if wanted > len(values):
            have = (f"field {image_field!r} has {len(values)}" if image_field in rec
                    and rec[image_field] is not None else f"there is no field {image_field!r}")
            raise DataError(f"{where}: field {text_field!r} has {wanted} image placeholder(s) "
                            f"but {have} image(s)")
        if len(values) > wanted:
            raise DataError(f"{where}: field {image_field!r} has {len(values)} image(s) but field "
                            f"{text_field!r} has {wanted} image placeholder(s) "
                            "({\"type\": \"image\"} parts)")
        if one_image and len(values) > 1:
            out.first_image_only += 1
            messages, values = keep_first_image(messages), values[:1]
        refs, sizes = [], []
        for k, value in enumerate(values):
            label = f"field {image_field!r}" + (f" image {k + 1}" if len(values) > 1 else "")
            try:
                resolved, data = imgs.resolve(value, path)
                sizes.append(imgs.check(resolved, data))
            except imgs.ImageProblem as e:
                raise DataError(f"{where}: {label}: {e}") from None
            dref = f"{imgs.DATASET_REF}{split}:{index}:{image_field}:{k}" \
                if ds is not None and data is not None else None
            refs.append(imgs.reference(resolved, data, dref))
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: field {text_field!r} has no assistant turn (nothing to "
                            "train)")
        text, spans, aligned = renderer.spans(messages, where, text_field)
        out.misaligned += not aligned
        counts = image_token_counts(processor, sizes)
        fitted = fit(renderer, text, spans, counts, config.max_seq_length)
        if isinstance(fitted, str):
            out.counts.drop(fitted)
            continue
        text, ids, labels, truncated = fitted
        if all(lab == IGNORE for lab in labels):
            out.counts.drop("no assistant tokens within max_seq_length")
            continue
        out.counts.kept += 1
        out.counts.truncated += truncated
        for key, value in (("input_ids", ids), ("labels", labels), ("text", text),
                           ("images", refs), ("where", where)):
            out.rows[key].append(value)
    return out, source


def build(config, processor, path: str, split: str, one_image: bool, model_name: str):
    """``(datasets.Dataset, source dataset or None)`` of one split, logged."""
    from datasets import Dataset

    from fmtune.records import resolve_chat_template

    template = resolve_chat_template(config.get("chat_template"))
    prepared, source = prepare_file(config, processor, path, split, one_image, template)
    if prepared.first_image_only:
        log.warning("%s takes one image per conversation: %d record(s) of %s have more; their "
                    "first image is used (the other images and their placeholders are left "
                    "out)", model_name, prepared.first_image_only, path)
    if prepared.misaligned:
        log.warning("%d record(s) of %s: the chat template's generation prompt ends inside a "
                    "token of the answer (e.g. a trailing space), so training sees the answer's "
                    "first token differently from generation; fix the template (--chat_template)",
                    prepared.misaligned, path)
    log.info("%s vision data: %s", split, prepared.counts.line())
    if not prepared.rows["input_ids"]:
        raise DataError(f"{path}: no conversation left to train on ({prepared.counts.line()})")
    return Dataset.from_dict(prepared.rows), source
