"""Building the peft model: target modules, new-token embeddings, LoRA / aLoRA / prompt tuning."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

from fmtune.config import ConfigError
from fmtune.models import quant_method, without_unused_gptqmodel
from fmtune.stash import StashKey

from .selection import init_lora_weights, mutates_base, select

log = logging.getLogger("fmtune")

# PiSSA/OLoRA runs: the folder of the initial adapter, saved before training (config.stash)
INITIAL_ADAPTER = StashKey[str]()
ALL_LINEAR = "all-linear"


def base_model_dir(config) -> str:
    """Where a run with random_init_weights keeps its (random) base model."""
    return os.path.abspath(os.path.join(config.save_model_dir or config.output_dir, "base_model"))


def _is_linear(module) -> bool:
    import torch

    from transformers.pytorch_utils import Conv1D

    if isinstance(module, (torch.nn.Linear, Conv1D)):  # bnb Linear4bit/8bitLt subclass Linear
        return True
    # packed quantized linear layers that are not nn.Linear (gptqmodel's GPTQ/AWQ kernels:
    # qweight + in/out features), which peft adapts through its own dispatchers
    return all(hasattr(module, a) for a in ("qweight", "in_features", "out_features"))


def linear_names(model) -> list[str]:
    """Leaf names of the model's linear layers (what target_modules lists)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and _is_linear(m)})


def output_layer_name(model) -> str | None:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for n, m in model.named_modules():
        if m is out and n:
            return n.rsplit(".", 1)[-1]
    return None


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def resolve_target_modules(model, wanted: list[str] | None) -> list[str] | None:
    """``target_modules`` as peft gets it; unknown names are a :class:`ConfigError`."""
    import torch

    arch = type(model).__name__
    linears = linear_names(model)
    listing = f"its linear layers are: {', '.join(linears)}"
    if not wanted:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
            raise ConfigError(f"target_modules: peft has no default for {arch} ({model_type}); "
                              f"set target_modules ({listing}, or all-linear)")
        return None
    named = dict(model.named_modules())
    resolved: list[str] = []
    problems: list[str] = []
    for target in wanted:
        if target == ALL_LINEAR:
            head = output_layer_name(model)
            resolved.extend(n for n in linears if n != head)
            continue
        hits = [m for n, m in named.items() if n and _matches(n, target)]
        if not hits:
            problems.append(repr(target))
            continue
        bad = [type(m).__name__ for m in hits
               if not (_is_linear(m) or isinstance(m, torch.nn.Embedding))]
        if bad:
            raise ConfigError(f"target_modules: {target!r} is a {bad[0]}; LoRA adapts linear and "
                              f"embedding layers ({listing})")
        resolved.append(target)
    if problems:
        raise ConfigError(f"target_modules: no module named {', '.join(problems)} in {arch}; "
                          f"{listing}")
    return sorted(dict.fromkeys(resolved))


def check_modules_to_save(model, names: list[str] | None) -> None:
    if not names:
        return
    modules = [n for n, _ in model.named_modules() if n]
    missing = [t for t in names if not any(_matches(n, t) for n in modules)]
    if missing:
        tops = sorted({n.rsplit(".", 1)[-1] for n in modules if not n.rsplit(".", 1)[-1].isdigit()})
        raise ConfigError(f"modules_to_save: no module named {', '.join(map(repr, missing))} in "
                          f"{type(model).__name__}; its modules are: {', '.join(tops)}")


def check_layers(model, config) -> None:
    """``layers_to_transform`` indices exist in the model (without layers_pattern: its
    ``num_hidden_layers``); peft would only say that no target module was found."""
    wanted = config.get("layers_to_transform")
    if not wanted or config.get("layers_pattern"):
        return
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(count, int):
        return
    try:
        missing = [int(v) for v in wanted if int(v) >= count]
    except ValueError:
        return  # reported by the option checks
    if missing:
        raise ConfigError(f"layers_to_transform: {type(model).__name__} has {count} layers "
                          f"(0-{count - 1}); no layer {', '.join(map(str, missing))}")


