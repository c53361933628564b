"""fmtune plugin ``mlflow``: track a run in MLflow (local ``file:`` or ``sqlite:`` store, or a server).

What goes into the MLflow run (main process only):

* params: the resolved config (every option of every active plugin, as
  strings), ``fmtune_version`` and ``plugin.NAME`` = version of each active plugin;
* metrics: every number the trainer logs, under the trainer's own names
  (``loss``, ``learning_rate``, ``grad_norm``, ``epoch``,
  ``train_tokens_per_second``, ``eval_loss``, ...), with ``step`` = global step;
  at the end the run summary's numbers as ``summary/NAME``
  (``summary/tokens_per_second``, ``summary/peak_rss_mb``, ...);
* tags: ``fmtune.output_dir``, ``fmtune.resumed_from``.

The run id goes to ``OUTPUT_DIR/mlflow_tracker.json`` as soon as the run
opens; a run that resumes from a checkpoint in the same output folder
continues that MLflow run. MLflow params cannot change, so options changed for
the resumed part (``max_steps``, say) keep their first value (a warning names them).

MLflow 3 refuses its ``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE=true``;
for a ``file:`` URI this plugin sets that variable (when it is unset) in its
own process, since a plain folder is the store that works offline with no
database.

Losing the tracker never loses the training (:mod:`fmtune.tracking`): every MLflow call
runs on the tracker's own thread, each bounded by ``mlflow_timeout_s``. Opening the run
stays strict (a store or server that cannot open a run stops the run before its first
step, exit 2), but once training runs, the first call that fails or hangs (a server that
died, a store deleted or made read-only) disables MLflow for the rest of the run with one
warning line; training goes on and completes, the losses stay in ``training_logs.jsonl``
and ``run_summary.json`` says ``"trackers": {"mlflow": {"status": "failed", "error": ...,
"at_step": N}}`` (``{"status": "ok"}`` otherwise). MLflow's own HTTP retries (7 retries
with exponential backoff, 120 s per request: about 8 minutes against a dead server) are
bounded too: unless set in the environment, the plugin sets
``MLFLOW_HTTP_REQUEST_MAX_RETRIES=2``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1`` and
``MLFLOW_HTTP_REQUEST_TIMEOUT`` = a quarter of ``mlflow_timeout_s`` in its process, so
that a dead server gives MLflow's own error within the timeout.

Module import is cheap: mlflow is imported inside the hooks.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import weakref
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from fmtune import hookimpl
from fmtune.files import folder_problem, read_json_object, write_json
from fmtune.config import ConfigError
from fmtune.tracking import TrackerGuard

log = logging.getLogger("fmtune")

STATE_FILE = "mlflow_tracker.json"
CONNECT_TIMEOUT_S = 5.0
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param's length
PARAMS_PER_BATCH = 100  # MLflow's limit on params per log_batch
PROGRESS_KEYS = ("epoch", "num_input_tokens_seen")
BARE_URIS = ("databricks", "databricks-uc", "uc")  # tracking URIs that are not folders
# fmtune Run (hashed by identity) -> tracker, between begin and end; a Run that is gone
# takes its entry with it
_open_runs: "weakref.WeakKeyDictionary[Any, _MlflowTracker]" = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------- options


@hookimpl
def add_options(register):
    register("mlflow_tracking_uri", str, None,
             "MLflow tracking URI: a folder or file:/path (a local store that works offline), "
             "sqlite:///path.db, or an http(s):// tracking server; default: $MLFLOW_TRACKING_URI, "
             "else MLflow's default (sqlite:///mlflow.db in the current directory).")
    register("mlflow_experiment", str, None,
             "MLflow experiment name (created if missing); default: MLflow's 'Default'.")
    register("mlflow_timeout_s", float, 30.0,
             "Seconds each call into MLflow may take (opening the run, logging, closing it); "
             "a call that fails or takes longer mid-run disables MLflow for the rest of the "
             "run (training goes on; run_summary.json says so), one at the start stops the "
             "run. Also bounds MLflow's HTTP retries (unless MLFLOW_HTTP_REQUEST_* are set).")


def _default_uri() -> str:
    import mlflow

    return str(mlflow.get_tracking_uri())


def normalize_uri(uri: str) -> str:
    """A folder or ``file:`` URI -> absolute ``file://`` URI; relative sqlite paths made absolute."""
    if uri in BARE_URIS:
        return uri
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # a path ("C:" on Windows)
        path = unquote(parsed.path) if parsed.scheme == "file" else uri
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            return uri
        return Path(os.path.expanduser(path)).resolve().as_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative path
        db = unquote(uri[len("sqlite:///"):])
        if db and db != ":memory:":
            return "sqlite:///" + os.path.abspath(os.path.expanduser(db))
    return uri


