"""``--plugins vision``: vision-language models (LLaVA 1.5, LLaVA-Next, Granite Vision,
Llama 3.2 Vision, ...) fine-tuned in full or with LoRA on image + text conversations.

    fmtune train --plugins vision --model_name_or_path llava-hf/llava-1.5-7b-hf \\
        --training_data_path chat.jsonl --dataset_text_field messages \\
        --dataset_image_field images ...
    fmtune train --plugins vision,lora ...        # LoRA on the language model's linear layers

The plugin answers ``load_tokenizer`` (the processor's tokenizer; the processor is kept on the
run's stash), ``load_model`` (``AutoModelForImageTextToText``), ``prepare_data``
(:mod:`fmtune_vision.data`) and ``build_collator`` (:mod:`fmtune_vision.collator`), and saves
the processor next to the model (final folder and checkpoints). With a LoRA plugin and no
``target_modules`` it sets them to the linear layers of ``vision_lora_parts``. No torch at import.
"""

from __future__ import annotations

import logging
import os

from fmtune import hookimpl
from fmtune.records import missing_eval_data
from fmtune.stash import StashKey

log = logging.getLogger("fmtune")

PROCESSOR = StashKey[object]()
ARCH = StashKey[object]()
SOURCES = StashKey[dict]()
DEFAULT_TARGETS = StashKey[list]()  # vision_lora_parts, when target_modules was left unset

PARTS = ("language_model", "vision_tower", "projector")
LORA_FAMILY = ("lora", "alora", "qlora")


@hookimpl
def add_options(register):
    register("dataset_image_field", str, "images", "Column holding each conversation's images "
             "(fms-hf-tuning): one image or a list, as paths, bytes or data URLs, in the order "
             "of the {\"type\": \"image\"} parts of the conversation in dataset_text_field "
             "(default messages).")
    register("chat_template", str, None, "Chat template: a built-in name, a file or the Jinja "
             "text (default: the processor's). It is saved with the trained processor.",
             shared=True)
    register("vision_lora_parts", list, ["language_model"], "With a LoRA plugin and no "
             "target_modules: the parts whose linear layers LoRA adapts: any of "
             "language_model, vision_tower, projector (target_modules all-linear adapts every "
             "linear layer of all three).")


def _lora_active(config) -> bool:
    return any(n in config.plugins for n in LORA_FAMILY) and \
        config.get("peft_method") not in ("none", "pt", "prompt_tuning")


@hookimpl(tryfirst=True)
def validate_config(config):
    """Checks the vision options; with a LoRA plugin and no target_modules, sets them (before
    the LoRA plugin checks them against the model)."""
    problems = []
    if not config.training_data_path:
        problems.append("vision: training_data_path is required (JSONL, JSON, parquet or arrow "
                        "image + text conversations)")
    for name in ("data_formatter_template", "response_template", "data_config_path",
                 "packing", "padding_free"):
        if config.get(name):
            problems.append(f"vision: {name} is not supported with image + text conversations "
                            "(the chat template renders them; assistant turns are trained)")
    problems.append(missing_eval_data(config, "validation_data_path"))
    bad = [p for p in config.vision_lora_parts or [] if p not in PARTS]
    if bad or not config.vision_lora_parts:
        problems.append(f"vision_lora_parts: {', '.join(map(repr, bad)) or 'empty'}; give any of "
                        f"{', '.join(PARTS)}")
    if config.get("chat_template") is not None:
        from fmtune.config import ConfigError
        from fmtune.records import resolve_chat_template

        try:
            resolve_chat_template(config.chat_template)
        except ConfigError as e:
            problems.append(str(e))
    problems = [p for p in problems if p]
    if problems or not config.model_name_or_path:
        return problems
    return problems + _model_problems(config)


