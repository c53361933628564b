"""``--max_per_device_train_batch_size auto`` (core/fmtune/batching.py apply_auto,
core/fmtune/plan.py fit_batch; docs/plan.md): the per-device batch is the largest that
``fmtune plan`` predicts fits the memory, planned after the data is prepared and before the
model loads, then split as ``--total_train_batch_size`` asks.

The memory is given with ``--auto_batch_max_memory`` (GiB): the device's own (the RAM
available here) would fit any batch of the 0.5 MB tiny model. The limits are placed from the
plan's own two points (batch 1 and 2: the peak is linear in the batch) so that exactly 3
examples fit, and one that not even 1 example fits. The CPU process baseline is seeded in a
fresh cache (XDG_CACHE_HOME) so that `fmtune plan` and the run read the same value without
the one-step measuring run.
"""

from __future__ import annotations

import json
import os

import pytest

from fmtune import plan as planmod
from fmtune.cli import load_config
from fmtune.plan import GiB, plan_from_argv
from fmtune.testing import DEMO_RECORDS, run_cli, write_jsonl

BASELINE_MB = 900.0


@pytest.fixture
def setup(fmtune_tiny_model, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", DEMO_RECORDS * 2)  # 16 records
    common = ["--model_name_or_path", fmtune_tiny_model, "--training_data_path", data,
              "--use_cpu", "true"]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config, _, _, _ = load_config([*common, "--output_dir", str(tmp_path / "unused")])
    key = planmod._baseline_key(list(config.plugins))
    os.makedirs(tmp_path / "cache" / "fmtune")
    (tmp_path / "cache" / "fmtune" / planmod.BASELINE_FILE).write_text(
        json.dumps({key: BASELINE_MB}))

    def peak(batch):
        plan, _ = plan_from_argv([*common, "--output_dir", str(tmp_path / "unused"),
                                  "--per_device_train_batch_size", str(batch), "--tflops", "1"])
        assert plan.memory["process_baseline"] == int(BASELINE_MB * 2**20)  # the seeded one
        return plan.peak_bytes

    p1, p2 = peak(1), peak(2)
    assert p2 > p1
    return common, p1, p2 - p1


def _train(common, out, *extra):
    return run_cli(["train", *common, "--output_dir", str(out), "--max_steps", "2",
                    "--save_strategy", "no", "--logging_steps", "1", "--learning_rate", "1e-3",
                    "--max_per_device_train_batch_size", "auto", *extra])


def test_auto_is_the_plans_largest_fitting_batch(setup, tmp_path):
    common, p1, per_example = setup
    limit = repr((p1 + 2.5 * per_example) / GiB)  # 3 examples fit, 4 do not
    plan, _ = plan_from_argv([*common, "--output_dir", str(tmp_path / "unused"),
                              "--max-memory", limit, "--tflops", "1"])
    assert plan.largest_batch == 3

    # with a total: 8 = 1 process x 2 per device x 4 (the largest divisor of 8 that fits)
    out = tmp_path / "total"
    res = _train(common, out, "--auto_batch_max_memory", limit, "--total_train_batch_size", "8")
    assert res.exit_code == 0, res.stderr
    summary = json.loads((out / "run_summary.json").read_text())
    assert (summary["per_device_train_batch_size"], summary["gradient_accumulation_steps"],
            summary["total_train_batch_size"], summary["global_step"]) == (2, 4, 8, 2)
    auto = summary["auto_batch"]
    assert auto["largest_batch"] == plan.largest_batch == 3
    assert auto["budget"] == f"auto_batch_max_memory {float(limit):g} GiB"
    assert auto["memory_budget_mb"] == pytest.approx(float(limit) * 1024, abs=0.1)
    assert auto["seq_len_source"] == "the data" and auto["device"] == "cpu"
    assert auto["peak_at_1_mb"] == pytest.approx(p1 / 2**20, abs=0.1)
    lines = [line for line in res.stderr.splitlines()
             if "max_per_device_train_batch_size auto:" in line]
    assert len(lines) == 1, res.stderr
    assert (f"at most 3 per device fit auto_batch_max_memory {float(limit):g} GiB; using 2 "
            "(predicted peak") in lines[0]
    assert lines[0].endswith("total_train_batch_size 8: 1 process x 2 per device x 4 "
                             "accumulation steps = 8 examples per optimizer step")

    # without a total: the fitting batch is the per-device batch, no accumulation
    out = tmp_path / "alone"
    res = _train(common, out, "--auto_batch_max_memory", limit)
    assert res.exit_code == 0, res.stderr
    summary = json.loads((out / "run_summary.json").read_text())
    assert (summary["per_device_train_batch_size"], summary["gradient_accumulation_steps"],
            summary["global_step"]) == (3, 1, 2)
    assert summary["auto_batch"]["largest_batch"] == 3


def test_too_little_memory_for_one_example_is_a_one_line_error(setup, tmp_path):
    common, p1, per_example = setup
    limit = repr((p1 - per_example) / GiB)
    out = tmp_path / "out"
    res = _train(common, out, "--auto_batch_max_memory", limit, "--total_train_batch_size", "8")
    assert res.exit_code == 2
    # one error line, the last (after the data's progress line: the plan needs its lengths)
    lines = res.stderr.strip().splitlines()
    assert [line for line in lines if "error" in line] == lines[-1:], res.stderr
    assert lines[-1].startswith(
        f"fmtune: error: max_per_device_train_batch_size auto: not even 1 example per device "
        f"fits auto_batch_max_memory {float(limit):g} GiB (predicted peak at batch 1: ")
    assert "Loading weights" not in res.stderr  # decided before the model loads
    assert not out.exists()  # nothing written


def test_memory_budget_of_this_machine():
    """Without auto_batch_max_memory: 85 % of the RAM available (plus this process's own)."""
    budget, why = planmod.memory_budget("cpu", 1)
    avail, _ = planmod.available_ram()
    assert 0 < budget <= 0.85 * (avail + planmod._rss_bytes()) + 2**20
    assert why.startswith(f"{planmod._gb(budget)} of RAM (85% of ")
    two, why2 = planmod.memory_budget("cpu", 2)
    assert two < budget and "shared by 2 processes" in why2
    assert planmod.memory_budget("cpu", 1, 1.5) == (int(1.5 * GiB),
                                                    "auto_batch_max_memory 1.5 GiB")
