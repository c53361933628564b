"""The training pipeline: a short sequence of hook calls.

Each step asks the plugins (firstresult hooks, core defaults last), then the
trainer runs with a callback that turns transformers' events into the
``on_*`` broadcast hooks and merges the control decisions they return.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import __version__, batching, distributed, runlock
from .config import Config, ConfigError
from .files import write_json
from .hookspecs import CONTROL_FLAGS
from .plugins import plugin_versions, record_answers
from .runlock import SUMMARY_FILE

log = logging.getLogger("fmtune")


@dataclass(eq=False)
class Run:
    """The live run handed to the ``on_*`` hooks (hashable by identity: plugins may key
    per-run state by it)."""

    config: Config
    pm: pluggy.PluginManager
    output_dir: str
    resumed_from: str | None = None
    model: Any = None
    tokenizer: Any = None
    trainer: Any = None
    state: Any = None
    world_size: int = 1
    is_main_process: bool = True
    tokens_at_start: int = 0
    diverged: str | None = None  # where the loss became NaN/inf (the run then fails)
    interrupted: int | None = None  # the signal (SIGINT/SIGTERM) that asked the run to stop
    timings: dict[str, float] = field(default_factory=dict)
    # firstresult hook -> {"answered_by": plugin, "wrappers": [plugins]} (run_summary.json)
    answered: dict[str, dict] = field(default_factory=dict)
    # max_per_device_train_batch_size auto: what fitted and why (run_summary.json auto_batch)
    batch_choice: dict[str, Any] | None = None


def validate(config: Config, pm: pluggy.PluginManager) -> None:
    """Run every plugin's ``validate_config``; raise one error listing all problems."""
    problems: list[str] = []
    for result in pm.hook.validate_config(config=config, pm=pm):
        if isinstance(result, str):
            problems.append(result)
        elif result:
            problems.extend(result)
    if problems:
        if len(problems) == 1:
            raise ConfigError(f"invalid config: {problems[0]}")
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _required(value: Any, hook: str) -> Any:
    if value is None:
        raise RuntimeError(f"no plugin answered {hook}")
    return value


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the CLI prints it and exits 3."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM: a checkpoint was saved at the end of the step; the CLI exits 128+signal
    (130 for Ctrl-C, 143 for SIGTERM), as a process killed by that signal reports."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


@contextlib.contextmanager
def stop_on_signals(run: "Run"):
    """First SIGINT/SIGTERM: finish the step, save a checkpoint, stop (TrainingInterrupted).
    A second one: the signal's default action, at once. Outside the main thread: untouched."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        if run.interrupted is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        run.interrupted = signum
        log.warning("%s: saving a checkpoint at the end of this step, then stopping (send it "
                    "again to stop at once)", signal.Signals(signum).name)

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def nonfinite(logs: dict) -> str | None:
    """``"loss nan"`` (or grad_norm) when a logged training value is NaN or infinite."""
    import math

    for key in ("loss", "grad_norm"):
        value = logs.get(key)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            return f"{key} {value}"
    return None


def make_callback(run: Run):
    from transformers import TrainerCallback

    class HookCallback(TrainerCallback):
        """Forwards transformers' events to the fmtune ``on_*`` hooks."""

        def _merge(self, control, results):
            for result in results:
                for key, value in (result or {}).items():
                    if key not in CONTROL_FLAGS:
                        raise ValueError(f"a plugin returned unknown control decision {key!r}; "
                                         f"known: {', '.join(CONTROL_FLAGS)}")
                    if value:
                        setattr(control, key, True)
            return control

        def on_train_begin(self, args, state, control, **kw):
            run.state = state
            run.tokens_at_start = int(state.num_input_tokens_seen or 0)
            return self._merge(control, run.pm.hook.on_train_begin(run=run))

        def on_step_end(self, args, state, control, **kw):
            if run.interrupted is not None:
                control.should_save = True
                control.should_training_stop = True
            return self._merge(control, run.pm.hook.on_step(run=run))

        def on_epoch_begin(self, args, state, control, **kw):
            return self._merge(control, run.pm.hook.on_epoch_begin(run=run))

        def on_epoch_end(self, args, state, control, **kw):
            return self._merge(control, run.pm.hook.on_epoch_end(run=run))

        def on_log(self, args, state, control, logs=None, **kw):
            bad = nonfinite(logs or {})
            if bad and run.config.get("stop_on_nonfinite_loss", True) and not run.diverged:
                run.diverged = f"step {state.global_step}: {bad}"
                control.should_training_stop = True
                control.should_save = False  # keep the last good checkpoint as the newest
            if run.diverged:
                control.should_save = False
            return self._merge(control, run.pm.hook.on_log(run=run, logs=dict(logs or {})))

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            return self._merge(control, run.pm.hook.on_evaluate(run=run, metrics=dict(metrics or {})))

        def on_save(self, args, state, control, **kw):
            ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            merged = self._merge(control, run.pm.hook.on_save(run=run, checkpoint_dir=ckpt))
            if run.is_main_process and os.path.isdir(ckpt):
                mark_complete(ckpt, state.global_step)  # last: every file is written
            return merged

    return HookCallback()


