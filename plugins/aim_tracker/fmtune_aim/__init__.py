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

Losing the tracker never loses the training (:class:`fmtune.tracking.Tracker`, whose
base does the run-state file, resume, rank 0 and the guard): every call into aim runs on
the tracker's own thread, each bounded by ``aim_timeout_s``. Opening the run stays strict
(a repository aim cannot open stops the run before its first step, exit 2), but once
training runs, the first aim call that fails or hangs (a repository deleted, replaced or
made read-only, a remote server gone) disables aim for the rest of the run with one
warning line; training goes on and completes, the losses stay in ``training_logs.jsonl``
and ``run_summary.json`` says ``"trackers": {"aim": {"status": "failed", "error": ...,
"at_step": N}}`` (``{"status": "ok"}`` otherwise). Each call first checks that a local
repository's ``.aim`` folder is still there and writable, since aim itself buffers writes
and would only fail at the end. At process exit aim closes whatever is still open and
waits for it without limit (for ever when a repository vanished); the plugin runs that
cleanup first, bounded by the same timeout.

Module import is cheap: aim is imported inside the hooks.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
from typing import Any

from fmtune.tracking import Tracker

log = logging.getLogger("fmtune")

CONNECT_TIMEOUT_S = 5.0


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


class AimTracker(Tracker):
    """One aim run per fmtune run; the base class does the rest."""

    name = "aim"
    id_key = "run_hash"
    target_key = "repo"

    @classmethod
    def options(cls, register):
        register("aim_repo", str, None,
                 "aim repository folder (aim keeps its data in FOLDER/.aim, created if "
                 "missing); default: the nearest folder holding a .aim at or above the current "
                 "directory, else the current directory.")
        register("aim_experiment", str, None, "aim experiment to file the run under.")
        register("aim_remote_server_ip", str, None,
                 "Track to a remote `aim server` at this host instead of a local repository "
                 "(with aim_remote_server_port).")
        register("aim_remote_server_port", int, None,
                 "Port of the remote `aim server` (aim's default is 53800).")
        register("aim_system_tracking_interval", float, 10.0,
                 "Seconds between samples of aim's system metrics (CPU, memory, disk, GPU); "
                 "0 turns them off.")

    @classmethod
    def check(cls, config):
        problems: list[str | None] = []
        host, port = config.aim_remote_server_ip, config.aim_remote_server_port
        if (host is None) != (port is None):
            problems.append("aim_remote_server_ip and aim_remote_server_port go together: "
                            "set both")
        elif host is not None:
            if config.aim_repo:
                problems.append("aim_repo and aim_remote_server_ip/port both set: a run is "
                                "tracked to a local repository or to a remote server, pick one")
            if not 0 < port < 65536:
                problems.append(f"aim_remote_server_port must be between 1 and 65535, got {port}")
            else:
                problems.append(_unreachable(host, port))
        else:
            problems.append(_repo_path_problem(config.aim_repo))
        interval = config.aim_system_tracking_interval
        if interval is not None and interval != 0 and not 0.1 <= interval <= 86400:
            problems.append("aim_system_tracking_interval must be 0 (off) or between 0.1 and "
                            f"86400 seconds, got {interval}")
        return [p for p in problems if p]

    @classmethod
    def target(cls, config):
        if config.aim_remote_server_ip:
            return f"aim://{config.aim_remote_server_ip}:{config.aim_remote_server_port}"
        if config.aim_repo:
            return os.path.abspath(os.path.expanduser(config.aim_repo))
        from aim import Repo

        return os.path.abspath(Repo.default_repo_path())

    def __init__(self, run) -> None:
        super().__init__(run)
        self.remote = self.where.startswith("aim://")
        self.aim_run: Any = None

    def open(self, run, resume_id):
        from aim import Repo
        from aim import Run as AimRun

        config = run.config
        if resume_id and not self.remote and not Repo.from_path(self.where).run_exists(resume_id):
            resume_id = None
        kwargs: dict[str, Any] = dict(repo=self.where, capture_terminal_logs=True,
                                      system_tracking_interval=config.aim_system_tracking_interval
                                      or None)
        experiment = config.aim_experiment or config.get("experiment")  # fms-hf-tuning's name
        if experiment:
            kwargs["experiment"] = experiment
        self.aim_run = AimRun(resume_id, **kwargs)
        self.aim_run["hparams"] = self.jsonable(config.to_dict())
        self.aim_run["fmtune"] = self.jsonable(self.about(run))
        return self.aim_run.hash

    def state(self):
        return {"experiment": self.aim_run.experiment}

    def _check_repo(self) -> None:
        """aim buffers what it writes and fails only when it flushes (at the end, or at
        exit): notice a local repository that is gone or read-only at the next call."""
        if self.remote:
            return
        dot_aim = os.path.join(self.where, ".aim")
        if not os.path.isdir(dot_aim):
            raise FileNotFoundError(f"the aim repository {dot_aim} is gone")
        if not os.access(dot_aim, os.W_OK | os.X_OK):
            raise PermissionError(f"the aim repository {dot_aim} is not writable")

    def track(self, metrics, step, epoch, wall_time):
        self._check_repo()
        for key, value in metrics.items():
            if key == "epoch":
                continue
            name, subset = (key[len("eval_"):], "eval") if key.startswith("eval_") else (key, "train")
            self.aim_run.track(value, name=name, step=step, epoch=epoch,
                               context={"subset": subset})

    log = track  # the guard names a call by its function: "track gave no answer in 30 s"

    def close(self, summary):
        self._check_repo()
        if summary is not None:
            self.aim_run["run_summary"] = self.jsonable(summary)
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

            RepoIndexManager(Repo.from_path(self.where)).index(self.id)
        except Exception as e:  # noqa: BLE001 - `aim up` indexes it later anyway
            log.warning("aim: run %s not indexed (%s: %s); `aim up` will index it",
                        self.id, type(e).__name__, e)

    def fail(self, error):
        self._check_repo()
        self.aim_run["run_error"] = error
        self.close(None)

    @classmethod
    def at_exit(cls, timeout_s):
        """aim's own exit cleanup (aim.ext.cleanup.AutoClean closes every run and container
        still open, and waits without limit, for ever when one raises: a repository deleted
        under a run), each step guarded, all of it within the timeout; registered after
        aim's, so it runs first."""
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
                except Exception as e:  # noqa: BLE001 - a repository gone: go on
                    problems.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

        why = cls.bounded(clean, timeout_s)
        AutoClean.stop_signal.set()  # aim's own cleanup then returns at once instead of waiting
        if why or problems:
            log.warning("aim: could not close everything at exit (%s); left as it is",
                        problems[0] if problems else why)


(add_options, validate_config, on_train_begin, on_log, on_train_end,
 on_train_error) = AimTracker.hooks()
