"""kill -9 at 20 points of a full fine-tuning run and 8 of a LoRA run (every third while a
checkpoint is being written), rerunning the same command after each: every rerun resumes from a complete checkpoint (the torn ones are skipped),
and the final weights equal those of an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest


from fmtune.pipeline import COMPLETE_MARK
from fmtune.testing import run_cli, write_jsonl

STEPS = 150


def argv(model, data, out, *extra):
    return ["train", *extra, "--model_name_or_path", model, "--training_data_path", data,
            "--output_dir", str(out), "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-2", "--logging_steps", "1", "--seed", "0",
            "--max_steps", str(STEPS), "--save_strategy", "steps", "--save_steps", "1",
            "--save_total_limit", "3"]


KINDS = {"full": ((), "model.safetensors", 20),
         "lora": (("--peft_method", "lora", "--r", "4"), "adapter_model.safetensors", 8)}


def checkpoints(out):
    if not out.is_dir():
        return []
    return sorted((p for p in out.iterdir() if p.name.startswith("checkpoint-")),
                  key=lambda p: int(p.name.split("-")[1]))


def weights(folder, name):
    from safetensors.torch import load_file

    return load_file(str(folder / name))


@pytest.mark.parametrize("kind", list(KINDS))
def test_kill_9_at_many_points_then_rerun_ends_like_an_uninterrupted_run(kind, fmtune_tiny_model,
                                                                         tmp_path):
    extra, weight_file, n_kills = KINDS[kind]
    data = write_jsonl(tmp_path / "train.jsonl",
                       [{"input": f"the cat {i} sees", "output": f" dog {i % 5}"}
                        for i in range(40)])
    ref = tmp_path / "ref"
    res = run_cli(argv(fmtune_tiny_model, data, ref, *extra))
    assert res.exit_code == 0, res.stderr[-2000:]

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fmtune.cli", *argv(fmtune_tiny_model, data, out, *extra)]
    rng = random.Random(1234)
    kills, torn_seen, resumed = 0, 0, []
    while kills < n_kills:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        during_save = kills % 3 == 0  # every third kill waits for a checkpoint being written
        deadline = time.monotonic() + 60
        delay = rng.uniform(0.0, 0.4)
        at_spawn = [c.name for c in checkpoints(out)][-1:]
        started = None
        while proc.poll() is None and time.monotonic() < deadline:
            newest = checkpoints(out)[-1:]
            fresh = [c for c in newest if [c.name] != at_spawn]  # written by this process
            if started is None and fresh:
                started = time.monotonic()  # the model is loaded and steps are running
            if during_save:
                if fresh and not (fresh[0] / COMPLETE_MARK).exists():
                    break
            elif started is not None and time.monotonic() - started > delay:
                break
            time.sleep(0.002)
        if proc.poll() is not None:  # the run ended before this kill: it finished
            _, err = proc.communicate()
            assert proc.returncode == 0, err[-2000:]
            break
        os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        kills += 1
        assert "Traceback" not in err, err[-3000:]
        resumed += [line.split("resuming from ", 1)[1].strip() for line in err.splitlines()
                    if "resuming from " in line]
        torn_seen += sum(not (c / COMPLETE_MARK).exists() for c in checkpoints(out))
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert kills >= n_kills // 2, f"only {kills} kills landed before the run finished"
    assert torn_seen >= 1, "no kill landed while a checkpoint was being written"
    assert resumed, "no rerun resumed from a checkpoint"
    for line in final.stderr.splitlines():
        if "not resuming from" in line:
            assert "incomplete" in line
    print(f"kill -9: {kills} kills, {torn_seen} torn checkpoints seen after a kill, "
          f"{len(resumed)} resumes")
    got, want = weights(out, weight_file), weights(ref, weight_file)
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] - want[name]).abs().max().item() < 1e-5, name
