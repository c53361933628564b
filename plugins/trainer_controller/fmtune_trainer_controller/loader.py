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
    lines = _Lines(text)
    problems: list[str] = []

    def problem(msg: str, *where: Any) -> None:
        line = lines(*where) if where else None
        problems.append(f"{path}:{line}: {msg}" if line else f"{path}: {msg}")

    if not isinstance(data, dict):
        raise LoadError([f"{path}: the top level must be a mapping with "
                         f"{', '.join(TOP_KEYS)}"])
    for key in data:
        if key not in TOP_KEYS:
            problem(f"unknown key {key!r}{_hint(key, TOP_KEYS)}; known: {', '.join(TOP_KEYS)}",
                    key)
    setup = Setup(path=path)

    # ------------------------------------------------ metrics and operations
    declared: dict[str, set[str]] = {"controller_metrics": set(), "operations": set()}

    def entries(section: str, registry: dict[str, type], kind: str, store: dict[str, Any]) -> None:
        items = data.get(section)
        if items is None:
            return
        if not isinstance(items, list):
            problem(f"{section} must be a list of {{name, class, arguments}}", section)
            return
        for i, item in enumerate(items):
            label = f"{section}[{i}]"
            if not isinstance(item, dict):
                problem(f"{label} must be a mapping with name, class, arguments", section, i)
                continue
            for k in item:
                if k not in ENTRY_KEYS:
                    problem(f"{label}: unknown key {k!r}{_hint(k, ENTRY_KEYS)}; known: "
                            f"{', '.join(ENTRY_KEYS)}", section, i, k)
            name, cls_name = item.get("name"), item.get("class")
            if not is_name(name):
                problem(f"{label}: name must be an identifier (letters, digits, _; not a "
                        f"keyword or a function name), got {name!r}", section, i, "name")
                continue
            label = f"{kind} {name!r}"
            if name in declared[section]:
                problem(f"{label} is declared twice", section, i, "name")
                continue
            declared[section].add(name)
            if not isinstance(cls_name, str) or cls_name not in registry:
                problem(f"{label}: unknown class {cls_name!r}{_hint(cls_name, registry)}; "
                        f"available: {', '.join(sorted(registry))}", section, i, "class")
                continue
            arguments = item.get("arguments")
            arguments = {} if arguments is None else arguments
            if not isinstance(arguments, dict) or not all(isinstance(k, str) for k in arguments):
                problem(f"{label}: arguments must be a mapping of name: value", section, i,
                        "arguments")
                continue
            try:
                store[name] = registry[cls_name](**arguments)
            except Exception as e:  # noqa: BLE001 - any class (third-party too) is reported
                problem(f"{label} (class {cls_name}): bad arguments: {e}", section, i,
                        "arguments" if "arguments" in item else "class")
                continue
            if section == "controller_metrics":
                setup.metric_classes[name] = cls_name

    entries("controller_metrics", metric_classes, "metric", setup.metrics)
    entries("operations", operation_classes, "operation", setup.operations)
    seen_ops = declared["operations"]
    if DEFAULT_OPERATION[0] not in seen_ops:
        setup.operations[DEFAULT_OPERATION[0]] = DEFAULT_OPERATION[1]()
    # rules may name every declared metric (one that failed to build is reported above)
    metric_names = sorted(declared["controller_metrics"])

    # ------------------------------------------------ operations' own checks
    for name, op in setup.operations.items():
        check = getattr(op, "check", None)
        if callable(check):
            idx = next((i for i, it in enumerate(data.get("operations") or [])
                        if isinstance(it, dict) and it.get("name") == name), None)
            for msg in check(metric_names) or []:
                problem(f"operation {name!r}: {msg}",
                        *(("operations", idx, "arguments") if idx is not None else ()))

    # ------------------------------------------------ controllers
    controllers = data.get("controllers")
    if controllers is None:
        problem("no controllers: add a 'controllers' list")
        controllers = []
    elif not isinstance(controllers, list) or not controllers:
        problem("controllers must be a non-empty list", "controllers")
        controllers = []
    seen_controllers: set[str] = set()
    for i, item in enumerate(controllers):
        where = ("controllers", i)
        if not isinstance(item, dict):
            problem(f"controllers[{i}] must be a mapping with {', '.join(CONTROLLER_KEYS)}", *where)
            continue
        name = item.get("name")
        label = f"controller {name!r}" if isinstance(name, str) and name else f"controllers[{i}]"
        if not isinstance(name, str) or not name.strip():
            problem(f"{label}: name is required (a string)", *where)
        elif name in seen_controllers:
            problem(f"{label} is declared twice", *where, "name")
        else:
            seen_controllers.add(name)
        for k in item:
            if k not in CONTROLLER_KEYS:
                problem(f"{label}: unknown key {k!r}{_hint(k, CONTROLLER_KEYS)}; known: "
                        f"{', '.join(CONTROLLER_KEYS)}", *where, k)
        ok = True

        # triggers
        raw = item.get("triggers")
        raw = [raw] if isinstance(raw, str) else raw
        triggers: list[str] = []
        if not raw or not isinstance(raw, list):
            problem(f"{label}: triggers must be a non-empty list of event names "
                    f"({', '.join(TRIGGERS)})", *where, "triggers")
            ok = False
        else:
            for t in raw:
                t = TRIGGER_ALIASES.get(t, t) if isinstance(t, str) else t
                if t in TRIGGERS:
                    if t not in triggers:
                        triggers.append(t)
                elif t in UNSUPPORTED_TRIGGERS:
                    problem(f"{label}: trigger {t!r} is not supported by fmtune "
                            f"({UNSUPPORTED_TRIGGERS[t]})", *where, "triggers")
                    ok = False
                else:
                    problem(f"{label}: unknown trigger {t!r}{_hint(t, TRIGGERS)}; known: "
                            f"{', '.join(TRIGGERS)}", *where, "triggers")
                    ok = False

        # rule
        rule = None
        if "rule" not in item:
            problem(f"{label}: rule is required", *where)
            ok = False
        else:
            try:
                rule = Rule.parse(item["rule"], metric_names)
            except RuleError as e:
                problem(f"{label}: {e}", *where, "rule")
                ok = False

        # operations
        ops: list[tuple[str, str]] = []
        raw_ops = item.get("operations")
        raw_ops = [raw_ops] if isinstance(raw_ops, str) else raw_ops
        if not raw_ops or not isinstance(raw_ops, list):
            problem(f"{label}: operations must be a non-empty list such as "
                    "[hfcontrols.should_training_stop]", *where, "operations")
            ok = False
        else:
            for ref in raw_ops:
                if not isinstance(ref, str) or ref.count(".") != 1:
                    problem(f"{label}: operation {ref!r} must be written "
                            "OPERATION.ACTION (e.g. hfcontrols.should_training_stop)",
                            *where, "operations")
                    ok = False
                    continue
                op_name, action = ref.split(".")
                if op_name not in setup.operations:
                    if op_name not in seen_ops:  # (declared but broken ones are reported above)
                        problem(f"{label}: unknown operation {op_name!r}"
                                f"{_hint(op_name, setup.operations)}; declared: "
                                f"{', '.join(sorted(setup.operations))}", *where, "operations")
                    ok = False
                    continue
                actions = action_names(setup.operations[op_name])
                if action not in actions:
                    problem(f"{label}: operation {op_name!r} has no action {action!r}"
                            f"{_hint(action, actions)}; actions: {', '.join(actions)}",
                            *where, "operations")
                    ok = False
                    continue
                if "on_train_end" in triggers and isinstance(setup.operations[op_name], HFControls):
                    problem(f"{label}: {ref} on trigger on_train_end has no effect (training "
                            "is over); use another trigger", *where, "operations")
                    ok = False
                    continue
                ops.append((op_name, action))

        # patience
        patience = None
        if item.get("patience") is not None:
            pat = item["patience"]
            if not isinstance(pat, dict):
                problem(f"{label}: patience must be a mapping with patience_threshold and mode",
                        *where, "patience")
                ok = False
            else:
                for k in pat:
                    if k not in PATIENCE_KEYS:
                        problem(f"{label}: patience: unknown key {k!r}{_hint(k, PATIENCE_KEYS)}; "
                                f"known: {', '.join(PATIENCE_KEYS)}", *where, "patience", k)
                        ok = False
                threshold = pat.get("patience_threshold")
                mode = pat.get("mode", PATIENCE_MODES[0])
                if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
                    problem(f"{label}: patience_threshold must be an integer >= 0, got "
                            f"{threshold!r}", *where, "patience")
                    ok = False
                if mode not in PATIENCE_MODES:
                    problem(f"{label}: patience mode must be one of {', '.join(PATIENCE_MODES)}, "
                            f"got {mode!r}{_hint(mode, PATIENCE_MODES)}", *where, "patience", "mode")
                    ok = False
                if ok:
                    patience = Patience(threshold, mode)

        # config
        level = LOG_LEVELS["debug"]
        cfg = item.get("config")
        if cfg is not None:
            if not isinstance(cfg, dict):
                problem(f"{label}: config must be a mapping (trigger_log_level)", *where, "config")
                ok = False
            else:
                for k in cfg:
                    if k not in CONFIG_KEYS:
                        problem(f"{label}: config: unknown key {k!r}{_hint(k, CONFIG_KEYS)}; "
                                f"known: {', '.join(CONFIG_KEYS)}", *where, "config", k)
                        ok = False
                lvl = str(cfg.get("trigger_log_level", "debug")).lower()
                if lvl not in LOG_LEVELS:
                    problem(f"{label}: trigger_log_level must be one of {', '.join(LOG_LEVELS)}, "
                            f"got {cfg.get('trigger_log_level')!r}", *where, "config")
                    ok = False
                else:
                    level = LOG_LEVELS[lvl]

        if ok and rule is not None:
            wanted = set(rule.names)
            for op_name, _ in ops:
                fn = getattr(setup.operations[op_name], "metrics_wanted", None)
                if callable(fn):
                    wanted |= set(fn(metric_names)) & set(metric_names)
            setup.controllers.append(Controller(
                name=name, triggers=tuple(triggers), rule=rule, operations=ops,
                patience=patience, log_level=level, wanted=frozenset(wanted),
                line=lines(*where)))

    if problems:
        raise LoadError(problems)
    return setup


