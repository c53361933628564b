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


# Packages that libraries import whenever they are installed, whatever the run, for features a
# fine-tuning run of a causal LM does not use: each costs 0.3-1.5 s of CPU at every start (the
# imports of a 1-step LoRA run on a 2-core machine went from ~22 s to ~13 s without them).
# peft: bitsandbytes (peft.helpers, and its layer dispatchers while it adapts layers) and
# gptqmodel (while it adapts or loads an adapter onto layers; gptqmodel also prints a banner and
# changes PYTORCH_ALLOC_CONF / CUDA_DEVICE_ORDER); transformers: scipy (the Hungarian matcher of
# the object-detection losses) and torchao (its quantizer's safetensors support); accelerate:
# boto3 (SageMaker configs).
# While the module named here is imported, the packages are hidden; afterwards they are
# importable again, the libraries' cached "is X installed" answers are cleared, and each name
# the module would have bound from them becomes a stand-in that imports it on first use
# ("pkg.module" a module, "pkg.module:attr" a function), so a run that does use the feature
# (a QLoRA or torchao model, an object-detection loss) behaves as before.
DEFERRED: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "peft": (("bitsandbytes", "gptqmodel"), {"peft.helpers:bnb": "bitsandbytes"}),
    "transformers.quantizers.quantizer_torchao": (("torchao",), {
        "transformers.quantizers.quantizer_torchao:flatten_tensor_state_dict":
            "torchao.prototype.safetensors.safetensors_support:flatten_tensor_state_dict"}),
    "accelerate.commands.config.sagemaker": (("boto3",), {
        "accelerate.commands.config.sagemaker:boto3": "boto3"}),
    **{f"transformers.loss.loss_{name}": (("scipy",), {
        f"transformers.loss.loss_{name}:linear_sum_assignment":
            "scipy.optimize:linear_sum_assignment"})
       for name in ("for_object_detection", "deformable_detr", "grounding_dino", "lw_detr",
                    "rf_detr", "rt_detr")},
}
# packages peft imports while it adapts layers, to ask whether each layer is one of theirs: a
# layer can only be one if its package is imported already (the model was quantized with it)
WHILE_ADAPTING = ("bitsandbytes", "gptqmodel", "torchao")
# quant_method -> the package its layers come from (the one peft must see)
NEEDED_BY = {"gptq": "gptqmodel", "awq": "gptqmodel", "bitsandbytes": "bitsandbytes",
             "torchao": "torchao"}
# modules that cache "is package X installed" answers (transformers, accelerate, peft)
_AVAILABILITY_MODULES = ("peft.import_utils", "accelerate.utils.imports",
                         "transformers.utils.import_utils")


def _forget_availability(names: list[str]) -> None:
    """Clear the cached installed-or-not answers about the packages ``names``."""
    keys = {n.lower() for n in names}
    if "bitsandbytes" in keys:
        keys.add("bnb")
    for module_name in _AVAILABILITY_MODULES:
        module = sys.modules.get(module_name)
        for name, value in list(vars(module).items()) if module is not None else ():
            if ((name == "_is_package_available" or any(k in name.lower() for k in keys))
                    and callable(getattr(value, "cache_clear", None))):
                value.cache_clear()


@contextlib.contextmanager
def _hidden(names: tuple[str, ...]):
    """``names`` (top-level packages not imported yet) cannot be imported inside the block:
    ``import`` raises ImportError and ``importlib.util.find_spec`` answers None."""
    hidden = [n for n in names if n not in sys.modules]
    if hidden:
        _forget_availability(hidden)  # an answer cached before would now be wrong
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield hidden
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
        if hidden:
            _forget_availability(hidden)


class _OnFirstUse:
    """Stands for a module (``pkg.module``) or a function (``pkg.module:attr``) that is
    imported on first use."""

    def __init__(self, target: str) -> None:
        self._target = target

    def _resolve(self) -> Any:
        import importlib

        module, _, attr = self._target.partition(":")
        found = importlib.import_module(module)
        return getattr(found, attr) if attr else found

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self._resolve(), attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self._target}, imported on first use>"


def _bind_on_first_use(names: dict[str, str], hidden: list[str]) -> None:
    """Each ``module:attr`` left unset (or None) because its package was hidden becomes an
    :class:`_OnFirstUse` stand-in, where that package is installed."""
    import importlib.util

    for where, target in names.items():
        module_name, _, attr = where.partition(":")
        package = target.partition(".")[0].partition(":")[0]
        module = sys.modules.get(module_name)
        if module is None or package not in hidden or getattr(module, attr, None) is not None:
            continue
        if package in sys.modules or importlib.util.find_spec(package) is not None:
            setattr(module, attr, _OnFirstUse(target))