def _local_folder_problem(path: str, what: str) -> str | None:
    why = folder_problem(path)
    return f"{what}: {path}: {why}" if why else None


def uri_problem(uri: str) -> str | None:
    """Why MLflow cannot track to ``uri`` (checked without writing anything), or None."""
    what = f"mlflow_tracking_uri {uri}"
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return _local_folder_problem(unquote(parsed.path), what)
    if parsed.scheme == "sqlite":
        db = unquote(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else ""
        if not db or db == ":memory:":
            return f"{what}: name a database file, e.g. sqlite:///mlflow.db"
        folder = os.path.dirname(os.path.abspath(db))
        if not os.path.isdir(folder):
            return f"{what}: the folder {folder} does not exist"
        if os.path.isdir(db):
            return f"{what}: {db} is a folder, not a database file"
        try:
            import alembic  # noqa: F401
            import sqlalchemy  # noqa: F401
        except ImportError as e:
            return f"{what}: sqlite stores need {e.name} (pip install sqlalchemy alembic)"
        return None
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S):
                return None
        except OSError as e:
            return (f"{what}: cannot reach the tracking server at {parsed.hostname}:{port} "
                    f"({e.strerror or type(e).__name__})")
    scheme = parsed.scheme.split("+")[0]
    if scheme and scheme not in KNOWN_SCHEMES and scheme not in _plugin_schemes():
        return (f"{what}: unknown scheme {parsed.scheme!r} (MLflow tracks to file:, sqlite:, "
                "postgresql:, mysql:, mssql:, http(s): or databricks URIs)")
    return None  # databricks, ...: MLflow itself checks when the run opens


# the tracking store schemes MLflow knows (mlflow.tracking._tracking_service.utils registers
# them); a store plugin adds its own through the entry point group mlflow.tracking_store
KNOWN_SCHEMES = frozenset({"file", "sqlite", "postgresql", "mysql", "mssql", "http", "https",
                           "databricks", "databricks-uc", "uc"})


def _plugin_schemes() -> set[str]:
    from importlib import metadata

    return {ep.name for ep in metadata.entry_points(group="mlflow.tracking_store")}


@hookimpl
def validate_config(config):
    problems = []
    if not 0 < config.mlflow_timeout_s <= 86400:
        problems.append(f"mlflow_timeout_s must be between 0 and 86400 seconds, got "
                        f"{config.mlflow_timeout_s}")
    uri = normalize_uri(config.mlflow_tracking_uri or _default_uri())
    problems.append(uri_problem(uri))
    return [p for p in problems if p]


# -------------------------------------------------------------------- tracking


