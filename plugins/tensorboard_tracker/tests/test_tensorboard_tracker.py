"""The tensorboard plugin end to end: train a tiny model, read the events back with
TensorBoard's own reader (EventAccumulator)."""

from __future__ import annotations

import json
import shutil

import pytest

from fmtune.testing import (DEMO_RECORDS, AtStep, logged_series, NotRankZero, run_cli, train_argv,
                           write_jsonl)

RECORDS = [DEMO_RECORDS[i] for i in (0, 1, 2, 5)]  # 4 records: 2 steps an epoch at batch 2


def train_args(model, tmp_path, out, *extra):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    return train_argv(model, data, out, "--trackers", "tensorboard",
                      "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", *extra)


def events(folder):
    """TensorBoard's reader over one run folder, every event kept."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(folder), size_guidance={ea.TENSORS: 0, ea.SCALARS: 0})
    acc.Reload()
    return acc


def series(acc, tag):
    """(steps, values) of a scalar, in step order, as TensorBoard reads it."""
    from tensorboard.util import tensor_util

    points = acc.Tensors(tag)
    return [p.step for p in points], [tensor_util.make_ndarray(p.tensor_proto).item()
                                      for p in points]


def text(acc, tag):
    from tensorboard.util import tensor_util

    return [tensor_util.make_ndarray(p.tensor_proto).item().decode()
            for p in acc.Tensors(f"{tag}/text_summary")]


def state_of(out):
    return json.loads((out / "tensorboard_tracker.json").read_text())


def summary_of(out):
    return json.loads((out / "run_summary.json").read_text())


def test_scalars_read_back_with_tensorboards_reader(fmtune_tiny_model, tmp_path):
    out = tmp_path / "out"
    valid = write_jsonl(tmp_path / "valid.jsonl", RECORDS[:2])
    res = run_cli(train_args(fmtune_tiny_model, tmp_path, out, "--max_steps", "6",
                             "--validation_data_path", valid, "--eval_strategy", "steps",
                             "--eval_steps", "3"))
    assert res.exit_code == 0, res.stderr
    assert "--trackers tensorboard activates plugin 'tensorboard'" in res.stderr
    state = state_of(out)
    assert state["log_dir"] == str(out / "runs") and state["run"].startswith("out-")
    folder = out / "runs" / state["run"]
    summary = summary_of(out)
    assert summary["tensorboard_run"] == state["run"]
    assert summary["tensorboard_log_dir"] == str(out / "runs")
    assert summary["trackers"] == {"tensorboard": {"status": "ok"}}

    acc = events(folder)
    steps, losses = logged_series(out, "training_loss")
    assert steps == [1, 2, 3, 4, 5, 6]
    assert series(acc, "train/loss") == (steps, losses)  # exactly: stored as doubles
    assert series(acc, "eval/loss") == logged_series(out, "validation_loss")
    assert series(acc, "eval/loss")[0] == [3, 6]
    lr_steps, lrs = series(acc, "train/learning_rate")
    assert lr_steps == steps and lrs == pytest.approx([1e-3 * (6 - s) / 6 for s in range(6)])
    for name in ("grad_norm", "epoch", "num_input_tokens_seen"):
        assert series(acc, f"train/{name}")[0][:6] == steps, name
    assert series(acc, "train/num_input_tokens_seen")[1][-1] == summary["train_tokens"]
    hparams = json.loads(text(acc, "hparams")[0])
    assert hparams["learning_rate"] == 1e-3 and hparams["max_steps"] == 6
    assert json.loads(text(acc, "fmtune")[0])["plugins"]["tensorboard"] == "0.1.0"
    assert json.loads(text(acc, "run_summary")[0])["final_loss"] == losses[-1]
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1


def test_a_resumed_run_continues_the_same_tensorboard_run(fmtune_tiny_model, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "tb"
    args = train_args(fmtune_tiny_model, tmp_path, out, "--tensorboard_log_dir", str(logs),
                      "--experiment", "exp1", "--save_strategy", "steps", "--save_steps", "2")
    res = run_cli([*args, "--max_steps", "4"])
    assert res.exit_code == 0, res.stderr
    first = state_of(out)["run"]
    assert first.startswith("exp1/out-") and state_of(out)["log_dir"] == str(logs)
    # as if the run had died after step 4 but before its last checkpoint: steps 3-4 are redone
    shutil.rmtree(out / "checkpoint-4")
    res = run_cli([*args, "--max_steps", "6"])
    assert res.exit_code == 0, res.stderr
    assert summary_of(out)["resumed_from"] == str(out / "checkpoint-2")
    assert state_of(out)["run"] == first
    assert [p.name for p in (logs / "exp1").iterdir()] == [first.split("/")[1]]  # one run
    assert len(list((logs / first).glob("events.out.tfevents.*"))) == 2  # one per process
    steps, losses = logged_series(out, "training_loss")
    assert steps == [1, 2, 3, 4, 5, 6]
    # the steps go on from the checkpoint; the redone steps replace their first values
    assert series(events(logs / first), "train/loss") == (steps, losses)

    # starting over opens a new run folder
    res = run_cli([*args, "--max_steps", "2", "--resume_from_checkpoint", "false"])
    assert res.exit_code == 0, res.stderr
    second = state_of(out)["run"]
    assert second != first
    assert series(events(logs / second), "train/loss")[0] == [1, 2]


@pytest.mark.parametrize("where, message", [
    ("{file}", "tensorboard_log_dir {file}: exists and is not a folder"),
    ("{file}/sub/tb", "tensorboard_log_dir {file}/sub/tb: cannot create it, {file} is a file"),
])
def test_a_bad_log_dir_fails_before_training(tmp_path, where, message):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    out = tmp_path / "out"
    res = run_cli(train_args("no-model-needed", tmp_path, out, "--max_steps", "1",
                             "--tensorboard_log_dir", where.format(file=a_file)))
    assert res.exit_code == 2
    line = f"fmtune: error: invalid config: {message.format(file=a_file)}"
    assert res.stderr.strip().splitlines()[-1] == line  # after the activation's log line
    assert res.stderr.count("tensorboard_log_dir") == 1
    assert not out.exists()  # failed before anything was loaded or written


def LoseAt(step, fault):
    """At the end of step ``step``, once the tracker has sent what it had, run ``fault()``."""
    import fmtune_tensorboard

    return AtStep(step, fault,
                  ready=lambda run: fmtune_tensorboard.TensorBoardTracker.of(run).guard.drain(30))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("how", ["deleted", "replaced by a file"])
def test_a_log_dir_lost_mid_run_does_not_stop_training(fmtune_tiny_model, tmp_path, how):
    out, logs = tmp_path / "out", tmp_path / "tb"

    def lose():
        shutil.rmtree(logs)
        if how == "replaced by a file":
            logs.write_text("not a folder any more")

    res = run_cli(train_args(fmtune_tiny_model, tmp_path, out, "--max_steps", "6",
                             "--tensorboard_log_dir", str(logs)), plugins=[LoseAt(2, lose)])
    assert res.exit_code == 0, res.stderr
    folder = logs / state_of(out)["run"]
    reason = f"FileNotFoundError: the TensorBoard run folder {folder} is gone"
    assert summary_of(out)["trackers"] == {"tensorboard": {"status": "failed", "at_step": 2,
                                                           "error": reason}}
    assert res.stderr.count("tracker tensorboard") == 1
    assert (f"tracker tensorboard failed at step 2: {reason}; disabled for the rest of the run; "
            "the losses are in training_logs.jsonl") in res.stderr
    assert logged_series(out, "training_loss")[0] == [1, 2, 3, 4, 5, 6]  # nothing lost
    assert summary_of(out)["global_step"] == 6 and (out / "model.safetensors").exists()


def test_only_the_main_process_tracks(fmtune_tiny_model, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "tb"
    res = run_cli(train_args(fmtune_tiny_model, tmp_path, out, "--max_steps", "2",
                             "--tensorboard_log_dir", str(logs)), plugins=[NotRankZero()])
    assert res.exit_code == 0, res.stderr
    assert not (out / "tensorboard_tracker.json").exists() and not logs.exists()


def test_report_to_tensorboard_is_written_once(fmtune_tiny_model, tmp_path):
    """transformers' own TensorBoardCallback would write a second run folder
    (OUTPUT_DIR/runs/<date>_<host>) with a second copy of every scalar."""
    out = tmp_path / "out"
    res = run_cli(train_args(fmtune_tiny_model, tmp_path, out, "--max_steps", "2",
                             "--report_to", "tensorboard"))
    assert res.exit_code == 0, res.stderr
    assert [p.name for p in (out / "runs").iterdir()] == [state_of(out)["run"]]
    assert series(events(out / "runs" / state_of(out)["run"]), "train/loss")[0] == [1, 2]

    res = run_cli(train_args("no-model-needed", tmp_path, tmp_path / "out2", "--max_steps", "1",
                             "--report_to", "all"))
    assert res.exit_code == 2
    assert "report_to all: transformers would log to TensorBoard as well" in res.stderr


def test_failed_training_writes_the_error(fmtune_tiny_model, tmp_path):
    from fmtune import hookimpl

    class Exploder:
        @hookimpl
        def on_step(self, run):
            if run.state.global_step == 2:
                raise RuntimeError("diverged at step 2")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="diverged at step 2"):
        run_cli(train_args(fmtune_tiny_model, tmp_path, out, "--max_steps", "4"),
                plugins=[Exploder()])
    acc = events(out / "runs" / state_of(out)["run"])
    assert text(acc, "run_error") == ["RuntimeError: diverged at step 2"]
    assert series(acc, "train/loss") == logged_series(out, "training_loss")
