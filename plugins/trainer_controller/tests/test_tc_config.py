"""Loading a controller file: every problem reported at load time, with file, line and controller."""

from __future__ import annotations

import os
import textwrap

import pytest

from fmtune.testing import run_cli, write_jsonl
from fmtune_trainer_controller.loader import LoadError, load
from fmtune_trainer_controller.metrics import BUILTIN_METRICS
from fmtune_trainer_controller.operations import BUILTIN_OPERATIONS, SafeFormat

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


def write(tmp_path, text: str, name: str = "tc.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return str(path)


def problems_of(path: str) -> list[str]:
    with pytest.raises(LoadError) as e:
        load(path, BUILTIN_METRICS, BUILTIN_OPERATIONS)
    return e.value.problems


@pytest.mark.parametrize("name", sorted(os.listdir(EXAMPLES)))
def test_every_example_file_loads(name):
    setup = load(os.path.join(EXAMPLES, name), BUILTIN_METRICS, BUILTIN_OPERATIONS)
    assert setup.controllers and "hfcontrols" in setup.operations


def test_the_fms_hf_tuning_example_loads_as_is(tmp_path):
    path = write(tmp_path, """
        controller_metrics:
          - name: trainer_state
            class: TrainingState
        operations:
          - name: hfcontrols
            class: HFControls
        controllers:
          - name: trainer_controller
            triggers:
              - on_step_end
            rule: trainer_state["global_step"] >= 3
            operations:
              - hfcontrols.should_training_stop
        """)
    setup = load(path, BUILTIN_METRICS, BUILTIN_OPERATIONS)
    (c,) = setup.controllers
    assert (c.name, c.triggers, c.operations, c.patience) == (
        "trainer_controller", ("on_step_end",), [("hfcontrols", "should_training_stop")], None)
    assert c.rule.names == {"trainer_state"} and c.line == 8


def test_all_problems_are_reported_at_once_with_lines(tmp_path):
    path = write(tmp_path, """
        controller_metrics:
          - name: trainer_state
            class: TrainingStat
          - name: window
            class: HistoryBasedMetric
            arguments: {windowsize: 3}
          - name: len
            class: Loss
        operations:
          - name: logger
            class: LogControl
            arguments:
              log_format: "{trainer_state.__class__}"
        controllers:
          - name: c1
            triggers: [on_step_end, on_init_end]
            rule: trainer_state["global_step"] >= 3
            operations: [hfcontrols.should_training_stp]
          - name: c2
            trigers: [on_log]
            rule: __import__('os').system('touch PWNED')
            operations: [nosuch.should_save]
            patience: {patience_threshold: -1, mode: reset}
          - name: c1
            triggers: on_train_end
            rule: 'True'
            operations: hfcontrols.should_save
        extra: 1
        """)
    problems = problems_of(path)
    assert problems == [
        f"{path}:28: unknown key 'extra'; known: controller_metrics, operations, controllers",
        f"{path}:3: metric 'trainer_state': unknown class 'TrainingStat' (did you mean "
        "'TrainingState'?); available: EvalMetrics, HistoryBasedMetric, Loss, PerProcessState, "
        "TrainingState",
        f"{path}:6: metric 'window' (class HistoryBasedMetric): bad arguments: "
        "HistoryBasedMetric.__init__() got an unexpected keyword argument 'windowsize'",
        f"{path}:7: controller_metrics[2]: name must be an identifier (letters, digits, _; not a "
        "keyword or a function name), got 'len'",
        f"{path}:12: operation 'logger' (class LogControl): bad arguments: log_format "
        "'{trainer_state.__class__}': field {trainer_state.__class__} is refused (only {name} "
        "and {name[key]} are allowed; no attributes, no positional fields)",
        f"{path}:16: controller 'c1': trigger 'on_init_end' is not supported by fmtune (use "
        "on_train_begin)",
        f"{path}:18: controller 'c1': operation 'hfcontrols' has no action 'should_training_stp' "
        "(did you mean 'should_training_stop'?); actions: should_training_stop, "
        "should_epoch_stop, should_save, should_evaluate, should_log",
        f"{path}:20: controller 'c2': unknown key 'trigers' (did you mean 'triggers'?); known: "
        "name, triggers, rule, patience, operations, config",
        f"{path}:19: controller 'c2': triggers must be a non-empty list of event names "
        "(on_train_begin, on_epoch_begin, on_step_end, on_log, on_evaluate, on_save, "
        "on_epoch_end, on_train_end)",
        f"{path}:21: controller 'c2': rule \"__import__('os').system('touch PWNED')\" is refused: "
        "\"__import__('os').system\" cannot be called: the only functions are abs, len, round, "
        "sum, min, max, floor, ceil, sqrt, isnan, isinf, isfinite, any, all (also "
        "math.floor/ceil/sqrt/isnan/isinf/isfinite)",
        f"{path}:22: controller 'c2': unknown operation 'nosuch'; declared: hfcontrols",
        f"{path}:23: controller 'c2': patience_threshold must be an integer >= 0, got -1",
        f"{path}:23: controller 'c2': patience mode must be one of reset_on_failure, "
        "no_reset_on_failure, got 'reset'",
        f"{path}:24: controller 'c1' is declared twice",
        f"{path}:27: controller 'c1': hfcontrols.should_save on trigger on_train_end has no "
        "effect (training is over); use another trigger",
    ]
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "the top level must be a mapping with controller_metrics, operations, controllers"),
    ("controller_metrics: []", "no controllers: add a 'controllers' list"),
    ("controllers: []", "controllers must be a non-empty list"),
    ("controllers:\n  - name: a\n    triggers: [on_log]\n    operations: [hfcontrols.should_save]",
     ":2: controller 'a': rule is required"),
    ("controllers:\n  - name: a\n    triggers: [on_lgo]\n    rule: 'True'\n"
     "    operations: [hfcontrols.should_save]",
     ":3: controller 'a': unknown trigger 'on_lgo' (did you mean 'on_log'?)"),
    ("controllers:\n  - name: a\n    triggers: [on_log]\n    rule: 'True'\n    operations: [save]",
     ":5: controller 'a': operation 'save' must be written OPERATION.ACTION"),
    ("controllers:\n  - name: a\n    triggers: [on_log]\n    rule: 'x > 1'\n"
     "    operations: [hfcontrols.should_save]",
     ":4: controller 'a': rule 'x > 1' is refused: unknown name 'x' (metrics: none declared;"),
    ("controllers:\n  - name: a\n    triggers: [on_log]\n    rule: '1 +'\n"
     "    operations: [hfcontrols.should_save]",
     ":4: controller 'a': rule '1 +' is not a valid expression: invalid syntax"),
    ("controllers:\n  - name: a\n    triggers: [on_log]\n    rule: 3\n"
     "    operations: [hfcontrols.should_save]",
     ":4: controller 'a': rule must be a string, got int 3"),
    ("controllers:\n  - name: a\n    triggers: [on_log]\n    rule: 'True'\n"
     "    operations: [hfcontrols.should_save]\n    config: {trigger_log_level: loud}",
     ":6: controller 'a': trigger_log_level must be one of debug, info, warning, error, "
     "critical, got 'loud'"),
    ("controllers:\n  - name: a\n    triggers: [on_log]\n    rule: 'True'\n"
     "    operations: [hfcontrols.should_save]\n    patience: {patience_threshold: 1, wait: 2}",
     ":6: controller 'a': patience: unknown key 'wait'; known: patience_threshold, mode"),
    ("operations:\n  - name: hfcontrols\n    class: HFControl\ncontrollers:\n  - name: a\n"
     "    triggers: [on_log]\n    rule: 'True'\n    operations: [hfcontrols.should_save]",
     ":3: operation 'hfcontrols': unknown class 'HFControl' (did you mean 'HFControls'?)"),
    ("controller_metrics:\n  - name: m\n    class: Loss\n  - name: m\n    class: Loss\n"
     "controllers: []", ":4: metric 'm' is declared twice"),
    ("controller_metrics:\n  - name: m\n    class: Loss\n    arguments: {a: 1}\ncontrollers: []",
     ":4: metric 'm' (class Loss): bad arguments: Loss.__init__() got an unexpected keyword "
     "argument 'a'"),
    ("controller_metrics:\n  - name: w\n    class: HistoryBasedMetric\n"
     "    arguments: {window_size: 0}\ncontrollers: []",
     ":4: metric 'w' (class HistoryBasedMetric): bad arguments: window_size must be an integer "
     "from 1 to 100000, or negative for all values; got 0"),
    ("operations:\n  - name: lg\n    class: LogControl\n    arguments: {log_format: '{nope}'}\n"
     "controllers: []", ":4: operation 'lg': log_format '{nope}': unknown field {nope} (fields: "
     "control_name, epoch, event_name, rule, step, tc_metrics)"),
    ("controllers:\n  - name: a\n    triggers: [on_log]\n  rule: 'True'",
     ":4: invalid YAML: expected <block end>, but found '?'"),
])
def test_one_problem_each(tmp_path, text, message):
    path = write(tmp_path, text)
    problems = problems_of(path)
    assert any(p.startswith(path) and message in p for p in problems), problems


