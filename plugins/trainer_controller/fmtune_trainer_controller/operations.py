"""Controller operations: what a controller does when its rule holds.

An operation class is instantiated once per run with the YAML ``arguments``
as keywords. Its *actions* are the names a controller lists after the dot
(``hfcontrols.should_training_stop``): the class attribute ``actions`` when it
has one, else its methods whose names start with ``should_`` (fms-hf-tuning's
convention). An action is a method ``action(ctx)`` that returns ``None`` or a
dict of control decisions (``{"should_save": True}``).
"""

from __future__ import annotations

import logging
import re
import string
from typing import Any, Iterable

from .events import CONTROL_FLAGS
from .metrics import Context

log = logging.getLogger("fmtune.trainer_controller")

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR, "critical": logging.CRITICAL}


class Operation:
    """Base class for controller operations (optional: actions are the contract).

    Optional methods: ``check(metric_names) -> list[str]`` (problems found at
    load time, e.g. a format string naming an unknown metric) and
    ``metrics_wanted(metric_names) -> set[str]`` (metrics to compute for
    ``ctx.values`` besides those the rule reads).
    """

    actions: tuple[str, ...] | None = None

    def __init__(self, **arguments: Any) -> None:
        if arguments:
            raise TypeError(f"unexpected argument(s): {', '.join(sorted(arguments))} "
                            "(this operation takes none)")


def action_names(cls_or_obj: Any) -> tuple[str, ...]:
    """The actions of an operation class: ``actions``, else its ``should_*`` methods."""
    declared = getattr(cls_or_obj, "actions", None)
    if declared is not None:
        return tuple(declared)
    return tuple(sorted(n for n in dir(cls_or_obj)
                        if n.startswith("should_") and callable(getattr(cls_or_obj, n, None))))


class HFControls(Operation):
    """Sets transformers' ``TrainerControl`` flags: ``should_training_stop``,
    ``should_epoch_stop``, ``should_save``, ``should_evaluate``, ``should_log``.
    An instance named ``hfcontrols`` exists in every config."""

    actions = CONTROL_FLAGS

    def _decide(self, flag: str) -> dict[str, bool]:
        return {flag: True}

    def should_training_stop(self, ctx: Context) -> dict[str, bool]:
        return self._decide("should_training_stop")

    def should_epoch_stop(self, ctx: Context) -> dict[str, bool]:
        return self._decide("should_epoch_stop")

    def should_save(self, ctx: Context) -> dict[str, bool]:
        return self._decide("should_save")

    def should_evaluate(self, ctx: Context) -> dict[str, bool]:
        return self._decide("should_evaluate")

    def should_log(self, ctx: Context) -> dict[str, bool]:
        return self._decide("should_log")


# ------------------------------------------------------------ safe format strings

FORMAT_BUILTINS = ("event_name", "control_name", "rule", "step", "epoch", "tc_metrics")
MAX_FORMAT_CHARS = 2000
MAX_MESSAGE_CHARS = 10_000
MAX_WIDTH = 200
MAX_PRECISION = 50
_FIELD = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[[^\[\]{}]*\])*)")
_KEY = re.compile(r"\[([^\[\]{}]*)\]")
_SPEC = re.compile(r"(?:[^{}]?[<>=^])?[+\- ]?z?#?0?(?P<width>\d*)[_,]?"
                   r"(?:\.(?P<precision>\d+))?[bcdeEfFgGnosxX%]?")


