"""fmtune.tracking.TrackerGuard: tracker calls off the training thread, each bounded by a
timeout; the first failure disables the tracker, says so once and is reported in the summary."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from fmtune import tracking
from fmtune.tracking import TrackerError, TrackerGuard


@pytest.fixture
def warnings_():
    """The fmtune logger's warning lines (it may not propagate to the root logger)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logger = logging.getLogger("fmtune")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def gate():
    """An event that hung calls wait on; set at teardown so their threads end."""
    event = threading.Event()
    yield event
    event.set()


def test_calls_run_in_order_off_the_calling_thread(warnings_):
    guard = TrackerGuard("demo", timeout_s=5)
    seen, threads = [], set()

    def open_run(name):
        threads.add(threading.get_ident())
        return {"run": name}

    def track(step):
        threads.add(threading.get_ident())
        seen.append(step)

    assert guard.start(open_run, "r1", step=0) == {"run": "r1"}
    for step in range(1, 6):
        assert guard.submit(track, step, step=step)
    assert guard.finish(track, "end", step=5) is True
    assert seen == [1, 2, 3, 4, 5, "end"]
    assert threads and threading.get_ident() not in threads
    assert guard._thread.daemon and not guard._thread.is_alive()  # the worker ended
    summary = {"trackers": {"other": {"status": "ok"}}}
    assert guard.report(summary) == {"status": "ok"}
    assert summary["trackers"] == {"other": {"status": "ok"}, "demo": {"status": "ok"}}
    assert guard.submit(track, 6, step=6) is False  # after finish: a no-op
    assert seen[-1] == "end" and warnings_ == []


def test_a_failing_call_disables_the_tracker_and_is_said_once(warnings_):
    guard = TrackerGuard("aim", timeout_s=5)
    sent = []

    def track(step):
        if step == 3:
            raise OSError("[Errno 30] Read-only file system: '/repo/.aim'\nmore detail")
        sent.append(step)

    for step in range(1, 7):
        guard.submit(track, step, step=step)
    assert guard.finish(lambda: sent.append("closed"), step=6) is False
    assert sent == [1, 2]  # nothing after the failure, not even the close
    status = guard.status()
    assert status == {"status": "failed", "at_step": 3,
                      "error": "OSError: [Errno 30] Read-only file system: '/repo/.aim'"}
    assert warnings_ == [
        "tracker aim failed at step 3: OSError: [Errno 30] Read-only file system: "
        "'/repo/.aim'; disabled for the rest of the run; the losses are in training_logs.jsonl"]
    summary = {}
    guard.report(summary)
    assert summary == {"trackers": {"aim": status}}


def test_a_hung_call_never_blocks_the_caller(warnings_, gate):
    guard = TrackerGuard("mlflow", timeout_s=0.3)
    sent = []

    def log_metrics(step):
        if step == 2:
            gate.wait(120)  # a server that never answers
        sent.append(step)

    begin = time.monotonic()
    guard.submit(log_metrics, 1, step=1)
    guard.submit(log_metrics, 2, step=2)
    for step in range(3, 50):  # the training loop goes on meanwhile
        assert guard.submit(log_metrics, step, step=step) in (True, False)
        time.sleep(0.02)
    assert guard.failed  # found hung by a later submit
    assert guard.finish(log_metrics, "close", step=49) is False
    assert time.monotonic() - begin < 60  # nowhere near the 120 s the call hangs
    assert sent == [1]
    assert guard.status() == {"status": "failed", "at_step": 2,
                              "error": "log_metrics gave no answer in 0.3 s"}
    assert len(warnings_) == 1 and warnings_[0].startswith("tracker mlflow failed at step 2: ")
    assert guard._thread.daemon  # stuck in the call, and no obstacle to the process exit


def test_finish_waits_at_most_the_timeout(warnings_, gate):
    guard = TrackerGuard("aim", timeout_s=0.5)
    sent = []
    guard.submit(sent.append, 1, step=1)

    def close():
        gate.wait(120)

    begin = time.monotonic()
    assert guard.finish(close, step=4) is False
    assert time.monotonic() - begin < 60
    assert sent == [1]
    assert guard.status() == {"status": "failed", "at_step": 4,
                              "error": "close gave no answer in 0.5 s at the end"}
    assert len(warnings_) == 1


def test_finish_reports_what_was_left_unsent(warnings_, gate):
    guard = TrackerGuard("aim", timeout_s=0.5)

    def slow(step):
        gate.wait(120)

    guard.submit(slow, 1, step=1)
    guard.submit(slow, 2, step=2)
    assert guard.finish(slow, 3, step=3) is False
    status = guard.status()
    assert status["at_step"] == 1
    assert status["error"] == "slow gave no answer in 0.5 s at the end (2 more call(s) not sent)"


def test_start_raises_and_logs_nothing(warnings_, gate):
    guard = TrackerGuard("aim", timeout_s=5)

    def open_run():
        raise ConnectionError("server at 127.0.0.1:1 refused\ntraceback...")

    with pytest.raises(TrackerError, match=r"^ConnectionError: server at 127.0.0.1:1 refused$"):
        guard.start(open_run, step=0)
    assert guard.failed and guard.submit(print, "never", step=1) is False
    assert warnings_ == []  # the plugin turns the error into its own one-line setup error

    slow = TrackerGuard("aim", timeout_s=0.2)
    with pytest.raises(TrackerError, match=r"^open_slowly gave no answer in 0.2 s$"):
        slow.start(lambda_named("open_slowly", lambda: gate.wait(120)), step=0)
    assert slow.status()["status"] == "failed" and warnings_ == []

    own_timeout = TrackerGuard("aim", timeout_s=5)  # a TimeoutError raised by the call itself
    with pytest.raises(TrackerError, match=r"^TimeoutError: read timed out$"):
        own_timeout.start(raiser(TimeoutError("read timed out")), step=0)


def test_a_backlog_beyond_the_limit_fails_the_tracker(warnings_, gate, monkeypatch):
    monkeypatch.setattr(tracking, "MAX_PENDING", 5)
    guard = TrackerGuard("slowpoke", timeout_s=30)
    started = threading.Event()

    def track(step):
        started.set()
        gate.wait(120)

    guard.submit(track, 0, step=0)
    assert started.wait(10)
    results = [guard.submit(track, step, step=step) for step in range(1, 8)]
    assert results == [True] * 5 + [False, False]
    assert guard.status() == {"status": "failed", "at_step": 6,
                              "error": "falling behind: 5 calls waiting to be sent"}
    assert len(warnings_) == 1


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match="tracker aim: timeout_s must be > 0, got 0"):
        TrackerGuard("aim", timeout_s=0)


def lambda_named(name, fn):
    fn.__name__ = name
    return fn


def raiser(error):
    def call():
        raise error
    return call


def test_drain_waits_until_everything_queued_is_sent():
    guard = TrackerGuard("demo", timeout_s=5)
    sent = []

    def slow_append(value):
        time.sleep(0.05)
        sent.append(value)

    for step in range(3):
        guard.submit(slow_append, step, step=step)
    assert guard.drain() is True and sent == [0, 1, 2]
    assert guard.finish() is True and guard.status() == {"status": "ok"}
