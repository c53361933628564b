"""Multipack: batches of whole examples up to a token budget, for padding-free training.

fms-hf-tuning's ``--multipack`` (fms-acceleration's multipack sampler, from
imoneoi/multipack_sampler): every epoch the example indices are permuted with
``numpy.random.default_rng(seed + epoch)``; then, from the start of the permutation, the
longest run of examples that first-fit-decreasing packs into ``num_replicas`` bins of
``max_tokens`` tokens each is one step, bin ``rank`` being this process's batch. With one
process that is the longest run whose lengths sum to at most ``max_tokens``. A batch is given
to the model as one padding-free row (:class:`~.packing.FlatteningCollator`), so a step costs
about ``max_tokens`` tokens whatever the lengths. Pure numpy (fms-acceleration's needs numba).
"""

from __future__ import annotations

from typing import Iterator, Sequence


def ffd_bins(lengths: Sequence[int], capacity: int, bins: int) -> list[list[int]] | None:
    """First-fit-decreasing of ``lengths`` (positions into it) into ``bins`` bins of
    ``capacity``; None when they do not fit. Ties keep the later position first, as
    ``numpy.argsort(...)[::-1]`` does in fms-acceleration."""
    import numpy as np

    order = np.argsort(np.asarray(lengths), kind="stable")[::-1]
    room = [capacity] * bins
    out: list[list[int]] = [[] for _ in range(bins)]
    for i in order:
        size = lengths[i]
        b = next((b for b in range(bins) if room[b] >= size), None)
        if b is None:
            return None
        room[b] -= size
        out[b].append(int(i))
    return out


class MultipackBatchSampler:
    """A batch sampler (``torch.utils.data.DataLoader(batch_sampler=...)``) over examples of
    ``lengths`` tokens: each batch at most ``max_tokens`` tokens. Deterministic for a seed and
    epoch (``set_epoch``); every example appears once per epoch, except a last step that
    cannot give every replica a batch (with one process: none is left out)."""

    def __init__(self, lengths: Sequence[int], max_tokens: int, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0) -> None:
        too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
        if too_long:
            raise ValueError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens, more "
                             f"than the multipack budget of {max_tokens}")
        self.lengths, self.max_tokens = list(lengths), max_tokens
        self.seed, self.num_replicas, self.rank, self.epoch = seed, num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps(self) -> list[list[list[int]]]:
        """Every step of this epoch: a batch (example indices) per replica."""
        import numpy as np

        order = np.random.default_rng(self.seed + self.epoch).permutation(len(self.lengths))
        lengths = np.asarray(self.lengths, dtype=np.int64)[order]
        cumsum = np.cumsum(lengths)
        out, start, done = [], 0, 0
        while start < len(order):
            # the longest run from ``start`` that fits: binary search as fms-acceleration does
            lo = 1
            hi = 1 + int(np.searchsorted(cumsum[start:], done + self.max_tokens * self.num_replicas,
                                         "right"))
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if ffd_bins(lengths[start:start + mid], self.max_tokens, self.num_replicas):
                    lo = mid
                else:
                    hi = mid
            bins = ffd_bins(lengths[start:start + lo], self.max_tokens, self.num_replicas)
            if any(not b for b in bins):  # not enough examples left for every replica
                break
            out.append([[int(order[start + i]) for i in b] for b in bins])
            start += lo
            done = int(cumsum[start - 1])
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter([step[self.rank] for step in self.steps()])

    def __len__(self) -> int:
        return len(self.steps())

    def efficiency(self) -> float:
        """Tokens in the batches / the tokens the steps could hold."""
        steps = self.steps()
        used = sum(self.lengths[i] for step in steps for b in step for i in b)
        return used / max(1, len(steps) * self.max_tokens * self.num_replicas)
