"""Online data mixing: fms-acceleration's EXP3 update rule with exact values on a toy loss
sequence, and the sampled mix following the losses."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest

from fmtune_data_handlers.odm import NO_LOSS_YET, OnlineMixer, mixed


def test_ratios_and_one_update_exactly():
    m = OnlineMixer(["b", "a"], {"a": 0.3, "b": 0.7}, gamma=0.1, eta=0.2)
    assert m.names == ["a", "b"]
    assert m.ratios == pytest.approx([0.9 * 0.3 + 0.05, 0.9 * 0.7 + 0.05])  # [0.32, 0.68]
    ratios = m.update([2.0, 1.0], [1, 1])
    w_a = 0.3 * math.exp(0.2 * (2.0 / 0.32) / 2)
    w_b = 0.7 * math.exp(0.2 * (1.0 / 0.68) / 2)
    assert m.weights == pytest.approx([w_a, w_b], rel=1e-12)
    assert ratios == pytest.approx([0.9 * w_a / (w_a + w_b) + 0.05,
                                    0.9 * w_b / (w_a + w_b) + 0.05], rel=1e-12)
    # by hand: 0.3e^0.625 = 0.560475, 0.7e^0.147059 = 0.810906 -> 0.9 * 0.408694 + 0.05
    assert ratios[0] == pytest.approx(0.4178268, abs=1e-7)  # the higher loss gains weight


def test_train_loss_reward_sequence_exactly():
    """Losses logged while arm 0, then arm 1 was sampled last: each arm keeps its last loss."""
    m = OnlineMixer(["x", "y"], gamma=0.1, eta=0.3)
    w = [1.0, 1.0]
    ratio = [0.5, 0.5]
    expected = []
    buffer = [NO_LOSS_YET, NO_LOSS_YET]
    for arm, loss in [(0, 3.0), (0, 2.5), (1, 1.0), (1, 0.8), (0, 2.0)]:
        m.arm = arm
        buffer[arm] = loss
        w = [w[k] * math.exp(0.3 * buffer[k] / ratio[k] / 2) for k in range(2)]
        ratio = [0.9 * wk / sum(w) + 0.05 for wk in w]
        expected.append(ratio)
        assert m.update_from_train_loss(loss) == pytest.approx(ratio, rel=1e-12)
    assert expected[-1][0] == pytest.approx(0.7390853, abs=1e-7)  # x (higher loss) gains
    assert expected[0][0] == pytest.approx(0.5 + 0.45 * math.tanh(0.3 * 3.0 / 0.5 / 2 / 2))
    assert m.ratios[1] >= 0.05  # gamma keeps exploring every arm


def test_the_mix_follows_the_losses():
    data = {"easy": [{"i": f"e{k}"} for k in range(5)], "hard": [{"i": f"h{k}"} for k in range(7)]}
    m = OnlineMixer(list(data), seed=0, gamma=0.1, eta=0.3)
    stream = mixed(data, m)
    before = Counter(name for name, _ in itertools.islice(stream, 400))
    assert 150 < before["easy"] < 250  # equal weights: about half each
    for _ in range(5):  # the hard dataset's loss stays high, the easy one's is low
        m.arm = m.names.index("hard")
        m.update_from_train_loss(3.0)
        m.arm = m.names.index("easy")
        m.update_from_train_loss(0.1)
    after = Counter(name for name, _ in itertools.islice(stream, 400))
    assert after["hard"] > 300 and after["hard"] > before["hard"] + 100
    # a dataset that runs out starts again, in order
    seen = [ex["i"] for name, ex in itertools.islice(mixed(data, OnlineMixer(list(data), seed=1)), 60)
            if name == "easy"]
    assert seen[:7] == ["e0", "e1", "e2", "e3", "e4", "e0", "e1"]


def test_deterministic_and_resumable():
    def draws(m, n):
        return [m.next_arm() for _ in range(n)]

    a, b = OnlineMixer(["p", "q", "r"], seed=9), OnlineMixer(["p", "q", "r"], seed=9)
    assert draws(a, 50) == draws(b, 50)
    state = a.state_dict()
    rest = draws(a, 30)
    c = OnlineMixer(["p", "q", "r"], seed=0)
    c.load_state_dict(state)
    assert draws(c, 30) == rest
    s = OnlineMixer(["p", "q"], seed=3, sampling_interval=4)
    arms = draws(s, 16)
    assert all(len(set(arms[i:i + 4])) == 1 for i in range(0, 16, 4))
