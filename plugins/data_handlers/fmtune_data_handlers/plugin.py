"""The ``data_handlers`` plugin: its options, checks and hooks."""

from __future__ import annotations

import logging
import os

from fmtune import hookimpl
from fmtune.config import ConfigError
from fmtune.records import chat_template_names, missing_eval_data
from fmtune.stash import StashKey

from . import hookspecs

# dataset_num_proc's default: a process per this many records (at 10k records forking costs
# what it saves; at 50k and 200k two processes cut the wall time ~20% on 2 CPUs with a
# Llama tokenizer, docs/data-at-scale.md)
RECORDS_PER_PROCESS = 25_000

log = logging.getLogger("fmtune")


@hookimpl
def add_hookspecs(pluginmanager):
    """This plugin's registry hook, ``register_data_handlers`` (:mod:`.hookspecs`)."""
    pluginmanager.add_hookspecs(hookspecs)


@hookimpl
def add_options(register):
    register("data_config_path", str, None, "data_config YAML (fms-hf-tuning schema): datasets, "
             "handlers, sampling, splits; replaces training_data_path.")
    register("data_handlers", list, None, "Data handlers (by name, from any active plugin) "
             "applied in order to training_data_path and validation_data_path, before the "
             "data is tokenized as the other flags say: a handler plugin's format without a "
             "data_config. Their options come from the config (plugin options).")
    register("dataset_conversation_field", str, "messages", "Column holding chat messages.")
    register("chat_template", str, None, "Chat template: a built-in name "
             f"({', '.join(chat_template_names())}), a file (Jinja text; a "
             "tokenizer_config.json or tokenizer "
             "folder is read for its template) or the Jinja text itself (default: the "
             "tokenizer's). A template the chat data is rendered with is saved with the "
             "trained tokenizer (final folder and checkpoints).", shared=True)
    register("instruction_template", str, None, "Chat: text that starts a user turn (with "
             "response_template: train from each response to the next instruction).",
             cli_unescape=True)
    register("add_special_tokens", list, None, "Tokens to add to the tokenizer (embeddings are "
             "resized).")
    register("padding_free", bool, False, "Batch examples back to back without padding; "
             "position_ids restart per example so no example attends to another "
             "(fms-hf-tuning's `--padding_free huggingface` means true).",
             true_words=("huggingface",))
    register("multipack", int, None, "Multipack (fms-hf-tuning's `--multipack N`, with "
             "--padding_free): each step's batch is the examples that fill a token budget of "
             "per_device_train_batch_size x the mean example length, bins balanced across "
             "processes; N is the processes fms-hf-tuning computes the lengths with (fmtune "
             "reads them from Arrow, so it only needs to be positive).")
    register("packing", bool, False, "Pack examples into rows of max_seq_length (no attention "
             "across examples, as with padding_free).")
    register("dataset_num_proc", int, None, "Processes for the data handlers' maps and filters "
             "(datasets' num_proc; TRL's option of this name). Default: one per "
             f"{RECORDS_PER_PROCESS:,} records of a dataset, at most the CPUs this process may "
             "use shared among the training processes on this machine; a data_config "
             "handler's num_proc wins.")
    register("ept", bool, False, "Extended pre-training: raw text (a 'text' column, "
             "dataset_text_field, data_formatter_template, or .txt files: a row per line; "
             "folders and globs) is tokenized whole with EOS after each document, "
             "concatenated and cut into blocks of max_seq_length tokens, every token trained.")


