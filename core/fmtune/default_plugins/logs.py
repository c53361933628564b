"""``training_logs.jsonl`` (training and validation loss) through :mod:`fmtune.logs`."""

from __future__ import annotations

from fmtune import hookimpl
from fmtune.logs import LOSS_NAMES, append_metrics, restart


@hookimpl(trylast=True)
def on_train_begin(run):
    restart(run)


@hookimpl(trylast=True)
def on_log(run, logs):
    append_metrics(run, logs, LOSS_NAMES)
