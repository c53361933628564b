"""The options of the four PEFT entry points, and how they share them.

Each entry point registers the options its users need, so ``--plugins qlora``
alone gives the LoRA options and the 4-bit ones. Options shared by several
entry points (``r``, ``lora_alpha``, ``peft_method``...) are registered once per
option registry: when two of these plugins are active together (``alora,qlora``)
the second one finds the option already registered by its sibling and skips it.
They are registered with ``shared=True``: the core keeps one option when every
registration of a name is shared, and still refuses a name a foreign plugin also
registers without sharing. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


# Entry point names (what users type in --plugins), in the order they act.
FAMILY = ("lora", "alora", "qlora", "prompt_tuning")
LORA_FAMILY = ("lora", "alora", "qlora")

PEFT_METHODS = ("lora", "alora", "pt", "prompt_tuning", "none")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Spec:
    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    aliases: tuple[str, ...] = field(default=())


COMMON = (
    Spec("peft_method", str, None,
         "PEFT method (fms-hf-tuning name): lora, alora, pt (prompt tuning) or none (full "
         "fine-tuning). Default: the method of the active plugin (alora for --plugins alora, pt "
         "for prompt_tuning, else lora).", PEFT_METHODS),
    Spec("continue_from_adapter", str, None,
         "Adapter folder (adapter_config.json) to continue training from, instead of a new "
         "adapter; its r, alpha, target modules, ... are kept (setting different ones is an "
         "error)."),
)

LORA = (
    Spec("r", int, 8, "LoRA rank.", aliases=("lora_r",)),  # lora_r: as the seeds write it
    Spec("lora_alpha", float, 32.0, "LoRA scaling numerator (scaling = lora_alpha / r, or / sqrt(r) "
         "with use_rslora)."),
    Spec("lora_dropout", float, 0.05, "Dropout on the LoRA input."),
    Spec("target_modules", list, None,
         "Module names to adapt (leaf names such as q_proj,v_proj), or all-linear (every linear "
         "layer but the output layer; lm_head only when listed). Default: peft's choice for the "
         "architecture (q_proj,v_proj for Llama)."),
    Spec("modules_to_save", list, None,
         "Modules trained in full and saved with the adapter (e.g. embed_tokens,lm_head)."),
    Spec("use_rslora", bool, False, "Rank-stabilized LoRA: scale by lora_alpha / sqrt(r)."),
    Spec("use_dora", bool, False, "Weight-decomposed LoRA (DoRA)."),
    Spec("init_lora_weights", str, "true",
         "Adapter initialization: true (B = 0), false (random, for tests), gaussian, "
         "orthogonal, pissa, pissa_niter_N (fast SVD with N iterations), olora. PiSSA and "
         "OLoRA change the base weights while training; the saved adapter is converted to a "
         "plain LoRA on the original base."),
    # peft LoraConfig fields fms-hf-tuning exposes with the same names
    Spec("exclude_modules", list, None,
         "Module names (or one regex) peft must not adapt, even when target_modules matches "
         "them."),
    Spec("layers_to_transform", list, None,
         "Layer indices to adapt (others stay as they are); with layers_pattern when the "
         "model's layer list is not named layers/h/blocks."),
    Spec("layers_pattern", list, None, "Name of the model's list of layers, for "
         "layers_to_transform."),
    Spec("lora_post_process_for_vllm", bool, False,
         "After saving, also write OUTPUT/vllm: the adapter in the layout vLLM loads (new-token "
         "embeddings in new_embeddings.safetensors). Checked before training: settings vLLM "
         "cannot serve are refused up front."),
)

ALORA = (
    Spec("alora_invocation_string", str, None,
         "Activated LoRA: the adapter acts only from the last occurrence of this string's tokens "
         "on; every training example must contain it (required)."),
)

QLORA = (
    Spec("load_in_8bit", bool, False, "Quantize the base to 8 bits (LLM.int8) instead of 4."),
    Spec("bnb_4bit_quant_type", str, "nf4", "4-bit data type.", ("nf4", "fp4")),
    Spec("bnb_4bit_use_double_quant", bool, True, "Quantize the 4-bit quantization constants too."),
    Spec("bnb_4bit_compute_dtype", str, "auto",
         "dtype of the 4-bit matmuls; auto = torch_dtype's (bfloat16 on a bf16 GPU, else float32).",
         ("auto", *COMPUTE_DTYPES)),
)

PROMPT_TUNING = (
    Spec("num_virtual_tokens", int, 8, "Number of trained virtual tokens prepended to every input."),
    Spec("prompt_tuning_init", str, "RANDOM",
         "Initialize the virtual tokens from the embeddings of prompt_tuning_init_text (TEXT) or "
         "randomly (RANDOM).", ("TEXT", "RANDOM")),
    Spec("prompt_tuning_init_text", str, None, "Text whose token embeddings initialize the virtual "
         "tokens (with prompt_tuning_init TEXT)."),
)

GROUPS = {
    "lora": (COMMON, LORA),
    "alora": (COMMON, LORA, ALORA),
    "qlora": (COMMON, LORA, QLORA),
    "prompt_tuning": (COMMON, PROMPT_TUNING),
}


def register_group(register, plugin: str) -> None:
    """Register ``plugin``'s options as shared: a sibling PEFT plugin active in the same run
    (``alora,qlora``) registers the same options, and the core keeps one of each."""
    for group in GROUPS[plugin]:
        for spec in group:
            register(spec.name, spec.type, spec.default, spec.help, choices=spec.choices,
                     aliases=spec.aliases, shared=True)
