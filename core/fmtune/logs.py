"""Public API for plugins: the run's metric log (``training_logs.jsonl``).

Documented in docs/plugins.md ("Utilities for plugins").
"""

from __future__ import annotations

from .default_plugins.logs import FILENAME, append_metrics

__all__ = ["FILENAME", "append_metrics"]