def training_arguments(config: Config):
    from transformers import TrainingArguments

    from .models import resolve_dtype
    import torch

    dtype = resolve_dtype(config.torch_dtype)
    kwargs = dict(
        output_dir=config.output_dir,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps or config.warmup_ratio,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim=config.optim,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        save_strategy=config.save_strategy,
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy=config.eval_strategy,
        eval_steps=config.eval_steps,
        **({"gradient_checkpointing": True} if config.gradient_checkpointing else {}),
        seed=config.seed,
        use_cpu=config.use_cpu,
        bf16=False,
        fp16=dtype == torch.float16 and torch.cuda.is_available(),
        report_to=[],
        include_num_input_tokens_seen="non_padding",
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN (and stops the run)
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    # every other TrainingArguments field the user set (bf16, fp16, report_to, logging_strategy,
    # lr_scheduler_kwargs, ...) goes through as given; the user's value wins over fmtune's
    from .training_options import names

    for name in names():
        if config.source(name) not in ("default", "set by a plugin") and name in config:
            kwargs[name] = getattr(config, name)
    try:
        args = TrainingArguments(**kwargs)
    except (ValueError, TypeError, NotImplementedError) as e:
        text = " ".join(str(e).split())
        raise ConfigError(f"transformers refused the training options: {text}") from None
    from .batching import apply

    apply(config, args)  # total_train_batch_size: per-device batch and accumulation for this world
    return args


def dump_datasets(config: Config, train_ds: Any, eval_ds: Any, main: bool) -> dict[str, Any]:
    """fms-hf-tuning's ``--do_dataprocessing_only``: the processed datasets as parquet shards in
    ``output_dir/train_dataset/ds_00000.parquet ...`` (and ``validation_dataset``), no
    training. Each folder is written under a temporary name, then renamed."""
    import shutil

    written: dict[str, Any] = {"data_only": True, "output_dir": config.output_dir}
    for name, ds, shards in (("train_dataset", train_ds, config.num_train_dataset_shards),
                             ("validation_dataset", eval_ds, config.num_eval_dataset_shards)):
        if ds is None or not main:
            continue
        if not hasattr(ds, "to_parquet"):  # streamed: materialized to write it
            from datasets import Dataset

            ds = Dataset.from_generator(lambda d=ds: (yield from d))
        folder = os.path.join(config.output_dir, name)
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        ds = ds.flatten_indices()
        for k in range(shards):
            ds.shard(num_shards=shards, index=k, contiguous=True).to_parquet(
                os.path.join(tmp, f"ds_{k:05d}.parquet"))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        written[name] = {"rows": len(ds), "shards": shards, "folder": folder}
        log.info("wrote %d processed rows of %s to %s in %d parquet shard(s)", len(ds), name,
                 folder, shards)
    return written


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                "pytorch_model.bin", "adapter_model.bin", "pytorch_model.bin.index.json")


