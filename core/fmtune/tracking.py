"""Experiment trackers (aim, MLflow, ...) never stop training: :class:`TrackerGuard`.

Public API for tracker plugins. A tracker plugin sends every call into its tracker
through one guard::

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

import logging
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

__all__ = ["TrackerGuard", "TrackerError", "MAX_PENDING", "one_line"]

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
        if not done:
            error = future.exception()
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