def _model_problems(config) -> list[str]:
    from fmtune.config import ConfigError

    from .models import arch_of, linear_modules, meta_model, model_config

    try:
        cfg = model_config(config)
        arch = arch_of(cfg)
    except ConfigError as e:
        return [str(e)]
    config.stash[ARCH] = arch
    problems = []
    if "qlora" in config.plugins and config.random_init_weights:
        problems.append("vision with qlora: random_init_weights is not supported (save the "
                        "random model with fmtune_vision.testing or a first run, then train "
                        "from that folder)")
    if config.get("lora_post_process_for_vllm") and arch.model_type == "mllama":
        # known before training: the LoRA plugin's export at the end would refuse it
        problems.append("lora_post_process_for_vllm: vLLM serves no LoRA adapter on Llama 3.2 "
                        "Vision (MllamaForConditionalGeneration); merge the adapter after "
                        "training (fmtune merge) and serve the merged model")
    explicit = config.source("vision_lora_parts") != "default"
    if not _lora_active(config):
        if explicit:
            problems.append("vision_lora_parts needs a LoRA plugin (--plugins vision,lora)")
        return problems
    targets_set = "target_modules" in config and config.source("target_modules") not in (
        "default", "set by a plugin")
    if targets_set or config.get("continue_from_adapter"):
        if explicit:
            problems.append("vision_lora_parts applies only when target_modules is unset; "
                            "remove one of them")
        return problems
    meta = meta_model(cfg)
    if not linear_modules(meta, list(config.vision_lora_parts)):
        problems.append(f"vision_lora_parts {','.join(config.vision_lora_parts)}: "
                        f"{arch.class_name} has no linear layers there")
        return problems
    # the LoRA plugin checks target_modules against the text model of the architecture: the
    # language model's leaf names pass it; wrap_peft (below) gives peft the full names
    config.target_modules = sorted({n.rsplit(".", 1)[-1]
                                    for n in linear_modules(meta, ["language_model"])})
    config.stash[DEFAULT_TARGETS] = list(config.vision_lora_parts)
    return problems


@hookimpl(wrapper=True)
def wrap_peft(model, config):
    """With a LoRA plugin and no target_modules: the full names of the linear layers of
    ``vision_lora_parts`` (leaf names such as q_proj would match the vision tower too)."""
    parts = config.stash.get(DEFAULT_TARGETS)
    if parts:
        from .models import linear_modules

        names = linear_modules(model, parts)
        config.target_modules = names
        log.info("LoRA targets: the %d linear layers of the %s (vision_lora_parts)",
                 len(names), ", ".join(p.replace("_", " ") for p in parts))
    return (yield)


@hookimpl(tryfirst=True)
def load_tokenizer(config):
    from .models import load_processor

    processor = load_processor(config)
    config.stash[PROCESSOR] = processor
    return processor.tokenizer


@hookimpl(tryfirst=True)
def prepare_data(config, tokenizer):
    from fmtune.records import resolve_chat_template

    from .data import build
    from .models import arch_of, model_config

    processor = config.stash[PROCESSOR]
    if config.get("chat_template") is not None:  # saved with the processor
        processor.chat_template = resolve_chat_template(config.chat_template)
    arch = config.stash.get(ARCH) or arch_of(model_config(config))
    config.stash[ARCH] = arch
    sources = {}
    train, src = build(config, processor, config.training_data_path, "train", arch.one_image,
                       arch.class_name)
    sources["train"] = src
    evalset = None
    if config.validation_data_path:
        evalset, src = build(config, processor, config.validation_data_path, "validation",
                             arch.one_image, arch.class_name)
        sources["validation"] = src
    config.stash[SOURCES] = {k: v for k, v in sources.items() if v is not None}
    return train, evalset


@hookimpl(tryfirst=True)
def load_model(config, tokenizer):
    from .models import load_model as load

    return load(config, tokenizer)


@hookimpl(tryfirst=True)
def build_collator(tokenizer, config):
    from .collator import VisionCollator

    return VisionCollator(config.stash[PROCESSOR], config.stash[ARCH].nested,
                          config.stash.get(SOURCES))


@hookimpl(wrapper=True)
def save(model, tokenizer, output_dir, config, trainer):
    """Whoever saves the model (full or adapter), the processor goes with it."""
    saved = yield
    if saved and trainer.is_world_process_zero():
        config.stash[PROCESSOR].save_pretrained(saved)
    return saved


@hookimpl
def on_save(run, checkpoint_dir):
    if run.is_main_process and os.path.isdir(checkpoint_dir):
        run.config.stash[PROCESSOR].save_pretrained(checkpoint_dir)
