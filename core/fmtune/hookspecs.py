"""The fmtune hook specifications: the core's plugin contract in one file.

A plugin is a module (or object) with functions decorated by ``fmtune.hookimpl``
whose names match the specs below. pluggy passes each implementation only the
arguments it names, so new arguments can be added here without breaking
plugins. Importing this module must stay cheap: no torch, no transformers (the
types below are imported for type checkers only).

Kinds of hooks:

* *broadcast* hooks run every implementation and return a list of results;
* *firstresult* hooks stop at the first implementation that returns something
  other than ``None``. pluggy calls implementations last registered first
  (LIFO), ``tryfirst=True`` ones before and ``trylast=True`` ones after the
  rest; the core's defaults are registered first and ``trylast``, so any
  plugin that answers replaces them. ``wrapper=True`` implementations run
  around all the others and can post-process the answer (e.g. dequantize a
  loaded model).

A plugin that offers its own extension point (a registry of data handlers,
controller metrics, ...) owns its hook specs: it implements
:func:`add_hookspecs` and collects the registrations with
:func:`fmtune.plugins.collect`. This file names no plugin concept.

The objects passed around:

* ``config`` - :class:`fmtune.config.Config`, attribute access to every option
  of every active plugin (``config.learning_rate``) and ``config.stash``, the
  run's per-plugin state (:mod:`fmtune.stash`);
* ``run`` - :class:`fmtune.pipeline.Run`, the live run: ``run.config``,
  ``run.output_dir``, ``run.state`` (transformers ``TrainerState``),
  ``run.is_main_process``, ``run.world_size``, ``run.trainer``, ``run.pm``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, TypedDict

import pluggy

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset
    from peft import PeftModel
    from pluggy import PluginManager
    from transformers import (PreTrainedModel, PreTrainedTokenizerBase, Trainer,
                              TrainerCallback, TrainingArguments)

    from .config import Config
    from .pipeline import Run

PROJECT = "fmtune"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["CONTROL_FLAGS", "ControlDecision", "PROJECT", "hookimpl", "hookspec"]


class ControlDecision(TypedDict, total=False):
    """What an event hook (``on_step``, ``on_log``, ...) may return: the flags it wants set on
    the trainer's control. The answers of all plugins are merged with "or"; any other key is an
    error."""

    should_training_stop: bool
    should_epoch_stop: bool
    should_save: bool
    should_evaluate: bool
    should_log: bool


#: the keys of :class:`ControlDecision`, in that order
CONTROL_FLAGS: tuple[str, ...] = tuple(ControlDecision.__annotations__)


# -------------------------------------------------------------------- plugins


@hookspec(historic=True)
def add_hookspecs(pluginmanager: PluginManager) -> None:
    """Add this plugin's own hook specs: ``pluginmanager.add_hookspecs(module)``.

    pytest's ``pytest_addhooks``. Called as soon as the plugin registers (the core calls
    it *historically*), so a plugin that defines a registry hook (``register_widgets``)
    adds its spec here and other plugins can implement it; implementations registered
    before the spec existed are validated when it is added. Collect the registrations
    with :func:`fmtune.plugins.collect`.
    """


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
def validate_config(config: Config, pm: PluginManager) -> list[str] | str | None:
    """Check the resolved config before anything heavy happens.

    Return a message, a list of messages, or ``None``. Every plugin runs and
    all problems are reported together; any problem stops the run (exit 2).
    ``pm`` is the plugin manager, for plugins that collect registrations from
    other plugins (:func:`fmtune.plugins.collect`).
    """


# ---------------------------------------------------------------- model/data


@hookspec(firstresult=True)
def load_tokenizer(config: Config) -> PreTrainedTokenizerBase | None:
    """Return the tokenizer for this run."""


@hookspec(firstresult=True)
def load_model(config: Config, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel | None:
    """Return the model to train.

    Called after ``prepare_data`` (bad data fails before any weights load),
    so the tokenizer is final: resize embeddings to ``len(tokenizer)`` if
    it grew. Use ``wrapper=True`` to post-process another plugin's model.
    """


@hookspec(firstresult=True)
def prepare_data(config: Config, tokenizer: PreTrainedTokenizerBase, pm: PluginManager
                 ) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset | None] | None:
    """Return ``(train_dataset, eval_dataset_or_None)`` ready for the collator.

    Called after ``load_tokenizer`` and before ``load_model``; it may add
    tokens to the tokenizer. ``pm`` is the plugin manager (for plugin-owned
    registries, :func:`fmtune.plugins.collect`). Rows hold ``input_ids``,
    ``labels`` (``-100`` where no loss is taken) and optionally ``attention_mask``.
    """


@hookspec(firstresult=True)
def wrap_peft(model: PreTrainedModel, config: Config, tokenizer: PreTrainedTokenizerBase
              ) -> PeftModel | PreTrainedModel | None:
    """Return a wrapped model (a ``peft.PeftModel``, ...) or ``None``.

    Return ``None`` unless this plugin's method was selected: when every
    plugin returns ``None`` the model is trained in full.
    """


@hookspec(firstresult=True)
def build_collator(tokenizer: PreTrainedTokenizerBase, config: Config
                   ) -> Callable[[list[dict[str, Any]]], dict[str, Any]] | None:
    """Return the data collator (callable turning a list of rows into a batch)."""


@hookspec(firstresult=True)
def build_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: Config,
    train_dataset: Dataset | IterableDataset,
    eval_dataset: Dataset | IterableDataset | None,
    data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
    training_args: TrainingArguments,
    callbacks: list[TrainerCallback],
) -> Trainer | None:
    """Return a ``transformers.Trainer`` (or subclass) ready to ``train()``.

    ``training_args`` is the ``TrainingArguments`` the core built from the
    config; ``callbacks`` must be passed on, they drive the ``on_*`` hooks.
    """


@hookspec(firstresult=True)
def train_batch_sampler(config: Config, dataset: Dataset, batch_size: int, world_size: int,
                        rank: int) -> Iterable[list[int]] | None:
    """Return the batch sampler of the training dataloader, or ``None`` (the trainer's own).

    Called when training starts, on every process, with the trainer's ``train_dataset`` (a
    dataset with a length; never for a stream), its per-device ``batch_size``, the number of
    data-parallel processes and this process's ``rank``. The answer is an iterable of lists of
    indices into ``dataset`` with a ``__len__`` (a ``torch.utils.data.BatchSampler``-like
    object): *this rank's* batches, in order, the same number on every rank. The core builds
    the ``DataLoader`` with it (the collator, workers and pinning of the trainer's own) and
    lets accelerate prepare it without sharding it again; ``set_epoch(epoch)``, if the
    sampler has it, is called before every epoch, also when a run resumes mid-epoch (the
    batches already trained are then skipped).
    """


@hookspec(firstresult=True)
def save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output_dir: str,
         config: Config, trainer: Trainer) -> str | None:
    """Save the final model and tokenizer to ``output_dir``; return the path.

    Called on every process (distributed saving may need all of them); write
    files only where ``trainer.is_world_process_zero()`` unless the format
    needs every rank.
    """


# -------------------------------------------------------------------- events
#
# Broadcast hooks called while training. They run on every process; use
# ``run.is_main_process`` to write only once. A result may be a ControlDecision,
# merged into the trainer's control by "or": ``{"should_training_stop": True}``.


@hookspec
def on_train_begin(run: Run) -> ControlDecision | None:
    """Training is about to start (after a resume, ``run.state`` is restored)."""


@hookspec
def on_step(run: Run) -> ControlDecision | None:
    """An optimizer step finished (``run.state.global_step`` counts it)."""


@hookspec
def on_epoch_begin(run: Run) -> ControlDecision | None:
    """An epoch is starting (``run.state.epoch`` is where it starts)."""


@hookspec
def on_epoch_end(run: Run) -> ControlDecision | None:
    """An epoch ended."""


@hookspec
def on_log(run: Run, logs: dict[str, float]) -> ControlDecision | None:
    """The trainer logged ``logs`` (loss, learning_rate, grad_norm, eval_*...)."""


@hookspec
def on_evaluate(run: Run, metrics: dict[str, float]) -> ControlDecision | None:
    """An evaluation finished with ``metrics`` (``eval_loss``, ...)."""


@hookspec
def on_save(run: Run, checkpoint_dir: str) -> ControlDecision | None:
    """A checkpoint was written to ``checkpoint_dir``."""


@hookspec
def on_train_error(run: Run, error: BaseException) -> None:
    """Training (or the final save) raised ``error``; it is re-raised after this hook.

    Trackers close their run as failed here. Exceptions from implementations
    are logged, not raised, so that the original error is the one reported.
    """


@hookspec
def on_train_end(run: Run, summary: dict[str, Any]) -> None:
    """Training finished and the final model was saved.

    ``summary`` is the run summary about to be written to
    ``output_dir/run_summary.json``; plugins may add keys to it.
    """
