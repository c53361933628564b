"""Experiment trackers (aim, MLflow, TensorBoard, ...): the :class:`Tracker` base and the
:class:`TrackerGuard` that keeps a tracker from ever stopping training.

Public API for tracker plugins (docs/plugins.md, "Writing a tracker").

**A tracker plugin is a** :class:`Tracker` **subclass** that implements what is particular to
its tracker (open or continue a tracker run, log numbers, close it, mark it failed, check
where it writes) and wires its hooks with one line; the base does the rest, the same for
every tracker::

    class CsvTracker(Tracker):
        name = "csv"                              # --plugins csv, csv_tracker.json, csv_timeout_s
        def open(self, run, resume_id): ...       # -> the tracker run's id
        def log(self, metrics, step, epoch, wall_time): ...
        def close(self, summary): ...
        def fail(self, error): ...

    (add_options, validate_config, on_train_begin, on_log, on_train_end,
     on_train_error) = CsvTracker.hooks()

What the base does: main process (rank 0) only; every call into the tracker through a
:class:`TrackerGuard` (below); the run-state file ``OUTPUT_DIR/NAME_tracker.json`` (the
tracker run's id and where it is, written as soon as it opens), so that a run resumed from a
checkpoint continues the same tracker run; the option ``NAME_timeout_s`` and its check; the
tracker run's id and place in ``run_summary.json`` (``NAME_<id_key>``, ``NAME_<target_key>``)
with ``summary["trackers"][NAME]``; per-run state in ``run.config.stash`` (never in module
globals); trackers that failed kept until exit; an optional bounded exit cleanup.

**The guard.** A tracker plugin sends every call into its tracker through one guard (the
base does it for a :class:`Tracker`)::

    guard = TrackerGuard("aim", timeout_s=config.aim_timeout_s)
    handle = guard.start(open_run, run, step=run.state.global_step)   # setup
    guard.submit(handle.track, dict(logs), step=step)                # while training
    guard.finish(handle.close, dict(summary), step=step)             # at the end
    guard.report(summary)               # summary["trackers"]["aim"] = guard.status()

What it guarantees:

* **Setup stays strict.** :meth:`TrackerGuard.start` waits for the call (at most
  ``timeout_s``) and raises :class:`TrackerError` when it fails or gives no answer in
  time; the plugin turns that into its one-line setup error before the first step: a
  tracker that cannot even open is a configuration problem.
* **After setup nothing the tracker does reaches training.** Calls run in order on one
  daemon worker thread per tracker; :meth:`~TrackerGuard.submit` queues a call and returns
  at once, so a slow tracker costs the training loop nothing. The first call that raises,
  or that is still running ``timeout_s`` after it began (checked at each ``submit`` and in
  ``finish``), *fails* the tracker: one warning line ("tracker aim failed at step 3:
  <reason>; disabled for the rest of the run; the losses are in training_logs.jsonl"),
  the calls queued behind it are dropped and every later call is a no-op. Nothing is
  retried: what was not sent is kept locally in ``training_logs.jsonl``, which the core
  writes whatever the trackers do. A backlog of :data:`MAX_PENDING` calls (a tracker far
  slower than training) fails it too, so memory stays bounded.
* **The end is bounded.** :meth:`~TrackerGuard.finish` queues the last call (close the
  run) and waits at most ``timeout_s`` in all for the queue to drain; what is still
  pending then fails the tracker. A call that hangs for ever keeps only its daemon
  thread, which neither blocks training nor the exit of the process.
* **The summary says so.** :meth:`~TrackerGuard.status` is ``{"status": "ok"}`` or
  ``{"status": "failed", "error": "<one line>", "at_step": N}`` (the step of the call
  that failed); :meth:`~TrackerGuard.report` files it in ``summary["trackers"][name]``
  (``run_summary.json``).

The guard is per run (a plugin keeps it with its per-run tracker state); it imports
nothing heavy.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, ClassVar, NamedTuple

from .hookspecs import hookimpl
from .stash import StashKey

if TYPE_CHECKING:
    from .config import Config
    from .pipeline import Run

__all__ = ["Tracker", "TrackerGuard", "TrackerError", "MAX_PENDING", "one_line"]

log = logging.getLogger("fmtune")

#: queued calls at most: beyond, the tracker is failed as falling behind
MAX_PENDING = 10_000
_REASON_CHARS = 300
_STOP = object()


class TrackerError(Exception):
    """:meth:`TrackerGuard.start` failed (the call raised, or gave no answer in time)."""


def one_line(error: BaseException) -> str:
    """``Type: first line of the message``, at most a few hundred characters."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    reason = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return reason if len(reason) <= _REASON_CHARS else reason[:_REASON_CHARS - 3] + "..."


