"""The batch: images decoded and run through the processor (pixel values, image tokens), with
the rows' labels carried over onto the processor's tokens."""

from __future__ import annotations

from typing import Any

from fmtune.records import IGNORE

from . import images as imgs

# processor outputs the models here do not take
DROPPED = ("token_type_ids", "mm_token_type_ids", "offset_mapping")


class VisionCollator:
    """``rows -> batch``: ``input_ids``, ``attention_mask``, ``labels`` and the model's image
    inputs (``pixel_values``, ``image_sizes``, ``aspect_ratio_ids``, ``cross_attention_mask``,
    ...). ``nested``: the processor takes one list of images per conversation (Mllama), else
    one flat list. ``sources``: the memory-mapped parquet/arrow datasets of the splits (for
    ``dataset:`` image references)."""

    def __init__(self, processor, nested: bool, sources: dict[str, Any] | None = None) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.nested = nested
        self.sources = sources or {}
        self.image_token_id = getattr(processor, "image_token_id", None)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        texts = [r["text"] for r in rows]
        per_row = [[imgs.load(ref, self.sources) for ref in r["images"]] for r in rows]
        kwargs: dict[str, Any] = {}
        if any(per_row):
            kwargs["images"] = per_row if self.nested else [i for row in per_row for i in row]
        bos = self.tokenizer.bos_token
        add_special = not (bos and texts[0].startswith(bos))
        batch = self.processor(text=texts, padding=True, return_tensors="pt",
                               add_special_tokens=add_special, **kwargs)
        for key in DROPPED:
            batch.pop(key, None)
        batch["labels"] = self.labels(rows, batch["input_ids"], batch["attention_mask"])
        return dict(batch)

    def labels(self, rows, input_ids, attention_mask):
        """The rows' labels on the processor's tokens: image tokens and padding -100; the other
        tokens must be the rows' own, in order."""
        import torch

        labels = torch.full_like(input_ids, IGNORE)
        for b, row in enumerate(rows):
            own = [(t, lab) for t, lab in zip(row["input_ids"], row["labels"])
                   if t != self.image_token_id]
            positions = [p for p in range(input_ids.shape[1]) if attention_mask[b, p]
                         and int(input_ids[b, p]) != self.image_token_id]
            got = [int(input_ids[b, p]) for p in positions]
            if got != [t for t, _ in own]:
                raise RuntimeError(f"{row.get('where', 'a record')}: the processor tokenized the "
                                   "conversation differently from the prepared row (tokenizer "
                                   "or chat template changed since the data was prepared?)")
            for p, (_, lab) in zip(positions, own):
                labels[b, p] = lab
        return labels
