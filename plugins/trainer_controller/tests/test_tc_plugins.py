"""Third-party metrics and operations through the register_controller_* hooks."""

from __future__ import annotations

import json
import os
import textwrap
from types import SimpleNamespace

import pytest

from fmtune import hookimpl
from fmtune.commands import load_config
from fmtune.testing import run_cli, write_jsonl
from fmtune_trainer_controller import Metric, MetricUnavailable, Operation
from fmtune_trainer_controller import plugin as tc_plugin
from fmtune_trainer_controller.engine import ControllerError, Engine
from fmtune_trainer_controller.loader import LoadError

RECORDS = [
    {"input": "translate: the red cat sees a dog =", "output": "le chat rouge voit un chien"},
    {"input": "question: what is two plus two? answer:", "output": "four"},
    {"input": "The quick brown fox", "output": "jumps over the lazy dog."},
    {"input": "input output label", "output": "yes no true false"},
]


class TokensSeen(Metric):
    """Tokens trained so far (transformers counts them), divided by ``scale``."""

    def __init__(self, scale: int = 1):
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = scale

    def compute(self, ctx):
        return ctx.state.num_input_tokens_seen / self.scale


class Notebook(Operation):
    """Writes a JSON line per action and asks for a checkpoint."""

    actions = ("write",)

    def __init__(self, path: str):
        self.path = path

    def write(self, ctx):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": ctx.step, "controller": ctx.controller,
                                "event": ctx.event, "values": ctx.values}) + "\n")
        return {"should_save": True}


class Extras:
    """An in-test plugin adding one metric and one operation."""

    __name__ = "extras"

    @hookimpl
    def register_controller_metrics(self, register):
        register("TokensSeen", TokensSeen)

    @hookimpl
    def register_controller_operations(self, register):
        register("Notebook", Notebook)


class Probe:
    __name__ = "probe"

    @hookimpl
    def on_train_end(self, run, summary):
        self.global_step = run.state.global_step
        self.log_history = list(run.state.log_history)


def controller_file(tmp_path, limit, notebook):
    path = tmp_path / "tc.yaml"
    path.write_text(textwrap.dedent(f"""
        controller_metrics:
          - name: tokens
            class: TokensSeen
            arguments: {{scale: 1}}
        operations:
          - name: notebook
            class: Notebook
            arguments: {{path: {notebook}}}
        controllers:
          - name: enough_tokens
            triggers: [on_step_end]
            rule: tokens >= {limit}
            operations: [notebook.write, hfcontrols.should_training_stop]
        """))
    return str(path)


def test_a_plugin_metric_and_operation_drive_training(fmtune_tiny_model, tmp_path):
    notebook = tmp_path / "notebook.jsonl"
    out = tmp_path / "out"
    probe = Probe()
    limit = 150
    res = run_cli(["train", "--plugins", "trainer_controller",
                   "--trainer_controller_config_file", controller_file(tmp_path, limit, notebook),
                   "--model_name_or_path", fmtune_tiny_model, "--output_dir", str(out),
                   "--training_data_path", write_jsonl(tmp_path / "d.jsonl", RECORDS),
                   "--per_device_train_batch_size", "2", "--logging_steps", "1",
                   "--save_strategy", "no", "--max_steps", "40", "--learning_rate", "1e-3"],
                  plugins=[Extras(), probe])
    assert res.exit_code == 0, res.stderr
    # transformers' own count, logged with every training loss
    seen = [(h["step"], h["num_input_tokens_seen"]) for h in probe.log_history if "loss" in h]
    expected = next(step for step, tokens in seen if tokens >= limit)
    assert 1 < expected < 40 and seen[-1][0] == expected
    assert probe.global_step == expected
    (line,) = [json.loads(x) for x in notebook.read_text().splitlines()]
    assert line == {"step": expected, "controller": "enough_tokens", "event": "on_step_end",
                    "values": {"tokens": float(dict(seen)[expected])}}
    # the operation's should_save decision wrote a checkpoint at that step (save_strategy no)
    assert [p for p in os.listdir(out) if p.startswith("checkpoint-")] == [f"checkpoint-{expected}"]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["trainer_controller"]["stopped_by"]["controller"] == "enough_tokens"
    assert summary["global_step"] == expected


