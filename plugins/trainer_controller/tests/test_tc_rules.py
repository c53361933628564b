"""The rule language: what it computes, what it refuses at load time, and that refusing runs nothing."""

from __future__ import annotations

import math
import sys
import time

import pytest

from fmtune_trainer_controller.rules import (FUNCTIONS, MAX_RULE_CHARS, KeyedNumber, Rule,
                                             RuleError, RuleRuntimeError)

METRICS = ["trainer_state", "training_loss", "eval_history", "flags"]
VALUES = {
    "trainer_state": {"global_step": 12, "epoch": 1.5, "max_steps": 40, "best_metric": None,
                      "best_model_checkpoint": None},
    "training_loss": KeyedNumber(0.75, {"loss": 0.75, "step": 12, "epoch": 1.5}),
    "eval_history": {"window_size": 4,
                     "metrics": {"eval_loss": [2.0, 1.5, 1.7, 1.6], "steps": [3, 6, 9, 12]},
                     "training_loss": {"loss": [], "epoch": [], "steps": []}},
    "flags": {"ok": [True, True], "mixed": [True, False], "name": "run-a"},
}


def ev(rule: str, values=VALUES) -> bool:
    return Rule.parse(rule, METRICS).evaluate(values)


@pytest.mark.parametrize("rule, expected", [
    ('trainer_state["global_step"] >= 3', True),
    ('trainer_state["global_step"] >= 13', False),
    ("training_loss < 1.0", True),
    ('training_loss["loss"] < 0.5', False),                       # fms-hf-tuning's keyed spelling
    ('training_loss["step"] == trainer_state["global_step"]', True),
    ('0 < training_loss < 1 and trainer_state["epoch"] >= 1', True),   # chained comparison
    ('trainer_state["global_step"] % 4 == 0 and not trainer_state["global_step"] % 8 == 0', True),
    ('trainer_state["global_step"] / 5 == 2.4', True),
    ('trainer_state["global_step"] // 5 == 2 and -trainer_state["global_step"] == -12', True),
    ('trainer_state["global_step"] ** 2 == 144 and 2 ** -1 == 0.5', True),
    ('trainer_state["best_metric"] is None and trainer_state["epoch"] is not None', True),
    ('eval_history["metrics"]["eval_loss"][-1] >= min(eval_history["metrics"]["eval_loss"][:-1])',
     True),
    ('eval_history["metrics"]["eval_loss"][-1] < min(eval_history["metrics"]["eval_loss"][:-1])',
     False),
    ('len(eval_history["metrics"]["eval_loss"]) == eval_history["window_size"]', True),
    ('len(eval_history["training_loss"]["loss"]) == 0', True),
    ('sum(eval_history["metrics"]["steps"]) == 30 and max(1, 2, 3) == 3', True),
    ('round(sum(eval_history["metrics"]["eval_loss"]) / 4, 3) == 1.7', True),
    ('abs(-2) == 2 and floor(2.7) == 2 and math.ceil(2.1) == 3 and sqrt(16) == 4', True),
    ("isfinite(training_loss) and not isnan(training_loss) and not math.isinf(training_loss)", True),
    ('all(flags["ok"]) and any(flags["mixed"]) and not all(flags["mixed"])', True),
    ('flags["name"] == "run-a" and "ok" in flags and "nope" not in flags', True),
    ('trainer_state["global_step"] in [10, 11, 12] and 3 in (1, 2, 3)', True),
    ('(trainer_state["global_step"] if trainer_state["epoch"] > 1 else 0) == 12', True),
    ('eval_history["metrics"]["eval_loss"][::2] == [2.0, 1.7]', True),
    ("True", True),
    ("False or False", False),
])
def test_rules_compute_what_they_say(rule, expected):
    assert ev(rule) is expected


def test_rule_reports_the_metrics_it_reads():
    rule = Rule.parse('trainer_state["global_step"] > 2 and training_loss < 1', METRICS)
    assert rule.names == {"trainer_state", "training_loss"}
    assert Rule.parse("True", METRICS).names == frozenset()
    assert Rule.parse(True, METRICS).text == "True"  # YAML `rule: true`
    block = Rule.parse("training_loss < 1\nand trainer_state['epoch'] > 1\n", METRICS)  # `rule: |`
    assert block.text == "training_loss < 1 and trainer_state['epoch'] > 1" and ev(block.text)


def test_nan_and_inf_are_seen():
    nan_loss = {**VALUES, "training_loss": KeyedNumber(float("nan"), {"loss": float("nan")})}
    inf_loss = {**VALUES, "training_loss": KeyedNumber(float("inf"))}
    rule = "not isfinite(training_loss)"
    assert ev(rule, nan_loss) is True and ev(rule, inf_loss) is True and ev(rule) is False
    assert ev("training_loss != training_loss", nan_loss) is True  # NaN is not equal to itself


