"""Public API for plugins: loading models and tokenizers the way the core does.

Documented in docs/plugins.md ("Utilities for plugins"); names listed there are stable within
a minor version. Importing this module is cheap (torch and transformers load inside the
functions).
"""

from __future__ import annotations

from .default_plugins.model import device_map, fit_to_tokenizer, resolve_attn_implementation, resolve_dtype
from .default_plugins.model import load_model as load_full_model
from .hub import from_pretrained, quant_method, without_unused_gptqmodel

__all__ = ["device_map", "fit_to_tokenizer", "from_pretrained", "load_full_model", "quant_method",
           "resolve_attn_implementation", "resolve_dtype", "without_unused_gptqmodel"]
