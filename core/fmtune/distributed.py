"""Multi-process training: launching through accelerate, and what fmtune fills in for it.

The engine is accelerate (and torch.distributed under it); fmtune adds only:

* ``fmtune train --num_processes N [--accelerate_config FILE]`` re-runs the same
  command under ``accelerate launch`` (:func:`maybe_relaunch`); under a launcher
  (``accelerate launch``, ``torchrun``: ``WORLD_SIZE``/``LOCAL_RANK`` are set) these
  options only have to agree with it (:func:`check_launcher`);
* on a machine without a GPU, a multi-process run trains on CPU with DDP over gloo
  (:func:`setup_process`: accelerate's own torchrun launcher leaves that to the script);
  FSDP2 (``fsdp_version: 2``, torch's ``fully_shard``) runs there too, over gloo
  (:func:`allow_fsdp2_on_cpu`: accelerate itself turns FSDP on only for GPU-type devices);
  FSDP1 on CPU is a one-line error before anything loads;
* FSDP with ``TRANSFORMER_BASED_WRAP`` and no ``fsdp_transformer_layer_cls_to_wrap``
  wraps the model's decoder layer class, read from its ``_no_split_modules``
  (:func:`prepare_fsdp`), and the final save gathers a full state dict
  (:func:`full_state_dict_for_final_save`).

Importing this module does not import torch or accelerate.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
from typing import Any

from .config import ConfigError

log = logging.getLogger("fmtune")

LAUNCHER_VARS = ("WORLD_SIZE", "LOCAL_RANK")
# accelerate config types that `accelerate launch` runs as one plain process (the multi-CPU
# path of its simple launcher needs MPI); fmtune starts them with the torchrun launcher.
SINGLE_PROCESS_TYPES = ("NO", "MULTI_CPU")
GPU_ONLY_TYPES = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def _has_accelerator() -> bool:
    import torch

    return torch.accelerator.is_available()


# ------------------------------------------------------------------ launching


def under_launcher() -> bool:
    """True in a process started by ``accelerate launch``/``torchrun`` (or another launcher
    that sets ``WORLD_SIZE``/``LOCAL_RANK``)."""
    return any(os.environ.get(name) for name in LAUNCHER_VARS)


def launcher_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def expected_world_size(config) -> int:
    """The number of processes this run will have, known before any launch: under a launcher
    its WORLD_SIZE; else ``num_processes``; else the ``accelerate_config`` file's; else 1."""
    if under_launcher():
        return launcher_world_size()
    if config.get("num_processes"):
        return int(config.get("num_processes"))
    if config.get("accelerate_config"):
        acc = _load_accelerate_config(config.get("accelerate_config"))
        return int(getattr(acc, "num_processes", 1) or 1)
    return 1


def check_launcher(config) -> None:
    """Under a launcher, ``num_processes`` (if set) must be the launcher's world size."""
    wanted = config.get("num_processes")
    if wanted and under_launcher() and wanted != launcher_world_size():
        raise ConfigError(
            f"num_processes={wanted} but the launcher started WORLD_SIZE={launcher_world_size()} "
            "processes: under accelerate launch/torchrun leave num_processes unset or make them agree")


def _load_accelerate_config(path: str):
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        return load_config_from_file(path)
    except Exception as e:  # noqa: BLE001 - yaml, key and value errors all mean a bad file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"accelerate_config {path}: not a valid accelerate config: {msg}") from None


