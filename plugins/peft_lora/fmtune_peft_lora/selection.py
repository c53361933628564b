"""Which PEFT method a run uses, which plugin acts for it, and the config checks.

``--plugins`` decides the method unless ``peft_method`` says otherwise:
``lora`` -> LoRA, ``alora`` -> activated LoRA, ``prompt_tuning`` -> prompt
tuning, ``qlora`` -> LoRA on a 4-bit (or 8-bit) base; ``alora,qlora`` is aLoRA
on a quantized base. When several of these plugins are active, the first one
named (the *owner*) validates, wraps and saves for all of them, so nothing runs
twice. No torch at import.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from .export import ADAPTER_CONFIG, read_adapter_config, vllm_refusals
from .options import FAMILY, LORA, LORA_FAMILY, PROMPT_TUNING

_PISSA_NITER = re.compile(r"pissa_niter_[1-9][0-9]*")
SUPPORTED_INIT = ("true", "false", "gaussian", "orthogonal", "pissa", "olora")
UNSUPPORTED_INIT = {
    "eva": "needs a data-driven EvaConfig",
    "corda": "needs a CordaConfig and a calibration pass",
    "loftq": "needs a LoftQConfig",
    "lora_ga": "needs gradient estimation before training",
    "mica": "is not wired into fmtune",
}


@dataclass
class Selection:
    active: list[str]          # active PEFT plugins, in --plugins order
    owner: str | None          # the one that acts for all
    method: str | None         # "lora", "alora", "pt"; None = full fine-tuning
    quantize: bool             # qlora active: load the base through bitsandbytes


def select(config) -> Selection:
    active = [n for n in getattr(config, "plugins", []) if n in FAMILY]
    owner = active[0] if active else None
    requested = config.get("peft_method")
    if requested == "prompt_tuning":
        requested = "pt"
    if requested == "none":
        method = None
    elif requested:
        method = requested
    elif "alora" in active:
        method = "alora"
    elif "prompt_tuning" in active:
        method = "pt"
    elif active:
        method = "lora"
    else:
        method = None
    return Selection(active, owner, method, "qlora" in active)


def init_lora_weights(value: str) -> bool | str:
    """The ``init_lora_weights`` value for peft (``"true"`` -> True)."""
    low = str(value).strip().lower()
    if low in ("true", "false"):
        return low == "true"
    return low


def mutates_base(init: Any) -> bool:
    """PiSSA and OLoRA subtract their initial adapter from the base weights."""
    return isinstance(init, str) and (init in ("pissa", "olora") or init.startswith("pissa_niter_"))


def explicitly_set(config, name: str) -> bool:
    return name in config and config.source(name) != "default"


def _lora_problems(config, sel: Selection) -> list[str]:
    problems = []
    if config.r < 1:
        problems.append(f"r must be >= 1, got {config.r}")
    if not 0 < config.lora_alpha < float("inf"):
        problems.append(f"lora_alpha must be > 0 (and finite), got {config.lora_alpha}")
    for name in ("target_modules", "modules_to_save", "exclude_modules", "layers_pattern"):
        if explicitly_set(config, name) and config.get(name) is not None and not config.get(name):
            problems.append(f"{name} is empty: give module names"
                            + (", or all-linear (unset: peft's default for the architecture)"
                               if name == "target_modules" else " (or leave it unset)"))
    layers = config.get("layers_to_transform") or []
    bad = [v for v in layers if not str(v).strip().isdigit()]
    if bad:
        problems.append(f"layers_to_transform: {', '.join(map(repr, bad))} "
                        f"{'is not a layer index' if len(bad) == 1 else 'are not layer indices'} "
                        "(integers >= 0)")
    if config.get("layers_pattern") and not layers:
        problems.append("layers_pattern needs layers_to_transform (the layer indices to adapt)")
    if not 0 <= config.lora_dropout < 1:
        problems.append(f"lora_dropout must be in [0, 1), got {config.lora_dropout}")
    init = str(config.init_lora_weights).strip().lower()
    if init in UNSUPPORTED_INIT:
        problems.append(f"init_lora_weights {init} {UNSUPPORTED_INIT[init]}; supported: "
                        "true, false, gaussian, orthogonal, pissa, pissa_niter_N, olora")
    elif init not in SUPPORTED_INIT and not _PISSA_NITER.fullmatch(init):
        problems.append(f"init_lora_weights must be one of true, false, gaussian, orthogonal, "
                        f"pissa, pissa_niter_N (N >= 1), olora; got {config.init_lora_weights!r}")
    elif mutates_base(init):
        if sel.quantize:
            problems.append(f"init_lora_weights {init} rewrites the base weights, which a 4/8-bit "
                            "base cannot take: use it without qlora")
        if sel.method == "alora":
            problems.append(f"init_lora_weights {init} changes the base weights everywhere, which "
                            "breaks aLoRA's promise of base behaviour before the invocation")
    if sel.method == "alora" and config.use_dora:
        problems.append("use_dora: peft's aLoRA does not support DoRA")
    if sel.method == "alora" and config.modules_to_save:
        problems.append("modules_to_save with aLoRA: fully trained modules act on every token, "
                        "including those before the invocation")
    return problems


def _vllm_problems(config, sel: Selection) -> list[str]:
    """What `export-vllm` would refuse, reported before training (lora_post_process_for_vllm)."""
    return [f"lora_post_process_for_vllm: {r}" for r in vllm_refusals({
        "peft_type": "PROMPT_TUNING" if sel.method == "pt" else "LORA",
        "use_dora": config.get("use_dora"),
        "alora_invocation_tokens": [0] if sel.method == "alora" else None,
        "modules_to_save": config.get("modules_to_save"),
        "target_modules": config.get("target_modules"),
    })]


def _continue_problems(config, sel: Selection) -> list[str]:
    path = config.continue_from_adapter
    if not os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        return [f"continue_from_adapter: {path} has no {ADAPTER_CONFIG}"]
    saved = read_adapter_config(path)
    if saved is None:
        return [f"continue_from_adapter: {path}/{ADAPTER_CONFIG} is not a readable JSON object"]
    kind = saved.get("peft_type")
    want = "PROMPT_TUNING" if sel.method == "pt" else "LORA"
    problems = []
    if kind != want:
        problems.append(f"continue_from_adapter: {path} holds a {kind} adapter, but this run "
                        f"trains {sel.method}")
        return problems
    if want == "LORA":
        is_alora = bool(saved.get("alora_invocation_tokens"))
        if is_alora != (sel.method == "alora"):
            problems.append(f"continue_from_adapter: {path} is {'an aLoRA' if is_alora else 'a LoRA'}"
                            f" adapter but this run trains {sel.method}")
        specs = {s.name for s in LORA} - {"lora_post_process_for_vllm", "init_lora_weights"}
    else:
        specs = {s.name for s in PROMPT_TUNING}
    for name in sorted(specs):
        if not explicitly_set(config, name):
            continue
        ours, theirs = config.get(name), saved.get(name)
        if name == "target_modules" and isinstance(theirs, list):
            ours, theirs = sorted(ours or []), sorted(theirs)
        elif isinstance(theirs, (int, float)) and isinstance(ours, (int, float)):
            ours, theirs = float(ours), float(theirs)
        if ours != theirs:
            problems.append(f"continue_from_adapter: {name} is {config.get(name)!r} here but "
                            f"{saved.get(name)!r} in {path}; drop the option (the adapter's value "
                            "is used)")
    return problems


def problems(config) -> list[str]:
    """Every problem with the PEFT options (run once, by the owner)."""
    sel = select(config)
    out: list[str] = []
    if "prompt_tuning" in sel.active and len(sel.active) > 1:
        others = [n for n in sel.active if n != "prompt_tuning"]
        out.append(f"--plugins {','.join(sel.active)}: prompt_tuning cannot be combined with "
                   f"{', '.join(others)}; use one PEFT method per run")
    requested = config.get("peft_method")
    if requested == "alora" and "alora" not in sel.active:
        out.append("peft_method alora needs --plugins alora (it owns alora_invocation_string)")
    if requested in ("pt", "prompt_tuning") and "prompt_tuning" not in sel.active:
        out.append(f"peft_method {requested} needs --plugins prompt_tuning")
    if requested == "lora" and "alora" in sel.active:
        out.append("peft_method lora but the alora plugin is active: drop one of them")
    elif requested == "lora" and not set(sel.active) & {"lora", "qlora"}:
        out.append(f"peft_method lora with --plugins {','.join(sel.active)}: use --plugins lora")
    if out:
        return out  # the method itself is unclear: its options' checks would only add noise
    if sel.method is None:
        if sel.quantize:
            out.append("peft_method none with qlora: a 4/8-bit base cannot be trained in full")
        set_opts = [n for n in ("continue_from_adapter", "r", "lora_alpha", "target_modules",
                                "modules_to_save", "alora_invocation_string", "num_virtual_tokens")
                    if explicitly_set(config, n)]
        if set_opts:
            out.append(f"peft_method none (full fine-tuning) ignores {', '.join(set_opts)}: "
                       "remove them or pick a PEFT method")
        return out
    if sel.method in ("lora", "alora") and any(n in sel.active for n in LORA_FAMILY):
        out.extend(_lora_problems(config, sel))
        if config.lora_post_process_for_vllm:
            out.extend(_vllm_problems(config, sel))
    if sel.method == "alora" and not config.get("alora_invocation_string"):
        out.append("alora_invocation_string is required with alora (the text that switches the "
                   "adapter on; every training example must contain it)")
    if sel.method == "pt":
        if config.num_virtual_tokens < 1:
            out.append(f"num_virtual_tokens must be >= 1, got {config.num_virtual_tokens}")
        if config.prompt_tuning_init == "TEXT" and not config.prompt_tuning_init_text:
            out.append("prompt_tuning_init TEXT needs prompt_tuning_init_text")
        if config.prompt_tuning_init == "RANDOM" and config.prompt_tuning_init_text:
            out.append("prompt_tuning_init_text is set but prompt_tuning_init is RANDOM: set "
                       "prompt_tuning_init TEXT to use it")
    if sel.quantize:
        if config.load_in_8bit:
            set_4bit = [n for n in ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
                                    "bnb_4bit_compute_dtype") if explicitly_set(config, n)]
            if set_4bit:
                out.append(f"load_in_8bit is set, so {', '.join(set_4bit)} (4-bit options) would "
                           "be ignored: remove them")
    if config.get("continue_from_adapter"):
        out.extend(_continue_problems(config, sel))
    return out
