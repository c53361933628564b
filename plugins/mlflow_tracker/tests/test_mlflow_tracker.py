"""The mlflow plugin end to end: train a tiny model, read the run back with MLflow's client."""

from __future__ import annotations

import json
import os
import socket
from importlib import metadata

import pytest

from fmtune import hookimpl
from fmtune.testing import (DEMO_RECORDS, AtStep, logged_series, NotRankZero, run_cli, train_argv,
                           write_jsonl, writes_despite_read_only)

RECORDS = [DEMO_RECORDS[i] for i in (0, 1, 2, 5)]  # 4 records: 2 steps an epoch at batch 2


@pytest.fixture(autouse=True)
def clean_mlflow_env(monkeypatch):
    """The plugin sets MLFLOW_ALLOW_FILE_STORE for file: stores; start without it, restore after."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def train_args(model, tmp_path, out, *extra):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    return train_argv(model, data, out, "--plugins", "mlflow", "--per_device_train_batch_size", "2",
                      "--learning_rate", "1e-3", *extra)


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
    steps, train_losses = logged_series(out, "training_loss")
    assert steps == [1, 2, 3, 4, 5, 6]
    assert history(client, run.info.run_id, "loss") == (steps, train_losses)
    eval_steps, eval_losses = logged_series(out, "validation_loss")
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
    steps, train_losses = logged_series(out, "training_loss")
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


# ------------------------------------------------------- losing the tracker mid-run


def LoseAt(step, fault):
    """At the end of step ``step``, once the tracker has sent what it had, run ``fault()``."""
    import fmtune_mlflow

    return AtStep(step, fault, ready=lambda run: fmtune_mlflow.MlflowTracker.of(run).guard.drain(30))


def summary_of(out):
    return json.loads((out / "run_summary.json").read_text())


@pytest.fixture(autouse=True)
def clean_http_env(monkeypatch):
    """The plugin bounds MLflow's HTTP retries unless set: start without, restore after."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)


