"""Run Silogen ``finetuning`` experiment configs with fmtune.

    fmtune sft CONFIG.yaml [--logging-level L] [--num-preprocess-workers N]
               [--mlflow-server-uri U] [--experiment-name E] [--hf-mlflow-log-artifacts B]
               [--print-config]
    fmtune dpo CONFIG.yaml [...the same flags]

Silogen's config is nested (``data_conf``, ``training_args``, ``batchsize_conf``,
``peft_conf``, ``quant_conf``, ``run_conf``, ``tracking``, ``overrides``, ``sft_args``);
:func:`translate` turns it into fmtune's flat options and the plugins to activate, and
:func:`cmd` trains with :func:`fmtune.cli.cmd_train`. A key fmtune cannot honour is a
one-line :class:`~fmtune.config.ConfigError` naming the file and the dotted key path;
nothing is silently dropped except keys whose Silogen meaning fmtune already has (listed
in docs/silogen.md). ``--print-config`` prints the equivalent ``fmtune train`` YAML
(and the data_config it needs, if any) instead of training.

Some Silogen inputs need a generated file: a weighted dataset mix, an automatic
validation split or whole-conversation SFT becomes a data_config
(:data:`DATA_CONFIG`), and Silogen's preference records (``prompt_messages``,
``chosen_messages``, ``rejected_messages``) are rewritten to the ``prompt`` /
``chosen`` / ``rejected`` records of fmtune's ``dpo`` plugin. :func:`translate`
names these files by their bare names (:data:`DATA_CONFIG`, :data:`DPO_TRAIN`,
:data:`DPO_VALID`); :func:`plan` also returns how to write them, and :func:`cmd` writes
them to a temporary folder. No torch here.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, parse_bool, read_yaml, suggest

log = logging.getLogger("fmtune")

KINDS = ("sft", "dpo")
DATA_CONFIG = "silogen_data_config.yaml"
DPO_TRAIN = "silogen_train_preferences.jsonl"
DPO_VALID = "silogen_validation_preferences.jsonl"
DEFAULT_OUTPUT_DIR = os.getenv("CHECKPOINTS_PATH", "./checkpoints")  # Silogen's convention
PREFERENCE_FIELDS = (("prompt_messages", "prompt"), ("chosen_messages", "chosen"),
                     ("rejected_messages", "rejected"))

# ------------------------------------------------------------ Silogen's chat templates
# Copied from finetuning.data.chat_templates (silogen/llm-finetuning): name -> (Jinja, tokens
# Silogen adds to the tokenizer).
_MISTRAL = ("{% for message in messages %}{% if message['role'] == 'user' %}"
            "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
            "{% elif message['role'] == 'system' %}"
            "{{ '<<SYS>>\n' + message['content'] + '\n<</SYS>>\n' }}"
            "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
            "{% endif %}{% endfor %}")
_CHAT_ML = ("{% for message in messages %}"
            "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
_PORO = ("{% for message in messages %}{% if message['role'] == 'user' %}"
         "{{ '<|user|>\n' + message['content'] + eos_token }}"
         "{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + eos_token }}"
         "{% elif message['role'] == 'assistant' %}"
         "{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}"
         "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
         "{% endfor %}")
_LLAMA31 = ("{{- bos_token }}{%- for message in messages %}"
            "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
            "+ message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
            "{%- endif %}")
CHAT_TEMPLATES: dict[str, tuple[str, list[str]] | None] = {
    "mistral-with-system": (_MISTRAL, []),
    "chat-ml": (_CHAT_ML, ["<|im_start|>", "<|im_end|>"]),
    "poro": (_PORO, ["<|user|>", "<|assistant|>"]),
    "simplified-llama31": (_LLAMA31, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "keep-original": None,
}

# ------------------------------------------------------------------- key tables
TOP_KEYS = ("method", "data_conf", "training_args", "overrides", "batchsize_conf", "peft_conf",
            "run_conf", "tracking", "quant_conf")
KIND_KEYS = {"sft": ("sft_args",), "dpo": ()}
DATA_CONF_KEYS = ("training_data", "validation_data", "chat_template_name", "padding_side",
                  "missing_pad_token_strategy")
DATA_INPUT_KEYS = {"CONCATENATION": ("type", "data_type", "datasets"),
                   "PRECOMPUTE_WEIGHTED_MIX": ("type", "data_type", "datasets", "seed"),
                   "AUTO_SPLIT": ("type", "data_type", "ratio", "seed"),
                   "NONE": ("type", "data_type")}
BATCH_KEYS = ("total_train_batch_size", "max_per_device_train_batch_size",
              "per_device_eval_batch_size")
TRACKING_KEYS = ("mlflow_server_uri", "experiment_name", "hf_mlflow_log_artifacts")
OVERRIDE_KEYS = ("lr_multiplier", "lr_batch_size_scaling")
SFT_KEYS = ("max_seq_length", "length_handling", "save_name_if_new_basemodel",
            "train_on_completions_only")
RUN_KEYS = ("model", "model_args", "tokenizer", "use_fast_tokenizer", "resume_from_checkpoint",
            "final_checkpoint_name", "determinism")
# finetuning.config.run.ModelArguments: name -> Silogen's default (accepted when equal)
MODEL_ARG_DEFAULTS = {
    "pretrained_model_name_or_path": None, "config": None, "cache_dir": None, "from_tf": False,
    "from_flax": False, "ignore_mismatched_sizes": False, "force_download": False,
    "proxies": None, "output_loading_info": False, "local_files_only": False, "token": None,
    "revision": "main", "device_map": None, "max_memory": None, "tp_plan": None, "tp_size": None,
    "offload_folder": None, "offload_buffers": False, "subfolder": "", "variant": None,
    "use_safetensors": None, "weights_only": True, "key_mapping": None,
}
DTYPES = ("auto", "float32", "bfloat16", "float16")
PEFT_KEYS = ("peft_type", "task_type", "peft_kwargs", "name_or_path")
# peft LoraConfig kwarg -> fmtune option; peft's defaults where fmtune's differ are written out
LORA_KWARGS = {"r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
               "target_modules": "target_modules", "modules_to_save": "modules_to_save",
               "use_rslora": "use_rslora", "use_dora": "use_dora",
               "init_lora_weights": "init_lora_weights"}
PEFT_LORA_DEFAULTS = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0}
# peft LoraConfig fields fmtune has no option for (accepted only at peft's default)
LORA_FIXED = {"bias": "none", "fan_in_fan_out": False, "inference_mode": False,
              "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
              "alpha_pattern": {}, "megatron_config": None, "megatron_core": "megatron.core",
              "loftq_config": {}, "layer_replication": None, "exclude_modules": None,
              "task_type": "CAUSAL_LM", "peft_type": "LORA", "lora_bias": False,
              "use_qalora": False, "trainable_token_indices": None, "target_parameters": None}
QUANT_KEYS = ("quantization_type", "load_in_8bit", "load_in_4bit", "llm_int8_threshold",
              "llm_int8_skip_modules", "llm_int8_enable_fp32_cpu_offload",
              "llm_int8_has_fp16_weight", "bnb_4bit_compute_dtype", "bnb_4bit_quant_type",
              "bnb_4bit_use_double_quant", "bnb_4bit_quant_storage")
QUANT_FIXED = {"llm_int8_threshold": 6.0, "llm_int8_skip_modules": None,
               "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
               "bnb_4bit_quant_storage": None}
# training_args Silogen computes from batchsize_conf and refuses itself
BATCH_DERIVED = ("per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps")
# transformers 4 fields that transformers 5 removed; no effect on a Trainer run
DROPPED_TRAINING_ARGS = ("overwrite_output_dir",)
# TRL DPOConfig (trl 1.16, plus max_prompt_length of the TRL Silogen pins) fields beyond
# TrainingArguments: which fmtune dpo option each maps to, or None (not offered)
DPO_ARGS: dict[str, str | None] = {
    "beta": "beta", "loss_type": "loss_type", "loss_weights": "loss_weights",
    "label_smoothing": "label_smoothing", "precompute_ref_log_probs": "precompute_ref_log_probs",
    "max_length": "max_seq_length", "max_prompt_length": None, "trust_remote_code":
    "trust_remote_code", "activation_offloading": None, "dataset_num_proc": None,
    "disable_dropout": None, "discopop_tau": None, "f_alpha_divergence_coef": None,
    "f_divergence_type": None, "ld_alpha": None, "model_init_kwargs": None,
    "pad_to_multiple_of": None, "pad_token": None, "padding_free": None,
    "precompute_ref_batch_size": None, "ref_model_mixup_alpha": None,
    "ref_model_sync_steps": None, "router_aux_loss_coef": None, "sync_ref_model": None,
    "truncation_mode": None, "use_weighting": None, "rpo_alpha": None,
    "ref_model_init_kwargs": None, "generate_during_eval": None, "is_encoder_decoder": None,
    "max_completion_length": None, "reference_free": None, "use_logits_to_keep": None,
    "padding_value": None, "label_pad_token_id": None, "tools": None,
}
# Silogen's DPO defaults for these (applied whether or not the file sets them)
SILOGEN_DPO_DEFAULTS = {"max_length": 2048}


@dataclass
class Plan:
    """What a Silogen config becomes: fmtune options, plugins, and files to generate
    (bare file name -> a data_config mapping, or ``("preferences", [source paths])``)."""

    options: dict[str, Any]
    plugins: list[str]
    files: dict[str, Any] = field(default_factory=dict)


class _Ctx:
    def __init__(self, where: str) -> None:
        self.where = where

    def error(self, path: str, why: str) -> ConfigError:
        return ConfigError(f"{self.where}: {path}: {why}")

    def mapping(self, value: Any, path: str, keys: tuple[str, ...] | None = None,
                required: tuple[str, ...] = ()) -> dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.error(path, f"must be a mapping, got {value!r}")
        if keys is not None:
            for key in value:
                if key not in keys:
                    raise self.error(f"{path}.{key}" if path else str(key),
                                     f"unknown key{suggest(str(key), keys)}")
        for key in required:
            if key not in value:
                raise self.error(f"{path}.{key}" if path else key, "required")
        return value

    def fixed(self, value: Any, path: str, expected: Any, why: str) -> None:
        if value != expected:
            raise self.error(path, f"{value!r} is not supported: {why}")


def _training_option_names() -> set[str]:
    """Every fmtune core option and TrainingArguments field (no plugin import)."""
    from .default_plugins import options as core_options  # noqa: F401 - registers core names
    from .config import OptionRegistry

    reg = OptionRegistry()
    core_options.add_options(reg.register_for("default:options"))
    return set(reg.options) | set(reg.aliases)


def _as_str_list(ctx: _Ctx, value: Any, path: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ctx.error(path, f"must be a string or a list of strings, got {value!r}")


# ------------------------------------------------------------------- sections


def _data_input(ctx: _Ctx, value: Any, path: str, allowed: tuple[str, ...]) -> dict:
    d = ctx.mapping(value, path, required=("type",))
    kind = d["type"]
    if kind not in allowed:
        raise ctx.error(f"{path}.type", f"must be one of {', '.join(allowed)}; got {kind!r}"
                        f"{suggest(str(kind), allowed)}")
    ctx.mapping(d, path, DATA_INPUT_KEYS[kind])
    if "datasets" in DATA_INPUT_KEYS[kind]:
        sets = d.get("datasets")
        if not isinstance(sets, list) or not sets:
            raise ctx.error(f"{path}.datasets", "required, a non-empty list")
        keys = ("path", "sampling_weight") if kind == "PRECOMPUTE_WEIGHTED_MIX" else ("path",)
        for i, ds in enumerate(sets):
            ctx.mapping(ds, f"{path}.datasets[{i}]", keys, required=("path",))
            if kind == "PRECOMPUTE_WEIGHTED_MIX":
                w = ds.get("sampling_weight", 1.0)
                if isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0:
                    raise ctx.error(f"{path}.datasets[{i}].sampling_weight",
                                    f"must be a positive number, got {w!r}")
    if kind == "AUTO_SPLIT":
        r = d.get("ratio", 0.2)
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1:
            raise ctx.error(f"{path}.ratio", f"must be a number in (0, 1), got {r!r}")
    return d


def _data(ctx: _Ctx, conf: dict, kind: str, completions_only: bool, opts: dict,
          plugins: list[str], files: dict) -> None:
    dc = ctx.mapping(conf, "data_conf", DATA_CONF_KEYS, required=("training_data",
                                                                  "validation_data"))
    train = _data_input(ctx, dc["training_data"], "data_conf.training_data",
                        ("CONCATENATION", "PRECOMPUTE_WEIGHTED_MIX"))
    valid = _data_input(ctx, dc["validation_data"], "data_conf.validation_data",
                        ("CONCATENATION", "AUTO_SPLIT", "NONE"))
    ctx.fixed(dc.get("padding_side", "right"), "data_conf.padding_side", "right",
              "fmtune pads on the right for training")
    ctx.fixed(dc.get("missing_pad_token_strategy", "bos-repurpose"),
              "data_conf.missing_pad_token_strategy", "bos-repurpose",
              "fmtune chooses the pad token itself; remove the key")
    name = dc.get("chat_template_name", "mistral-with-system")
    if name not in CHAT_TEMPLATES:
        raise ctx.error("data_conf.chat_template_name",
                        f"unknown chat template {name!r}{suggest(str(name), CHAT_TEMPLATES)}")
    template = CHAT_TEMPLATES[name]
    if template is not None:
        opts["chat_template"] = template[0]
        if template[1] and kind == "sft":  # Silogen's DPO only checks the tokenizer has them
            opts["add_special_tokens"] = list(template[1])

    train_paths = [str(d["path"]) for d in train["datasets"]]
    weights = [float(d.get("sampling_weight", 1.0)) for d in train["datasets"]]
    mixed = train["type"] == "PRECOMPUTE_WEIGHTED_MIX" and len(train_paths) > 1
    valid_paths = [str(d["path"]) for d in valid["datasets"]] if valid["type"] == "CONCATENATION" \
        else []

    if kind == "dpo":
        if mixed:
            raise ctx.error("data_conf.training_data.type", "PRECOMPUTE_WEIGHTED_MIX of several "
                            "datasets is not supported for DPO (fmtune's dpo plugin reads one "
                            "list of files); use CONCATENATION")
        if valid["type"] == "AUTO_SPLIT":
            raise ctx.error("data_conf.validation_data.type", "AUTO_SPLIT is not supported for "
                            "DPO; give validation files with CONCATENATION, or NONE")
        files[DPO_TRAIN] = ("preferences", train_paths)
        opts["training_data_path"] = DPO_TRAIN
        if valid_paths:
            files[DPO_VALID] = ("preferences", valid_paths)
            opts["validation_data_path"] = DPO_VALID
        return

    if "data_handlers" not in plugins:
        plugins.append("data_handlers")
    needs_config = mixed or valid["type"] == "AUTO_SPLIT" or not completions_only
    if not needs_config:
        opts["training_data_path"] = ",".join(train_paths)
    else:
        seed = train.get("seed", 19851243) if mixed else valid.get("seed", 1289525893) \
            if valid["type"] == "AUTO_SPLIT" else 42
        datasets = []
        for i, p in enumerate(train_paths):
            spec: dict[str, Any] = {"name": f"training_data_{i}", "data_paths": [p]}
            if mixed:
                spec["sampling"] = weights[i] / sum(weights)
            if valid["type"] == "AUTO_SPLIT":
                ratio = float(valid.get("ratio", 0.2))
                spec["split"] = {"train": round(1 - ratio, 10), "validation": ratio}
            if not completions_only:  # Silogen's default: the loss on the whole conversation
                spec["data_handlers"] = [
                    {"name": "apply_tokenizer_chat_template",
                     "arguments": {"fn_kwargs": {"conversation_column_name": "messages",
                                                 "formatted_text_column_name": "text"}}},
                    {"name": "tokenize", "arguments": {"fn_kwargs": {"text_column_name": "text"},
                                                       "remove_columns": "all"}}]
            datasets.append(spec)
        files[DATA_CONFIG] = {
            "dataprocessor": {"type": "default", "sampling_stopping_strategy": "all_exhausted",
                              "seed": seed},
            "datasets": datasets}
        opts["data_config_path"] = DATA_CONFIG
    if valid_paths:
        if not completions_only:
            raise ctx.error("data_conf.validation_data", "separate validation files with "
                            "sft_args.train_on_completions_only: false are not supported "
                            "(fmtune masks validation chat data like training chat data only "
                            "per data_config); set train_on_completions_only: true or use "
                            "AUTO_SPLIT")
        opts["validation_data_path"] = ",".join(valid_paths)


def _training_args(ctx: _Ctx, conf: Any, kind: str, opts: dict, known: set[str],
                   plugins: list[str]) -> dict:
    ta = ctx.mapping(conf, "training_args")
    out: dict[str, Any] = {}
    for key, value in ta.items():
        path = f"training_args.{key}"
        if key in BATCH_DERIVED:
            raise ctx.error(path, "computed from batchsize_conf (as in Silogen); remove it and "
                            "set batchsize_conf")
        if key in DROPPED_TRAINING_ARGS:
            continue  # no effect on a transformers Trainer run (removed in transformers 5)
        if key == "logging_dir":
            continue  # checked with report_to below
        if kind == "dpo" and key in DPO_ARGS:
            target = DPO_ARGS[key]
            if target is None:
                raise ctx.error(path, "this TRL DPOConfig option is not offered by fmtune's dpo "
                                "plugin (it has beta, loss_type, loss_weights, label_smoothing, "
                                "precompute_ref_log_probs, max_length)")
            if key == "loss_type":
                value = _as_str_list(ctx, value, path)
            out[target] = value
            continue
        if key == "report_to":
            targets = [t for t in _as_str_list(ctx, value, path) if t != "none"]
            if "all" in targets:
                raise ctx.error(path, "'all' is not supported; name the integrations")
            if "mlflow" in targets:  # fmtune's mlflow plugin tracks instead of HF's callback
                targets.remove("mlflow")
                if "mlflow" not in plugins:
                    plugins.append("mlflow")
            if len(targets) > 1:
                raise ctx.error(path, f"fmtune passes one report_to integration; got {targets}")
            if targets:
                out["report_to"] = targets[0]
            continue
        if key not in known:
            raise ctx.error(path, f"not a TrainingArguments field of the installed transformers "
                            f"nor an fmtune option{suggest(key, known)}")
        out[key] = value
    logging_dir = ta.get("logging_dir")
    if logging_dir is not None and "tensorboard" in str(out.get("report_to", "")):
        raise ctx.error("training_args.logging_dir", "transformers 5 has no logging_dir; "
                        "tensorboard logs go under output_dir/runs")
    if kind == "dpo":
        for key, value in SILOGEN_DPO_DEFAULTS.items():
            out.setdefault(DPO_ARGS[key], value)
        if "max_prompt_length" in ta and ta["max_prompt_length"] is not None:
            raise ctx.error("training_args.max_prompt_length", "fmtune's dpo plugin keeps whole "
                            "prompts and cuts completions to fit max_length; remove it")
    out.setdefault("output_dir", DEFAULT_OUTPUT_DIR)
    return out


def _peft_quant(ctx: _Ctx, peft: Any, quant: Any, opts: dict, plugins: list[str]) -> None:
    p = ctx.mapping(peft, "peft_conf", PEFT_KEYS, required=("peft_type",))
    q = ctx.mapping(quant if quant is not None else {"quantization_type": "no-quantization"},
                    "quant_conf", QUANT_KEYS)
    ptype = p["peft_type"]
    qtype = q.get("quantization_type")
    if qtype not in ("no-quantization", "bits-and-bytes"):
        raise ctx.error("quant_conf.quantization_type", "must be no-quantization or "
                        f"bits-and-bytes; got {qtype!r}"
                        f"{suggest(str(qtype), ('no-quantization', 'bits-and-bytes'))}")
    quantized = qtype == "bits-and-bytes"
    if not quantized and len(q) > 1:
        extra = next(k for k in q if k != "quantization_type")
        raise ctx.error(f"quant_conf.{extra}", "only with quantization_type: bits-and-bytes")

    if ptype == "NO_PEFT":
        ctx.mapping(p, "peft_conf", ("peft_type",))
        if quantized:
            raise ctx.error("quant_conf.quantization_type", "a bits-and-bytes base needs an "
                            "adapter (peft_conf LORA or PRETRAINED_PEFT); fmtune does not train "
                            "a quantized model in full")
        return
    plugin = "qlora" if quantized else "lora"
    plugins.append(plugin)
    if ptype == "PRETRAINED_PEFT":
        ctx.mapping(p, "peft_conf", ("peft_type", "name_or_path"), required=("name_or_path",))
        opts["continue_from_adapter"] = str(p["name_or_path"])
    elif ptype == "LORA":
        ctx.mapping(p, "peft_conf", ("peft_type", "task_type", "peft_kwargs"))
        ctx.fixed(p.get("task_type", "CAUSAL_LM"), "peft_conf.task_type", "CAUSAL_LM",
                  "fmtune trains causal language models")
        kw = ctx.mapping(p.get("peft_kwargs"), "peft_conf.peft_kwargs",
                         tuple(LORA_KWARGS) + tuple(LORA_FIXED))
        for key, default in PEFT_LORA_DEFAULTS.items():
            opts[key] = default  # peft's defaults, which Silogen gets; fmtune's differ
        for key, value in kw.items():
            path = f"peft_conf.peft_kwargs.{key}"
            if key in LORA_FIXED:
                ctx.fixed(value, path, LORA_FIXED[key], "fmtune has no option for it; only "
                          f"peft's default {LORA_FIXED[key]!r} is accepted")
                continue
            if key == "init_lora_weights":
                value = str(value).lower() if isinstance(value, bool) else str(value)
            elif key in ("target_modules", "modules_to_save"):
                value = _as_str_list(ctx, value, path)
            opts[LORA_KWARGS[key]] = value
    else:
        raise ctx.error("peft_conf.peft_type", f"{ptype!r} is not supported: fmtune offers "
                        "LORA, PRETRAINED_PEFT and NO_PEFT here"
                        f"{suggest(str(ptype), ('LORA', 'PRETRAINED_PEFT', 'NO_PEFT'))}")

    if quantized:
        for key, default in QUANT_FIXED.items():
            if key in q:
                ctx.fixed(q[key], f"quant_conf.{key}", default, "fmtune's qlora plugin has no "
                          "option for it")
        four, eight = bool(q.get("load_in_4bit", False)), bool(q.get("load_in_8bit", False))
        if four == eight:
            raise ctx.error("quant_conf.load_in_4bit", "set exactly one of load_in_4bit and "
                            "load_in_8bit to true")
        if eight:
            opts["load_in_8bit"] = True
        else:  # BitsAndBytesConfig's defaults (Silogen's) where fmtune's differ
            opts["bnb_4bit_quant_type"] = q.get("bnb_4bit_quant_type", "fp4")
            opts["bnb_4bit_use_double_quant"] = bool(q.get("bnb_4bit_use_double_quant", False))
            dtype = q.get("bnb_4bit_compute_dtype") or "float32"
            if dtype not in DTYPES[1:]:
                raise ctx.error("quant_conf.bnb_4bit_compute_dtype", f"must be one of "
                                f"{', '.join(DTYPES[1:])}; got {dtype!r}")
            opts["bnb_4bit_compute_dtype"] = dtype


def _run(ctx: _Ctx, conf: Any, opts: dict) -> str:
    rc = ctx.mapping(conf, "run_conf", RUN_KEYS)
    opts["model_name_or_path"] = str(rc.get("model", "/local_resources/basemodel"))
    if rc.get("tokenizer") is not None:
        opts["tokenizer_name_or_path"] = str(rc["tokenizer"])
    ctx.fixed(rc.get("use_fast_tokenizer", True), "run_conf.use_fast_tokenizer", True,
              "fmtune loads fast tokenizers")
    resume = rc.get("resume_from_checkpoint", False)
    opts["resume_from_checkpoint"] = str(resume).lower() if isinstance(resume, bool) else resume
    det = rc.get("determinism", "no")
    if det not in ("no", "half", "full"):
        raise ctx.error("run_conf.determinism", f"must be no, half or full; got {det!r}")
    if det == "half":
        raise ctx.error("run_conf.determinism", "'half' (prefer deterministic kernels, warn "
                        "otherwise) is not offered; use 'full' (full_determinism) or 'no'")
    if det == "full":
        opts["full_determinism"] = True
    ma = ctx.mapping(rc.get("model_args"), "run_conf.model_args")
    for key, value in ma.items():
        path = f"run_conf.model_args.{key}"
        if key in ("dtype", "torch_dtype"):
            value = str(value).removeprefix("torch.")
            if value not in DTYPES:
                raise ctx.error(path, f"must be one of {', '.join(DTYPES)}; got {value!r}")
            opts["torch_dtype"] = value
        elif key in ("attn_implementation", "use_cache", "trust_remote_code"):
            opts[key] = value
        elif key == "device_map":
            if value not in (None, "auto"):
                raise ctx.error(path, f"{value!r} is not supported: fmtune places the model "
                                "itself (one device per process)")
        elif key in MODEL_ARG_DEFAULTS:
            ctx.fixed(value, path, MODEL_ARG_DEFAULTS[key], "fmtune does not pass this "
                      "from_pretrained argument")
        else:
            known = (*MODEL_ARG_DEFAULTS, "dtype", "torch_dtype", "attn_implementation",
                     "use_cache", "trust_remote_code")
            raise ctx.error(path, f"fmtune does not pass this from_pretrained argument"
                            f"{suggest(key, known)}")
    return str(rc.get("final_checkpoint_name", "checkpoint-final"))


def _tracking(ctx: _Ctx, conf: Any, opts: dict, plugins: list[str]) -> None:
    if conf is None:
        return
    t = ctx.mapping(conf, "tracking", TRACKING_KEYS, required=("mlflow_server_uri",
                                                               "experiment_name"))
    _check_artifacts(ctx, t.get("hf_mlflow_log_artifacts", "False"),
                     "tracking.hf_mlflow_log_artifacts")
    opts["mlflow_tracking_uri"] = str(t["mlflow_server_uri"])
    opts["mlflow_experiment"] = str(t["experiment_name"])
    if "mlflow" not in plugins:
        plugins.append("mlflow")


def _check_artifacts(ctx: _Ctx, value: Any, path: str) -> None:
    try:
        on = parse_bool(value)
    except ValueError:
        raise ctx.error(path, f"must be True or False, got {value!r}") from None
    if on:
        raise ctx.error(path, "fmtune's mlflow plugin logs params and metrics, not model "
                        "artifacts; set it to False (the model is saved under output_dir)")


# ----------------------------------------------------------------------- public


def plan(data: dict[str, Any], kind: str, where: str) -> Plan:
    """Silogen's nested config -> :class:`Plan` (see :func:`translate`)."""
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown kind {kind!r}; one of {', '.join(KINDS)}")
    ctx = _Ctx(where)
    top = ctx.mapping(data, "", TOP_KEYS + KIND_KEYS[kind],
                      required=("data_conf", "training_args", "batchsize_conf", "peft_conf",
                                "run_conf"))
    if "method" in top and top["method"] != kind:
        raise ctx.error("method", f"{top['method']!r} does not match the command "
                        f"'fmtune {kind}'")
    opts: dict[str, Any] = {}
    plugins: list[str] = []
    files: dict[str, Any] = {}

    final_name = _run(ctx, top["run_conf"], opts)

    completions_only = True
    if kind == "sft":
        sft = ctx.mapping(top.get("sft_args"), "sft_args", SFT_KEYS)
        opts["max_seq_length"] = int(sft.get("max_seq_length", 2048))
        handling = sft.get("length_handling", "filter")
        if handling not in ("filter", "truncate"):
            raise ctx.error("sft_args.length_handling", f"must be filter or truncate; got "
                            f"{handling!r}")
        if handling == "filter" and "length_handling" in sft:
            raise ctx.error("sft_args.length_handling", "fmtune truncates long examples "
                            "(and counts them in its log); it cannot drop them; set truncate")
        ctx.fixed(sft.get("save_name_if_new_basemodel", "checkpoint-new-basemodel"),
                  "sft_args.save_name_if_new_basemodel", "checkpoint-new-basemodel",
                  "fmtune saves new-token embeddings with the adapter, not a new base model")
        completions_only = bool(sft.get("train_on_completions_only", False))
    else:
        plugins.append("dpo")

    _data(ctx, top["data_conf"], kind, completions_only, opts, plugins, files)

    bs = ctx.mapping(top["batchsize_conf"], "batchsize_conf", BATCH_KEYS,
                     required=("total_train_batch_size", "max_per_device_train_batch_size"))
    for key in BATCH_KEYS:
        if bs.get(key) is not None:
            opts[key] = bs[key]

    ta = _training_args(ctx, top["training_args"], kind, opts, _training_option_names(),
                        plugins)
    ov = ctx.mapping(top.get("overrides"), "overrides", OVERRIDE_KEYS)
    mult = ov.get("lr_multiplier", 1.0)
    scaling = ov.get("lr_batch_size_scaling", "none")
    if scaling not in ("none", "sqrt", "linear"):
        raise ctx.error("overrides.lr_batch_size_scaling", f"must be none, sqrt or linear; got "
                        f"{scaling!r}")
    if mult != 1.0 or scaling != "none":
        lr = float(ta.get("learning_rate", 5e-05)) * float(mult)
        total = float(bs["total_train_batch_size"])
        lr *= math.sqrt(total) if scaling == "sqrt" else total if scaling == "linear" else 1.0
        ta["learning_rate"] = lr
    opts.update(ta)
    opts["save_model_dir"] = f"{str(opts['output_dir']).rstrip('/')}/{final_name}"

    _peft_quant(ctx, top["peft_conf"], top.get("quant_conf"), opts, plugins)
    _tracking(ctx, top.get("tracking"), opts, plugins)
    return Plan(opts, plugins, files)


