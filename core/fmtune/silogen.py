"""Run Silogen ``finetuning`` experiment configs with fmtune.

    fmtune sft CONFIG.yaml [--logging-level L] [--num-preprocess-workers N]
               [--mlflow-server-uri U] [--experiment-name E] [--hf-mlflow-log-artifacts B]
               [--print-config]
    fmtune dpo CONFIG.yaml [...the same flags]
    fmtune generate CONFIG.yaml OUTPUT.yaml      (Silogen's ``generate`` entry point)

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
them to a temporary folder. No torch here (until a run starts).

A Silogen generation config (``model_conf``, ``prompt_conf``, ``hf_gen_params``,
``quant_conf``) is checked by :func:`plan_generate` and run by :func:`cmd_generate`, which
writes Silogen's output YAML (:data:`GEN_OUTPUT_KEYS`). The key-by-key tables of
docs/silogen.md are rendered from this module's tables by :func:`doc_tables`.
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

from .config import CommandParser, ConfigError, OptionRegistry, parse_bool, read_yaml, suggest

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
TRAIN_INPUT_TYPES = ("CONCATENATION", "PRECOMPUTE_WEIGHTED_MIX")
VALID_INPUT_TYPES = ("CONCATENATION", "AUTO_SPLIT", "NONE")
# data_conf keys accepted only at Silogen's default: key -> (default, why fmtune refuses others)
DATA_CONF_FIXED = {"padding_side": ("right", "fmtune pads on the right for training"),
                   "missing_pad_token_strategy": ("bos-repurpose", "fmtune chooses the pad token "
                                                  "itself; remove the key")}
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
# ModelArguments fmtune honours -> the fmtune option each becomes
MODEL_ARG_OPTIONS = {"dtype": "torch_dtype", "torch_dtype": "torch_dtype",
                     "attn_implementation": "attn_implementation", "use_cache": "use_cache",
                     "trust_remote_code": "trust_remote_code"}
DTYPES = ("auto", "float32", "bfloat16", "float16")
PEFT_KEYS = ("peft_type", "task_type", "peft_kwargs", "name_or_path")
PEFT_TYPES = ("NO_PEFT", "LORA", "PRETRAINED_PEFT")
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
    """Errors name ``where`` (the user's file) and a dotted key; ``registry`` (fmtune's options,
    or None) checks each translated value's type where it is translated (:meth:`option`)."""

    def __init__(self, where: str, registry: OptionRegistry | None = None) -> None:
        self.where, self.registry = where, registry

    def error(self, path: str, why: str) -> ConfigError:
        return ConfigError(f"{self.where}: {path}: {why}")

    def option(self, name: str, value: Any, path: str) -> Any:
        """``value`` (from the Silogen key ``path``) checked as the fmtune option ``name``:
        a wrong type or choice is an error naming the user's file and ``path``, not the
        translated YAML. Returns the value converted to the option's type."""
        opt = self.registry.resolve(name) if self.registry is not None else None
        if opt is None:
            return value
        try:
            return opt.convert(value, "")
        except ConfigError as e:
            why = str(e).removeprefix(": ").removeprefix(f"{opt.name} ")
            if opt.name != path.rsplit(".", 1)[-1]:
                why += f" (fmtune option {opt.name})"
            raise self.error(path, why) from None

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


# the plugins a Silogen config of each kind may activate (see plan)
KIND_PLUGINS = {"sft": ("data_handlers", "lora", "qlora", "mlflow"),
                "dpo": ("dpo", "lora", "qlora", "mlflow")}


def option_registry(kind: str) -> OptionRegistry:
    """fmtune's options (core, and those of the installed plugins a ``kind`` config may
    activate: :data:`KIND_PLUGINS`) to check translated values against; no torch. A plugin that
    is missing or does not load is left out here (the run reports it)."""
    from . import plugins as plugin_mod

    def build(names: list[str]) -> OptionRegistry:
        from .cli import registry_for  # core (trylast) first, as fmtune train

        return registry_for(plugin_mod.load(names))

    available = plugin_mod.installed()
    try:
        return build([n for n in KIND_PLUGINS.get(kind, ()) if n in available])
    except ConfigError:  # a broken plugin: fmtune train says so when the run starts
        return build([])


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
    train = _data_input(ctx, dc["training_data"], "data_conf.training_data", TRAIN_INPUT_TYPES)
    valid = _data_input(ctx, dc["validation_data"], "data_conf.validation_data",
                        VALID_INPUT_TYPES)
    for key, (default, why) in DATA_CONF_FIXED.items():
        ctx.fixed(dc.get(key, default), f"data_conf.{key}", default, why)
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
                offered = ", ".join(k for k, v in DPO_ARGS.items() if v)
                raise ctx.error(path, "this TRL DPOConfig option is not offered by fmtune's dpo "
                                f"plugin (it has {offered})")
            if key == "loss_type":
                value = _as_str_list(ctx, value, path)
            ctx.option(target, value, path)
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
        ctx.option(key, value, path)
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
            ctx.option(LORA_KWARGS[key], value, path)
            opts[LORA_KWARGS[key]] = value
    else:
        raise ctx.error("peft_conf.peft_type", f"{ptype!r} is not supported: fmtune offers "
                        f"{', '.join(PEFT_TYPES)} here{suggest(str(ptype), PEFT_TYPES)}")

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
            opts["bnb_4bit_quant_type"] = ctx.option(
                "bnb_4bit_quant_type", q.get("bnb_4bit_quant_type", "fp4"),
                "quant_conf.bnb_4bit_quant_type")
            opts["bnb_4bit_use_double_quant"] = bool(ctx.option(
                "bnb_4bit_use_double_quant", q.get("bnb_4bit_use_double_quant", False),
                "quant_conf.bnb_4bit_use_double_quant"))
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
    ctx.option("resume_from_checkpoint", opts["resume_from_checkpoint"],
               "run_conf.resume_from_checkpoint")
    det = rc.get("determinism", "no")
    if det not in ("no", "half", "full"):
        raise ctx.error("run_conf.determinism", f"must be no, half or full; got {det!r}")
    if det == "half":
        raise ctx.error("run_conf.determinism", "'half' (prefer deterministic kernels, warn "
                        "otherwise) is not offered; use 'full' (full_determinism) or 'no'")
    if det == "full":
        opts["full_determinism"] = True
    _model_args(ctx, rc.get("model_args"), "run_conf.model_args", opts)
    return str(rc.get("final_checkpoint_name", "checkpoint-final"))


