"""One run per output_dir: a second run into a folder in use is refused in one line naming the
holder's PID; the lock of a killed run does not block the next one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from fmtune.testing import DEMO_RECORDS, run_cli, write_jsonl

HOLD = """
import sys, time
from fmtune import runlock
lock = runlock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def test_second_run_refused_then_lock_of_killed_run_taken_over(fmtune_tiny_model, tmp_path):
    out = tmp_path / "out"
    data = write_jsonl(tmp_path / "d.jsonl", DEMO_RECORDS)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = ["train", "--model_name_or_path", fmtune_tiny_model, "--training_data_path", data,
                "--output_dir", str(out), "--max_steps", "1"]
        res = run_cli(argv)
        assert res.exit_code == 2
        assert f"output_dir {out} is in use by another fmtune run (PID {holder.pid}, started " \
            in res.stderr
        assert not out.exists()  # nothing written by the refused run
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    start = time.time()
    res = run_cli(argv)
    assert res.exit_code == 0, res.stderr[-2000:]
    assert (out / "run_summary.json").is_file() and time.time() - start < 120
    # and the finished run released it
    from fmtune import runlock

    runlock.release(runlock.acquire(str(out)))
    assert os.path.isfile(runlock.lock_path(str(out)))
