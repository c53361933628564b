"""The fmtune hook specifications: the whole plugin contract in one file.

A plugin is a module (or object) with functions decorated by ``fmtune.hookimpl``
whose names match the specs below. pluggy passes each implementation only the
arguments it names, so new arguments can be added here without breaking
plugins. Importing this module must stay cheap: no torch, no transformers.

Kinds of hooks:

* *broadcast* hooks run every implementation and return a list of results;
* *firstresult* hooks stop at the first implementation that returns something
  other than ``None``. The core's defaults are registered ``trylast``, so any
  plugin that answers replaces them. ``wrapper=True`` implementations can
  post-process the answer of the others (e.g. dequantize a loaded model).

The objects passed around:

* ``config`` - :class:`fmtune.config.Config`, attribute access to every option
  of every active plugin (``config.learning_rate``);
* ``run`` - :class:`fmtune.pipeline.Run`, the live run: ``run.config``,
  ``run.output_dir``, ``run.state`` (transformers ``TrainerState``),
  ``run.is_main_process``, ``run.world_size``, ``run.trainer``.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT = "fmtune"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------- config


@hookspec
def add_options(register: Callable[..., None]) -> None:
    """Declare this plugin's options.

    Call ``register(name, type, default, help, choices=None, aliases=())``
    once per option. Each option becomes a YAML key and a ``--name`` CLI flag
    of ``fmtune train``; ``type`` is one of ``str, int, float, bool, list``
    (list of strings; a comma-separated string on the CLI) or ``dict`` (YAML
    mapping, or JSON on the CLI). Two plugins registering the same name is an
    error.
    """


@hookspec
def validate_config(config: Any, pm: Any) -> list[str] | str | None:
    """Check the resolved config before anything heavy happens.

    Return a message, a list of messages, or ``None``. Every plugin runs and
    all problems are reported together; any problem stops the run (exit 2).
    ``pm`` is the plugin manager, for plugins that collect registrations from
    other plugins (``pm.hook.register_controller_metrics(...)``).
    """


# ---------------------------------------------------------------- model/data


@hookspec(firstresult=True)
def load_tokenizer(config: Any) -> Any:
    """Return the tokenizer (``PreTrainedTokenizerBase``) for this run."""


@hookspec(firstresult=True)
def load_model(config: Any, tokenizer: Any) -> Any:
    """Return the model to train (a ``PreTrainedModel``).

    Called after ``prepare_data`` (bad data fails before any weights load),
    so the tokenizer is final: resize embeddings to ``len(tokenizer)`` if
    it grew. Use ``wrapper=True`` to post-process another plugin's model.
    """


@hookspec(firstresult=True)
def prepare_data(config: Any, tokenizer: Any, pm: Any) -> Any:
    """Return ``(train_dataset, eval_dataset_or_None)`` ready for the collator.

    Called after ``load_tokenizer`` and before ``load_model``; it may add
    tokens to the tokenizer. ``pm`` is the plugin manager (for plugin-owned
    registries such as ``register_data_handlers``). Rows hold ``input_ids``, ``labels`` (``-100`` where no loss is taken) and
    optionally ``attention_mask``.
    """


@hookspec(firstresult=True)
def wrap_peft(model: Any, config: Any, tokenizer: Any) -> Any:
    """Return a wrapped model (LoRA, prompt tuning, ...) or ``None``.

    Return ``None`` unless this plugin's method was selected: when every
    plugin returns ``None`` the model is trained in full.
    """


@hookspec(firstresult=True)
def build_collator(tokenizer: Any, config: Any) -> Any:
    """Return the data collator (callable turning a list of rows into a batch)."""


@hookspec(firstresult=True)
def build_trainer(
    model: Any,
    tokenizer: Any,
    config: Any,
    train_dataset: Any,
    eval_dataset: Any,
    data_collator: Any,
    training_args: Any,
    callbacks: list[Any],
) -> Any:
    """Return a ``transformers.Trainer`` (or subclass) ready to ``train()``.

    ``training_args`` is the ``TrainingArguments`` the core built from the
    config; ``callbacks`` must be passed on, they drive the ``on_*`` hooks.
    """


@hookspec(firstresult=True)
def save(model: Any, tokenizer: Any, output_dir: str, config: Any, trainer: Any) -> Any:
    """Save the final model and tokenizer to ``output_dir``; return the path.

    Called on every process (distributed saving may need all of them); write
    files only where ``trainer.is_world_process_zero()`` unless the format
    needs every rank.
    """


# -------------------------------------------------------------------- events
#
# Broadcast hooks called while training. They run on every process; use
# ``run.is_main_process`` to write only once. A result may be a dict of
# control decisions, merged into the trainer's control by "or":
# ``{"should_training_stop": True}``, ``should_save``, ``should_evaluate``,
# ``should_log``, ``should_epoch_stop``.


@hookspec
def on_train_begin(run: Any) -> dict[str, bool] | None:
    """Training is about to start (after a resume, ``run.state`` is restored)."""


@hookspec
def on_step(run: Any) -> dict[str, bool] | None:
    """An optimizer step finished (``run.state.global_step`` counts it)."""


@hookspec
def on_epoch_begin(run: Any) -> dict[str, bool] | None:
    """An epoch is starting (``run.state.epoch`` is where it starts)."""


@hookspec
def on_epoch_end(run: Any) -> dict[str, bool] | None:
    """An epoch ended."""


@hookspec
def on_log(run: Any, logs: dict[str, float]) -> dict[str, bool] | None:
    """The trainer logged ``logs`` (loss, learning_rate, grad_norm, eval_*...)."""


@hookspec
def on_evaluate(run: Any, metrics: dict[str, float]) -> dict[str, bool] | None:
    """An evaluation finished with ``metrics`` (``eval_loss``, ...)."""


@hookspec
def on_save(run: Any, checkpoint_dir: str) -> dict[str, bool] | None:
    """A checkpoint was written to ``checkpoint_dir``."""


@hookspec
def on_train_error(run: Any, error: BaseException) -> None:
    """Training (or the final save) raised ``error``; it is re-raised after this hook.

    Trackers close their run as failed here. Exceptions from implementations
    are logged, not raised, so that the original error is the one reported.
    """


@hookspec
def on_train_end(run: Any, summary: dict[str, Any]) -> None:
    """Training finished and the final model was saved.

    ``summary`` is the run summary about to be written to
    ``output_dir/run_summary.json``; plugins may add keys to it.
    """


# ------------------------------------------------------ called by plugins
#
# The core never calls these: it defines them so that plugins share one
# contract. A plugin that owns a registry calls them on the plugin manager
# (``run.pm`` or the ``pm`` argument of ``validate_config``) and must refuse
# duplicate names.

PLUGIN_CALLED = ("register_data_handlers", "register_controller_metrics",
                 "register_controller_operations")


@hookspec
def register_data_handlers(register: Callable[..., None]) -> None:
    """Add data handlers: ``register(name, function)``, usable by name in a data_config.

    Called by the data handlers plugin; see its README for the function's signature.
    """


@hookspec
def register_controller_metrics(register: Callable[..., None]) -> None:
    """Add trainer-controller metrics: ``register(name, cls)``.

    Called by the trainer_controller plugin; see its README for the class contract.
    """


@hookspec
def register_controller_operations(register: Callable[..., None]) -> None:
    """Add trainer-controller operations: ``register(name, cls)``.

    Called by the trainer_controller plugin; see its README for the class contract.
    """