# ------------------------------------------------------------ registries


def collect(pm: Any, hook: str, kind: str, check: Callable[[Any], str | None]
            ) -> tuple[dict[str, type], list[str]]:
    """Call every plugin's ``hook(register)``; refuse duplicate and malformed entries.

    Returns ``(name -> class, problems)``. Each implementation is called with
    its own ``register`` so a duplicate names both plugins.
    """
    classes: dict[str, type] = {}
    owners: dict[str, str] = {}
    problems: list[str] = []
    caller = getattr(pm.hook, hook, None)
    if caller is None:
        return classes, [f"the fmtune core has no hook {hook!r}: upgrade fmtune"]
    for impl in caller.get_hookimpls():  # in registration order
        plugin = impl.plugin_name

        def register(name: Any, cls: Any, _plugin: str = plugin) -> None:
            if not isinstance(name, str) or not name.isidentifier():
                problems.append(f"plugin {_plugin!r}: {kind} name must be an identifier, "
                                f"got {name!r}")
                return
            if name in classes:
                problems.append(f"{kind} {name!r} is registered by both {owners[name]!r} and "
                                f"{_plugin!r}")
                return
            why = check(cls)
            if why:
                problems.append(f"plugin {plugin!r}: {kind} {name!r}: {why}")
                return
            classes[name], owners[name] = cls, _plugin

        if getattr(impl, "wrapper", False) or getattr(impl, "hookwrapper", False):
            problems.append(f"plugin {plugin!r}: {hook} cannot be a wrapper")
            continue
        try:
            impl.function(*[register for _ in impl.argnames])
        except Exception as e:  # noqa: BLE001 - a broken plugin is reported, not raised
            problems.append(f"plugin {plugin!r}: {hook} failed: {type(e).__name__}: {e}")
    return classes, problems


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
