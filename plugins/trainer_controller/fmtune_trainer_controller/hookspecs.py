"""The hooks this plugin owns: other plugins add trainer-controller metric and operation
classes through them. Added to the plugin manager by the plugin's ``add_hookspecs`` when
``trainer_controller`` is active; collected with :func:`fmtune.plugins.collect` (duplicate
names, wrappers and failing implementations are refused, naming the plugin). Importing
this module is cheap: no torch.
"""

from __future__ import annotations

from typing import Callable

from fmtune.hookspecs import hookspec


@hookspec
def register_controller_metrics(register: Callable[[str, type], None]) -> None:
    """Add trainer-controller metrics: ``register(name, cls)``; ``name`` is what a controller
    file's ``class:`` says. See the plugin's README for the class contract."""


@hookspec
def register_controller_operations(register: Callable[[str, type], None]) -> None:
    """Add trainer-controller operations: ``register(name, cls)``. See the plugin's README
    for the class contract."""
