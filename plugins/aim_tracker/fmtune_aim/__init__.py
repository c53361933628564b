"""fmtune plugin ``aim``: track a run in an aim repository (local folder or remote server).

What goes into the aim run (main process only):

* ``run["hparams"]`` - the resolved config (every option of every active plugin);
* ``run["fmtune"]`` - fmtune's version, the active plugins with their versions,
  the output folder and the checkpoint the run resumed from;
* every number the trainer logs, tracked with ``step`` (global step) and
  ``epoch``: ``loss``, ``learning_rate``, ``grad_norm``,
  ``train_tokens_per_second``, ``num_input_tokens_seen``, ... in context
  ``{"subset": "train"}``, and ``eval_*`` keys without their prefix
  (``eval_loss`` -> ``loss``) in context ``{"subset": "eval"}``;
* aim's system metrics (``__system__cpu``, memory, disk, GPU) every
  ``aim_system_tracking_interval`` seconds, and the terminal output;
* ``run["run_summary"]`` - the run summary (loss, tokens/s, timings, peak memory).

The run hash goes to ``OUTPUT_DIR/aim_tracker.json`` as soon as the run
opens; a run that resumes from a checkpoint in the same output folder
continues that aim run (same hash, more points; steps that are redone after
a resume replace their old values). After closing, a local run is indexed so
that ``aim.Repo(path).get_run(hash)`` sees it at once (``aim up`` would
otherwise index it when it starts).

Losing the tracker never loses the training (:mod:`fmtune.tracking`): every call into
aim runs on the tracker's own thread, each bounded by ``aim_timeout_s``. Opening the
run stays strict (a repository aim cannot open stops the run before its first step, exit
2), but once training runs, the first aim call that fails or hangs (a repository deleted,
replaced or made read-only, a remote server gone) disables aim for the rest of the run
with one warning line; training goes on and completes, the losses stay in
``training_logs.jsonl`` and ``run_summary.json`` says ``"trackers": {"aim": {"status":
"failed", "error": ..., "at_step": N}}`` (``{"status": "ok"}`` otherwise). Each call first
checks that a local repository's ``.aim`` folder is still there and writable, since aim
itself buffers writes and would only fail at the end. At process exit aim closes whatever
is still open and waits for it without limit (for ever when a repository vanished); the
plugin runs that cleanup first, bounded by the same timeout.

Module import is cheap: aim is imported inside the hooks.
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import socket
import threading
import weakref
from typing import Any

from fmtune import hookimpl
from fmtune.files import read_json_object, write_json
from fmtune.tracking import TrackerGuard

log = logging.getLogger("fmtune")

STATE_FILE = "aim_tracker.json"
CONNECT_TIMEOUT_S = 5.0
# fmtune Run (hashed by identity) -> tracker, between begin and end; a Run that is gone
# takes its entry with it
_open_runs: "weakref.WeakKeyDictionary[Any, _AimTracker]" = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------- options


@hookimpl
def add_options(register):
    register("aim_repo", str, None,
             "aim repository folder (aim keeps its data in FOLDER/.aim, created if missing); "
             "default: the nearest folder holding a .aim at or above the current directory, "
             "else the current directory.")
    register("aim_experiment", str, None, "aim experiment to file the run under.")
    register("aim_remote_server_ip", str, None,
             "Track to a remote `aim server` at this host instead of a local repository "
             "(with aim_remote_server_port).")
    register("aim_remote_server_port", int, None,
             "Port of the remote `aim server` (aim's default is 53800).")
    register("aim_system_tracking_interval", float, 10.0,
             "Seconds between samples of aim's system metrics (CPU, memory, disk, GPU); "
             "0 turns them off.")
    register("aim_timeout_s", float, 30.0,
             "Seconds each call into aim may take (opening the run, tracking, closing it); a "
             "call that fails or takes longer mid-run disables aim for the rest of the run "
             "(training goes on; run_summary.json says so), one at the start stops the run.")


def _unreachable(host: str, port: int) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as e:
        reason = e.strerror or type(e).__name__
        return (f"aim_remote_server_ip/aim_remote_server_port: cannot reach an aim server at "
                f"{host}:{port} ({reason}); start one with `aim server --repo FOLDER` or fix "
                f"the address")


def _repo_path_problem(path: str | None) -> str | None:
    """Why an aim repository cannot live in (or be created at) ``path``, or None."""
    what = f"aim_repo {path}" if path else "aim_repo (unset: the current directory)"
    full = os.path.abspath(os.path.expanduser(path or os.curdir))
    if os.path.exists(full) and not os.path.isdir(full):
        return f"{what}: exists and is not a folder"
    dot_aim = os.path.join(full, ".aim")
    if os.path.exists(dot_aim) and not os.path.isdir(dot_aim):
        return f"{what}: {dot_aim} exists and is not a folder"
    existing = full
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{what}: cannot create it, {existing} is a file"
    target = dot_aim if os.path.isdir(dot_aim) else existing
    if not os.access(target, os.W_OK | os.X_OK):
        return f"{what}: {target} is not writable"
    return None


@hookimpl
def validate_config(config):
    problems: list[str] = []
    host, port = config.aim_remote_server_ip, config.aim_remote_server_port
    if (host is None) != (port is None):
        problems.append("aim_remote_server_ip and aim_remote_server_port go together: set both")
    elif host is not None:
        if config.aim_repo:
            problems.append("aim_repo and aim_remote_server_ip/port both set: a run is tracked "
                            "to a local repository or to a remote server, pick one")
        if not 0 < port < 65536:
            problems.append(f"aim_remote_server_port must be between 1 and 65535, got {port}")
        else:
            problems.append(_unreachable(host, port))
    else:
        problems.append(_repo_path_problem(config.aim_repo))
    interval = config.aim_system_tracking_interval
    if interval is not None and interval != 0 and not 0.1 <= interval <= 86400:
        problems.append("aim_system_tracking_interval must be 0 (off) or between 0.1 and 86400 "
                        f"seconds, got {interval}")
    if not 0 < config.aim_timeout_s <= 86400:
        problems.append(f"aim_timeout_s must be between 0 and 86400 seconds, got "
                        f"{config.aim_timeout_s}")
    return [p for p in problems if p]


# -------------------------------------------------------------------- tracking


def _repo_location(config) -> str:
    if config.aim_remote_server_ip:
        return f"aim://{config.aim_remote_server_ip}:{config.aim_remote_server_port}"
    if config.aim_repo:
        return os.path.abspath(os.path.expanduser(config.aim_repo))
    from aim import Repo

    return os.path.abspath(Repo.default_repo_path())


def _read_state(path: str) -> dict[str, Any] | None:
    state = read_json_object(path)
    return state if state and state.get("run_hash") else None


def _jsonable(value: Any) -> Any:
    """Something aim stores as a param: JSON types, other objects as their str()."""
    return json.loads(json.dumps(value, default=str))


class _AimTracker:
    """One open aim run for one fmtune run; every aim call goes through ``self.guard``."""

    def __init__(self, run) -> None:
        config = run.config
        self.location = _repo_location(config)
        self.remote = self.location.startswith("aim://")
        self.state_path = os.path.join(run.output_dir, STATE_FILE)
        self.aim_run = None
        self.guard = TrackerGuard("aim", config.aim_timeout_s)
        self.guard.open_or_refuse(self.open_run, run, self.location)

    def open_run(self, run) -> None:
        """Open (or reopen) the aim run; on the guard's thread."""
        from aim import Repo
        from aim import Run as AimRun

        config = run.config
        previous = _read_state(self.state_path) if run.resumed_from else None
        interval = config.aim_system_tracking_interval or None
        kwargs: dict[str, Any] = dict(repo=self.location, system_tracking_interval=interval,
                                      capture_terminal_logs=True)
        experiment = config.aim_experiment or config.get("experiment")  # fms-hf-tuning's name
        if experiment:
            kwargs["experiment"] = experiment
        resume_hash = None
        if previous and previous.get("repo") == self.location:
            if self.remote or Repo.from_path(self.location).run_exists(previous["run_hash"]):
                resume_hash = previous["run_hash"]
        if previous and resume_hash is None:
            log.warning("aim: run %s from %s is not in %s; starting a new aim run",
                        previous["run_hash"], self.state_path, self.location)
        self.aim_run = AimRun(resume_hash, **kwargs)
        _bound_exit_cleanup(self.guard.timeout_s)
        self.hash = self.aim_run.hash
        self.resumed = resume_hash is not None

        from fmtune import __version__
        from fmtune.plugins import plugin_versions

        self.aim_run["hparams"] = _jsonable(config.to_dict())
        self.aim_run["fmtune"] = _jsonable({
            "version": __version__,
            "plugins": plugin_versions(run.pm),
            "output_dir": os.path.abspath(run.output_dir),
            "resumed_from": run.resumed_from,
            "world_size": run.world_size,
        })
        write_json(self.state_path, {"run_hash": self.hash, "repo": self.location,
                                      "experiment": self.aim_run.experiment})
        log.info("aim: %s run %s in %s", "continuing" if self.resumed else "tracking to",
                 self.hash, self.location)

    def _check_repo(self) -> None:
        """aim buffers what it writes and fails only when it flushes (at the end, or at
        exit): notice a local repository that is gone or read-only at the next call."""
        if self.remote:
            return
        dot_aim = os.path.join(self.location, ".aim")
        if not os.path.isdir(dot_aim):
            raise FileNotFoundError(f"the aim repository {dot_aim} is gone")
        if not os.access(dot_aim, os.W_OK | os.X_OK):
            raise PermissionError(f"the aim repository {dot_aim} is not writable")

    def track(self, logs: dict[str, Any], step: int, epoch: float | None) -> None:
        self._check_repo()
        for key, value in logs.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name, subset = (key[len("eval_"):], "eval") if key.startswith("eval_") else (key, "train")
            self.aim_run.track(float(value), name=name, step=step, epoch=epoch,
                               context={"subset": subset})

    def close(self, summary: dict[str, Any] | None = None) -> None:
        self._check_repo()
        if summary is not None:
            self.aim_run["run_summary"] = _jsonable(summary)
        self.aim_run.close()
        # Drop the closed run before anything else opens the repository: with aim 3.29 a
        # second Repo object reading a run that a live (even closed) Run object still holds
        # corrupts the run's on-disk series ("Corrupt or unsupported checksum type").
        self.aim_run = None
        gc.collect()
        if not self.remote:
            self._index()

    def _index(self) -> None:
        """Make the finished run visible to ``aim.Repo`` (aim's UI server does this too)."""
        try:
            from aim import Repo
            from aim.sdk.index_manager import RepoIndexManager

            RepoIndexManager(Repo.from_path(self.location)).index(self.hash)
        except Exception as e:  # noqa: BLE001 - `aim up` indexes it later anyway
            log.warning("aim: run %s not indexed (%s: %s); `aim up` will index it",
                        self.hash, type(e).__name__, e)


    def close_failed(self, error: str) -> None:
        self._check_repo()
        self.aim_run["run_error"] = error
        self.close()


