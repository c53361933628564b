"""Every field of the installed transformers' ``TrainingArguments`` as a fmtune option.

The option table (name, type, default, choices, help) is what transformers' own
``HfArgumentParser(TrainingArguments)`` builds, so a field means on fmtune's command line what
it means on fms-hf-tuning's. Building it imports torch (seconds), so ``--help`` and option
parsing read a JSON table instead: the one shipped in this package when it was made for the
installed transformers version (``training_options.json``, written by
``python -m fmtune.training_options``), else one built once and cached under
``$XDG_CACHE_HOME/fmtune/`` (``~/.cache/fmtune``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger("fmtune")

SHIPPED = Path(__file__).with_name("training_options.json")
GROUP = "TrainingArguments"


def transformers_version() -> str:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "none"


def _jsonable(value: Any) -> Any:
    value = getattr(value, "value", value)  # enums
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def build() -> dict[str, Any]:
    """The table from the installed transformers (imports torch)."""
    import argparse

    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(TrainingArguments)
    dict_fields = set(getattr(TrainingArguments, "_VALID_DICT_FIELDS", ()))
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.type is None:
            continue  # --help, and the --no_X complements of True-default booleans
        kind = getattr(action.type, "__name__", "")
        if action.dest in dict_fields or kind == "dict":
            type_name = "dict"
        elif action.nargs == "+":
            type_name = "list"
        elif kind == "string_to_bool":
            type_name = "bool"
        elif action.type in (int, float):
            type_name = kind
        else:
            type_name = "str"
        choices = [_jsonable(c) for c in action.choices] if action.choices else None
        rows.append({"name": action.dest, "type": type_name, "default": _jsonable(action.default),
                     "choices": choices, "help": " ".join((action.help or "").split())})
    return {"transformers": transformers_version(), "options": rows}


def _cache_file(version: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fmtune"
    return root / f"training_options-{version}.json"


@functools.cache
def table() -> list[dict[str, Any]]:
    """The rows for the installed transformers version (shipped, cached, or built now)."""
    version = transformers_version()
    for path in (SHIPPED, _cache_file(version)):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("transformers") == version:
            return data["options"]
    log.info("building the TrainingArguments option table for transformers %s (once)", version)
    data = build()
    path = _cache_file(version)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: rebuilt next time, still correct
        log.info("could not cache the option table in %s: %s", path, e)
    return data["options"]


def names() -> set[str]:
    return {row["name"] for row in table()}


def register_all(register, skip: set[str]) -> None:
    """Register every row except ``skip`` (options the caller registers itself) as a weak option:
    a plugin that registers the same name takes it over."""
    for row in table():
        if row["name"] in skip:
            continue
        help_text = row["help"] or f"transformers TrainingArguments.{row['name']}."
        register(row["name"], row["type"], row["default"], help_text, choices=row["choices"],
                 weak=True)


# transformers 4 TrainingArguments fields that transformers 5 removed, as fms-hf-tuning users
# (and HF example scripts) still type them. Each stays an option with its transformers-4 type
# and default: name -> (type, v4 default, how it carries over). "rename": the same value under
# transformers 5's name; a function: the transformers 5 options it becomes; a string: removed
# without a replacement: the v4 default is accepted (no effect), any other value is refused with
# that reason. The options only exist when the installed transformers lacks the field.
def _doc(text: str, fn):
    fn.__doc__ = text  # what the doc table (docs/migrating.md) says the name becomes
    return fn


def _fsdp(key: str):
    return lambda v, config: {"fsdp_config": {**_fsdp_dict(config), key: v}}


def _fsdp_dict(config) -> dict:
    current = config.get("fsdp_config")
    if current is None:
        return {}
    if not isinstance(current, dict):
        raise ValueError("give it inside the fsdp_config file instead (fsdp_config is a path)")
    return dict(current)


def _tensorboard_dir(value, config) -> dict:
    # transformers 5's TensorBoard callback reads the folder from this variable
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(value)
    return {}


LEGACY: dict[str, tuple[str, Any, Any]] = {
    "no_cuda": ("bool", False, "use_cpu"),
    "per_gpu_train_batch_size": ("int", None, "per_device_train_batch_size"),
    "per_gpu_eval_batch_size": ("int", None, "per_device_eval_batch_size"),
    "push_to_hub_token": ("str", None, "hub_token"),
    "torchdynamo": ("str", None, "torch_compile_backend"),
    "push_to_hub_model_id": ("str", None, _doc(
        "`hub_model_id` ORG/NAME (with `push_to_hub_organization`)",
        lambda v, c: {"hub_model_id": "/".join(
            x for x in (c.get("push_to_hub_organization"), v) if x)})),
    "push_to_hub_organization": ("str", None, _doc(
        "the ORG of `hub_model_id` (needs `push_to_hub_model_id`)",
        lambda v, c: {} if c.get("push_to_hub_model_id") else _raise(
            "needs push_to_hub_model_id (or use hub_model_id ORG/NAME)"))),
    "include_inputs_for_metrics": ("bool", False, _doc(
        "true: `include_for_metrics` [inputs]",
        lambda v, c: {"include_for_metrics": ["inputs"]} if v else {})),
    "tpu_metrics_debug": ("bool", False, _doc(
        "true: `debug` tpu_metrics_debug",
        lambda v, c: {"debug": "tpu_metrics_debug"} if v else {})),
    "adafactor": ("bool", False, _doc(
        "true: `optim` adafactor", lambda v, c: {"optim": "adafactor"} if v else {})),
    "group_by_length": ("bool", False, _doc(
        "true: `train_sampling_strategy` group_by_length",
        lambda v, c: {"train_sampling_strategy": "group_by_length"} if v else {})),
    "fsdp_min_num_params": ("int", 0, _doc("`fsdp_config` key min_num_params",
                                           _fsdp("min_num_params"))),
    "fsdp_transformer_layer_cls_to_wrap": ("str", None, _doc(
        "`fsdp_config` key transformer_layer_cls_to_wrap",
        _fsdp("transformer_layer_cls_to_wrap"))),
    "logging_dir": ("str", None, _doc("the environment variable TENSORBOARD_LOGGING_DIR "
                                      "(where transformers 5 reads it)", _tensorboard_dir)),
    # HF example scripts: True = do not resume from the output_dir's checkpoints, start over
    "overwrite_output_dir": ("bool", False, _doc(
        "true: `resume_from_checkpoint` false (start over, as HF example scripts do)",
        lambda v, c: {"resume_from_checkpoint": "false"} if v else {})),
    "save_safetensors": ("bool", True, "transformers 5 always saves safetensors"),
    "half_precision_backend": ("str", "auto", "transformers 5 has no apex backend; torch amp is "
                               "used"),
    "fp16_backend": ("str", "auto", "transformers 5 has no apex backend; torch amp is used"),
    "fp16_opt_level": ("str", "O1", "it was apex's; transformers 5 has no apex backend"),
    "use_mps_device": ("bool", False, "mps is used when available; --use_cpu true avoids it"),
    "jit_mode_eval": ("bool", False, "no replacement"),
    "mp_parameters": ("str", "", "no replacement (SageMaker model parallelism)"),
    "past_index": ("int", -1, "no replacement"),
    "ray_scope": ("str", "last", "no replacement"),
    "tpu_num_cores": ("int", None, "no replacement (the launcher sets it)"),
    "use_legacy_prediction_loop": ("bool", False, "no replacement"),
}


def _raise(why: str):
    raise ValueError(why)


def register_legacy(register, skip: set[str]) -> None:
    """Register each :data:`LEGACY` name the installed TrainingArguments lacks."""
    present = names()
    for name, (type_name, default, action) in LEGACY.items():
        if name in present or name in skip:
            continue
        if isinstance(action, str) and action in present:
            how = f"transformers 4 name of {action}"
        elif isinstance(action, str):
            how = f"removed in transformers 5 ({action}); only its old default is accepted"
        else:
            how = "transformers 4 name; fmtune passes it on as transformers 5 spells it"
        register(name, type_name, default, f"{how}.", weak=True)


def translate_legacy(config) -> list[str]:
    """Carry the transformers-4 names the user set over to transformers 5's (the new options
    then count as set by the user); problems for values that have no transformers 5 meaning."""
    problems = []
    present = names()
    for name, (_, default, action) in LEGACY.items():
        if name in present or name not in config or config.source(name) in (
                "default", "set by a plugin"):
            continue
        value = config.get(name)
        try:
            if isinstance(action, str) and action in present:
                new = {action: value}
            elif isinstance(action, str):
                if value == default:
                    log.info("%s: removed in transformers 5; its default %r has no effect",
                             name, value)
                    continue
                raise ValueError(f"removed in transformers 5 ({action})")
            else:
                new = action(value, config)
        except ValueError as e:
            problems.append(f"{name} {value!r}: {e}")
            continue
        for key, val in new.items():
            config.set_from(key, val, config.source(name))
        if new:
            log.info("%s (transformers 4) passed on as %s", name,
                     ", ".join(f"{k}={v!r}" for k, v in new.items()))
    return problems


def main() -> None:
    """Write the shipped table for the installed transformers (run after `make lock`)."""
    data = build()
    SHIPPED.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {SHIPPED} for transformers {data['transformers']}: "
          f"{len(data['options'])} options")


if __name__ == "__main__":
    main()
