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


# ------------------------------------------------ rewards beyond train_loss (fms-acceleration)

def tiny_llama(vocab: int = 37, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      pad_token_id=0, bos_token_id=None, eos_token_id=1,
                      initializer_range=0.5)  # spread logits: varentropy well above 0
    return LlamaForCausalLM(cfg)


SEQS = [[5, 9, 3, 7, 2, 8], [4, 4, 11], [6, 30, 12, 14, 2], [19, 3]]


def direct(model, seq):
    """Per sequence, run alone (no padding): fms-acceleration's normalized mean entropy,
    mean varentropy and the last token's entropy, and the summed token loss, by hand."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0].double()
    v = logits.shape[-1]
    hs, vs, nll = [], [], 0.0
    for t in range(len(seq) - 1):
        p = torch.softmax(logits[t], -1)
        h = float(-(p * torch.log(p)).sum())
        hs.append(h)
        vs.append(float((p * torch.log(p) ** 2).sum()) - h * h)
        nll -= float(torch.log(p[seq[t + 1]]))
    return (sum(hs) / len(hs) / math.log(v), sum(vs) / len(vs) / math.log(v) ** 2,
            hs[-1] / math.log(v), nll, len(seq) - 1)


def pad_collator(rows):
    """Right padding with 0, labels -100 (as DataCollatorForSeq2Seq pads)."""
    import torch

    n = max(len(r["input_ids"]) for r in rows)
    return {"input_ids": torch.tensor([r["input_ids"] + [0] * (n - len(r["input_ids"]))
                                       for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r["input_ids"]) +
                                            [0] * (n - len(r["input_ids"])) for r in rows]),
            "labels": torch.tensor([r["labels"] + [-100] * (n - len(r["labels"]))
                                    for r in rows])}


def trainer_like(model, collator, eval_batch_size):
    from types import SimpleNamespace

    import torch

    return SimpleNamespace(model=model, data_collator=collator, args=SimpleNamespace(
        per_device_eval_batch_size=eval_batch_size, device=torch.device("cpu")))


def test_entropy_of_a_padded_batch_equals_each_sequence_alone():
    import torch

    from fmtune_data_handlers.odm import entropy_reward, sequence_entropies

    model = tiny_llama().eval()
    want = [direct(model, s) for s in SEQS]
    batch = pad_collator([{"input_ids": s, "labels": s} for s in SEQS])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
    entropy, varentropy, last = sequence_entropies(logits, batch["attention_mask"])
    assert entropy.tolist() == pytest.approx([w[0] for w in want], rel=1e-5)
    assert varentropy.tolist() == pytest.approx([w[1] for w in want], rel=1e-4)
    # the last *real* token of a right-padded row, not the pad at the row's end
    assert last.tolist() == pytest.approx([w[2] for w in want], rel=1e-5)
    assert 0.2 < min(entropy.tolist()) and max(entropy.tolist()) < 0.8  # not clamped
    # rewards: sums over the sequences, count = the sequences
    reward, count = entropy_reward("entropy", logits, batch["attention_mask"])
    assert count == 4 and reward == pytest.approx(sum(w[0] for w in want), rel=1e-5)
    reward, _ = entropy_reward("entropy3_varent1", logits, batch["attention_mask"])
    assert reward == pytest.approx(sum(0.75 * w[0] + 0.25 * w[1] for w in want), rel=1e-5)
    reward, _ = entropy_reward("entropy_last_token", logits, batch["attention_mask"])
    assert reward == pytest.approx(sum(w[2] for w in want), rel=1e-5)
    # normalized by the model's vocabulary (37), not fms-acceleration's fixed 32000
    assert entropy[0].item() == pytest.approx(want[0][0], rel=1e-5)
    assert want[0][0] * math.log(37) / math.log(32000) < 0.4 < entropy[0].item()


def test_validation_rewards_over_batches_padded_and_padding_free():
    from fmtune_data_handlers.packing import FlatteningCollator
    from fmtune_data_handlers.plugin import validation_rewards

    model = tiny_llama(seed=3)
    model.train()
    from datasets import Dataset

    # batches of 2: [0, 1], [2] and [2, 3]
    a = Dataset.from_list([{"input_ids": s, "labels": s} for s in SEQS[:3]])
    b = Dataset.from_list([{"input_ids": s, "labels": [-100] + s[1:]} for s in SEQS[2:]])
    want = {i: direct(model.eval(), s) for i, s in enumerate(SEQS)}
    model.train()
    for collator in (pad_collator, FlatteningCollator()):
        for reward, k in (("entropy", 0), ("entropy_last_token", 2)):
            rewards, counts = validation_rewards(trainer_like(model, collator, 2), reward, [a, b])
            assert counts == [3.0, 2.0]
            assert rewards == pytest.approx([sum(want[i][k] for i in (0, 1, 2)),
                                             sum(want[i][k] for i in (2, 3))], rel=1e-5)
            assert model.training  # back in train mode
    rewards, counts = validation_rewards(trainer_like(model, pad_collator, 2), "validation_loss",
                                         [a, b])
    # each batch's loss is its tokens' mean; the batches are weighted by their rows
    batch1 = (want[0][3] + want[1][3]) / (want[0][4] + want[1][4])
    assert counts == [1.0, 1.0]
    assert rewards[0] == pytest.approx((batch1 * 2 + want[2][3] / want[2][4]) / 3, rel=1e-5)
    # (the label at position 0 is never predicted: -100 there changes nothing)
    assert rewards[1] == pytest.approx(
        (want[2][3] + want[3][3]) / (want[2][4] + want[3][4]), rel=1e-5)


def test_gradnorm_credit_rule_exactly():
    from fmtune_data_handlers.odm import MixingStream, gradnorm_reward

    assert gradnorm_reward(0.5) == 1 / 0.5001 and gradnorm_reward(0.0) == 1 / 0.0001
    data = {"p": [{"input_ids": [1], "labels": [1]}] * 3,
            "q": [{"input_ids": [2], "labels": [2]}] * 3}
    stream = MixingStream(data, gamma=0.2, eta=0.1, seed=4, reward_type="gradnorm")
    rows = iter(stream)
    drawn = [next(rows)["input_ids"][0] for _ in range(6)]
    buffer, w, ratio = [NO_LOSS_YET, NO_LOSS_YET], [1.0, 1.0], [0.5, 0.5]
    for trained, grad_norm in [(2, 2.0), (4, 0.25), (6, 1.0)]:
        arm = stream.credit(trained, gradnorm_reward(grad_norm))
        assert arm == drawn[trained - 1] - 1  # the dataset of the last example trained
        buffer[arm] = 1 / (grad_norm + 0.0001)
        w = [w[k] * math.exp(0.1 * buffer[k] / ratio[k] / 2) for k in range(2)]
        ratio = [0.8 * wk / sum(w) + 0.1 for wk in w]
        assert stream.mixer.ratios == pytest.approx(ratio, rel=1e-12)
        assert stream.mixer.last_loss == pytest.approx(buffer, rel=1e-12)
    assert [u[1:] for u in stream.updates] == [(drawn[1] - 1, 1 / 2.0001),
                                               (drawn[3] - 1, 1 / 0.2501),
                                               (drawn[5] - 1, 1 / 1.0001)]


def test_vector_updates_replay_and_old_checkpoints_load():
    import itertools
    import json

    from fmtune_data_handlers.odm import MixingStream

    data = {"a": [{"input_ids": [i], "labels": [i]} for i in range(5)],
            "b": [{"input_ids": [100 + i], "labels": [100 + i]} for i in range(7)]}
    live = MixingStream(data, gamma=0.1, eta=0.5, seed=2, reward_type="entropy")
    rows = iter(live)
    seen = [next(rows)["input_ids"][0] for _ in range(10)]
    assert live.update([3.0, 0.5], [3, 2]) == live.mixer.ratios
    seen += [next(rows)["input_ids"][0] for _ in range(10)]
    live.update([0.2, 1.8], [3, 2])
    seen += [next(rows)["input_ids"][0] for _ in range(30)]
    # the EXP3 update of the averaged rewards, by hand
    w = [math.exp(0.5 * (3.0 / 3) / 0.5 / 2), math.exp(0.5 * (0.5 / 2) / 0.5 / 2)]
    r = [0.9 * x / sum(w) + 0.05 for x in w]
    w = [w[0] * math.exp(0.5 * (0.2 / 3) / r[0] / 2), w[1] * math.exp(0.5 * (1.8 / 2) / r[1] / 2)]
    assert live.mixer.weights == pytest.approx(w, rel=1e-12)
    state = json.loads(json.dumps(live.state_dict()))
    assert state["reward_type"] == "entropy"
    assert state["updates"] == [[10, [3.0, 0.5], [3.0, 2.0]], [20, [0.2, 1.8], [3.0, 2.0]]]
    resumed = MixingStream(data, gamma=0.1, eta=0.5, seed=2, reward_type="entropy")
    resumed.load_state_dict(state)
    assert [r["input_ids"][0] for r in itertools.islice(iter(resumed), 50)] == seen
    assert resumed.mixer.ratios == live.mixer.ratios
    assert [list(u) for u in resumed.updates] == state["updates"]
    with pytest.raises(ValueError, match="reward_type entropy, this run with train_loss"):
        MixingStream(data, reward_type="train_loss").load_state_dict(state)
    # a checkpoint written before the other rewards: [drawn, arm, loss], no reward_type
    old = {"datasets": ["a", "b"], "updates": [[4, 1, 2.5], [8, 0, 0.7]]}
    mine = MixingStream(data, seed=5)
    mine.load_state_dict(old)
    replayed = [r["input_ids"][0] for r in itertools.islice(iter(mine), 20)]
    by_hand = MixingStream(data, seed=5)
    rows = iter(by_hand)
    direct_rows = [next(rows)["input_ids"][0] for _ in range(4)]
    by_hand.mixer.update_from_train_loss(2.5, 1)
    direct_rows += [next(rows)["input_ids"][0] for _ in range(4)]
    by_hand.mixer.update_from_train_loss(0.7, 0)
    direct_rows += [next(rows)["input_ids"][0] for _ in range(12)]
    assert replayed == direct_rows and mine.mixer.ratios == by_hand.mixer.ratios
    assert mine.mixer.last_loss == [0.7, 2.5]
    with pytest.raises(ValueError, match="an update of 3 rewards, this run mixes 2"):
        MixingStream(data, reward_type="entropy").load_state_dict(
            {"datasets": ["a", "b"], "reward_type": "entropy",
             "updates": [[1, [1.0, 1.0, 1.0], [1, 1, 1]]]})