@hookimpl
def validate_config(config, pm):
    problems = []
    if not (config.training_data_path or config.data_config_path):
        problems.append("training_data_path or data_config_path is required")
    if config.training_data_path and config.data_config_path:
        problems.append("training_data_path and data_config_path are exclusive: the data_config "
                        "lists the data files")
    if config.dataset_num_proc is not None and config.dataset_num_proc < 1:
        problems.append(f"dataset_num_proc must be >= 1, got {config.dataset_num_proc}")
    if config.dataset_text_field and config.data_formatter_template:
        problems.append("dataset_text_field and data_formatter_template are exclusive: set one")
    if config.data_handlers and config.data_config_path:
        problems.append("data_handlers and data_config_path are exclusive: list the handlers "
                        "in the data_config (datasets[].data_handlers)")
    elif config.data_handlers:
        from .handlers import collect

        registry = collect(pm, config)
        for k, name in enumerate(config.data_handlers):
            try:
                registry.get(name, f"data_handlers[{k}]")
            except ConfigError as e:
                problems.append(str(e))
    if config.data_config_path and not os.path.isfile(config.data_config_path):
        problems.append(f"data_config_path: {config.data_config_path} not found")
    elif config.data_config_path:
        from .handlers import collect
        from .loading import DataError
        from .processing import read_data_config

        try:
            dc = read_data_config(config.data_config_path, collect(pm, config))
            if dc.streaming and (config.max_steps or -1) <= 0:
                problems.append(f"{config.data_config_path}: dataprocessor.streaming needs "
                                "max_steps (a stream has no length)")
            if dc.odm is not None:
                problems += _odm_problems(config, dc)
            if dc.streaming and config.multipack is not None:
                problems.append(f"{config.data_config_path}: dataprocessor.streaming: multipack "
                                "needs every example's length each epoch, which a stream cannot "
                                "give; use streaming: false")
            if dc.streaming and config.packing:
                problems.append(f"{config.data_config_path}: dataprocessor.streaming: packing "
                                "groups examples by length over the whole dataset, which a "
                                "stream cannot give; use --padding_free, or streaming: false")
            problems += _pretokenized_problems(config, dc)
        except DataError as e:
            problems.append(str(e))
    elif config.training_data_path:
        problems += _pretokenized_problems(config, None)
    if config.chat_template is not None:
        from .chat import configured_template

        try:
            configured_template(config)
        except ConfigError as e:
            problems.append(str(e))
    if config.ept:
        if config.packing:
            problems.append("ept and packing are exclusive: ept already fills every row with "
                            "max_seq_length tokens")
        for name in ("response_template", "instruction_template"):
            if getattr(config, name, None):
                problems.append(f"ept trains every token; --{name} (which masks prompts) does "
                                "not apply")
    problems += _multipack_problems(config)
    problems.append(missing_eval_data(config, "validation_data_path", "data_config_path"))
    return [p for p in problems if p]


def _odm_problems(config, dc) -> list[str]:
    """dataprocessor.type: odm: what the online mixing stream needs from the run."""
    where = f"{dc.source}: dataprocessor.type: odm"
    problems = []
    if (config.max_steps or -1) <= 0:
        problems.append(f"{where} needs max_steps (the mixed stream has no length)")
    for flag in ("packing", "ept"):
        if config.get(flag):
            problems.append(f"{where}: --{flag} is not supported with online mixing")
    if config.multipack is not None:
        problems.append(f"{where}: --multipack needs a dataset with a length, the mix is a stream")
    if (config.get("dataloader_num_workers") or 0) > 0:
        problems.append(f"{where} needs dataloader_num_workers 0 (the mixer's weights are "
                        "updated in the training process)")
    if dc.odm.get("auto_categorize_input_column"):
        problems += _auto_categorize_problems(dc)
    from .processing import VALIDATION_REWARDS

    reward = dc.odm["reward_type"]
    if reward in VALIDATION_REWARDS:  # fms-acceleration crashes on a dataset without one
        missing = [f"datasets[{spec.name}]" for spec in dc.datasets
                   if spec.fractions()[0] > 0 and not spec.fractions()[1] > 0]
        if missing:
            problems.append(f"{dc.source}: dataprocessor.odm.reward_type {reward} computes "
                            f"each dataset's reward on its validation split; "
                            f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} "
                            "none (add split: {train: 0.9, validation: 0.1})")
        return problems
    interval = odm_update_interval(config, dc.odm)
    logged = "loss" if reward == "train_loss" else "grad_norm"
    logging = config.get("logging_steps")
    if isinstance(logging, (int, float)) and logging >= 1 and interval % int(logging):
        problems.append(f"{dc.source}: dataprocessor.odm.update_interval: {interval} is not a "
                        f"multiple of logging_steps {int(logging)} (the {reward} reward is "
                        f"the logged {logged})")
    if reward == "gradnorm" and not (config.get("max_grad_norm") or 0) > 0:
        problems.append(f"{dc.source}: dataprocessor.odm.reward_type gradnorm is computed from "
                        "the logged grad_norm, which the Trainer computes only with "
                        "max_grad_norm > 0 (got max_grad_norm 0)")
    return problems