def auto_model_class(cfg):
    """The transformers Auto class that builds the whole model of config ``cfg``:
    ``AutoModelForImageTextToText`` for a vision-language model type (Mllama also maps to a
    text-only causal LM, without its vision tower), else ``AutoModelForCausalLM``. The one
    place the plugin chooses (structure checks, merge)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if getattr(cfg, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def meta_model(config):
    """The model's structure without weights (for checks before loading), or None."""
    path = config.model_name_or_path
    if not path:
        return None
    folder = os.path.dirname(path) if os.path.isfile(path) else path
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return None  # a hub id: checked once the model is loaded
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(folder, trust_remote_code=config.trust_remote_code)
        # a vision-language model: its whole structure, as the vision plugin loads it
        auto = auto_model_class(cfg)
        with init_empty_weights():
            return auto.from_config(cfg, trust_remote_code=config.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - the real load reports it properly
        log.debug("no structure check: %s", e)
        return None


def structure_problems(config) -> list[str]:
    """target_modules / modules_to_save against the model's structure, before it loads."""
    sel = select(config)
    if sel.method not in ("lora", "alora") or config.get("continue_from_adapter"):
        return []
    model = meta_model(config)
    if model is None:
        return []
    out = []
    for check in (lambda: resolve_target_modules(model, config.target_modules),
                  lambda: check_modules_to_save(model, config.modules_to_save),
                  lambda: check_layers(model, config)):
        try:
            check()
        except ConfigError as e:
            out.append(str(e))
    return out


def added_token_ids(config, tokenizer) -> list[int]:
    """Ids of the tokens this run added to the base tokenizer (e.g. data special tokens)."""
    if config.random_init_weights or config.tokenizer_train_files:
        return []  # every embedding is new and trained from scratch anyway
    from transformers import AutoTokenizer

    from fmtune.models import from_pretrained

    base = from_pretrained(AutoTokenizer.from_pretrained,
                           config.tokenizer_name_or_path or config.model_name_or_path, "tokenizer",
                           trust_remote_code=config.trust_remote_code)
    return list(range(len(base), len(tokenizer)))


def _trainable_tokens(model, config, tokenizer) -> dict[str, list[int]] | None:
    """New tokens' embedding rows to train (peft trainable tokens), unless trained in full."""
    ids = added_token_ids(config, tokenizer)
    if not ids:
        return None
    emb = model.get_input_embeddings()
    emb_name = next(n for n, m in model.named_modules() if m is emb).rsplit(".", 1)[-1]
    full = set(config.modules_to_save or []) | set(config.target_modules or [])
    if emb_name in full:
        log.info("%d new tokens: %s is trained in full (modules_to_save)", len(ids), emb_name)
        return None
    layers = {emb_name: ids}
    tied = getattr(model.config, "tie_word_embeddings", False)
    head = output_layer_name(model)
    if head and not tied and head not in full:
        layers[head] = ids
    log.info("%d new tokens (ids %d-%d): training their rows of %s%s", len(ids), ids[0], ids[-1],
             emb_name, f" and {head}" if head in layers else " (tied with the output layer)")
    return layers


def invocation_tokens(config, tokenizer) -> list[int]:
    ids = tokenizer.encode(config.alora_invocation_string, add_special_tokens=False)
    if not ids:
        raise ConfigError(f"alora_invocation_string {config.alora_invocation_string!r} has no tokens")
    return ids


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


def _save_random_base(model, config) -> None:
    folder = base_model_dir(config)
    if getattr(model, "name_or_path", None) == folder:
        return  # qlora built and saved it already
    from accelerate import PartialState

    if PartialState().is_main_process:
        log.info("random_init_weights: saving the random base model to %s (the adapter needs it)",
                 folder)
        model.save_pretrained(folder)
    model.config._name_or_path = folder


def _lora_config(model, config, tokenizer, method):
    from peft import LoraConfig

    init = init_lora_weights(config.init_lora_weights)
    kwargs = dict(
        task_type="CAUSAL_LM", r=config.r, lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=resolve_target_modules(model, config.target_modules),
        modules_to_save=list(config.modules_to_save) if config.modules_to_save else None,
        use_rslora=config.use_rslora, use_dora=config.use_dora, init_lora_weights=init,
        trainable_token_indices=_trainable_tokens(model, config, tokenizer),
        ensure_weight_tying=bool(getattr(model.config, "tie_word_embeddings", False)
                                 and config.modules_to_save),
    )
    check_modules_to_save(model, config.modules_to_save)
    if config.get("exclude_modules"):
        kwargs["exclude_modules"] = list(config.exclude_modules)
    if config.get("layers_to_transform"):
        kwargs["layers_to_transform"] = [_layer_index(v) for v in config.layers_to_transform]
    if config.get("layers_pattern"):
        kwargs["layers_pattern"] = list(config.layers_pattern)
    if method == "alora":
        kwargs["alora_invocation_tokens"] = invocation_tokens(config, tokenizer)
    return LoraConfig(**kwargs)


def _layer_index(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"layers_to_transform: {value!r} is not a layer index") from None


def _prompt_tuning_config(config, tokenizer):
    from peft import PromptTuningConfig

    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=config.num_virtual_tokens,
                  prompt_tuning_init=config.prompt_tuning_init)
    if config.prompt_tuning_init == "TEXT":
        # peft reads the init text's tokens with a tokenizer it loads by path: give it ours
        folder = tempfile.mkdtemp(prefix="fmtune-pt-tokenizer-")
        tokenizer.save_pretrained(folder)
        kwargs.update(prompt_tuning_init_text=config.prompt_tuning_init_text,
                      tokenizer_name_or_path=folder)
    return PromptTuningConfig(**kwargs)