# transformers' Trainer writes checkpoint-N in place (its saving, rotation and best-model
# tracking all assume that name), so fmtune does not write to a temporary folder and rename it;
# it marks a checkpoint complete once everything is in it (the Trainer's files, then every
# plugin's on_save), with this file written atomically, and resume takes only marked
# checkpoints: for a reader that is the same as an atomic rename. A checkpoint without the mark
# beside marked ones was cut short; folders written before the mark existed (no checkpoint
# marked) are judged by their files (checkpoint_problem).
COMPLETE_MARK = "fmtune_checkpoint_complete.json"


def mark_complete(folder: str, step: int) -> None:
    from .files import write_json

    write_json(os.path.join(folder, COMPLETE_MARK), {"global_step": step,
                                                     "fmtune_version": __version__})


def checkpoint_problem(folder: str, marks_expected: bool = False) -> str | None:
    """Why ``folder`` (a ``checkpoint-N``) cannot be resumed from, or None: a run killed while
    saving leaves one without its trainer state, weights or optimizer, or with truncated ones,
    and (``marks_expected``: the run marks its checkpoints) without :data:`COMPLETE_MARK`."""
    from .files import read_json_object

    if marks_expected and read_json_object(os.path.join(folder, COMPLETE_MARK)) is None:
        return f"no {COMPLETE_MARK} (cut short while saving)"
    state = read_json_object(os.path.join(folder, "trainer_state.json"))
    if state is None or not isinstance(state.get("global_step"), int):
        return "trainer_state.json missing or unreadable"
    weights = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))]
    if not weights:  # FSDP SHARDED_STATE_DICT: torch.distributed.checkpoint folders
        return distributed.sharded_checkpoint_problem(folder, state)
    for name in weights:
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            why = _safetensors_problem(path)
            if why:
                return f"{name} {why}"
        elif os.path.getsize(path) == 0:
            return f"{name} empty"
    optimizer = os.path.join(folder, "optimizer.pt")
    if not state.get("save_only_model", False) and os.path.exists(optimizer) and \
            os.path.getsize(optimizer) == 0:
        return "optimizer.pt empty"
    return None


def _safetensors_problem(path: str) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header giving each tensor's byte
    range, then the data: all of it must be there."""
    import json

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length <= 0 or 8 + length > size:
                return "truncated (header)"
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return "unreadable"
    return "truncated (data)" if 8 + length + end > size else None


def newest_complete_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` that is complete; the newer incomplete ones
    are logged with the reason and skipped."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        prefix, _, step = name.partition("-")
        if prefix == "checkpoint" and step.isdigit() and os.path.isdir(
                os.path.join(output_dir, name)):
            found.append((int(step), os.path.join(output_dir, name)))
    marks = any(os.path.isfile(os.path.join(f, COMPLETE_MARK)) for _, f in found)
    for _, folder in sorted(found, reverse=True):
        why = checkpoint_problem(folder, marks_expected=marks)
        if why is None:
            return folder
        log.warning("not resuming from %s: %s (incomplete, probably killed while saving)",
                    folder, why)
    return None


def whole_run_train_loss(state: Any, session_loss: float, resumed_from: str | None) -> dict:
    """``train_loss`` (and ``train_loss_steps``, the steps it covers) for the summary.
    transformers' ``training_loss`` is the mean over the steps this process trained; after a
    resume, the steps before the checkpoint come from its log history (each logged ``loss`` is
    the mean since the previous log), exact when the checkpoint's step was a logging step.
    Otherwise the loss of the steps between the last log and the checkpoint is unknown and the
    value covers this process's steps only, as ``train_loss_steps`` says."""
    from .files import read_json_object

    end = state.global_step
    start = 0
    if resumed_from:
        ckpt = read_json_object(os.path.join(resumed_from, "trainer_state.json")) or {}
        start = int(ckpt.get("global_step") or 0)
    if not start:
        return {"train_loss": session_loss, "train_loss_steps": f"1-{end}"}
    prior, last = 0.0, 0
    for entry in state.log_history:
        step = entry.get("step")
        if "loss" not in entry or not isinstance(step, int) or step > start:
            continue
        prior += float(entry["loss"]) * (step - last)
        last = step
    if last != start or end <= start:
        return {"train_loss": session_loss, "train_loss_steps": f"{start + 1}-{end}"}
    return {"train_loss": (prior + session_loss * (end - start)) / end,
            "train_loss_steps": f"1-{end}"}