def launch_command(config, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The ``accelerate launch`` command (and environment) that re-runs ``fmtune train ARGV``
    with ``config.num_processes`` processes and/or ``config.accelerate_config``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    env = dict(os.environ)
    path = config.get("accelerate_config")
    n = config.get("num_processes")
    machines = 1
    if path:
        acc = _load_accelerate_config(path)
        machines = int(getattr(acc, "num_machines", 1) or 1)
        cmd += ["--config_file", path]
        kind = str(getattr(acc.distributed_type, "value", acc.distributed_type))
        if kind in GPU_ONLY_TYPES and not _has_accelerator() and not _fsdp2(kind, acc):
            raise ConfigError(f"accelerate_config {path}: distributed_type {kind} needs GPUs and "
                              "this machine has none (--num_processes N alone runs DDP on CPU)"
                              + ("; FSDP2 (fsdp_version: 2) runs on CPU" if kind == "FSDP"
                                 else ""))
        total = n or int(getattr(acc, "num_processes", 1) or 1)
        if kind in SINGLE_PROCESS_TYPES and (total > 1 or machines > 1):
            cmd.append("--multi_gpu")  # accelerate's torchrun launcher, on CPU too
            if getattr(acc, "use_cpu", False):
                env["ACCELERATE_USE_CPU"] = "true"
        if machines == 1 and getattr(acc, "main_process_port", None) is None:
            cmd += ["--main_process_port", "0"]  # a free port: runs side by side never clash
    else:
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", "0"]
    if n:
        cmd += ["--num_processes", str(n)]
    cmd += ["-m", "fmtune.cli", "train", *argv]
    return cmd, env


def maybe_relaunch(config, argv: list[str], before=lambda: None) -> int | None:
    """Run ``fmtune train ARGV`` under ``accelerate launch`` when ``num_processes`` > 1 or
    ``accelerate_config`` asks for it and no launcher started this process; return its exit
    code, or None when this process trains by itself. ``before()`` runs first when launching
    (the config's validation: errors are reported once, not by every process). The same
    arguments are passed on: in the launched processes ``num_processes`` only has to match
    the world size and ``accelerate_config`` is ignored."""
    check_launcher(config)
    if under_launcher():
        if config.get("accelerate_config"):
            log.info("accelerate_config is ignored under a launcher (this process has "
                     "WORLD_SIZE=%d)", launcher_world_size())
        return None
    if (config.get("num_processes") or 1) <= 1 and not config.get("accelerate_config"):
        return None
    before()
    cmd, env = launch_command(config, argv)
    log.info("launching: accelerate launch %s", " ".join(cmd[3:]))
    sys.stdout.flush()
    sys.stderr.flush()
    return subprocess.call(cmd, env=env)


# ------------------------------------------------------------- in each process


def setup_process() -> None:
    """Before the first accelerate state is made: with several processes and no accelerator
    device, train on CPU (gloo). accelerate's torchrun launcher does not set this itself,
    and without it every process would train alone, each believing it is rank 0."""
    if not under_launcher() or _has_accelerator():
        return
    if fsdp_enabled():
        if os.environ.get("FSDP_VERSION", "1").strip() != "2":
            raise ConfigError(FSDP1_ON_CPU)
        os.environ["ACCELERATE_USE_CPU"] = "true"
        allow_fsdp2_on_cpu()
        return
    if launcher_world_size() > 1 and not os.environ.get("ACCELERATE_USE_CPU"):
        os.environ["ACCELERATE_USE_CPU"] = "true"


FSDP1_ON_CPU = ("FSDP needs GPUs and this machine has none for FSDP1 (accelerate_config / "
                "accelerate launch --config_file with distributed_type FSDP, fsdp_version 1: "
                "torch's FSDP1 refuses a CPU device); fsdp_version: 2 runs on CPU over gloo, "
                "and without FSDP the same command runs DDP on CPU")


def _fsdp2(kind: str, acc: Any) -> bool:
    """An accelerate config for FSDP2 (``fsdp_config.fsdp_version: 2``): it runs on CPU."""
    fsdp_config = getattr(acc, "fsdp_config", None) or {}
    return kind == "FSDP" and str(fsdp_config.get("fsdp_version", 1)).strip() == "2"


def allow_fsdp2_on_cpu() -> None:
    """Let accelerate run FSDP2 on CPU processes (gloo).

    accelerate turns its state into ``DistributedType.FSDP`` only for GPU-type process groups
    (MULTI_GPU, MULTI_XPU, ...); on CPU (MULTI_CPU) it keeps the FSDP plugin's settings but
    trains plain DDP, and its sharded checkpoints and the full-state-dict final save take the
    DDP paths. torch's ``fully_shard`` itself runs on CPU tensors over gloo (training, DCP
    sharded checkpoints that reshard on load, the gathered full state dict), so after
    accelerate has set up its state, a MULTI_CPU state with an FSDP2 plugin becomes FSDP, as
    accelerate does on GPUs (its PartialState included: every later AcceleratorState copies
    the distributed type from it). Only under ``ACCELERATE_USE_FSDP=true`` with
    ``fsdp_version`` 2; idempotent."""
    from accelerate import state as acc_state
    from accelerate.utils import DistributedType

    cls = acc_state.AcceleratorState
    if getattr(cls.__init__, "_fmtune_fsdp2_on_cpu", False):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if (plugin is not None and getattr(plugin, "fsdp_version", 1) == 2 and fsdp_enabled()
                and self.distributed_type == DistributedType.MULTI_CPU):
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin
            acc_state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            log.info("FSDP2 on CPU (gloo)")

    __init__._fmtune_fsdp2_on_cpu = True  # type: ignore[attr-defined]
    cls.__init__ = __init__


def is_main_process() -> bool:
    """Rank 0 of the run (True outside distributed runs)."""
    from accelerate import PartialState

    if not PartialState._shared_state:
        return int(os.environ.get("RANK") or 0) == 0
    return PartialState().is_main_process


def fsdp_enabled() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_layer_classes(model: Any) -> list[str]:
    """The class names FSDP's transformer-based wrap should wrap: the model's
    ``_no_split_modules`` (its decoder layer), checked against the modules it contains."""
    # a peft model: look at the transformers model inside
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = list(getattr(base, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in base.modules()}
    found = [n for n in dict.fromkeys(names) if n in present]
    if not found:
        raise ConfigError(
            f"FSDP TRANSFORMER_BASED_WRAP: {type(base).__name__} names no decoder layer class "
            f"that it contains (_no_split_modules={names}); set fsdp_transformer_layer_cls_to_wrap "
            "in the accelerate config")
    return found


def prepare_fsdp(model: Any) -> list[str] | None:
    """Under FSDP with ``TRANSFORMER_BASED_WRAP`` and no layer class configured, set
    ``FSDP_TRANSFORMER_CLS_TO_WRAP`` (read by accelerate's FSDP plugin) from the model.
    Call before the trainer (and its accelerator) is built. Returns the classes set."""
    if not fsdp_enabled():
        return None
    if os.environ.get("FSDP_AUTO_WRAP_POLICY", "").upper() != "TRANSFORMER_BASED_WRAP":
        return None
    if os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP"):
        return None
    classes = fsdp_layer_classes(model)
    os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = ",".join(classes)
    log.info("FSDP: wrapping %s (the model's decoder layer)", ", ".join(classes))
    return classes


def full_state_dict_for_final_save(trainer: Any) -> bool:
    """Under FSDP, gather a full state dict for the final save (checkpoints stay sharded):
    with a sharded state dict transformers' ``save_model`` writes no model or adapter file."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return False
    trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    return True


def sharded_checkpoint_problem(folder: str, state: dict) -> str | None:
    """Why a ``checkpoint-N`` without a model weights file is not a complete FSDP sharded
    checkpoint (``fsdp_state_dict_type: SHARDED_STATE_DICT``: accelerate's
    ``pytorch_model_fsdp_0/`` and ``optimizer_0/``, torch.distributed.checkpoint folders of
    ``*.distcp`` shards), or None when it is one. DCP writes the folder's ``.metadata`` after
    every rank's shard: a folder without it was cut short. Such a checkpoint reshards on
    load, so a run may resume on another number of processes."""
    model_dirs = sorted(d for d in os.listdir(folder) if d.startswith("pytorch_model_fsdp_")
                        and os.path.isdir(os.path.join(folder, d)))
    if not model_dirs:
        return "no model weights"
    dirs = model_dirs
    if not state.get("save_only_model", False):
        optim = sorted(d for d in os.listdir(folder) if d.startswith("optimizer_")
                       and os.path.isdir(os.path.join(folder, d)))
        dirs += optim
    for d in dirs:
        path = os.path.join(folder, d)
        meta = os.path.join(path, ".metadata")
        if not os.path.isfile(meta) or os.path.getsize(meta) == 0:
            return f"{d}/.metadata missing (cut short while saving)"
        if not any(f.endswith(".distcp") for f in os.listdir(path)):
            return f"{d} holds no shard"
    return None

