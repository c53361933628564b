"""Automatic batch size: ``--total_train_batch_size T`` is met exactly on any number of processes.

fmtune picks the per-device batch and the gradient accumulation so that
``world_size * per_device_train_batch_size * gradient_accumulation_steps == T``
(as the Silogen finetuning engine does): the largest per-device batch that is at
most ``max_per_device_train_batch_size`` and divides ``T / world_size``. A
combination that cannot give ``T`` exactly is an error, never a silent change
of the effective batch.

``max_per_device_train_batch_size auto``: the cap is the largest per-device batch that
``fmtune plan`` predicts fits the device's memory (:func:`apply_auto`, after the data is
prepared and before the model loads: the plan needs the data's sequence lengths and builds
the model on the meta device); without ``total_train_batch_size`` that batch is the
per-device batch, with the configured accumulation. No torch here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .config import ConfigError

log = logging.getLogger("fmtune")


class BatchError(ConfigError):
    """The batch options cannot give the requested total batch (exit 2)."""


@dataclass(frozen=True)
class BatchPlan:
    per_device: int
    grad_accum: int
    world_size: int

    @property
    def total(self) -> int:
        return self.world_size * self.per_device * self.grad_accum

    def describe(self) -> str:
        return (f"{self.world_size} process{'es' if self.world_size != 1 else ''} x "
                f"{self.per_device} per device x {self.grad_accum} accumulation step"
                f"{'s' if self.grad_accum != 1 else ''} = {self.total} examples per optimizer step")


def plan_batch(total: int, max_per_device: int, world_size: int, per_device: int | None = None,
               grad_accum: int | None = None) -> BatchPlan:
    """``(per_device, grad_accum)`` with ``world_size * per_device * grad_accum == total``.

    Without ``per_device``/``grad_accum``, the per-device batch is the largest value
    ``<= max_per_device`` such that ``total`` is divisible by ``world_size * per_device``.
    A given ``per_device`` or ``grad_accum`` (set explicitly by the user) is kept and the
    other is derived; a value that cannot give ``total`` exactly raises :class:`BatchError`.
    """
    for name, value in (("total_train_batch_size", total), ("world_size", world_size),
                        ("max_per_device_train_batch_size", max_per_device),
                        ("per_device_train_batch_size", per_device),
                        ("gradient_accumulation_steps", grad_accum)):
        if value is not None and value < 1:
            raise BatchError(f"{name} must be >= 1, got {value}")
    if total % world_size:
        raise BatchError(f"total_train_batch_size {total} is not divisible by the number of "
                         f"processes {world_size}")
    per_process = total // world_size
    if per_device is not None and grad_accum is not None:
        if per_device * grad_accum != per_process:
            raise BatchError(
                f"total_train_batch_size {total} contradicts per_device_train_batch_size "
                f"{per_device} x gradient_accumulation_steps {grad_accum} x {world_size} "
                f"process{'es' if world_size != 1 else ''} = {world_size * per_device * grad_accum}")
    elif per_device is not None:
        if per_process % per_device:
            raise BatchError(
                f"total_train_batch_size {total} is not divisible by per_device_train_batch_size "
                f"{per_device} x {world_size} process{'es' if world_size != 1 else ''}")
        grad_accum = per_process // per_device
    elif grad_accum is not None:
        if per_process % grad_accum:
            raise BatchError(
                f"total_train_batch_size {total} is not divisible by gradient_accumulation_steps "
                f"{grad_accum} x {world_size} process{'es' if world_size != 1 else ''}")
        per_device = per_process // grad_accum
    else:
        per_device = max(d for d in range(1, min(max_per_device, per_process) + 1)
                         if per_process % d == 0)
        grad_accum = per_process // per_device
    if per_device > max_per_device:
        raise BatchError(
            f"total_train_batch_size {total} on {world_size} process"
            f"{'es' if world_size != 1 else ''} needs per_device_train_batch_size {per_device}, "
            f"above max_per_device_train_batch_size {max_per_device}")
    return BatchPlan(per_device, grad_accum, world_size)


def _explicit(config: Any, name: str) -> int | None:
    """The option's value when the user set it (YAML or CLI), else None."""
    return config.get(name) if config.source(name) != "default" else None


def plan_for(config: Any, world_size: int) -> BatchPlan | None:
    """The plan for a config's ``total_train_batch_size`` (None when it is not set)."""
    total = config.get("total_train_batch_size")
    if total is None or is_auto(config):  # auto: decided by apply_auto, before the model loads
        return None
    max_per_device = config.get("max_per_device_train_batch_size")
    if max_per_device is None:  # the per-device batch option's value is the cap
        max_per_device = config.get("per_device_train_batch_size")
    return plan_batch(total, max_per_device, world_size,
                      per_device=_explicit(config, "per_device_train_batch_size"),
                      grad_accum=_explicit(config, "gradient_accumulation_steps"))


