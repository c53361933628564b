"""Online data mixing (fms-hf-tuning's ``dataprocessor.type: odm``, fms-acceleration's
``OnlineMixingDataset``): the datasets are arms of an EXP3 multi-armed bandit.

* sampling ratio of arm k: ``(1 - gamma) * w_k / sum(w) + gamma / K``;
* every ``sampling_interval`` examples an arm is drawn with those ratios (``random.Random``
  seeded with ``seed``) and the next example of that dataset is given (a dataset that runs
  out starts again);
* update (every ``update_interval`` steps) with the rewards of the arms:
  ``w_k *= exp(eta * (reward_k / count_k) / ratio_k / K)``, then the ratios are recomputed.

The rewards (``reward_type``, fms-acceleration's ``odm/reward.py``):

* ``train_loss``: each arm keeps the last training loss logged while it was the arm sampled
  last (1e-100 before any); that is its reward, count 1. A dataset whose loss stays high is
  sampled more.
* ``gradnorm``: the same credit rule with ``1 / (grad_norm + 0.0001)`` of the logged
  grad_norm: a dataset whose steps have small gradients is sampled more.
* ``entropy`` (fms-hf-tuning's default), ``entropy3_varent1``, ``entropy_last_token``: the
  model is run over each dataset's validation split (:func:`sequence_entropies`); reward_k is
  the sum over its sequences of the normalized mean entropy (``0.75 * entropy + 0.25 *
  varentropy``; the entropy of the prediction of the last token), count_k their number.
* ``validation_loss``: reward_k is the model's mean loss on dataset k's validation split,
  count 1.

The initial weights are the datasets' ``sampling`` ratios (equal when none is given).
:class:`MixingStream` is what the Trainer trains on (``dataprocessor.type: odm``); the plugin
(:mod:`.plugin`) computes the rewards, hands them to it and saves its updates in checkpoints.
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
        return self.update_from_credit(loss, arm)

    def update_from_credit(self, value: float, arm: int | None = None) -> list[float]:
        """The credit rule of the ``train_loss`` and ``gradnorm`` rewards: ``value`` is kept
        as ``arm``'s (default: the arm sampled last) in a buffer of the last value credited
        to each arm (1e-100 for an arm never credited), and the buffer is the reward vector,
        count 1 each."""
        self.last_loss[self.arm if arm is None else arm] = value
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


def gradnorm_reward(grad_norm: float) -> float:
    """fms-acceleration's ``gradnorm`` reward of a logged grad_norm."""
    return 1 / (grad_norm + 0.0001)


