"""End to end: the example rule files stop/save at the step their rule says; patience; logging.

Each test trains the session's tiny random-init Llama for a few dozen steps on CPU, then
checks the step training stopped at against training_logs.jsonl (what the trainer logged),
the live TrainerState (an in-test plugin reads ``run.state`` at the end), run_summary.json
and the controller's own trainer_controller.jsonl.
"""

from __future__ import annotations

import json
import logging
import math
import os
import textwrap

import pytest

from fmtune import hookimpl
from fmtune.testing import DEMO_RECORDS, run_cli, write_jsonl

EXAMPLES = os.path.normpath(os.path.join(os.path.dirname(__file__), os.pardir, "examples"))

RECORDS = DEMO_RECORDS
HELD_OUT = [
    {"input": "translate: the cat sees a red dog =", "output": "le chat voit un chien rouge"},
    {"input": "hello", "output": "hi"},
]


class Probe:
    """In-test plugin: keeps what the live TrainerState says when training ends."""

    __name__ = "probe"

    def __init__(self):
        self.global_step = None
        self.max_steps = None

    @hookimpl
    def on_train_end(self, run, summary):
        self.global_step = run.state.global_step
        self.max_steps = run.state.max_steps


class Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def tc_log():
    handler = Messages()
    logger = logging.getLogger("fmtune.trainer_controller")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


@pytest.fixture
def data(tmp_path):
    return (write_jsonl(tmp_path / "train.jsonl", RECORDS),
            write_jsonl(tmp_path / "valid.jsonl", HELD_OUT))


def train(model, data, out, controller_file, *extra, plugins=()):
    probe = Probe()
    res = run_cli(["train", "--plugins", "trainer_controller",
                   "--trainer_controller_config_file", controller_file,
                   "--model_name_or_path", model, "--training_data_path", data[0],
                   "--output_dir", str(out), "--per_device_train_batch_size", "4",
                   "--logging_steps", "1", "--save_strategy", "no", *extra],
                  plugins=[probe, *plugins])
    return res, probe


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def logged(out, name):
    return [(r["data"]["step"], r["data"]["value"]) for r in read_jsonl(out / "training_logs.jsonl")
            if r["name"] == name]


def summary_of(out):
    return json.loads((out / "run_summary.json").read_text())


def firings(out):
    return [(r["controller"], r["step"], r["event"]) for r in read_jsonl(out / "trainer_controller.jsonl")]


def example(name):
    return os.path.join(EXAMPLES, name)


def test_stop_on_loss_threshold(fmtune_tiny_model, data, tmp_path, tc_log):
    out = tmp_path / "out"
    res, probe = train(fmtune_tiny_model, data, out, example("stop_on_loss_threshold.yaml"),
                       "--max_steps", "80", "--learning_rate", "1e-2")
    assert res.exit_code == 0, res.stderr
    losses = logged(out, "training_loss")
    # the rule: stop at the first logged loss below 1.0
    expected = next(step for step, loss in losses if loss < 1.0)
    assert 1 < expected < 80
    assert losses[-1][0] == expected and all(loss >= 1.0 for _, loss in losses[:-1])
    assert probe.global_step == expected and probe.max_steps == 80
    summary = summary_of(out)
    assert summary["global_step"] == expected
    assert summary["trainer_controller"]["stopped_by"] == {
        "controller": "stop_on_training_loss_below_threshold", "event": "on_log",
        "step": expected, "rule": "training_loss < 1.0"}
    assert summary["trainer_controller"]["fired"] == {"stop_on_training_loss_below_threshold": 1}
    (record,) = read_jsonl(out / "trainer_controller.jsonl")
    assert record["step"] == expected and record["decisions"] == {"should_training_stop": True}
    assert record["values"]["training_loss"] == pytest.approx(losses[-1][1])
    assert [r.getMessage() for r in tc_log if r.levelno >= logging.INFO] == [
        f"trainer_controller: controller 'stop_on_training_loss_below_threshold' stops training "
        f"at step {expected} (on_log): rule 'training_loss < 1.0' held"]


def test_stop_when_eval_loss_stops_improving(fmtune_tiny_model, data, tmp_path):
    out = tmp_path / "out"
    res, probe = train(fmtune_tiny_model, data, out, example("stop_on_eval_loss_plateau.yaml"),
                       "--max_steps", "60", "--learning_rate", "1e-2",
                       "--validation_data_path", data[1], "--eval_strategy", "steps",
                       "--eval_steps", "2")
    assert res.exit_code == 0, res.stderr
    evals = logged(out, "validation_loss")
    # the rule + patience 2 (reset_on_failure): stop at the 3rd evaluation in a row that is
    # not below the best earlier one
    expected, in_a_row, best = None, 0, math.inf
    for step, loss in evals:
        in_a_row = in_a_row + 1 if loss >= best else 0
        best = min(best, loss)
        if in_a_row == 3:
            expected = step
            break
    assert expected is not None and expected < 60, evals
    # a new best in between reset the count at least once, or the plateau began at once
    assert evals[-1][0] == expected
    assert probe.global_step == expected == summary_of(out)["global_step"]
    assert logged(out, "training_loss")[-1][0] == expected
    assert firings(out) == [("stop_when_eval_loss_stops_improving", expected, "on_evaluate")]


