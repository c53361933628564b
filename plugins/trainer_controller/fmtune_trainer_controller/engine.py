"""Running the controllers of one training run.

For each event: every metric's optional ``observe(ctx)`` runs; then, for each
controller triggered by the event, the metrics its rule reads are computed
(once per event), the rule is evaluated, patience is applied, and the
operations' actions run. Their control decisions are merged and returned to
the core. Firings are logged, written to ``OUTPUT_DIR/trainer_controller.jsonl``
(main process) and counted in ``run_summary.json``.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
from typing import Any

from fmtune.config import ConfigError
from fmtune.records import restart_jsonl

from .events import CONTROL_FLAGS
from .loader import Controller, Setup
from .metrics import Context, MetricUnavailable, plain
from .rules import RuleRuntimeError

log = logging.getLogger("fmtune.trainer_controller")

EVENTS_FILE = "trainer_controller.jsonl"


class ControllerError(ConfigError):
    """A rule, metric or operation failed while training (printed as one line, exit 2)."""


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # keep the file strict JSON
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _brief(value: Any, limit: int = 1000) -> Any:
    """A metric value for the events file: as is, or a note when it is large."""
    value = _json_safe(value)
    text = json.dumps(value, default=str)
    return value if len(text) <= limit else f"<{len(text)} characters, not recorded>"


class Engine:
    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.by_event: dict[str, list[Controller]] = {}
        for c in setup.controllers:
            for t in c.triggers:
                self.by_event.setdefault(t, []).append(c)
        self.patience_counter: dict[str, int] = {c.name: 0 for c in setup.controllers}
        self.fired: dict[str, int] = {c.name: 0 for c in setup.controllers}
        self.stopped_by: dict[str, Any] | None = None
        self.skips_reported: set[tuple[str, str]] = set()
        self.observers = [(n, m) for n, m in setup.metrics.items()
                          if callable(getattr(m, "observe", None))]

    # ------------------------------------------------------------ lifecycle

    def events_path(self, run: Any) -> str:
        return os.path.join(run.output_dir, EVENTS_FILE)

    def begin(self, run: Any) -> None:
        """Start the events file over, or keep its lines up to the resumed step."""
        if not run.is_main_process:
            return
        step = int(getattr(run.state, "global_step", 0) or 0)
        os.makedirs(run.output_dir, exist_ok=True)
        restart_jsonl(self.events_path(run), step if run.resumed_from else None,
                      lambda record: record["step"])

    def summary(self) -> dict[str, Any]:
        return {"config_file": os.path.abspath(self.setup.path),
                "fired": dict(self.fired), "stopped_by": self.stopped_by}

    # ------------------------------------------------------------ events

    def handle(self, event: str, run: Any, **data: Any) -> dict[str, bool] | None:
        ctx = Context(event=event, run=run, **data)
        for name, metric in self.observers:
            self._guard(lambda: metric.observe(ctx), f"metric {name!r} "
                        f"({self.setup.metric_classes[name]}).observe", ctx)
        controllers = self.by_event.get(event)
        if not controllers:
            return None
        cache: dict[str, Any] = {}
        decisions: dict[str, bool] = {}
        for c in controllers:
            values = self._values(c, ctx, cache)
            if values is None:
                continue
            try:
                outcome = c.rule.evaluate(values)
            except RuleRuntimeError as e:
                raise ControllerError(
                    f"{self._where(c)}: rule {c.rule.text!r} failed on {event} at step "
                    f"{ctx.step}: {e}") from None
            if not self._patience(c, outcome):
                continue
            self._fire(c, ctx, values, decisions)
        return decisions or None

    def _values(self, c: Controller, ctx: Context, cache: dict[str, Any]) -> dict[str, Any] | None:
        values: dict[str, Any] = {}
        for name in sorted(c.wanted, key=lambda n: (n not in c.rule.names, n)):
            if name not in cache:
                cache[name] = self._compute(name, ctx)
            value = cache[name]
            if isinstance(value, MetricUnavailable):
                if name in c.rule.names:
                    self._report_skip(c, ctx, name, value)
                    return None
                continue  # only an operation wanted it: leave it out
            values[name] = value
        return values

    def _compute(self, name: str, ctx: Context) -> Any:
        metric = self.setup.metrics[name]
        cls = self.setup.metric_classes[name]
        try:
            value = metric.compute(ctx)
        except MetricUnavailable as e:
            return e
        except Exception as e:  # noqa: BLE001 - third-party code, reported with its name
            raise ControllerError(f"{self.setup.path}: metric {name!r} ({cls}) failed on "
                                  f"{ctx.event} at step {ctx.step}: {type(e).__name__}: {e}"
                                  ) from e
        if getattr(metric, "plain_output", False):  # a built-in metric that returns plain data
            return value
        try:
            return plain(value, f"metric {name!r} ({cls})")
        except TypeError as e:
            raise ControllerError(f"{self.setup.path}: {e}") from None

    def _report_skip(self, c: Controller, ctx: Context, name: str, why: Exception) -> None:
        first = (c.name, name) not in self.skips_reported and not getattr(why, "quiet", False)
        if first:
            self.skips_reported.add((c.name, name))
        log.log(logging.INFO if first else logging.DEBUG,
                "trainer_controller: controller %r skipped on %s at step %d: metric %r is not "
                "available (%s)%s", c.name, ctx.event, ctx.step, name, why,
                "; further skips are logged at debug level" if first else "")

    def _patience(self, c: Controller, outcome: bool) -> bool:
        """fms-hf-tuning's patience: act once the rule held more than ``threshold`` times
        (in a row with ``reset_on_failure``, in total with ``no_reset_on_failure``)."""
        if c.patience is None:
            return outcome
        if outcome:
            self.patience_counter[c.name] += 1
        elif c.patience.mode == "reset_on_failure":
            self.patience_counter[c.name] = 0
        if self.patience_counter[c.name] > c.patience.threshold:
            self.patience_counter[c.name] = 0
            return True
        return False

    def _fire(self, c: Controller, ctx: Context, values: dict[str, Any],
              decisions: dict[str, bool]) -> None:
        octx = Context(event=ctx.event, run=ctx.run, logs=ctx.logs, eval_metrics=ctx.eval_metrics,
                       checkpoint_dir=ctx.checkpoint_dir, controller=c.name, rule=c.rule.text,
                       values=dict(values))
        made: dict[str, bool] = {}
        for op_name, action in c.operations:
            op = self.setup.operations[op_name]
            result = self._guard(lambda: getattr(op, action)(octx),
                                 f"operation {op_name!r} action {action!r}", ctx)
            if result is None:
                continue
            if not isinstance(result, dict) or any(k not in CONTROL_FLAGS for k in result):
                raise ControllerError(
                    f"{self.setup.path}: operation {op_name!r} action {action!r} returned "
                    f"{result!r}; an action returns None or a dict with keys among "
                    f"{', '.join(CONTROL_FLAGS)}")
            for k, v in result.items():
                if v:
                    made[k] = True
        if ctx.event == "on_train_end" and made:
            log.warning("trainer_controller: controller %r decided %s on on_train_end: "
                        "training is over, nothing to do", c.name, ", ".join(made))
            made = {}
        decisions.update(made)
        self.fired[c.name] += 1
        ops = [f"{o}.{a}" for o, a in c.operations]
        log.log(c.log_level, "trainer_controller: controller %r fired on %s at step %d: rule %r "
                "held -> %s", c.name, ctx.event, ctx.step, c.rule.text, ", ".join(ops))
        if made.get("should_training_stop") and self.stopped_by is None:
            self.stopped_by = {"controller": c.name, "event": ctx.event, "step": ctx.step,
                               "rule": c.rule.text}
            log.info("trainer_controller: controller %r stops training at step %d (%s): rule %r "
                     "held", c.name, ctx.step, ctx.event, c.rule.text)
        if ctx.run.is_main_process:
            record = {"step": ctx.step, "epoch": ctx.epoch, "event": ctx.event,
                      "controller": c.name, "rule": c.rule.text, "operations": ops,
                      "decisions": made, "messages": octx.messages,
                      "values": {k: _brief(v) for k, v in values.items()},
                      "timestamp": datetime.datetime.now().isoformat()}
            with open(self.events_path(ctx.run), "a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=str) + "\n")

    def _where(self, c: Controller) -> str:
        return f"{self.setup.path}:{c.line}: controller {c.name!r}" if c.line else \
            f"{self.setup.path}: controller {c.name!r}"

    def _guard(self, fn, what: str, ctx: Context) -> Any:
        try:
            return fn()
        except ControllerError:
            raise
        except Exception as e:  # noqa: BLE001 - third-party code, reported with its name
            raise ControllerError(f"{self.setup.path}: {what} failed on {ctx.event} at step "
                                  f"{ctx.step}: {type(e).__name__}: {e}") from e