def test_without_the_plugin_its_classes_are_unknown(tmp_path):
    res = run_cli(["train", "--plugins", "trainer_controller",
                   "--trainer_controller_config_file", controller_file(tmp_path, 1, "n.jsonl"),
                   "--model_name_or_path", "m", "--training_data_path", "d",
                   "--output_dir", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "metric 'tokens': unknown class 'TokensSeen'; available: EvalMetrics, " \
           "HistoryBasedMetric, Loss, PerProcessState, TrainingState" in res.stderr
    assert "operation 'notebook': unknown class 'Notebook'" in res.stderr


def manager(*plugins):
    """A run's plugin manager: the in-test plugins registered first, then trainer_controller."""
    _, pm, _, _ = load_config(["--plugins", "trainer_controller", "--model_name_or_path", "m",
                               "--training_data_path", "d", "--output_dir", "o"],
                              extra_plugins=list(plugins))
    return pm


class Clashing:
    __name__ = "clashing"

    @hookimpl
    def register_controller_metrics(self, register):
        register("Loss", TokensSeen)           # taken by the built-ins
        register("Broken", object())           # not a class
        register("NoCompute", type("NoCompute", (Metric,), {}))
        register("bad name", TokensSeen)

    @hookimpl
    def register_controller_operations(self, register):
        register("Silent", type("Silent", (), {}))    # no actions
        register("Notebook", Notebook)
        register("Notebook", Notebook)


def test_duplicate_and_malformed_registrations_are_refused(tmp_path):
    path = controller_file(tmp_path, 1, "n.jsonl")
    with pytest.raises(LoadError) as e:
        tc_plugin.build(path, manager(Clashing()))
    problems = e.value.problems
    # in registration order: the in-test plugin first, then trainer_controller's built-ins
    assert problems[0].startswith("plugin 'clashing': controller metric 'Broken': must be a "
                                  "class, got <object object at")
    assert problems[1:] == [
        "plugin 'clashing': controller metric 'NoCompute': the class has no compute(ctx) method",
        "plugin 'clashing': controller metric name must be an identifier, got 'bad name'",
        "controller metric 'Loss' is registered by both 'clashing' and 'trainer_controller'",
        "plugin 'clashing': controller operation 'Silent': the class has no actions (an "
        "'actions' tuple or should_* methods)",
        "controller operation 'Notebook' is registered by both 'clashing' and 'clashing'",
    ]


def test_plugin_class_arguments_are_checked_at_load(tmp_path):
    path = tmp_path / "tc.yaml"
    path.write_text("controller_metrics:\n  - {name: tokens, class: TokensSeen, arguments: "
                    "{scale: 0}}\ncontrollers:\n  - {name: c, triggers: [on_log], rule: "
                    "'tokens > 1', operations: [hfcontrols.should_save]}\n")
    with pytest.raises(LoadError) as e:
        tc_plugin.build(str(path), manager(Extras()))
    assert e.value.problems == [f"{path}:2: metric 'tokens' (class TokensSeen): bad arguments: "
                                "scale must be > 0, got 0"]


# ------------------------------------------------ the engine with a plugin's classes


class Flaky(Metric):
    def __init__(self, mode: str):
        self.mode = mode

    def compute(self, ctx):
        if self.mode == "unavailable":
            raise MetricUnavailable("warming up")
        if self.mode == "tensor-like":
            return SimpleNamespace(item=lambda: 2.5)  # torch/numpy scalars answer .item()
        if self.mode == "object":
            return object()
        raise RuntimeError("sensor offline")


class Rogue(Operation):
    """Actions are its should_* methods (no ``actions`` tuple)."""

    def should_keep(self, ctx):
        return {"should_save": True}

    def should_explode(self, ctx):
        return {"should_explode": True}


class FlakyPlugin:
    __name__ = "flaky"

    @hookimpl
    def register_controller_metrics(self, register):
        register("Flaky", Flaky)

    @hookimpl
    def register_controller_operations(self, register):
        register("Rogue", Rogue)


def engine_for(tmp_path, mode, operation="rogue.should_keep"):
    path = tmp_path / "tc.yaml"
    path.write_text(textwrap.dedent(f"""
        controller_metrics:
          - {{name: flaky, class: Flaky, arguments: {{mode: {mode}}}}}
        operations:
          - {{name: rogue, class: Rogue}}
        controllers:
          - name: c
            triggers: [on_step_end, on_train_end]
            rule: flaky > 1
            operations: [{operation}]
        """))
    engine = tc_plugin.build(str(path), manager(FlakyPlugin()))
    run = SimpleNamespace(state=SimpleNamespace(global_step=7, epoch=0.5, log_history=[]),
                          is_main_process=True, output_dir=str(tmp_path), resumed_from=None)
    engine.begin(run)
    return engine, run, str(path)


def test_engine_handles_plugin_values_and_failures(tmp_path):
    engine, run, path = engine_for(tmp_path, "tensor-like")
    assert engine.handle("on_step_end", run) == {"should_save": True}
    assert engine.handle("on_epoch_end", run) is None  # no controller on that trigger
    assert engine.handle("on_train_end", run) is None  # decisions after training are dropped
    assert engine.fired == {"c": 2}

    engine, run, path = engine_for(tmp_path, "unavailable")
    assert engine.handle("on_step_end", run) is None and engine.fired == {"c": 0}

    engine, run, path = engine_for(tmp_path, "object")
    with pytest.raises(ControllerError, match=r"metric 'flaky' \(Flaky\)\: unsupported value of "
                                              r"type object"):
        engine.handle("on_step_end", run)

    engine, run, path = engine_for(tmp_path, "broken")
    with pytest.raises(ControllerError) as e:
        engine.handle("on_step_end", run)
    assert str(e.value) == (f"{path}: metric 'flaky' (Flaky) failed on on_step_end at step 7: "
                            "RuntimeError: sensor offline")

    engine, run, path = engine_for(tmp_path, "tensor-like", "rogue.should_explode")
    with pytest.raises(ControllerError) as e:
        engine.handle("on_step_end", run)
    assert str(e.value) == (
        f"{path}: operation 'rogue' action 'should_explode' returned {{'should_explode': True}}; "
        "an action returns None or a dict with keys among should_training_stop, "
        "should_epoch_stop, should_save, should_evaluate, should_log")
    assert isinstance(engine, Engine)


def test_the_engine_lives_on_the_runs_config(tmp_path):
    """Per-run state is on ``config.stash`` (no module-level dictionary): two configs, two
    engines, and the plugin module holds no mutable mapping of runs."""
    path = controller_file(tmp_path, 1, tmp_path / "n.jsonl")
    configs = []
    for _ in range(2):
        config, pm, _, _ = load_config(["--plugins", "trainer_controller",
                                        "--trainer_controller_config_file", path,
                                        "--model_name_or_path", "m", "--training_data_path", "d",
                                        "--output_dir", str(tmp_path / "o")],
                                       extra_plugins=[Extras()])
        assert tc_plugin.validate_config(config, pm) is None
        configs.append(config)
    engines = [c.stash[tc_plugin.ENGINE] for c in configs]
    assert all(isinstance(e, Engine) for e in engines) and engines[0] is not engines[1]
    assert not [n for n, v in vars(tc_plugin).items()
                if type(v).__name__ in ("WeakKeyDictionary", "WeakValueDictionary")]
