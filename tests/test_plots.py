"""loss.png: drawn at the end of every run, redrawn by `fmtune plot OUTPUT_DIR`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fmtune import plots
from fmtune.testing import run_cli, write_jsonl

RECORDS = [
    {"input": "translate: the red cat sees a dog =", "output": "le chat rouge voit un chien"},
    {"input": "question: what is two plus two? answer:", "output": "four"},
    {"input": "The quick brown fox", "output": "jumps over the lazy dog."},
    {"input": "hello there", "output": "hi, how can I help?"},
]
SIZE = (int(plots.FIGSIZE[0] * plots.DPI), int(plots.FIGSIZE[1] * plots.DPI))


def rgb(hex_color):
    return tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))


def color_pixels(path, hex_color):
    """How many pixels of loss.png are exactly this line color."""
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"))
    return int((pixels == rgb(hex_color)).all(axis=-1).sum())


def check_png(path):
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == SIZE
        img.verify()  # a complete, uncorrupted PNG


@pytest.fixture(scope="module")
def trained(fmtune_tiny_model, tmp_path_factory):
    """One 6-step run with validation every 3 steps and checkpoints at 3 and 6."""
    tmp = tmp_path_factory.mktemp("plots")
    out = tmp / "out"
    res = run_cli(["train", "--model_name_or_path", fmtune_tiny_model,
                   "--training_data_path", write_jsonl(tmp / "train.jsonl", RECORDS),
                   "--validation_data_path", write_jsonl(tmp / "valid.jsonl", RECORDS[:2]),
                   "--output_dir", str(out), "--per_device_train_batch_size", "2",
                   "--learning_rate", "1e-3", "--logging_steps", "1", "--max_steps", "6",
                   "--eval_strategy", "steps", "--eval_steps", "3",
                   "--save_strategy", "steps", "--save_steps", "3"])
    assert res.exit_code == 0, res.stderr
    return out


def test_every_run_ends_with_a_loss_plot(trained):
    png = trained / "loss.png"
    check_png(png)
    summary = json.loads((trained / "run_summary.json").read_text())
    assert summary["loss_plot"] == str(png)
    # training loss (blue), validation loss (orange) and learning rate (green) are all drawn
    for color in (plots.TRAIN_COLOR, plots.EVAL_COLOR, plots.LR_COLOR):
        assert color_pixels(png, color) > 20, color


def test_plot_command_redraws_from_the_logs(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    (out / "loss.png").unlink()
    res = run_cli(["plot", str(out)])
    assert res.exit_code == 0, res.stderr
    assert res.stdout.strip() == (
        f"{out / 'loss.png'}: 6 training and 2 validation loss points, learning rate from "
        f"{out / 'checkpoint-6' / 'trainer_state.json'}")
    check_png(out / "loss.png")
    assert color_pixels(out / "loss.png", plots.LR_COLOR) > 20

    # the points drawn are training_logs.jsonl's, the learning rates the checkpoint's
    drawn = plots.plot_loss(str(out), path=str(tmp_path / "again.png"))
    logs = [json.loads(line) for line in (out / "training_logs.jsonl").read_text().splitlines()]
    assert drawn.train == [(r["data"]["step"], r["data"]["value"]) for r in logs
                           if r["name"] == "training_loss"]
    assert drawn.eval == [(r["data"]["step"], r["data"]["value"]) for r in logs
                          if r["name"] == "validation_loss"]
    history = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert drawn.learning_rate == [(h["step"], h["learning_rate"]) for h in history
                                   if "learning_rate" in h]
    assert len(drawn.learning_rate) == 6

    # without checkpoints there is no learning rate, hence no second axis
    for ckpt in out.glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    res = run_cli(["plot", str(out), "--output", str(tmp_path / "no_lr.png")])
    assert res.exit_code == 0, res.stderr
    assert res.stdout.strip().endswith("6 training and 2 validation loss points, no learning rate")
    check_png(tmp_path / "no_lr.png")
    assert color_pixels(tmp_path / "no_lr.png", plots.LR_COLOR) == 0
    assert color_pixels(tmp_path / "no_lr.png", plots.TRAIN_COLOR) > 20


def test_plot_command_errors(tmp_path):
    res = run_cli(["plot", str(tmp_path / "nowhere")])
    assert res.exit_code == 2
    assert res.stderr.strip() == (f"fmtune: error: {tmp_path / 'nowhere' / 'training_logs.jsonl'}: "
                                  f"not found (is {tmp_path / 'nowhere'} the output_dir of an "
                                  "fmtune run?)")
    logs = tmp_path / "training_logs.jsonl"
    logs.write_text('{"name": "training_loss", "data": {"step": 1, "value": 2.0}}\n{"name": 3}\n')
    res = run_cli(["plot", str(tmp_path)])
    assert res.exit_code == 2 and f"{logs}:2: not a training log record" in res.stderr
    assert not (tmp_path / "loss.png").exists()
    logs.write_text("")
    res = run_cli(["plot", str(tmp_path)])
    assert res.exit_code == 2 and "no loss logged yet, nothing to plot" in res.stderr


def test_cli_help_stays_free_of_matplotlib_and_torch():
    code = """
import sys
from fmtune.cli import main
main(["--help"]); main(["train", "--help"])
try:
    main(["plot", "--help"])
except SystemExit:
    pass
heavy = sorted(m for m in ("matplotlib", "torch", "transformers") if m in sys.modules)
print(heavy)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "usage: fmtune plot" in res.stdout
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_task_scores_get_their_own_panel(trained, tmp_path):
    """eval_* metrics other than the loss (the evaluation plugin's task scores) are drawn in a
    second panel below the losses; a run without them keeps the one-panel plot."""
    out = tmp_path / "scores"
    out.mkdir()
    lines = (trained / "training_logs.jsonl").read_text().splitlines()
    for step, value in ((3, 0.25), (6, 0.875)):
        lines.append(json.dumps({"name": "eval_recall_exact_match", "data": {
            "epoch": 1.0, "step": step, "timestamp": "2026-12-03T00:00:00", "value": value}}))
    (out / "training_logs.jsonl").write_text("\n".join(lines) + "\n")
    res = run_cli(["plot", str(out)])
    assert res.exit_code == 0, res.stderr
    assert res.stdout.strip().endswith(", 2 eval_recall_exact_match points")
    with Image.open(out / "loss.png") as img:
        assert img.size == (SIZE[0], int((plots.FIGSIZE[1] + plots.SCORES_HEIGHT) * plots.DPI))
    assert color_pixels(out / "loss.png", plots.SCORE_COLORS[0]) > 20
    assert color_pixels(trained / "loss.png", plots.SCORE_COLORS[0]) == 0