@contextlib.contextmanager
def without_unused_gptqmodel(method: str | None):
    """peft asks, for every layer it adapts or loads an adapter onto, whether it is a gptqmodel,
    bitsandbytes or torchao layer, and imports those packages to find out whenever they are
    installed: ~0.5-1 s of imports each (triton, torch._dynamo, torch._inductor, ...), and
    gptqmodel prints a banner on stdout and changes environment variables
    (PYTORCH_ALLOC_CONF, CUDA_DEVICE_ORDER) where no GPTQ model is used. Inside the block they
    are hidden from peft, except the one the base's ``method`` (its quantization_config's
    quant_method) needs; a package already imported (a model quantized with it is loaded) is
    never hidden. peft's cached answers are cleared before and after."""
    needed = NEEDED_BY.get(method or "")
    names = tuple(n for n in WHILE_ADAPTING if n != needed)
    with _hidden(names) as hidden:
        import importlib

        importlib.import_module("peft")  # if not imported yet: here, with the packages hidden
        _bind_on_first_use(DEFERRED["peft"][1], hidden)
        yield


class _DeferringLoader:
    """A module's own loader, run with the packages :data:`DEFERRED` names for it hidden;
    everything else is delegated to it."""

    def __init__(self, loader: Any, deferral: tuple[tuple[str, ...], dict[str, str]]) -> None:
        self._loader = loader
        self._deferral = deferral

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = self._loader  # the module keeps its own loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        packages, names = self._deferral
        with _hidden(packages) as hidden:
            self._loader.exec_module(module)
        _bind_on_first_use(names, hidden)
        after = AFTER_IMPORT.get(module.__name__)
        if after is not None:
            after(module)


# Start-up garbage collection (issue 19). A run's start-up is imports: torch, transformers,
# peft, accelerate and datasets create ~450,000 objects that live as long as the process, and
# Python's cyclic collector, which runs a full collection each time the objects that survived
# the younger generations grow by a quarter, walked all of them again and again: 8 full
# collections (1.2 of 7.9 CPU-s, plus 0.3 in the younger generations) in a 1-step LoRA run,
# one of them transformers' own gc.collect() as training begins. While start-up freezing is
# on, every import first moves the objects that exist into the collector's permanent
# generation (gc.freeze(), which the Python docs recommend for long-lived start-up objects; it
# costs nothing), so the collector only looks at what was made since; objects are still freed
# when their last reference goes, only cyclic garbage among the frozen ones is left to
# gc.unfreeze() (start-up makes a few dozen such objects). Imports are where the objects come
# from. Freezing ends where the model starts to load (fmtune.pipeline.load_model, before any
# plugin's load_model hook, and from_pretrained below for a model, for the commands that load
# one outside a training run): what is made from then on (the model, the trainer, a
# tracker's run, a model loaded and dropped again) is collected as usual, and so is whatever
# a plugin hands to gc.collect() to be closed (the aim tracker's run).
_FREEZING = False


def freeze_at_imports(on: bool = True, unfreeze: bool = False) -> None:
    """Start-up freezing (see above) on or off, from the next import on; with ``unfreeze``,
    the frozen objects are handed back to the collector. Only the console script turns it on:
    a program that calls ``fmtune.cli.main(argv)`` (a test) and goes on keeps every object
    visible to the collector (and to ``gc.get_objects()``, which frozen objects leave)."""
    import gc

    global _FREEZING
    _FREEZING = on
    if unfreeze:
        gc.unfreeze()


class _DeferringFinder:
    """A ``sys.meta_path`` entry that acts only on the imports :data:`DEFERRED` names (and
    freezes the objects start-up made, while :func:`freeze_at_imports` is on)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if _FREEZING:
            import gc

            gc.freeze()
        deferral = DEFERRED.get(name) or (((), {}) if name in AFTER_IMPORT else None)
        if deferral is None:
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _DeferringLoader(spec.loader, deferral)
        return spec


def _tree_fingerprint(folder: str, *also: str) -> str:
    """A digest of the name, size and modification time of every file under ``folder`` (and of
    the files ``also``): any file added, removed or edited changes it (~20 ms for the 2,600
    files of transformers' models folder)."""
    import hashlib

    digest = hashlib.sha1()
    for extra in also:
        st = os.stat(extra)
        digest.update(f"{extra}:{st.st_size}:{st.st_mtime_ns}\n".encode())

    def walk(path: str) -> None:
        with os.scandir(path) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name == "__pycache__":
                    continue
                if entry.is_dir():
                    walk(entry.path)
                else:
                    st = entry.stat()
                    digest.update(f"{entry.path}:{st.st_size}:{st.st_mtime_ns}\n".encode())

    walk(folder)
    return digest.hexdigest()


def _import_structure_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fmtune", "transformers-import-structure")


def _cache_import_structures(import_utils: Any) -> None:
    """transformers' ``define_import_structure`` with a cache on disk for its models folder.

    ``import transformers`` (and again the first use of ``transformers.models``) reads the
    1,700 files of its models folder to find what each exports (their ``__all__`` and
    ``@requires``): ~0.35 CPU-s each time, 0.7 s of every run's start-up (issue 19). The answer
    depends on those files only (and on the parser, transformers' import_utils.py): it is kept
    in ``~/.cache/fmtune/transformers-import-structure`` (``XDG_CACHE_HOME``) under a digest of
    the name, size and modification time of every file in the folder and of import_utils.py,
    so an upgrade or an edited file is read again. Any problem with the cache (unreadable,
    unwritable, another shape) falls back to transformers' own scan."""
    original = getattr(import_utils, "define_import_structure", None)
    if original is None or getattr(original, "_fmtune_cached", False):
        return
    parser_file = getattr(import_utils, "__file__", None)

    @functools.lru_cache
    def define_import_structure(module_path: Any, prefix: str | None = None) -> Any:
        folder = str(module_path)
        if os.path.isfile(folder):
            folder = os.path.dirname(folder)
        if os.path.basename(folder) != "models" or not parser_file:  # a model's own folder
            return original(module_path, prefix)
        try:
            import hashlib
            import json

            fingerprint = _tree_fingerprint(folder, parser_file)
            key = hashlib.sha1(f"{folder}\0{prefix}".encode()).hexdigest()[:20]
            path = os.path.join(_import_structure_cache_dir(), f"{key}.json")
        except OSError:
            return original(module_path, prefix)
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("fingerprint") == fingerprint:
                return {frozenset(backends): {module: set(names)
                                              for module, names in modules.items()}
                        for backends, modules in saved["structure"]}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            pass
        found = original(module_path, prefix)
        try:
            structure = [[sorted(backends), {module: sorted(names)
                                             for module, names in modules.items()}]
                         for backends, modules in found.items()]
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"fingerprint": fingerprint, "structure": structure}, f)
            os.replace(tmp, path)
        except (OSError, TypeError, ValueError, AttributeError):
            pass
        return found

    define_import_structure._fmtune_cached = True  # type: ignore[attr-defined]
    import_utils.define_import_structure = define_import_structure


