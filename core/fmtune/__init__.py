"""fmtune: plugin-based fine-tuning of Hugging Face causal language models."""

from .hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
