"""data_config YAML (fms-hf-tuning's schema) and the processing pipeline.

Flags (``--training_data_path`` + ``--dataset_text_field`` ...) are turned into
the same in-memory data config as a ``--data_config_path`` file, so both go
through one pipeline: load -> handlers -> split -> interleave/concatenate ->
count and drop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sized
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import yaml

from fmtune.config import load_yaml_text, suggest

from .chat import CHAT_HANDLERS, configured_template, require_template
from .handlers import KEEP_ROW, Registry
from .loading import ROW, DataError, Origins, RecordError, json_kind, load_paths, split_paths

log = logging.getLogger("fmtune")

SCHEMA = {
    "dataprocessor": {"type": str, "sampling_stopping_strategy": str, "seed": int,
                      "streaming": bool, "chat_template": str, "chat_template_path": str,
                      "chat_template_base64": str, "odm": dict},
    "datasets": {"name": str, "data_paths": list, "builder": str, "sampling": float,
                 "split": dict, "data_handlers": list, "dataset_split_name": str,
                 "shuffle": bool},
    "split": {"train": float, "validation": float},
    "data_handlers": {"name": str, "arguments": dict},
    # column_mapping / column_names: fms-hf-tuning's arguments of the column handlers
    "arguments": {"fn_kwargs": dict, "batched": bool, "remove_columns": (str, list),
                  "batch_size": int, "num_proc": int, "column_mapping": dict,
                  "column_names": list},
}
COLUMN_ARGUMENTS = ("column_mapping", "column_names")
CHAT_TEMPLATE_KEYS = ("chat_template", "chat_template_path", "chat_template_base64")
STOPPING = ("all_exhausted", "first_exhausted")
TOKEN_COLUMNS = ("input_ids", "labels", "attention_mask")


@dataclass
class Step:
    name: str
    fn_kwargs: dict[str, Any] = field(default_factory=dict)
    batched: bool = True
    remove_columns: Any = None
    batch_size: int = 1000
    num_proc: int | None = None


@dataclass
class DatasetSpec:
    name: str
    data_paths: list[str]
    builder: str | None = None
    sampling: float | None = None
    split: dict[str, float] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    split_name: str | None = None
    shuffle: bool = True

    def fractions(self) -> tuple[float, float]:
        """(train, validation) as fms-hf-tuning reads ``split``: a missing part is 0."""
        if not self.split:
            return 1.0, 0.0
        return self.split.get("train", 0.0), self.split.get("validation", 0.0)


@dataclass
class DataConfig:
    datasets: list[DatasetSpec]
    seed: int = 42
    streaming: bool = False
    stopping: str = "all_exhausted"
    chat_template: str | None = None
    source: str = "flags"
    odm: dict[str, Any] | None = None  # dataprocessor.type: odm (online data mixing)


def _check(value: Any, schema_key: str, where: str, required: tuple[str, ...] = ()) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{where}: must be a mapping")
    schema = SCHEMA[schema_key]
    for key, v in value.items():
        if key not in schema:
            raise DataError(f"{where}.{key}: unknown key{suggest(str(key), schema)}; "
                            f"allowed: {', '.join(schema)}")
        want = schema[key]
        ok = isinstance(v, want) if want is not float else isinstance(v, (int, float)) \
            and not isinstance(v, bool)
        if not ok:
            names = "/".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise DataError(f"{where}.{key}: must be {names}, got {v!r}")
    for key in required:
        if key not in value:
            raise DataError(f"{where}.{key}: required")
    return value


def _chat_template(proc: dict, path: str, base: str) -> str | None:
    """dataprocessor's chat_template, chat_template_path (relative to cwd or to the data_config)
    or chat_template_base64: at most one."""
    given = [k for k in CHAT_TEMPLATE_KEYS if proc.get(k) is not None]
    if len(given) > 1:
        raise DataError(f"{path}: dataprocessor: {' and '.join(given)} are exclusive; give one")
    from fmtune.config import ConfigError
    from fmtune.records import resolve_chat_template

    if not given:
        return None
    key = given[0]
    if key == "chat_template":  # a built-in name, a file or the text, as --chat_template
        try:
            return resolve_chat_template(proc["chat_template"], f"dataprocessor.{key}", base)
        except ConfigError as e:
            raise DataError(f"{path}: {e}") from None
    if key == "chat_template_base64":
        import base64
        import binascii

        try:
            text = base64.b64decode(proc["chat_template_base64"], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as e:
            raise DataError(f"{path}: dataprocessor.chat_template_base64: not base64 of UTF-8 "
                            f"text ({e})") from None
    else:
        name = os.path.expanduser(os.path.expandvars(proc["chat_template_path"]))
        found = name if os.path.isabs(name) or os.path.isfile(name) else os.path.join(base, name)
        if not os.path.isfile(found):
            raise DataError(f"{path}: dataprocessor.chat_template_path: {name}: file not found")
        with open(found, encoding="utf-8") as f:
            text = f.read()
    if any(m in text for m in ("{{", "{%", "{#")):  # else plain text: nothing to compile
        try:
            resolve_chat_template(text, f"dataprocessor.{key}")
        except ConfigError as e:
            raise DataError(f"{path}: {e}") from None
    return text


def _check_sampling(specs: list[DatasetSpec], path: str) -> None:
    """fms-hf-tuning's rule: with sampling, every dataset that gives a train split needs a
    ratio (those that only give validation need none) and the ratios sum to 1. A ratio given
    is in (0, 1]: 0 is refused (fms-hf-tuning reads it as "not given", which trains the whole
    dataset; a dataset not to train on is left out of the data_config)."""
    train = [i for i, s in enumerate(specs) if s.fractions()[0] > 0]
    ratios = [s.sampling for s in specs]
    for i, r in enumerate(ratios):
        if r is not None and not 0 < r <= 1:
            hint = " (leave sampling out, or the dataset)" if r == 0 else ""
            raise DataError(f"{path}: datasets[{i}].sampling: must be in (0, 1], got {r}{hint}")
    given = [i for i, r in enumerate(ratios) if r is not None]
    if not given:
        return
    for i in given:
        if i not in train:
            raise DataError(f"{path}: datasets[{i}].sampling: dataset {specs[i].name!r} has no "
                            "train split (split.train is 0), so it is not sampled")
    for i in train:
        if ratios[i] is None:
            raise DataError(f"{path}: datasets[{i}].sampling: required, as other datasets have "
                            f"sampling (every dataset with a train split needs a ratio)")
    if abs(sum(ratios[i] for i in train) - 1) > 1e-6:
        raise DataError(f"{path}: datasets: sampling ratios must sum to 1, got "
                        f"{' + '.join(str(ratios[i]) for i in train)} = "
                        f"{sum(ratios[i] for i in train):g}")


def read_data_config(path: str, registry: Registry) -> DataConfig:
    """Parse and validate a data_config file; errors name the file and the key path."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: data_config file not found")
    try:
        with open(path, encoding="utf-8") as f:
            raw = load_yaml_text(f.read()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise DataError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: must be a mapping with dataprocessor and datasets")
    for key in raw:
        if key not in ("dataprocessor", "datasets"):
            raise DataError(f"{path}: {key}: unknown key{suggest(str(key), ['dataprocessor', 'datasets'])}")
    proc = _check(raw.get("dataprocessor") or {}, "dataprocessor", f"{path}: dataprocessor")
    kind = proc.get("type", "default")
    if kind not in ("default", "odm"):
        raise DataError(f"{path}: dataprocessor.type: must be default or odm, got {kind!r}")
    if "odm" in proc and kind != "odm":
        raise DataError(f"{path}: dataprocessor.odm: only with type: odm")
    odm = _odm(proc, path) if kind == "odm" else None
    stopping = proc.get("sampling_stopping_strategy", "all_exhausted")
    if stopping not in STOPPING:
        raise DataError(f"{path}: dataprocessor.sampling_stopping_strategy: must be one of "
                        f"{', '.join(STOPPING)}, got {stopping!r}")
    if not isinstance(raw.get("datasets"), list) or not raw["datasets"]:
        raise DataError(f"{path}: datasets: required, a non-empty list")
    streaming = proc.get("streaming", False)
    specs = []
    base = os.path.dirname(os.path.abspath(path))
    for i, d in enumerate(raw["datasets"]):
        where = f"{path}: datasets[{i}]"
        _check(d, "datasets", where, required=("name", "data_paths"))
        split = _check(d.get("split") or {}, "split", f"{where}.split")
        if split and not (0 < sum(split.values()) <= 1 + 1e-9):
            raise DataError(f"{where}.split: train + validation must be in (0, 1], got {split}")
        steps = []
        for j, h in enumerate(d.get("data_handlers") or []):
            hw = f"{where}.data_handlers[{j}]"
            _check(h, "data_handlers", hw, required=("name",))
            args = _check(h.get("arguments") or {}, "arguments", f"{hw}.arguments")
            handler = registry.get(h["name"], f"{hw}.name")
            fn_kwargs = dict(args.get("fn_kwargs") or {})
            takes = handler.arguments()  # less the tokenizer and config, which fmtune passes
            takes = None if takes is None else [k for k in takes
                                                if k not in ("tokenizer", "config")]
            for key in fn_kwargs if takes is not None else ():
                if key not in takes:
                    raise DataError(
                        f"{hw}.arguments.fn_kwargs.{key}: data handler {h['name']!r} (dataset "
                        f"{d['name']!r}) takes no argument {key!r}{suggest(str(key), takes)}; it "
                        f"takes {', '.join(takes) or 'none'}")
            for key in COLUMN_ARGUMENTS:
                if key in args:
                    if handler.kind != "dataset":
                        raise DataError(f"{hw}.arguments.{key}: only for column handlers "
                                        f"(rename_columns, select_columns, remove_columns); put "
                                        f"{h['name']}'s arguments in fn_kwargs")
                    fn_kwargs[key] = args[key]
            steps.append(Step(h["name"], fn_kwargs, args.get("batched", True),
                              args.get("remove_columns"), args.get("batch_size", 1000),
                              args.get("num_proc")))
        paths = [p if os.path.isabs(p) or os.path.exists(p) else
                 (os.path.join(base, p) if os.path.exists(os.path.join(base, p)) else p)
                 for p in d["data_paths"]]
        spec = DatasetSpec(d["name"], paths, d.get("builder"), d.get("sampling"), split, steps,
                           d.get("dataset_split_name"), d.get("shuffle", True))
        if streaming and split and max(spec.fractions()) < 1:
            raise DataError(f"{where}.split: dataset {spec.name!r} is streamed, and a stream "
                            "splits only whole (train: 1.0 or validation: 1.0); partial splits "
                            "need streaming: false")
        specs.append(spec)
    if not any(s.fractions()[0] > 0 for s in specs):
        raise DataError(f"{path}: datasets: no dataset gives a train split")
    _check_sampling(specs, path)
    if odm is not None:
        if streaming:
            raise DataError(f"{path}: dataprocessor.streaming: not supported with type: odm "
                            "(the mixer draws from datasets with a length)")
        trained = [s.name for s in specs if s.fractions()[0] > 0]
        auto = odm.get("auto_categorize_input_column")
        if auto and len(specs) != 1:
            raise DataError(f"{path}: dataprocessor.odm.auto_categorize_input_column splits one "
                            f"dataset into categories; this config lists {len(specs)} datasets "
                            "(they are the categories: remove the auto_categorize keys)")
        if len(trained) < 2 and not auto:
            raise DataError(f"{path}: datasets: type: odm mixes datasets: give two or more with "
                            "a train split, or one with dataprocessor.odm."
                            "auto_categorize_input_column to cluster it into categories")
        if len(set(trained)) < len(trained):
            raise DataError(f"{path}: datasets: type: odm: dataset names must differ (they name "
                            "the mixer's arms)")
    return DataConfig(specs, proc.get("seed", 42), streaming, stopping,
                      _chat_template(proc, path, base), path, odm)


# fms-hf-tuning's dataprocessor.odm keys (tuning/config/acceleration_configs/odm.py)
ODM_KEYS = {"update_interval": int, "sampling_interval": int, "reward_type": str,
            "gamma": float, "eta": float, "resume_from_checkpoint": (bool, str),
            "auto_categorize_input_column": str, "auto_categorize_num_categories": (int, str),
            "auto_categorize_model_name": str, "auto_categorize_batch_size": int}
# fms-acceleration's rewards (odm/reward.py; the names are case-insensitive, fms uppercases
# them); entropy is fms-hf-tuning's default
ODM_REWARDS = ("entropy", "entropy3_varent1", "entropy_last_token", "train_loss",
               "validation_loss", "gradnorm")
# the rewards computed on each dataset's validation split
VALIDATION_REWARDS = ("entropy", "entropy3_varent1", "entropy_last_token", "validation_loss")


def _odm(proc: dict, path: str) -> dict:
    """dataprocessor.odm, checked: ``{update_interval (None: eval_steps, else logging_steps),
    sampling_interval, reward_type (lower case; default entropy), gamma, eta}``."""
    where = f"{path}: dataprocessor.odm"
    odm = proc.get("odm")
    if odm is None:
        raise DataError(f"{where}: required with type: odm (update_interval, sampling_interval, "
                        "reward_type, gamma, eta)")
    if not isinstance(odm, dict):
        raise DataError(f"{where}: must be a mapping")
    for key, value in odm.items():
        if key not in ODM_KEYS:
            raise DataError(f"{where}.{key}: unknown key{suggest(str(key), ODM_KEYS)}; allowed: "
                            f"{', '.join(k for k in ODM_KEYS if k != 'resume_from_checkpoint')}")
        want = ODM_KEYS[key]
        ok = isinstance(value, want) if want is not float else isinstance(value, (int, float))
        if not ok or isinstance(value, bool) and want in (int, float):
            raise DataError(f"{where}.{key}: must be "
                            f"{want.__name__ if isinstance(want, type) else want[0].__name__}, "
                            f"got {value!r}")
    auto = {}
    if any(key.startswith("auto_categorize") for key in odm):
        if not odm.get("auto_categorize_input_column"):
            raise DataError(f"{where}.auto_categorize_input_column: required to auto-categorize "
                            "(fms-hf-tuning's switch; the tokenized examples are clustered)")
        k = odm.get("auto_categorize_num_categories")
        if k is not None:
            try:
                k = int(k)  # fms-hf-tuning's example writes "3"
            except ValueError:
                k = 0
            if k < 1:
                raise DataError(f"{where}.auto_categorize_num_categories: must be a positive "
                                f"number, got {odm['auto_categorize_num_categories']!r}")
        size = odm.get("auto_categorize_batch_size", 64)
        if size < 1:
            raise DataError(f"{where}.auto_categorize_batch_size: must be at least 1, got {size}")
        auto = {"auto_categorize_input_column": odm["auto_categorize_input_column"],
                "auto_categorize_num_categories": k, "auto_categorize_batch_size": size,
                "auto_categorize_model_name": odm.get("auto_categorize_model_name")}
    if "resume_from_checkpoint" in odm:
        raise DataError(f"{where}.resume_from_checkpoint: not a data_config key (fms-hf-tuning "
                        "sets it from --resume_from_checkpoint); resume with "
                        "--resume_from_checkpoint")
    reward = odm.get("reward_type", "entropy").lower()
    if reward not in ODM_REWARDS:
        raise DataError(f"{where}.reward_type: {odm['reward_type']!r} is not a reward"
                        f"{suggest(reward, ODM_REWARDS)}; one of {', '.join(ODM_REWARDS)}")
    out = {"update_interval": odm.get("update_interval"),
           "sampling_interval": odm.get("sampling_interval", 1), "reward_type": reward,
           "gamma": float(odm.get("gamma", 0.1)), "eta": float(odm.get("eta", 0.3)), **auto}
    for key in ("update_interval", "sampling_interval"):
        if out[key] is not None and out[key] < 1:
            raise DataError(f"{where}.{key}: must be at least 1, got {out[key]}")
    if not 0 <= out["gamma"] <= 1:
        raise DataError(f"{where}.gamma: must be in [0, 1], got {out['gamma']}")
    if not out["eta"] > 0:
        raise DataError(f"{where}.eta: must be positive, got {out['eta']}")
    return out


def steps_from_flags(config, columns: list[str]) -> list[Step]:
    """The handler steps fms-hf-tuning's flags imply for data with these columns; with
    ``--ept``, text tokenized whole (no truncation: the blocks are cut later)."""
    if not getattr(config, "ept", False):
        return _flag_steps(config, columns)
    if "input_ids" in columns:
        return []
    if not (config.dataset_text_field or config.data_formatter_template):
        if "text" not in columns:
            raise DataError(f"--ept trains raw text: no 'text' column (columns: {columns}); set "
                            "--dataset_text_field or --data_formatter_template")
        return [Step("tokenize", {"text_column_name": "text", "truncation": False},
                     remove_columns="all")]
    steps = _flag_steps(config, columns)
    for step in steps:
        if step.name == "tokenize":
            step.fn_kwargs["truncation"] = False
    return steps


def _flag_steps(config, columns: list[str]) -> list[Step]:
    kw = {}
    if config.data_formatter_template:
        return [Step("apply_custom_jinja_template", {"template": config.data_formatter_template,
                                                     "formatted_text_column_name": "formatted_text"}),
                Step("tokenize", {"text_column_name": "formatted_text",
                                  "response_template": config.response_template},
                     remove_columns="all")]
    if config.dataset_text_field:
        return [Step("tokenize", {"text_column_name": config.dataset_text_field,
                                  "response_template": config.response_template,
                                  "instruction_template": config.instruction_template},
                     remove_columns="all")]
    if "input_ids" in columns:
        return []
    conv = config.dataset_conversation_field
    if conv in columns:
        kw = {"conversation_column": conv, "instruction_template": config.instruction_template,
              "response_template": config.response_template}
        return [Step("tokenize_and_apply_chat_template_with_masking", kw, remove_columns="all")]
    if "input" in columns and "output" in columns:
        return [Step("tokenize_and_apply_input_masking", {}, remove_columns="all")]
    raise DataError(
        f"cannot tell the data format from columns {columns}: expected input/output, "
        f"{conv!r} (chat), or input_ids; or set --dataset_text_field / --data_formatter_template")


@dataclass
class Prepared:
    train: Any
    validation: Any
    counts: dict[str, dict[str, int]]
    # the chat templates given to handlers (--chat_template, dataprocessor's, a handler's
    # fn_kwargs), distinct, in order; the tokenizer's own is not listed
    chat_templates: list[str] = field(default_factory=list)
    # dataprocessor.type: odm: each dataset's train split, by name (``train`` is then their
    # concatenation, which preprocess writes; training mixes ``parts`` online)
    parts: dict[str, Any] | None = None
    # dataprocessor.odm, with seed, weights, source and ``validation``: each mixed dataset's
    # validation split by name (the entropy and validation_loss rewards are computed on them)
    odm: dict[str, Any] | None = None


def apply_step(ds, step: Step, registry: Registry, tokenizer, config, chat_template, where: str,
               used: list[str] | None = None, origins: Origins | None = None):
    """Run one handler step; a chat template given to it is appended to ``used``. A record
    the handler refuses (:class:`~.loading.RecordError`) is named by its file and line from
    the dataset's :data:`~.loading.ROW` column and ``origins``; the handler never sees that
    column."""
    handler = registry.get(step.name, where)
    kwargs = dict(step.fn_kwargs)
    if handler.accepts("tokenizer"):
        kwargs.setdefault("tokenizer", tokenizer)
    if handler.accepts("max_seq_length"):
        kwargs.setdefault("max_seq_length", config.max_seq_length)
    if chat_template and handler.accepts("chat_template"):
        kwargs.setdefault("chat_template", chat_template)
    if handler.names("config"):  # the run's Config (plugin options); named, not via **kwargs
        kwargs["config"] = config
    if step.name in CHAT_HANDLERS:  # before any record is read, with the dataset's name
        require_template(tokenizer, kwargs.get("chat_template"), f"{where} ({step.name})")
    if used is not None and kwargs.get("chat_template") and kwargs["chat_template"] not in used:
        used.append(kwargs["chat_template"])
    batched = step.batched or handler.batch_only
    if handler.kind != "map" and step.remove_columns is not None:
        log.warning("%s: remove_columns does not apply to %s (a %s handler); ignored, as "
                    "fms-hf-tuning does", where, step.name, handler.kind)
    if handler.kind == "dataset":
        if handler.fn not in KEEP_ROW and ROW in _raw_columns(ds):
            ds = ds.remove_columns([ROW])
        return handler.fn(ds, **kwargs)
    fn = Located(handler.fn, origins, where)
    proc = _proc(ds, step, config)
    if handler.kind == "filter":
        with forked_tokenizers(proc):
            return ds.filter(fn, fn_kwargs=kwargs, batched=batched,
                             batch_size=step.batch_size, **proc)
    remove = step.remove_columns
    if remove:
        raw = _raw_columns(ds)
        visible = [c for c in raw if c != ROW]
        remove = visible if remove == "all" else [remove] if isinstance(remove, str) else \
            list(remove)
        if ROW in raw and set(visible) <= set(remove):
            # the handler may change the number of rows: the row numbers go with the columns
            remove.append(ROW)
    with forked_tokenizers(proc):
        if batched and _plain_dataset(ds):
            return ds.with_format("arrow").map(
                ArrowBatches(handler.fn, remove or [], where, origins, ds.features),
                fn_kwargs=kwargs,
                batched=True, batch_size=step.batch_size, **proc).with_format(None)
        return ds.map(fn, fn_kwargs=kwargs, batched=batched, batch_size=step.batch_size,
                      remove_columns=remove, **proc)


def locate(error: RecordError, row, origins: Origins | None, where: str) -> DataError:
    """``error`` as one line naming the record's file and line (``row``: its number from the
    :data:`~.loading.ROW` column, None when unknown); else the dataset and handler."""
    place = origins.where(int(row)) if origins is not None and row is not None else None
    return DataError(f"{place}: {error.problem}" if place else f"{where}: {error}")


class Located:
    """A map or filter handler run through ``Dataset.map``/``filter``: called without the
    :data:`~.loading.ROW` column, its :class:`~.loading.RecordError` located (see
    :func:`locate`). Batched or not: a batch's ROW is a list, a record's a number."""

    def __init__(self, fn, origins: Origins | None, where: str) -> None:
        self.fn, self.origins, self.where = fn, origins, where

    def __call__(self, data, *args, **kwargs):
        rows = None
        if isinstance(data, Mapping) and ROW in data:  # a dict, or datasets' lazy batch/row
            rows = data[ROW]
            data = {k: data[k] for k in data if k != ROW}
        try:
            out = self.fn(data, *args, **kwargs)
        except RecordError as e:
            row = rows[e.index] if isinstance(rows, list) and e.index < len(rows) else (
                None if isinstance(rows, list) else rows)
            raise locate(e, row, self.origins, self.where) from None
        except DataError as e:  # a handler of one record: the error is about that record
            if rows is None or isinstance(rows, list):
                raise
            raise locate(RecordError(0, str(e)), rows, self.origins, self.where) from None
        if rows is not None and isinstance(out, dict):
            # a map of one record, or of a batch to as many rows: the rows keep their numbers
            if not isinstance(rows, list) or all(
                    isinstance(v, Sized) and len(v) == len(rows) for v in out.values()):
                out = {**out, ROW: rows}
        return out


def _plain_dataset(ds) -> bool:
    from datasets import Dataset

    return isinstance(ds, Dataset) and ds.format["type"] is None


class ArrowBatches:
    """A batched map handler run on Arrow batches, with ``Dataset.map``'s semantics.

    The handler sees the batch as a dict of Python lists, as with ``Dataset.map``, and its
    columns replace or extend the batch's (minus ``remove``). Columns it returns as Arrow
    arrays or Arrow-backed pandas Series (the tokenizing handlers do) are written as they
    are; ``Dataset.map`` would convert them to Python objects and back, which took a third
    of ``fmtune preprocess``. Other columns get the types ``Dataset.map`` gives them.
    """

    def __init__(self, fn, remove: list[str], where: str, origins: Origins | None = None,
                 features=None) -> None:
        self.fn, self.remove, self.where, self.origins = fn, set(remove), where, origins
        # columns stored encoded (datasets' Json type for a JSON field of mixed types: "b" is
        # stored as '"b"') are decoded as Dataset.map decodes them
        from datasets.features.features import require_decoding

        self.features = features if features is not None and any(
            require_decoding(f) for f in features.values()) else None

    def __call__(self, table, **kwargs):
        import pyarrow as pa
        from datasets.arrow_writer import OptimizedTypedSequence

        rows = table.column(ROW) if ROW in table.column_names else None
        if rows is not None:  # the handler never sees fmtune's row numbers
            table = table.drop_columns([ROW])
        batch = table.to_pydict()
        if self.features is not None:
            batch = self.features.decode_batch(batch)
        try:
            out = self.fn(batch, **kwargs)
        except RecordError as e:
            row = rows[e.index].as_py() if rows is not None and e.index < len(rows) else None
            raise locate(e, row, self.origins, self.where) from None
        if out is None:  # side effects only: the batch is unchanged (minus removed columns)
            out = {}
        if not isinstance(out, dict):
            raise DataError(f"{self.where}: a batched map handler must return a dict of "
                            f"columns, got {type(out).__name__}")
        columns = {}
        for name, values in out.items():
            if not isinstance(values, (pa.Array, pa.ChunkedArray)):
                try:
                    values = pa.array(values) if _arrow_backed(values) else pa.array(
                        OptimizedTypedSequence(values, col=name))
                except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                    raise self.mixed(name, values, rows, e) from None
            columns[name] = values
        kept = [c for c in table.column_names if c not in self.remove and c not in columns]
        sizes = {len(v) for v in columns.values()}
        if len(sizes) > 1 or (kept and sizes and sizes != {table.num_rows}):
            raise DataError(f"{self.where}: the handler returned columns of {sorted(sizes)} rows "
                            f"for a batch of {table.num_rows}; to change the number of rows, "
                            "remove the input columns (remove_columns: all)")
        names = [c for c in table.column_names if c not in self.remove]
        names += [c for c in columns if c not in names]  # Dataset.map's column order
        out = {c: columns[c] if c in columns else table[c] for c in names}
        if rows is not None and (sizes == {table.num_rows} or
                                 (ROW not in self.remove and sizes <= {table.num_rows})):
            out[ROW] = rows  # kept (the rows are the batch's) unless the handler changes them
        return pa.table(out)

    def mixed(self, name: str, values, rows, error: Exception) -> DataError:
        """A column the handler returned that Arrow cannot store (values of several types),
        as one line naming the first record of another type than the column's first value."""
        kinds = [json_kind(v) for v in values]
        first = next((k for k in kinds if k is not None), None)
        at = next((i for i, k in enumerate(kinds) if k not in (None, first)), None)
        place = None
        if at is not None and rows is not None and at < len(rows) and self.origins is not None:
            place = self.origins.where(int(rows[at].as_py()))
        if at is None:
            return DataError(f"{self.where}: the handler returned column {name!r}, which cannot "
                             f"be stored: {str(error).splitlines()[0]}")
        return DataError(f"{place or f'{self.where}: record {at + 1} of this batch'}: column "
                         f"{name!r} returned by {self.where} is {kinds[at]} here and {first} "
                         "in earlier records; a handler returns one type per column")


def _arrow_backed(values) -> bool:
    import pandas as pd

    return isinstance(values, pd.Series) and isinstance(values.dtype, pd.ArrowDtype)


def _proc(ds, step: Step, config) -> dict:
    from datasets import Dataset

    extra = {}
    if isinstance(ds, Dataset):
        extra["desc"] = step.name
        n = step.num_proc or getattr(config, "dataset_num_proc", None) or auto_num_proc(len(ds))
        if n > 1:
            extra["num_proc"] = n
    return extra


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as a container's cpuset sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_num_proc(rows: int) -> int:
    """dataset_num_proc's default for a dataset of ``rows`` records: one process per
    RECORDS_PER_PROCESS records, at most this machine's usable CPUs shared among the training
    processes on it (each prepares its data: LOCAL_WORLD_SIZE, as torchrun and accelerate set
    it). fms-hf-tuning always maps with os.cpu_count() processes; at 10k records forking costs
    what it saves."""
    from .plugin import RECORDS_PER_PROCESS

    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    return max(1, min(usable_cpus() // local, rows // RECORDS_PER_PROCESS))


@contextmanager
def forked_tokenizers(ds_kwargs: dict):
    """Around a map with ``num_proc`` > 1: the forked processes tokenize on one thread each
    (TOKENIZERS_PARALLELISM=false for them): a Rust thread pool used before the fork would
    deadlock them, and the tokenizers library would warn in each. The user's setting is
    restored after."""
    if (ds_kwargs.get("num_proc") or 1) <= 1:
        yield
        return
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _finish(ds, name: str, counts: dict[str, int], streaming: bool):
    """Count statuses, drop dropped rows, keep only the token columns."""
    cols = [c for c in _raw_columns(ds) if c != ROW]
    if "input_ids" not in cols:
        raise DataError(f"{name}: after the data handlers there is no input_ids column "
                        f"(columns: {cols}); add a tokenizing handler")
    if "labels" not in cols:
        ds = ds.map(lambda b: {"labels": [list(x) for x in b["input_ids"]]}, batched=True)
    elif "status" not in cols:  # pretokenized: a record without labels trains on everything
        ds = ds.map(lambda b: {"labels": [list(i) if lab is None else lab
                                          for i, lab in zip(b["input_ids"], b["labels"])]},
                    batched=True)
    if "status" in cols:
        if not streaming:
            import pyarrow.compute as pc

            # counted in Arrow: reading the column back as Python strings took seconds
            for entry in pc.value_counts(ds.with_format("arrow")["status"]).to_pylist():
                counts[entry["values"]] = counts.get(entry["values"], 0) + entry["counts"]
            if any(s.startswith("dropped") for s in counts):
                ds = ds.filter(lambda status: [not s.startswith("dropped") for s in status],
                               input_columns="status", batched=True)
        else:
            ds = ds.filter(lambda r: not r["status"].startswith("dropped"))
    elif not streaming:  # a stream is not counted
        counts["ok"] = counts.get("ok", 0) + len(ds)
    # labels exist by now; a stream may not know its columns, so take them from ``cols``
    keep = [c for c in TOKEN_COLUMNS if c in cols or c == "labels"]
    return ds.select_columns(keep)


def _raw_columns(ds) -> list[str]:
    cols = list(ds.column_names or [])
    return cols or list(next(iter(ds.take(1)), {}).keys())


def columns(ds) -> list[str]:
    """A dataset's columns (not fmtune's row numbers); a stream may only know them from its
    first row."""
    return [c for c in _raw_columns(ds) if c != ROW]


def split_dataset(ds, spec: DatasetSpec, dc: DataConfig) -> dict[str, Any]:
    """{"train": ..., "validation": ...} from the raw data, as fms-hf-tuning splits it
    (before the handlers, ``train_test_split`` with the dataprocessor's seed)."""
    train, valid = spec.fractions()
    if not valid:
        if train >= 1:
            return {"train": ds}
    elif not train and valid >= 1:
        return {"validation": ds}
    try:
        parts = ds.train_test_split(train_size=train or None, test_size=valid or None,
                                    shuffle=spec.shuffle, seed=dc.seed)
    except ValueError as e:
        raise DataError(f"{dc.source}: datasets[{spec.name}].split: {e}") from None
    return {k: parts[p] for k, p, frac in (("train", "train", train), ("validation", "test", valid))
            if frac > 0}


def prepare(config, tokenizer, registry: Registry, dc: DataConfig | None = None,
            validation_paths: Any = None) -> Prepared:
    """Run the whole pipeline; returns train/validation datasets and status counts."""
    from datasets import concatenate_datasets, interleave_datasets

    given = configured_template(config)
    # --data_handlers: handlers applied to the data files of the flags, as a data_config would
    flag_steps = [Step(name) for name in getattr(config, "data_handlers", None) or []]
    if dc is None:
        dc = DataConfig([DatasetSpec("training_data", split_paths(config.training_data_path),
                                     steps=flag_steps)],
                        seed=config.seed, chat_template=given)
    chat_template = given or dc.chat_template
    for spec in dc.datasets:  # a data_config's chat handlers: checked before any data loads
        for k, step in enumerate(spec.steps):
            if step.name in CHAT_HANDLERS:
                require_template(tokenizer, step.fn_kwargs.get("chat_template") or chat_template,
                                 f"{dc.source}: datasets[{spec.name}].data_handlers[{k}] "
                                 f"({step.name})")
    valids, counts, used = [], {"train": {}, "validation": {}}, []

    def run_steps(spec: DatasetSpec, ds, origins: Origins):
        flags = dc.source == "flags"
        steps = steps_from_flags(config, columns(ds)) if flags and not spec.steps else spec.steps
        for k, step in enumerate(steps):
            where = (f"data_handlers[{k}] ({step.name})" if flags and spec.steps else
                     f"{dc.source}: datasets[{spec.name}].data_handlers[{k}]")
            ds = apply_step(ds, step, registry, tokenizer, config, chat_template, where, used,
                            origins)
        if (not flags or spec.steps) and "input_ids" not in columns(ds):
            label = "data_handlers" if flags else f"{dc.source}: datasets[{spec.name}]"
            # fms-hf-tuning's chain: handlers that only format text, then the trainer
            # tokenizes dataset_text_field (with response/instruction templates)
            try:
                more = steps_from_flags(config, columns(ds))
            except DataError as e:
                raise DataError(f"{label}: after the data handlers there is no input_ids "
                                f"column; {e}") from None
            log.info("%s: tokenizing with %s after the data handlers", label,
                     ", ".join(s.name for s in more))
            for k, step in enumerate(more):
                ds = apply_step(ds, step, registry, tokenizer, config, chat_template,
                                f"{label}: {step.name}", used, origins)
        return ds

    train_parts = []
    for spec in dc.datasets:
        origins = Origins()
        ds = load_paths(spec.data_paths, spec.builder, dc.streaming, spec.split_name, origins,
                        txt=bool(getattr(config, "ept", False)))
        parts = split_dataset(ds, spec, dc)
        if "validation" in parts:
            valids.append(_finish(run_steps(spec, parts["validation"], origins), spec.name,
                                  counts["validation"], dc.streaming))
        if "train" in parts:
            train_parts.append((spec, _finish(run_steps(spec, parts["train"], origins),
                                              spec.name, counts["train"], dc.streaming)))

    if validation_paths:
        spec = DatasetSpec("validation_data", split_paths(validation_paths),
                           steps=flag_steps if dc.source == "flags" else [])
        origins = Origins()
        ds = load_paths(spec.data_paths, origins=origins, txt=bool(getattr(config, "ept", False)))
        valids.append(_finish(run_steps(spec, ds, origins), "validation_data",
                              counts["validation"], dc.streaming))

    trains = [ds for _, ds in train_parts]
    ratios = [spec.sampling for spec, _ in train_parts]
    if len(trains) == 1:
        train = trains[0]
    elif any(ratios) and dc.odm is None:  # odm: the ratios are the mixer's initial weights
        train = interleave_datasets(trains, probabilities=ratios, seed=dc.seed,
                                    stopping_strategy=dc.stopping)
    else:
        train = concatenate_datasets(trains)
    validation = concatenate_datasets(valids) if len(valids) > 1 else (valids[0] if valids else None)
    if getattr(config, "ept", False):  # documents -> blocks of max_seq_length tokens
        from .ept import to_blocks

        train = to_blocks(train, config.max_seq_length)
        validation = None if validation is None else to_blocks(validation, config.max_seq_length)
    if not dc.streaming and len(train) == 0:
        reasons = "; ".join(f"{n} {s}" for s, n in counts["train"].items())
        raise DataError(f"{dc.source}: no usable training examples ({reasons})")
    for split, c in counts.items():
        dropped = {s: n for s, n in c.items() if s.startswith("dropped")}
        for status, n in dropped.items():
            log.warning("%s data: %d examples %s", split, n, status)
        if c.get("truncated"):
            log.warning("%s data: %d examples truncated to max_seq_length=%d", split,
                        c["truncated"], config.max_seq_length)
    parts = odm = None
    if dc.odm is not None:
        parts = {spec.name: ds for spec, ds in train_parts}
        # ``valids`` holds, in order, the validation split of each dataset that gives one
        # (then validation_data_path's)
        named = [spec.name for spec in dc.datasets if spec.fractions()[1] > 0]
        odm = {**dc.odm, "seed": dc.seed, "source": dc.source,
               "weights": {spec.name: spec.sampling for spec, _ in train_parts},
               "validation": {name: ds for name, ds in zip(named, valids) if name in parts}}
    return Prepared(train, validation, counts, used, parts, odm)
