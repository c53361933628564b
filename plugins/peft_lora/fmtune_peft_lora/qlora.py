"""``--plugins qlora``: LoRA on a base loaded 4-bit (nf4/fp4) or 8-bit through bitsandbytes.

    fmtune train --plugins qlora --bnb_4bit_quant_type nf4 --r 16 ...

It has every LoRA option (``--plugins alora,qlora`` trains aLoRA on a quantized
base) and answers ``load_model`` with the quantized model.
"""

from fmtune import hookimpl

from .hooks import plugin_hooks
from .selection import select

_hooks = plugin_hooks("qlora")
add_options = _hooks["add_options"]
validate_config = _hooks["validate_config"]
wrap_peft = _hooks["wrap_peft"]
save = _hooks["save"]
on_train_error = _hooks["on_train_error"]


@hookimpl
def load_model(config, tokenizer):
    if select(config).method is None:
        return None
    from .quant import load_quantized

    return load_quantized(config, tokenizer)
