"""Loading from a local folder or the Hugging Face cache, with clear errors."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Any, Callable

from .config import ConfigError
from .files import read_json_object


def quant_method(model_or_folder: Any) -> str | None:
    """The ``quant_method`` of a loaded model's config, or of a local folder's config.json."""
    if isinstance(model_or_folder, str):
        cfg = read_json_object(os.path.join(model_or_folder, "config.json")) or {}
        quant = cfg.get("quantization_config")
    else:
        quant = getattr(getattr(model_or_folder, "config", None), "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(
        quant, "quant_method", None)
    method = getattr(method, "value", method)
    return str(method).lower() if method else None


@contextlib.contextmanager
def without_unused_gptqmodel(method: str | None):
    """peft asks, for every layer it adapts or loads an adapter onto, whether it is a gptqmodel
    layer, and imports gptqmodel to find out whenever it is installed: ~1 s of imports (triton,
    torchao, ...), a banner on stdout and environment variables changed (PYTORCH_ALLOC_CONF,
    CUDA_DEVICE_ORDER) where no GPTQ model is used. Unless the base's ``method`` (its
    quantization_config's quant_method) is gptq/awq, gptqmodel is hidden from peft inside the
    block (peft's cached answer is cleared before and after)."""
    if "gptqmodel" in sys.modules or method in ("gptq", "awq"):
        yield
        return
    from peft import import_utils

    import_utils.is_gptqmodel_available.cache_clear()
    sys.modules["gptqmodel"] = None  # find_spec() answers None, import raises ImportError
    try:
        yield
    finally:
        if sys.modules.get("gptqmodel", 0) is None:
            del sys.modules["gptqmodel"]
        import_utils.is_gptqmodel_available.cache_clear()


def looks_local(path: str) -> bool:
    """A path that can only mean a local folder (a hub id is written ``org/name``)."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached from here (one DNS lookup and TCP connect to
    the endpoint, 5 s at most), or None. Asked before a download: huggingface_hub itself
    retries for about a minute before giving up on a machine without network."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=5):
            return None
    except OSError as e:
        return f"{host} cannot be reached ({e.strerror or e})"


def from_pretrained(loader: Callable[..., Any], path: str, what: str, *,
                    trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """``loader(path, **kwargs)`` for a folder, else cache first, then the hub.

    An id that is neither a folder nor cached, and cannot be downloaded, is a
    :class:`ConfigError` that says so (set ``HF_HUB_OFFLINE=1`` to never try
    the network).

    ``trust_remote_code`` is always passed to the loader, ``False`` unless the user set
    ``--trust_remote_code true``: transformers then refuses a folder whose config names custom
    code (``auto_map``) instead of asking on stdin whether to run it (issue 15).
    """
    kwargs["trust_remote_code"] = bool(trust_remote_code)
    if os.path.isdir(path):
        try:
            return loader(path, **kwargs)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if not trust_remote_code and "trust_remote_code" in str(e):
                raise ConfigError(remote_code_refused(what, path)) from None
            raise ConfigError(f"{what} {path}: cannot be loaded from this folder: {first}") from None
    if looks_local(path):
        raise ConfigError(f"{what} {path}: no such folder")
    try:
        return loader(path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        if not trust_remote_code and "trust_remote_code" in str(e):
            raise ConfigError(remote_code_refused(what, path)) from None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ConfigError(
            f"{what} {path}: not a local folder and not in the Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}); HF_HUB_OFFLINE is set, so "
            "nothing is downloaded. Give a local path or download it first.")
    unreachable = hub_unreachable()
    if unreachable:
        raise ConfigError(
            f"{what} {path}: not a local folder, not in the Hugging Face cache, and "
            f"{unreachable}. Give a local path, or download it on a machine with network.")
    try:
        return loader(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise ConfigError(
            f"{what} {path}: not a local folder, not in the Hugging Face cache, and the download "
            f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Give a local path, or download it on a machine with network.") from None


def remote_code_refused(what: str, path: str) -> str:
    return (f"{what} {path}: it needs its own Python code (auto_map in its config) and fmtune "
            "does not run it unless you pass --trust_remote_code true")


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str, trust_remote_code: bool = False, cache_dir: str | None = None) -> Any:
    """The tokenizer of a folder or hub id, as ``AutoTokenizer`` resolves it.

    A local folder that declares transformers' generic fast tokenizer (``tokenizer.json``,
    ``tokenizer_class`` TokenizersBackend/PreTrainedTokenizerFast, no custom code) is loaded
    with that class directly: ``AutoTokenizer`` ends at the same class, but only after loading
    the model's config class, which imports torch (seconds, a third of ``fmtune preprocess``).
    Model types that transformers lists as declaring a wrong tokenizer class on the hub keep
    going through ``AutoTokenizer``.
    """
    if generic_fast_tokenizer(path):
        from transformers import TokenizersBackend

        return from_pretrained(TokenizersBackend.from_pretrained, path, "tokenizer")
    from transformers import AutoTokenizer

    extra = {"cache_dir": cache_dir} if cache_dir else {}
    return from_pretrained(AutoTokenizer.from_pretrained, path, "tokenizer",
                           trust_remote_code=trust_remote_code, **extra)


def generic_fast_tokenizer(path: str) -> bool:
    """True when ``path`` is a folder that ``load_tokenizer`` loads without AutoTokenizer."""
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return False
    declared = read_json_object(os.path.join(path, "tokenizer_config.json"))
    model_file = os.path.join(path, "config.json")
    model = read_json_object(model_file) if os.path.isfile(model_file) else {}
    if declared is None or model is None:
        return False  # AutoTokenizer reports what is wrong with the folder
    model_type = model.get("model_type", "")
    if (declared.get("tokenizer_class") not in GENERIC_TOKENIZER_CLASSES or "auto_map" in declared
            or not isinstance(model_type, str)):
        return False
    overridden = _models_with_overridden_tokenizer_class()
    return overridden is not None and model_type not in overridden


@functools.cache
def _models_with_overridden_tokenizer_class() -> frozenset[str] | None:
    """transformers' MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS, read from its source: importing
    the module imports torch. None (= always use AutoTokenizer) when it cannot be read."""
    import ast
    import importlib.util
    import re

    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = os.path.join(list(spec.submodule_search_locations)[0], "models", "auto",
                          "tokenization_auto.py")
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
        found = re.search(r"^MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS[^=\n]*=\s*(\{.*?\})",
                          text, re.S | re.M)
        return frozenset(ast.literal_eval(found.group(1))) if found else None
    except (OSError, ValueError, SyntaxError):
        return None
