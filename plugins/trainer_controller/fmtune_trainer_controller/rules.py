"""The rule language: Python expression syntax, evaluated by a whitelist walker.

A rule is parsed with :func:`ast.parse` (which builds a tree and runs nothing)
and every node is checked against a whitelist when the config loads; the
checked tree is then evaluated by :meth:`Rule.evaluate`, a small interpreter
written here. User text never reaches ``eval``, ``exec`` or ``compile`` to
code, and no attribute of any Python object is ever looked up.

Allowed: numbers, strings, ``True``/``False``/``None``, metric names,
comparisons (``< <= > >= == != in not in``, ``is None``/``is not None``),
``and``/``or``/``not``, ``+ - * / // % **`` (the exponent a literal of at
most :data:`MAX_EXPONENT`), ``x if c else y``, indexing and slicing of
metric values (``m["key"]``, ``m["xs"][-1]``, ``m["xs"][:-1]``), short
list/tuple literals, and the functions in :data:`FUNCTIONS` (also written
``math.floor`` etc.).

Everything else is refused at load time with the rule and the offending part
named: attribute access, dunder names, imports, lambdas, comprehensions,
f-strings, walrus, keyword or ``*`` arguments, calls of anything that is not
a listed function, oversized literals and exponents.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

# ------------------------------------------------------------------ limits

MAX_RULE_CHARS = 2000       # longer rule texts are refused before parsing
MAX_NODES = 400             # syntax tree size
MAX_DEPTH = 32              # syntax tree nesting
MAX_INT_LITERAL = 10**18    # |integer literal|
MAX_STR_LITERAL = 256       # characters in a string literal
MAX_SEQ_LITERAL = 64        # elements in a list/tuple literal
MAX_EXPONENT = 100          # |literal exponent| of **
MAX_INT_BITS = 1024         # integers computed at run time stay below 2**1024
MAX_NDIGITS = 20            # |ndigits| of round(x, ndigits)


class RuleError(ValueError):
    """A rule refused when the config loads."""


class RuleRuntimeError(Exception):
    """A rule failed while training (wrong types, missing key, not true/false...)."""


class KeyedNumber(float):
    """A number that also answers ``value["key"]`` (e.g. ``training_loss["loss"]``).

    The :class:`~fmtune_trainer_controller.metrics.Loss` metric returns one, so
    both fms-hf-tuning spellings ``training_loss < 1`` and
    ``training_loss["loss"] < 1`` work.
    """

    fields: dict[str, Any]

    def __new__(cls, value: float, fields: Mapping[str, Any] | None = None):
        obj = super().__new__(cls, value)
        obj.fields = dict(fields or {})
        return obj

    def __repr__(self) -> str:
        return repr(float(self))


# ------------------------------------------------------------------ functions


def _number(x: Any, fn: str) -> float | int:
    if isinstance(x, (int, float)):
        return x
    raise RuleRuntimeError(f"{fn}() needs a number, got {_type(x)}")


def _numbers(xs: Any, fn: str) -> list:
    if not isinstance(xs, (list, tuple)):
        raise RuleRuntimeError(f"{fn}() needs a list of numbers, got {_type(xs)}")
    return [_number(x, fn) for x in xs]


def _len(x: Any) -> int:
    if isinstance(x, (list, tuple, dict, str)):
        return len(x)
    raise RuleRuntimeError(f"len() needs a list, mapping or string, got {_type(x)}")


def _round(x: Any, ndigits: Any = None) -> Any:
    x = _number(x, "round")
    if ndigits is None:
        if isinstance(x, float) and not math.isfinite(x):
            return x  # round(inf) would raise; keep the value so isinf() still sees it
        return round(x)
    if not isinstance(ndigits, int) or isinstance(ndigits, bool) or abs(ndigits) > MAX_NDIGITS:
        raise RuleRuntimeError(f"round(x, ndigits) needs an integer ndigits in "
                               f"[-{MAX_NDIGITS}, {MAX_NDIGITS}], got {ndigits!r}")
    return round(x, ndigits)


def _minmax(fn: Callable, name: str) -> Callable:
    def call(*args: Any) -> Any:
        values = _numbers(args[0], name) if len(args) == 1 else [_number(a, name) for a in args]
        if not values:
            raise RuleRuntimeError(f"{name}() of an empty list")
        return fn(values)
    return call


def _bools(xs: Any, fn: str) -> list:
    if not isinstance(xs, (list, tuple)) or not all(isinstance(x, bool) for x in xs):
        raise RuleRuntimeError(f"{fn}() needs a list of true/false values, got {_type(xs)}")
    return list(xs)


def _sqrt(x: Any) -> float:
    x = _number(x, "sqrt")
    if x < 0:
        raise RuleRuntimeError(f"sqrt() of a negative number ({x})")
    return math.sqrt(x)


@dataclass(frozen=True)
class Function:
    call: Callable[..., Any]
    min_args: int
    max_args: int
    returns_bool: bool = False


FUNCTIONS: dict[str, Function] = {
    "abs": Function(lambda x: abs(_number(x, "abs")), 1, 1),
    "len": Function(_len, 1, 1),
    "round": Function(_round, 1, 2),
    "sum": Function(lambda xs: sum(_numbers(xs, "sum")), 1, 1),
    "min": Function(_minmax(min, "min"), 1, MAX_SEQ_LITERAL),
    "max": Function(_minmax(max, "max"), 1, MAX_SEQ_LITERAL),
    "floor": Function(lambda x: math.floor(_number(x, "floor")), 1, 1),
    "ceil": Function(lambda x: math.ceil(_number(x, "ceil")), 1, 1),
    "sqrt": Function(_sqrt, 1, 1),
    "isnan": Function(lambda x: math.isnan(_number(x, "isnan")), 1, 1, True),
    "isinf": Function(lambda x: math.isinf(_number(x, "isinf")), 1, 1, True),
    "isfinite": Function(lambda x: math.isfinite(_number(x, "isfinite")), 1, 1, True),
    "any": Function(lambda xs: any(_bools(xs, "any")), 1, 1, True),
    "all": Function(lambda xs: all(_bools(xs, "all")), 1, 1, True),
}
MATH_FUNCTIONS = ("floor", "ceil", "sqrt", "isnan", "isinf", "isfinite")  # math.<name> spelling
RESERVED_NAMES = frozenset([*FUNCTIONS, "math", "True", "False", "None"])


def _type(x: Any) -> str:
    if isinstance(x, bool):
        return "true/false"
    if isinstance(x, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", tuple: "a list", dict: "a mapping",
            type(None): "None"}.get(type(x), type(x).__name__)


# ------------------------------------------------------------------ checking

_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b, ast.Pow: lambda a, b: a ** b,
}
_BINOP_TEXT = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//",
               ast.Mod: "%", ast.Pow: "**"}
_CMPOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b,
    ast.Lt: lambda a, b: a < b, ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
    ast.Is: lambda a, b: a is b, ast.IsNot: lambda a, b: a is not b,
}

# What each refused node is called in messages.
_REFUSED = {
    ast.Attribute: "attribute access", ast.Lambda: "lambda", ast.ListComp: "comprehension",
    ast.SetComp: "comprehension", ast.DictComp: "comprehension",
    ast.GeneratorExp: "generator expression", ast.JoinedStr: "f-string",
    ast.FormattedValue: "f-string", ast.NamedExpr: "assignment (:=)", ast.Starred: "* unpacking",
    ast.Await: "await", ast.Yield: "yield", ast.YieldFrom: "yield", ast.Dict: "mapping literal",
    ast.Set: "set literal",
}


def _is_dunder(text: str) -> bool:
    return text.startswith("__") or text.endswith("__")


class _Checker:
    """Walks a parsed rule; raises :class:`RuleError` at the first refused part."""

    def __init__(self, text: str, metric_names: frozenset[str]) -> None:
        self.text = text
        self.metric_names = metric_names
        self.used: set[str] = set()
        self.nodes = 0

    def refuse(self, node: ast.AST | None, why: str) -> RuleError:
        part = ast.get_source_segment(self.text, node) if node is not None else None
        where = f" (at {part!r})" if part and part != self.text else ""
        return RuleError(f"rule {self.text!r} is refused: {why}{where}")

    def check(self, node: ast.AST, depth: int = 0) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self.refuse(None, f"more than {MAX_NODES} syntax nodes")
        if depth > MAX_DEPTH:
            raise self.refuse(node, f"nested more than {MAX_DEPTH} levels deep")
        method = getattr(self, f"check_{type(node).__name__}", None)
        if method is None:
            what = _REFUSED.get(type(node), f"{type(node).__name__} syntax")
            raise self.refuse(node, f"{what} is not allowed")
        method(node, depth + 1)

    def check_Constant(self, node: ast.Constant, depth: int) -> None:
        v = node.value
        if isinstance(v, bool) or v is None:
            return
        if isinstance(v, int):
            if abs(v) > MAX_INT_LITERAL:
                raise self.refuse(node, f"integer literal larger than {MAX_INT_LITERAL:.0e}")
        elif isinstance(v, float):
            pass
        elif isinstance(v, str):
            if len(v) > MAX_STR_LITERAL:
                raise self.refuse(node, f"string literal longer than {MAX_STR_LITERAL} characters")
            if _is_dunder(v):
                raise self.refuse(node, "dunder names are not allowed")
        else:
            raise self.refuse(node, f"{type(v).__name__} literals are not allowed")

    def check_Name(self, node: ast.Name, depth: int) -> None:
        if _is_dunder(node.id):
            raise self.refuse(node, "dunder names are not allowed")
        if node.id in FUNCTIONS or node.id == "math":
            raise self.refuse(node, f"{node.id!r} is a function: call it, e.g. {node.id}(x)"
                              if node.id != "math" else "'math' only as math.floor(x) and the like")
        if node.id not in self.metric_names:
            known = ", ".join(sorted(self.metric_names)) or "none declared"
            raise self.refuse(node, f"unknown name {node.id!r} (metrics: {known}; functions: "
                              f"{', '.join(FUNCTIONS)})")
        self.used.add(node.id)

    def check_UnaryOp(self, node: ast.UnaryOp, depth: int) -> None:
        if not isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
            raise self.refuse(node, "bitwise operators are not allowed")
        if isinstance(node.op, ast.Not):
            self.check_truth(node.operand, "the operand of 'not'")
        self.check(node.operand, depth)

    def check_BinOp(self, node: ast.BinOp, depth: int) -> None:
        if type(node.op) not in _BINOPS:
            raise self.refuse(node, "bitwise operators and @ are not allowed")
        for side in (node.left, node.right):
            if isinstance(side, (ast.List, ast.Tuple)) or (
                    isinstance(side, ast.Constant) and isinstance(side.value, str)):
                raise self.refuse(node, f"arithmetic ({_BINOP_TEXT[type(node.op)]}) works on "
                                        "numbers only")
        if isinstance(node.op, ast.Pow):
            exp = node.right
            if isinstance(exp, ast.UnaryOp) and isinstance(exp.op, (ast.USub, ast.UAdd)):
                exp = exp.operand
            if not (isinstance(exp, ast.Constant) and isinstance(exp.value, (int, float))
                    and not isinstance(exp.value, bool)):
                raise self.refuse(node.right, "the exponent of ** must be a number written in "
                                  "the rule")
            if abs(exp.value) > MAX_EXPONENT:
                raise self.refuse(node.right, f"exponent larger than {MAX_EXPONENT}")
        self.check(node.left, depth)
        self.check(node.right, depth)

    def check_BoolOp(self, node: ast.BoolOp, depth: int) -> None:
        op = "and" if isinstance(node.op, ast.And) else "or"
        for value in node.values:
            self.check_truth(value, f"an operand of '{op}'")
            self.check(value, depth)

    def check_Compare(self, node: ast.Compare, depth: int) -> None:
        for op, right in zip(node.ops, node.comparators):
            if type(op) not in _CMPOPS:
                raise self.refuse(node, "unsupported comparison")
            if isinstance(op, (ast.Is, ast.IsNot)) and not (
                    isinstance(right, ast.Constant) and right.value is None):
                raise self.refuse(node, "'is' / 'is not' only compare with None")
        self.check(node.left, depth)
        for right in node.comparators:
            self.check(right, depth)

    def check_IfExp(self, node: ast.IfExp, depth: int) -> None:
        self.check_truth(node.test, "the condition of 'if'")
        for child in (node.test, node.body, node.orelse):
            self.check(child, depth)

    def check_Subscript(self, node: ast.Subscript, depth: int) -> None:
        self.check(node.value, depth)
        if isinstance(node.slice, ast.Slice):
            for part in (node.slice.lower, node.slice.upper, node.slice.step):
                if part is not None:
                    self.check(part, depth)
        else:
            self.check(node.slice, depth)

    def check_List(self, node: ast.List | ast.Tuple, depth: int) -> None:
        if len(node.elts) > MAX_SEQ_LITERAL:
            raise self.refuse(node, f"list literal longer than {MAX_SEQ_LITERAL} elements")
        for elt in node.elts:
            self.check(elt, depth)

    check_Tuple = check_List

    def check_Call(self, node: ast.Call, depth: int) -> None:
        name = self.function_name(node.func)
        if name is None:
            callee = ast.get_source_segment(self.text, node.func) or "this"
            raise self.refuse(node, f"{callee!r} cannot be called: the only functions are "
                              f"{', '.join(FUNCTIONS)} (also math.{'/'.join(MATH_FUNCTIONS)})")
        if node.keywords:
            raise self.refuse(node, "keyword arguments are not allowed")
        spec = FUNCTIONS[name]
        if not spec.min_args <= len(node.args) <= spec.max_args:
            want = (str(spec.min_args) if spec.min_args == spec.max_args
                    else f"{spec.min_args} to {spec.max_args}")
            raise self.refuse(node, f"{name}() takes {want} argument(s), got {len(node.args)}")
        for arg in node.args:
            self.check(arg, depth)

    def function_name(self, func: ast.AST) -> str | None:
        if isinstance(func, ast.Name) and func.id in FUNCTIONS:
            return func.id
        if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                and func.value.id == "math" and func.attr in MATH_FUNCTIONS):
            return func.attr
        return None

    def check_truth(self, node: ast.AST, role: str) -> None:
        """Refuse what can never be true/false where true/false is required."""
        kind = self.never_bool(node)
        if kind:
            raise self.refuse(node, f"{role} must be true/false, but {kind} never is")

    def never_bool(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.BinOp):
            return "arithmetic"
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return "arithmetic"
        if isinstance(node, ast.Constant) and not isinstance(node.value, bool):
            return "a literal " + ("None" if node.value is None else type(node.value).__name__)
        if isinstance(node, (ast.List, ast.Tuple)):
            return "a list"
        if isinstance(node, ast.Call):
            name = self.function_name(node.func)
            if name and not FUNCTIONS[name].returns_bool:
                return f"{name}()"
        if isinstance(node, ast.IfExp):
            return self.never_bool(node.body) or self.never_bool(node.orelse)
        return None


@dataclass(frozen=True)
class Rule:
    """A checked rule: ``Rule.parse(text, metric_names).evaluate(values) -> bool``."""

    text: str
    tree: ast.Expression
    names: frozenset[str]  # the metrics the rule reads

    @classmethod
    def parse(cls, text: Any, metric_names: Iterable[str]) -> "Rule":
        if isinstance(text, bool):  # YAML `rule: true`
            text = str(text)
        if not isinstance(text, str):
            raise RuleError(f"rule must be a string, got {type(text).__name__} {text!r}")
        text = " ".join(text.strip().splitlines())  # a YAML block (`rule: |`) is one expression
        if not text:
            raise RuleError("rule is empty")
        if len(text) > MAX_RULE_CHARS:
            raise RuleError(f"rule {text[:60]!r}... is refused: longer than {MAX_RULE_CHARS} "
                            "characters")
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as e:
            raise RuleError(f"rule {text!r} is not a valid expression: {e.msg}"
                            + (f" (column {e.offset})" if e.offset else "")) from None
        except (ValueError, RecursionError, MemoryError) as e:
            raise RuleError(f"rule {text!r} is refused: {type(e).__name__}: {e}") from None
        checker = _Checker(text, frozenset(metric_names))
        checker.check(tree.body)
        checker.check_truth(tree.body, "the rule")
        return cls(text, tree, frozenset(checker.used))

    def evaluate(self, values: Mapping[str, Any]) -> bool:
        """Evaluate with ``values`` (metric name -> plain value); the result is a bool."""
        try:
            result = _eval(self.tree.body, values)
        except RuleRuntimeError:
            raise
        except RecursionError:
            raise RuleRuntimeError("value nested too deeply") from None
        except (TypeError, ValueError, ZeroDivisionError, OverflowError, ArithmeticError) as e:
            raise RuleRuntimeError(f"{type(e).__name__}: {e}") from None
        if not isinstance(result, bool):
            raise RuleRuntimeError(f"the rule returned {_type(result)} ({result!r}), "
                                   "not true/false")
        return result


# ------------------------------------------------------------------ evaluation


def _truth(value: Any, role: str) -> bool:
    if not isinstance(value, bool):
        raise RuleRuntimeError(f"{role} must be true/false, got {_type(value)} ({value!r})")
    return value


def _bounded(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise RuleRuntimeError(f"integer result larger than 2**{MAX_INT_BITS}")
    return value


def _arith(op: ast.operator, a: Any, b: Any) -> Any:
    for x in (a, b):
        if not isinstance(x, (int, float)):
            raise RuleRuntimeError(f"arithmetic ({_BINOP_TEXT[type(op)]}) needs numbers, got "
                                   f"{_type(x)}")
    if isinstance(op, ast.Pow) and isinstance(a, int) and isinstance(b, int) and b > 0:
        if max(a.bit_length(), 1) * b > MAX_INT_BITS:
            raise RuleRuntimeError(f"integer result larger than 2**{MAX_INT_BITS}")
    return _bounded(_BINOPS[type(op)](a, b))


def _index(container: Any, key: Any) -> Any:
    if isinstance(container, KeyedNumber) and isinstance(key, str):
        container = container.fields
    if isinstance(container, dict):
        if isinstance(key, (list, dict)):
            raise RuleRuntimeError(f"a mapping key cannot be {_type(key)}")
        if key not in container:
            keys = ", ".join(map(repr, list(container)[:20])) or "none"
            raise RuleRuntimeError(f"no key {key!r} (keys: {keys})")
        return container[key]
    if isinstance(container, (list, tuple, str)):
        if isinstance(key, slice):
            return container[key]
        if not isinstance(key, int) or isinstance(key, bool):
            raise RuleRuntimeError(f"a list index must be an integer, got {key!r}")
        if not -len(container) <= key < len(container):
            raise RuleRuntimeError(f"index {key} out of range (length {len(container)})")
        return container[key]
    raise RuleRuntimeError(f"cannot index {_type(container)} with {key!r}")


def _slice_part(node: ast.AST | None, values: Mapping[str, Any]) -> int | None:
    if node is None:
        return None
    v = _eval(node, values)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
        raise RuleRuntimeError(f"a slice bound must be an integer, got {v!r}")
    if v is not None and abs(v) > 2**62:
        raise RuleRuntimeError(f"slice bound {v} out of range")
    return v


def _eval(node: ast.AST, values: Mapping[str, Any]) -> Any:
    t = type(node)
    if t is ast.Constant:
        return node.value
    if t is ast.Name:
        return values[node.id]
    if t is ast.BoolOp:
        is_and = isinstance(node.op, ast.And)
        role = f"an operand of '{'and' if is_and else 'or'}'"
        for value in node.values:
            if _truth(_eval(value, values), role) is not is_and:
                return not is_and
        return is_and
    if t is ast.UnaryOp:
        v = _eval(node.operand, values)
        if isinstance(node.op, ast.Not):
            return not _truth(v, "the operand of 'not'")
        if not isinstance(v, (int, float)):
            raise RuleRuntimeError(f"unary minus/plus needs a number, got {_type(v)}")
        return -v if isinstance(node.op, ast.USub) else +v
    if t is ast.BinOp:
        return _arith(node.op, _eval(node.left, values), _eval(node.right, values))
    if t is ast.Compare:
        left = _eval(node.left, values)
        for op, right_node in zip(node.ops, node.comparators):
            right = _eval(right_node, values)
            if isinstance(op, (ast.In, ast.NotIn)) and not isinstance(right, (list, tuple, dict, str)):
                raise RuleRuntimeError(f"'in' needs a list, mapping or string on the right, "
                                       f"got {_type(right)}")
            result = _CMPOPS[type(op)](left, right)
            if not isinstance(result, bool):
                raise RuleRuntimeError("a comparison did not give true/false")
            if not result:
                return False
            left = right
        return True
    if t is ast.IfExp:
        test = _truth(_eval(node.test, values), "the condition of 'if'")
        return _eval(node.body if test else node.orelse, values)
    if t is ast.Subscript:
        container = _eval(node.value, values)
        if isinstance(node.slice, ast.Slice):
            key: Any = slice(_slice_part(node.slice.lower, values),
                             _slice_part(node.slice.upper, values),
                             _slice_part(node.slice.step, values))
            if key.step == 0:
                raise RuleRuntimeError("slice step cannot be zero")
        else:
            key = _eval(node.slice, values)
        return _index(container, key)
    if t is ast.List or t is ast.Tuple:
        return [_eval(elt, values) for elt in node.elts]
    if t is ast.Call:
        name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
        return _bounded(FUNCTIONS[name].call(*[_eval(a, values) for a in node.args]))
    raise RuleRuntimeError(f"unexpected {t.__name__}")  # unreachable after checking