def problems(config: Any) -> list[str]:
    """Config-time checks, for the number of processes the run will have
    (:func:`fmtune.distributed.expected_world_size`), so that an impossible split is reported
    once, before any launch, not by every launched process."""
    from .distributed import expected_world_size

    if config.get("auto_batch_max_memory") is not None and not is_auto(config):
        return ["auto_batch_max_memory needs max_per_device_train_batch_size auto"]
    if is_auto(config):
        return auto_problems(config, expected_world_size(config))
    if config.get("total_train_batch_size") is None:
        if config.get("max_per_device_train_batch_size") is not None:
            return ["max_per_device_train_batch_size needs total_train_batch_size"]
        return []
    if any(config.get(name) is not None and config.get(name) < 1
           for name in ("per_device_train_batch_size", "gradient_accumulation_steps")):
        return []  # reported as such by the core's option checks
    try:
        plan_for(config, expected_world_size(config))
    except BatchError as e:
        return [str(e)]
    return []


def apply(config: Any, args: Any) -> BatchPlan | None:
    """Set ``args``' per-device batch and accumulation for the real ``args.world_size``."""
    plan = plan_for(config, args.world_size)
    if plan is None:
        return None
    args.per_device_train_batch_size = plan.per_device
    args.gradient_accumulation_steps = plan.grad_accum
    if args.process_index == 0:
        log.info("total_train_batch_size %d: %s", plan.total, plan.describe())
    return plan


# ---------------------------------------------------------- max_per_device_train_batch_size auto


def is_auto(config: Any) -> bool:
    return config.get("max_per_device_train_batch_size") == "auto"


def auto_problems(config: Any, world_size: int) -> list[str]:
    """What can be said about ``auto`` before the memory is known: it picks the per-device
    batch, so an explicit one contradicts it; the total must split over the processes."""
    explicit = _explicit(config, "per_device_train_batch_size")
    if explicit is not None:
        return [f"max_per_device_train_batch_size auto picks per_device_train_batch_size; "
                f"remove per_device_train_batch_size {explicit} (or give a number as the cap)"]
    total = config.get("total_train_batch_size")
    accum = _explicit(config, "gradient_accumulation_steps")
    if total is None or (accum is not None and accum < 1):
        return []
    try:
        plan_batch(total, max(1, total // max(world_size, 1)), world_size, grad_accum=accum)
    except BatchError as e:
        return [str(e)]
    return []


def plan_auto(config: Any, world_size: int, fits: int, budget: str) -> BatchPlan:
    """The batch for ``auto`` once the largest per-device batch that fits (``fits``, >= 1) is
    known; ``budget`` says which memory (for the errors)."""
    total = config.get("total_train_batch_size")
    accum = _explicit(config, "gradient_accumulation_steps")
    if total is None:
        return BatchPlan(fits, accum or int(config.get("gradient_accumulation_steps") or 1),
                         world_size)
    try:
        return plan_batch(total, fits, world_size, grad_accum=accum)
    except BatchError as e:
        raise BatchError(f"max_per_device_train_batch_size auto: {e} (the largest that fits "
                         f"{budget})") from None


def apply_auto(run: Any, args: Any, train_dataset: Any) -> BatchPlan | None:
    """``max_per_device_train_batch_size auto``: set ``args``' per-device batch and
    accumulation from the largest batch that fits (:func:`fmtune.plan.fit_batch`), log why in
    one line and keep it for run_summary.json (``run.batch_choice``). Called after the data is
    prepared and before the model loads; a memory too small for one example is a
    :class:`BatchError` (exit 2) with nothing loaded or written."""
    config = run.config
    if not is_auto(config):
        return None
    from .plan import fit_batch

    fit = fit_batch(config, run.pm, run.tokenizer, train_dataset, args)
    if fit["largest_batch"] < 1:
        raise BatchError(f"max_per_device_train_batch_size auto: not even 1 example per device "
                         f"fits {fit['budget']} (predicted peak at batch 1: "
                         f"{fit['peak_at_1_mb']:.0f} MB); lower max_seq_length, use LoRA/QLoRA "
                         f"or gradient_checkpointing, or give more memory")
    plan = plan_auto(config, args.world_size, fit["largest_batch"], fit["budget"])
    args.per_device_train_batch_size = plan.per_device
    args.gradient_accumulation_steps = plan.grad_accum
    peak = fit["peak_at_1_mb"] + (plan.per_device - 1) * fit["per_example_mb"]
    fit.update(per_device_train_batch_size=plan.per_device,
               gradient_accumulation_steps=plan.grad_accum, predicted_peak_mb=round(peak, 1))
    run.batch_choice = fit
    if args.process_index == 0:
        total = config.get("total_train_batch_size")
        log.info("max_per_device_train_batch_size auto: at most %d per device%s fit%s %s; "
                 "using %d (predicted peak %.0f MB)%s: %s", fit["largest_batch"],
                 " (every example of a process)" if fit.get("capped_by_examples") else "",
                 "s" if fit["largest_batch"] == 1 else "", fit["budget"], plan.per_device,
                 peak, f", total_train_batch_size {total}" if total is not None else "",
                 plan.describe())
    return plan

