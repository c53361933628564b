"""`eval_tasks` during training: lm-eval task scores logged like any metric, choosing the best
checkpoint (`metric_for_best_model`) and driving a trainer-controller rule, asserted from
training_logs.jsonl, the trainer state and the saved checkpoints.

The model is the session's tiny random-init Llama, trained on eight records it learns by
heart; the task (a YAML of the test's own, in lm-eval's format with a local `dataset_path:
json` file) asks for exactly those answers.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from fmtune.testing import DEMO_RECORDS, run_cli, write_jsonl

METRIC = "eval_demo_recall_exact_match"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A task folder for --include_path / eval_tasks_include_path, and the records file."""
    tmp = tmp_path_factory.mktemp("task")
    data = write_jsonl(tmp / "records.jsonl", DEMO_RECORDS)
    (tmp / "tasks").mkdir()
    (tmp / "tasks" / "demo_recall.yaml").write_text(textwrap.dedent(f"""\
        task: demo_recall
        dataset_path: json
        dataset_kwargs:
          data_files: {{test: {data}}}
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{input}}}}"
        doc_to_target: "{{{{output}}}}"
        generation_kwargs: {{until: ["\\n"], do_sample: false, max_gen_toks: 12}}
        filter_list:
          - name: strip
            filter: [{{function: remove_whitespace}}, {{function: take_first}}]
        metric_list:
          - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
        """))
    return {"dir": str(tmp / "tasks"), "data": data}


def train(model: str, task: dict, out: Path, *extra: str):
    res = run_cli(["train", "--model_name_or_path", model, "--training_data_path",
                   task["data"], "--output_dir", str(out), "--per_device_train_batch_size", "8",
                   "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
                   "--logging_steps", "5", "--eval_tasks", "demo_recall",
                   "--eval_tasks_include_path", task["dir"], "--seed", "7", *extra])
    assert res.exit_code == 0, res.stderr[-4000:]
    return res


def logs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "training_logs.jsonl").read_text().splitlines()]


def scores_by_step(out: Path, name: str = METRIC) -> dict[int, float]:
    """``{step: value}`` of one metric in training_logs.jsonl (fms-hf-tuning's line format:
    ``{"name", "data": {"epoch", "step", "timestamp", "value"}}``)."""
    return {e["data"]["step"]: e["data"]["value"] for e in logs(out) if e["name"] == name}


def test_best_checkpoint_by_task_score(fmtune_tiny_model, task, tmp_path):
    out = tmp_path / "best"
    train(fmtune_tiny_model, task, out, "--max_steps", "32", "--validation_data_path",
          task["data"], "--eval_strategy", "steps", "--eval_steps", "4", "--save_strategy",
          "steps", "--save_steps", "4", "--save_total_limit", "2",
          "--load_best_model_at_end", "true", "--metric_for_best_model", METRIC)
    scores = scores_by_step(out)
    print(f"\n{METRIC} by step: {scores}")
    assert sorted(scores) == list(range(4, 36, 4))  # at every evaluation, with its loss
    assert sorted(scores_by_step(out, "validation_loss")) == sorted(scores)
    assert scores[4] <= 0.25 and max(scores.values()) >= 0.75  # it learns the records
    best_step = min(s for s, v in scores.items() if v == max(scores.values()))  # first best
    state = json.loads((out / "checkpoint-32" / "trainer_state.json").read_text())
    assert state["best_metric"] == pytest.approx(max(scores.values()))
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best_step}")
    # the best checkpoint outlives the rotation (save_total_limit=2) next to the newest
    kept = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert kept == sorted({f"checkpoint-{best_step}", "checkpoint-32"})
    # the saved model is the best one: its score, read from lm-eval's results JSON
    res = run_cli(["evaluate", "--model", str(out), "--tasks", "demo_recall", "--include_path",
                   task["dir"], "--output_path", str(tmp_path / "final")])
    assert res.exit_code == 0, res.stderr[-3000:]
    final = json.loads((tmp_path / "final" / "results.json").read_text())
    assert final["results"]["demo_recall"]["exact_match,strip"] == pytest.approx(
        max(scores.values()))


def test_a_controller_rule_on_a_task_score_stops_training(fmtune_tiny_model, task, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(textwrap.dedent(f"""\
        controller_metrics:
          - name: evals
            class: EvalMetrics
        controllers:
          - name: stop_when_recalled
            triggers: [on_evaluate]
            rule: evals["{METRIC}"] >= 0.5
            operations: [hfcontrols.should_training_stop]
        """))
    out = tmp_path / "stop"
    train(fmtune_tiny_model, task, out, "--max_steps", "60", "--validation_data_path",
          task["data"], "--eval_strategy", "steps", "--eval_steps", "4", "--save_strategy",
          "no", "--trainer_controller_config_file", str(rules))
    scores = scores_by_step(out)
    print(f"\n{METRIC} by step: {scores}")
    reached = min(s for s, v in scores.items() if v >= 0.5)
    assert max(scores) == reached < 60  # stopped at the first evaluation that reached 0.5
    assert all(v < 0.5 for s, v in scores.items() if s < reached)
    assert max(e["data"]["step"] for e in logs(out)) == reached
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == reached


def test_every_n_steps_without_validation_data(fmtune_tiny_model, task, tmp_path):
    """eval_tasks_steps: the tasks run on their own (no eval dataset, no evaluation loop)."""
    out = tmp_path / "steps"
    train(fmtune_tiny_model, task, out, "--max_steps", "20", "--eval_tasks_steps", "10",
          "--save_strategy", "no")
    assert sorted(scores_by_step(out)) == [10, 20]
    assert scores_by_step(out, "validation_loss") == {}
    assert os.path.isfile(out / "model.safetensors")


@pytest.mark.parametrize("argv,message", [
    (["--eval_tasks", "demo_recall"], "eval_tasks needs evaluations to run at: set "
     "eval_strategy (steps or epoch, with validation_data_path), or eval_tasks_steps N"),
    (["--eval_tasks_steps", "5"], "eval_tasks_steps is set but eval_tasks is not"),
    (["--eval_tasks", "demo_recal", "--eval_tasks_steps", "5"],
     "eval_tasks: unknown task 'demo_recal' (did you mean 'demo_recall'?)"),
])
def test_eval_tasks_options_are_checked_before_the_model_loads(fmtune_tiny_model, task,
                                                               tmp_path, argv, message):
    res = run_cli(["train", "--model_name_or_path", fmtune_tiny_model, "--training_data_path",
                   task["data"], "--output_dir", str(tmp_path / "o"), "--plugins", "evaluation",
                   "--eval_tasks_include_path", task["dir"], *argv])
    assert res.exit_code == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert message in res.stderr
    assert not (tmp_path / "o").exists()