def report_error(run: Run, error: BaseException) -> None:
    """Tell every plugin that training failed; their own failures are only logged."""
    for impl in reversed(run.pm.hook.on_train_error.get_hookimpls()):
        try:
            args = {"run": run, "error": error}
            impl.function(**{name: args[name] for name in impl.argnames})
        except Exception as e:  # noqa: BLE001 - keep the original error the one reported
            log.warning("%s: on_train_error failed: %s: %s", impl.plugin_name, type(e).__name__, e)


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MB: the kernel's high-water mark of its address
    space (VmHWM), which starts anew at exec. Not ``ru_maxrss``: Linux carries that across
    fork and exec, so a run started from a large process (a notebook, a test runner) would
    report the parent's memory."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(config: Config, pm: pluggy.PluginManager) -> dict[str, Any]:
    """Run a whole training; return the run summary (also written to output_dir). A rerun of
    a finished run returns that run's summary with ``already_finished`` and ``message`` (the
    line to show) added, having written nothing."""
    # the options as parsed (before any plugin's validate_config sees them): recorded in
    # output_dir/fmtune_config.json and compared with those of a run already there
    record = runlock.effective_config(config)
    validate(config, pm)
    # one run per output_dir (the main process holds the lock; the others share its folder)
    lock = runlock.acquire(config.output_dir) if distributed.is_main_process() else None
    try:
        # a rerun into a folder that holds a run: resume, continue, nothing to do, or refuse
        # (one line), decided here before the tokenizer, the data or the model load
        rerun = None if config.get("do_dataprocessing_only") else runlock.plan_rerun(config,
                                                                                    record)
        if rerun is not None and rerun.finished:
            # nothing is written: the finished run's files stay as they are
            if distributed.is_main_process():
                log.info("%s", rerun.finished)
            return {**(rerun.summary or {}), "already_finished": True,
                    "message": rerun.finished}
        return _train(config, pm, record, rerun or runlock.Rerun())
    finally:
        runlock.release(lock)


def _train(config: Config, pm: pluggy.PluginManager, record: dict[str, Any],
           rerun: runlock.Rerun) -> dict[str, Any]:
    start = time.perf_counter()
    run, args = start_run(config, pm)
    # Data before the model: bad data fails fast, and a data plugin may add tokens
    # that the model's embeddings are then resized to.
    train_ds, eval_ds = load_data(run)
    if config.get("do_dataprocessing_only"):
        return dump_datasets(config, train_ds, eval_ds, run.is_main_process)
    # max_per_device_train_batch_size auto: the batch that fits, planned before the model loads
    batching.apply_auto(run, args, train_ds)
    load_model(run)
    build_trainer(run, args, train_ds, eval_ds)
    begin_output(run, record, rerun)
    result, saved = fit_and_save(run)
    summary = run_summary(run, args, result, saved, record)
    finish(run, summary, start)
    return summary


def start_run(config: Config, pm: pluggy.PluginManager) -> tuple[Run, Any]:
    """The :class:`Run` and the training arguments. The training arguments set up the
    distributed state (process group, rank) before any hook runs: plugins and transformers'
    loading see the right rank from the start."""
    run = Run(config=config, pm=pm, output_dir=config.output_dir, answered=record_answers(pm))
    distributed.check_launcher(config)
    distributed.setup_process()
    args = training_arguments(config)
    run.world_size = args.world_size
    run.is_main_process = args.process_index == 0
    if not run.is_main_process:
        log.setLevel(logging.WARNING)  # one copy of the info lines: rank 0's
    return run, args


def load_data(run: Run) -> tuple[Any, Any]:
    """``load_tokenizer`` then ``prepare_data``: ``(train_dataset, eval_dataset)``."""
    config, pm = run.config, run.pm
    t = time.perf_counter()
    run.tokenizer = _required(pm.hook.load_tokenizer(config=config), "load_tokenizer")
    train_ds, eval_ds = _required(pm.hook.prepare_data(config=config, tokenizer=run.tokenizer, pm=pm),
                                  "prepare_data")
    run.timings["data_prep_s"] = time.perf_counter() - t
    return train_ds, eval_ds


