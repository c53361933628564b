"""The options of the four PEFT entry points (the core's :class:`fmtune.config.Option`).

Each entry point registers the options its users need (:class:`fmtune_peft_lora.hooks.PeftMethod`
takes its groups), so ``--plugins qlora`` alone gives the LoRA options and the 4-bit ones.
Options shared by several entry points (``r``, ``lora_alpha``, ``peft_method``...) are
registered once per option registry: every one is ``shared=True``, so when two of these plugins
are active together (``alora,qlora``) the core keeps the first registration of a name, and
still refuses a name a foreign plugin also registers without sharing. No torch here.
"""

from __future__ import annotations

from functools import partial

from fmtune.config import Option


# Entry point names (what users type in --plugins), in the order they act.
FAMILY = ("lora", "alora", "qlora", "prompt_tuning")
LORA_FAMILY = ("lora", "alora", "qlora")

PEFT_METHODS = ("lora", "alora", "pt", "prompt_tuning", "none")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


# every option here is shared (see above); the core's registry records the entry point that
# registers it as its plugin
opt = partial(Option, plugin="fmtune-peft-lora", shared=True)


COMMON = (
    opt("peft_method", str, None,
        "PEFT method (fms-hf-tuning name): lora, alora, pt (prompt tuning) or none (full "
        "fine-tuning). Default: the method of the active plugin (alora for --plugins alora, pt "
        "for prompt_tuning, else lora).", choices=PEFT_METHODS),
    opt("continue_from_adapter", str, None,
        "Adapter folder (adapter_config.json) to continue training from, instead of a new "
        "adapter; its r, alpha, target modules, ... are kept (setting different ones is an "
        "error)."),
)

LORA = (
    opt("r", int, 8, "LoRA rank.", aliases=("lora_r",)),  # lora_r: as the seeds write it
    opt("lora_alpha", float, 32.0, "LoRA scaling numerator (scaling = lora_alpha / r, or / sqrt(r) "
        "with use_rslora)."),
    opt("lora_dropout", float, 0.05, "Dropout on the LoRA input."),
    opt("target_modules", list, None,
        "Module names to adapt (leaf names such as q_proj,v_proj), or all-linear (every linear "
        "layer but the output layer; lm_head only when listed). Default: peft's choice for the "
        "architecture (q_proj,v_proj for Llama)."),
    opt("modules_to_save", list, None,
        "Modules trained in full and saved with the adapter (e.g. embed_tokens,lm_head)."),
    opt("use_rslora", bool, False, "Rank-stabilized LoRA: scale by lora_alpha / sqrt(r)."),
    opt("use_dora", bool, False, "Weight-decomposed LoRA (DoRA)."),
    opt("init_lora_weights", str, "true",
        "Adapter initialization: true (B = 0), false (random, for tests), gaussian, "
        "orthogonal, pissa, pissa_niter_N (fast SVD with N iterations), olora. PiSSA and "
        "OLoRA change the base weights while training; the saved adapter is converted to a "
        "plain LoRA on the original base."),
    # peft LoraConfig fields fms-hf-tuning exposes with the same names
    opt("exclude_modules", list, None,
        "Module names (or one regex) peft must not adapt, even when target_modules matches "
        "them."),
    opt("layers_to_transform", list, None,
        "Layer indices to adapt (others stay as they are); with layers_pattern when the "
        "model's layer list is not named layers/h/blocks."),
    opt("layers_pattern", list, None, "Name of the model's list of layers, for "
        "layers_to_transform."),
    opt("lora_post_process_for_vllm", bool, False,
        "After saving, also write OUTPUT/vllm: the adapter in the layout vLLM loads (new-token "
        "embeddings in new_embeddings.safetensors). Checked before training: settings vLLM "
        "cannot serve are refused up front."),
)

ALORA = (
    opt("alora_invocation_string", str, None,
        "Activated LoRA: the adapter acts only from the last occurrence of this string's tokens "
        "on; every training example must contain it (required)."),
)

QLORA = (
    opt("load_in_8bit", bool, False, "Quantize the base to 8 bits (LLM.int8) instead of 4."),
    opt("bnb_4bit_quant_type", str, "nf4", "4-bit data type.", choices=("nf4", "fp4")),
    opt("bnb_4bit_use_double_quant", bool, True, "Quantize the 4-bit quantization constants too."),
    opt("bnb_4bit_compute_dtype", str, "auto",
        "dtype of the 4-bit matmuls; auto = torch_dtype's (bfloat16 on a bf16 GPU, else float32).",
        choices=("auto", *COMPUTE_DTYPES)),
)

PROMPT_TUNING = (
    opt("num_virtual_tokens", int, 8, "Number of trained virtual tokens prepended to every input."),
    opt("prompt_tuning_init", str, "RANDOM",
        "Initialize the virtual tokens from the embeddings of prompt_tuning_init_text (TEXT) or "
        "randomly (RANDOM).", choices=("TEXT", "RANDOM")),
    opt("prompt_tuning_init_text", str, None, "Text whose token embeddings initialize the virtual "
        "tokens (with prompt_tuning_init TEXT)."),
)
