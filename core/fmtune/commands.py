"""Public API for plugin sub-commands (``[project.entry-points."fmtune.commands"]``).

A sub-command that takes the same config as ``fmtune train`` (a YAML file, ``--flags``,
``--plugins``) builds it with :func:`load_config` and checks it with :func:`validate`;
``train_help`` renders the options of the active plugins for its ``--help``. Documented in
docs/plugins.md ("Utilities for plugins").
"""

from __future__ import annotations

from .cli import load_config, train_help
from .config import CommandParser
from .pipeline import validate

__all__ = ["CommandParser", "load_config", "train_help", "validate"]
