"""``--plugins mxfp4``: gpt-oss-style MXFP4 checkpoints, loaded dequantized, then trained.

    fmtune train --plugins mxfp4,lora --quantization_method mxfp4 --dequantize true ...
    fmtune train --plugins mxfp4 --dequantize true ...            # full fine-tuning

MXFP4 checkpoints keep their MoE expert weights as e2m1 values in blocks of 32 with one e8m0
scale per block (``*_blocks`` / ``*_scales`` tensors). transformers' ``Mxfp4Config(dequantize=
True)`` turns them into ``torch_dtype`` weights while loading (bf16 on a bf16 GPU, else float32),
which train like any other model. MXFP4 weights themselves cannot be trained (transformers'
MXFP4 layers are inference-only), so ``--dequantize false`` is refused with the reason.
No torch at import.
"""

from __future__ import annotations

import logging

from fmtune import hookimpl

from .common import Compatibility, QuantFormat, load_quantized

log = logging.getLogger("fmtune")

FORMAT = QuantFormat(Compatibility(
    me="mxfp4",
    combines={
        "lora": "LoRA on the dequantized model",
        "alora": "activated LoRA on the dequantized model",
        "prompt_tuning": "prompt tuning on the dequantized model",
    },
    refuses={
        "qlora": "the MXFP4 checkpoint is loaded dequantized and qlora would quantize it again "
                 "with bitsandbytes; use --plugins mxfp4,lora",
        "gptq": "a checkpoint is either MXFP4- or GPTQ-quantized; name the plugin of its format",
    },
), method="mxfp4", label="MXFP4", what="an MXFP4",
    random_model="a random model has no MXFP4 weights",
    how="the mxfp4 plugin loads gpt-oss-style MXFP4 checkpoints; load a full-precision model "
        "without it")


@hookimpl
def add_options(register):
    register("quantization_method", str, "mxfp4",
             "fms-hf-tuning's name: how the checkpoint is quantized (mxfp4: gpt-oss style).",
             choices=("mxfp4",))
    register("dequantize", bool, False,
             "Load the MXFP4 weights dequantized to torch_dtype (required for training: MXFP4 "
             "weights themselves cannot be trained).")


def no_training_reason(config) -> str:
    """Why the MXFP4 weights cannot be trained as they are, on this machine."""
    import torch

    if config.use_cpu or not torch.cuda.is_available():
        where = "use_cpu is set" if torch.cuda.is_available() else "there is no GPU"
        hardware = (f"{where}, and MXFP4 kernels need a CUDA GPU (compute capability >= 7.5) "
                    "with triton and the kernels package")
    else:
        major, minor = torch.cuda.get_device_capability()
        hardware = (f"this GPU (compute capability {major}.{minor}) has MXFP4 kernels for "
                    "inference only")
    return (f"dequantize false: the MXFP4 weights cannot be trained here: {hardware}, and "
            "transformers' MXFP4 layers have no backward pass; add --dequantize true to load "
            "them dequantized and train that")


@hookimpl
def validate_config(config):
    return FORMAT.problems(config, lambda config: [] if config.dequantize
                           else [no_training_reason(config)])


@hookimpl
def load_model(config, tokenizer):
    return load_mxfp4(config, tokenizer)


def load_mxfp4(config, tokenizer):
    """The checkpoint with its MXFP4 expert weights dequantized to ``torch_dtype``."""
    from transformers import Mxfp4Config

    model, _ = load_quantized(config, "mxfp4", "an MXFP4", "",
                              lambda quant: Mxfp4Config(dequantize=True))
    forget_mxfp4_conversion(model)
    log.info("loaded %s with its MXFP4 weights dequantized to %s", config.model_name_or_path,
             model.dtype)
    from fmtune.models import fit_to_tokenizer

    return fit_to_tokenizer(model, tokenizer, config)


def forget_mxfp4_conversion(model) -> None:
    """Save the dequantized weights under their own names.

    transformers (5.23) records how it loaded each weight and reverts that on
    ``save_pretrained``; for the dequantized experts it would write the float weights under the
    checkpoint's ``*_blocks`` names (the dequantize op reverts to identity), a checkpoint that
    loads with its experts missing. The model is no longer MXFP4, so that conversion is dropped.
    """
    from transformers.integrations.mxfp4 import Mxfp4Dequantize

    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [
            c for c in conversions
            if not any(isinstance(op, Mxfp4Dequantize) for op in getattr(c, "operations", ()))]