# Process-wide, because aim's own cleanup is: at exit, aim closes every run and container
# still open (aim.ext.cleanup.AutoClean) and waits without limit for that, for ever when one
# of them raises (a repository deleted under a run). Registered after aim's, ours runs first,
# bounded by the aim_timeout_s of the latest run.
_exit_cleanup = {"timeout_s": 30.0, "registered": False}
# aim runs whose tracker failed, kept from the garbage collector: collecting an aim Run
# closes it (weakref.finalize) on whatever thread collects, training's included, and that
# close can hang for ever when the repository is gone. The exit cleanup, bounded, closes them.
_failed_runs: list[Any] = []


def _bound_exit_cleanup(timeout_s: float) -> None:
    _exit_cleanup["timeout_s"] = timeout_s
    if not _exit_cleanup["registered"]:
        _exit_cleanup["registered"] = True
        atexit.register(_run_exit_cleanup)


def _run_exit_cleanup() -> None:
    """aim's exit cleanup, each step guarded, all of it within the timeout."""
    try:
        from aim.ext.cleanup import AutoClean
    except Exception:  # noqa: BLE001 - nothing to clean then
        return
    problems: list[str] = []

    def clean() -> None:
        # aim's order: higher priority first, equal ones newest first
        for _key, (_priority, finalizer) in reversed(
                sorted(list(AutoClean._finalizers.items()), key=lambda kv: kv[1][0])):
            try:
                finalizer()
            except Exception as e:  # noqa: BLE001 - a repository gone: go on with the rest
                problems.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    worker = threading.Thread(target=clean, name="fmtune-aim-exit", daemon=True)
    worker.start()
    worker.join(_exit_cleanup["timeout_s"])
    AutoClean.stop_signal.set()  # aim's own cleanup then returns at once instead of waiting
    if worker.is_alive() or problems:
        why = problems[0] if problems else f"not done in {_exit_cleanup['timeout_s']:g} s"
        log.warning("aim: could not close everything at exit (%s); left as it is", why)


