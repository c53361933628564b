"""The fmtune hooks of the trainer_controller plugin (entry point ``trainer_controller``).

The controller file named by ``trainer_controller_config_file`` is loaded and
checked in ``validate_config`` (before any model loads); metric and operation
classes come from every active plugin's ``register_controller_metrics`` /
``register_controller_operations``, hooks this plugin defines (:mod:`.hookspecs`,
added through ``add_hookspecs``) and implements itself for the built-in ones.
The training events then drive the :class:`~.engine.Engine`, kept on the run's
config (``config.stash``).
"""

from __future__ import annotations

import logging
from typing import Any

from fmtune import hookimpl
from fmtune.config import ConfigError
from fmtune.plugins import collect
from fmtune.stash import StashKey

from . import hookspecs
from .engine import Engine
from .loader import LoadError, check_metric_class, check_operation_class, load, name_check
from .metrics import BUILTIN_METRICS
from .operations import BUILTIN_OPERATIONS

log = logging.getLogger("fmtune.trainer_controller")

OPTION = "trainer_controller_config_file"

# One engine per run, on the run's (resolved) config: no state is shared between runs in
# one process, and nothing outlives its config.
ENGINE = StashKey[Engine]()


@hookimpl
def add_hookspecs(pluginmanager):
    pluginmanager.add_hookspecs(hookspecs)


@hookimpl
def add_options(register):
    register(OPTION, str, None,
             "YAML file of controller_metrics, operations and controllers (fms-hf-tuning's "
             "trainer controller format): rules that stop training, save, evaluate or log. "
             "See plugins/trainer_controller/README.md.")


@hookimpl
def register_controller_metrics(register):
    for name, cls in BUILTIN_METRICS.items():
        register(name, cls)


@hookimpl
def register_controller_operations(register):
    for name, cls in BUILTIN_OPERATIONS.items():
        register(name, cls)


def build(path: str, pm: Any) -> Engine:
    """Collect the registered classes, load ``path``; raise :class:`LoadError`."""
    problems: list[str] = []
    metrics = collect(pm, "register_controller_metrics", "controller metric",
                      check=name_check("controller metric", check_metric_class),
                      problems=problems)
    operations = collect(pm, "register_controller_operations", "controller operation",
                         check=name_check("controller operation", check_operation_class),
                         problems=problems)
    if problems:
        raise LoadError(problems)
    return Engine(load(path, metrics, operations))


@hookimpl
def validate_config(config, pm):
    path = config.get(OPTION)
    if not path:
        return None
    try:
        config.stash[ENGINE] = build(path, pm)
    except LoadError as e:
        return e.problems
    return None


def _engine(run: Any) -> Engine | None:
    engine = run.config.stash.get(ENGINE)
    path = run.config.get(OPTION)
    if engine is None and path:  # validate_config was not called: load now
        try:
            engine = run.config.stash[ENGINE] = build(path, run.pm)
        except LoadError as e:
            raise ConfigError("invalid trainer controller config:\n  - "
                              + "\n  - ".join(e.problems)) from None
    return engine


@hookimpl(wrapper=True)
def build_trainer(config):
    trainer = yield
    if config.get(OPTION) and getattr(trainer.args, "logging_nan_inf_filter", False):
        # transformers logs a NaN/inf step loss as the window's running average
        # (0.0 with logging_steps=1): rules must see the real value.
        trainer.args.logging_nan_inf_filter = False
        log.debug("trainer_controller: logging_nan_inf_filter turned off so that rules see "
                  "NaN/inf losses")
    return trainer


def _handle(run: Any, event: str, **data: Any):
    engine = _engine(run)
    return engine.handle(event, run, **data) if engine else None


@hookimpl
def on_train_begin(run):
    engine = _engine(run)
    if engine is None:
        return None
    engine.begin(run)
    return engine.handle("on_train_begin", run)


@hookimpl
def on_epoch_begin(run):
    return _handle(run, "on_epoch_begin")


@hookimpl
def on_step(run):
    return _handle(run, "on_step_end")


@hookimpl
def on_log(run, logs):
    return _handle(run, "on_log", logs=logs)


@hookimpl
def on_evaluate(run, metrics):
    return _handle(run, "on_evaluate", eval_metrics=metrics)


@hookimpl
def on_save(run, checkpoint_dir):
    return _handle(run, "on_save", checkpoint_dir=checkpoint_dir)


@hookimpl
def on_epoch_end(run):
    return _handle(run, "on_epoch_end")


@hookimpl
def on_train_end(run, summary):
    engine = _engine(run)
    if engine is None:
        return None
    engine.handle("on_train_end", run)
    summary["trainer_controller"] = engine.summary()
    return None