def load_model(run: Run) -> None:
    """``load_model`` (timed), then ``wrap_peft`` when a plugin wraps it."""
    from .hub import freeze_at_imports

    freeze_at_imports(False)  # start-up ends where any plugin's model loads (fmtune.hub)
    config, pm = run.config, run.pm
    t = time.perf_counter()
    run.model = _required(pm.hook.load_model(config=config, tokenizer=run.tokenizer), "load_model")
    run.timings["model_load_s"] = time.perf_counter() - t
    wrapped = pm.hook.wrap_peft(model=run.model, config=config, tokenizer=run.tokenizer)
    if wrapped is not None:
        run.model = wrapped


def build_trainer(run: Run, args: Any, train_ds: Any, eval_ds: Any) -> None:
    """``build_collator`` and ``build_trainer`` (with the hook callback)."""
    config, pm = run.config, run.pm
    collator = _required(pm.hook.build_collator(tokenizer=run.tokenizer, config=config),
                         "build_collator")
    distributed.prepare_fsdp(run.model)  # FSDP: the decoder layer class to wrap, if unset
    run.trainer = _required(pm.hook.build_trainer(
        model=run.model, tokenizer=run.tokenizer, config=config, train_dataset=train_ds,
        eval_dataset=eval_ds, data_collator=collator, training_args=args,
        callbacks=[make_callback(run)]), "build_trainer")
    run.is_main_process = run.trainer.is_world_process_zero()
    run.state = run.trainer.state
    count_flat_batches(run.trainer)
    sample_with_plugins(run)


def sample_with_plugins(run: Run) -> None:
    """The trainer's training dataloader asks ``train_batch_sampler`` first (whatever
    trainer ``build_trainer`` returned): a plugin's batch sampler replaces the trainer's
    sampling; with no answer (or a stream) the trainer builds its dataloader as usual."""
    trainer = run.trainer
    own = trainer.get_train_dataloader

    def get_train_dataloader():
        dataset = trainer.train_dataset
        import torch

        if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or \
                not hasattr(dataset, "__len__") or _is_stream(dataset):
            if dataset is not None:
                each_rank_reads_the_stream(trainer)
            return own()
        args = trainer.args
        sampler = run.pm.hook.train_batch_sampler(
            config=run.config, dataset=dataset, batch_size=trainer._train_batch_size,
            world_size=args.world_size, rank=args.process_index)
        if sampler is None:
            return own()
        return batch_sampler_dataloader(trainer, dataset, sampler)

    trainer.get_train_dataloader = get_train_dataloader


def each_rank_reads_the_stream(trainer: Any) -> None:
    """Several processes training on a stream (an iterable dataset): every process reads it
    and keeps its share of each round of batches (accelerate's ``dispatch_batches=False``:
    ``IterableDatasetShard``, or datasets' ``split_dataset_by_node``), as fms-hf-tuning sets it
    for online data mixing. accelerate's default for a stream, process 0 reading every
    process's batch and sending each a slice of their concatenation, stops the run with a
    RuntimeError as soon as two batches differ in length (batches padded to their longest
    example, padding-free rows). A ``dispatch_batches`` given in ``--accelerator_config`` is
    kept."""
    args = trainer.args
    if args.world_size <= 1:
        return
    given = getattr(getattr(args, "accelerator_config", None), "dispatch_batches", None)
    config = getattr(getattr(trainer, "accelerator", None), "dataloader_config", None)
    if given is None and config is not None:
        config.dispatch_batches = False


def _is_stream(dataset: Any) -> bool:
    try:
        from datasets import IterableDataset
    except ImportError:  # pragma: no cover - datasets is a core dependency
        return False
    return isinstance(dataset, IterableDataset)


