"""An fmtune plugin in one file: an option, a config check, and event hooks.

Every training event becomes one JSON line in ``events_file`` (default
``OUTPUT_DIR/events.jsonl``), written by the main process only.
"""

from __future__ import annotations

import json
import os
import time

from fmtune import hookimpl


@hookimpl
def add_options(register):
    register("events_file", str, None, "Where to write the event log (default: OUTPUT_DIR/events.jsonl).")
    register("events_include_logs", bool, True, "Include the trainer's logged metrics.")


@hookimpl
def validate_config(config):
    if config.events_file and os.path.isdir(config.events_file):
        return f"events_file {config.events_file} is a folder, not a file"


def _write(run, event, **data):
    if not run.is_main_process:
        return
    path = run.config.events_file or os.path.join(run.output_dir, "events.jsonl")
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"event": event, "step": run.state.global_step, "time": time.time(),
                            **data}) + "\n")


@hookimpl
def on_train_begin(run):
    _write(run, "train_begin", world_size=run.world_size, resumed_from=run.resumed_from)


@hookimpl
def on_log(run, logs):
    if run.config.events_include_logs:
        _write(run, "log", logs=logs)


@hookimpl
def on_save(run, checkpoint_dir):
    _write(run, "save", checkpoint_dir=checkpoint_dir)


@hookimpl
def on_train_end(run, summary):
    _write(run, "train_end", final_loss=summary["final_loss"])
    summary["events_file"] = run.config.events_file or os.path.join(run.output_dir, "events.jsonl")