def _model_args(ctx: _Ctx, conf: Any, path: str, opts: dict, generate: bool = False) -> None:
    """Silogen's ``ModelArguments`` (from_pretrained kwargs) -> fmtune options
    (:data:`MODEL_ARG_OPTIONS`); for ``generate`` a ``device_map`` is kept as given."""
    ma = ctx.mapping(conf, path)
    for key, value in ma.items():
        kpath = f"{path}.{key}"
        if key in ("dtype", "torch_dtype"):
            value = str(value).removeprefix("torch.")
            if value not in DTYPES:
                raise ctx.error(kpath, f"must be one of {', '.join(DTYPES)}; got {value!r}")
            opts[MODEL_ARG_OPTIONS[key]] = value
        elif key in MODEL_ARG_OPTIONS:
            ctx.option(MODEL_ARG_OPTIONS[key], value, kpath)
            opts[MODEL_ARG_OPTIONS[key]] = value
        elif key == "device_map":
            if generate:
                opts["device_map"] = value
            elif value not in (None, "auto"):
                raise ctx.error(kpath, f"{value!r} is not supported: fmtune places the model "
                                "itself (one device per process)")
        elif key in MODEL_ARG_DEFAULTS:
            ctx.fixed(value, kpath, MODEL_ARG_DEFAULTS[key], "fmtune does not pass this "
                      "from_pretrained argument")
        else:
            raise ctx.error(kpath, f"fmtune does not pass this from_pretrained argument"
                            f"{suggest(key, (*MODEL_ARG_DEFAULTS, *MODEL_ARG_OPTIONS))}")


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
    ctx = _Ctx(where, option_registry(kind))
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
        opts["max_seq_length"] = ctx.option("max_seq_length", sft.get("max_seq_length", 2048),
                                            "sft_args.max_seq_length")
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
            opts[key] = ctx.option(key, bs[key], f"batchsize_conf.{key}")

    ta = _training_args(ctx, top["training_args"], kind, opts, _training_option_names(),
                        plugins)
    ov = ctx.mapping(top.get("overrides"), "overrides", OVERRIDE_KEYS)
    mult = ov.get("lr_multiplier", 1.0)
    scaling = ov.get("lr_batch_size_scaling", "none")
    if scaling not in ("none", "sqrt", "linear"):
        raise ctx.error("overrides.lr_batch_size_scaling", f"must be none, sqrt or linear; got "
                        f"{scaling!r}")
    try:
        if isinstance(mult, bool):
            raise ValueError
        mult = float(mult)
    except (TypeError, ValueError):
        raise ctx.error("overrides.lr_multiplier", f"must be a number, got {mult!r}") from None
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
    from .records import read_records, record_where

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
    ap = CommandParser(  # a usage error is one "fmtune: error:" line, exit 2
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


# ------------------------------------------------------------------- generate
# Silogen's `generate CONFIG.yaml OUTPUT.yaml` (finetuning.generate, config
# finetuning.config.generation.GenerationConfig): greedy or sampled generation from a model (and
# an adapter) for an open prompt or for the prompt_messages of evaluation records, written as a
# YAML list of {dataset, id, prompt, answer, correct_answers, ...}.

GEN_TOP_KEYS = ("model_conf", "prompt_conf", "hf_gen_params", "quant_conf")
GEN_MODEL_KEYS = ("model", "model_args", "adapter", "tokenizer")
GEN_PROMPT_KEYS = {"open-input": ("type", "input", "num_samples"),
                   "eval-data": ("type", "data")}
GEN_DATA_KEYS = ("path",)
# the hf_gen_params Silogen fills in when unset (eos/pad/bos come from the tokenizer)
GEN_DEFAULTS = {"max_length": 2048, "max_new_tokens": 512}
GEN_TOKEN_DEFAULTS = ("eos_token_id", "pad_token_id", "bos_token_id")
# BitsAndBytesConfig fields Silogen's bits-and-bytes quant_conf has (generate passes them as is)
GEN_QUANT_KEYS = QUANT_KEYS
# every output record's keys, in Silogen's order
GEN_OUTPUT_KEYS = ("dataset", "id", "prompt", "answer", "correct_answers", "test_type",
                   "data_collection", "truncated", "all_text_raw", "gen_params")
OPEN_PROMPT_DATASET = "_open_prompt_data_"


@dataclass
class GenPlan:
    """What a Silogen generation config becomes (checked, nothing loaded)."""

    model: str
    adapter: str | None
    tokenizer: str
    tokenizer_given: bool
    load: dict[str, Any]  # from_pretrained kwargs (dtype, attn_implementation, device_map, ...)
    trust_remote_code: bool
    prompt: dict[str, Any]  # {"type": "open-input", "input", "num_samples"} or eval-data "path"
    hf_gen_params: dict[str, Any]
    quant: dict[str, Any] | None  # BitsAndBytesConfig kwargs
    record: dict[str, Any]  # model_conf / quant_conf as Silogen writes them into gen_params


def generation_field_names() -> set[str]:
    """The fields of the installed transformers' ``GenerationConfig``."""
    from transformers import GenerationConfig

    return set(GenerationConfig().to_dict()) - {"transformers_version", "_from_model_config"}


def plan_generate(data: dict[str, Any], where: str,
                  gen_fields: set[str] | None = None) -> GenPlan:
    """Silogen's ``GenerationConfig`` YAML -> :class:`GenPlan`; errors name ``where`` and the
    dotted key. ``gen_fields``: the GenerationConfig field names (None: not checked here)."""
    ctx = _Ctx(where)
    top = ctx.mapping(data, "", GEN_TOP_KEYS, required=("model_conf", "prompt_conf"))
    mc = ctx.mapping(top["model_conf"], "model_conf", GEN_MODEL_KEYS, required=("model",))
    for key in ("model", "adapter", "tokenizer"):
        value = mc.get(key)
        if not (isinstance(value, str) and value) and (key == "model" or value is not None):
            raise ctx.error(f"model_conf.{key}", f"must be a model id or path, got {value!r}")
    opts: dict[str, Any] = {}
    _model_args(ctx, mc.get("model_args"), "model_conf.model_args", opts, generate=True)
    load: dict[str, Any] = {}
    if opts.get("torch_dtype", "auto") != "auto":
        load["dtype"] = opts["torch_dtype"]
    for key in ("attn_implementation", "use_cache"):
        if opts.get(key) is not None:
            load[key] = opts[key]
    load["device_map"] = opts.get("device_map") or "auto"  # Silogen's default (one process)
    trust = opts.get("trust_remote_code", False)
    if not isinstance(trust, bool):
        raise ctx.error("model_conf.model_args.trust_remote_code", f"must be true or false, "
                        f"got {trust!r}")
    adapter = mc.get("adapter")
    tokenizer = mc.get("tokenizer") or adapter or mc["model"]

    pc = ctx.mapping(top["prompt_conf"], "prompt_conf", required=("type",))
    ptype = pc["type"]
    if ptype not in GEN_PROMPT_KEYS:
        raise ctx.error("prompt_conf.type", f"must be one of {', '.join(GEN_PROMPT_KEYS)}; got "
                        f"{ptype!r}{suggest(str(ptype), GEN_PROMPT_KEYS)}")
    ctx.mapping(pc, "prompt_conf", GEN_PROMPT_KEYS[ptype])
    if ptype == "open-input":
        text, num = pc.get("input", ""), pc.get("num_samples", 1)
        if not isinstance(text, str):
            raise ctx.error("prompt_conf.input", f"must be a string, got {text!r}")
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ctx.error("prompt_conf.num_samples", f"must be a positive integer, got {num!r}")
        prompt = {"type": ptype, "input": text, "num_samples": num}
    else:
        dd = ctx.mapping(pc.get("data"), "prompt_conf.data", GEN_DATA_KEYS, required=("path",))
        prompt = {"type": ptype, "path": str(dd["path"])}

    gp = ctx.mapping(top.get("hf_gen_params"), "hf_gen_params")
    for key, value in gp.items():
        if gen_fields is not None and key not in gen_fields:
            raise ctx.error(f"hf_gen_params.{key}", "not a GenerationConfig field of the "
                            f"installed transformers{suggest(str(key), gen_fields)}")
    for key in GEN_DEFAULTS:
        value = gp.get(key, GEN_DEFAULTS[key])
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ctx.error(f"hf_gen_params.{key}", f"must be a positive integer, got {value!r} "
                            "(Silogen cuts prompts to max_length - max_new_tokens tokens)")
    if gp.get("max_length", 2048) <= gp.get("max_new_tokens", 512):
        raise ctx.error("hf_gen_params.max_length", "must be larger than max_new_tokens (Silogen "
                        "cuts prompts to max_length - max_new_tokens tokens)")
    if gen_fields is not None:  # transformers is imported: its own checks, before any load
        check_generation_params({**GEN_DEFAULTS, **gp}, ctx)

    quant = None
    q = ctx.mapping(top.get("quant_conf") if top.get("quant_conf") is not None else
                    {"quantization_type": "no-quantization"}, "quant_conf", GEN_QUANT_KEYS)
    # Silogen's quant_conf is a union of two models whose quantization_type has a default: keys
    # without it select bits-and-bytes (the only model that has them)
    qtype = q.get("quantization_type", "bits-and-bytes" if q else "no-quantization")
    if qtype not in ("no-quantization", "bits-and-bytes"):
        raise ctx.error("quant_conf.quantization_type", "must be no-quantization or "
                        f"bits-and-bytes; got {qtype!r}"
                        f"{suggest(str(qtype), ('no-quantization', 'bits-and-bytes'))}")
    if qtype == "no-quantization" and len(q) > 1:
        extra = next(k for k in q if k != "quantization_type")
        raise ctx.error(f"quant_conf.{extra}", "only with quantization_type: bits-and-bytes")
    if qtype == "bits-and-bytes":
        if bool(q.get("load_in_4bit", False)) == bool(q.get("load_in_8bit", False)):
            raise ctx.error("quant_conf.load_in_4bit", "set exactly one of load_in_4bit and "
                            "load_in_8bit to true")
        dtype = q.get("bnb_4bit_compute_dtype")
        if dtype is not None and dtype not in DTYPES[1:]:
            raise ctx.error("quant_conf.bnb_4bit_compute_dtype", f"must be one of "
                            f"{', '.join(DTYPES[1:])}; got {dtype!r}")
        quant = {k: v for k, v in q.items() if k != "quantization_type"}

    # what Silogen writes under gen_params: the keys the file set, and the resolved tokenizer
    model_rec = dict(mc, tokenizer=tokenizer)
    if isinstance(mc.get("model_args"), dict):
        margs = {("dtype" if k == "torch_dtype" else k): v for k, v in mc["model_args"].items()}
        margs.setdefault("device_map", "auto")
        model_rec["model_args"] = margs
    return GenPlan(model=str(mc["model"]), adapter=adapter, tokenizer=tokenizer,
                   tokenizer_given=mc.get("tokenizer") is not None, load=load,
                   trust_remote_code=trust, prompt=prompt, hf_gen_params=dict(gp), quant=quant,
                   record={"quant_conf": dict(top.get("quant_conf") or {}),
                           "model_conf": model_rec})


# GenerationConfig fields generate() hands to a logits processor or warper that checks its value
# when it is built (transformers.generation.utils._get_logits_processor): field -> (sampling
# only, when generate builds it, how). Sampling ones are checked when the file sets do_sample:
# true (greedy generation never builds them, so Silogen runs e.g. temperature: 0 greedily)
_GEN_PROCESSORS: dict[str, tuple[bool, Any, Any]] = {
    "temperature": (True, lambda v: v != 1.0, lambda lp, v: lp.TemperatureLogitsWarper(v)),
    "top_h": (True, lambda v: True, lambda lp, v: lp.TopHLogitsWarper(top_h=v)),
    "top_k": (True, lambda v: v != 0, lambda lp, v: lp.TopKLogitsWarper(top_k=v)),
    "top_p": (True, lambda v: v < 1.0, lambda lp, v: lp.TopPLogitsWarper(top_p=v)),
    "min_p": (True, lambda v: True, lambda lp, v: lp.MinPLogitsWarper(min_p=v)),
    "typical_p": (True, lambda v: v < 1.0, lambda lp, v: lp.TypicalLogitsWarper(mass=v)),
    "epsilon_cutoff": (True, lambda v: 0.0 < v < 1.0, lambda lp, v: lp.EpsilonLogitsWarper(v)),
    "repetition_penalty": (False, lambda v: v != 1.0,
                           lambda lp, v: lp.RepetitionPenaltyLogitsProcessor(penalty=v)),
    "no_repeat_ngram_size": (False, lambda v: v > 0,
                             lambda lp, v: lp.NoRepeatNGramLogitsProcessor(v)),
}


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return ": ".join(lines[:2]) if lines and lines[0].endswith(":") else \
        (lines[0] if lines else type(e).__name__)


def check_generation_params(params: dict[str, Any], ctx: "_Ctx | str") -> None:
    """What transformers would refuse in ``hf_gen_params`` (only when generating, with a
    traceback) refused now, before anything is loaded, in one line naming the file:
    ``GenerationConfig(**params)`` and its ``validate()`` (errors; its warnings stay
    warnings, as in Silogen), then the values generate() hands to logits processors that check
    them (:data:`_GEN_PROCESSORS`). ``ctx``: the file's name (or its :class:`_Ctx`)."""
    from transformers import GenerationConfig
    from transformers.generation import logits_process as lp

    ctx = _Ctx(ctx) if isinstance(ctx, str) else ctx
    try:
        GenerationConfig(**params).validate()
    except (ValueError, TypeError) as e:
        raise ctx.error("hf_gen_params", _first_line(e)) from None
    for key, (sampling, used, build) in _GEN_PROCESSORS.items():
        value = params.get(key)
        if value is None or (sampling and params.get("do_sample") is not True):
            continue
        try:
            if used(value):
                build(lp, value)
        except ValueError as e:
            raise ctx.error(f"hf_gen_params.{key}", _first_line(e)) from None
        except TypeError:  # a comparison with a string, say
            raise ctx.error(f"hf_gen_params.{key}", f"must be a number, got {value!r}") from None


def _eval_prompts(path: str) -> list[dict[str, Any]]:
    """Silogen's evaluation records: ``prompt_messages`` (chat messages) and ``response`` (the
    reference answer); ``dataset`` and ``id`` optional. Errors name the file and the line."""
    from .records import read_records, record_where

    out = []
    for i, rec in enumerate(read_records(path)):
        at = record_where(path, rec, i)
        msgs = rec.get("prompt_messages")
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in msgs):
            raise ConfigError(f"{at}: field 'prompt_messages' must be a non-empty list of "
                              "{role, content} chat messages")
        if not isinstance(rec.get("response"), str):
            raise ConfigError(f"{at}: missing field 'response' (a string: the reference answer "
                              "written to correct_answers)")
        out.append({"messages": [{"role": m["role"], "content": m["content"]} for m in msgs],
                    "response": rec["response"], "dataset": rec.get("dataset", "unknown"),
                    "id": rec.get("id", i)})
    return out