@pytest.mark.parametrize("rule, message", [
    ('trainer_state["global_step"] > "3"', "TypeError"),
    ('trainer_state["no_such_key"] > 3', "no key 'no_such_key' (keys: 'global_step', 'epoch'"),
    ('eval_history["metrics"]["eval_loss"][10] > 1', "index 10 out of range (length 4)"),
    ('trainer_state["global_step"] / 0 > 1', "ZeroDivisionError"),
    ('trainer_state["global_step"]', "the rule returned a number (12), not true/false"),
    ('trainer_state["best_metric"]', "the rule returned None (None), not true/false"),
    ('flags["ok"] and True', "an operand of 'and' must be true/false, got a list"),
    ('not trainer_state["global_step"]', "the operand of 'not' must be true/false"),
    ('flags["name"] + 1 > 0', "arithmetic (+) needs numbers, got a string"),
    ('(trainer_state["global_step"] * 10**15) ** 100 > 0', "integer result larger than 2**1024"),
    ('round(training_loss, trainer_state["global_step"] * 10) > 0', "ndigits"),
    ('sqrt(-training_loss) > 0', "sqrt() of a negative number"),
    ('min(eval_history["training_loss"]["loss"]) > 0', "min() of an empty list"),
    ('len(trainer_state["global_step"]) > 0', "len() needs a list, mapping or string"),
    ('all(eval_history["metrics"]["steps"])', "all() needs a list of true/false values"),
    ('3 in trainer_state["global_step"]', "'in' needs a list, mapping or string on the right"),
])
def test_runtime_errors_are_clear(rule, message):
    with pytest.raises(RuleRuntimeError) as e:
        ev(rule)
    assert message in str(e.value)


# ---------------------------------------------------------------- hostile rules

HOSTILE = [
    # (rule, a part of the refusal message)
    ("__import__('os').system('touch PWNED')", "\"__import__('os').system\" cannot be called"),
    ("__import__('os')", "'__import__' cannot be called"),
    ("().__class__", "attribute access is not allowed"),
    ("().__class__.__bases__[0].__subclasses__()", "cannot be called"),
    ("[].__class__.__mro__[1].__subclasses__()[0]", "cannot be called"),
    ("open('/etc/passwd')", "'open' cannot be called"),
    ("open('/etc/passwd').read() == ''", "cannot be called"),
    ("9**9**9", "the exponent of ** must be a number written in the rule (at '9**9')"),
    ("2**10000000 > 1", "exponent larger than 100 (at '10000000')"),
    ("trainer_state['global_step'] ** trainer_state['global_step'] > 1",
     "the exponent of ** must be a number written in the rule"),
    ("eval('1+1') == 2", "'eval' cannot be called"),
    ("exec('import os')", "'exec' cannot be called"),
    ("compile('1', 'x', 'eval')", "'compile' cannot be called"),
    ("getattr(trainer_state, '__class__')", "'getattr' cannot be called"),
    ("trainer_state.__class__", "attribute access is not allowed"),
    ("trainer_state.keys() == []", "'trainer_state.keys' cannot be called"),
    ("trainer_state['global_step'].__class__.__mro__", "attribute access is not allowed"),
    ("trainer_state.a.b.c.d", "attribute access is not allowed"),
    ("(lambda: True)()", "'lambda: True' cannot be called"),
    ("(lambda: True)", "lambda is not allowed"),
    ("[x for x in range(10**9)] == []", "comprehension is not allowed"),
    ("sum(x for x in range(10**12)) > 0", "generator expression is not allowed"),
    ("{x: x for x in range(10)} == {}", "comprehension is not allowed"),
    ("{1, 2} == {1}", "set literal is not allowed"),
    ("{'a': 1} == {}", "mapping literal is not allowed"),
    ("'a' * 10**9 == ''", "arithmetic (*) works on numbers only"),
    ("[0] * 10**9 == []", "arithmetic (*) works on numbers only"),
    ("'%s' % trainer_state == ''", "arithmetic (%) works on numbers only"),
    ("'{0.__class__}'.format(1) == ''", "cannot be called"),
    ("globals()['x']", "'globals' cannot be called"),
    ("locals() == {}", "'locals' cannot be called"),
    ("vars() == {}", "'vars' cannot be called"),
    ("type(1) == int", "'type' cannot be called"),
    ("breakpoint()", "'breakpoint' cannot be called"),
    ("input() == 'y'", "'input' cannot be called"),
    ("__builtins__", "dunder names are not allowed"),
    ("__builtins__['eval']('1')", "cannot be called"),
    ("trainer_state['__class__'] == 1", "dunder names are not allowed (at \"'__class__'\")"),
    ("trainer_state[().__class__] == 1", "attribute access is not allowed"),
    ("min.__self__", "attribute access is not allowed"),
    ("len.__call__([]) == 0", "cannot be called"),
    ("math.__dict__", "attribute access is not allowed"),
    ("math.exp(1000) > 0", "'math.exp' cannot be called"),
    ("os.system('ls')", "'os.system' cannot be called"),
    ("import os", "is not a valid expression"),
    ("(x := 1) == 1", "assignment (:=) is not allowed"),
    ("f'{trainer_state.__class__}' == ''", "f-string is not allowed"),
    ("max(*[1, 2]) == 2", "* unpacking is not allowed"),
    ("round(1.5, ndigits=2) == 1.5", "keyword arguments are not allowed"),
    ("b'abc' == b'abc'", "bytes literals are not allowed"),
    ("... == ...", "ellipsis literals are not allowed"),
    ("1j == 1j", "complex literals are not allowed"),
    ("1 << 100000 > 0", "bitwise operators and @ are not allowed"),
    ("~1 == -2", "bitwise operators are not allowed"),
    ("trainer_state @ trainer_state", "bitwise operators and @ are not allowed"),
    ("(yield) == 1", "yield is not allowed"),
    ("x == 1", "unknown name 'x' (metrics: eval_history, flags, trainer_state, training_loss"),
    ("len == 1", "'len' is a function: call it"),
    ("1 if True else __import__('os')", "'__import__' cannot be called"),
    ("9" * 500 + " > 1", "integer literal larger than"),
    ("'" + "a" * 300 + "' == ''", "string literal longer than 256 characters"),
    ("[" + ", ".join(["1"] * 100) + "] == []", "list literal longer than 64 elements"),
    ("-(" * 40 + "1" + ")" * 40 + " > 0", "nested more than 32 levels deep"),
    ("[" * 40 + "]" * 40 + " == []", "nested more than 32 levels deep"),
    ("not " * 50 + "True", "nested more than 32 levels deep"),
    (" and ".join(["1 < 2"] * 200), "more than 400 syntax nodes"),
    ("True or " * 300 + "True", "longer than 2000 characters"),
    ("trainer_state['global_step'] + 1", "the rule must be true/false, but arithmetic never is"),
    ("len(flags['ok'])", "the rule must be true/false, but len() never is"),
    ("'yes'", "the rule must be true/false, but a literal str never is"),
    ("training_loss and 1", "an operand of 'and' must be true/false, but a literal int never is"),
    ("trainer_state['epoch'] is 1", "'is' / 'is not' only compare with None"),
    ("", "rule is empty"),
]


