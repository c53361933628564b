"""Loading and checking a trainer-controller YAML file (fms-hf-tuning's schema).

Every problem is collected (with the file, line and controller/metric/operation
named) so that one run of ``fmtune train`` reports them all, before any model
loads. Rules are parsed and checked here; nothing in the file is executed.
"""

from __future__ import annotations

import keyword
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from fmtune.config import load_yaml_text, suggest

from .events import TRIGGER_ALIASES, TRIGGERS, UNSUPPORTED_TRIGGERS
from .metrics import Metric
from .operations import HFControls, LOG_LEVELS, action_names
from .rules import RESERVED_NAMES, Rule, RuleError

TOP_KEYS = ("controller_metrics", "operations", "controllers")
ENTRY_KEYS = ("name", "class", "arguments")
CONTROLLER_KEYS = ("name", "triggers", "rule", "patience", "operations", "config")
PATIENCE_KEYS = ("patience_threshold", "mode")
PATIENCE_MODES = ("reset_on_failure", "no_reset_on_failure")
CONFIG_KEYS = ("trigger_log_level",)
DEFAULT_OPERATION = ("hfcontrols", HFControls)


class LoadError(Exception):
    """The file has problems; ``problems`` lists them, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class Patience:
    threshold: int
    mode: str


@dataclass
class Controller:
    name: str
    triggers: tuple[str, ...]
    rule: Rule
    operations: list[tuple[str, str]]  # (operation name, action)
    patience: Patience | None
    log_level: int
    wanted: frozenset[str]  # metrics computed when it is evaluated (rule's first)
    line: int | None = None


@dataclass
class Setup:
    path: str
    metrics: dict[str, Any] = field(default_factory=dict)       # name -> instance
    metric_classes: dict[str, str] = field(default_factory=dict)  # name -> class name
    operations: dict[str, Any] = field(default_factory=dict)    # name -> instance
    controllers: list[Controller] = field(default_factory=list)


def _hint(name: str, candidates) -> str:
    return suggest(str(name), [str(c) for c in candidates])


class _Lines:
    """Line numbers of YAML nodes, by path (keys and list indexes)."""

    def __init__(self, text: str) -> None:
        try:
            self.root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            self.root = None

    def __call__(self, *path: Any) -> int | None:
        node, line = self.root, None
        for part in path:
            if node is None:
                break
            line = node.start_mark.line + 1
            nxt = None
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if k.value == part:
                        nxt, line = v, k.start_mark.line + 1
                        break
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) \
                    and part < len(node.value):
                nxt = node.value[part]
                line = nxt.start_mark.line + 1
            node = nxt
        return line


def is_name(value: Any) -> bool:
    return (isinstance(value, str) and value.isidentifier() and not keyword.iskeyword(value)
            and not value.startswith("_") and value not in RESERVED_NAMES)


def load(path: str, metric_classes: dict[str, type], operation_classes: dict[str, type]) -> Setup:
    """Read, check and instantiate a controller file; raise :class:`LoadError`."""
    data, lines = _read(path)
    loader = _Loader(path, data, lines)
    loader.check_top_keys()
    loader.entries("controller_metrics", metric_classes, "metric", loader.setup.metrics)
    loader.entries("operations", operation_classes, "operation", loader.setup.operations)
    loader.add_default_operation()
    loader.check_operations()
    for i, item in enumerate(loader.controller_items()):
        loader.controller(i, item)
    if loader.problems:
        raise LoadError(loader.problems)
    return loader.setup


def _read(path: str) -> tuple[Any, _Lines]:
    """The file's YAML data and its line finder; a missing, unreadable or invalid file (or
    a top level that is not a mapping) is a :class:`LoadError`."""
    p = Path(path)
    if not p.is_file():
        raise LoadError([f"{path}: trainer controller config file not found"])
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LoadError([f"{path}: cannot read the trainer controller config file: {e}"]) from None
    try:
        data = load_yaml_text(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise LoadError([f"{where}: invalid YAML: {getattr(e, 'problem', e)}"]) from None
    if not isinstance(data, dict):
        raise LoadError([f"{path}: the top level must be a mapping with "
                         f"{', '.join(TOP_KEYS)}"])
    return data, _Lines(text)


class _Loader:
    """One pass over a controller file: each step checks one part and collects its problems
    (``path:line: message``) so that they are all reported together."""

    def __init__(self, path: str, data: dict, lines: _Lines) -> None:
        self.path, self.data, self.lines = path, data, lines
        self.problems: list[str] = []
        self.setup = Setup(path=path)
        self.declared: dict[str, set[str]] = {"controller_metrics": set(), "operations": set()}
        self.seen_controllers: set[str] = set()

    def problem(self, msg: str, *where: Any) -> None:
        line = self.lines(*where) if where else None
        self.problems.append(f"{self.path}:{line}: {msg}" if line else f"{self.path}: {msg}")

    @property
    def metric_names(self) -> list[str]:
        """Rules may name every declared metric (one that failed to build is reported)."""
        return sorted(self.declared["controller_metrics"])

    # ------------------------------------------------ metrics and operations

    def check_top_keys(self) -> None:
        for key in self.data:
            if key not in TOP_KEYS:
                self.problem(f"unknown key {key!r}{_hint(key, TOP_KEYS)}; known: "
                             f"{', '.join(TOP_KEYS)}", key)

    def entries(self, section: str, registry: dict[str, type], kind: str,
                store: dict[str, Any]) -> None:
        """Check and instantiate the ``{name, class, arguments}`` list of ``section``."""
        items = self.data.get(section)
        if items is None:
            return
        if not isinstance(items, list):
            self.problem(f"{section} must be a list of {{name, class, arguments}}", section)
            return
        for i, item in enumerate(items):
            self.entry(section, i, item, registry, kind, store)

    def entry(self, section: str, i: int, item: Any, registry: dict[str, type], kind: str,
              store: dict[str, Any]) -> None:
        problem = self.problem
        label = f"{section}[{i}]"
        if not isinstance(item, dict):
            problem(f"{label} must be a mapping with name, class, arguments", section, i)
            return
        for k in item:
            if k not in ENTRY_KEYS:
                problem(f"{label}: unknown key {k!r}{_hint(k, ENTRY_KEYS)}; known: "
                        f"{', '.join(ENTRY_KEYS)}", section, i, k)
        name, cls_name = item.get("name"), item.get("class")
        if not is_name(name):
            problem(f"{label}: name must be an identifier (letters, digits, _; not a "
                    f"keyword or a function name), got {name!r}", section, i, "name")
            return
        label = f"{kind} {name!r}"
        if name in self.declared[section]:
            problem(f"{label} is declared twice", section, i, "name")
            return
        self.declared[section].add(name)
        if not isinstance(cls_name, str) or cls_name not in registry:
            problem(f"{label}: unknown class {cls_name!r}{_hint(cls_name, registry)}; "
                    f"available: {', '.join(sorted(registry))}", section, i, "class")
            return
        arguments = item.get("arguments")
        arguments = {} if arguments is None else arguments
        if not isinstance(arguments, dict) or not all(isinstance(k, str) for k in arguments):
            problem(f"{label}: arguments must be a mapping of name: value", section, i,
                    "arguments")
            return
        try:
            store[name] = registry[cls_name](**arguments)
        except Exception as e:  # noqa: BLE001 - any class (third-party too) is reported
            problem(f"{label} (class {cls_name}): bad arguments: {e}", section, i,
                    "arguments" if "arguments" in item else "class")
            return
        if section == "controller_metrics":
            self.setup.metric_classes[name] = cls_name

    def add_default_operation(self) -> None:
        if DEFAULT_OPERATION[0] not in self.declared["operations"]:
            self.setup.operations[DEFAULT_OPERATION[0]] = DEFAULT_OPERATION[1]()

    def check_operations(self) -> None:
        """Each operation's own ``check(metric_names)``."""
        for name, op in self.setup.operations.items():
            check = getattr(op, "check", None)
            if callable(check):
                idx = next((i for i, it in enumerate(self.data.get("operations") or [])
                            if isinstance(it, dict) and it.get("name") == name), None)
                for msg in check(self.metric_names) or []:
                    self.problem(f"operation {name!r}: {msg}",
                                 *(("operations", idx, "arguments") if idx is not None else ()))

    # ------------------------------------------------ controllers

    def controller_items(self) -> list[Any]:
        controllers = self.data.get("controllers")
        if controllers is None:
            self.problem("no controllers: add a 'controllers' list")
            return []
        if not isinstance(controllers, list) or not controllers:
            self.problem("controllers must be a non-empty list", "controllers")
            return []
        return controllers

    def controller(self, i: int, item: Any) -> None:
        """Check one controller; add it to the setup when it has no problem."""
        where = ("controllers", i)
        if not isinstance(item, dict):
            self.problem(f"controllers[{i}] must be a mapping with {', '.join(CONTROLLER_KEYS)}",
                         *where)
            return
        name = item.get("name")
        label = f"controller {name!r}" if isinstance(name, str) and name else f"controllers[{i}]"
        if not isinstance(name, str) or not name.strip():
            self.problem(f"{label}: name is required (a string)", *where)
        elif name in self.seen_controllers:
            self.problem(f"{label} is declared twice", *where, "name")
        else:
            self.seen_controllers.add(name)
        for k in item:
            if k not in CONTROLLER_KEYS:
                self.problem(f"{label}: unknown key {k!r}{_hint(k, CONTROLLER_KEYS)}; known: "
                             f"{', '.join(CONTROLLER_KEYS)}", *where, k)
        # each step reports its own problems; every step runs so that all are reported
        triggers, ok_triggers = self.triggers(item, label, where)
        rule, ok_rule = self.rule(item, label, where)
        ops, ok_ops = self.controller_operations(item, label, where, triggers)
        patience, ok_patience = self.patience(item, label, where)
        level, ok_level = self.log_level(item, label, where)
        if ok_triggers and ok_rule and ok_ops and ok_patience and ok_level and rule is not None:
            self.setup.controllers.append(Controller(
                name=name, triggers=tuple(triggers), rule=rule, operations=ops,
                patience=patience, log_level=level, wanted=self.wanted(rule, ops),
                line=self.lines(*where)))

    def triggers(self, item: dict, label: str, where: tuple) -> tuple[list[str], bool]:
        raw = item.get("triggers")
        raw = [raw] if isinstance(raw, str) else raw
        triggers: list[str] = []
        if not raw or not isinstance(raw, list):
            self.problem(f"{label}: triggers must be a non-empty list of event names "
                         f"({', '.join(TRIGGERS)})", *where, "triggers")
            return triggers, False
        ok = True
        for t in raw:
            t = TRIGGER_ALIASES.get(t, t) if isinstance(t, str) else t
            if t in TRIGGERS:
                if t not in triggers:
                    triggers.append(t)
            elif t in UNSUPPORTED_TRIGGERS:
                self.problem(f"{label}: trigger {t!r} is not supported by fmtune "
                             f"({UNSUPPORTED_TRIGGERS[t]})", *where, "triggers")
                ok = False
            else:
                self.problem(f"{label}: unknown trigger {t!r}{_hint(t, TRIGGERS)}; known: "
                             f"{', '.join(TRIGGERS)}", *where, "triggers")
                ok = False
        return triggers, ok

    def rule(self, item: dict, label: str, where: tuple) -> tuple[Rule | None, bool]:
        if "rule" not in item:
            self.problem(f"{label}: rule is required", *where)
            return None, False
        try:
            return Rule.parse(item["rule"], self.metric_names), True
        except RuleError as e:
            self.problem(f"{label}: {e}", *where, "rule")
            return None, False

    def controller_operations(self, item: dict, label: str, where: tuple, triggers: list[str]
                              ) -> tuple[list[tuple[str, str]], bool]:
        ops: list[tuple[str, str]] = []
        raw_ops = item.get("operations")
        raw_ops = [raw_ops] if isinstance(raw_ops, str) else raw_ops
        if not raw_ops or not isinstance(raw_ops, list):
            self.problem(f"{label}: operations must be a non-empty list such as "
                         "[hfcontrols.should_training_stop]", *where, "operations")
            return ops, False
        ok = True
        for ref in raw_ops:
            why = self.operation_ref(ref, label, triggers)
            if why is None:
                op_name, action = ref.split(".")
                ops.append((op_name, action))
                continue
            ok = False
            if why:  # "" : already reported elsewhere
                self.problem(why, *where, "operations")
        return ops, ok

    def operation_ref(self, ref: Any, label: str, triggers: list[str]) -> str | None:
        """Why ``OPERATION.ACTION`` cannot be used (``""``: reported elsewhere), or None."""
        operations = self.setup.operations
        if not isinstance(ref, str) or ref.count(".") != 1:
            return (f"{label}: operation {ref!r} must be written OPERATION.ACTION (e.g. "
                    "hfcontrols.should_training_stop)")
        op_name, action = ref.split(".")
        if op_name not in operations:
            if op_name in self.declared["operations"]:  # declared but broken: reported above
                return ""
            return (f"{label}: unknown operation {op_name!r}{_hint(op_name, operations)}; "
                    f"declared: {', '.join(sorted(operations))}")
        actions = action_names(operations[op_name])
        if action not in actions:
            return (f"{label}: operation {op_name!r} has no action {action!r}"
                    f"{_hint(action, actions)}; actions: {', '.join(actions)}")
        if "on_train_end" in triggers and isinstance(operations[op_name], HFControls):
            return (f"{label}: {ref} on trigger on_train_end has no effect (training is over); "
                    "use another trigger")
        return None

    def patience(self, item: dict, label: str, where: tuple) -> tuple[Patience | None, bool]:
        pat = item.get("patience")
        if pat is None:
            return None, True
        if not isinstance(pat, dict):
            self.problem(f"{label}: patience must be a mapping with patience_threshold and mode",
                         *where, "patience")
            return None, False
        ok = True
        for k in pat:
            if k not in PATIENCE_KEYS:
                self.problem(f"{label}: patience: unknown key {k!r}{_hint(k, PATIENCE_KEYS)}; "
                             f"known: {', '.join(PATIENCE_KEYS)}", *where, "patience", k)
                ok = False
        threshold = pat.get("patience_threshold")
        mode = pat.get("mode", PATIENCE_MODES[0])
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
            self.problem(f"{label}: patience_threshold must be an integer >= 0, got "
                         f"{threshold!r}", *where, "patience")
            ok = False
        if mode not in PATIENCE_MODES:
            self.problem(f"{label}: patience mode must be one of {', '.join(PATIENCE_MODES)}, "
                         f"got {mode!r}{_hint(mode, PATIENCE_MODES)}", *where, "patience", "mode")
            ok = False
        return (Patience(threshold, mode) if ok else None), ok

    def log_level(self, item: dict, label: str, where: tuple) -> tuple[int, bool]:
        level = LOG_LEVELS["debug"]
        cfg = item.get("config")
        if cfg is None:
            return level, True
        if not isinstance(cfg, dict):
            self.problem(f"{label}: config must be a mapping (trigger_log_level)", *where,
                         "config")
            return level, False
        ok = True
        for k in cfg:
            if k not in CONFIG_KEYS:
                self.problem(f"{label}: config: unknown key {k!r}{_hint(k, CONFIG_KEYS)}; "
                             f"known: {', '.join(CONFIG_KEYS)}", *where, "config", k)
                ok = False
        lvl = str(cfg.get("trigger_log_level", "debug")).lower()
        if lvl not in LOG_LEVELS:
            self.problem(f"{label}: trigger_log_level must be one of {', '.join(LOG_LEVELS)}, "
                         f"got {cfg.get('trigger_log_level')!r}", *where, "config")
            return level, False
        return LOG_LEVELS[lvl], ok

    def wanted(self, rule: Rule, ops: list[tuple[str, str]]) -> frozenset[str]:
        """The metrics computed when the controller is evaluated: its rule's, plus those its
        operations ask for (``metrics_wanted``)."""
        wanted = set(rule.names)
        for op_name, _ in ops:
            fn = getattr(self.setup.operations[op_name], "metrics_wanted", None)
            if callable(fn):
                wanted |= set(fn(self.metric_names)) & set(self.metric_names)
        return frozenset(wanted)


# ------------------------------------------------------------ registries


def name_check(kind: str, check: Callable[[Any], str | None]) -> Callable[[str, Any], str | None]:
    """A ``check`` for :func:`fmtune.plugins.collect`: names are identifiers (a YAML
    ``class:`` names them) and ``check(cls)`` accepts the class."""

    def checked(name: str, cls: Any) -> str | None:
        if not name.isidentifier():
            return f"{kind} name must be an identifier, got {name!r}"
        why = check(cls)
        return f"{kind} {name!r}: {why}" if why else None

    return checked


def check_metric_class(cls: Any) -> str | None:
    if not isinstance(cls, type):
        return f"must be a class, got {cls!r}"
    if not callable(getattr(cls, "compute", None)) or getattr(cls, "compute") is Metric.compute:
        return "the class has no compute(ctx) method"
    return None


def check_operation_class(cls: Any) -> str | None:
    if not isinstance(cls, type):
        return f"must be a class, got {cls!r}"
    actions = action_names(cls)
    if not actions:
        return "the class has no actions (an 'actions' tuple or should_* methods)"
    missing = [a for a in actions if not callable(getattr(cls, a, None))]
    if missing:
        return f"actions without a method: {', '.join(missing)}"
    return None