def translate(data: dict[str, Any], kind: str, where: str) -> tuple[dict[str, Any], list[str]]:
    """Silogen's nested config (``kind`` sft or dpo; ``where`` names the file in errors)
    -> (flat fmtune options as a fmtune YAML would have them, plugin names to activate).

    Generated files are named by their bare names (:data:`DATA_CONFIG`, :data:`DPO_TRAIN`,
    :data:`DPO_VALID`); :func:`plan` says how to write them."""
    p = plan(data, kind, where)
    return p.options, p.plugins


def write_preferences(sources: list[str], out: str | os.PathLike, where: str) -> None:
    """Silogen's preference JSONL (``prompt_messages``/``chosen_messages``/
    ``rejected_messages``) -> fmtune dpo's ``prompt``/``chosen``/``rejected`` JSONL."""
    from .default_plugins.data import read_records, record_where

    rows = []
    for src in sources:  # errors name the file and the line or record, as for any data file
        for i, rec in enumerate(read_records(src)):
            row = {}
            for old, new in PREFERENCE_FIELDS:
                msgs = rec.get(old)
                if not isinstance(msgs, list):
                    raise ConfigError(f"{record_where(src, rec, i)}: missing field {old!r} (a "
                                      "list of chat messages)")
                row[new] = [{"role": m.get("role"), "content": m.get("content")}
                            if isinstance(m, dict) else m for m in msgs]
            rows.append(row)
    with open(out, "w", encoding="utf-8") as fo:
        fo.writelines(json.dumps(row) + "\n" for row in rows)


