"""fmtune-vision: vision-language models (image + text conversations), full fine-tuning and
LoRA. The hooks are in :mod:`fmtune_vision.plugin` (entry point ``vision``)."""