def _finish(tracker: _AimTracker, close, *args: Any, step: int) -> None:
    if not tracker.guard.finish(close, *args, step=step) and tracker.aim_run is not None:
        _failed_runs.append(tracker.aim_run)


@hookimpl
def on_train_begin(run):
    if not run.is_main_process:
        return
    stale = _open_runs.pop(run, None)
    if stale is not None:
        _finish(stale, stale.close, step=run.state.global_step)
    _open_runs[run] = _AimTracker(run)


@hookimpl
def on_log(run, logs):
    tracker = _open_runs.get(run)
    if tracker is None:  # not the main process
        return
    epoch = logs.get("epoch", run.state.epoch)
    step = run.state.global_step
    tracker.guard.submit(tracker.track, dict(logs), step, None if epoch is None else float(epoch),
                         step=step)


@hookimpl
def on_train_end(run, summary):
    tracker = _open_runs.pop(run, None)
    if tracker is None:
        return
    summary["aim_run_hash"] = tracker.hash
    summary["aim_repo"] = tracker.location
    _finish(tracker, tracker.close, dict(summary), step=run.state.global_step)
    tracker.guard.report(summary)


@hookimpl
def on_train_error(run, error):
    tracker = _open_runs.pop(run, None)
    if tracker is None:
        return
    _finish(tracker, tracker.close_failed, f"{type(error).__name__}: {error}",
            step=run.state.global_step)