def _load_generation_model(p: GenPlan, tokenizer: Any, where: str):
    import contextlib

    from transformers import AutoModelForCausalLM

    from .models import fit_to_tokenizer
    from .hub import from_pretrained, quant_method, without_unused_gptqmodel

    kwargs = dict(p.load)
    if p.quant is not None:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"{where}: quant_conf.quantization_type: bits-and-bytes needs the "
                              "bitsandbytes package (pip install bitsandbytes)")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(**p.quant)
    base, adapter = p.model, p.adapter
    if adapter is None:  # model_conf.model is an adapter folder: its base, then the adapter
        from .files import read_json_object

        named = (read_json_object(os.path.join(p.model, "adapter_config.json")) or {}).get(
            "base_model_name_or_path")
        if named:
            base, adapter = named, p.model
    with contextlib.redirect_stdout(sys.stderr):  # loaders' banners stay off stdout
        model = from_pretrained(AutoModelForCausalLM.from_pretrained, base, "model",
                                trust_remote_code=p.trust_remote_code, **kwargs)
        if adapter is not None:
            from peft import PeftModel

            fit_to_tokenizer(model, tokenizer)  # an adapter trained with added tokens
            try:
                with without_unused_gptqmodel(quant_method(model)):
                    model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
            except (OSError, ValueError, RuntimeError, IndexError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(f"{where}: model_conf.adapter: {adapter} cannot be loaded "
                                  f"over {base}: {first}") from None
    model.eval()
    return model


def _load_generation_tokenizer(p: GenPlan):
    from transformers import AutoTokenizer

    from .hub import from_pretrained

    source = p.tokenizer
    if (p.adapter is not None and not p.tokenizer_given and os.path.isdir(p.adapter)
            and not os.path.isfile(os.path.join(p.adapter, "tokenizer_config.json"))):
        log.info("model_conf.adapter %s has no tokenizer: using the model's (%s)", p.adapter,
                 p.model)
        source = p.model
    # as Silogen: no EOS appended to prompts, whatever the tokenizer was saved with
    return from_pretrained(AutoTokenizer.from_pretrained, source, "tokenizer",
                           trust_remote_code=p.trust_remote_code, add_eos_token=False)


def generation_defaults(hf_gen_params: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """Silogen's defaults for unset ``hf_gen_params``: stop at the tokenizer's EOS and at
    ``</s>`` (when the vocabulary has it), pad/bos from the tokenizer, max_length 2048,
    max_new_tokens 512."""
    eos = [tokenizer.eos_token_id]
    if "</s>" in tokenizer.get_vocab():
        eos.append(tokenizer.convert_tokens_to_ids("</s>"))
    eos = list(dict.fromkeys(i for i in eos if i is not None))
    defaults = {"eos_token_id": eos or None, "pad_token_id": tokenizer.pad_token_id,
                "bos_token_id": tokenizer.bos_token_id, **GEN_DEFAULTS}
    out = dict(hf_gen_params)
    for key, value in defaults.items():
        out.setdefault(key, value)
    return out


def run_generation(p: GenPlan, where: str) -> list[dict[str, Any]]:
    """Load, generate and return Silogen's output records (see :data:`GEN_OUTPUT_KEYS`)."""
    import torch
    from transformers import GenerationConfig

    examples = (_eval_prompts(p.prompt["path"]) if p.prompt["type"] == "eval-data" else
                [{"text": p.prompt["input"], "response": "", "dataset": OPEN_PROMPT_DATASET,
                  "id": str(i)} for i in range(p.prompt["num_samples"])])
    tokenizer = _load_generation_tokenizer(p)
    params = generation_defaults(p.hf_gen_params, tokenizer)
    try:
        gen_conf = GenerationConfig(**params)
        # max_new_tokens wins over max_length (used here for the prompt budget only); leaving
        # max_length out spares transformers' warning about both being set on every prompt
        run_conf = GenerationConfig(**{k: v for k, v in params.items() if k != "max_length"})
    except ValueError as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"{where}: hf_gen_params: {first}") from None
    if p.prompt["type"] == "eval-data":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"{where}: prompt_conf.type: eval-data renders prompt_messages "
                              f"with the tokenizer's chat template; the tokenizer of "
                              f"{p.tokenizer} has none (set model_conf.tokenizer)")
        for ex in examples:
            ex["text"] = tokenizer.apply_chat_template(ex.pop("messages"), tokenize=False,
                                                       add_generation_prompt=True)
    budget = gen_conf.max_length - gen_conf.max_new_tokens
    encoded = []
    for ex in examples:  # as Silogen: cut on the right to max_length - max_new_tokens tokens
        full = len(tokenizer(ex["text"], truncation=False)["input_ids"])
        enc = tokenizer(ex["text"], return_tensors="pt", truncation=True, max_length=budget)
        if enc["input_ids"].shape[1] == 0:
            raise ConfigError(f"{where}: prompt_conf.input: the prompt is empty and the "
                              "tokenizer adds no BOS token: nothing to generate from")
        encoded.append((enc, full > enc["input_ids"].shape[1]))

    model = _load_generation_model(p, tokenizer, where)
    device = next(model.parameters()).device
    gen_params = {**params, **p.record}
    outputs = []
    log.info("generating for %d prompt(s)", len(examples))
    with torch.no_grad():
        for ex, (enc, truncated) in zip(examples, encoded):
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=run_conf)
            outputs.append({
                "dataset": ex["dataset"], "id": ex["id"], "prompt": ex["text"],
                "answer": tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True),
                "correct_answers": [ex["response"]], "test_type": "open-ended",
                "data_collection": ex["dataset"], "truncated": truncated,
                "all_text_raw": tokenizer.decode(out[0], skip_special_tokens=False),
                "gen_params": gen_params})
    return outputs


