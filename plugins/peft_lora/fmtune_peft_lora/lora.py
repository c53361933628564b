"""``--plugins lora``: LoRA adapters (peft), fms-hf-tuning's flags.

    fmtune train --plugins lora --r 16 --lora_alpha 32 --target_modules all-linear ...

The options, checks, wrapping and saving are shared with ``alora``, ``qlora``
and ``prompt_tuning`` (:mod:`fmtune_peft_lora.hooks`).
"""

from .hooks import plugin_hooks

_hooks = plugin_hooks("lora")
add_options = _hooks["add_options"]
validate_config = _hooks["validate_config"]
wrap_peft = _hooks["wrap_peft"]
save = _hooks["save"]
on_train_error = _hooks["on_train_error"]