def sequence_entropies(logits, attention_mask=None, position_ids=None):
    """Per sequence of a batch, fms-acceleration's entropy measures (``odm/reward.py``),
    each normalized by ``log(vocab size)`` and clamped to [0, 1]: ``(entropy, varentropy,
    last)`` tensors of one value per sequence.

    Over the positions that predict a next token of the same sequence (``logits[:, :-1]``
    masked by ``attention_mask[:, 1:]``): the mean of the token entropies ``H = -sum p log p``
    (``entropy``) and of the varentropies ``sum p (log p)^2 - H^2`` (``varentropy``, divided by
    ``log(V)^2``); ``last`` is the entropy of the prediction of the sequence's last token.
    fms-acceleration takes ``entropy[:, -1]``, the same for a row without right padding; here
    it is the last unmasked position, so a right-padded row gives its own last token's, not
    a pad's. A batch flattened by padding_free (one row, ``position_ids`` restarting at 0 for
    every example, no ``attention_mask``) is split into its examples. ``V`` is
    ``logits.shape[-1]``, the model's real vocabulary (fms-acceleration passes 32000 whatever
    the model). A sequence of one token predicts nothing and is left out (fms gives NaN).
    Computed in float32."""
    import torch
    import torch.nn.functional as F

    logits = logits.float()
    rows, length, vocab = logits.shape
    log_probs = F.log_softmax(logits[:, :-1, :], dim=-1)
    probs = torch.exp(log_probs)
    entropy = -torch.sum(probs * log_probs, dim=-1)  # [rows, length - 1]
    varentropy = torch.sum(probs * log_probs ** 2, dim=-1) - entropy ** 2
    device = entropy.device
    if attention_mask is None and position_ids is not None:  # padding_free: examples by position
        position_ids = position_ids.to(device)
        starts = position_ids == 0
        starts[:, 0] = True
        seq = torch.cumsum(starts.reshape(-1).long(), 0).reshape(rows, length) - 1
        valid = ~starts[:, 1:]  # the next token continues the same example
        seq = seq[:, :-1]
    else:
        mask = (torch.ones(rows, length, device=device) if attention_mask is None
                else attention_mask.to(device))
        valid = mask[:, 1:] > 0
        seq = torch.arange(rows, device=device).unsqueeze(1).expand(rows, length - 1)
    n = int(seq.max().item()) + 1 if seq.numel() else rows
    seq, entropy, varentropy = seq[valid], entropy[valid], varentropy[valid]
    index = torch.arange(valid.numel(), device=device).reshape(valid.shape)[valid]
    tokens = torch.zeros(n, device=device).index_add_(0, seq, torch.ones_like(entropy))
    keep = tokens > 0
    mean_h = torch.zeros(n, device=device).index_add_(0, seq, entropy)[keep] / tokens[keep]
    mean_v = torch.zeros(n, device=device).index_add_(0, seq, varentropy)[keep] / tokens[keep]
    last_at = torch.full((n,), -1, device=device, dtype=torch.long).scatter_reduce(
        0, seq, index, reduce="amax")
    by_position = torch.zeros(valid.numel(), device=device)
    by_position[index] = entropy
    last = by_position[last_at[keep]]  # the entropy at each sequence's last valid position
    max_entropy = math.log(vocab)
    return ((mean_h / max_entropy).clamp(0.0, 1.0),
            (mean_v / max_entropy ** 2).clamp(0.0, 1.0),
            (last / max_entropy).clamp(0.0, 1.0))