def test_save_when_eval_loss_hits_a_new_best(fmtune_tiny_model, data, tmp_path):
    out = tmp_path / "out"
    res, probe = train(fmtune_tiny_model, data, out, example("save_on_best_eval_loss.yaml"),
                       "--max_steps", "24", "--learning_rate", "1e-2",
                       "--validation_data_path", data[1], "--eval_strategy", "steps",
                       "--eval_steps", "2")
    assert res.exit_code == 0, res.stderr
    evals = logged(out, "validation_loss")
    assert [s for s, _ in evals] == list(range(2, 25, 2))
    best_steps, best = [], math.inf
    for step, loss in evals:
        if loss < best:
            best_steps.append(step)
            best = loss
    assert 1 < len(best_steps) < len(evals)  # some evaluations were not new bests
    checkpoints = sorted(int(p.split("-")[1]) for p in os.listdir(out) if p.startswith("checkpoint-"))
    assert checkpoints == best_steps  # save_strategy is "no": only the rule saved
    for step in best_steps:
        state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert state["global_step"] == step
        eval_losses = [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h]
        assert eval_losses[-1] == pytest.approx(dict(evals)[step])
        assert eval_losses[-1] == min(eval_losses)
    assert probe.global_step == 24
    assert summary_of(out)["trainer_controller"] == {
        "config_file": example("save_on_best_eval_loss.yaml"),
        "fired": {"save_on_new_best_eval_loss": len(best_steps)}, "stopped_by": None}


def test_stop_on_nan_loss_of_a_diverging_run(fmtune_tiny_model, data, tmp_path):
    out = tmp_path / "out"
    # a learning rate of 1e5 blows the weights up: the loss becomes NaN after a few steps;
    # the core would stop such a run as a failure (exit 3): here the user's rule decides
    res, probe = train(fmtune_tiny_model, data, out, example("stop_on_nan_loss.yaml"),
                       "--max_steps", "30", "--learning_rate", "1e5",
                       "--lr_scheduler_type", "constant", "--stop_on_nonfinite_loss", "false")
    assert res.exit_code == 0, res.stderr
    losses = logged(out, "training_loss")
    expected = next(step for step, loss in losses if not math.isfinite(loss))
    assert 1 < expected < 30 and losses[0][0] == 1  # finite steps came first
    assert losses[-1][0] == expected and math.isnan(losses[-1][1])  # logged as NaN, not 0.0
    assert all(math.isfinite(loss) for _, loss in losses[:-1])
    assert probe.global_step == expected == summary_of(out)["global_step"]
    (record,) = read_jsonl(out / "trainer_controller.jsonl")
    assert (record["controller"], record["step"], record["values"]) == (
        "stop_on_nan_or_inf_loss", expected, {"training_loss": "nan"})


def simulate_patience(outcomes, threshold, mode):
    """fms-hf-tuning's patience, written out: the steps (1-based) where it acts."""
    acted, count = [], 0
    for step, holds in enumerate(outcomes, start=1):
        if holds:
            count += 1
        elif mode == "reset_on_failure":
            count = 0
        if count > threshold:
            acted.append(step)
            count = 0
    return acted


PATIENCE_FILE = """
controller_metrics:
  - name: trainer_state
    class: TrainingState
  - name: evals
    class: EvalMetrics
operations:
  - name: note
    class: LogControl
    arguments:
      log_format: "{control_name} acts at step {step} ({event_name}), global_step={trainer_state[global_step]}"
controllers:
  - name: reset_mode
    triggers: [on_step_end]
    rule: trainer_state["global_step"] % 3 != 0
    patience: {patience_threshold: 2, mode: reset_on_failure}
    operations: [note.should_log]
  - name: no_reset_mode
    triggers: [on_step_end]
    rule: trainer_state["global_step"] % 3 != 0
    patience: {patience_threshold: 2, mode: no_reset_on_failure}
    operations: [note.should_log]
  - name: no_patience
    triggers: [on_step_end]
    rule: trainer_state["global_step"] % 4 == 0
    operations: [note.log]
  - name: needs_an_evaluation
    triggers: [on_step_end]
    rule: evals["eval_loss"] < 100
    operations: [hfcontrols.should_training_stop]
  - name: stop_with_patience
    triggers: [on_step_end]
    rule: trainer_state["global_step"] >= 7
    patience: {patience_threshold: 2}
    operations: [hfcontrols.should_training_stop, note.log]
"""


