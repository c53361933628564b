"""``--plugins gptq,lora``: LoRA on a GPTQ-quantized checkpoint (GPTQ-LoRA).

    fmtune train --plugins gptq,lora --model_name_or_path MY-GPTQ-MODEL --target_modules all-linear

The checkpoint is loaded through transformers' GPTQ integration (gptqmodel + optimum): its
linear layers stay packed 4-bit (or 2/3/8-bit) and frozen, and the ``lora`` plugin puts peft's
GPTQ LoRA layers on them. fms-hf-tuning's ``--auto_gptq triton_v2`` is accepted (it selects
gptqmodel's triton kernel on a GPU; on CPU the fallback is logged). No torch at import.
"""

from __future__ import annotations

import logging

from fmtune import hookimpl

from .common import Compatibility, QuantFormat, load_quantized, missing_packages

log = logging.getLogger("fmtune")

FORMAT = QuantFormat(Compatibility(
    me="gptq",
    combines={
        "lora": "LoRA adapters on the frozen GPTQ layers (peft's GPTQ LoRA layers)",
        "alora": "activated LoRA on the frozen GPTQ layers",
    },
    refuses={
        "qlora": "the checkpoint is already GPTQ-quantized and qlora would quantize the base "
                 "again with bitsandbytes; use --plugins gptq,lora",
        "mxfp4": "a checkpoint is either GPTQ- or MXFP4-quantized; name the plugin of its format",
        "prompt_tuning": "prompt tuning on a GPTQ base is not supported by fmtune; train LoRA "
                         "(--plugins gptq,lora)",
    },
    needs_adapter="gptq trains LoRA adapters over the frozen GPTQ layers (a GPTQ base cannot be "
                  "trained in full)",
), method="gptq", label="GPTQ", what="a GPTQ",
    random_model="a random model is not GPTQ-quantized",
    how="quantize it with gptqmodel first (see the fmtune-quant-gptq README), or train it with "
        "--plugins qlora (bitsandbytes quantizes on load)")

PACKAGES = {"gptqmodel": "gptqmodel==7.6.0", "optimum": "optimum"}

# gptqmodel kernels for GPTQ checkpoints (gptqmodel.utils.backend.BACKEND). auto_trainable
# picks the fastest kernel that supports training on this device.
BACKENDS = ("auto_trainable", "auto", "gptq_torch", "gptq_torch_aten", "gptq_triton",
            "gptq_exllama_v2", "gptq_marlin", "gptq_machete", "gptq_bitblas", "gptq_torch_fused")
GPU_BACKENDS = ("gptq_triton", "gptq_exllama_v2", "gptq_marlin", "gptq_machete", "gptq_bitblas")
FMS_KERNELS = {"triton_v2": "gptq_triton"}  # fms-hf-tuning's --auto_gptq kernel -> gptqmodel


@hookimpl
def add_options(register):
    register("gptq_backend", str, "auto_trainable",
             "gptqmodel kernel for the GPTQ layers: auto_trainable (the fastest one that "
             "supports training on this device), gptq_torch, gptq_torch_aten (CPU), gptq_triton, "
             "gptq_exllama_v2, gptq_marlin, ... (GPU).", choices=BACKENDS)
    register("auto_gptq", list, None,
             "fms-hf-tuning's GPTQ-LoRA flag: KERNEL[,FROM_QUANTIZED]. Only triton_v2 (and "
             "from_quantized true), as there; mapped to gptq_backend gptq_triton on a GPU.")


def _truthy(value: str) -> bool | None:
    low = str(value).strip().lower()
    return True if low in ("true", "1", "yes") else False if low in ("false", "0", "no") else None