def entropy_reward(reward_type: str, logits, attention_mask=None, position_ids=None):
    """``(reward, count)`` of one batch for an entropy reward: the sum over its sequences of
    fms-acceleration's per-sequence value, and the number of sequences."""
    entropy, varentropy, last = sequence_entropies(logits, attention_mask, position_ids)
    if reward_type == "entropy":
        value = entropy.sum().item()
    elif reward_type == "entropy3_varent1":
        value = 0.75 * entropy.sum().item() + 0.25 * varentropy.sum().item()
    elif reward_type == "entropy_last_token":
        value = last.sum().item()
    else:
        raise ValueError(f"not an entropy reward: {reward_type!r}")
    return value, int(entropy.numel())


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

    With ``train_loss`` and ``gradnorm`` the value logged at a step is credited
    (:meth:`credit`) to the dataset of the *last example trained* by then (fms-acceleration
    credits the arm sampled last, which the dataloader's read-ahead makes the next batch's);
    the other rewards hand a whole reward vector (:meth:`update`). Every update is recorded,
    as ``(examples drawn so far, arm, value)`` for a credit and ``(examples drawn so far,
    rewards, counts)`` for a vector; a resumed run replays the recorded updates at the same
    points while the Trainer skips the batches it already trained, so it continues with the
    same examples, the same ratios and the same random state as the uninterrupted run.
    """

    def __init__(self, datasets: dict[str, Any], weights: dict[str, float] | None = None,
                 gamma: float = 0.1, eta: float = 0.3, seed: int = 42,
                 sampling_interval: int = 1, reward_type: str = "train_loss") -> None:
        self.datasets = datasets
        self.reward_type = reward_type
        self.params = dict(weights=weights, gamma=gamma, eta=eta, seed=seed,
                           sampling_interval=sampling_interval)
        self.mixer = OnlineMixer(list(datasets), **self.params)
        self.arms: list[int] = []  # the arm of every example drawn, in order
        # (drawn, arm, value) or (drawn, [reward per arm], [count per arm])
        self.updates: list[tuple[int, Any, Any]] = []
        self.replay: list[tuple[int, Any, Any]] = []

    @property
    def names(self) -> list[str]:
        return self.mixer.names

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.mixer = OnlineMixer(list(self.datasets), **self.params)
        self.arms, pending, self.updates = [], list(self.replay), []
        iters = {n: iter(self.datasets[n]) for n in self.mixer.names}
        while True:
            while pending and pending[0][0] <= self.mixer.produced:
                self._apply(*pending.pop(0)[1:])
            arm = self.mixer.next_arm()
            name = self.mixer.names[arm]
            try:
                row = next(iters[name])
            except StopIteration:  # a dataset that runs out starts again
                iters[name] = iter(self.datasets[name])
                row = next(iters[name])
            self.arms.append(arm)
            yield {"input_ids": list(row["input_ids"]), "labels": list(row["labels"])}

    def _apply(self, what: Any, value: Any) -> None:
        if isinstance(what, list):  # a reward vector and its counts
            self.mixer.update(what, value)
            self.updates.append((self.mixer.produced, list(what), list(value)))
        else:  # a value credited to an arm
            self.mixer.update_from_credit(value, what)
            self.updates.append((self.mixer.produced, what, value))

    def credit(self, trained: int, value: float) -> int:
        """An update with ``value`` (a loss, or a gradnorm reward), logged when ``trained``
        examples were trained: credited to the dataset of the last of them; returns its arm."""
        arm = self.arms[trained - 1] if 0 < trained <= len(self.arms) else self.mixer.arm
        self._apply(arm, float(value))
        return arm

    def update(self, rewards: Sequence[float], counts: Sequence[float]) -> list[float]:
        """An update with a reward and a count per arm (in :attr:`names` order); returns the
        new sampling ratios."""
        if len(rewards) != len(self.names) or len(counts) != len(self.names):
            raise ValueError(f"{len(self.names)} rewards and counts expected, got "
                             f"{len(rewards)} and {len(counts)}")
        self._apply([float(r) for r in rewards], [float(c) for c in counts])
        return self.mixer.ratios

    def sampled(self, start: int, end: int) -> dict[str, int]:
        """How many of the examples ``start`` to ``end`` (drawn order) came from each dataset."""
        counts = dict.fromkeys(self.names, 0)
        for arm in self.arms[start:end]:
            counts[self.names[arm]] += 1
        return counts

    def state_dict(self) -> dict[str, Any]:
        return {"datasets": self.names, "reward_type": self.reward_type,
                "updates": [list(u) for u in self.updates],
                "sampling_weights": list(self.mixer.weights),
                "sampling_ratios": list(self.mixer.ratios)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replay the updates of a checkpoint (the next iteration starts over from them).
        A checkpoint without ``reward_type`` was written by a train_loss-only fmtune."""
        if state.get("datasets") != self.names:
            raise ValueError(f"the checkpoint mixed datasets {state.get('datasets')}, this run "
                             f"mixes {self.names}")
        saved = state.get("reward_type", "train_loss")
        if saved != self.reward_type:
            raise ValueError(f"the checkpoint mixed with reward_type {saved}, this run with "
                             f"{self.reward_type}")
        replay = []
        for drawn, what, value in state["updates"]:
            if isinstance(what, list):
                if len(what) != len(self.names) or len(value) != len(self.names):
                    raise ValueError(f"an update of {len(what)} rewards, this run mixes "
                                     f"{len(self.names)} datasets")
                replay.append((int(drawn), [float(r) for r in what], [float(c) for c in value]))
            else:
                replay.append((int(drawn), int(what), float(value)))
        self.replay = replay
