"""``loss.png`` at the end of a run: training and validation loss against step, learning rate
on a second axis (see :mod:`fmtune.plots`; ``fmtune plot OUTPUT_DIR`` redraws it).

Written by the main process, after the final save. A run that logged no loss gets no plot;
a plotting failure is logged and never fails the run. matplotlib is imported only here,
inside the hook.
"""

from __future__ import annotations

import logging
import os

from fmtune import hookimpl

log = logging.getLogger("fmtune")


@hookimpl(trylast=True)
def on_train_end(run, summary):
    if not run.is_main_process:
        return
    from fmtune.config import ConfigError
    from fmtune.plots import learning_rates, plot_loss

    history = getattr(run.state, "log_history", None) or []
    try:
        plot = plot_loss(run.output_dir, lr=learning_rates(history), lr_from="the trainer's log")
    except ConfigError:  # nothing logged (logging_steps > steps): no plot
        steps = getattr(run.state, "global_step", "?")
        log.info("no loss plot: the run's %s steps logged no loss (logging_steps %s)", steps,
                 getattr(run.config, "logging_steps", "?"))
        return
    except Exception as e:  # noqa: BLE001 - a plot must never fail a finished training
        log.warning("loss plot failed: %s: %s", type(e).__name__, e)
        return
    summary["loss_plot"] = os.path.abspath(plot.path)
