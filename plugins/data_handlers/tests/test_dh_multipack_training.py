"""--multipack in real training runs: the batches the model is handed are the multipack bins
(each a padding-free row), every example once per epoch, losses finite, a resumed run sees the
batches the uninterrupted one saw after its checkpoint, two processes get disjoint bins (also
when resumed in the second epoch); and
the option's checks."""

from __future__ import annotations

import json
import math
import textwrap

import pytest

from fmtune import hookimpl
from fmtune.testing import build_tiny_model, run_cli, torchrun, train, train_argv, write_jsonl
from fmtune_data_handlers.multipack import MultipackBatchSampler

WORDS = ["the", "red", "cat", "sees", "a", "dog", "quick", "brown", "fox", "jumps", "over",
         "lazy", "hello", "there", "four", "two", "plus"]


def records(n: int = 14) -> list[dict]:
    """Records of varied lengths, each different (so a batch's tokens name its examples)."""
    out = []
    for k in range(n):
        words = [WORDS[(k * 7 + j) % len(WORDS)] for j in range(1 + (k * 5) % 9)]
        out.append({"input": f"{k} " + " ".join(words), "output": WORDS[k % len(WORDS)]})
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    texts = [f"{r['input']} {r['output']}" for r in records()]
    return build_tiny_model(tmp_path_factory.mktemp("mp-llama"), texts)


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", records())


class Seen:
    """The training dataset and every input_ids row the model's forward was handed."""

    def __init__(self) -> None:
        self.rows: list[list[int]] = []
        self.positions: list[list[int]] = []
        self.dataset = None

    @hookimpl
    def on_train_begin(self, run):
        self.dataset = run.trainer.train_dataset

        def record(module, args, kwargs):
            assert kwargs["input_ids"].shape[0] == 1  # one padding-free row per batch
            self.rows.append(kwargs["input_ids"][0].tolist())
            self.positions.append(kwargs["position_ids"][0].tolist())

        run.model.register_forward_pre_hook(record, with_kwargs=True)


MP = ["--plugins", "data_handlers", "--padding_free", "huggingface", "--multipack", "16",
      "--per_device_train_batch_size", "3"]


def expected_rows(dataset, batch_size, epochs, seed=0):
    """The padding-free rows of the multipack batches, epoch by epoch, and the batches."""
    ids = dataset["input_ids"]
    lengths = [len(x) for x in ids]
    tokens = math.floor(batch_size * sum(lengths) / len(lengths))
    sampler = MultipackBatchSampler(lengths, tokens, seed=seed)
    rows, batches = [], []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in sampler:
            batches.append((epoch, batch))
            rows.append([t for i in batch for t in ids[i]])
    return rows, batches, lengths, tokens


def test_the_model_is_handed_the_multipack_batches(model, data, tmp_path):
    seen = Seen()
    rec = train([*train_argv(model, data, tmp_path / "out"), *MP, "--num_train_epochs", "2"],
                plugins=[seen])
    rows, batches, lengths, tokens = expected_rows(seen.dataset, 3, 2)
    assert tokens == math.floor(3 * sum(lengths) / 14)
    assert seen.rows == rows  # the exact batches, in order, both epochs
    for (epoch, batch), positions in zip(batches, seen.positions):
        assert positions == [p for i in batch for p in range(lengths[i])]  # restart per example
    for epoch in range(2):
        members = [i for e, b in batches if e == epoch for i in b]
        assert sorted(members) == list(range(14))  # every example once per epoch
        assert all(sum(lengths[i] for i in b) <= tokens or len(b) == 1
                   for e, b in batches if e == epoch)
    assert [b for e, b in batches if e == 0] != [b for e, b in batches if e == 1]
    assert len(rec.losses) == len(rows) and all(math.isfinite(x) for x in rec.losses)
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["global_step"] == len(rows)
    assert summary["train_tokens"] == 2 * sum(lengths)  # no padding: every token counted once
    assert "multipack: batches of up to" in rec.result.stderr