def batch_sampler_dataloader(trainer: Any, dataset: Any, sampler: Any) -> Any:
    """The training ``DataLoader`` over ``sampler`` (this rank's batches), built as
    transformers' ``Trainer._get_dataloader`` builds its own and prepared by accelerate. The
    sampler is already per rank, so the ``BatchSamplerShard`` accelerate wraps it in with
    several processes is made a pass-through (as transformers does for its rank-aware
    ``BatchRebalanceSampler``) and given the sampler's ``set_epoch``: accelerate's and
    transformers' ``set_epoch`` calls (also on the skipping loader of a resumed epoch) reach
    the wrapper, not what it wraps."""
    from functools import partial

    from torch.utils.data import DataLoader
    from transformers.trainer_utils import seed_worker

    args = trainer.args
    collator = trainer.data_collator
    try:
        import datasets

        plain = isinstance(dataset, datasets.Dataset)
    except ImportError:  # pragma: no cover
        plain = False
    if plain and hasattr(trainer, "_remove_unused_columns"):
        dataset = trainer._remove_unused_columns(dataset, description="Training")
    elif hasattr(trainer, "_get_collator_with_removed_columns"):
        collator = trainer._get_collator_with_removed_columns(collator, description="Training")
    params: dict[str, Any] = dict(
        batch_sampler=sampler, collate_fn=collator, num_workers=args.dataloader_num_workers,
        pin_memory=args.dataloader_pin_memory,
        worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers,
                               rank=args.process_index))
    if args.dataloader_num_workers > 0:
        params.update(persistent_workers=args.dataloader_persistent_workers,
                      prefetch_factor=args.dataloader_prefetch_factor,
                      multiprocessing_context=args.dataloader_multiprocessing_context)
    loader = trainer.accelerator.prepare(DataLoader(dataset, **params))
    shard: Any = getattr(loader, "batch_sampler", None)
    if shard is not None and shard is not sampler and getattr(shard, "batch_sampler", None) \
            is sampler:
        shard.num_processes, shard.process_index = 1, 0
        set_epoch = getattr(sampler, "set_epoch", None)
        if set_epoch is not None:
            setattr(shard, "set_epoch", set_epoch)
    return loader


def count_flat_batches(trainer: Any) -> None:
    """Every token of a padding-free or packed batch counts in ``num_input_tokens_seen`` (and
    so in ``train_tokens`` and tokens/s). Such a batch (``position_ids``, no
    ``attention_mask``: examples back to back, as fmtune's padding-free and packing collators
    build them) holds no padding, but transformers counts its "non-padding" tokens as
    ``input_ids != pad_token_id``: with pad = eos (llama tokenizers) each example's eos was
    left out. The trainer's counter is given the batch with an all-ones mask instead; other
    batches are counted by transformers as before."""
    track = getattr(trainer, "_track_num_input_tokens", None)
    args = getattr(trainer, "args", None)
    if track is None or getattr(args, "include_num_input_tokens_seen", None) != "non_padding":
        return

    def track_num_input_tokens(inputs):
        ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
        if ids is not None and "attention_mask" not in inputs and "position_ids" in inputs:
            import torch

            inputs = {**inputs, "attention_mask": torch.ones_like(ids)}
        return track(inputs)

    trainer._track_num_input_tokens = track_num_input_tokens


def begin_output(run: Run, record: dict[str, Any], rerun: runlock.Rerun) -> None:
    """output_dir is created (after every check and the trainer's build); the main process
    clears a previous run on start-over and writes fmtune_config.json."""
    os.makedirs(run.config.output_dir, exist_ok=True)
    run.resumed_from = rerun.resume_from
    if run.resumed_from:
        log.info("resuming from %s", run.resumed_from)
    if run.is_main_process:
        runlock.begin(run.config, record, rerun)