class SafeFormat:
    """A ``str.format``-style template that only reads names and ``[key]`` items.

    ``str.format`` itself would follow ``{x.__class__...}`` attribute chains;
    here fields are checked when the config loads (no ``.``, no dunder keys,
    bounded width/precision, no nested fields) and resolved by dict/list
    lookups only.
    """

    def __init__(self, template: Any) -> None:
        if not isinstance(template, str):
            raise ValueError(f"log_format must be a string, got {type(template).__name__}")
        if len(template) > MAX_FORMAT_CHARS:
            raise ValueError(f"log_format is longer than {MAX_FORMAT_CHARS} characters")
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as e:
            raise ValueError(f"log_format {template!r} is not a valid format string: {e}") from None
        self.template = template
        self.parts: list[tuple[str, tuple | None, str, str | None]] = []
        for literal, field_name, spec, conversion in parsed:
            if field_name is None:
                self.parts.append((literal, None, "", None))
                continue
            m = _FIELD.fullmatch(field_name)
            if not m:
                raise ValueError(f"log_format {template!r}: field {{{field_name}}} is refused "
                                 "(only {name} and {name[key]} are allowed; no attributes, "
                                 "no positional fields)")
            keys = tuple(int(k) if re.fullmatch(r"-?\d+", k) else k for k in _KEY.findall(m.group(2)))
            for part in (m.group(1), *[k for k in keys if isinstance(k, str)]):
                if part.startswith("__") or part.endswith("__"):
                    raise ValueError(f"log_format {template!r}: field {{{field_name}}} is "
                                     "refused (dunder names are not allowed)")
            if conversion not in (None, "r", "s", "a"):
                raise ValueError(f"log_format {template!r}: conversion !{conversion} is refused")
            s = _SPEC.fullmatch(spec or "")
            if s is None:
                raise ValueError(f"log_format {template!r}: format spec {spec!r} of "
                                 f"{{{field_name}}} is refused")
            if s.group("width") and int(s.group("width")) > MAX_WIDTH:
                raise ValueError(f"log_format {template!r}: width {s.group('width')} is larger "
                                 f"than {MAX_WIDTH}")
            if s.group("precision") and int(s.group("precision")) > MAX_PRECISION:
                raise ValueError(f"log_format {template!r}: precision {s.group('precision')} is "
                                 f"larger than {MAX_PRECISION}")
            self.parts.append((literal, (m.group(1), *keys), spec, conversion))

    def names(self) -> set[str]:
        return {path[0] for _, path, _, _ in self.parts if path}

    def render(self, namespace: dict[str, Any]) -> str:
        out: list[str] = []
        for literal, path, spec, conversion in self.parts:
            out.append(literal)
            if path is None:
                continue
            value: Any = namespace.get(path[0], "n/a")
            for key in path[1:]:
                if isinstance(value, dict) and key in value:
                    value = value[key]
                elif isinstance(value, list) and isinstance(key, int) and -len(value) <= key < len(value):
                    value = value[key]
                else:
                    value = "n/a"
                    break
            if conversion == "r":
                value = repr(value)
            elif conversion == "a":
                value = ascii(value)
            elif conversion == "s":
                value = str(value)
            try:
                text = format(value, spec)
            except (TypeError, ValueError):
                text = str(value)
            out.append(text)
        message = "".join(out)
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "..."
        return message


class LogControl(Operation):
    """Logs a message rendered from ``log_format`` at ``log_level`` (default info).

    Fields: ``{event_name}``, ``{control_name}``, ``{rule}``, ``{step}``,
    ``{epoch}``, ``{tc_metrics}`` (every available metric), and any metric by
    name, with ``[key]`` items and format specs: ``{training_loss:.3f}``,
    ``{trainer_state[global_step]}``. Action: ``should_log`` (fms-hf-tuning's
    name) or ``log``; it logs and sets no control flag.
    """

    actions = ("should_log", "log")

    def __init__(self, log_format: str, log_level: str = "info") -> None:
        self.format = SafeFormat(log_format)
        if str(log_level).lower() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
        self.level = LOG_LEVELS[str(log_level).lower()]

    def check(self, metric_names: Iterable[str]) -> list[str]:
        known = set(FORMAT_BUILTINS) | set(metric_names)
        return [f"log_format {self.format.template!r}: unknown field {{{name}}} "
                f"(fields: {', '.join(sorted(known))})"
                for name in sorted(self.format.names() - known)]

    def metrics_wanted(self, metric_names: Iterable[str]) -> set[str]:
        names = set(metric_names)
        if "tc_metrics" in self.format.names():
            return names
        return (self.format.names() - set(FORMAT_BUILTINS)) & names

    def log(self, ctx: Context) -> None:
        namespace = {**ctx.values, "event_name": ctx.event, "control_name": ctx.controller,
                     "rule": ctx.rule, "step": ctx.step, "epoch": ctx.epoch,
                     "tc_metrics": dict(ctx.values)}
        message = self.format.render(namespace)
        ctx.messages.append(message)
        log.log(self.level, message)

    should_log = log


BUILTIN_OPERATIONS: dict[str, type] = {"HFControls": HFControls, "LogControl": LogControl}