def fms_problems(config) -> list[str]:
    """fms-hf-tuning's --auto_gptq, checked as fms-hf-tuning checks it."""
    values = config.get("auto_gptq")
    if not values:
        return []
    out = []
    kernel = values[0].strip().lower()
    if kernel not in FMS_KERNELS:
        out.append(f"auto_gptq: fms-hf-tuning supports only the triton_v2 kernel, got "
                   f"{values[0]!r}; fmtune's equivalent is --gptq_backend "
                   f"({', '.join(BACKENDS)})")
    if len(values) > 2:
        out.append(f"auto_gptq takes KERNEL[,FROM_QUANTIZED], got {','.join(values)}")
    elif len(values) == 2:
        from_quantized = _truthy(values[1])
        if from_quantized is None:
            out.append(f"auto_gptq: from_quantized must be true or false, got {values[1]!r}")
        elif not from_quantized:
            out.append("auto_gptq from_quantized false: quantizing while loading is not supported "
                       "(as in fms-hf-tuning); quantize the model with gptqmodel first and pass "
                       "the quantized checkpoint (see the fmtune-quant-gptq README)")
    if config.source("gptq_backend") != "default":
        out.append(f"auto_gptq {','.join(values)} and gptq_backend {config.gptq_backend} both "
                   "choose the GPTQ kernel: set one of them")
    return out


def _gpu_reason(config) -> str | None:
    """Why GPU kernels cannot run here, or None."""
    import torch

    if not torch.cuda.is_available():
        return "no GPU is present"
    if config.use_cpu:
        return "use_cpu is set"
    return None


def backend(config) -> str:
    """The gptqmodel backend to load with; the --auto_gptq mapping and its fallback are logged."""
    values = config.get("auto_gptq")
    if not values:
        return config.gptq_backend
    wanted = FMS_KERNELS[values[0].strip().lower()]
    reason = _gpu_reason(config)
    if reason:
        log.warning("auto_gptq %s asks for gptqmodel's triton kernel, which needs a CUDA GPU, but "
                    "%s: using gptq_backend auto_trainable instead", values[0], reason)
        return "auto_trainable"
    log.info("auto_gptq %s: gptq_backend %s", values[0], wanted)
    return wanted


@hookimpl
def validate_config(config):
    return FORMAT.problems(config, options_problems)


def options_problems(config) -> list[str]:
    """gptq's own checks: its packages, --auto_gptq, a GPU kernel on a machine without GPU."""
    problems = []
    missing = missing_packages(PACKAGES)
    if missing:
        problems.append(f"gptq needs {' and '.join(missing)}, not installed: pip install "
                        f"{' '.join(repr(PACKAGES[m]) for m in missing)} (tested with torch "
                        "2.14.1), or pip install fmtune-quant-gptq")
    problems.extend(fms_problems(config))
    if config.gptq_backend in GPU_BACKENDS and config.source("gptq_backend") != "default":
        reason = _gpu_reason(config)
        if reason:
            problems.append(f"gptq_backend {config.gptq_backend} needs a CUDA GPU but {reason}; "
                            "on CPU use auto_trainable, gptq_torch or gptq_torch_aten")
    return problems


@hookimpl
def load_model(config, tokenizer):
    return load_gptq(config, tokenizer)


def load_gptq(config, tokenizer):
    """The GPTQ checkpoint through transformers (optimum + gptqmodel), layers packed and frozen."""
    from transformers import GPTQConfig

    model, quant = load_quantized(
        config, "gptq", "a GPTQ", "; quantize it with gptqmodel first, or use --plugins qlora",
        lambda quant: GPTQConfig(bits=quant.get("bits", 4), backend=backend(config)))
    packed = [type(m).__name__ for m in model.modules() if hasattr(m, "qweight")]
    layers, count = set(packed), len(packed)
    log.info("loaded %s: %d GPTQ layers (%s-bit, group size %s) with kernel %s, other weights %s",
             config.model_name_or_path, count, quant.get("bits"), quant.get("group_size"),
             ", ".join(sorted(layers)), model.dtype)
    from fmtune.models import fit_to_tokenizer

    return fit_to_tokenizer(model, tokenizer, config)
