"""Loading from a local folder or the Hugging Face cache, with clear errors."""

from __future__ import annotations

import os
from typing import Any, Callable

from .config import ConfigError


def from_pretrained(loader: Callable[..., Any], path: str, what: str, **kwargs: Any) -> Any:
    """``loader(path, **kwargs)`` for a folder, else cache first, then the hub.

    An id that is neither a folder nor cached, and cannot be downloaded, is a
    :class:`ConfigError` that says so (set ``HF_HUB_OFFLINE=1`` to never try
    the network).
    """
    if os.path.isdir(path):
        try:
            return loader(path, **kwargs)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{what} {path}: cannot be loaded from this folder: {e}") from None
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ConfigError(f"{what} {path}: no such folder")
    try:
        return loader(path, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ConfigError(
            f"{what} {path}: not a local folder and not in the Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}); HF_HUB_OFFLINE is set, so "
            "nothing is downloaded. Give a local path or download it first.")
    try:
        return loader(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise ConfigError(
            f"{what} {path}: not a local folder, not in the Hugging Face cache, and the download "
            f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Give a local path, or download it on a machine with network.") from None