# module -> what is done to it once imported (while lean_imports is on)
AFTER_IMPORT: dict[str, Callable[[Any], None]] = {
    "transformers.utils.import_utils": _cache_import_structures,
}


def lean_imports() -> None:
    """From now on in this process, the modules :data:`DEFERRED` names are imported without the
    packages they would import for features a fine-tuning run does not use (bitsandbytes and
    gptqmodel by peft, scipy and torchao by transformers, boto3 by accelerate): ~1.5-3 s of
    imports at every start. Those packages stay importable and are imported on first use, so a
    run that uses them (QLoRA, a GPTQ or torchao model) behaves as before. Idempotent; modules
    already imported are left as they are."""
    if not any(isinstance(f, _DeferringFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _DeferringFinder())


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
    if what == "model":  # start-up ends where the model loads (see freeze_at_imports)
        freeze_at_imports(False)
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
    if llama_fast_tokenizer(path):  # the class AutoTokenizer picks, without torch (issue 19)
        from transformers import LlamaTokenizer

        return from_pretrained(LlamaTokenizer.from_pretrained, path, "tokenizer")
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


def llama_fast_tokenizer(path: str) -> bool:
    """True when ``path`` is a sentencepiece-style Llama tokenizer folder that AutoTokenizer
    loads as ``LlamaTokenizer``: ``tokenizer_class`` LlamaTokenizer(Fast), a ``tokenizer.json``
    that is not byte-level (Llama 3 style, which AutoTokenizer gives to TokenizersBackend),
    model_type llama or no config.json, no custom code, not one of transformers' listed hub ids."""
    import fnmatch

    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return False
    declared = read_json_object(os.path.join(path, "tokenizer_config.json"))
    model_file = os.path.join(path, "config.json")
    model = read_json_object(model_file) if os.path.isfile(model_file) else {}
    if declared is None or model is None or "auto_map" in declared or "auto_map" in model:
        return False
    if (str(declared.get("tokenizer_class") or "").removesuffix("Fast") != "LlamaTokenizer"
            or model.get("model_type", "llama") != "llama"):
        return False
    overridden, backend_ids = (_models_with_overridden_tokenizer_class(),
                               _auto_tokenizer_list("MODEL_IDS_TO_TOKENIZERS_BACKEND"))
    if overridden is None or "llama" in overridden or backend_ids is None or any(
            fnmatch.fnmatch(path.lower(), p) for p in backend_ids):
        return False
    from transformers import TokenizersBackend

    return not TokenizersBackend._tokenizer_json_has_byte_level(path)


@functools.cache
def _tokenization_auto_literal(name: str) -> Any:
    """The list or dict literal bound to ``name`` in transformers' tokenization_auto.py, read
    from its source (importing the module imports torch); None when it cannot be read."""
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
            found = re.search(rf"^{name}[^=\n]*=\s*(\[.*?\]|\{{.*?\}})", f.read(),
                              re.S | re.M)
        return ast.literal_eval(found.group(1)) if found else None
    except (OSError, ValueError, SyntaxError):
        return None


def _auto_tokenizer_list(name: str) -> tuple[str, ...] | None:
    """A list literal of transformers' tokenization_auto.py; None when it cannot be read."""
    found = _tokenization_auto_literal(name)
    return tuple(found) if found is not None else None


def _models_with_overridden_tokenizer_class() -> frozenset[str] | None:
    """transformers' MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS, read from its source: importing
    the module imports torch. None (= always use AutoTokenizer) when it cannot be read."""
    found = _tokenization_auto_literal("MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS")
    return frozenset(found) if found is not None else None
