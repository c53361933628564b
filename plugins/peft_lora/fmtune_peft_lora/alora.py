"""``--plugins alora``: activated LoRA (peft's ``alora_invocation_tokens``).

    fmtune train --plugins alora --alora_invocation_string "<|check|>" ...

The adapter acts only from the last occurrence of the invocation tokens on, so
the model before it is exactly the base model (its KV cache can be reused).
Every training example must contain the invocation tokens: the data is checked
after it is prepared and before the model loads.
"""

from fmtune import hookimpl
from fmtune.config import ConfigError

from .hooks import plugin_hooks
from .selection import select

_hooks = plugin_hooks("alora")
add_options = _hooks["add_options"]
validate_config = _hooks["validate_config"]
wrap_peft = _hooks["wrap_peft"]
save = _hooks["save"]
on_train_error = _hooks["on_train_error"]

SHOWN = 10


def find(seq: list[int], sub: list[int]) -> int:
    """Start of the last occurrence of ``sub`` in ``seq`` (as peft finds it), or -1."""
    n = len(sub)
    for start in range(len(seq) - n, -1, -1):
        if seq[start] == sub[0] and seq[start:start + n] == sub:
            return start
    return -1


def check_examples(dataset, ids: list[int], text: str, split: str) -> None:
    """Every example holds the invocation tokens; else one error naming the examples that don't."""
    if not hasattr(dataset, "__len__"):
        return  # a stream: checked batch by batch is not possible up front
    missing = [i for i, row in enumerate(dataset["input_ids"]) if find(list(row), ids) < 0]
    if missing:
        shown = ", ".join(str(i + 1) for i in missing[:SHOWN])
        more = f" (first {SHOWN} shown)" if len(missing) > SHOWN else ""
        raise ConfigError(
            f"alora: {len(missing)} of {len(dataset)} {split} examples lack the invocation "
            f"tokens of {text!r} (ids {ids}): examples {shown}{more} (1-based, after data "
            "processing and truncation to max_seq_length). Tokenizers can merge the invocation "
            "string with the text around it: start it with a special token or a newline.")


@hookimpl(wrapper=True)
def prepare_data(config, tokenizer, pm):
    result = yield
    if select(config).method == "alora" and result is not None:
        from .build import invocation_tokens

        ids = invocation_tokens(config, tokenizer)
        train, evalset = result
        check_examples(train, ids, config.alora_invocation_string, "training")
        if evalset is not None:
            check_examples(evalset, ids, config.alora_invocation_string, "validation")
    return result
