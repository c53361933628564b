"""What the ``gptq`` and ``mxfp4`` plugins share: reading a checkpoint's quantization config,
which plugins they combine with, loading through transformers' quantizers. No torch at import.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass

log = logging.getLogger("fmtune")

# PEFT plugins of fmtune-peft-lora that put LoRA adapters on a base (they answer wrap_peft).
LORA_PLUGINS = ("lora", "alora")


@dataclass(frozen=True)
class Compatibility:
    """Which other plugins a quantized-checkpoint plugin runs with.

    ``combines`` maps plugin names to what the combination does; ``refuses`` maps plugin names
    to the reason they cannot be combined; ``needs_adapter`` says whether one of
    ``LORA_PLUGINS`` is required (the quantized base itself cannot be trained). Plugins named in
    neither (trackers, data handlers, trainer_controller, ...) combine freely.
    """

    me: str
    combines: dict[str, str]
    refuses: dict[str, str]
    needs_adapter: str | None = None

    def problems(self, config) -> list[str]:
        active = list(getattr(config, "plugins", []))
        out = [f"--plugins {','.join(active)}: {self.me} cannot be combined with {name}: {why}"
               for name, why in self.refuses.items() if name in active]
        if out:
            return out  # the combination itself is wrong: what else it lacks would be noise
        if self.needs_adapter:
            adapters = [n for n in active if n in LORA_PLUGINS]
            if not adapters:
                out.append(f"--plugins {','.join(active)}: {self.needs_adapter}; add "
                           f"--plugins {','.join([*active, 'lora'])}")
            elif config.get("peft_method") == "none":
                out.append(f"peft_method none with {self.me}: {self.needs_adapter}")
        return out


@dataclass(frozen=True)
class QuantFormat:
    """A quantized-checkpoint format served by a plugin (``gptq``, ``mxfp4``): which plugins it
    runs with, its checkpoints' ``quant_method``, its ``label`` ("GPTQ") and ``what`` a
    checkpoint of it is called ("a GPTQ"), what a random model lacks (``random_model``) and how
    to get a checkpoint of the format (``how``)."""

    compatibility: Compatibility
    method: str
    label: str
    what: str
    random_model: str
    how: str

    def problems(self, config, checks=lambda config: []) -> list[str]:
        """The plugin's ``validate_config``: the plugin set (alone when wrong), random weights,
        ``checks(config)`` (the format's own options), then the local checkpoint's format."""
        problems = self.compatibility.problems(config)
        if problems:  # the plugin set is wrong: checks of the rest would only add noise
            return problems
        if config.random_init_weights:
            problems.append(f"random_init_weights with {self.compatibility.me}: the {self.label} "
                            f"checkpoint's weights are the base; {self.random_model}")
        problems.extend(checks(config))
        found = checkpoint_problem(config, self.method, self.what, self.how)
        if found:
            problems.append(found)
        return problems


def checkpoint_folder(path: str | None) -> str | None:
    """The local folder of ``model_name_or_path`` (None for a hub id)."""
    if not path:
        return None
    folder = os.path.dirname(path) if os.path.isfile(path) else path
    return folder if os.path.isdir(folder) else None


def local_quant_method(path: str | None) -> tuple[str | None, str | None]:
    """``(folder, quant_method)`` read from a local checkpoint's config.json, without torch.

    ``(None, None)`` for a hub id (checked once the config is loaded); ``quant_method`` is None
    when the checkpoint is not quantized. A folder without a readable config.json gives
    ``(folder, None)``.
    """
    folder = checkpoint_folder(path)
    if folder is None:
        return None, None
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return folder, None
    quant = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    return folder, (str(method).lower() if method else None)


def checkpoint_problem(config, want: str, what: str, how: str) -> str | None:
    """Why ``model_name_or_path`` is not a ``want`` checkpoint (local folders only), or None."""
    path = config.get("model_name_or_path")
    folder, method = local_quant_method(path)
    if folder is None:
        return None
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return f"model_name_or_path: {path} has no config.json"
    if method == want:
        return None
    found = f"it is quantized with {method}" if method else "its config.json has no " \
        "quantization_config"
    return f"model_name_or_path: {path} is not {what} checkpoint ({found}); {how}"


def missing_packages(packages: dict[str, str]) -> list[str]:
    """The import names in ``packages`` that cannot be found (nothing is imported)."""
    missing = []
    for module in packages:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(module)
    return missing


@contextlib.contextmanager
def stdout_to_stderr():
    """gptqmodel logs (banner, kernel choice) on stdout: keep fmtune's stdout for results."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def load_quantized(config, method: str, what: str, hint: str, quantization_config):
    """The checkpoint of ``model_name_or_path`` through transformers with
    ``quantization_config(quant)`` (``quant``: its config's quantization_config as a dict), after
    checking it was quantized with ``method``; returns ``(model, quant)``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fmtune.config import ConfigError
    from fmtune.models import (device_map, from_pretrained, resolve_attn_implementation,
                               resolve_dtype)

    path = config.model_name_or_path
    model_config = from_pretrained(AutoConfig.from_pretrained, path, "model config",
                                   trust_remote_code=config.trust_remote_code)
    quant = getattr(model_config, "quantization_config", None) or {}
    if not isinstance(quant, dict):
        quant = quant.to_dict()
    if str(quant.get("quant_method", "")).lower() != method:
        found = quant.get("quant_method") or "no quantization_config"
        raise ConfigError(f"model_name_or_path: {path} is not {what} checkpoint ({found}){hint}")
    kwargs = {"dtype": resolve_dtype(config.torch_dtype), "device_map": device_map(config),
              "quantization_config": quantization_config(quant),
              "trust_remote_code": config.trust_remote_code}
    attn = resolve_attn_implementation(config, model_config)
    if attn:
        kwargs["attn_implementation"] = attn
    with stdout_to_stderr():
        model = from_pretrained(AutoModelForCausalLM.from_pretrained, path, "model", **kwargs)
    return model, quant
