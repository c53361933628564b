"""The four entry points: instances of one plugin class, :class:`PeftMethod`.

``pyproject.toml`` names the instances (``lora = "fmtune_peft_lora.hooks:lora"``); pluggy
registers each as one plugin. They differ by their name, their options and one extra hook
each for ``alora`` (``prepare_data``) and ``qlora`` (``load_model``)::

    fmtune train --plugins lora --r 16 --lora_alpha 32 --target_modules all-linear ...
    fmtune train --plugins alora --alora_invocation_string "<|check|>" ...
    fmtune train --plugins qlora --bnb_4bit_quant_type nf4 --r 16 ...
    fmtune train --plugins prompt_tuning --num_virtual_tokens 8 --prompt_tuning_init TEXT \\
        --prompt_tuning_init_text "Translate to French:" ...

Only the *owner* (the first PEFT plugin named in ``--plugins``) validates, wraps, saves and
cleans up, so two active PEFT plugins (``alora,qlora``: aLoRA on a quantized base) never do
it twice. No torch at import.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable

from fmtune import hookimpl
from fmtune.config import Option

from .options import ALORA, COMMON, LORA, PROMPT_TUNING, QLORA
from .selection import problems, select

log = logging.getLogger("fmtune")


class PeftMethod:
    """One ``--plugins`` name: registers ``options`` (shared with its siblings) and, when it is
    the owner, acts for every active PEFT plugin. ``hooks``: hook implementations only this
    entry point has (plain functions marked with ``hookimpl``)."""

    def __init__(self, name: str, options: tuple[Option, ...], **hooks: Callable) -> None:
        self.name = name
        self.options = options
        for hook, function in hooks.items():
            setattr(self, hook, function)

    def __repr__(self) -> str:
        return f"<fmtune-peft-lora plugin {self.name!r}>"

    def owns(self, config) -> bool:
        return select(config).owner == self.name

    @hookimpl
    def add_options(self, register):
        for o in self.options:
            register(o.name, o.type, o.default, o.help, choices=o.choices, aliases=o.aliases,
                     shared=o.shared)

    @hookimpl
    def validate_config(self, config):
        if not self.owns(config):
            return None
        found = problems(config)
        if not found:
            from .build import structure_problems

            found = structure_problems(config)
        return found

    @hookimpl
    def wrap_peft(self, model, config, tokenizer):
        if not self.owns(config):
            return None
        from .build import wrap

        return wrap(model, config, tokenizer)

    @hookimpl
    def save(self, model, tokenizer, output_dir, config, trainer):
        if not self.owns(config) or select(config).method is None:
            return None
        return save_adapter(model, tokenizer, output_dir, config, trainer)

    @hookimpl
    def on_train_error(self, run, error):
        if not self.owns(run.config):
            return
        from .build import INITIAL_ADAPTER

        initial = run.config.stash.pop(INITIAL_ADAPTER, None)
        if initial:  # the PiSSA/OLoRA initial adapter kept for the final save
            shutil.rmtree(initial, ignore_errors=True)


@hookimpl(wrapper=True)
def check_invocation_tokens(config, tokenizer, pm):
    """alora's ``prepare_data``: every prepared example holds the invocation tokens (checked
    after the data is prepared, before the model loads)."""
    result = yield
    if select(config).method == "alora" and result is not None:
        from .build import check_examples, invocation_tokens

        ids = invocation_tokens(config, tokenizer)
        train, evalset = result
        check_examples(train, ids, config.alora_invocation_string, "training")
        if evalset is not None:
            check_examples(evalset, ids, config.alora_invocation_string, "validation")
    return result


@hookimpl
def load_quantized(config, tokenizer):
    """qlora's ``load_model``: the base with bitsandbytes 4/8-bit linear layers."""
    if select(config).method is None:
        return None
    from .quant import load_quantized as load

    return load(config, tokenizer)


lora = PeftMethod("lora", COMMON + LORA)
alora = PeftMethod("alora", COMMON + LORA + ALORA, prepare_data=check_invocation_tokens)
qlora = PeftMethod("qlora", COMMON + LORA + QLORA, load_model=load_quantized)
prompt_tuning = PeftMethod("prompt_tuning", COMMON + PROMPT_TUNING)


def save_adapter(model, tokenizer, output_dir, config, trainer) -> str:
    """The adapter (peft's files), the tokenizer, and what makes the folder self-contained."""
    from .build import INITIAL_ADAPTER, base_model_dir
    from .export import export_vllm, finish_saved_adapter

    trainer.save_model(output_dir)  # peft's save_pretrained, on the right rank(s)
    if not trainer.is_world_process_zero():
        return output_dir
    initial = config.stash.pop(INITIAL_ADAPTER, None)
    if initial:
        # PiSSA/OLoRA changed the base weights: save the trained adapter as the plain LoRA
        # (rank 2r) that gives the same model on the original base.
        model.save_pretrained(output_dir, path_initial_model_for_weight_conversion=initial)
        shutil.rmtree(initial, ignore_errors=True)
        log.info("converted the %s adapter to plain LoRA on the original base",
                 config.init_lora_weights)
    tokenizer.save_pretrained(output_dir)
    finish_saved_adapter(output_dir, config,
                         base_model_dir(config) if config.random_init_weights else None)
    if config.get("lora_post_process_for_vllm"):
        target = os.path.join(output_dir, "vllm")
        if os.path.isdir(target):
            shutil.rmtree(target)
        written = export_vllm(output_dir, target)
        log.info("vLLM adapter written to %s (%d LoRA tensors, %d new-token embeddings)", target,
                 written["lora_tensors"], written["new_tokens"])
    return output_dir