def test_rule_names_and_aliases(tmp_path):
    path = write(tmp_path, """
        controller_metrics:
          - {name: training_loss, class: Loss}
          - {name: evals, class: EvalMetrics, arguments: {source_event: on_evaluate}}
        controllers:
          - name: both
            triggers: [on_step, on_log, on_log]
            rule: training_loss < 1 and evals["eval_loss"] < 2
            operations: [hfcontrols.should_save, hfcontrols.should_evaluate]
          - name: always
            triggers: on_save
            rule: true
            operations: hfcontrols.should_log
        """)
    a, b = load(path, BUILTIN_METRICS, BUILTIN_OPERATIONS).controllers
    assert a.triggers == ("on_step_end", "on_log")  # fmtune's hook name accepted, duplicates dropped
    assert a.operations == [("hfcontrols", "should_save"), ("hfcontrols", "should_evaluate")]
    assert b.triggers == ("on_save",) and b.rule.text == "True"


@pytest.mark.parametrize("template, message", [
    ("{0.__class__}", "field {0.__class__} is refused"),
    ("{step.__class__.__init__.__globals__}", "field {step.__class__.__init__.__globals__} is "
                                              "refused"),
    ("{tc_metrics[__class__]}", "dunder names are not allowed"),
    ("{}", "field {} is refused"),
    ("{0}", "field {0} is refused"),
    ("{step:{rule}}", "format spec '{rule}' of {step} is refused"),
    ("{step:999999999}", "width 999999999 is larger than 200"),
    ("{step:.999}", "precision 999 is larger than 50"),
    ("{step!x}", "conversion !x is refused"),
    ("{step", "is not a valid format string"),
    (123, "log_format must be a string, got int"),
    ("x" * 2001, "log_format is longer than 2000 characters"),
])
def test_log_format_attacks_are_refused(template, message):
    with pytest.raises(ValueError) as e:
        SafeFormat(template)
    assert message in str(e.value)