class _NoAliasDumper(yaml.SafeDumper):
    """Silogen's dump (safe, keys in order), each record's gen_params written out in full."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def cmd_generate(argv: list[str]) -> int:
    """``fmtune generate CONFIG.yaml OUTPUT.yaml``: Silogen's ``generate`` entry point."""
    ap = CommandParser(
        prog="fmtune generate", usage="fmtune generate CONFIG.yaml OUTPUT.yaml",
        description="Run a Silogen `generate` config (model_conf, prompt_conf, hf_gen_params, "
        "quant_conf) and write Silogen's output YAML (see docs/silogen.md). `fmtune generate "
        "--model ...` is fmtune's own generation.")
    ap.add_argument("config", help="Path to the generation YAML config file.")
    ap.add_argument("outpath", help="Path where to write the YAML.")
    args = ap.parse_args(argv)
    from .files import write_atomic

    data = read_yaml(args.config)
    plan_generate(data, args.config)  # the file's shape, before importing transformers
    folder = os.path.dirname(os.path.abspath(args.outpath))
    if not os.path.isdir(folder):
        raise ConfigError(f"{args.outpath}: its folder does not exist")
    p = plan_generate(data, args.config, generation_field_names())
    outputs = run_generation(p, args.config)
    text = yaml.dump(outputs, sort_keys=False, Dumper=_NoAliasDumper)
    write_atomic(args.outpath, text)
    print(f"fmtune: wrote {len(outputs)} generations to {args.outpath}")
    return 0


