"""fmtune plugin ``tensorboard``: track a run in TensorBoard event files (offline, no server).

What goes into the run's folder ``LOG_DIR/RUN`` (main process only):

* every number the trainer logs, as a scalar at the global step, under transformers'
  own TensorBoard names: ``train/loss``, ``train/learning_rate``, ``train/grad_norm``,
  ``train/epoch``, ``train/num_input_tokens_seen``, ..., and ``eval/loss``, ``eval/...``
  for the ``eval_*`` keys; stored in double precision (the values equal
  ``training_logs.jsonl``'s);
* text ``hparams`` (the resolved config, every option of every active plugin) and
  ``fmtune`` (fmtune's version, the active plugins with their versions, output folder,
  checkpoint resumed from, world size), at the step the run starts;
* text ``run_summary`` at the end (``run_error`` when the training failed).

``LOG_DIR`` is ``--tensorboard_log_dir`` (default ``OUTPUT_DIR/runs``; transformers 4's
``--logging_dir`` when given); ``RUN`` is ``[EXPERIMENT/]OUTPUT_DIR_NAME-YYYYmmdd-HHMMSS``.
``OUTPUT_DIR/tensorboard_tracker.json`` names the run folder as soon as it opens; a run that
resumes from a checkpoint in the same output folder writes on into that folder, from the
checkpoint's step: the events after it are first dropped from the folder's event files (the
redone steps replace them, as in ``training_logs.jsonl``); starting over opens a new run
folder. Browse with
``tensorboard --logdir LOG_DIR``.

``--report_to tensorboard`` (transformers' own integration) with this plugin active is
taken over by it: transformers' TensorBoardCallback is not added (no second copy of every
scalar); any other ``report_to`` integration goes through. ``--report_to all`` with this
plugin active is refused (it would add the callback again): name the integrations.

Losing the tracker never loses the training (:class:`fmtune.tracking.Tracker`): a run
folder that cannot be written at the start is an error before anything loads (exit 2); one
deleted, replaced or made read-only mid-run disables the tracker with one warning line and
``run_summary.json`` says ``"trackers": {"tensorboard": {"status": "failed", ...}}``.

Module import is cheap: torch.utils.tensorboard is imported when the run opens.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time

from fmtune import hookimpl
from fmtune.records import folder_problem
from fmtune.tracking import Tracker

log = logging.getLogger("fmtune")


def tag(key: str) -> str:
    """transformers' TensorBoard name of a logged key (its ``rewrite_logs``)."""
    for prefix in ("eval_", "test_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return f"train/{key}"


def _markdown(value) -> str:
    """JSON as a markdown code block (TensorBoard's text dashboard renders markdown)."""
    text = json.dumps(value, indent=2, default=str)
    return "\n".join("    " + line for line in text.splitlines())


def cut_events(folder: str, last_step: int) -> None:
    """Drop the events after ``last_step`` from the event files in ``folder`` (a resumed run
    redoes those steps; the core keeps training_logs.jsonl the same way). Each file is
    rewritten through a temporary file and a rename."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    for path in sorted(glob.glob(os.path.join(folder, "*tfevents*"))):
        records = list(RawEventFileLoader(path).Load())
        keep = [r for r in records if Event.FromString(r).step <= last_step]
        if len(keep) == len(records):
            continue
        tmp = os.path.join(folder, ".fmtune-cut.tmp")  # no "tfevents": TensorBoard skips it
        with open(tmp, "wb") as f:
            writer = RecordWriter(f)
            for record in keep:
                writer.write(record)
        os.replace(tmp, path)


class TensorBoardTracker(Tracker):
    """One TensorBoard run folder per fmtune run; the base class does the rest."""

    name = "tensorboard"
    id_key = "run"  # the run's folder, relative to the log dir
    target_key = "log_dir"

    @classmethod
    def options(cls, register):
        register("tensorboard_log_dir", str, None,
                 "Folder of TensorBoard runs (`tensorboard --logdir` it): each fmtune run "
                 "writes its event files to a subfolder, which a resumed run writes on into; "
                 "default: OUTPUT_DIR/runs (transformers 4's logging_dir when given).")

    @classmethod
    def target(cls, config):
        folder = (config.tensorboard_log_dir or config.get("logging_dir")
                  or os.path.join(config.get("output_dir") or os.curdir, "runs"))
        return os.path.abspath(os.path.expanduser(folder))

    @classmethod
    def check(cls, config):
        folder = cls.target(config)
        why = folder_problem(folder)
        return f"tensorboard_log_dir {folder}: {why}" if why else None

    def open(self, run, resume_id):
        from torch.utils.tensorboard import SummaryWriter

        if resume_id and not os.path.isdir(os.path.join(self.where, resume_id)):
            resume_id = None
        name = resume_id or self._new_name(run)
        step = run.state.global_step
        if resume_id:  # the steps after the checkpoint are redone: their old events go
            cut_events(os.path.join(self.where, name), step)
        # (and a TensorBoard already reading the folder drops them too: SessionLog.START)
        self.writer = SummaryWriter(os.path.join(self.where, name),
                                    purge_step=step + 1 if resume_id else None)
        self.step = step
        self.writer.add_text("hparams", _markdown(run.config.to_dict()), step)
        self.writer.add_text("fmtune", _markdown(self.about(run)), step)
        self.writer.flush()
        return name

    def _new_name(self, run) -> str:
        base = os.path.basename(os.path.abspath(run.output_dir)) + time.strftime("-%Y%m%d-%H%M%S")
        experiment = run.config.get("experiment")
        base = f"{experiment}/{base}" if experiment else base
        name, n = base, 1
        while os.path.exists(os.path.join(self.where, name)):
            n += 1
            name = f"{base}-{n}"
        return name

    def _check_folder(self) -> None:
        """The writer keeps its file open: a folder deleted or made read-only under it would
        swallow the events silently. Notice it at the next call."""
        folder = self.writer.get_logdir()
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"the TensorBoard run folder {folder} is gone")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"the TensorBoard run folder {folder} is not writable")

    def log(self, metrics, step, epoch, wall_time):
        self._check_folder()
        for key, value in metrics.items():
            self.writer.add_scalar(tag(key), value, step, walltime=wall_time, new_style=True,
                                   double_precision=True)
        self.writer.flush()
        self.step = step

    def close(self, summary):
        self._check_folder()
        if summary is not None:
            self.writer.add_text("run_summary", _markdown(summary),
                                 int(summary.get("global_step") or self.step))
        self.writer.close()

    def fail(self, error):
        self._check_folder()
        self.writer.add_text("run_error", error, self.step)
        self.writer.close()


(add_options, validate_config, on_train_begin, on_log, on_train_end,
 on_train_error) = TensorBoardTracker.hooks()


@hookimpl(specname="validate_config")
def take_over_report_to(config):
    """``--report_to tensorboard`` with this plugin active: this plugin writes the events and
    transformers' own TensorBoardCallback is left out (one copy of every scalar)."""
    given = config.get("report_to")
    names = [] if given is None else [given] if isinstance(given, str) else list(given)
    names = [n.strip() for item in names for n in str(item).split(",") if n.strip()]
    if "all" in names:
        return ("report_to all: transformers would log to TensorBoard as well as the "
                "tensorboard plugin; name the integrations you want (the plugin writes the "
                "TensorBoard events)")
    if "tensorboard" not in names:
        return None
    rest = [n for n in names if n != "tensorboard"]
    config.set_from("report_to", rest or ["none"], config.source("report_to"))
    log.info("report_to tensorboard: the tensorboard plugin writes the events (transformers' "
             "TensorBoardCallback is not added)")
    return None
