"""Hook implementations shared by the four entry points.

:func:`plugin_hooks` returns the hookimpls for one entry point name; the entry
point modules (``lora``, ``alora``, ``qlora``, ``prompt_tuning``) bind them at
import. Only the *owner* (the first PEFT plugin named in ``--plugins``) acts,
so two active PEFT plugins never wrap, save or validate twice.
"""

from __future__ import annotations

import logging
import os
import shutil

from fmtune import hookimpl

from .options import register_group
from .selection import problems, select

log = logging.getLogger("fmtune")


def plugin_hooks(me: str) -> dict:
    @hookimpl
    def add_options(register):
        register_group(register, me)

    @hookimpl
    def validate_config(config):
        if select(config).owner != me:
            return None
        found = problems(config)
        if not found:
            from .build import structure_problems

            found = structure_problems(config)
        return found

    @hookimpl
    def wrap_peft(model, config, tokenizer):
        if select(config).owner != me:
            return None
        from .build import wrap

        return wrap(model, config, tokenizer)

    @hookimpl
    def save(model, tokenizer, output_dir, config, trainer):
        sel = select(config)
        if sel.owner != me or sel.method is None:
            return None
        return save_adapter(model, tokenizer, output_dir, config, trainer)

    @hookimpl
    def on_train_error(run, error):
        if select(run.config).owner != me:
            return
        from .build import INITIAL_ADAPTERS

        initial = INITIAL_ADAPTERS.pop(run.model, None) if run.model is not None else None
        if initial:  # the PiSSA/OLoRA initial adapter kept for the final save
            shutil.rmtree(initial, ignore_errors=True)

    return {"add_options": add_options, "validate_config": validate_config,
            "wrap_peft": wrap_peft, "save": save, "on_train_error": on_train_error}


def save_adapter(model, tokenizer, output_dir, config, trainer) -> str:
    """The adapter (peft's files), the tokenizer, and what makes the folder self-contained."""
    from .build import INITIAL_ADAPTERS, base_model_dir
    from .export import export_vllm, finish_saved_adapter

    trainer.save_model(output_dir)  # peft's save_pretrained, on the right rank(s)
    if not trainer.is_world_process_zero():
        return output_dir
    initial = INITIAL_ADAPTERS.get(model)
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
