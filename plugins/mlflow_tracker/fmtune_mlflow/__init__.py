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

Losing the tracker never loses the training (:class:`fmtune.tracking.Tracker`, whose
base does the run-state file, resume, rank 0 and the guard): every MLflow call runs on the
tracker's own thread, each bounded by ``mlflow_timeout_s``. Opening the run stays strict (a
store or server that cannot open a run stops the run before its first step, exit 2), but
once training runs, the first call that fails or hangs (a server that died, a store deleted
or made read-only) disables MLflow for the rest of the run with one warning line; training
goes on and completes, the losses stay in ``training_logs.jsonl`` and ``run_summary.json``
says ``"trackers": {"mlflow": {"status": "failed", "error": ..., "at_step": N}}``
(``{"status": "ok"}`` otherwise). MLflow's own HTTP retries (7 retries with exponential
backoff, 120 s per request: about 8 minutes against a dead server) are bounded too: unless
set in the environment, the plugin sets ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=2``,
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` = a quarter of
``mlflow_timeout_s`` in its process, so that a dead server gives MLflow's own error within
the timeout.

Module import is cheap: mlflow is imported inside the hooks.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from fmtune.config import ConfigError
from fmtune.records import folder_problem
from fmtune.tracking import Tracker

log = logging.getLogger("fmtune")

CONNECT_TIMEOUT_S = 5.0
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param's length
PARAMS_PER_BATCH = 100  # MLflow's limit on params per log_batch
BARE_URIS = ("databricks", "databricks-uc", "uc")  # tracking URIs that are not folders
# the tracking store schemes MLflow knows (mlflow.tracking._tracking_service.utils registers
# them); a store plugin adds its own through the entry point group mlflow.tracking_store
KNOWN_SCHEMES = frozenset({"file", "sqlite", "postgresql", "mysql", "mssql", "http", "https",
                           "databricks", "databricks-uc", "uc"})


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


def uri_problem(uri: str) -> str | None:
    """Why MLflow cannot track to ``uri`` (checked without writing anything), or None."""
    what = f"mlflow_tracking_uri {uri}"
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        path = unquote(parsed.path)
        why = folder_problem(path)
        return f"{what}: {path}: {why}" if why else None
    if parsed.scheme == "sqlite":
        db = unquote(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else ""
        if not db or db == ":memory:":
            return f"{what}: name a database file, e.g. sqlite:///mlflow.db"
        folder = os.path.dirname(os.path.abspath(db))
        if not os.path.isdir(folder):
            return f"{what}: the folder {folder} does not exist"
        if os.path.isdir(db):
            return f"{what}: {db} is a folder, not a database file"
        for module in ("alembic", "sqlalchemy"):
            try:
                importlib.import_module(module)
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


def _plugin_schemes() -> set[str]:
    from importlib import metadata

    return {ep.name for ep in metadata.entry_points(group="mlflow.tracking_store")}


def bound_http_retries(timeout_s: float) -> None:
    """MLflow's HTTP retry settings, bounded to fit in ``timeout_s``: set in this process
    unless the environment sets them."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(timeout_s // 4))))


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


class MlflowTracker(Tracker):
    """One MLflow run per fmtune run; the base class does the rest."""

    name = "mlflow"
    id_key = "run_id"
    target_key = "tracking_uri"
    timeout_help = ("Also bounds MLflow's HTTP retries (unless MLFLOW_HTTP_REQUEST_* are "
                    "set).")

    @classmethod
    def options(cls, register):
        register("mlflow_tracking_uri", str, None,
                 "MLflow tracking URI: a folder or file:/path (a local store that works "
                 "offline), sqlite:///path.db, or an http(s):// tracking server; default: "
                 "$MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db in the "
                 "current directory).")
        register("mlflow_experiment", str, None,
                 "MLflow experiment name (created if missing); default: MLflow's 'Default'.")

    @classmethod
    def target(cls, config):
        return normalize_uri(config.mlflow_tracking_uri or _default_uri())

    @classmethod
    def check(cls, config):
        return uri_problem(cls.target(config))

    def __init__(self, run) -> None:
        super().__init__(run)
        if self.where.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        bound_http_retries(self.guard.timeout_s)

    def open(self, run, resume_id):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.client = MlflowClient(tracking_uri=self.where)
        found = None
        if resume_id:
            try:
                found = self.client.get_run(resume_id)
            except MlflowException:
                pass
        if found is not None:
            self.experiment_id = found.info.experiment_id
            self.client.update_run(found.info.run_id, status="RUNNING")
            run_id = found.info.run_id
        else:
            run_id = self._create(run)
        self._log_params(run, run_id)
        return run_id

    def state(self):
        return {"experiment_id": self.experiment_id,
                "experiment_name": self.client.get_experiment(self.experiment_id).name}

    def _create(self, run) -> str:
        name = run.config.mlflow_experiment or run.config.get("experiment") or "Default"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            self.experiment_id = self.client.create_experiment(name)
        elif experiment.lifecycle_stage == "deleted":
            raise ConfigError(f"mlflow: experiment {name!r} is deleted at {self.where}; restore "
                              "it or choose another mlflow_experiment")
        else:
            self.experiment_id = experiment.experiment_id
        created = self.client.create_run(
            self.experiment_id, run_name=os.path.basename(os.path.abspath(run.output_dir)),
            tags={"fmtune.output_dir": os.path.abspath(run.output_dir)})
        return created.info.run_id

    def _log_params(self, run, run_id: str) -> None:
        from mlflow.entities import Param, RunTag

        about = self.about(run)
        params = {name: _param_value(value) for name, value in run.config.to_dict().items()}
        params["fmtune_version"] = about["version"]
        params.update({f"plugin.{name}": str(version)
                       for name, version in about["plugins"].items()})
        logged = self.client.get_run(run_id).data.params
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        if changed:
            log.warning("mlflow: MLflow params cannot change; %s keep their first value in run %s",
                        ", ".join(changed), run_id)
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=new[i:i + PARAMS_PER_BATCH])
        if run.resumed_from:
            self.client.log_batch(run_id, tags=[RunTag("fmtune.resumed_from",
                                                       str(run.resumed_from))])

    def _send(self, values: dict[str, float], step: int, wall_time: float) -> None:
        from mlflow.entities import Metric

        if values:
            at_ms = int(wall_time * 1000)
            self.client.log_batch(self.id, metrics=[Metric(k, v, at_ms, step)
                                                    for k, v in values.items()])

    def log_metrics(self, metrics, step, epoch, wall_time):
        self._send(metrics, step, wall_time)

    log = log_metrics  # the guard names a call by its function: "log_metrics gave no answer"

    def close(self, summary):
        import time

        if summary is None:  # abandoned: the trainer began again
            self.client.set_terminated(self.id, "KILLED")
            return
        numbers = {f"summary/{k}": float(v) for k, v in summary.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._send(numbers, int(summary.get("global_step") or 0), time.time())
        self.client.set_terminated(self.id, "FINISHED")

    def fail(self, error):
        from mlflow.entities import RunTag

        self.client.log_batch(self.id, tags=[RunTag("fmtune.error", error[:5000])])
        self.client.set_terminated(self.id, "FAILED")


(add_options, validate_config, on_train_begin, on_log, on_train_end,
 on_train_error) = MlflowTracker.hooks()
