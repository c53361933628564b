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
:class:`MixingStream` is what the Trainer trains on (``dataprocessor.type: odm``); the plugin
(:mod:`.plugin`) credits each logged loss to it and saves its updates in checkpoints.
"""

from __future__ import annotations

import math
import random
from typing import Any, Iterator, Sequence

from torch.utils.data import IterableDataset

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
            self.weights[arm] *= math.exp(min(self.eta * estimate / k, 700.0))
        top = max(self.weights)
        if top > 1e200:  # rescaled (the ratios do not change) before the weights overflow
            self.weights = [w / top for w in self.weights]
        self.ratios = self._ratios()
        return self.ratios

    def update_from_train_loss(self, loss: float, arm: int | None = None) -> list[float]:
        """fms-acceleration's ``train_loss`` reward: ``loss`` (the last logged training loss)
        is credited to ``arm`` (default: the arm sampled last); every arm's reward is its last
        credited loss."""
        self.last_loss[self.arm if arm is None else arm] = loss
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


ODM_STATE = "odm_state.json"


class MixingStream(IterableDataset):
    """An endless ``torch.utils.data.IterableDataset`` of training rows (``input_ids``,
    ``labels``) drawn from ``datasets`` (name -> dataset) with an :class:`OnlineMixer`.

    The loss logged at a step is credited (:meth:`credit`) to the dataset of the *last example
    trained* by then (fms-acceleration credits the arm sampled last, which the dataloader's
    read-ahead makes the next batch's). Every update is recorded as ``(examples drawn so far,
    arm, loss)``; a resumed run replays the recorded updates at the same points while the
    Trainer skips the batches it already trained, so it continues with the same examples, the
    same ratios and the same random state as the uninterrupted run.
    """

    def __init__(self, datasets: dict[str, Any], weights: dict[str, float] | None = None,
                 gamma: float = 0.1, eta: float = 0.3, seed: int = 42,
                 sampling_interval: int = 1) -> None:
        self.datasets = datasets
        self.params = dict(weights=weights, gamma=gamma, eta=eta, seed=seed,
                           sampling_interval=sampling_interval)
        self.mixer = OnlineMixer(list(datasets), **self.params)
        self.arms: list[int] = []  # the arm of every example drawn, in order
        self.updates: list[tuple[int, int, float]] = []  # (drawn, arm, loss)
        self.replay: list[tuple[int, int, float]] = []

    @property
    def names(self) -> list[str]:
        return self.mixer.names

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.mixer = OnlineMixer(list(self.datasets), **self.params)
        self.arms, pending, self.updates = [], list(self.replay), []
        iters = {n: iter(self.datasets[n]) for n in self.mixer.names}
        while True:
            while pending and pending[0][0] <= self.mixer.produced:
                drawn, arm, loss = pending.pop(0)
                self._update(arm, loss)
            arm = self.mixer.next_arm()
            name = self.mixer.names[arm]
            try:
                row = next(iters[name])
            except StopIteration:  # a dataset that runs out starts again
                iters[name] = iter(self.datasets[name])
                row = next(iters[name])
            self.arms.append(arm)
            yield {"input_ids": list(row["input_ids"]), "labels": list(row["labels"])}

    def _update(self, arm: int, loss: float) -> None:
        self.mixer.update_from_train_loss(loss, arm)
        self.updates.append((self.mixer.produced, arm, loss))

    def credit(self, trained: int, loss: float) -> int:
        """An update with ``loss``, logged when ``trained`` examples were trained: credited to
        the dataset of the last of them; returns its arm."""
        arm = self.arms[trained - 1] if 0 < trained <= len(self.arms) else self.mixer.arm
        self._update(arm, loss)
        return arm

    def sampled(self, start: int, end: int) -> dict[str, int]:
        """How many of the examples ``start`` to ``end`` (drawn order) came from each dataset."""
        counts = dict.fromkeys(self.names, 0)
        for arm in self.arms[start:end]:
            counts[self.names[arm]] += 1
        return counts

    def state_dict(self) -> dict[str, Any]:
        return {"datasets": self.names, "updates": [list(u) for u in self.updates],
                "sampling_weights": list(self.mixer.weights),
                "sampling_ratios": list(self.mixer.ratios)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replay the updates of a checkpoint (the next iteration starts over from them)."""
        if state.get("datasets") != self.names:
            raise ValueError(f"the checkpoint mixed datasets {state.get('datasets')}, this run "
                             f"mixes {self.names}")
        self.replay = [(int(d), int(a), float(x)) for d, a, x in state["updates"]]
