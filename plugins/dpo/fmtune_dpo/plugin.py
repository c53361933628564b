"""``--plugins dpo``: preference optimisation with TRL's DPOTrainer.

    fmtune train --plugins dpo --training_data_path prefs.jsonl --beta 0.1 --loss_type ipo ...
    fmtune train --plugins dpo,lora ...   # the LoRA model is its own reference

The plugin answers ``prepare_data`` (prompt/chosen/rejected records tokenized
into TRL's columns, :mod:`fmtune_dpo.data`), ``build_collator`` (TRL's
``DataCollatorForPreference``) and ``build_trainer`` (``DPOTrainer``), and
appends the DPO metrics (``rewards/*``, ``logps/*``) to ``training_logs.jsonl``.
"""

from __future__ import annotations

import logging

from fmtune import hookimpl
from fmtune.records import missing_eval_data

log = logging.getLogger("fmtune")

# trl 1.16's DPOConfig.loss_type values
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
              "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# core data options that have no meaning for preference records
SFT_DATA_OPTIONS = ("dataset_text_field", "response_template", "data_formatter_template")
LOGGED_PREFIXES = ("rewards/", "logps/", "eval_rewards/", "eval_logps/")


@hookimpl
def add_options(register):
    register("beta", float, 0.1, "DPO beta: how far the model may move from the reference "
             "(for ipo, the regularisation tau).")
    register("loss_type", list, ["sigmoid"], "TRL DPO loss(es), comma-separated: "
             + ", ".join(LOSS_TYPES) + ".")
    register("loss_weights", list, None, "Weights of the loss_type losses when there are several.")
    register("label_smoothing", float, 0.0, "Label smoothing for the robust and exo_pair losses.")
    register("precompute_ref_log_probs", bool, False, "Compute the reference log-probabilities "
             "once before training (no reference model kept in memory).")
    register("chat_template", str, None, "Chat template for chat-message records: a built-in "
             "name (chatml, llama3, granite, gemma, mistral), a file or the Jinja text "
             "(default: the tokenizer's).", shared=True)


@hookimpl
def validate_config(config):
    problems = []
    if not config.training_data_path:
        problems.append("dpo: training_data_path is required (JSON/JSONL prompt/chosen/rejected "
                        "records)")
    for name in SFT_DATA_OPTIONS:
        if config.get(name):
            problems.append(f"dpo: {name} is not used with preference data (records have prompt, "
                            "chosen and rejected); remove it")
    for name in ("packing", "padding_free", "data_config_path"):
        if config.get(name):
            problems.append(f"dpo: {name} is not supported with preference data")
    problems.append(missing_eval_data(config, "validation_data_path"))
    bad = [t for t in config.loss_type or [] if t not in LOSS_TYPES]
    if bad or not config.loss_type:
        problems.append(f"loss_type: unknown {', '.join(map(repr, bad)) or 'empty value'}; "
                        f"TRL's DPO losses are {', '.join(LOSS_TYPES)}")
    if config.loss_weights:
        try:
            [float(w) for w in config.loss_weights]
        except ValueError:
            problems.append(f"loss_weights must be numbers, got {','.join(config.loss_weights)}")
        if len(config.loss_weights) != len(config.loss_type or []):
            problems.append(f"loss_weights has {len(config.loss_weights)} values for "
                            f"{len(config.loss_type or [])} loss_type values")
    if config.beta <= 0:
        problems.append(f"beta must be > 0, got {config.beta}")
    elif not config.beta < float("inf"):  # nan, inf
        problems.append(f"beta must be a finite number > 0, got {config.beta}")
    if not 0 <= config.label_smoothing <= 0.5:
        problems.append(f"label_smoothing must be in [0, 0.5] (the probability that a preference "
                        f"label is flipped), got {config.label_smoothing}")
    if config.get("chat_template") is not None:
        from fmtune.config import ConfigError
        from fmtune.records import resolve_chat_template

        try:  # a built-in name, a file or the text; compiled
            resolve_chat_template(config.chat_template)
        except ConfigError as e:
            problems.append(str(e))
    if "exo_pair" in (config.loss_type or []) and config.label_smoothing <= 0:
        problems.append("loss_type exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)")
    if "robust" in (config.loss_type or []) and not 0 <= config.label_smoothing < 0.5:
        problems.append(f"loss_type robust needs label_smoothing in [0, 0.5), got "
                        f"{config.label_smoothing}")
    return [p for p in problems if p]


@hookimpl(tryfirst=True)
def prepare_data(config, tokenizer):
    from .data import prepare

    train, evalset, counts = prepare(config, tokenizer)
    for split, c in counts.items():
        log.info("%s preference data: %s", split, c.line())
    return train, evalset


@hookimpl(tryfirst=True)
def build_collator(tokenizer, config):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id,
                                     max_length=config.max_seq_length)


@hookimpl(tryfirst=True)
def build_trainer(model, tokenizer, config, train_dataset, eval_dataset, data_collator,
                  training_args, callbacks):
    from .trainer import build

    return build(model, tokenizer, config, train_dataset, eval_dataset, data_collator,
                 training_args, callbacks)


@hookimpl
def on_log(run, logs):
    """DPO metrics go to training_logs.jsonl next to the losses, in the same line format."""
    from fmtune.logs import append_metrics

    append_metrics(run, logs, {key: key for key in logs if key.startswith(LOGGED_PREFIXES)})