def bound_http_retries(timeout_s: float) -> None:
    """MLflow's HTTP retry settings, bounded to fit in ``timeout_s``: set in this process
    unless the environment sets them."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(timeout_s // 4))))


def _read_state(path: str) -> dict[str, Any] | None:
    state = read_json_object(path)
    return state if state and state.get("run_id") else None


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _MlflowTracker:
    """One open MLflow run for one fmtune run; every MLflow call goes through ``self.guard``."""

    def __init__(self, run) -> None:
        config = run.config
        self.uri = normalize_uri(config.mlflow_tracking_uri or _default_uri())
        if self.uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        bound_http_retries(config.mlflow_timeout_s)
        self.state_path = os.path.join(run.output_dir, STATE_FILE)
        self.progress_step: dict[str, int] = {}
        self.run_id: str | None = None
        self.guard = TrackerGuard("mlflow", config.mlflow_timeout_s)
        self.guard.open_or_refuse(self.open_run, run, self.uri)

    def open_run(self, run) -> None:
        """Open (or reopen) the MLflow run; on the guard's thread."""
        from mlflow import MlflowClient

        previous = _read_state(self.state_path) if run.resumed_from else None
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id = self._resume(previous) if previous else None
        if self.run_id is None:
            self.run_id = self._create(run)
        self.resumed = previous is not None and previous["run_id"] == self.run_id
        self._log_params(run)
        experiment = self.client.get_experiment(self.experiment_id)
        write_json(self.state_path, {"run_id": self.run_id, "experiment_id": self.experiment_id,
                                      "experiment_name": experiment.name, "tracking_uri": self.uri})
        log.info("mlflow: %s run %s (experiment %r) at %s",
                 "continuing" if self.resumed else "tracking to", self.run_id, experiment.name,
                 self.uri)

    def _resume(self, previous: dict[str, Any]) -> str | None:
        from mlflow.exceptions import MlflowException

        if previous.get("tracking_uri") != self.uri:
            log.warning("mlflow: %s names a run at %s, not %s; starting a new MLflow run",
                        self.state_path, previous.get("tracking_uri"), self.uri)
            return None
        try:
            found = self.client.get_run(previous["run_id"])
        except MlflowException:
            log.warning("mlflow: run %s from %s is gone; starting a new MLflow run",
                        previous["run_id"], self.state_path)
            return None
        self.experiment_id = found.info.experiment_id
        self.client.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id

    def _create(self, run) -> str:
        name = run.config.mlflow_experiment or run.config.get("experiment") or "Default"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            self.experiment_id = self.client.create_experiment(name)
        elif experiment.lifecycle_stage == "deleted":
            raise ConfigError(f"mlflow: experiment {name!r} is deleted at {self.uri}; restore it "
                              "or choose another mlflow_experiment")
        else:
            self.experiment_id = experiment.experiment_id
        created = self.client.create_run(
            self.experiment_id, run_name=os.path.basename(os.path.abspath(run.output_dir)),
            tags={"fmtune.output_dir": os.path.abspath(run.output_dir)})
        return created.info.run_id

    def _log_params(self, run) -> None:
        from mlflow.entities import Param, RunTag

        from fmtune import __version__
        from fmtune.plugins import plugin_versions

        params = {name: _param_value(value) for name, value in run.config.to_dict().items()}
        params["fmtune_version"] = __version__
        params.update({f"plugin.{name}": str(version)
                       for name, version in plugin_versions(run.pm).items()})
        logged = self.client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        if changed:
            log.warning("mlflow: MLflow params cannot change; %s keep their first value in run %s",
                        ", ".join(changed), self.run_id)
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + PARAMS_PER_BATCH])
        if run.resumed_from:
            self.client.log_batch(self.run_id, tags=[RunTag("fmtune.resumed_from",
                                                            str(run.resumed_from))])

    def log_metrics(self, values: dict[str, float], step: int, at_ms: int | None = None) -> None:
        from mlflow.entities import Metric

        if not values:
            return
        now = at_ms or int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                    for k, v in values.items()])

    def close(self, summary: dict[str, Any], step: int) -> None:
        self.log_metrics({f"summary/{k}": v for k, v in _numbers(summary).items()}, step)
        self.client.set_terminated(self.run_id, "FINISHED")

    def close_failed(self, error: str) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag("fmtune.error", error[:5000])])
        self.client.set_terminated(self.run_id, "FAILED")

    def kill(self) -> None:
        self.client.set_terminated(self.run_id, "KILLED")


@hookimpl
def on_train_begin(run):
    if not run.is_main_process:
        return
    stale = _open_runs.pop(run, None)
    if stale is not None:
        stale.guard.finish(stale.kill, step=run.state.global_step)
    _open_runs[run] = _MlflowTracker(run)


@hookimpl
def on_log(run, logs):
    tracker = _open_runs.get(run)
    if tracker is None:  # not the main process
        return
    step = run.state.global_step
    values = _numbers(logs)
    # The trainer repeats its progress counters in evaluation and end-of-training logs:
    # MLflow keeps every point, so log them once per step.
    for key in PROGRESS_KEYS:
        if key in values and tracker.progress_step.get(key) == step:
            del values[key]
        elif key in values:
            tracker.progress_step[key] = step
    if values:
        tracker.guard.submit(tracker.log_metrics, values, step, int(time.time() * 1000),
                             step=step)


@hookimpl
def on_train_end(run, summary):
    tracker = _open_runs.pop(run, None)
    if tracker is None:
        return
    summary["mlflow_run_id"] = tracker.run_id
    summary["mlflow_tracking_uri"] = tracker.uri
    step = run.state.global_step
    tracker.guard.finish(tracker.close, dict(summary), step, step=step)
    tracker.guard.report(summary)


@hookimpl
def on_train_error(run, error):
    tracker = _open_runs.pop(run, None)
    if tracker is None:
        return
    tracker.guard.finish(tracker.close_failed, f"{type(error).__name__}: {error}",
                         step=run.state.global_step)
