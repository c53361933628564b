"""The aim plugin end to end: train a tiny model, read the run back with aim's own SDK."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata

import pytest

from fmtune.testing import (DEMO_RECORDS, AtStep, logged_series, NotRankZero, run_cli, train_argv,
                           write_jsonl, writes_despite_read_only)

EPOCHS = ("step", "value", "epoch")
RECORDS = [DEMO_RECORDS[i] for i in (0, 1, 2, 5)]  # 4 records: 2 steps an epoch at batch 2


def train_args(model, tmp_path, out, *extra):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    return train_argv(model, data, out, "--plugins", "aim", "--per_device_train_batch_size", "2",
                      "--learning_rate", "1e-3", *extra)


def aim_series(aim_run, name, subset):
    """(steps, values, epochs) of one metric of an aim run, in step order."""
    for metric in aim_run.metrics():
        if metric.name == name and metric.context.to_dict() == {"subset": subset}:
            steps, (values, epochs, _timestamps) = metric.data.items_list()
            return list(steps), list(values), list(epochs)
    raise AssertionError(f"aim run has no metric {name!r} in subset {subset!r}")


def test_params_and_metrics_read_back_with_aim_sdk(fmtune_tiny_model, tmp_path):
    from aim import Repo

    out, repo_dir = tmp_path / "out", tmp_path / "aimrepo"
    valid = write_jsonl(tmp_path / "valid.jsonl", RECORDS[:2])
    res = run_cli(train_args(fmtune_tiny_model, tmp_path, out, "--max_steps", "6",
                             "--aim_repo", str(repo_dir), "--experiment", "tiny-exp",
                             "--validation_data_path", valid, "--eval_strategy", "steps",
                             "--eval_steps", "3"))
    assert res.exit_code == 0, res.stderr
    state = json.loads((out / "aim_tracker.json").read_text())
    assert state["repo"] == str(repo_dir) and state["experiment"] == "tiny-exp"

    # No manual indexing: the plugin leaves the finished run visible to aim.Repo.
    aim_run = Repo(str(repo_dir)).get_run(state["run_hash"])
    assert aim_run is not None and aim_run.experiment == "tiny-exp"
    hparams = aim_run["hparams"]
    assert hparams["learning_rate"] == 1e-3 and hparams["max_steps"] == 6
    assert hparams["aim_repo"] == str(repo_dir) and hparams["output_dir"] == str(out)
    assert hparams["model_name_or_path"] == fmtune_tiny_model
    assert aim_run["fmtune"]["plugins"] == {"aim": metadata.version("fmtune-aim")}
    assert aim_run["fmtune"]["version"] == metadata.version("fmtune")

    # train and eval loss: one point per logged step, values equal to training_logs.jsonl
    steps, train_losses, epochs = logged_series(out, "training_loss", EPOCHS)
    assert steps == [1, 2, 3, 4, 5, 6]
    a_steps, a_values, a_epochs = aim_series(aim_run, "loss", "train")
    assert a_steps == steps and a_values == train_losses
    assert a_epochs == pytest.approx(epochs, abs=1e-4)  # the jsonl rounds epochs to 4 places
    eval_steps, eval_losses, _ = logged_series(out, "validation_loss", EPOCHS)
    assert eval_steps == [3, 6]
    assert aim_series(aim_run, "loss", "eval")[:2] == (eval_steps, eval_losses)
    # the trainer's other numbers: same steps, and the learning rate equals its own history
    with open(out / "run_summary.json") as f:
        summary = json.load(f)
    for name in ("learning_rate", "grad_norm", "train_tokens_per_second", "num_input_tokens_seen"):
        assert aim_series(aim_run, name, "train")[0] == [1, 2, 3, 4, 5, 6], name
    lrs = aim_series(aim_run, "learning_rate", "train")[1]
    assert lrs == pytest.approx([1e-3 * (6 - s) / 6 for s in range(6)])  # linear decay from 1e-3
    tokens = aim_series(aim_run, "num_input_tokens_seen", "train")[1]
    assert tokens[-1] == summary["train_tokens"]
    # system metrics (aim samples them at start, then every 10 s) and the run summary
    assert any(m.name.startswith("__system__") for m in aim_run.metrics())
    assert aim_run["run_summary"]["global_step"] == 6
    assert aim_run["run_summary"]["final_loss"] == train_losses[-1]
    assert summary["aim_run_hash"] == state["run_hash"] and summary["aim_repo"] == str(repo_dir)


READ_BACK = """
import json, sys
from aim import Repo
run = Repo(sys.argv[1]).get_run(sys.argv[2])
for m in run.metrics():
    if m.name == "loss" and m.context.to_dict() == {"subset": "train"}:
        steps, (values, _, _) = m.data.items_list()
        print(json.dumps([list(steps), list(values)]))
