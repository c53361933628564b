"""The run folder: one run per output_dir (an advisory lock held for the whole run), and what
a rerun into a folder that already holds a run does (recorded config, see "reruns" below).

The lock is an ``flock`` on a file named after the output_dir's real path, in the machine's
temporary folder (not in output_dir: a run refused for bad input leaves output_dir untouched).
The kernel drops the lock when its process dies, so the lock of a killed run is never stale.
It guards runs on one machine; runs on several machines into one shared folder are not seen.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import IO, Any

from . import __version__
from .config import Config, ConfigError

log = logging.getLogger("fmtune")


def lock_path(output_dir: str) -> str:
    real = os.path.realpath(output_dir)
    digest = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return os.path.join(tempfile.gettempdir(), "fmtune-locks", f"{digest}.lock")


def acquire(output_dir: str) -> IO[str]:
    """Hold the lock of ``output_dir`` (returns the open lock file; :func:`release` it) or
    raise ConfigError naming the PID of the run that holds it."""
    path = lock_path(output_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigError(f"output_dir {output_dir} is in use by another fmtune run ({holder}); "
                          "wait for it, or give this run another --output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"PID {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
    handle.flush()
    return handle


def release(handle: IO[str] | None) -> None:
    if handle is not None and not handle.closed:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


# ----------------------------------------------------------------------------- reruns
#
# Every training run records its effective configuration in OUTPUT_DIR/fmtune_config.json
# (all option values after parsing, the active plugins, and a hash of them) just before it
# starts training; run_summary.json, written when the run completes, carries the same
# "config_hash" and "completed": true. Rerunning a command into an output_dir that holds a
# run (checkpoints, or a finished run) compares the recorded options with the new ones before
# anything loads, and :func:`plan_rerun` decides:
#
# * finished run, no option that matters changed, same training length: nothing to do (one
#   line, exit 0, no file touched): resuming from the last checkpoint would train nothing (or
#   a stray step) and write the final model and run_summary.json over the finished ones. A
#   run stopped early by a control decision (a trainer-controller rule) completed too: its
#   rerun is also nothing to do (the rule decided; raise the length to train on);
# * finished run, training length raised beyond where it finished: continued from its newest
#   checkpoint (refused when it kept none: it could only start over);
# * unfinished run (checkpoints, no completed summary): resumed from the newest complete
#   checkpoint, as long as the training length reaches at least that checkpoint's step;
# * any other option changed: refused in one line naming the options (old -> new) and the way
#   out (a new --output_dir, or --resume_from_checkpoint false to start over in this one);
# * ``--resume_from_checkpoint false``: no comparison; the previous run's checkpoint-N folders
#   and run_summary.json are deleted before the new run trains (logged), so that a later
#   rerun can never resume from, or be told "finished" by, a run made with other options;
# * ``--resume_from_checkpoint PATH``: the user's explicit choice; not compared;
# * a folder without fmtune_config.json (a run by an older fmtune): options cannot be
#   compared (logged); a finished run there is still left alone unless the length is raised.

RECORD_FILE = "fmtune_config.json"
SUMMARY_FILE = "run_summary.json"

# Which invocation this is, not what it trains: neither hashed nor compared.
INVOCATION_OPTIONS = frozenset({"output_dir", "resume_from_checkpoint"})

# The training length: may change on a rerun. A finished run is continued when the new length
# goes beyond where it finished; an unfinished one resumes if the length reaches its checkpoint.
# (The learning-rate schedule is then laid out over the new length: documented, wanted.)
LENGTH_OPTIONS = ("max_steps", "num_train_epochs")

# The ONE list of options that may differ from the recorded run when it is resumed or
# continued: what is logged, saved, evaluated or tracked and where, memory/speed knobs with
# the same arithmetic, and options that change nothing in training. Everything else (model,
# tokenizer, data and its formatting, PEFT settings such as r/target_modules, optimizer,
# learning rate and schedule, batch sizes and process count, seeds, precision, ...) shapes the
# model or optimizer state or the sequence of updates: a difference is refused.
MAY_DIFFER_ON_RESUME = frozenset({
    # logging
    "logging_steps", "logging_strategy", "logging_first_step", "logging_nan_inf_filter",
    "log_level", "log_level_replica", "log_on_each_node", "disable_tqdm",
    "include_tokens_per_second", "include_num_input_tokens_seen", "skip_memory_metrics",
    "stop_on_nonfinite_loss",
    # saving (where the final model goes, how often and what checkpoints keep)
    "save_model_dir", "save_strategy", "save_steps", "save_total_limit", "save_only_model",
    "save_on_each_node", "enable_jit_checkpoint", "push_to_hub", "hub_token",
    "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision",
    # evaluation (never feeds back into training unless load_best_model_at_end or a
    # controller rule uses it; those options are compared)
    "eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "per_device_eval_batch_size",
    "eval_accumulation_steps", "eval_do_concat_batches", "eval_use_gather_object",
    "prediction_loss_only", "batch_eval_metrics", "include_for_metrics",
    # trackers
    "trackers", "experiment", "report_to", "run_name", "project", "trackio_space_id",
    "trackio_bucket_id", "trackio_static_space_id", "aim_repo", "aim_experiment",
    "aim_remote_server_ip", "aim_remote_server_port", "aim_system_tracking_interval",
    "mlflow_tracking_uri", "mlflow_experiment", "aim_timeout_s", "mlflow_timeout_s",
    "tensorboard_log_dir", "tensorboard_timeout_s",
    # memory, speed and machinery with the same arithmetic
    "gradient_checkpointing", "gradient_checkpointing_kwargs", "activation_checkpointing",
    "activation_checkpointing_kwargs", "torch_empty_cache_steps", "cache_dir",
    "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "ddp_timeout",
    "local_rank",
    # accepted and ignored by fmtune, or only for do_dataprocessing_only
    "enable_reduce_loss_sum", "do_train", "do_eval", "do_predict",
    "num_train_dataset_shards", "num_eval_dataset_shards",
})

_SECRET = re.compile(r"(^|_)(token|password|secret|api_key)$")
_URI_CREDENTIALS = re.compile(r"^([a-z][a-z0-9+.-]*://)[^/@]+@", re.IGNORECASE)


def _recorded_value(name: str, value: Any) -> Any:
    """A value as recorded: JSON types only; secrets (hub_token, ...) and passwords in URIs
    (mlflow_tracking_uri https://user:pw@host) are never written to disk."""
    if value is not None and _SECRET.search(name):
        return "<set, not recorded>"
    if isinstance(value, str):
        return _URI_CREDENTIALS.sub(r"\1***@", value)
    return json.loads(json.dumps(value, default=str))


def effective_config(config: Config) -> dict[str, Any]:
    """The record of ``config``: every option value after parsing and the active plugins,
    plus ``config_hash`` (sha256 of both, without :data:`INVOCATION_OPTIONS`)."""
    values = {name: _recorded_value(name, value)
              for name, value in sorted(config.to_dict().items())}
    plugins = sorted(config.plugins)
    hashed = {k: v for k, v in values.items() if k not in INVOCATION_OPTIONS}
    digest = hashlib.sha256(json.dumps({"plugins": plugins, "config": hashed}, sort_keys=True)
                            .encode("utf-8")).hexdigest()
    return {"config_hash": digest, "plugins": plugins, "config": values,
            "config_file": config.config_file}


@dataclass
class Rerun:
    """What a run does in its output_dir (:func:`plan_rerun`)."""

    resume_from: str | None = None  # the checkpoint to resume from; None: train from scratch
    finished: str | None = None  # the run already finished: this line, and nothing to do
    start_over: bool = False  # resume_from_checkpoint false: clear the previous run first
    changed: list[str] = field(default_factory=list)  # allowed differences ("name old -> new")
    summary: dict[str, Any] | None = None  # the finished run's run_summary.json


def _show(value: Any) -> str:
    """A value in the one-line message (a template's line breaks as \\n, long ones cut)."""
    text = value if isinstance(value, str) and value.isprintable() else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(old: dict[str, Any], new: dict[str, Any], config: Config) -> list[tuple]:
    """``(name, old, new)`` for each option (and ``plugins``) that differs between the record
    ``old`` and ``new``. An option missing from the old record (a newer transformers/fmtune
    added it) counts only when this run sets it; one missing now belongs to a plugin that is
    no longer active, which the ``plugins`` difference already says."""
    found = []
    if old.get("plugins") != new["plugins"]:
        found.append(("plugins", ",".join(old.get("plugins") or []) or "none",
                      ",".join(new["plugins"]) or "none"))
    before, now = old.get("config") or {}, new["config"]
    for name in sorted(now):
        if name in INVOCATION_OPTIONS:
            continue
        if name not in before:
            if config.source(name) != "default":
                found.append((name, "(unset)", now[name]))
        elif before[name] != now[name]:
            found.append((name, before[name], now[name]))
    return found


def _length(values: dict[str, Any]) -> tuple[str, float]:
    steps = values.get("max_steps")
    if isinstance(steps, int) and steps > 0:
        return "steps", steps
    return "epochs", float(values.get("num_train_epochs") or 0)


def _reaches(length: tuple[str, float], state: dict[str, Any], strictly: bool) -> bool:
    """Whether training ``length`` goes beyond (``strictly``) or up to the trainer ``state``
    (``global_step``/``epoch`` of a checkpoint or of the finished run)."""
    kind, value = length
    done = float(state.get("global_step") or 0) if kind == "steps" else \
        float(state.get("epoch") or 0) - 1e-6
    return value > done if strictly else value >= done


def _describe_length(length: tuple[str, float]) -> str:
    kind, value = length
    return f"--max_steps {int(value)}" if kind == "steps" else f"--num_train_epochs {value:g}"


def plan_rerun(config: Config, record: dict[str, Any]) -> Rerun:
    """What this run does in ``config.output_dir``, given the folder's contents and this run's
    :func:`effective_config` ``record``; raises ConfigError (one line) when it must refuse.
    Reads only; called before the tokenizer, the data or the model load."""
    from .files import read_json_object
    from .pipeline import newest_complete_checkpoint

    out = config.output_dir
    choice = str(config.resume_from_checkpoint)
    if choice.lower() in ("false", "none"):
        return Rerun(start_over=True)
    if choice.lower() not in ("auto", "true"):
        return Rerun(resume_from=choice)  # an explicit checkpoint: the user's choice
    old = read_json_object(os.path.join(out, RECORD_FILE))
    summary = read_json_object(os.path.join(out, SUMMARY_FILE))
    finished = summary is not None and bool(summary.get("completed", "model_saved_to" in summary)) \
        and (old is None or summary.get("config_hash") == old.get("config_hash"))
    checkpoint = newest_complete_checkpoint(out)
    if not finished and checkpoint is None:
        if choice.lower() == "true":
            log.warning("resume_from_checkpoint=true but %s holds no checkpoint: starting fresh",
                        out)
        return Rerun()
    if finished:
        where, state = f"a run that finished at step {summary.get('global_step')}", summary
    else:
        state = read_json_object(os.path.join(checkpoint, "trainer_state.json")) or {}
        where = f"an unfinished run (newest checkpoint {os.path.basename(checkpoint)})"
    length = _length(record["config"])
    redo = (f"use a new --output_dir, or --resume_from_checkpoint false to start over in {out} "
            "(deleting its checkpoints; --overwrite_output_dir does the same)")
    if old is None:
        log.warning("%s has no %s (a run by an older fmtune): its options cannot be compared "
                    "with this run's", out, RECORD_FILE)
        changed: list[str] = []
        length_changed = finished and _reaches(length, state, strictly=True)
    else:
        diffs = differences(old, record, config)
        refused = [d for d in diffs
                   if d[0] not in MAY_DIFFER_ON_RESUME and d[0] not in LENGTH_OPTIONS]
        if refused:
            shown = ", ".join(f"{n} {_show(a)} -> {_show(b)}" for n, a, b in refused[:8])
            more = f" (and {len(refused) - 8} more)" if len(refused) > 8 else ""
            raise ConfigError(f"output_dir {out} holds {where} made with other options: "
                              f"{shown}{more}; to train with these, {redo}")
        changed = [f"{n} {_show(a)} -> {_show(b)}" for n, a, b in diffs]
        length_changed = _length(old["config"]) != length
    if finished:
        model = summary.get("model_saved_to") or out
        if not length_changed:
            gone = "" if os.path.isdir(model) else " (no longer there)"
            return Rerun(summary=summary, finished=(
                f"the run in {out} already finished at step {summary.get('global_step')}; its "
                f"model is in {model}{gone}. Nothing to do (to train longer raise --max_steps "
                "or --num_train_epochs; to train again use a new --output_dir or "
                "--resume_from_checkpoint false)"))
        if not _reaches(length, state, strictly=True):
            raise ConfigError(f"output_dir {out} holds {where}, already past "
                              f"{_describe_length(length)}; to train it longer give a larger "
                              f"value; to train a shorter run, {redo}")
        if checkpoint is None:
            raise ConfigError(f"output_dir {out} holds {where} with no checkpoint to continue "
                              f"from (save_strategy no?); to train for "
                              f"{_describe_length(length)}, {redo}")
        log.info("continuing the finished run in %s from %s to %s", out, checkpoint,
                 _describe_length(length))
    elif not _reaches(length, state, strictly=False):
        raise ConfigError(f"output_dir {out} holds {where}, already past "
                          f"{_describe_length(length)}: nothing would train; give a larger "
                          f"value, or {redo}")
    if changed:
        log.info("resuming with changed options: %s", ", ".join(changed))
    return Rerun(resume_from=checkpoint, changed=changed)


def begin(config: Config, record: dict[str, Any], rerun: Rerun) -> None:
    """Just before training, on the main process: with ``--resume_from_checkpoint false``
    delete the previous run's checkpoint-N folders and run_summary.json (a mix of two runs'
    checkpoints would be resumed from later); then write this run's record."""
    import shutil

    from .files import write_json

    out = config.output_dir
    if rerun.start_over and os.path.isdir(out):
        old = sorted((n for n in os.listdir(out) if n.partition("-")[0] == "checkpoint"
                      and n.partition("-")[2].isdigit()
                      and os.path.isdir(os.path.join(out, n))),
                     key=lambda n: int(n.partition("-")[2]))
        for name in old:
            shutil.rmtree(os.path.join(out, name))
        summary = os.path.join(out, SUMMARY_FILE)
        if os.path.exists(summary):
            os.remove(summary)
            old.append(SUMMARY_FILE)
        if old:
            log.info("resume_from_checkpoint false: starting over in %s, deleted the previous "
                     "run's %s", out, ", ".join(old))
    write_json(os.path.join(out, RECORD_FILE), {
        "fmtune_version": __version__, **record, "resumed_from": rerun.resume_from,
        "written": time.strftime("%Y-%m-%d %H:%M:%S")})