def _auto_categorize_problems(dc) -> list[str]:
    """What auto-categorizing needs, checked before anything loads: scikit-learn (KMeans) and
    an embedding model that is a folder, in the Hugging Face cache, or downloadable."""
    import importlib.util

    from .autocategorize import DEFAULT_MODEL

    where = f"{dc.source}: dataprocessor.odm.auto_categorize_input_column"
    problems = []
    if importlib.util.find_spec("sklearn") is None:
        problems.append(f"{where}: clustering needs scikit-learn (pip install "
                        "'fmtune-data-handlers[odm-auto]')")
    name = dc.odm.get("auto_categorize_model_name") or DEFAULT_MODEL
    if not os.path.isdir(name):
        from huggingface_hub import try_to_load_from_cache

        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not a hub id
            problems.append(f"{where}: embedding model {name}: no such folder")
        elif offline and not isinstance(try_to_load_from_cache(name, "modules.json"), str):
            problems.append(f"{where}: embedding model {name} is not a local folder and not in "
                            "the Hugging Face cache, and HF_HUB_OFFLINE is set; set "
                            "auto_categorize_model_name to a local sentence-transformers folder")
    return problems


def odm_update_interval(config, odm: dict) -> int:
    """fms-hf-tuning's rule: update_interval, else eval_steps; fmtune then logging_steps."""
    for value in (odm.get("update_interval"), config.get("eval_steps"),
                  config.get("logging_steps")):
        if isinstance(value, (int, float)) and value >= 1:
            return int(value)
    return 1


def _multipack_problems(config) -> list[str]:
    if config.multipack is None:
        return []
    if config.multipack < 1:
        return [f"multipack: the number of processes must be positive, got {config.multipack}"]
    if config.packing:
        return ["multipack and packing are exclusive: multipack makes batches of whole examples "
                "(with --padding_free), packing makes rows of them"]
    if not config.padding_free:
        return ["--multipack needs --padding_free (as in fms-hf-tuning): a multipack batch is "
                "given to the model as one row without padding"]
    return []


# fms-hf-tuning's flags that describe how to turn text into tokens
FORMAT_FLAGS = ("response_template", "instruction_template", "data_formatter_template",
                "dataset_text_field")


def _pretokenized_problems(config, dc) -> list[str]:
    """Text-format flags given for data that is already tokenized (an ``input_ids`` column)
    would be silently ignored, or fail after the model has loaded: refused up front, as
    fms-hf-tuning refuses them. Only the first file of each path is looked at (its schema,
    header or first record), so this is cheap; hub ids are not looked at."""
    from .loading import peek_columns

    given = [f"--{name}" for name in FORMAT_FLAGS if getattr(config, name, None)]
    if not given:
        return []
    if dc is None:
        sources = [("", peek_columns(config.training_data_path))]
    else:  # refused only when no dataset of the data_config takes text
        sources = [(f"datasets[{spec.name}]: ", peek_columns(spec.data_paths, spec.builder))
                   for spec in dc.datasets]
    pretokenized = [(where, cols) for where, cols in sources
                    if cols and all("input_ids" in c for c in cols.values())]
    if not pretokenized or len(pretokenized) < len(sources):
        return []
    where, cols = pretokenized[0]
    file, names = next(iter(cols.items()))
    one = len(given) == 1
    return [f"{dc.source + ': ' if dc is not None else ''}{' '.join(given)} "
            f"{'does' if one else 'do'} not apply to pretokenized data ({where}{file} has "
            f"columns {', '.join(names)}); drop {'it' if one else 'them'} or give untokenized "
            "data"]


@hookimpl
def register_data_handlers(register):
    from .handlers import BUILTIN

    for name, (fn, kind) in BUILTIN.items():
        register(name, fn, kind, batch_only=kind != "dataset")


def add_tokens(config, tokenizer) -> None:
    if config.add_special_tokens:
        new = [t for t in config.add_special_tokens if t not in tokenizer.get_vocab()]
        if new:
            tokenizer.add_special_tokens({"additional_special_tokens": new},
                                        replace_extra_special_tokens=False)
            log.info("added %d special tokens: %s", len(new), ", ".join(new))


def prepare(config, tokenizer, pm):
    """Run the configured pipeline: returns a :class:`~.processing.Prepared`."""
    from .handlers import collect
    from .processing import prepare as run, read_data_config

    if not tokenizer.is_fast:
        from .loading import DataError

        raise DataError("the data handlers need a fast tokenizer (tokenizer.json) for exact masks")
    add_tokens(config, tokenizer)
    registry = collect(pm, config)
    dc = read_data_config(config.data_config_path, registry) if config.data_config_path else None
    return run(config, tokenizer, registry, dc, config.validation_data_path)


