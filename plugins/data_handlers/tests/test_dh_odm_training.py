"""dataprocessor.type: odm in real training runs: the Trainer trains on the mixed stream, the
train loss moves the mix toward the dataset whose loss stays high (read from the odm.jsonl and
run_summary.json the run writes), the same seed gives the same examples, and a resumed run
continues with the examples and ratios of the uninterrupted one."""

from __future__ import annotations

import json
import random

import pytest

from fmtune import hookimpl
from fmtune.testing import build_tiny_model, run_cli, train, write_jsonl

WORDS = ["the", "red", "cat", "sees", "a", "dog", "quick", "brown", "fox", "jumps", "over",
         "lazy", "hello", "there", "four", "two", "plus", "yes", "no", "true", "false"]
EASY = {"input": "hello there", "output": "four"}  # one record: learnt within a few steps


def hard_records(n: int = 40) -> list[dict]:
    """Random outputs: their loss stays high."""
    rng = random.Random(7)
    return [{"input": " ".join(rng.choices(WORDS, k=3)),
             "output": " ".join(rng.choices(WORDS, k=6))} for _ in range(n)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    texts = [" ".join(WORDS)] * 4 + [f"{r['input']} {r['output']}" for r in hard_records()]
    return build_tiny_model(tmp_path_factory.mktemp("odm-llama"), texts)


@pytest.fixture
def data_config(tmp_path):
    write_jsonl(tmp_path / "easy.jsonl", [EASY] * 8)
    write_jsonl(tmp_path / "hard.jsonl", hard_records())
    cfg = tmp_path / "odm.yaml"
    cfg.write_text(f"""
dataprocessor:
  type: odm
  seed: 66
  odm:
    update_interval: 1
    sampling_interval: 4
    reward_type: train_loss
    gamma: 0.3
    eta: 0.3
datasets:
  - name: easy
    sampling: 0.5
    data_paths: [{tmp_path / "easy.jsonl"}]
  - name: hard
    sampling: 0.5
    data_paths: [{tmp_path / "hard.jsonl"}]
""")
    return str(cfg)


class Seen:
    """Every input_ids batch the model's forward was handed."""

    def __init__(self) -> None:
        self.batches: list[list[list[int]]] = []

    @hookimpl
    def on_train_begin(self, run):
        run.model.register_forward_pre_hook(
            lambda m, a, kw: self.batches.append(kw["input_ids"].tolist()), with_kwargs=True)


def argv(model, cfg, out, *extra):
    return ["train", "--model_name_or_path", model, "--data_config_path", cfg,
            "--output_dir", str(out), "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-2", "--logging_steps", "1", "--save_strategy", "no",
            "--seed", "0", "--max_steps", "24", *extra]


def odm_log(out):
    with open(out / "odm.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_the_mix_moves_toward_the_dataset_whose_loss_stays_high(model, data_config, tmp_path):
    out = tmp_path / "out"
    seen = Seen()
    rec = train(argv(model, data_config, out), plugins=[seen])
    lines = odm_log(out)
    assert [x["step"] for x in lines] == list(range(1, 25))  # an update at every step
    # every batch is one dataset (sampling_interval 4 = the batch), credited with its loss
    assert all(sum(x["sampled"].values()) == 4 and 4 in x["sampled"].values() for x in lines)
    assert [x["credited"] for x in lines] == [max(x["sampled"], key=x["sampled"].get)
                                              for x in lines]
    assert [x["loss"] for x in lines] == pytest.approx(rec.losses)
    easy = [x["loss"] for x in lines if x["credited"] == "easy"]
    hard = [x["loss"] for x in lines if x["credited"] == "hard"]
    assert easy and hard and easy[-1] < 1.0 < min(hard[len(hard) // 2:])

    def share(part):
        return sum(x["sampled"]["hard"] for x in part) / sum(4 for _ in part)

    # equal weights at first; the easy dataset, sampled first, gains while it is the only one
    # with a loss; once the hard one's loss is seen the mix moves to it, up to 1 - gamma / 2
    assert lines[0]["sampling_ratios"]["hard"] < 0.5
    assert share(lines[:8]) <= 0.25 and share(lines[-8:]) >= 0.75
    assert 0.8 < lines[-1]["sampling_ratios"]["hard"] <= 0.85
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["odm"]["datasets"] == ["easy", "hard"]
    assert summary["odm"]["sampled"] == {n: sum(x["sampled"][n] for x in lines)
                                         for n in ("easy", "hard")}
    assert summary["odm"]["sampling_ratios"] == lines[-1]["sampling_ratios"]
    assert summary["odm"]["updates"] == 24 and summary["global_step"] == 24
    # the model was handed the mixed rows: 24 batches of 4, the easy one wherever it was sampled
    assert len(seen.batches) == 24 and all(len(b) == 4 for b in seen.batches)


def test_same_seed_same_stream(model, data_config, tmp_path):
    runs = []
    for name in ("a", "b"):
        seen = Seen()
        train(argv(model, data_config, tmp_path / name, "--max_steps", "10"), plugins=[seen])
        runs.append((seen.batches, odm_log(tmp_path / name)))
    assert runs[0][0] == runs[1][0]
    assert [(x["credited"], x["sampled"]) for x in runs[0][1]] == \
        [(x["credited"], x["sampled"]) for x in runs[1][1]]


def test_resume_equals_the_uninterrupted_run(model, data_config, tmp_path):
    saving = ["--save_strategy", "steps", "--save_steps", "8"]
    whole = Seen()
    train(argv(model, data_config, tmp_path / "a", *saving), plugins=[whole])
    full = odm_log(tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoint-8"
    state = json.loads((ckpt / "odm_state.json").read_text())
    assert state["datasets"] == ["easy", "hard"] and len(state["updates"]) == 8
    resumed = Seen()
    train(argv(model, data_config, tmp_path / "r", *saving, "--resume_from_checkpoint",
               str(ckpt)), plugins=[resumed])
    assert resumed.batches == whole.batches[8:]  # the same examples after the checkpoint
    rest = odm_log(tmp_path / "r")
    assert [x["step"] for x in rest] == list(range(9, 25))
    for got, want in zip(rest, full[8:]):
        assert (got["credited"], got["sampled"]) == (want["credited"], want["sampled"])
        assert got["sampling_ratios"] == pytest.approx(want["sampling_ratios"], rel=1e-6)
    summary = json.loads((tmp_path / "r" / "run_summary.json").read_text())
    assert summary["odm"]["sampled"] == json.loads(
        (tmp_path / "a" / "run_summary.json").read_text())["odm"]["sampled"]


@pytest.mark.parametrize("extra, needle", [
    (["--max_steps", "-1"], "dataprocessor.type: odm needs max_steps (the mixed stream has no "
                            "length)"),
    (["--logging_steps", "2"], "dataprocessor.odm.update_interval: 1 is not a multiple of "
                               "logging_steps 2"),
    (["--packing", "true"], "dataprocessor.type: odm: --packing is not supported"),
])
def test_refused_before_anything_loads(model, data_config, tmp_path, extra, needle):
    res = run_cli([*argv(model, data_config, tmp_path / "o"), *extra])
    assert res.exit_code == 2
    errors = [x for x in res.stderr.splitlines() if x.startswith("fmtune: error:")]
    assert len(errors) == 1 and f"{data_config}: {needle}" in errors[0], res.stderr
    assert not (tmp_path / "o").exists()