def test_log_format_renders_by_lookup_only():
    fmt = SafeFormat("[{event_name}] step {step} loss {m[loss]:.2f} last {w[xs][-1]!r} "
                     "{m[nope]} {w[xs][9]} {{literal}} {m:>6}")
    assert fmt.names() == {"event_name", "step", "m", "w"}
    text = fmt.render({"event_name": "on_log", "step": 3, "m": {"loss": 0.123}, "w": {"xs": [1, 2]}})
    assert text == ("[on_log] step 3 loss 0.12 last 2 n/a n/a {literal} {'loss': 0.123}")


# ------------------------------------------------------------ through the CLI


def test_bad_controller_file_stops_before_anything_loads(tmp_path):
    path = write(tmp_path, """
        controller_metrics:
          - {name: trainer_state, class: TrainingState}
        controllers:
          - name: sneaky
            triggers: [on_step_end]
            rule: trainer_state.__class__.__subclasses__() == []
            operations: [hfcontrols.should_training_stop]
          - name: greedy
            triggers: [on_step_end]
            rule: 9**9**9 > trainer_state["global_step"]
            operations: [hfcontrols.should_training_stop]
        """)
    out = tmp_path / "out"
    res = run_cli(["train", "--plugins", "trainer_controller", "--trainer_controller_config_file",
                   path, "--model_name_or_path", str(tmp_path),  # never loaded
                   "--training_data_path", write_jsonl(tmp_path / "d.jsonl", [{"input": "a",
                                                                              "output": "b"}]),
                   "--output_dir", str(out)])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert lines == [
        "fmtune: error: invalid config:",
        f"  - {path}:6: controller 'sneaky': rule 'trainer_state.__class__.__subclasses__() == []' "
        "is refused: 'trainer_state.__class__.__subclasses__' cannot be called: the only "
        "functions are abs, len, round, sum, min, max, floor, ceil, sqrt, isnan, isinf, "
        "isfinite, any, all (also math.floor/ceil/sqrt/isnan/isinf/isfinite) (at "
        "'trainer_state.__class__.__subclasses__()')",
        f"  - {path}:10: controller 'greedy': rule '9**9**9 > trainer_state[\"global_step\"]' is "
        "refused: the exponent of ** must be a number written in the rule (at '9**9')",
    ]
    assert not out.exists()  # refused before the model, the data or the output folder


def test_missing_file_and_inactive_plugin(tmp_path):
    common = ["--model_name_or_path", "m", "--training_data_path", "d", "--output_dir",
              str(tmp_path / "o")]
    res = run_cli(["train", "--plugins", "trainer_controller",
                   "--trainer_controller_config_file", str(tmp_path / "nope.yaml"), *common])
    assert res.exit_code == 2
    assert f"{tmp_path / 'nope.yaml'}: trainer controller config file not found" in res.stderr
    res = run_cli(["train", "--trainer_controller_config_file", "x.yaml", *common])
    assert res.exit_code == 2
    # the flag activates the plugin (fms-hf-tuning users pass no --plugins), which checks it
    assert "--trainer_controller_config_file activates plugin 'trainer_controller'" in res.stderr
    assert "x.yaml: trainer controller config file not found" in res.stderr
