"""Default model and tokenizer loading (full fine-tuning needs nothing more): the hooks over
:func:`fmtune.models.load_tokenizer` and :func:`fmtune.models.load_full_model`."""

from __future__ import annotations

from fmtune import hookimpl
from fmtune.models import load_full_model, load_tokenizer as load_run_tokenizer


@hookimpl(trylast=True)
def load_tokenizer(config):
    return load_run_tokenizer(config)


@hookimpl(trylast=True)
def load_model(config, tokenizer):
    return load_full_model(config, tokenizer)
