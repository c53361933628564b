"""Public API for plugins: reading data files and records, reporting bad records, chat templates.

Documented in docs/plugins.md ("Utilities for plugins"); names listed there are stable within
a minor version.
"""

from __future__ import annotations

from .chat_templates import names as chat_template_names
from .chat_templates import resolve as resolve_chat_template
from .chat_templates import template_error
from .default_plugins.data import IGNORE, Counts, DataError, join, read_records, record_where
from .files import folder_problem, read_json_object, restart_jsonl, write_json

__all__ = ["IGNORE", "Counts", "DataError", "chat_template_names", "folder_problem", "join",
           "read_json_object", "read_records", "record_where", "resolve_chat_template",
           "restart_jsonl", "template_error", "write_json"]