def test_the_hostile_corpus_is_large_enough():
    assert len(HOSTILE) >= 30 and len({r for r, _ in HOSTILE}) == len(HOSTILE)


@pytest.fixture(scope="module")
def audit_log():
    """Records every audit event (open, exec, import, os.system, ...) while armed.

    ``ast.parse`` raises the ``compile`` event (it compiles to a syntax tree only);
    anything else would mean the refused rule made Python do something.
    """
    events: list[tuple[str, tuple]] = []
    armed = [False]

    def hook(event, args):
        if armed[0] and event != "compile":
            events.append((event, args))

    sys.addaudithook(hook)  # cannot be removed; inert once disarmed
    return events, armed


@pytest.mark.parametrize("rule, message", HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_hostile_rules_are_refused_at_load_without_running_anything(rule, message, audit_log,
                                                                    tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a rule that managed to `touch PWNED` would leave it here
    events, armed = audit_log
    events.clear()
    start = time.process_time()
    armed[0] = True
    try:
        with pytest.raises(RuleError) as e:
            Rule.parse(rule, METRICS)
    finally:
        armed[0] = False
    assert time.process_time() - start < 5  # a guard against hangs, not a timing assertion
    assert events == []
    assert list(tmp_path.iterdir()) == []
    text = str(e.value)
    assert message in text, text
    # the message quotes the rule (a too-long one by its first 60 characters), on one line
    if len(rule) > MAX_RULE_CHARS:
        assert repr(rule[:60]) in text
    elif rule:
        assert repr(rule) in text
    assert "\n" not in text


def test_the_function_list():
    assert set(FUNCTIONS) == {"abs", "len", "round", "sum", "min", "max", "floor", "ceil", "sqrt",
                              "isnan", "isinf", "isfinite", "any", "all"}
    assert ev("round(2.567, 1) == 2.6 and round(7) == 7 and round(-2.5) == -2") is True
    inf = {**VALUES, "training_loss": KeyedNumber(math.inf)}
    assert ev("isinf(round(training_loss)) and isinf(abs(-training_loss))", inf) is True
