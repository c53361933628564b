"""SIGTERM / Ctrl-C: the step in progress ends, a checkpoint is saved, the run exits 128+signal
with one line; rerunning the command resumes from that checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fmtune.testing import DEMO_RECORDS, write_jsonl


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_first_signal_saves_and_stops(fmtune_tiny_model, tmp_path, signum):
    data = write_jsonl(tmp_path / "d.jsonl", DEMO_RECORDS * 4)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "fmtune.cli", "train", "--model_name_or_path",
            fmtune_tiny_model, "--training_data_path", data, "--output_dir", str(out),
            "--max_steps", "100000", "--per_device_train_batch_size", "1", "--logging_steps", "1",
            "--save_strategy", "no"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = out / "training_logs.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not logs.exists() or
                                      len(logs.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signum, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("fmtune: error:")]
    assert len(errors) == 1 and f"stopped by {signal.Signals(signum).name} at step" in errors[0]
    assert "Traceback" not in err
    checkpoints = [d for d in os.listdir(out) if d.startswith("checkpoint-")]
    assert len(checkpoints) == 1
    step = int(checkpoints[0].split("-")[1])
    assert f"checkpoint saved in {out / checkpoints[0]}" in errors[0]
    state = json.loads((out / checkpoints[0] / "trainer_state.json").read_text())
    assert state["global_step"] == step >= 3
    # rerunning resumes from it (a few more steps)
    res = subprocess.run([*argv[:argv.index("100000")], str(step + 2), *argv[
        argv.index("100000") + 1:]], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["resumed_from"] == str(out / checkpoints[0])
    assert summary["global_step"] == step + 2
