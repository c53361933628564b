"""``loss.png`` at the end of a run: training and validation loss against step, learning rate
on a second axis (see :mod:`fmtune.plots`; ``fmtune plot OUTPUT_DIR`` redraws it).

Written by the main process, after the final save. A run that logged no loss gets no plot;
a plotting failure is logged and never fails the run. matplotlib is never imported by the
run's own process when all goes well: a child process (:class:`fmtune.plots.BackgroundPlot`),
started when training begins, imports it while the run trains and draws when training ends
(the trainer's last log, with ``train_loss``) while the model is saved, into a pending file
that ``on_train_end`` waits for and renames to loss.png (a failed run gets none, as before).
If the child fails, the plot is drawn here, in this process.
"""

from __future__ import annotations

import contextlib
import logging
import os

from fmtune import hookimpl
from fmtune.stash import StashKey

log = logging.getLogger("fmtune")

# the run's background plotter (fmtune.plots.BackgroundPlot), main process only
PLOTTER: StashKey = StashKey()
PENDING = ".loss.png.pending"


def _expects_plot(run) -> bool:
    """A loss will be logged: a logging step or an evaluation within the run's steps."""
    state, args = run.state, getattr(run.trainer, "args", None)
    logging_steps = getattr(state, "logging_steps", None) or 0
    max_steps = getattr(state, "max_steps", None) or 0
    evaluates = str(getattr(getattr(args, "eval_strategy", None), "value",
                            getattr(args, "eval_strategy", "no"))) != "no"
    return evaluates or not max_steps or logging_steps <= max_steps


def _lr(run):
    from fmtune.plots import learning_rates

    return learning_rates(getattr(run.state, "log_history", None) or [])


@hookimpl(trylast=True)
def on_train_begin(run):
    if not run.is_main_process or PLOTTER in run.config.stash or not _expects_plot(run):
        return
    from fmtune.plots import BackgroundPlot

    plotter = BackgroundPlot.start()
    if plotter is not None:
        run.config.stash[PLOTTER] = plotter


@hookimpl(trylast=True)
def on_log(run, logs):
    plotter = run.config.stash.get(PLOTTER)
    # the trainer's last log (its summary: train_loss, train_runtime, ...): training ended; the
    # step logs have "loss" (and, counting tokens, train_runtime too)
    if plotter is not None and "train_loss" in logs and "loss" not in logs:
        plotter.request(run.output_dir, os.path.join(run.output_dir, PENDING), _lr(run),
                        "the trainer's log")


@hookimpl(trylast=True)
def on_train_error(run, error):
    plotter = run.config.stash.pop(PLOTTER, None)
    if plotter is not None:
        plotter.cancel()
    with contextlib.suppress(OSError):
        os.remove(os.path.join(run.output_dir, PENDING))


@hookimpl(trylast=True)
def on_train_end(run, summary):
    if not run.is_main_process:
        return
    from fmtune.config import ConfigError
    from fmtune.plots import PLOT_FILE, plot_loss

    final = os.path.join(run.output_dir, PLOT_FILE)
    pending = os.path.join(run.output_dir, PENDING)
    plotter = run.config.stash.pop(PLOTTER, None)
    answer = None
    if plotter is not None:
        plotter.request(run.output_dir, pending, _lr(run), "the trainer's log")
        answer = plotter.result()
    try:
        if answer is not None and "path" in answer:
            os.replace(pending, final)
            summary["loss_plot"] = os.path.abspath(final)
            return
        if answer is not None and "nothing" in answer:
            raise ConfigError(answer["nothing"])
        # no child, or it failed: drawn here
        plot = plot_loss(run.output_dir, lr=_lr(run), lr_from="the trainer's log")
    except ConfigError:  # nothing logged (logging_steps > steps): no plot
        steps = getattr(run.state, "global_step", "?")
        log.info("no loss plot: the run's %s steps logged no loss (logging_steps %s)", steps,
                 getattr(run.config, "logging_steps", "?"))
        return
    except Exception as e:  # noqa: BLE001 - a plot must never fail a finished training
        log.warning("loss plot failed: %s: %s", type(e).__name__, e)
        return
    finally:
        with contextlib.suppress(OSError):
            os.remove(pending)
    summary["loss_plot"] = os.path.abspath(plot.path)