class TrackingServer:
    """An MLflow tracking server on a free local port: MLflow's REST API (the endpoints a
    run uses), served by MLflow's own FileStore. It stands in for `mlflow server`, which
    mlflow-skinny does not ship (it needs flask); the client side is the real MlflowClient
    over HTTP. ``stop()`` takes it down like a dead server: connections are refused."""

    def __init__(self, root):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qsl, urlsplit

        from mlflow.exceptions import MlflowException
        from mlflow.store.tracking.file_store import FileStore
        from mlflow.store.tracking.rest_store import RestStore
        from mlflow.utils.proto_json_utils import message_to_json, parse_dict

        store = FileStore(str(root))
        self.store_uri = root.as_uri()
        routes = {info: request for request, info in RestStore._METHOD_TO_INFO.items()}
        answer = self._answers(store)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _serve(self, method):
                url = urlsplit(self.path)
                request = routes.get((url.path, method))
                if request is None or request.__name__ not in answer:
                    return self._send(404, {"error_code": "ENDPOINT_NOT_FOUND",
                                            "message": f"{method} {url.path}"})
                if method == "GET":
                    body = dict(parse_qsl(url.query))
                else:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"] or 0))
                                      or b"{}")
                message = request()
                parse_dict(body, message)
                try:
                    response = answer[request.__name__](message, request.Response())
                except MlflowException as e:
                    return self._send(e.get_http_status_code(), json.loads(e.serialize_as_json()))
                self._send(200, json.loads(message_to_json(response)))

            def _send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def _answers(store):
        from mlflow.entities import ExperimentTag, Metric, Param, RunTag
        from mlflow.exceptions import MlflowException

        def get_experiment_by_name(req, res):
            found = store.get_experiment_by_name(req.experiment_name)
            if found is None:
                raise MlflowException(f"no experiment {req.experiment_name!r}",
                                      error_code="RESOURCE_DOES_NOT_EXIST")
            res.experiment.MergeFrom(found.to_proto())
            return res

        def create_experiment(req, res):
            res.experiment_id = store.create_experiment(
                req.name, req.artifact_location or None,
                [ExperimentTag(t.key, t.value) for t in req.tags])
            return res

        def get_experiment(req, res):
            res.experiment.MergeFrom(store.get_experiment(req.experiment_id).to_proto())
            return res

        def create_run(req, res):
            run = store.create_run(req.experiment_id, req.user_id, req.start_time,
                                   [RunTag(t.key, t.value) for t in req.tags], req.run_name)
            res.run.MergeFrom(run.to_proto())
            return res

        def get_run(req, res):
            res.run.MergeFrom(store.get_run(req.run_id).to_proto())
            return res

        def log_batch(req, res):
            store.log_batch(req.run_id, [Metric.from_proto(m) for m in req.metrics],
                            [Param.from_proto(p) for p in req.params],
                            [RunTag.from_proto(t) for t in req.tags])
            return res

        def update_run(req, res):
            info = store.update_run_info(req.run_id, req.status, req.end_time or None,
                                         req.run_name or None)
            res.run_info.MergeFrom(info.to_proto())
            return res

        return {"GetExperimentByName": get_experiment_by_name,
                "CreateExperiment": create_experiment, "GetExperiment": get_experiment,
                "CreateRun": create_run, "GetRun": get_run, "LogBatch": log_batch,
                "UpdateRun": update_run}

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def tracking_server(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for the server's FileStore
    server = TrackingServer(tmp_path / "server_store")
    try:
        yield server
    finally:
        server.stop()


def test_a_tracking_server_serves_a_run(fmtune_tiny_model, tmp_path, tracking_server):
    from mlflow import MlflowClient

    out = tmp_path / "out"
    res = run_cli(train_args(fmtune_tiny_model, tmp_path, out, "--max_steps", "3",
                             "--mlflow_tracking_uri", tracking_server.uri))
    assert res.exit_code == 0, res.stderr
    summary = summary_of(out)
    assert summary["trackers"] == {"mlflow": {"status": "ok"}}
    client = MlflowClient(tracking_uri=tracking_server.store_uri)  # what the server stored
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
    assert history(client, summary["mlflow_run_id"], "loss") == logged_series(out, "training_loss")


def test_a_tracking_server_that_dies_mid_run_does_not_stop_training(fmtune_tiny_model, tmp_path,
                                                                    tracking_server):
    out = tmp_path / "out"
    res = run_cli(train_args(fmtune_tiny_model, tmp_path, out, "--max_steps", "6",
                             "--mlflow_tracking_uri", tracking_server.uri),
                  plugins=[LoseAt(2, tracking_server.stop)])
    assert res.exit_code == 0, res.stderr
    status = summary_of(out)["trackers"]["mlflow"]
    # MLflow's own error, not the 30 s timeout: its retries were bounded to fit in it
    assert status["status"] == "failed" and status["at_step"] == 2, status
    assert status["error"].startswith("MlflowException: API request to "
                                      f"{tracking_server.uri}/api/2.0/mlflow/runs/log-batch "
                                      "failed"), status
    assert f"tracker mlflow failed at step 2: {status['error']};" in res.stderr
    assert res.stderr.count("tracker mlflow") == 1
    assert logged_series(out, "training_loss")[0] == [1, 2, 3, 4, 5, 6]  # nothing lost
    assert summary_of(out)["global_step"] == 6
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"  # 30 s / 4


def test_http_retry_settings_of_the_user_are_kept(fmtune_tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    res = run_cli(train_args(fmtune_tiny_model, tmp_path, tmp_path / "out", "--max_steps", "1",
                             "--mlflow_tracking_uri", str(tmp_path / "mlruns"),
                             "--mlflow_timeout_s", "8"))
    assert res.exit_code == 0, res.stderr
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "2"


@pytest.mark.parametrize("how", ["deleted", "read-only"])
def test_a_file_store_lost_mid_run_does_not_stop_training(fmtune_tiny_model, tmp_path, how):
    import shutil
    import subprocess

    if how == "read-only" and writes_despite_read_only(tmp_path):
        pytest.skip("this user writes to read-only folders (root): the deleted store stands in for it")
    out, store = tmp_path / "out", tmp_path / "mlruns"

    def lose():
        if how == "deleted":
            shutil.rmtree(store)
        else:
            subprocess.run(["chmod", "-R", "a-w", str(store)], check=True)

    res = run_cli(train_args(fmtune_tiny_model, tmp_path, out, "--max_steps", "6",
                             "--mlflow_tracking_uri", f"file:{store}"),
                  plugins=[LoseAt(2, lose)])
    if how == "read-only":
        subprocess.run(["chmod", "-R", "u+w", str(store)], check=True)  # for tmp_path's cleanup
    assert res.exit_code == 0, res.stderr
    status = summary_of(out)["trackers"]["mlflow"]
    assert status["status"] == "failed" and status["at_step"] == 2, status
    assert f"tracker mlflow failed at step 2: {status['error']};" in res.stderr
    assert logged_series(out, "training_loss")[0] == [1, 2, 3, 4, 5, 6]
    assert (out / "model.safetensors").exists()


def test_a_hung_mlflow_call_costs_about_the_timeout(fmtune_tiny_model, tmp_path, monkeypatch):
    import threading
    import time

    from mlflow import MlflowClient

    gate, log_batch = threading.Event(), MlflowClient.log_batch

    def hanging_log_batch(self, run_id, metrics=(), *args, **kwargs):
        if any(m.step == 2 for m in metrics):
            gate.wait(300)  # a server that accepted the request and never answers
        return log_batch(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", hanging_log_batch)
    out = tmp_path / "out"
    begin = time.monotonic()
    try:
        res = run_cli(train_args(fmtune_tiny_model, tmp_path, out, "--max_steps", "6",
                                 "--mlflow_tracking_uri", str(tmp_path / "mlruns"),
                                 "--mlflow_timeout_s", "2"))
        took = time.monotonic() - begin
    finally:
        gate.set()
    assert res.exit_code == 0, res.stderr
    assert took < 120  # not the 300 s the call hangs
    status = summary_of(out)["trackers"]["mlflow"]
    assert status["status"] == "failed" and status["at_step"] == 2, status
    assert status["error"].startswith("log_metrics gave no answer in 2 s"), status
    assert logged_series(out, "training_loss")[0] == [1, 2, 3, 4, 5, 6]


def test_a_bad_timeout_is_refused(tmp_path):
    res = run_cli(train_args("no-model-needed", tmp_path, tmp_path / "out", "--max_steps", "1",
                             "--mlflow_tracking_uri", str(tmp_path / "mlruns"),
                             "--mlflow_timeout_s", "-1"))
    assert res.exit_code == 2
    assert "mlflow_timeout_s must be between 0 and 86400 seconds, got -1.0" in res.stderr
