"""``fmtune merge`` and ``fmtune export-vllm`` (entry points in ``fmtune.commands``)."""

from __future__ import annotations

import argparse

from fmtune.config import ConfigError, parse_bool


def merge(argv: list[str]) -> int:
    """fmtune merge [BASE] ADAPTER OUT: the base with the LoRA adapter merged in, HF format."""
    parser = argparse.ArgumentParser(
        prog="fmtune merge", usage="fmtune merge [--dtype DTYPE] [BASE] ADAPTER OUT",
        description="Merge a LoRA adapter into its base model and save the full model (and the "
                    "adapter's tokenizer) in Hugging Face format, loadable with "
                    "AutoModelForCausalLM.from_pretrained and servable by vLLM as a plain model. "
                    "BASE defaults to the adapter's base_model_name_or_path.")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="[BASE] ADAPTER OUT: base model folder or hub id (optional), adapter "
                             "folder, new folder for the merged model")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype the base is loaded and the merged model saved in")
    parser.add_argument("--trust_remote_code", type=parse_bool, default=False, nargs="?", const=True,
                        help="run Python code the base model folder ships (off by default; "
                             "never asked on stdin)")
    args = parser.parse_args(argv)
    if len(args.paths) not in (2, 3):
        raise ConfigError("merge takes [BASE] ADAPTER OUT")
    base, adapter, out = ([None, *args.paths] if len(args.paths) == 2 else args.paths)
    from .export import merge as do_merge

    do_merge(adapter, out, base=base, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    print(f"fmtune: merged {adapter} into its base; full model saved to {out}")
    return 0


def export_vllm(argv: list[str]) -> int:
    """fmtune export-vllm ADAPTER OUT: the adapter in the layout vLLM's LoRA loader takes."""
    parser = argparse.ArgumentParser(
        prog="fmtune export-vllm",
        description="Write a LoRA adapter the way vLLM loads it: only LoRA matrices in "
                    "adapter_model.safetensors, the embeddings of tokens added in training in "
                    "new_embeddings.safetensors, modules_to_save cleared, tokenizer copied. "
                    "Adapters vLLM cannot serve (prompt tuning, aLoRA, DoRA, modules trained in "
                    "full) are refused with the reason.")
    parser.add_argument("adapter", help="adapter folder written by fmtune train (or peft)")
    parser.add_argument("out", help="new folder for the vLLM adapter")
    args = parser.parse_args(argv)
    from .export import export_vllm as do_export

    written = do_export(args.adapter, args.out)
    print(f"fmtune: vLLM adapter written to {args.out}: {written['lora_tensors']} LoRA tensors, "
          f"{written['new_tokens']} new-token embeddings")
    return 0