def materialize(p: Plan, folder: str | os.PathLike, where: str) -> dict[str, Any]:
    """Write ``p.files`` into ``folder``; the options with those files' real paths."""
    opts = dict(p.options)
    for name, content in p.files.items():
        target = Path(folder) / name
        if isinstance(content, tuple) and content[0] == "preferences":
            write_preferences(content[1], target, where)
        else:
            target.write_text(yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
        for key, value in opts.items():
            if value == name:
                opts[key] = str(target)
    return opts


def to_yaml(options: dict[str, Any], plugins: list[str]) -> str:
    return yaml.safe_dump({"plugins": ",".join(plugins), **options}, sort_keys=False,
                          allow_unicode=True, width=1000)


def print_config(p: Plan, out=None) -> None:
    """The equivalent ``fmtune train --config`` YAML, then each file it needs."""
    out = out or sys.stdout
    print("# fmtune train --config THIS_FILE.yaml", file=out)
    print(to_yaml(p.options, p.plugins), end="", file=out)
    for name, content in p.files.items():
        print("---", file=out)
        if isinstance(content, tuple):
            print(f"# {name}: the records of {', '.join(content[1])} with prompt_messages, "
                  "chosen_messages, rejected_messages renamed to prompt, chosen, rejected "
                  "(fmtune dpo's fields)", file=out)
        else:
            print(f"# save as {name}", file=out)
            print(yaml.safe_dump(content, sort_keys=False), end="", file=out)


def build_parser(kind: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=f"fmtune {kind}", description=f"Run a Silogen finetuning {kind.upper()} experiment "
        "config with fmtune (see docs/silogen.md).")
    ap.add_argument("config", help="Path to the experiment's YAML config file.")
    ap.add_argument("--logging-level", default="INFO")
    ap.add_argument("--num-preprocess-workers", type=int, default=4,
                    help="Accepted for compatibility: fmtune preprocesses in its own process.")
    ap.add_argument("--mlflow-server-uri", default=None,
                    help="MLflow server URI (or a local file: path); overrides tracking.")
    ap.add_argument("--experiment-name", default=None,
                    help="MLflow experiment name; overrides tracking.experiment_name.")
    ap.add_argument("--hf-mlflow-log-artifacts", default=None,
                    help="Only False is supported (fmtune does not log model artifacts).")
    ap.add_argument("--print-config", action="store_true",
                    help="Print the equivalent `fmtune train` YAML (and data_config) and exit.")
    return ap


def cmd(kind: str, argv: list[str]) -> int:
    """``fmtune sft|dpo CONFIG.yaml [Silogen's flags] [--print-config]``."""
    args = build_parser(kind).parse_args(argv)
    level = logging.getLevelName(str(args.logging_level).upper())
    if not isinstance(level, int):
        raise ConfigError(f"--logging-level: unknown level {args.logging_level!r}")
    logging.getLogger().setLevel(level)
    ctx = _Ctx("command line")
    data = read_yaml(args.config)
    p = plan(data, kind, args.config)
    # Silogen: the command line's tracking flags win over the file's tracking section
    if args.hf_mlflow_log_artifacts is not None:
        _check_artifacts(ctx, args.hf_mlflow_log_artifacts, "--hf-mlflow-log-artifacts")
    if args.mlflow_server_uri is not None:
        p.options["mlflow_tracking_uri"] = args.mlflow_server_uri
        p.options["mlflow_experiment"] = args.experiment_name or "default"
        if "mlflow" not in p.plugins:
            p.plugins.append("mlflow")
    elif args.experiment_name is not None and "mlflow" in p.plugins:
        p.options["mlflow_experiment"] = args.experiment_name
    elif "mlflow" not in p.plugins and os.environ.get("MLFLOW_TRACKING_URI"):
        p.plugins.append("mlflow")  # Silogen tracks to $MLFLOW_TRACKING_URI when it is set
    if args.num_preprocess_workers != 4:
        log.info("--num-preprocess-workers %d: fmtune preprocesses in its own process; "
                 "the value changes nothing", args.num_preprocess_workers)
    if args.print_config:
        print_config(p)
        return 0
    if kind == "sft" and "length_handling" not in (data.get("sft_args") or {}):
        log.info("%s: sft_args.length_handling defaults to filter in Silogen; fmtune truncates "
                 "examples longer than max_seq_length instead (counted in the log)", args.config)
    from .cli import cmd_train

    with tempfile.TemporaryDirectory(prefix="fmtune-silogen-") as tmp:
        opts = materialize(p, tmp, args.config)
        config_path = Path(tmp) / "fmtune_train.yaml"
        config_path.write_text(to_yaml(opts, p.plugins), encoding="utf-8")
        log.info("%s: Silogen %s config translated to fmtune train options (plugins: %s); "
                 "--print-config shows them", args.config, kind, ",".join(p.plugins) or "none")
        return cmd_train(["--config", str(config_path), "--plugins", ",".join(p.plugins)])