@hookimpl
def prepare_data(config, tokenizer, pm):
    prepared = prepare(config, tokenizer, pm)
    keep_template(tokenizer, prepared.chat_templates)
    for split, counts in prepared.counts.items():
        if counts:
            log.info("%s data: %s", split, ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    train = prepared.train
    if prepared.parts is not None:  # dataprocessor.type: odm
        train = mixing_stream(config, *auto_categorized(config, tokenizer, prepared))
    elif config.packing:
        from .packing import pack

        train = pack(train, config.max_seq_length)
    return train, prepared.validation


# ----------------------------------------------------------- online data mixing (odm)

ODM = StashKey["OdmRun"]()
ODM_LOG = "odm.jsonl"  # a line per mixing update (step, rewards, ratios, examples)


class OdmRun:
    """This run's mixing stream, its reward, update interval and the validation splits the
    entropy and validation_loss rewards are computed on."""

    def __init__(self, stream, interval: int, dc_source: str, reward: str,
                 validation: dict | None = None) -> None:
        self.stream, self.interval, self.source = stream, interval, dc_source
        self.reward, self.validation = reward, validation or {}
        self.last_trained = 0


def auto_categorized(config, tokenizer, prepared) -> tuple[dict, dict]:
    """``(parts, odm)`` to mix: with ``auto_categorize_input_column``, the one dataset's
    clusters and their validation rows (:mod:`.autocategorize`; only for training, so
    ``fmtune preprocess`` and ``data preview`` load no embedding model), else as prepared."""
    odm = prepared.odm
    if not odm.get("auto_categorize_input_column"):
        return prepared.parts, odm
    from .autocategorize import categorize

    (name, ds), = prepared.parts.items()
    parts, validation = categorize(ds, odm["validation"].get(name), tokenizer, odm, odm["seed"],
                                   bool(config.get("trust_remote_code")))
    return parts, {**odm, "validation": validation, "weights": dict.fromkeys(parts)}


def mixing_stream(config, parts: dict, odm: dict):
    """The :class:`~.odm.MixingStream` over each dataset's train split (``parts``), kept on
    the run's stash for the hooks below."""
    from .odm import MixingStream
    from .processing import VALIDATION_REWARDS

    reward = odm["reward_type"]
    validation = {}
    if reward in VALIDATION_REWARDS:
        validation = odm.get("validation") or {}
        empty = [name for name in parts if len(validation.get(name) or ()) == 0]
        if empty:  # every row of the split was dropped (validate_config saw the split given)
            from .loading import DataError

            raise DataError(f"{odm['source']}: dataprocessor.odm.reward_type {reward} computes "
                            f"each dataset's reward on its validation split; "
                            f"{', '.join(f'datasets[{n}]' for n in empty)}: no usable "
                            "validation example")
    weights = {name: w for name, w in odm["weights"].items() if w is not None}
    stream = MixingStream(parts, weights if len(weights) == len(parts) else None,
                          gamma=odm["gamma"], eta=odm["eta"], seed=odm["seed"],
                          sampling_interval=odm["sampling_interval"], reward_type=reward)
    config.stash[ODM] = OdmRun(stream, odm_update_interval(config, odm), odm["source"], reward,
                               validation)
    on = ", ".join(f"{n}: {len(validation[n])}" for n in stream.names) if validation else ""
    log.info("online data mixing (odm): %s; initial sampling ratios %s; updated from the %s "
             "reward every %d steps%s", ", ".join(f"{n}: {len(parts[n])} examples" for n in
                                                  stream.names),
             ", ".join(f"{r:.3f}" for r in stream.mixer.ratios), reward,
             config.stash[ODM].interval, f" (on the validation splits: {on})" if on else "")
    return stream


@hookimpl
def on_train_begin(run):
    odm = run.config.stash.get(ODM)
    if odm is None:
        return None
    from fmtune.records import restart_jsonl

    if run.is_main_process:  # a fresh run's odm.jsonl starts empty; a resumed one's is kept
        restart_jsonl(os.path.join(run.output_dir, ODM_LOG),
                      int(run.state.global_step) if run.resumed_from else None,
                      lambda row: row["step"])
    if not run.resumed_from:
        return None
    import json

    from .odm import ODM_STATE

    path = os.path.join(run.resumed_from, ODM_STATE)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found: the checkpoint was not saved by an online data "
                          "mixing run (dataprocessor.type: odm)") from None
    try:
        odm.stream.load_state_dict(state)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    odm.last_trained = int(run.state.global_step) * _examples_per_step(run)
    log.info("odm: %d mixing updates of %s replayed", len(odm.stream.replay), path)
    return None