# ------------------------------------------------------------- docs/silogen.md
# The key-by-key tables of docs/silogen.md are rendered from the tables above by
# :func:`doc_tables` (tests/test_silogen_doc.py keeps the file in step). KEY_NOTES says what a
# key becomes where no table does; a note key is the dotted key, or "dotted.key: value" for one
# value of it. A key in a table without a row, or a note no table key uses, is an error.
KEY_NOTES: dict[str, str] = {
    # sft / dpo
    "method": "must equal the command (`sft` / `dpo`)",
    "run_conf.model": "`model_name_or_path` (Silogen's default `/local_resources/basemodel`)",
    "run_conf.tokenizer": "`tokenizer_name_or_path`",
    "run_conf.use_fast_tokenizer: true": "accepted (fmtune loads fast tokenizers); `false` "
                                         "refused",
    "run_conf.resume_from_checkpoint": "`resume_from_checkpoint` (`false`, `true`/`auto` = "
                                       "latest in output_dir, or a path)",
    "run_conf.final_checkpoint_name": "`save_model_dir: OUTPUT_DIR/NAME` (default "
                                      "`checkpoint-final`, Silogen's layout)",
    "run_conf.determinism": "`full` -> `full_determinism: true`; `no` -> nothing; `half` refused",
    "run_conf.model_args.device_map": "`auto`/unset accepted (fmtune places the model); others "
                                      "refused",
    "data_conf.training_data.type: CONCATENATION": "`training_data_path: a.jsonl,b.jsonl` "
                                                   "(plugin `data_handlers`)",
    "data_conf.training_data.type: PRECOMPUTE_WEIGHTED_MIX": "several datasets: a data_config "
        "(`data_config_path`) with `sampling` = normalised weights, `sampling_stopping_strategy:"
        " all_exhausted`, the mix `seed`; one dataset: as CONCATENATION; refused for DPO",
    "data_conf.validation_data.type: CONCATENATION": "`validation_data_path`",
    "data_conf.validation_data.type: AUTO_SPLIT": "data_config `split: {train: 1-ratio, "
                                                  "validation: ratio}` per dataset, `seed`; "
                                                  "refused for DPO",
    "data_conf.validation_data.type: NONE": "nothing",
    "data_conf.*.data_type": "accepted (Silogen sets it from the method itself)",
    "data_conf.*.datasets[].path": "the data files (JSONL in Silogen's format)",
    "data_conf.*.datasets[].sampling_weight": "PRECOMPUTE_WEIGHTED_MIX: the dataset's share "
                                              "(default 1.0)",
    "data_conf.*.seed": "the data_config's `seed` (Silogen's defaults: 19851243 for the mix, "
                        "1289525893 for AUTO_SPLIT)",
    "data_conf.*.ratio": "AUTO_SPLIT: the validation share (default 0.2)",
    "sft_args.max_seq_length": "`max_seq_length` (Silogen's default 2048 written out)",
    "sft_args.length_handling: truncate": "fmtune's behaviour; explicit `filter` refused, unset "
                                          "(Silogen's default `filter`) logged",
    "sft_args.save_name_if_new_basemodel": "default `checkpoint-new-basemodel` accepted; others "
                                           "refused",
    "sft_args.train_on_completions_only: true": "fmtune's chat masking (only assistant turns "
                                                "trained)",
    "sft_args.train_on_completions_only: false": "(Silogen's default) the whole rendered "
        "conversation is trained: a data_config with `apply_tokenizer_chat_template` + "
        "`tokenize`; separate validation files refused",
    "overrides.lr_multiplier": "multiplies `learning_rate`",
    "overrides.lr_batch_size_scaling": "`sqrt` / `linear`: `learning_rate` x sqrt(T) or x T "
                                       "(T = total_train_batch_size); `none` nothing",
    "training_args.*": "same name (every transformers `TrainingArguments` field and fmtune "
                       "option); unknown names refused with did-you-mean; default `output_dir: "
                       "./checkpoints` ($CHECKPOINTS_PATH)",
    "training_args.report_to": "`none` dropped; `mlflow` -> plugin `mlflow` (instead of HF's "
                               "callback); one other integration passed as is; `all` or "
                               "several refused",
    "training_args.logging_dir": "dropped (not in transformers 5); refused with `report_to: "
                                 "tensorboard`",
    "peft_conf.peft_type: NO_PEFT": "full fine-tuning",
    "peft_conf.peft_type: LORA": "plugin `lora` (`qlora` on a bits-and-bytes base)",
    "peft_conf.peft_type: PRETRAINED_PEFT": "plugin `lora` / `qlora`, training continues from "
                                            "`name_or_path`",
    "peft_conf.task_type: CAUSAL_LM": "accepted; other task types refused",
    "peft_conf.peft_kwargs": "LORA: the LoraConfig kwargs below",
    "peft_conf.name_or_path": "PRETRAINED_PEFT: `continue_from_adapter`",
    "quant_conf.quantization_type: no-quantization": "nothing (no other quant_conf key allowed)",
    "quant_conf.quantization_type: bits-and-bytes": "plugin `qlora`; refused with NO_PEFT (no "
                                                    "full training of a quantized model)",
    "quant_conf.load_in_4bit": "4-bit base: `bnb_4bit_*` below, BitsAndBytesConfig's defaults "
                               "(fp4, false, float32) written out; exactly one of load_in_4bit "
                               "and load_in_8bit true",
    "quant_conf.load_in_8bit": "`load_in_8bit: true`",
    "quant_conf.bnb_4bit_compute_dtype": "same name (float32, bfloat16, float16)",
    "quant_conf.bnb_4bit_quant_type": "same name (`fp4`, `nf4`)",
    "quant_conf.bnb_4bit_use_double_quant": "same name",
    "tracking.mlflow_server_uri": "`mlflow_tracking_uri` (plugin `mlflow`; `file:` stores work "
                                  "offline)",
    "tracking.experiment_name": "`mlflow_experiment`",
    "tracking.hf_mlflow_log_artifacts: \"False\"": "accepted; `True` refused (fmtune logs params "
                                                   "and metrics, not model artifacts)",
    # generate
    "generate:model_conf.model": "the model (id or folder) loaded with transformers' "
                                 "`AutoModelForCausalLM`",
    "generate:model_conf.adapter": "a peft adapter loaded over the model (embeddings first grown "
                                   "to the tokenizer's size, as `fmtune generate` does)",
    "generate:model_conf.tokenizer": "the tokenizer; default the adapter's, else the model's (an "
                                     "adapter folder without one: the model's)",
    "generate:model_conf.model_args.device_map": "passed to from_pretrained as given (a mapping "
                                                 "too); default `auto`, as in Silogen",
    "generate:prompt_conf.type: open-input": "`input` (default empty: the tokenizer's BOS "
                                             "starts) generated `num_samples` times",
    "generate:prompt_conf.type: eval-data": "each record's `prompt_messages` rendered with the "
        "tokenizer's chat template (`add_generation_prompt`); `response` becomes "
        "`correct_answers`; `dataset` and `id` copied",
    "generate:prompt_conf.input": "open-input: the prompt text",
    "generate:prompt_conf.num_samples": "open-input: how many generations (default 1)",
    "generate:prompt_conf.data": "eval-data: `{path: FILE.jsonl}` (JSON/JSONL records)",
    "generate:hf_gen_params.*": "transformers `GenerationConfig` of these fields; fields left "
                                "unset take the model's generation_config.json values, then "
                                "transformers' defaults (greedy); a name the installed "
                                "transformers lacks is refused with did-you-mean",
    "generate:hf_gen_params.eos_token_id": "default: the tokenizer's EOS and `</s>` (when the "
                                           "vocabulary has it)",
    "generate:hf_gen_params.pad_token_id": "default: the tokenizer's",
    "generate:hf_gen_params.bos_token_id": "default: the tokenizer's",
    "generate:quant_conf.quantization_type: no-quantization": "(default: no quant_conf, or an "
        "empty one) nothing",
    "generate:quant_conf.quantization_type: bits-and-bytes": "(also when left out and other keys "
        "are set, as Silogen reads it) the other keys are passed to transformers' "
        "`BitsAndBytesConfig` as is (needs bitsandbytes); exactly one of load_in_4bit and "
        "load_in_8bit true",
    "output:dataset": "the record's `dataset` (`unknown` if none; open-input: "
                      "`_open_prompt_data_`)",
    "output:id": "the record's `id` (else its index); open-input: \"0\", \"1\", ...",
    "output:prompt": "the text generation started from (the rendered chat for eval-data), "
                     "before truncation",
    "output:answer": "the generated text (special tokens removed)",
    "output:correct_answers": "`[response]` (open-input: `[\"\"]`)",
    "output:test_type": "`open-ended`",
    "output:data_collection": "as `dataset`",
    "output:truncated": "whether the prompt was cut to max_length - max_new_tokens tokens (cut "
                        "on the right, as in Silogen)",
    "output:all_text_raw": "prompt and answer as tokens, special tokens kept",
    "output:gen_params": "the hf_gen_params used (defaults filled in) with `quant_conf` and "
                         "`model_conf` as the config set them (`model_conf.tokenizer` resolved)",
}


