"""Rerunning a command into an output_dir that holds a run: a finished run is left alone (exit 0,
nothing rewritten), a longer run continues it, an unfinished run resumes, changed options that
matter are refused in one line before anything loads, and --resume_from_checkpoint false
starts over (the previous run's checkpoints deleted)."""

from __future__ import annotations

import json
import os

import pytest

from fmtune import hookimpl
from fmtune.testing import DEMO_RECORDS, run_cli, train_argv, write_jsonl


class Spy:
    """Records whether the tokenizer or the model was loaded (then lets the defaults load)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl(tryfirst=True)
    def load_tokenizer(self, config):
        self.calls.append("load_tokenizer")

    @hookimpl(tryfirst=True)
    def load_model(self, config, tokenizer):
        self.calls.append("load_model")


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", DEMO_RECORDS)


def args(model, data, out, *extra):
    return train_argv(model, data, out, "--save_strategy", "steps", "--save_steps", "1", *extra)


def ok(argv, plugins=()):
    res = run_cli(argv, plugins=list(plugins))
    assert res.exit_code == 0, res.stderr[-3000:]
    return res


def checkpoints(out):
    return sorted(int(n.split("-")[1]) for n in os.listdir(out) if n.startswith("checkpoint-"))


def mtimes(out):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(out) for f in files}


def summary_of(out):
    return json.loads((out / "run_summary.json").read_text())


def refusal(res):
    assert res.exit_code == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("fmtune: error:")]
    assert len(errors) == 1 and errors[0].startswith("fmtune: error: output_dir "), res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    return errors[0]


def test_rerun_of_a_finished_run_does_nothing(fmtune_tiny_model, data, tmp_path):
    out = tmp_path / "out"
    argv = args(fmtune_tiny_model, data, out, "--max_steps", "2")
    ok(argv)
    record = json.loads((out / "fmtune_config.json").read_text())
    summary = summary_of(out)
    assert record["config"]["learning_rate"] == 0.01 and record["config"]["max_steps"] == 2
    assert summary["completed"] is True and summary["config_hash"] == record["config_hash"]
    before = mtimes(out)
    spy = Spy()
    res = ok(argv, [spy])
    assert f"fmtune: the run in {out} already finished at step 2; its model is in {out}" \
        in res.stderr
    assert mtimes(out) == before and checkpoints(out) == [1, 2]  # no checkpoint-3, no rewrite
    assert spy.calls == []
    # options that change no training (logging, saving) do not make it train either
    assert run_cli([*argv, "--logging_steps", "2", "--save_steps", "5"]).exit_code == 0
    assert mtimes(out) == before


def test_changed_lora_r_is_refused_before_anything_loads(fmtune_tiny_model, data, tmp_path):
    out = tmp_path / "out"
    argv = args(fmtune_tiny_model, data, out, "--max_steps", "2", "--peft_method", "lora")
    ok([*argv, "--r", "4"])
    before = mtimes(out)
    spy = Spy()
    line = refusal(run_cli([*argv, "--r", "8"], plugins=[spy]))
    assert "holds a run that finished at step 2 made with other options: r 4 -> 8;" in line
    assert "a new --output_dir, or --resume_from_checkpoint false" in line
    assert spy.calls == [] and mtimes(out) == before


def test_changed_learning_rate_is_refused_for_an_unfinished_run(fmtune_tiny_model, data,
                                                                 tmp_path):
    out = tmp_path / "out"
    argv = args(fmtune_tiny_model, data, out, "--max_steps", "3")
    ok(argv)
    (out / "run_summary.json").unlink()  # as if killed while saving the final model
    spy = Spy()
    line = refusal(run_cli([*argv, "--learning_rate", "1e-3", "--seed", "1"], plugins=[spy]))
    assert "holds an unfinished run (newest checkpoint checkpoint-3) made with other options: " \
        "learning_rate 0.01 -> 0.001, seed 0 -> 1;" in line
    assert spy.calls == []


def test_unfinished_run_resumes_with_allowed_changes(fmtune_tiny_model, data, tmp_path):
    import shutil

    out = tmp_path / "out"
    argv = args(fmtune_tiny_model, data, out, "--max_steps", "3")
    ok(argv)
    shutil.rmtree(out / "checkpoint-3")  # as if killed during step 3
    (out / "run_summary.json").unlink()
    res = ok([*argv, "--logging_steps", "2"])
    assert "resuming with changed options: logging_steps 1.0 -> 2.0" in res.stderr
    summary = summary_of(out)
    assert summary["resumed_from"] == str(out / "checkpoint-2") and summary["global_step"] == 3


def test_raised_max_steps_continues_a_finished_run(fmtune_tiny_model, data, tmp_path):
    out = tmp_path / "out"
    ok(args(fmtune_tiny_model, data, out, "--max_steps", "2"))
    ok(args(fmtune_tiny_model, data, out, "--max_steps", "4"))
    summary = summary_of(out)
    assert summary["resumed_from"] == str(out / "checkpoint-2") and summary["global_step"] == 4
    assert checkpoints(out) == [1, 2, 3, 4]
    record = json.loads((out / "fmtune_config.json").read_text())
    assert record["config"]["max_steps"] == 4 and summary["config_hash"] == record["config_hash"]
    # now that one is finished: the same command does nothing; the first one is refused
    before = mtimes(out)
    assert "already finished at step 4" in ok(args(fmtune_tiny_model, data, out, "--max_steps",
                                                   "4")).stderr
    line = refusal(run_cli(args(fmtune_tiny_model, data, out, "--max_steps", "2")))
    assert "holds a run that finished at step 4, already past --max_steps 2" in line
    assert mtimes(out) == before


def test_finished_run_without_checkpoints_cannot_be_continued(fmtune_tiny_model, data, tmp_path):
    out = tmp_path / "out"
    ok(train_argv(fmtune_tiny_model, data, out, "--max_steps", "1"))  # save_strategy no
    line = refusal(run_cli(train_argv(fmtune_tiny_model, data, out, "--max_steps", "2")))
    assert "with no checkpoint to continue from" in line


def test_resume_from_checkpoint_false_starts_over(fmtune_tiny_model, data, tmp_path):
    out = tmp_path / "out"
    ok(args(fmtune_tiny_model, data, out, "--max_steps", "3"))
    res = ok(args(fmtune_tiny_model, data, out, "--max_steps", "2", "--learning_rate", "1e-3",
                  "--resume_from_checkpoint", "false"))
    assert "deleted the previous run's checkpoint-1, checkpoint-2, checkpoint-3, " \
        "run_summary.json" in res.stderr
    summary = summary_of(out)
    assert summary["resumed_from"] is None and summary["global_step"] == 2
    assert checkpoints(out) == [1, 2]  # the old checkpoint-3 is not left to be resumed from
    record = json.loads((out / "fmtune_config.json").read_text())
    assert record["config"]["learning_rate"] == 0.001
    # the new run is the one the folder holds now
    res = ok(args(fmtune_tiny_model, data, out, "--max_steps", "2", "--learning_rate", "1e-3"))
    assert "already finished at step 2" in res.stderr


def test_record_keeps_no_secret(fmtune_tiny_model, data, tmp_path):
    from fmtune.cli import load_config
    from fmtune.runlock import effective_config

    config, *_ = load_config(["--model_name_or_path", fmtune_tiny_model, "--training_data_path",
                              data, "--output_dir", str(tmp_path / "o"), "--hub_token", "hf_x",
                              "--plugins", "mlflow", "--mlflow_tracking_uri",
                              "https://me:pw@mlflow.example/"])
    record = effective_config(config)
    text = json.dumps(record)
    assert "hf_x" not in text and "pw@" not in text
    assert record["config"]["mlflow_tracking_uri"] == "https://***@mlflow.example/"
    # the hash covers what trains, not where the run goes
    config2, *_ = load_config(["--model_name_or_path", fmtune_tiny_model, "--training_data_path",
                               data, "--output_dir", str(tmp_path / "p"), "--hub_token", "hf_y",
                               "--plugins", "mlflow", "--mlflow_tracking_uri",
                               "https://me:pw@mlflow.example/"])
    assert effective_config(config2)["config_hash"] == record["config_hash"]


def test_finished_rerun_says_one_line(fmtune_tiny_model, data, tmp_path):
    out = tmp_path / "out"
    argv = train_argv(fmtune_tiny_model, data, out, "--max_steps", "1")
    ok(argv)
    res = ok(argv)
    assert res.stdout == "" and res.stderr.strip().splitlines() == [
        line for line in res.stderr.strip().splitlines() if "already finished" in line]


def test_train_loss_of_a_continued_run_covers_every_step(fmtune_tiny_model, data, tmp_path):
    """After a resume, run_summary.json's train_loss is the whole run's mean (it used to cover
    only the resumed part): a run continued from step 2 to 4 reports what an uninterrupted run
    to step 4 reports (constant learning rate: the first two steps do not depend on max_steps)."""
    extra = ("--lr_scheduler_type", "constant", "--logging_steps", "1")
    whole = tmp_path / "whole"
    ok(args(fmtune_tiny_model, data, whole, "--max_steps", "4", *extra))
    cut = tmp_path / "cut"
    ok(args(fmtune_tiny_model, data, cut, "--max_steps", "2", *extra))
    ok(args(fmtune_tiny_model, data, cut, "--max_steps", "4", *extra))
    want, got = summary_of(whole), summary_of(cut)
    assert got["resumed_from"].endswith("checkpoint-2")
    assert got["train_loss_steps"] == want["train_loss_steps"] == "1-4"
    assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