def _name_of(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


class TrackerGuard:
    """Runs the calls into one tracker off the training thread, each bounded by
    ``timeout_s``; the first failure disables the tracker for the rest of the run."""

    def __init__(self, name: str, timeout_s: float) -> None:
        if not timeout_s or timeout_s <= 0:
            raise ValueError(f"tracker {name}: timeout_s must be > 0, got {timeout_s}")
        self.name = name
        self.timeout_s = float(timeout_s)
        self._lock = threading.Condition()
        # (fn, args, kwargs, step, future, quiet) or _STOP, guarded by _lock
        self._queue: list[Any] = []
        self._busy: tuple[float, int | None, str] | None = None  # (since, step, call name)
        self._failure: dict[str, Any] | None = None
        self._closed = False  # finish() was called
        self._thread = threading.Thread(target=self._work, name=f"fmtune-tracker-{name}",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------- status

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def status(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._failure) if self._failure else {"status": "ok"}

    def report(self, summary: dict[str, Any]) -> dict[str, Any]:
        """File :meth:`status` in ``summary["trackers"][name]``; return it."""
        status = self.status()
        summary.setdefault("trackers", {})[self.name] = status
        return status

    # -------------------------------------------------------------- calls

    def start(self, fn: Callable, *args: Any, step: int | None = None, **kwargs: Any) -> Any:
        """Run ``fn`` (open the tracker's run) and return its result; raise
        :class:`TrackerError` when it raises or gives no answer in ``timeout_s``."""
        future = self._put(fn, args, kwargs, step, quiet=True)
        if future is None:
            raise TrackerError(self._failure["error"] if self._failure else "tracker closed")
        try:
            done = future.exception(timeout=self.timeout_s) is None
        except TimeoutError:
            reason = f"{_name_of(fn)} gave no answer in {self.timeout_s:g} s"
            self._fail(step, reason, quiet=True)
            raise TrackerError(reason) from None
        except Exception as e:  # noqa: BLE001 - cancelled: the guard failed meanwhile
            raise TrackerError(one_line(e)) from e
        error = future.exception()
        if not done and error is not None:
            raise TrackerError(one_line(error)) from error
        return future.result()

    def open_or_refuse(self, fn: Callable, run: Any, where: str) -> Any:
        """:meth:`start` ``fn(run)`` at the run's step; a failure is the user's one-line
        ConfigError (the tracker's own, or "NAME: cannot open a run in WHERE: why") and the
        guard is finished. Setup stays strict: only mid-run failures are tolerated."""
        from .config import ConfigError

        try:
            return self.start(fn, run, step=run.state.global_step)
        except TrackerError as e:
            self.finish()
            if isinstance(e.__cause__, ConfigError):
                raise e.__cause__ from None
            raise ConfigError(f"{self.name}: cannot open a run in {where}: {e}") from e

    def submit(self, fn: Callable, *args: Any, step: int | None = None, **kwargs: Any) -> bool:
        """Queue ``fn(*args, **kwargs)``; return at once (False when the tracker is
        disabled). Pass copies of anything the caller changes afterwards."""
        self._check_hung()
        return self._put(fn, args, kwargs, step) is not None

    def finish(self, fn: Callable | None = None, *args: Any, step: int | None = None,
               **kwargs: Any) -> bool:
        """Queue the last call, wait at most ``timeout_s`` for everything queued to be
        sent, and stop the worker; True when the tracker ended without a failure."""
        self._check_hung()
        if fn is not None:
            self._put(fn, args, kwargs, step)
        deadline = time.monotonic() + self.timeout_s
        with self._lock:
            if self._closed:
                return self._failure is None
            self._closed = True
            self._queue.append(_STOP)
            self._lock.notify_all()
            self._wait_sent(deadline)
            waiting = self._waiting()
            if self._failure is None and self._busy:
                _since, busy_step, call = self._busy
                more = f" ({waiting} more call(s) not sent)" if waiting else ""
                self._fail(busy_step, f"{call} gave no answer in {self.timeout_s:g} s at the "
                                      f"end{more}")
            elif self._failure is None and waiting:
                self._fail(step, f"{waiting} call(s) not sent in {self.timeout_s:g} s at the end")
            return self._failure is None

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait (at most ``timeout_s``, default the guard's) until every queued call is
        done; True when the queue is empty. Training never needs this; tests do."""
        self._check_hung()
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        with self._lock:
            self._wait_sent(deadline)
            return not self._busy and not self._waiting()

    # ----------------------------------------------------------- internals

    def _waiting(self) -> int:
        """Calls queued and not started (under the lock)."""
        return sum(1 for item in self._queue if item is not _STOP)

    def _wait_sent(self, deadline: float) -> None:
        """Wait (under the lock) until nothing is queued or running, a failure, or the
        deadline; the worker notifies after each call. Calls still waiting behind a running
        call are left to it: the worker starts the next one as soon as it is free."""
        while self._failure is None and (self._busy or self._waiting()):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._lock.wait(left)

    def _put(self, fn, args, kwargs, step, quiet: bool = False) -> Future | None:
        with self._lock:
            if self._failure is not None or self._closed:
                return None
            if len(self._queue) >= MAX_PENDING:
                self._fail(step, f"falling behind: {MAX_PENDING} calls waiting to be sent")
                return None
            future: Future = Future()
            self._queue.append((fn, args, kwargs, step, future, quiet))
            self._lock.notify_all()
            return future

    def _check_hung(self) -> None:
        with self._lock:
            if self._busy is None or self._failure is not None:
                return
            since, step, call = self._busy
            if time.monotonic() - since > self.timeout_s:
                self._fail(step, f"{call} gave no answer in {self.timeout_s:g} s")

    def _fail(self, step: int | None, reason: str, quiet: bool = False) -> None:
        """Record the first failure and say it once (call with or without the lock)."""
        with self._lock:
            if self._failure is not None:
                return
            self._failure = {"status": "failed", "error": reason, "at_step": step}
            dropped = [item for item in self._queue if item is not _STOP]
            self._queue = [item for item in self._queue if item is _STOP]
            self._lock.notify_all()
        for item in dropped:
            item[4].cancel()
        if not quiet:
            at = f" at step {step}" if step is not None else ""
            log.warning("tracker %s failed%s: %s; disabled for the rest of the run; the losses "
                        "are in training_logs.jsonl", self.name, at, reason)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    self._lock.wait()
                item = self._queue.pop(0)
                if item is _STOP:
                    self._lock.notify_all()
                    return
                fn, args, kwargs, step, future, quiet = item
                if self._failure is not None or not future.set_running_or_notify_cancel():
                    continue
                self._busy = (time.monotonic(), step, _name_of(fn))
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - a tracker's failure is only reported
                error: BaseException | None = e
            else:
                error = None
            with self._lock:
                self._busy = None
                if error is not None:
                    # start() raises the error itself: no warning line for it here
                    self._fail(step, one_line(error), quiet=quiet)
                self._lock.notify_all()
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)


# ---------------------------------------------------------------------- the tracker base

# Trackers whose guard failed, kept until the process exits: collecting a tracker library's
# run object may close it (a finalizer) on whatever thread collects, training's included, and
# that close can hang for ever when the tracker's store is gone. Process-wide by nature (it
# outlives the run on purpose); holds the tracker objects only, never the run.
_failed_trackers: list[Any] = []
#: the trainer's progress counters, which it repeats in evaluation and end-of-training logs:
#: :class:`Tracker` sends each once per step
PROGRESS_KEYS = ("epoch", "num_input_tokens_seen")


class Tracker:
    """Base of a tracker plugin: one tracker run per fmtune run, on the main process only.

    A subclass sets :attr:`name` (and, as it needs, :attr:`id_key`, :attr:`target_key`,
    :attr:`timeout_s`) and implements:

    * :meth:`open` ``(run, resume_id) -> id``: open a tracker run, or continue the one named
      ``resume_id`` (None: a new one; a run that is gone: open a new one), and return its id;
    * :meth:`log` ``(metrics, step, epoch, wall_time)``: the numbers of one trainer log
      (``epoch`` and ``num_input_tokens_seen`` only once per step: the trainer repeats them);
    * :meth:`close` ``(summary)``: the run completed (``summary`` is ``run_summary.json``'s
      content), or, with ``None``, is abandoned (the trainer began again);
    * :meth:`fail` ``(error)``: the training failed (``error``: ``"Type: message"``);

    and, optionally, :meth:`options` (its options), :meth:`check` (what is wrong with where
    it writes, before anything loads), :meth:`target` (where it writes: a folder or a URI),
    :meth:`state` (more keys for the state file) and :meth:`at_exit` (a cleanup at process
    exit, bounded by the timeout). Every one of open/log/close/fail runs on the tracker's own
    thread through a :class:`TrackerGuard`: it may block or raise; the base turns that into
    the one-line setup error (open) or the tracker disabled for the rest of the run (the
    rest). :meth:`hooks` makes the plugin's hook functions.
    """

    #: the plugin's name: the guard's, ``summary["trackers"][name]``, the state file
    #: ``NAME_tracker.json`` and the option ``NAME_timeout_s``
    name: ClassVar[str] = ""
    #: the tracker run id's key in the state file; ``run_summary.json`` gets ``NAME_<id_key>``
    id_key: ClassVar[str] = "run_id"
    #: where the tracker writes (:meth:`target`), key in the state file and, as
    #: ``NAME_<target_key>``, in ``run_summary.json``
    target_key: ClassVar[str] = "target"
    #: default of ``NAME_timeout_s``: seconds each call into the tracker may take
    timeout_s: ClassVar[float] = 30.0
    #: said after the timeout option's own help
    timeout_help: ClassVar[str] = ""
    #: this tracker class's per-run slot in ``run.config.stash`` (one per subclass)
    key: ClassVar[StashKey[Any]] = StashKey()
    # the exit cleanup (at_exit): registered once per class, with the latest run's timeout
    _exit_registered: ClassVar[bool] = False
    _exit_timeout_s: ClassVar[float] = 30.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.key = StashKey()

    # ------------------------------------------------- what a subclass implements

    @classmethod
    def options(cls, register: Callable[..., None]) -> None:
        """Register the tracker's options (``add_options``); the base adds ``NAME_timeout_s``."""

    @classmethod
    def check(cls, config: Config) -> list[str] | str | None:
        """Problems with the tracker's options or target, found without writing anything
        (``validate_config``: reported before anything loads, exit 2)."""
        return None

    @classmethod
    def target(cls, config: Config) -> str:
        """Where the tracker writes (an absolute folder, a URI): messages name it, the state
        file keeps it (a resumed run continues its tracker run only at the same target)."""
        return ""

    def open(self, run: Run, resume_id: str | None) -> str:
        """Open a tracker run (continue ``resume_id`` when given and still there); return its id."""
        raise NotImplementedError

    def log(self, metrics: dict[str, float], step: int, epoch: float | None,
            wall_time: float) -> None:
        """Send the numbers of one trainer log (``loss``, ``learning_rate``, ``eval_loss``,
        ``epoch``, ...; numbers only) at ``step``; ``wall_time`` is when it was logged."""
        raise NotImplementedError

    def close(self, summary: dict[str, Any] | None) -> None:
        """Close the tracker run: completed with ``summary``, or abandoned (``None``)."""
        raise NotImplementedError

    def fail(self, error: str) -> None:
        """Close the tracker run as failed: the training raised ``error``."""
        self.close(None)

    def state(self) -> dict[str, Any]:
        """More keys for the state file (after the id and the target)."""
        return {}

    @classmethod
    def at_exit(cls, timeout_s: float) -> None:
        """At process exit, after any run of this tracker opened: clean up what the tracker
        library leaves open (bounded: use :meth:`bounded`). Not called unless overridden."""

    # ------------------------------------------------------------ what the base does

    def __init__(self, run: Run) -> None:
        config = run.config
        self.where = self.target(config)
        self.state_path = os.path.join(run.output_dir, f"{self.name}_tracker.json")
        self.id: str | None = None
        self.resumed = False
        self._progress_step: dict[str, int] = {}
        self.guard = TrackerGuard(self.name, config.get(f"{self.name}_timeout_s")
                                  or self.timeout_s)

    @classmethod
    def of(cls, run: Run) -> Tracker | None:
        """This tracker's open run for ``run`` (None before it opens, after it ends, and on
        processes other than the main one)."""
        return run.config.stash.get(cls.key)

    def open_run(self, run: Run) -> None:
        """Open or continue the tracker run and write the state file; on the guard's thread."""
        from .files import read_json_object, write_json

        previous = read_json_object(self.state_path) if run.resumed_from else None
        resume_id = None
        if previous and previous.get(self.id_key):
            if previous.get(self.target_key) == self.where:
                resume_id = str(previous[self.id_key])
            else:
                log.warning("%s: %s names a run in %s, not %s; starting a new %s run", self.name,
                            self.state_path, previous.get(self.target_key), self.where,
                            self.name)
        try:
            self.id = self.open(run, resume_id)
        finally:
            self._register_exit()
        self.resumed = resume_id is not None and self.id == resume_id
        if resume_id is not None and not self.resumed:
            log.warning("%s: run %s from %s is not in %s any more; started a new %s run %s",
                        self.name, resume_id, self.state_path, self.where, self.name, self.id)
        write_json(self.state_path, {self.id_key: self.id, self.target_key: self.where,
                                     **self.state()})
        log.info("%s: %s run %s in %s", self.name,
                 "continuing" if self.resumed else "tracking to", self.id, self.where)

    @staticmethod
    def about(run: Run) -> dict[str, Any]:
        """What a tracker records about the run besides its options: fmtune's version, the
        active plugins with their versions, output folder, checkpoint resumed from, world size."""
        from . import __version__
        from .plugins import plugin_versions

        return {"version": __version__, "plugins": plugin_versions(run.pm),
                "output_dir": os.path.abspath(run.output_dir),
                "resumed_from": run.resumed_from, "world_size": run.world_size}

    @staticmethod
    def jsonable(value: Any) -> Any:
        """``value`` with JSON types only (other objects as their str())."""
        return json.loads(json.dumps(value, default=str))

    @staticmethod
    def bounded(fn: Callable[[], Any], timeout_s: float) -> str | None:
        """Run ``fn()`` on a daemon thread for at most ``timeout_s``: None when it returned,
        else why not (its error in one line, or that it did not finish)."""
        problems: list[str] = []

        def call() -> None:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - reported to the caller
                problems.append(one_line(e))

        worker = threading.Thread(target=call, name="fmtune-tracker-bounded", daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            return f"not done in {timeout_s:g} s"
        return problems[0] if problems else None

    def _register_exit(self) -> None:
        cls = type(self)
        if cls.at_exit.__func__ is Tracker.at_exit.__func__:  # type: ignore[attr-defined]
            return
        cls._exit_timeout_s = self.guard.timeout_s  # the latest run's
        if not cls.__dict__.get("_exit_registered"):
            cls._exit_registered = True
            # registered after the tracker library's own exit handlers (it opened a run
            # first): atexit runs it before them
            atexit.register(lambda: cls.at_exit(cls._exit_timeout_s))

    def _end(self, fn: Callable, *args: Any, step: int) -> None:
        if not self.guard.finish(fn, *args, step=step):
            _failed_trackers.append(self)

    # ------------------------------------------------------------------- hooks

    class Hooks(NamedTuple):
        add_options: Callable
        validate_config: Callable
        on_train_begin: Callable
        on_log: Callable
        on_train_end: Callable
        on_train_error: Callable

    @classmethod
    def hooks(cls) -> Tracker.Hooks:
        """The plugin's hook functions, for its module to hold::

            (add_options, validate_config, on_train_begin, on_log, on_train_end,
             on_train_error) = MyTracker.hooks()

        Each is marked for its hook by name (``specname``), so the names it is held under do
        not matter to pluggy. A plugin may add hooks of its own next to them."""
        timeout_option = f"{cls.name}_timeout_s"

        def add_options(register):
            cls.options(register)
            register(timeout_option, float, cls.timeout_s,
                     f"Seconds each call into {cls.name} may take (opening the run, logging, "
                     f"closing it); a call that fails or takes longer mid-run disables "
                     f"{cls.name} for the rest of the run (training goes on; run_summary.json "
                     f"says so), one at the start stops the run." +
                     (f" {cls.timeout_help}" if cls.timeout_help else ""))

        def validate_config(config):
            found = cls.check(config)
            problems = [found] if isinstance(found, str) else [p for p in found or [] if p]
            timeout = config.get(timeout_option)
            if timeout is None or not 0 < timeout <= 86400:
                problems.append(f"{timeout_option} must be between 0 and 86400 seconds, got "
                                f"{timeout}")
            return problems

        def on_train_begin(run):
            if not run.is_main_process:
                return
            stale = run.config.stash.pop(cls.key, None)
            if stale is not None:  # the trainer began again in this run
                stale._end(stale.close, None, step=run.state.global_step)
            tracker = cls(run)
            tracker.guard.open_or_refuse(tracker.open_run, run, tracker.where)
            run.config.stash[cls.key] = tracker

        def on_log(run, logs):
            tracker = cls.of(run)
            if tracker is None:  # not the main process
                return
            step = run.state.global_step
            epoch = logs.get("epoch", run.state.epoch)
            metrics = {k: float(v) for k, v in logs.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            # The trainer repeats its progress counters in evaluation and end-of-training
            # logs: send them once per step.
            for name in PROGRESS_KEYS:
                if name in metrics and tracker._progress_step.get(name) == step:
                    del metrics[name]
                elif name in metrics:
                    tracker._progress_step[name] = step
            if metrics:
                tracker.guard.submit(tracker.log, metrics, step,
                                     None if epoch is None else float(epoch), time.time(),
                                     step=step)

        def on_train_end(run, summary):
            tracker = run.config.stash.pop(cls.key, None)
            if tracker is None:
                return
            summary[f"{cls.name}_{cls.id_key}"] = tracker.id
            summary[f"{cls.name}_{cls.target_key}"] = tracker.where
            tracker._end(tracker.close, dict(summary), step=run.state.global_step)
            tracker.guard.report(summary)

        def on_train_error(run, error):
            tracker = run.config.stash.pop(cls.key, None)
            if tracker is None:
                return
            tracker._end(tracker.fail, f"{type(error).__name__}: {error}",
                         step=run.state.global_step)

        fns = (add_options, validate_config, on_train_begin, on_log, on_train_end,
               on_train_error)
        for fn in fns:
            fn.__qualname__ = f"{cls.__name__}.hooks.{fn.__name__}"
        return cls.Hooks(*(hookimpl(specname=fn.__name__)(fn) for fn in fns))