def _examples_per_step(run) -> int:
    """Examples drawn from the mixing stream per optimizer step, all processes together: with
    several processes every one reads the same stream (same seed, same updates, from the same
    logged values) and trains its share of each round of batches (the core's
    ``dispatch_batches=False``, as fms-hf-tuning sets it for online mixing)."""
    args = run.trainer.args
    return (int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps)
            * int(args.world_size))


def _write_update(run, odm, step: int, trained: int, **fields) -> None:
    """An odm.jsonl line: the update's reward vector, the new ratios and weights, and how
    many examples of each dataset were trained since the last update."""
    stream = odm.stream
    if run.is_main_process:
        import json

        line = {"step": step, "reward_type": odm.reward, **fields,
                "sampling_ratios": dict(zip(stream.names, stream.mixer.ratios)),
                "sampling_weights": dict(zip(stream.names, stream.mixer.weights)),
                "sampled": stream.sampled(odm.last_trained, trained)}
        with open(os.path.join(run.output_dir, ODM_LOG), "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    odm.last_trained = trained


@hookimpl
def on_log(run, logs):
    """train_loss and gradnorm: the logged loss (grad_norm) of an update step is credited."""
    odm = run.config.stash.get(ODM)
    if odm is None or odm.reward not in ("train_loss", "gradnorm"):
        return None
    key = "loss" if odm.reward == "train_loss" else "grad_norm"
    step = int(run.state.global_step)
    if key not in logs or step % odm.interval:
        return None
    from .odm import gradnorm_reward

    trained = step * _examples_per_step(run)
    stream = odm.stream
    logged = float(logs[key])
    arm = stream.credit(trained, logged if key == "loss" else gradnorm_reward(logged))
    _write_update(run, odm, step, trained, credited=stream.names[arm], **{key: logged},
                  rewards=dict(zip(stream.names, stream.mixer.last_loss)))
    return None


@hookimpl
def on_step(run):
    """entropy rewards and validation_loss: at every update step (after the optimizer step,
    as fms-acceleration's patched ``Trainer._evaluate``) the model is run over each dataset's
    validation split and the mixer is updated with the reward vector."""
    odm = run.config.stash.get(ODM)
    step = int(run.state.global_step)
    if odm is None or not odm.validation or step % odm.interval:
        return None
    rewards, counts = validation_rewards(run.trainer, odm.reward,
                                         [odm.validation[n] for n in odm.stream.names])
    odm.stream.update(rewards, counts)
    names = odm.stream.names
    _write_update(run, odm, step, step * _examples_per_step(run),
                  rewards=dict(zip(names, rewards)), counts=dict(zip(names, counts)))
    return None


def validation_rewards(trainer, reward: str, datasets: list) -> tuple[list[float], list[float]]:
    """``(rewards, counts)``, one per dataset: ``trainer.model`` (in eval mode, under
    ``torch.inference_mode``, then back to train mode) is run over each dataset in order, in
    batches of ``per_device_eval_batch_size`` rows collated with the trainer's collator.

    * entropy rewards (:func:`~.odm.entropy_reward`): the sum of the per-sequence values and
      the number of sequences, as fms-acceleration computes them, except that the entropies are
      normalized by the model's real vocabulary size (the logits' last dimension) where
      fms-acceleration passes 32000 whatever the model;
    * ``validation_loss``: the mean of the model's loss (with the labels) over the dataset's
      batches, weighted by their rows (the Trainer's ``eval_<name>_loss``), count 1 (fms
      reads the last logged ``eval_<name>_loss``; fmtune computes it at the update, so no
      eval_strategy is needed). A batch without a trained token has no loss and is skipped.
    """
    import contextlib

    import torch

    from .odm import entropy_reward

    model, args = trainer.model, trainer.args
    size = max(1, int(args.per_device_eval_batch_size))
    autocast = getattr(trainer, "autocast_smart_context_manager", None)
    was_training = model.training
    model.eval()
    rewards, counts = [], []
    try:
        with torch.inference_mode():
            for ds in datasets:
                total, count, rows_seen = 0.0, 0, 0
                for start in range(0, len(ds), size):
                    part = ds[start:start + size]
                    rows = [{"input_ids": list(ids), "labels": list(lab)}
                            for ids, lab in zip(part["input_ids"], part["labels"])]
                    batch = {k: v.to(args.device) if torch.is_tensor(v) else v
                             for k, v in trainer.data_collator(rows).items()}
                    if reward != "validation_loss":
                        batch.pop("labels", None)
                    with autocast() if autocast else contextlib.nullcontext():
                        out = model(**batch)
                    if reward == "validation_loss":
                        if not bool((batch["labels"] != -100).any()):
                            continue
                        total += float(out.loss) * len(rows)
                        rows_seen += len(rows)
                    else:
                        value, n = entropy_reward(reward, out.logits, batch.get("attention_mask"),
                                                  batch.get("position_ids"))
                        total += value
                        count += n
                if reward == "validation_loss":
                    rewards.append(total / rows_seen if rows_seen else NO_REWARD)
                    counts.append(1.0)
                else:
                    rewards.append(total)
                    counts.append(float(count) if count else 1.0)
    finally:
        if was_training:
            model.train()
    return rewards, counts


NO_REWARD = 1e-100  # a dataset whose validation split gave no value (fms's empty buffer)


@hookimpl
def on_save(run, checkpoint_dir):
    odm = run.config.stash.get(ODM)
    if odm is None or not run.is_main_process or not os.path.isdir(checkpoint_dir):
        return None
    from fmtune.records import write_json

    from .odm import ODM_STATE

    write_json(os.path.join(checkpoint_dir, ODM_STATE), odm.stream.state_dict())
    return None


@hookimpl
def on_train_end(run, summary):
    odm = run.config.stash.get(ODM)
    if odm is None:
        return
    stream = odm.stream
    trained = int(run.state.global_step) * _examples_per_step(run)
    summary["odm"] = {"datasets": stream.names, "reward_type": odm.reward,
                      "sampling_ratios": dict(zip(stream.names, stream.mixer.ratios)),
                      "sampled": stream.sampled(0, trained), "updates": len(stream.updates)}


def keep_template(tokenizer, used: list[str]) -> None:
    """The chat template the data was rendered with becomes the run's tokenizer's, so every
    save of it (checkpoints, the final folder, merge and vLLM exports of an adapter) carries
    it and ``fmtune generate --chat`` renders prompts as in training. Not for several
    templates (which one?) or a record-form one (``messages['messages']``: inference passes
    a list of messages)."""
    from fmtune.records import chat_template_markers

    from .chat import record_keys

    if not used or used == [tokenizer.chat_template]:
        return
    if len(used) > 1:
        log.warning("the chat data was rendered with %d different chat templates; none is "
                    "saved with the tokenizer (set one with --chat_template to save it)",
                    len(used))
        return
    template = used[0]
    if record_keys(template):
        log.warning("the chat template reads %s (fms-hf-tuning's record form): not saved with "
                    "the tokenizer, since inference passes a list of messages; give "
                    "`fmtune generate --chat --chat_template` a list-form template",
                    ", ".join(f"messages[{k!r}]" for k in record_keys(template)))
        return
    tokenizer.chat_template = template
    name, markers = chat_template_markers(template)
    vocab = tokenizer.get_vocab()
    missing = [m for m in markers if m not in vocab]
    log.info("the chat template%s is saved with the tokenizer", f" {name!r}" if name else "")
    if missing:
        log.warning("chat template %r: %s %s not in the tokenizer's vocabulary, so %s trained "
                    "as ordinary text pieces; add them with --add_special_tokens %s", name,
                    ", ".join(missing), "is" if len(missing) == 1 else "are",
                    "it is" if len(missing) == 1 else "they are", " ".join(missing))


@hookimpl
def train_batch_sampler(config, dataset, batch_size, world_size, rank):
    """``--multipack``: fms-acceleration's multipack batches (:mod:`.multipack`)."""
    if config.get("multipack") is None:
        return None
    import pyarrow.compute as pc

    from .multipack import MultipackBatchSampler, budget

    column = dataset.with_format("arrow")["input_ids"]
    lengths = pc.list_value_length(column).to_pylist()
    tokens = budget(lengths, batch_size)
    sampler = MultipackBatchSampler(lengths, tokens, seed=config.seed, num_replicas=world_size,
                                    rank=rank)
    log.info("multipack: batches of up to %d tokens (%d x mean length %.1f) over %d "
             "process(es): %d steps per epoch, %.1f%% of the budget filled", tokens, batch_size,
             sum(lengths) / max(1, len(lengths)), world_size, len(sampler),
             100 * sampler.efficiency())
    return sampler


@hookimpl
def build_collator(tokenizer, config):
    if not (config.padding_free or config.packing):
        return None
    from .packing import FlatteningCollator

    return FlatteningCollator()
