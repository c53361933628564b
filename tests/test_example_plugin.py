"""The example third-party plugin: pip-installed, listed, and called during a real run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fmtune.testing import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fmtune-example-plugin"
FMTUNE = os.path.join(os.path.dirname(sys.executable), "fmtune")


def test_pip_installed_plugin_is_listed_and_called(fmtune_tiny_model, tmp_path):
    site = tmp_path / "site"
    source = tmp_path / "src"
    shutil.copytree(EXAMPLE, source)  # the build writes next to the sources: keep the repo clean
    # A real pip install (into its own folder, so the test venv is left as it was).
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(source)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}

    listed = subprocess.run([FMTUNE, "plugins", "--json"], env=env, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    row = rows["example_events"]
    assert row["distribution"] == "fmtune-example-events" and row["version"] == "0.1.0"
    assert row["hooks"] == ["add_options", "on_log", "on_save", "on_train_begin", "on_train_end",
                            "validate_config"]
    assert row["error"] is None

    # not active: its option is refused with the --plugins to add
    data = write_jsonl(tmp_path / "d.jsonl", [{"input": "hello there", "output": "hi"}] * 4)
    args = ["train", "--model_name_or_path", fmtune_tiny_model, "--training_data_path", data,
            "--output_dir", str(tmp_path / "out"), "--max_steps", "4", "--logging_steps", "2",
            "--save_strategy", "steps", "--save_steps", "2", "--per_device_train_batch_size", "2",
            "--events_file", str(tmp_path / "events.jsonl")]
    refused = subprocess.run([FMTUNE, *args], env=env, capture_output=True, text=True)
    assert refused.returncode == 2
    assert "belongs to plugin 'example_events'" in refused.stderr
    assert "add --plugins example_events" in refused.stderr

    ran = subprocess.run([FMTUNE, *args, "--plugins", "example_events"], env=env,
                         capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    losses = [e for e in events if e["event"] == "log" and "loss" in e["logs"]]
    assert [e["event"] for e in events][0] == "train_begin"
    assert [e["event"] for e in events][-1] == "train_end"
    assert [e["step"] for e in losses] == [2, 4]
    assert [e["checkpoint_dir"] for e in events if e["event"] == "save"] == [
        str(tmp_path / "out" / "checkpoint-2"), str(tmp_path / "out" / "checkpoint-4")]
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["plugins"] == {"example_events": "0.1.0"}
    assert summary["events_file"] == str(tmp_path / "events.jsonl")
    assert events[-1]["final_loss"] == summary["final_loss"]


EXAMPLES = sorted(p.parent for p in (ROOT / "examples").glob("fmtune-example-*/pyproject.toml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_each_example_plugin_passes_its_own_tests_installed(example, tmp_path):
    """Every example plugin carries its own tests; they run with it pip-installed, the way its
    author (and a third-party plugin's CI) runs them."""
    assert sorted(p.name for p in (example / "tests").glob("test_*.py")), example
    site, source = tmp_path / "site", tmp_path / "src"
    shutil.copytree(example, source)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(source)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    ran = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests"], cwd=source, env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-2000:]
    last = ran.stdout.strip().splitlines()[-1]
    assert " passed" in last and "skipped" not in last and "failed" not in last, last
