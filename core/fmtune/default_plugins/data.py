"""Default data path: JSON/JSONL records, tokenized with exact loss masks
(:func:`fmtune.records.build_dataset`, where the record shapes are described)."""

from __future__ import annotations

from fmtune import hookimpl
from fmtune.records import build_dataset, missing_eval_data


@hookimpl(trylast=True)
def validate_config(config, pm):
    """The data options this default path reads; skipped when a plugin prepares the data."""
    if any(impl.plugin_name != "default:data" for impl in pm.hook.prepare_data.get_hookimpls()):
        return None
    problems = []
    if not config.training_data_path:
        problems.append("training_data_path is required (YAML key or --training_data_path)")
    if config.dataset_text_field and config.data_formatter_template:
        problems.append("dataset_text_field and data_formatter_template are exclusive: set one")
    if config.response_template and not (config.dataset_text_field or config.data_formatter_template):
        problems.append("response_template needs dataset_text_field or data_formatter_template")
    problems.append(missing_eval_data(config, "validation_data_path"))
    return [p for p in problems if p]


@hookimpl(trylast=True)
def prepare_data(config, tokenizer):
    train = build_dataset(config, tokenizer, config.training_data_path)
    evalset = None
    if config.validation_data_path:
        evalset = build_dataset(config, tokenizer, config.validation_data_path)
    return train, evalset
