"""Online data mixing (fms-hf-tuning's ``dataprocessor.type: odm``, fms-acceleration's
``OnlineMixingDataset``): the datasets are arms of an EXP3 multi-armed bandit.

* sampling ratio of arm k: ``(1 - gamma) * w_k / sum(w) + gamma / K``;
* every ``sampling_interval`` examples an arm is drawn with those ratios (``random.Random``
  seeded with ``seed``) and the next example of that dataset is given (a dataset that runs
  out starts again);
* update (every ``update_interval`` steps) with the rewards of the arms:
  ``w_k *= exp(eta * (reward_k / count_k) / ratio_k / K)``, then the ratios are recomputed.
* ``reward_type: train_loss`` (fms-acceleration's rule): each arm keeps the last training loss
  logged while it was the arm sampled last (1e-100 before any); that is its reward, count 1.
  A dataset whose loss stays high is sampled more.

The initial weights are the datasets' ``sampling`` ratios (equal when none is given).
This module is the mixer and the mixing stream; the training wiring is not done yet.
"""

from __future__ import annotations

import math
import random
from typing import Any, Iterator, Sequence

NO_LOSS_YET = 1e-100


class OnlineMixer:
    """EXP3 weights and sampling ratios over ``names`` (sorted, as fms-acceleration does)."""

    def __init__(self, names: Sequence[str], weights: dict[str, float] | None = None,
                 gamma: float = 0.1, eta: float = 0.3, seed: int = 42,
                 sampling_interval: int = 1) -> None:
        self.names = sorted(names)
        self.gamma, self.eta, self.sampling_interval = gamma, eta, sampling_interval
        self.weights = [float(weights[n]) if weights else 1.0 for n in self.names]
        self.ratios = self._ratios()
        self.rng = random.Random(seed)
        self.produced, self.arm = 0, 0
        self.last_loss = [NO_LOSS_YET] * len(self.names)  # the train_loss reward buffer

    def _ratios(self) -> list[float]:
        total, k = sum(self.weights), len(self.weights)
        return [(1 - self.gamma) * w / total + self.gamma / k for w in self.weights]

    def next_arm(self) -> int:
        """The arm of the next example (drawn every ``sampling_interval`` examples)."""
        if self.produced % self.sampling_interval == 0:
            self.arm = self.rng.choices(range(len(self.names)), weights=self.ratios, k=1)[0]
        self.produced += 1
        return self.arm

    def update(self, rewards: Sequence[float], counts: Sequence[float]) -> list[float]:
        """One EXP3 update; returns the new sampling ratios."""
        k = len(self.names)
        for arm in range(k):
            estimate = rewards[arm] / counts[arm] / self.ratios[arm]
            self.weights[arm] *= math.exp(self.eta * estimate / k)
        self.ratios = self._ratios()
        return self.ratios

    def update_from_train_loss(self, loss: float) -> list[float]:
        """fms-acceleration's ``train_loss`` reward: ``loss`` (the last logged training loss)
        is credited to the arm sampled last; every arm's reward is its last credited loss."""
        self.last_loss[self.arm] = loss
        return self.update(list(self.last_loss), [1] * len(self.names))

    def state_dict(self) -> dict[str, Any]:
        return {"weights": list(self.weights), "ratios": list(self.ratios),
                "rng": self.rng.getstate(), "produced": self.produced, "arm": self.arm,
                "last_loss": list(self.last_loss)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights, self.ratios = list(state["weights"]), list(state["ratios"])
        self.rng.setstate(state["rng"])
        self.produced, self.arm = state["produced"], state["arm"]
        self.last_loss = list(state["last_loss"])


def mixed(datasets: dict[str, Any], mixer: OnlineMixer) -> Iterator[tuple[str, Any]]:
    """Endless ``(dataset name, example)`` pairs drawn with the mixer's current ratios (read
    at every draw, so an update changes the mix from the next example on)."""
    iters = {n: iter(datasets[n]) for n in mixer.names}
    while True:
        name = mixer.names[mixer.next_arm()]
        try:
            example = next(iters[name])
        except StopIteration:  # a dataset that runs out starts again
            iters[name] = iter(datasets[name])
            example = next(iters[name])
        yield name, example
