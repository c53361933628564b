"""The mlflow plugin end to end: train a tiny model, read the run back with MLflow's client."""

from __future__ import annotations

import json
import os
import socket
from importlib import metadata

import pytest

from fmtune import hookimpl
from fmtune.testing import NotRankZero, run_cli, write_jsonl

RECORDS = [
    {"input": "translate: the red cat sees a dog =", "output": "le chat rouge voit un chien"},
    {"input": "question: what is two plus two? answer:", "output": "four"},
    {"input": "The quick brown fox", "output": "jumps over the lazy dog."},
    {"input": "hello there", "output": "hi, how can I help?"},
]


@pytest.fixture(autouse=True)
def clean_mlflow_env(monkeypatch):
    """The plugin sets MLFLOW_ALLOW_FILE_STORE for file: stores; start without it, restore after."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def train_args(model, tmp_path, out, *extra):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    return ["train", "--plugins", "mlflow", "--model_name_or_path", model,
            "--training_data_path", data, "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--save_strategy", "no", *extra]


def jsonl_series(out, name):
    """(steps, values) of one series of training_logs.jsonl."""
    with open(os.path.join(out, "training_logs.jsonl")) as f:
        rows = [json.loads(line)["data"] for line in f if json.loads(line)["name"] == name]
    return [r["step"] for r in rows], [r["value"] for r in rows]


def history(client, run_id, key):
    """(steps, values) of a metric's whole history, in step order."""
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [m.step for m in points], [m.value for m in points]


