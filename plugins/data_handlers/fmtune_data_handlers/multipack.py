"""Multipack: batches of whole examples up to a token budget, for padding-free training.

fms-hf-tuning's ``--multipack`` (fms-acceleration's multipack sampler, from
imoneoi/multipack_sampler): every epoch the example indices are permuted with
``numpy.random.default_rng(seed + epoch)``; then, from the start of the permutation, the
longest run of examples that first-fit-decreasing packs into ``num_replicas`` bins of
``max_tokens`` tokens each is one step, bin ``rank`` being this process's batch. With one
process that is the longest run whose lengths sum to at most ``max_tokens``. The budget is
fms-acceleration's: ``per_device_train_batch_size`` times the mean example length
(:func:`budget`). An example longer than the budget fills a bin alone (fms-acceleration's
sampler overfills a bin with it too; with several processes it ended the epoch there).
A batch is given to the model as one padding-free row (:class:`~.packing.FlatteningCollator`).
Pure numpy (fms-acceleration's needs numba).
"""

from __future__ import annotations

from typing import Iterator, Sequence


def budget(lengths: Sequence[int], per_device_batch_size: int) -> int:
    """fms-acceleration's bin size: ``per_device_train_batch_size * mean(lengths)`` tokens
    (whole tokens: lengths are integers, so flooring changes no batch)."""
    import math

    return max(1, math.floor(per_device_batch_size * sum(lengths) / max(1, len(lengths))))


def ffd_bins(lengths: Sequence[int], capacity: int, bins: int) -> list[list[int]] | None:
    """First-fit-decreasing of ``lengths`` (positions into it) into ``bins`` bins of
    ``capacity``; None when they do not fit. Ties keep the later position first, as
    ``numpy.argsort(...)[::-1]`` does in fms-acceleration. A length over ``capacity`` takes an
    empty bin alone."""
    import numpy as np

    order = np.argsort(np.asarray(lengths), kind="stable")[::-1]
    room = [capacity] * bins
    out: list[list[int]] = [[] for _ in range(bins)]
    for i in order:
        size = lengths[i]
        b = next((b for b in range(bins) if room[b] >= size or
                  (size > capacity and room[b] == capacity)), None)
        if b is None:
            return None
        room[b] -= min(size, capacity)
        out[b].append(int(i))
    return out


class MultipackBatchSampler:
    """A batch sampler (``torch.utils.data.DataLoader(batch_sampler=...)``) over examples of
    ``lengths`` tokens: each batch at most ``max_tokens`` tokens. Deterministic for a seed and
    epoch (``set_epoch``); every example appears once per epoch, except a last step that
    cannot give every replica a batch (with one process: none is left out). An example longer
    than ``max_tokens`` is a batch alone."""

    def __init__(self, lengths: Sequence[int], max_tokens: int, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} of {num_replicas} replicas")
        self.lengths, self.max_tokens = list(lengths), max_tokens
        self.seed, self.num_replicas, self.rank, self.epoch = seed, num_replicas, rank, 0
        self._cached: tuple[int, list[list[list[int]]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps(self) -> list[list[list[int]]]:
        """Every step of this epoch: a batch (example indices) per replica."""
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, self._steps())
        return self._cached[1]

    def _steps(self) -> list[list[list[int]]]:
        import numpy as np

        order = np.random.default_rng(self.seed + self.epoch).permutation(len(self.lengths))
        lengths = np.asarray(self.lengths, dtype=np.int64)[order]
        # an example over the budget takes one whole bin: clipped, the sum of a run that fits
        # is at most max_tokens * num_replicas, which bounds the search
        cumsum = np.cumsum(np.minimum(lengths, self.max_tokens))
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