def test_patience_modes_logging_and_skipped_rules(fmtune_tiny_model, data, tmp_path, tc_log):
    path = tmp_path / "tc.yaml"
    path.write_text(PATIENCE_FILE)
    out = tmp_path / "out"
    res, probe = train(fmtune_tiny_model, data, out, str(path), "--max_steps", "20")
    assert res.exit_code == 0, res.stderr
    steps = range(1, 21)
    stop = simulate_patience([s >= 7 for s in steps], 2, "reset_on_failure")[0]
    assert stop == 9  # 7, 8 tolerated; the 3rd time in a row acts
    assert probe.global_step == stop == summary_of(out)["global_step"]
    assert logged(out, "training_loss")[-1][0] == stop
    ran = [s for s in steps if s <= stop]
    expected = {
        "reset_mode": simulate_patience([s % 3 != 0 for s in ran], 2, "reset_on_failure"),
        "no_reset_mode": simulate_patience([s % 3 != 0 for s in ran], 2, "no_reset_on_failure"),
        "no_patience": [s for s in ran if s % 4 == 0],
        "stop_with_patience": [stop],
    }
    assert expected["reset_mode"] == [] and expected["no_reset_mode"] == [4, 8]
    got: dict[str, list[int]] = {name: [] for name in expected}
    for controller, step, event in firings(out):
        assert event == "on_step_end"
        got[controller].append(step)
    assert got == expected
    fired = summary_of(out)["trainer_controller"]["fired"]
    assert fired == {**{k: len(v) for k, v in expected.items()}, "needs_an_evaluation": 0}
    # the log operation's messages, in order
    messages = [r.getMessage() for r in tc_log if " acts at step " in r.getMessage()]
    order = list(expected)  # within one event, controllers run in file order
    assert messages == [f"{name} acts at step {s} (on_step_end), global_step={s}" for s, _, name
                        in sorted((s, order.index(n), n) for n, v in expected.items() for s in v)]
    # a rule whose metric is not available is skipped, and that is logged (once at info)
    skips = [r for r in tc_log if "'needs_an_evaluation' skipped" in r.getMessage()]
    assert len(skips) == stop
    assert [r.levelno for r in skips] == [logging.INFO] + [logging.DEBUG] * (stop - 1)
    assert skips[0].getMessage().startswith(
        "trainer_controller: controller 'needs_an_evaluation' skipped on on_step_end at step 1: "
        "metric 'evals' is not available (no evaluation has run yet)")


def test_a_rule_that_does_not_return_a_bool_stops_the_run(fmtune_tiny_model, data, tmp_path):
    path = tmp_path / "tc.yaml"
    path.write_text(textwrap.dedent("""
        controller_metrics:
          - name: trainer_state
            class: TrainingState
        controllers:
          - name: not_a_bool
            triggers: [on_step_end]
            rule: trainer_state["best_metric"]
            operations: [hfcontrols.should_training_stop]
        """))
    res, probe = train(fmtune_tiny_model, data, tmp_path / "out", str(path), "--max_steps", "5")
    assert res.exit_code == 2
    # one line, after what the progress bar printed
    assert res.stderr.split("fmtune: error: ")[-1] == (
        f"{path}:6: controller 'not_a_bool': rule 'trainer_state[\"best_metric\"]' failed on "
        "on_step_end at step 1: the rule returned None (None), not true/false\n")
    assert probe.global_step is None  # training did not go on


RESUME_FILE = """
controller_metrics:
  - name: history
    class: HistoryBasedMetric
    arguments: {window_size: -1}
operations:
  - name: note
    class: LogControl
    arguments:
      log_format: "losses logged at steps {history[training_loss][steps]}"
controllers:
  - name: every_step
    triggers: [on_step_end]
    rule: "True"
    operations: [note.log]
"""


def test_resume_keeps_the_controller_record_and_the_history(fmtune_tiny_model, data, tmp_path):
    path = tmp_path / "tc.yaml"
    path.write_text(RESUME_FILE)
    out = tmp_path / "out"
    args = ["--save_strategy", "steps", "--save_steps", "2"]
    res, _ = train(fmtune_tiny_model, data, out, str(path), "--max_steps", "4", *args)
    assert res.exit_code == 0, res.stderr
    import shutil
    shutil.rmtree(out / "checkpoint-4")  # as if the run had died before its last checkpoint
    res, probe = train(fmtune_tiny_model, data, out, str(path), "--max_steps", "6", *args)
    assert res.exit_code == 0, res.stderr
    assert summary_of(out)["resumed_from"] == str(out / "checkpoint-2")
    assert probe.global_step == 6
    records = read_jsonl(out / "trainer_controller.jsonl")
    # steps 1-2 kept from the first run, 3-6 from the resumed one: each once
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    # on_step_end of step N comes before step N's loss is logged; after the resume the
    # history metric starts from the checkpoint's log history
    assert [r["messages"] for r in records] == [
        [f"losses logged at steps {list(range(1, n))}"] for n in range(1, 7)]
    assert summary_of(out)["trainer_controller"]["fired"] == {"every_step": 4}