"""


def test_resumed_run_continues_the_same_aim_run(fmtune_tiny_model, tmp_path):
    from aim import Repo

    out, repo_dir = tmp_path / "out", tmp_path / "aimrepo"
    args = train_args(fmtune_tiny_model, tmp_path, out, "--aim_repo", str(repo_dir),
                      "--save_strategy", "steps", "--save_steps", "2")
    res = run_cli([*args, "--max_steps", "4"])
    assert res.exit_code == 0, res.stderr
    first = json.loads((out / "aim_tracker.json").read_text())["run_hash"]
    assert aim_series(Repo(str(repo_dir)).get_run(first), "loss", "train")[0] == [1, 2, 3, 4]
    # as if the run had died after step 4 but before its last checkpoint: steps 3-4 are redone
    shutil.rmtree(out / "checkpoint-4")
    res = run_cli([*args, "--max_steps", "6"])
    assert res.exit_code == 0, res.stderr
    assert json.loads((out / "run_summary.json").read_text())["resumed_from"] == \
        str(out / "checkpoint-2")
    assert json.loads((out / "aim_tracker.json").read_text())["run_hash"] == first
    repo = Repo(str(repo_dir))
    assert [r.hash for r in repo.iter_runs()] == [first]  # no second aim run
    steps, values, _ = logged_series(out, "training_loss", EPOCHS)
    assert steps == [1, 2, 3, 4, 5, 6]
    # more points, redone steps replaced, and still equal to training_logs.jsonl
    assert aim_series(repo.get_run(first), "loss", "train")[:2] == (steps, values)
    # a fresh process (as `aim up` or a notebook would) reads the same, uncorrupted series
    read = subprocess.run([sys.executable, "-c", READ_BACK, str(repo_dir), first],
                          capture_output=True, text=True, timeout=120)
    assert read.returncode == 0, read.stderr
    assert json.loads(read.stdout) == [steps, values]

    # starting over (resume_from_checkpoint=false) opens a new aim run
    res = run_cli([*args, "--max_steps", "2", "--resume_from_checkpoint", "false"])
    assert res.exit_code == 0, res.stderr
    second = json.loads((out / "aim_tracker.json").read_text())["run_hash"]
    assert second != first
    assert aim_series(Repo(str(repo_dir)).get_run(second), "loss", "train")[0] == [1, 2]


def test_only_the_main_process_tracks(fmtune_tiny_model, tmp_path):
    out, repo_dir = tmp_path / "out", tmp_path / "aimrepo"
    res = run_cli(train_args(fmtune_tiny_model, tmp_path, out, "--max_steps", "2",
                             "--aim_repo", str(repo_dir)), plugins=[NotRankZero()])
    assert res.exit_code == 0, res.stderr
    assert not (out / "aim_tracker.json").exists()
    assert not (repo_dir / ".aim").exists()  # no aim run was opened at all


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flags, message", [
    (["--aim_repo", "{file}"], "aim_repo {file}: exists and is not a folder"),
    (["--aim_repo", "{file}/sub/repo"], "aim_repo {file}/sub/repo: cannot create it, {file} is a file"),
    (["--aim_remote_server_ip", "127.0.0.1", "--aim_remote_server_port", "{port}"],
     "cannot reach an aim server at 127.0.0.1:{port} (Connection refused)"),
    (["--aim_remote_server_ip", "127.0.0.1"],
     "aim_remote_server_ip and aim_remote_server_port go together: set both"),
    (["--aim_system_tracking_interval", "0.01"], "aim_system_tracking_interval must be 0 (off)"),
    (["--aim_timeout_s", "0"], "aim_timeout_s must be between 0 and 86400 seconds, got 0.0"),
])
def test_bad_repo_or_server_fails_before_training(tmp_path, flags, message):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    fill = {"file": str(a_file), "port": free_port()}
    flags = [f.format(**fill) for f in flags]
    out = tmp_path / "out"
    res = run_cli(train_args("no-model-needed", tmp_path, out, "--max_steps", "1", *flags))
    assert res.exit_code == 2
    assert message.format(**fill) in res.stderr
    assert not out.exists()  # failed before anything was loaded or written


def stop_server(server):
    """Stop an `aim server` and the uvicorn child it starts (its own process group)."""
    if server.poll() is None or _group_alive(server.pid):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    for _ in range(100):  # the group is gone once no member is left
        if not _group_alive(server.pid):
            break
        time.sleep(0.1)
    else:
        os.killpg(server.pid, signal.SIGKILL)


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture
def aim_server(tmp_path):
    """A real `aim server` on a free local port, serving a fresh repository:
    (repo folder, port, a function that stops the server)."""
    repo_dir = tmp_path / "server_repo"
    repo_dir.mkdir()
    port = free_port()
    aim_cli = os.path.join(os.path.dirname(sys.executable), "aim")
    server = subprocess.Popen([aim_cli, "server", "--repo", str(repo_dir), "--host", "127.0.0.1",
                               "--port", str(port)], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                              start_new_session=True)  # its own group: uvicorn children die too
    server.stdin.write("y\n")  # "not a valid Aim repository. Do you want to initialize it?"
    server.stdin.close()
    try:
        for _ in range(600):
            if server.poll() is not None:
                raise RuntimeError(f"aim server exited with {server.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("aim server did not start in 60 s")
        yield repo_dir, port, lambda: stop_server(server)
    finally:
        # `aim server` runs uvicorn in a child process that outlives a plain terminate()
        stop_server(server)


def test_remote_server_receives_the_run(fmtune_tiny_model, tmp_path, aim_server):
    from aim import Repo
    from aim.sdk.index_manager import RepoIndexManager

    repo_dir, port, _stop = aim_server
    out = tmp_path / "out"
    res = run_cli(train_args(fmtune_tiny_model, tmp_path, out, "--max_steps", "3",
                             "--aim_remote_server_ip", "127.0.0.1",
                             "--aim_remote_server_port", str(port), "--experiment", "remote"))
    assert res.exit_code == 0, res.stderr
    state = json.loads((out / "aim_tracker.json").read_text())
    assert state["repo"] == f"aim://127.0.0.1:{port}" and state["experiment"] == "remote"
    # The server stores the run in its repository; `aim up` indexes it there, as we do here.
    repo = Repo.from_path(str(repo_dir))
    RepoIndexManager(repo).index(state["run_hash"])
    aim_run = repo.get_run(state["run_hash"])
    assert aim_run["hparams"]["aim_remote_server_port"] == port
    steps, values, _ = logged_series(out, "training_loss", EPOCHS)
    assert aim_series(aim_run, "loss", "train")[:2] == (steps, values) and steps == [1, 2, 3]


def test_failed_training_closes_the_aim_run_with_the_error(fmtune_tiny_model, tmp_path):
    from aim import Repo

    from fmtune import hookimpl

    class Exploder:
        @hookimpl
        def on_step(self, run):
            if run.state.global_step == 2:
                raise RuntimeError("diverged at step 2")

    out, repo_dir = tmp_path / "out", tmp_path / "aimrepo"
    with pytest.raises(RuntimeError, match="diverged at step 2"):
        run_cli(train_args(fmtune_tiny_model, tmp_path, out, "--max_steps", "4",
                           "--aim_repo", str(repo_dir)), plugins=[Exploder()])
    state = json.loads((out / "aim_tracker.json").read_text())
    aim_run = Repo(str(repo_dir)).get_run(state["run_hash"])
    assert aim_run["run_error"] == "RuntimeError: diverged at step 2"
    # the step-2 hook raised before step 2 was logged: aim holds what the log file holds
    steps, values, _ = logged_series(out, "training_loss", EPOCHS)
    assert aim_series(aim_run, "loss", "train")[:2] == (steps, values) and steps == [1]


# ------------------------------------------------------- losing the tracker mid-run


def lose(repo_dir, how):
    """Take the aim repository away from under a running training."""
    if how == "read-only":
        subprocess.run(["chmod", "-R", "a-w", str(repo_dir)], check=True)
    else:
        shutil.rmtree(repo_dir)
        if how == "replaced by a file":
            repo_dir.write_text("not a repository any more")


def LoseAt(step, fault):
    """At the end of step ``step``, once the tracker has sent what it had, run ``fault()``."""
    import fmtune_aim

    return AtStep(step, fault, ready=lambda run: fmtune_aim.AimTracker.of(run).guard.drain(30))


def summary_of(out):
    return json.loads((out / "run_summary.json").read_text())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("how", ["deleted", "replaced by a file", "read-only"])
def test_a_repository_lost_mid_run_does_not_stop_training(fmtune_tiny_model, tmp_path, how):
    if how == "read-only" and writes_despite_read_only(tmp_path):
        pytest.skip("this user writes to read-only folders (root): the other faults stand in for it")
    out, repo_dir = tmp_path / "out", tmp_path / "aimrepo"
    res = run_cli(train_args(fmtune_tiny_model, tmp_path, out, "--max_steps", "6",
                             "--aim_repo", str(repo_dir), "--aim_timeout_s", "30"),
                  plugins=[LoseAt(2, lambda: lose(repo_dir, how))])
    assert res.exit_code == 0, res.stderr
    if how == "read-only":
        subprocess.run(["chmod", "-R", "u+w", str(repo_dir)], check=True)  # for tmp_path's cleanup
    why = "is not writable" if how == "read-only" else "is gone"
    reason = (f"{'PermissionError' if how == 'read-only' else 'FileNotFoundError'}: the aim "
              f"repository {repo_dir / '.aim'} {why}")
    assert summary_of(out)["trackers"] == {"aim": {"status": "failed", "at_step": 2,
                                                   "error": reason}}
    assert res.stderr.count("tracker aim") == 1
    assert (f"tracker aim failed at step 2: {reason}; disabled for the rest of the run; the "
            "losses are in training_logs.jsonl") in res.stderr
    assert logged_series(out, "training_loss", EPOCHS)[0] == [1, 2, 3, 4, 5, 6]  # nothing lost
    assert summary_of(out)["global_step"] == 6 and (out / "model.safetensors").exists()


def test_a_hung_aim_call_costs_about_the_timeout(fmtune_tiny_model, tmp_path, monkeypatch):
    import threading

    from aim import Run as AimRun

    out, repo_dir = tmp_path / "out", tmp_path / "aimrepo"
    gate, track = threading.Event(), AimRun.track

    def hanging_track(self, value, name=None, step=None, **kw):
        if step == 2:
            gate.wait(300)  # an aim call that does not come back
        return track(self, value, name=name, step=step, **kw)

    monkeypatch.setattr(AimRun, "track", hanging_track)
    begin = time.monotonic()
    try:
        res = run_cli(train_args(fmtune_tiny_model, tmp_path, out, "--max_steps", "6",
                                 "--aim_repo", str(repo_dir), "--aim_timeout_s", "10"))
        took = time.monotonic() - begin
    finally:
        gate.set()
    assert res.exit_code == 0, res.stderr
    assert took < 120  # not the 300 s the call hangs
    status = summary_of(out)["trackers"]["aim"]
    assert status["status"] == "failed" and status["at_step"] == 2
    # found hung by a later call, or at the end when the training was done sooner
    # (10 s, not less: the timeout bounds every aim call, and opening the repository takes
    # more than 2 s on a loaded 2-core machine)
    assert status["error"].startswith("track gave no answer in 10 s")
    assert f"tracker aim failed at step 2: {status['error']};" in res.stderr
    assert logged_series(out, "training_loss", EPOCHS)[0] == [1, 2, 3, 4, 5, 6]


def test_a_healthy_run_reports_aim_ok(fmtune_tiny_model, tmp_path):
    out, repo_dir = tmp_path / "out", tmp_path / "aimrepo"
    res = run_cli(train_args(fmtune_tiny_model, tmp_path, out, "--max_steps", "2",
                             "--aim_repo", str(repo_dir)))
    assert res.exit_code == 0, res.stderr
    assert summary_of(out)["trackers"] == {"aim": {"status": "ok"}}
    assert "tracker aim" not in res.stderr


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_remote_server_gone_mid_run_does_not_stop_training(fmtune_tiny_model, tmp_path,
                                                             aim_server):
    _repo_dir, port, stop = aim_server
    out = tmp_path / "out"
    res = run_cli(train_args(fmtune_tiny_model, tmp_path, out, "--max_steps", "6",
                             "--aim_remote_server_ip", "127.0.0.1",
                             "--aim_remote_server_port", str(port), "--aim_timeout_s", "5"),
                  plugins=[LoseAt(2, stop)])
    assert res.exit_code == 0, res.stderr
    # aim queues remote writes itself: the loss shows when it closes the run (at the end)
    status = summary_of(out)["trackers"]["aim"]
    assert status["status"] == "failed" and 2 <= status["at_step"] <= 6, status
    assert f"tracker aim failed at step {status['at_step']}: {status['error']};" in res.stderr
    assert logged_series(out, "training_loss", EPOCHS)[0] == [1, 2, 3, 4, 5, 6]


def test_an_aim_run_that_cannot_open_in_time_stops_before_training(fmtune_tiny_model,
                                                                    tmp_path, monkeypatch):
    import threading

    from aim import Run as AimRun

    gate = threading.Event()
    monkeypatch.setattr(AimRun, "__init__", lambda self, *a, **kw: gate.wait(300))
    out, repo_dir = tmp_path / "out", tmp_path / "aimrepo"
    try:
        res = run_cli(train_args(fmtune_tiny_model, tmp_path, out, "--max_steps", "2",
                                 "--aim_repo", str(repo_dir), "--aim_timeout_s", "1"))
    finally:
        gate.set()
    assert res.exit_code == 2
    assert (f"fmtune: error: aim: cannot open a run in {repo_dir}: open_run gave no answer "
            "in 1 s") in res.stderr
    assert not (out / "run_summary.json").exists()
