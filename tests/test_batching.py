"""Automatic batch size: --total_train_batch_size T is met exactly on any number of processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from fmtune.batching import BatchError, plan_batch
from fmtune.testing import DEMO_RECORDS, run_cli, write_jsonl

WORLD_SIZES = (1, 2, 3, 4, 8)
TOTALS = (1, 8, 12, 24, 48, 96, 120)
MAX_PER_DEVICE = (1, 2, 3, 4, 5, 8, 16)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_plan_table(world_size):
    checked = 0
    for total in TOTALS:
        for cap in MAX_PER_DEVICE:
            if total % world_size:
                with pytest.raises(BatchError, match=f"total_train_batch_size {total} is not "
                                                     f"divisible by the number of processes "
                                                     f"{world_size}"):
                    plan_batch(total, cap, world_size)
                continue
            plan = plan_batch(total, cap, world_size)
            assert plan.world_size * plan.per_device * plan.grad_accum == total == plan.total
            assert 1 <= plan.per_device <= cap
            # the largest per-device batch that fits: no bigger one <= cap divides the work
            per_process = total // world_size
            assert not any(per_process % d == 0 for d in range(plan.per_device + 1, cap + 1))
            checked += 1
    assert checked >= 7 * len(MAX_PER_DEVICE) // 2


def test_plan_examples():
    assert (plan_batch(12, 4, 2).per_device, plan_batch(12, 4, 2).grad_accum) == (3, 2)
    assert (plan_batch(96, 5, 3).per_device, plan_batch(96, 5, 3).grad_accum) == (4, 8)
    assert (plan_batch(7, 8, 1).per_device, plan_batch(7, 8, 1).grad_accum) == (7, 1)
    assert (plan_batch(7, 6, 1).per_device, plan_batch(7, 6, 1).grad_accum) == (1, 7)  # 7 is prime
    # an explicit per-device batch or accumulation is kept, the other derived
    assert plan_batch(32, 8, 4, per_device=2).grad_accum == 4
    assert plan_batch(32, 8, 4, grad_accum=2).per_device == 4
    assert plan_batch(32, 8, 4, per_device=4, grad_accum=2).total == 32


@pytest.mark.parametrize("kwargs, message", [
    (dict(total=32, max_per_device=8, world_size=4, per_device=3),
     "total_train_batch_size 32 is not divisible by per_device_train_batch_size 3 x 4 processes"),
    (dict(total=32, max_per_device=8, world_size=4, per_device=4, grad_accum=4),
     "total_train_batch_size 32 contradicts per_device_train_batch_size 4 x "
     "gradient_accumulation_steps 4 x 4 processes = 64"),
    (dict(total=32, max_per_device=2, world_size=2, grad_accum=4),
     "needs per_device_train_batch_size 4, above max_per_device_train_batch_size 2"),
    (dict(total=24, max_per_device=8, world_size=2, grad_accum=5),
     "not divisible by gradient_accumulation_steps 5 x 2 processes"),
    (dict(total=0, max_per_device=8, world_size=2), "total_train_batch_size must be >= 1, got 0"),
])
def test_plan_errors(kwargs, message):
    with pytest.raises(BatchError) as e:
        plan_batch(**kwargs)
    assert message in str(e.value)


def _train_args(model, data, out, *extra):
    return ["train", "--model_name_or_path", model, "--training_data_path", data,
            "--output_dir", str(out), "--max_steps", "2", "--save_strategy", "no",
            "--logging_steps", "1", "--use_cpu", "true", *extra]


def test_cli_errors_exit_2(fmtune_tiny_model, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", DEMO_RECORDS)
    out = tmp_path / "out"
    cases = [
        (["--total_train_batch_size", "8", "--per_device_train_batch_size", "3"],
         "total_train_batch_size 8 is not divisible by per_device_train_batch_size 3 x 1 process"),
        (["--total_train_batch_size", "8", "--per_device_train_batch_size", "2",
          "--gradient_accumulation_steps", "2"],
         "total_train_batch_size 8 contradicts per_device_train_batch_size 2 x "
         "gradient_accumulation_steps 2 x 1 process = 4"),
        (["--max_per_device_train_batch_size", "4"],
         "max_per_device_train_batch_size needs total_train_batch_size"),
        # auto picks the per-device batch: an explicit one contradicts it
        (["--max_per_device_train_batch_size", "auto", "--per_device_train_batch_size", "4"],
         "max_per_device_train_batch_size auto picks per_device_train_batch_size; remove "
         "per_device_train_batch_size 4 (or give a number as the cap)"),
        (["--max_per_device_train_batch_size", "auto", "--total_train_batch_size", "8",
          "--gradient_accumulation_steps", "3"],
         "total_train_batch_size 8 is not divisible by gradient_accumulation_steps 3 x 1 process"),
        (["--max_per_device_train_batch_size", "lots"],
         "max_per_device_train_batch_size must be an integer or auto, got 'lots'"),
        (["--auto_batch_max_memory", "2"],
         "auto_batch_max_memory needs max_per_device_train_batch_size auto"),
        (["--max_per_device_train_batch_size", "auto", "--auto_batch_max_memory", "0"],
         "auto_batch_max_memory must be a number of GB > 0, got 0"),
    ]
    for extra, message in cases:
        res = run_cli(_train_args(fmtune_tiny_model, data, out, *extra))
        assert res.exit_code == 2, res.stderr
        assert message in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    # a bad per-device batch is reported once, by the option check, not again by the plan
    res = run_cli(_train_args(fmtune_tiny_model, data, out, "--total_train_batch_size", "8",
                              "--per_device_train_batch_size", "0"))
    assert res.exit_code == 2
    assert "per_device_train_batch_size must be >= 1, got 0" in res.stderr
    assert "max_per_device" not in res.stderr
    # the accelerate config's process count counts, before anything is launched
    acc = tmp_path / "acc.yaml"
    acc.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\n"
                   "num_machines: 1\nnum_processes: 4\nuse_cpu: true\n")
    res = run_cli(_train_args(fmtune_tiny_model, data, out, "--total_train_batch_size", "6",
                              "--accelerate_config", str(acc)))
    assert res.exit_code == 2
    assert "total_train_batch_size 6 is not divisible by the number of processes 4" in res.stderr
    assert not out.exists()
    # the launcher's WORLD_SIZE counts: 7 examples cannot be split over 2 processes
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = run_cli(_train_args(fmtune_tiny_model, data, out, "--total_train_batch_size", "7"))
    assert res.exit_code == 2
    assert "total_train_batch_size 7 is not divisible by the number of processes 2" in res.stderr
    assert not out.exists()  # nothing written


def test_two_process_cpu_run(fmtune_tiny_model, tmp_path):
    """A real 2-process (gloo, MULTI_CPU) run picks per-device 3 x accumulation 2 for T=12, M=4."""
    data = write_jsonl(tmp_path / "d.jsonl", DEMO_RECORDS * 3)
    out = tmp_path / "out"
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert accelerate, "accelerate's launcher is installed with fmtune"
    # `--cpu` alone gives accelerate's single-process launcher; this config gives 2 gloo processes
    launch_cfg = tmp_path / "accelerate.yaml"
    launch_cfg.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\n"
                          "num_machines: 1\nnum_processes: 2\nuse_cpu: true\n"
                          "mixed_precision: 'no'\n", encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [accelerate, "launch", "--config_file", str(launch_cfg), "-m", "fmtune.cli",
           *_train_args(fmtune_tiny_model, data, out, "--total_train_batch_size", "12",
                        "--max_per_device_train_batch_size", "4")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "run_summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["world_size"] == 2
    assert summary["per_device_train_batch_size"] == 3
    assert summary["gradient_accumulation_steps"] == 2
    assert summary["total_train_batch_size"] == 12
    assert summary["global_step"] == 2
    assert "total_train_batch_size 12: 2 processes x 3 per device x 2 accumulation steps = 12 " \
           "examples per optimizer step" in proc.stderr
    # the trainer agrees: 2 steps of 12 examples are exactly one pass over the 24 records
    assert summary["epoch"] == 1.0