def test_params_and_metrics_read_back_from_a_file_store(fmtune_tiny_model, tmp_path):
    from mlflow import MlflowClient

    out, store = tmp_path / "out", tmp_path / "mlruns"
    valid = write_jsonl(tmp_path / "valid.jsonl", RECORDS[:2])
    res = run_cli(train_args(fmtune_tiny_model, tmp_path, out, "--max_steps", "6",
                             "--mlflow_tracking_uri", f"file:{store}",
                             "--mlflow_experiment", "tiny-exp",
                             "--validation_data_path", valid, "--eval_strategy", "steps",
                             "--eval_steps", "3"))
    assert res.exit_code == 0, res.stderr
    state = json.loads((out / "mlflow_tracker.json").read_text())
    assert state["tracking_uri"] == store.as_uri() and state["experiment_name"] == "tiny-exp"

    client = MlflowClient(tracking_uri=store.as_uri())
    run = client.get_run(state["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "out"
    assert client.get_experiment(run.info.experiment_id).name == "tiny-exp"
    params = run.data.params
    assert params["learning_rate"] == "0.001" and params["max_steps"] == "6"
    assert params["model_name_or_path"] == fmtune_tiny_model
    assert params["mlflow_experiment"] == "tiny-exp" and params["save_total_limit"] == "null"
    assert params["plugin.mlflow"] == metadata.version("fmtune-mlflow")
    assert params["fmtune_version"] == metadata.version("fmtune")
    assert run.data.tags["fmtune.output_dir"] == str(out)

    # train and eval loss: one point per logged step, values equal to training_logs.jsonl
    steps, train_losses = jsonl_series(out, "training_loss")
    assert steps == [1, 2, 3, 4, 5, 6]
    assert history(client, run.info.run_id, "loss") == (steps, train_losses)
    eval_steps, eval_losses = jsonl_series(out, "validation_loss")
    assert eval_steps == [3, 6]
    assert history(client, run.info.run_id, "eval_loss") == (eval_steps, eval_losses)
    for key in ("learning_rate", "grad_norm", "train_tokens_per_second", "epoch",
                "num_input_tokens_seen"):
        assert history(client, run.info.run_id, key)[0] == steps, key
    assert history(client, run.info.run_id, "learning_rate")[1] == pytest.approx(
        [1e-3 * (6 - s) / 6 for s in range(6)])  # linear decay from 1e-3
    # the run summary's numbers (resource report) at the last step
    summary = json.loads((out / "run_summary.json").read_text())
    metrics = run.data.metrics
    assert metrics["summary/global_step"] == 6
    assert metrics["summary/final_loss"] == train_losses[-1]
    assert metrics["summary/train_tokens"] == summary["train_tokens"]
    assert metrics["summary/peak_rss_mb"] == summary["peak_rss_mb"] > 0
    assert summary["mlflow_run_id"] == run.info.run_id
    assert summary["mlflow_tracking_uri"] == store.as_uri()


def test_resumed_run_continues_the_same_mlflow_run(fmtune_tiny_model, tmp_path):
    """Also covers MLflow's default kind of store, sqlite."""
    from mlflow import MlflowClient

    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    args = train_args(fmtune_tiny_model, tmp_path, out, "--mlflow_tracking_uri", uri,
                      "--save_strategy", "steps", "--save_steps", "2")
    res = run_cli([*args, "--max_steps", "4"])
    assert res.exit_code == 0, res.stderr
    first = json.loads((out / "mlflow_tracker.json").read_text())["run_id"]
    res = run_cli([*args, "--max_steps", "6"])
    assert res.exit_code == 0, res.stderr
    assert json.loads((out / "run_summary.json").read_text())["resumed_from"] == \
        str(out / "checkpoint-4")
    assert json.loads((out / "mlflow_tracker.json").read_text())["run_id"] == first

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("Default")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [first]
    run = client.get_run(first)
    assert run.info.status == "FINISHED"
    assert run.data.tags["fmtune.resumed_from"] == str(out / "checkpoint-4")
    assert run.data.params["max_steps"] == "4"  # MLflow params keep their first value
    steps, train_losses = jsonl_series(out, "training_loss")
    assert steps == [1, 2, 3, 4, 5, 6]
    assert history(client, first, "loss") == (steps, train_losses)


def test_only_the_main_process_tracks(fmtune_tiny_model, tmp_path):
    out, store = tmp_path / "out", tmp_path / "mlruns"
    res = run_cli(train_args(fmtune_tiny_model, tmp_path, out, "--max_steps", "2",
                             "--mlflow_tracking_uri", str(store)), plugins=[NotRankZero()])
    assert res.exit_code == 0, res.stderr
    assert not (out / "mlflow_tracker.json").exists() and not store.exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("uri, message", [
    ("file:{file}", "mlflow_tracking_uri file://{file}: {file}: exists and is not a folder"),
    ("{file}/sub", "{file}/sub: cannot create it, {file} is a file"),
    ("sqlite:///{tmp}/missing/mlflow.db", "the folder {tmp}/missing does not exist"),
    ("http://127.0.0.1:{port}", "cannot reach the tracking server at 127.0.0.1:{port} "
                                "(Connection refused)"),
])
def test_bad_store_or_server_fails_before_training(tmp_path, uri, message):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    fill = {"file": str(a_file), "tmp": str(tmp_path), "port": free_port()}
    out = tmp_path / "out"
    res = run_cli(train_args("no-model-needed", tmp_path, out, "--max_steps", "1",
                             "--mlflow_tracking_uri", uri.format(**fill)))
    assert res.exit_code == 2
    assert message.format(**fill) in res.stderr
    assert not out.exists()  # failed before anything was loaded or written


def test_failed_training_marks_the_mlflow_run_failed(fmtune_tiny_model, tmp_path):
    from mlflow import MlflowClient

    class Exploder:
        @hookimpl
        def on_step(self, run):
            if run.state.global_step == 2:
                raise RuntimeError("diverged at step 2")

    out, uri = tmp_path / "out", f"file:{tmp_path / 'mlruns'}"
    with pytest.raises(RuntimeError, match="diverged at step 2"):
        run_cli(train_args(fmtune_tiny_model, tmp_path, out, "--max_steps", "4",
                           "--mlflow_tracking_uri", uri), plugins=[Exploder()])
    run_id = json.loads((out / "mlflow_tracker.json").read_text())["run_id"]
    found = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert found.info.status == "FAILED"
    assert found.data.tags["fmtune.error"] == "RuntimeError: diverged at step 2"
