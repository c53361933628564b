"""run_summary.json's peak_rss_mb is the run's own peak memory, even when the run is started
from a large process (Linux carries ru_maxrss across fork and exec: a run started by a test
runner or a notebook holding gigabytes reported the parent's memory)."""

from __future__ import annotations

import json
import subprocess
import sys

from fmtune.testing import DEMO_RECORDS, write_jsonl


def test_peak_rss_is_the_runs_own(fmtune_tiny_model, tmp_path):
    held = bytearray(3 * 1024 ** 3)  # 3 GiB, touched so that it is resident in this process
    for i in range(0, len(held), 4096):
        held[i] = 1
    data = write_jsonl(tmp_path / "d.jsonl", DEMO_RECORDS)
    proc = subprocess.run([sys.executable, "-m", "fmtune.cli", "train", "--model_name_or_path",
                           fmtune_tiny_model, "--training_data_path", data, "--output_dir",
                           str(tmp_path / "out"), "--max_steps", "1", "--save_strategy", "no"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert 50 < summary["peak_rss_mb"] < 2500  # a tiny model's run: well under 1 GB here
    del held
