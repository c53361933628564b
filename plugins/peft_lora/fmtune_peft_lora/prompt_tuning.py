"""``--plugins prompt_tuning``: trained virtual tokens prepended to every input (peft).

    fmtune train --plugins prompt_tuning --num_virtual_tokens 8 --prompt_tuning_init TEXT \
        --prompt_tuning_init_text "Translate to French:" ...
"""

from .hooks import plugin_hooks

_hooks = plugin_hooks("prompt_tuning")
add_options = _hooks["add_options"]
validate_config = _hooks["validate_config"]
wrap_peft = _hooks["wrap_peft"]
save = _hooks["save"]
on_train_error = _hooks["on_train_error"]
