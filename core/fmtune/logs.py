"""Public API for plugins: the run's metric log, ``training_logs.jsonl`` in fms-hf-tuning's
format, written by the main process.

Each line is ``{"name": "training_loss" | "validation_loss", "data": {"epoch",
"step", "timestamp", "value"}}``. A fresh run starts the file over; a resumed
run keeps the lines up to the checkpoint's step and appends after them (:func:`restart`,
called by the core's :mod:`fmtune.default_plugins.logs`). A plugin that logs more metrics
appends them with :func:`append_metrics`. Documented in docs/plugins.md ("Utilities for
plugins").
"""

from __future__ import annotations

import datetime
import json
import os
from typing import TYPE_CHECKING, Any

from .files import restart_jsonl

if TYPE_CHECKING:
    from .pipeline import Run

__all__ = ["FILENAME", "append_metrics"]

FILENAME = "training_logs.jsonl"
LOSS_NAMES = {"loss": "training_loss", "eval_loss": "validation_loss"}


def path(run: Run) -> str:
    """``training_logs.jsonl`` of ``run``."""
    return os.path.join(run.output_dir, FILENAME)


def restart(run: Run) -> None:
    """At training start (main process only): a fresh run empties the file; a resumed one keeps
    the lines up to its checkpoint's step."""
    if not run.is_main_process:
        return
    restart_jsonl(path(run), run.state.global_step if run.resumed_from else None,
                  lambda record: record["data"]["step"])


def append_metrics(run: Run, logs: dict[str, Any], names: dict[str, str]) -> None:
    """Append ``logs[key]`` as metric ``names[key]`` to training_logs.jsonl (fms-hf-tuning's
    line format), on the main process only; plugins that log more metrics call this too."""
    if not run.is_main_process:
        return
    lines = []
    for key, name in names.items():
        if key in logs:
            lines.append(json.dumps({"name": name, "data": {
                "epoch": round(float(logs.get("epoch", run.state.epoch or 0)), 4),
                "step": run.state.global_step,
                "timestamp": datetime.datetime.now().isoformat(),
                "value": float(logs[key]),
            }}))
    if lines:
        with open(path(run), "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