def test_resume_continues_with_the_same_batches(model, data, tmp_path):
    common = [*MP, "--num_train_epochs", "2", "--save_strategy", "steps", "--save_steps", "2"]
    whole = Seen()
    train([*train_argv(model, data, tmp_path / "a"), *common], plugins=[whole])
    steps = len(whole.rows)
    per_epoch = steps // 2
    assert steps >= 6
    # a checkpoint in the first epoch, and one in the second
    for ckpt in (2, (per_epoch // 2 + 1) * 2):
        assert ckpt < steps
        resumed = Seen()
        train([*train_argv(model, data, tmp_path / f"r{ckpt}"), *common,
               "--resume_from_checkpoint", str(tmp_path / "a" / f"checkpoint-{ckpt}")],
              plugins=[resumed])
        assert resumed.rows == whole.rows[ckpt:]


@pytest.mark.parametrize("extra, message", [
    ([], "fmtune: error: invalid config: --multipack needs --padding_free (as in "
         "fms-hf-tuning): a multipack batch is given to the model as one row without padding"),
    (["--padding_free", "true", "--packing", "true"],
     "fmtune: error: invalid config: multipack and packing are exclusive"),
    (["--padding_free", "true", "--multipack", "0"],
     "fmtune: error: invalid config: multipack: the number of processes must be positive, got 0"),
])
def test_refused_before_anything_loads(model, tmp_path, data, extra, message):
    out = tmp_path / "out"
    res = run_cli(["train", "--model_name_or_path", model,
                   "--training_data_path", data, "--output_dir", str(out),
                   "--plugins", "data_handlers", "--multipack", "16", *extra])
    assert res.exit_code == 2
    lines = [x for x in res.stderr.splitlines() if x.startswith("fmtune: error:")]
    assert len(lines) == 1 and lines[0].startswith(message), res.stderr
    assert not out.exists()


def test_a_streamed_data_config_is_refused(model, tmp_path, data):
    cfg = tmp_path / "dc.yaml"
    cfg.write_text(json.dumps({"dataprocessor": {"streaming": True},
                               "datasets": [{"name": "d", "data_paths": [data]}]}))
    res = run_cli(["train", "--model_name_or_path", model, "--data_config_path", str(cfg),
                   "--output_dir", str(tmp_path / "o"), "--padding_free", "huggingface",
                   "--multipack", "4", "--max_steps", "2"])
    assert res.exit_code == 2
    errors = [x for x in res.stderr.splitlines() if x.startswith("fmtune: error:")]
    assert len(errors) == 1 and errors[0] == (
        f"fmtune: error: invalid config: {cfg}: dataprocessor.streaming: multipack needs every "
        "example's length each epoch, which a stream cannot give; use streaming: false")
    assert not (tmp_path / "o").exists()


DRIVER = textwrap.dedent('''
    import json, os, sys
    from fmtune import hookimpl
    from fmtune.cli import main

    class Seen:
        rows = []
        @hookimpl
        def on_train_begin(self, run):
            self.ids = [list(x) for x in run.trainer.train_dataset["input_ids"]]
            run.model.register_forward_pre_hook(
                lambda m, a, kw: self.rows.append(kw["input_ids"][0].tolist()), with_kwargs=True)
        @hookimpl
        def on_train_end(self, run):
            rank = int(os.environ["RANK"])
            with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
                json.dump({"rows": self.rows, "ids": self.ids, "world": run.world_size}, f)

    sys.exit(main(sys.argv[2:], extra_plugins=[Seen()]))
''')


def test_two_processes_get_disjoint_bins(model, data, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    argv = [*train_argv(model, data, tmp_path / "out"), *MP, "--num_train_epochs", "1"]
    torchrun(driver, str(tmp_path), *argv, cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    ids = ranks[0]["ids"]
    lengths = [len(x) for x in ids]
    tokens = math.floor(3 * sum(lengths) / len(lengths))
    want = [list(MultipackBatchSampler(lengths, tokens, seed=0, num_replicas=2, rank=r))
            for r in (0, 1)]
    for r in (0, 1):
        assert ranks[r]["rows"] == [[t for i in b for t in ids[i]] for b in want[r]]
    assert len(want[0]) == len(want[1]) >= 2  # the same number of steps on both ranks
    members = [i for r in (0, 1) for b in want[r] for i in b]
    assert len(members) == len(set(members))  # disjoint
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == len(want[0])


def ranks_rows(driver, folder, argv):
    folder.mkdir(exist_ok=True)
    torchrun(driver, str(folder), *argv, cwd=folder)
    return [json.loads((folder / f"rank{r}.json").read_text())["rows"] for r in (0, 1)]


def test_two_processes_resume_in_the_second_epoch_with_the_same_bins(model, data, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    common = [*MP, "--num_train_epochs", "2", "--save_strategy", "steps", "--save_steps", "1"]
    whole = ranks_rows(driver, tmp_path / "whole", [*train_argv(model, data, tmp_path / "a"),
                                                  *common])
    steps = len(whole[0])
    assert steps == len(whole[1]) >= 4 and steps % 2 == 0
    ckpt = steps // 2 + 1  # the first step of the second epoch is trained, the rest resumed
    resumed = ranks_rows(driver, tmp_path / "resumed", [
        *train_argv(model, data, tmp_path / "r"), *common,
        "--resume_from_checkpoint", str(tmp_path / "a" / f"checkpoint-{ckpt}")])
    assert resumed == [whole[0][ckpt:], whole[1][ckpt:]]
    assert whole[0][:steps // 2] != whole[0][steps // 2:]  # epoch 2 reshuffled the bins
