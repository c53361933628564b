"""``fmtune merge`` and ``fmtune export-vllm`` (entry points in ``fmtune.commands``)."""

from __future__ import annotations

import os

from fmtune.config import CommandParser, ConfigError, parse_bool

from .options import COMPUTE_DTYPES


def merge(argv: list[str]) -> int:
    """fmtune merge [BASE] ADAPTER OUT: the base with the LoRA adapter merged in, HF format."""
    parser = CommandParser(
        prog="fmtune merge", usage="fmtune merge [--dtype DTYPE] [BASE] ADAPTER OUT",
        description="Merge a LoRA adapter into its base model and save the full model (and the "
                    "adapter's tokenizer) in Hugging Face format, loadable with "
                    "AutoModelForCausalLM.from_pretrained and servable by vLLM as a plain model. "
                    "A vision-language base (LLaVA, Llama 3.2 Vision, ...) is loaded whole and "
                    "saved with its processor (the adapter's, else the base's): the folder "
                    "loads with AutoModelForImageTextToText and AutoProcessor. "
                    "BASE defaults to the adapter's base_model_name_or_path.")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="[BASE] ADAPTER OUT: base model folder or hub id (optional), adapter "
                             "folder, new folder for the merged model")
    parser.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES,
                        help="dtype the base is loaded and the merged model saved in")
    parser.add_argument("--trust_remote_code", type=parse_bool, default=False, nargs="?", const=True,
                        help="run Python code the base model folder ships (off by default; "
                             "never asked on stdin)")
    # Silogen's merge_adapter flags
    parser.add_argument("--tokenizer", help="tokenizer (folder or hub id) to save with the merged "
                        "model (default: the adapter's, else the base's)")
    parser.add_argument("--device_map", help="device map the base is loaded with: auto, cpu, "
                        "cuda, or a JSON mapping (default: transformers' choice)")
    args = parser.parse_args(argv)
    if len(args.paths) not in (2, 3):
        raise ConfigError("merge takes [BASE] ADAPTER OUT")
    base, adapter, out = ([None, *args.paths] if len(args.paths) == 2 else args.paths)
    from .export import merge as do_merge

    device_map = args.device_map
    if device_map and device_map.lstrip().startswith("{"):
        import json

        try:
            device_map = json.loads(device_map)
        except ValueError as e:
            raise ConfigError(f"--device_map: not a JSON mapping: {e}") from None
    do_merge(adapter, out, base=base, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
             tokenizer_path=args.tokenizer, device_map=device_map)
    print(f"fmtune: merged {adapter} into its base; full model saved to {out}")
    return 0


def export_vllm(argv: list[str]) -> int:
    """fmtune export-vllm ADAPTER OUT: the adapter in the layout vLLM's LoRA loader takes."""
    parser = CommandParser(
        prog="fmtune export-vllm",
        description="Write a LoRA adapter the way vLLM loads it: only LoRA matrices in "
                    "adapter_model.safetensors, the embeddings of tokens added in training in "
                    "new_embeddings.safetensors, modules_to_save cleared, tokenizer copied. "
                    "Adapters vLLM cannot serve (prompt tuning, aLoRA, DoRA, modules trained in "
                    "full) are refused with the reason.")
    parser.add_argument("adapter", help="adapter folder written by fmtune train (or peft)")
    parser.add_argument("out", nargs="?", help="new folder for the vLLM adapter (default: "
                        "ADAPTER/vllm; Silogen's create_vllm_compatible_adapter rewrote the "
                        "adapter in place, fmtune keeps it)")
    parser.add_argument("--training-config", "--training_config", dest="training_config",
                        help="Silogen's flag: accepted; fmtune reads what it needs (added tokens, "
                        "trained modules) from the adapter itself")
    args = parser.parse_args(argv)
    if args.training_config:
        import logging

        if not os.path.isfile(args.training_config):
            raise ConfigError(f"--training-config {args.training_config}: no such file")
        logging.getLogger("fmtune").info("--training-config is not needed: the adapter says "
                                         "which tokens were added and which modules trained")
    if args.out is None:
        args.out = os.path.join(args.adapter, "vllm")
    from .export import export_vllm as do_export

    written = do_export(args.adapter, args.out)
    print(f"fmtune: vLLM adapter written to {args.out}: {written['lora_tensors']} LoRA tensors, "
          f"{written['new_tokens']} new-token embeddings")
    return 0