def wrap(model, config, tokenizer):
    """The peft model for this run, or None for full fine-tuning."""
    from peft import prepare_model_for_kbit_training
    from transformers import set_seed

    sel = select(config)
    if sel.method is None:
        return None
    if config.random_init_weights:
        _save_random_base(model, config)
    if sel.quantize:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(config.gradient_checkpointing))
    elif config.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need grads
    set_seed(config.seed)  # the adapter's random init depends on the seed only
    with without_unused_gptqmodel(quant_method(model)):
        peft_model = _peft_model(model, config, tokenizer, sel)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("%s: training %d of %d parameters (%.2f%%)", describe(sel, config), trainable, total,
             100 * trainable / max(total, 1))
    return peft_model


def _peft_model(model, config, tokenizer, sel):
    from peft import PeftModel, get_peft_model

    if config.continue_from_adapter:
        log.info("continuing training from the adapter in %s", config.continue_from_adapter)
        peft_model = PeftModel.from_pretrained(model, config.continue_from_adapter, is_trainable=True)
    elif sel.method == "pt":
        pt_config = _prompt_tuning_config(config, tokenizer)
        peft_model = get_peft_model(model, pt_config)
        if pt_config.tokenizer_name_or_path:  # read once, for the TEXT init
            shutil.rmtree(pt_config.tokenizer_name_or_path, ignore_errors=True)
    else:
        lora_config = _lora_config(model, config, tokenizer, sel.method)
        peft_model = get_peft_model(model, lora_config)
        if mutates_base(lora_config.init_lora_weights):
            config.stash[INITIAL_ADAPTER] = _save_initial_adapter(peft_model)
    return peft_model


def _save_initial_adapter(peft_model) -> str:
    """PiSSA/OLoRA: keep the initial adapter so the final one can be converted to plain LoRA;
    returns its folder."""
    folder = tempfile.mkdtemp(prefix="fmtune-initial-adapter-")
    cfg = peft_model.peft_config["default"]
    init = cfg.init_lora_weights
    cfg.init_lora_weights = True  # what peft expects in the saved initial adapter
    try:
        peft_model.save_pretrained(folder)
    finally:
        cfg.init_lora_weights = init
    return folder


def describe(sel, config) -> str:
    if config.get("continue_from_adapter"):
        return f"{sel.method} adapter from {config.continue_from_adapter}"
    if sel.method == "pt":
        return f"prompt tuning ({config.num_virtual_tokens} virtual tokens)"
    name = {"lora": "LoRA", "alora": "aLoRA"}[sel.method]
    if sel.quantize:
        name = f"{name} on a {'8' if config.load_in_8bit else '4'}-bit base"
    return f"{name} (r {config.r})"
