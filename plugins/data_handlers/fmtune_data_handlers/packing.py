"""Padding-free batches and packing, with no attention across examples.

Both hand the model one flat row per batch with ``position_ids`` that restart
at 0 for every example, no ``attention_mask`` and no KV cache: transformers then builds a
block-diagonal causal mask (eager/sdpa) or uses varlen kernels
(flash_attention_2), so an example never attends to another. The label of
each example's first token is -100, so no token is trained to predict the
start of the next example.
"""

from __future__ import annotations

IGNORE = -100


def pack(dataset, max_length: int):
    """Group examples (first-fit decreasing by length) into rows of at most ``max_length`` tokens."""
    from datasets import Dataset

    lengths = [len(ids) for ids in dataset["input_ids"]]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_length - lengths[i])
    ids, labels = dataset["input_ids"], dataset["labels"]
    rows = {"input_ids": [], "labels": [], "position_ids": []}
    for members in sorted(bins, key=lambda m: min(m)):
        members = sorted(members)
        rows["input_ids"].append([t for i in members for t in ids[i]])
        rows["labels"].append([t for i in members for t in labels[i]])
        rows["position_ids"].append([p for i in members for p in range(lengths[i])])
    return Dataset.from_dict(rows)


class FlatteningCollator:
    """Concatenates a batch into one row; ``position_ids`` restart per example."""

    def __call__(self, rows):
        import torch

        ids, labels, positions = [], [], []
        for row in rows:
            pos = list(row.get("position_ids") or range(len(row["input_ids"])))
            lab = list(row["labels"])
            for k, p in enumerate(pos):
                if p == 0:
                    lab[k] = IGNORE
            ids += list(row["input_ids"])
            labels += lab
            positions += pos
        # use_cache=False: with a KV cache, transformers does not derive the per-example
        # (block-diagonal) mask from position_ids, and examples would attend to each other.
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions]), "use_cache": False}