def _md(value: Any) -> str:
    """A default as YAML writes it (``null``, ``false``, ``{}``, ``""``)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else \
        json.dumps(value) if isinstance(value, (dict, list)) or value == "" else str(value)


class _Rows:
    """Rows of one table; :meth:`note` takes KEY_NOTES entries and remembers which."""

    def __init__(self, used: set[str], prefix: str = "") -> None:
        self.rows: list[tuple[str, str]] = []
        self.used, self.prefix = used, prefix

    def add(self, keys: str, text: str) -> None:
        self.rows.append((keys, text))

    def note(self, dotted: str) -> None:
        found = [k for k in KEY_NOTES if k.startswith(self.prefix)
                 and (k[len(self.prefix):] == dotted
                      or k[len(self.prefix):].startswith(dotted + ": "))]
        if not found:
            raise KeyError(f"silogen.KEY_NOTES: no row for {self.prefix}{dotted}")
        for k in found:
            self.used.add(k)
            self.add(f"`{k[len(self.prefix):]}`", KEY_NOTES[k])

    def fixed(self, path: str, defaults: dict[str, Any], why: str) -> None:
        self.add(f"`{path}.` " + ", ".join(f"`{k}: {_md(v)}`" for k, v in defaults.items()),
                 why)


def _train_rows(used: set[str]) -> list[tuple[str, str]]:
    r = _Rows(used)
    r.note("method")
    for key in RUN_KEYS:
        if key != "model_args":
            r.note(f"run_conf.{key}")
            continue
        for target in dict.fromkeys(MODEL_ARG_OPTIONS.values()):
            names = [k for k, v in MODEL_ARG_OPTIONS.items() if v == target]
            extra = f" ({', '.join(DTYPES)})" if target == "torch_dtype" else ""
            r.add(" / ".join(f"`run_conf.model_args.{k}`" for k in names), f"`{target}`{extra}")
        r.note("run_conf.model_args.device_map")
        r.fixed("run_conf.model_args", {k: v for k, v in MODEL_ARG_DEFAULTS.items()
                                        if k != "device_map"},
                "accepted only at Silogen's default (shown); fmtune does not pass these "
                "from_pretrained arguments; other names refused")
    for key in DATA_CONF_KEYS:
        if key in ("training_data", "validation_data"):
            types = TRAIN_INPUT_TYPES if key == "training_data" else VALID_INPUT_TYPES
            for t in types:
                r.note(f"data_conf.{key}.type: {t}")
        elif key == "chat_template_name":
            names = "; ".join(f"`{n}`" + (": the tokenizer's own" if t is None else
                                          f" (adds {', '.join(f'`{x}`' for x in t[1])})"
                                          if t[1] else "") for n, t in CHAT_TEMPLATES.items())
            r.add("`data_conf.chat_template_name`", "`chat_template` (Silogen's Jinja, copied) "
                  "and, for SFT, the template's tokens as `add_special_tokens`: " + names +
                  "; default `mistral-with-system`")
        elif key in DATA_CONF_FIXED:
            default, why = DATA_CONF_FIXED[key]
            r.add(f"`data_conf.{key}: {default}`", f"accepted (Silogen's default); others "
                  f"refused: {why}")
        else:
            raise KeyError(f"silogen.DATA_CONF_KEYS: no row for data_conf.{key}")
    for key in dict.fromkeys(k for keys in DATA_INPUT_KEYS.values() for k in keys):
        if key == "datasets":
            for sub in ("path", "sampling_weight"):
                r.note(f"data_conf.*.datasets[].{sub}")
        elif key != "type":
            r.note(f"data_conf.*.{key}")
    for key in SFT_KEYS:
        r.note(f"sft_args.{key}")
    r.add(", ".join(f"`batchsize_conf.{k}`" for k in BATCH_KEYS), "same names")
    for key in OVERRIDE_KEYS:
        r.note(f"overrides.{key}")
    r.note("training_args.*")
    r.add(", ".join(f"`training_args.{k}`" for k in BATCH_DERIVED),
          "refused, as Silogen does (computed from `batchsize_conf`)")
    r.add(", ".join(f"`training_args.{k}`" for k in DROPPED_TRAINING_ARGS),
          "dropped (not a transformers 5 field; no effect on a Trainer run)")
    r.note("training_args.report_to")
    r.note("training_args.logging_dir")
    same = [k for k, v in DPO_ARGS.items() if v == k]
    r.add("DPO " + ", ".join(f"`training_args.{k}`" for k in same),
          "plugin `dpo`'s options of the same names")
    for key, target in DPO_ARGS.items():
        if target is not None and target != key:
            default = SILOGEN_DPO_DEFAULTS.get(key)
            r.add(f"DPO `training_args.{key}`", f"`{target}`" + (
                f" (Silogen's default {default} written out)" if default is not None else ""))
    r.add("DPO " + ", ".join(f"`training_args.{k}`" for k, v in DPO_ARGS.items() if v is None),
          "refused (TRL DPOConfig options fmtune's dpo plugin does not offer)")
    for key in PEFT_KEYS:
        if key == "peft_type":
            for t in PEFT_TYPES:
                r.note(f"peft_conf.peft_type: {t}")
            r.add("`peft_conf.peft_type` others", "refused")
            continue
        r.note(f"peft_conf.{key}")
        if key == "peft_kwargs":
            defaults = ", ".join(f"{k} {v}" for k, v in PEFT_LORA_DEFAULTS.items())
            r.add(", ".join(f"`peft_conf.peft_kwargs.{k}`" for k in LORA_KWARGS),
                  "the `lora` / `qlora` options " + ", ".join(f"`{v}`" for v in
                                                              LORA_KWARGS.values()) +
                  f"; peft's defaults ({defaults}) written out since fmtune's differ")
            r.fixed("peft_conf.peft_kwargs", LORA_FIXED,
                    "accepted only at peft's default (shown); fmtune has no option for them")
    for key in QUANT_KEYS:
        if key not in QUANT_FIXED:
            r.note(f"quant_conf.{key}")
    r.fixed("quant_conf", QUANT_FIXED, "accepted only at BitsAndBytesConfig's default (shown); "
            "fmtune's qlora plugin has no option for them")
    for key in TRACKING_KEYS:
        r.note(f"tracking.{key}")
    return r.rows


def _generate_rows(used: set[str]) -> list[tuple[str, str]]:
    r = _Rows(used, "generate:")
    for key in GEN_MODEL_KEYS:
        if key != "model_args":
            r.note(f"model_conf.{key}")
            continue
        for target in dict.fromkeys(MODEL_ARG_OPTIONS.values()):
            names = [k for k, v in MODEL_ARG_OPTIONS.items() if v == target]
            what = ("the model's trust in its own code (`trust_remote_code`)"
                    if target == "trust_remote_code" else
                    f"from_pretrained `{'dtype' if target == 'torch_dtype' else target}`")
            extra = f" ({', '.join(DTYPES)})" if target == "torch_dtype" else ""
            r.add(" / ".join(f"`model_conf.model_args.{k}`" for k in names), what + extra)
        r.note("model_conf.model_args.device_map")
        r.add("other `model_conf.model_args.*`", "as `run_conf.model_args` for sft/dpo: "
              "accepted only at Silogen's default")
    for ptype, keys in GEN_PROMPT_KEYS.items():
        r.note(f"prompt_conf.type: {ptype}")
    for key in dict.fromkeys(k for keys in GEN_PROMPT_KEYS.values() for k in keys):
        if key != "type":
            r.note(f"prompt_conf.{key}")
    r.note("hf_gen_params.*")
    r.add(", ".join(f"`hf_gen_params.{k}`" for k in GEN_DEFAULTS),
          "default " + ", ".join(f"{v}" for v in GEN_DEFAULTS.values()) + " (Silogen's); the "
          "prompt is cut to max_length - max_new_tokens tokens, which must be at least 1")
    for key in GEN_TOKEN_DEFAULTS:
        r.note(f"hf_gen_params.{key}")
    r.note("quant_conf.quantization_type")
    r.add(", ".join(f"`quant_conf.{k}`" for k in GEN_QUANT_KEYS if k != "quantization_type"),
          "bits-and-bytes: BitsAndBytesConfig's fields of the same names")
    return r.rows


def _output_rows(used: set[str]) -> list[tuple[str, str]]:
    r = _Rows(used, "output:")
    for key in GEN_OUTPUT_KEYS:
        r.note(key)
    return r.rows


def _table(head: tuple[str, str], rows: list[tuple[str, str]]) -> list[str]:
    esc = lambda cell: cell.replace("|", "\\|")  # noqa: E731
    return [f"| {head[0]} | {head[1]} |", "|---|---|",
            *(f"| {esc(k)} | {esc(v)} |" for k, v in rows)]


def doc_tables() -> str:
    """The key-by-key tables of docs/silogen.md (Markdown), from this module's tables."""
    used: set[str] = set()
    lines = ["### `fmtune sft` / `fmtune dpo` (experiment configs)", "",
             *_table(("Silogen key", "fmtune option / behaviour"), _train_rows(used)), "",
             "### `fmtune generate CONFIG.yaml OUTPUT.yaml` (generation configs)", "",
             *_table(("Silogen key", "fmtune behaviour"), _generate_rows(used)), "",
             "Each record of the output YAML list, in this order:", "",
             *_table(("key", "value"), _output_rows(used))]
    stale = [k for k in KEY_NOTES if k not in used]
    if stale:
        raise KeyError(f"silogen.KEY_NOTES: no key table has {', '.join(stale)}")
    return "\n".join(lines) + "\n"