def fit_and_save(run: Run) -> tuple[Any, Any]:
    """Train (stopping on a signal or a diverged loss: the exceptions say where the last
    checkpoint is), then ``save``; ``(train_output, saved_path)``. Any failure is reported to
    the ``on_train_error`` hooks and re-raised."""
    config = run.config
    t = time.perf_counter()
    save_dir = config.save_model_dir or config.output_dir
    try:
        with stop_on_signals(run):
            result = run.trainer.train(resume_from_checkpoint=run.resumed_from)
        run.timings["train_s"] = time.perf_counter() - t
        if run.interrupted is not None:
            name = signal.Signals(run.interrupted).name
            raise TrainingInterrupted(
                f"stopped by {name} at step {run.trainer.state.global_step}; checkpoint saved "
                f"in {newest_complete_checkpoint(config.output_dir)}; rerun the same command to "
                "resume", run.interrupted)
        if run.diverged:
            kept = newest_complete_checkpoint(config.output_dir)
            raise TrainingDiverged(
                f"training diverged at {run.diverged}; stopped, final model not saved"
                + (f"; the last checkpoint before it is {kept}" if kept else "")
                + " (lower --learning_rate, or --stop_on_nonfinite_loss false to go on)")
        distributed.full_state_dict_for_final_save(run.trainer)  # FSDP: gather, on every rank
        saved = run.pm.hook.save(model=run.trainer.model, tokenizer=run.tokenizer,
                                 output_dir=save_dir, config=config, trainer=run.trainer)
    except BaseException as error:
        report_error(run, error)
        raise
    return result, saved


def run_summary(run: Run, args: Any, result: Any, saved: Any,
                record: dict[str, Any]) -> dict[str, Any]:
    """``run_summary.json``: what was trained, the losses, throughput and time, resources,
    the batch, the plugins, where things are (``wall_time_s`` is filled in by :func:`finish`)."""
    config = run.config
    return {
        "fmtune_version": __version__,
        "model_name_or_path": config.model_name_or_path,
        **loss_summary(run, result),
        **time_summary(run),
        **resource_summary(),
        **batch_summary(run, args),
        "plugins": plugin_versions(run.pm),
        "hooks_answered": run.answered,
        "resumed_from": run.resumed_from,
        "output_dir": os.path.abspath(config.output_dir),
        "model_saved_to": os.path.abspath(saved) if saved else None,
        # this summary belongs to the run recorded in fmtune_config.json with this hash; a
        # rerun of the same command finds the run finished and does nothing (runlock)
        "completed": True,
        "config_hash": record["config_hash"],
    }


def loss_summary(run: Run, result: Any) -> dict[str, Any]:
    """Step, epoch and losses: the last logged ones and the whole run's mean."""
    state = run.trainer.state
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in state.log_history if "eval_loss" in h]
    return {
        "global_step": state.global_step,
        "epoch": state.epoch,
        # the last logged loss; a run shorter than logging_steps logged none: its mean loss
        "final_loss": losses[-1] if losses else result.training_loss,
        **whole_run_train_loss(state, result.training_loss, run.resumed_from),
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
    }


def time_summary(run: Run) -> dict[str, Any]:
    """Tokens trained by this process (not those before a resume), their rate, phase times."""
    tokens = int(run.trainer.state.num_input_tokens_seen or 0) - run.tokens_at_start
    return {
        "train_tokens": tokens,
        "tokens_per_second": tokens / run.timings["train_s"] if run.timings["train_s"] else None,
        "model_load_s": round(run.timings["model_load_s"], 3),
        "data_prep_s": round(run.timings["data_prep_s"], 3),
        "train_s": round(run.timings["train_s"], 3),
        "wall_time_s": None,
    }


def resource_summary() -> dict[str, Any]:
    """Peak memory of this process (and of its GPU)."""
    import torch

    return {
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_gpu_memory_mb": (round(torch.cuda.max_memory_allocated() / 2**20, 1)
                               if torch.cuda.is_available() else None),
    }


def batch_summary(run: Run, args: Any) -> dict[str, Any]:
    """Processes, batch sizes and the device."""
    return {
        "world_size": run.world_size,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "total_train_batch_size": (run.world_size * args.per_device_train_batch_size
                                   * args.gradient_accumulation_steps),
        "device": str(args.device),
        **({"auto_batch": run.batch_choice} if run.batch_choice else {}),
    }


def finish(run: Run, summary: dict[str, Any], start: float) -> None:
    """``on_train_end`` (plugins add keys to the summary), then run_summary.json (main
    process)."""
    summary["wall_time_s"] = round(time.perf_counter() - start, 3)  # so far, for the hook
    run.pm.hook.on_train_end(run=run, summary=summary)
    summary["wall_time_s"] = round(time.perf_counter() - start, 3)
    if run.is_main_process:
        write_json(os.path.join(run.config.output_dir, SUMMARY_FILE), summary, default=str)
