"""Full fine-tuning end to end: files written, hooks called in order, control, resume."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fmtune import hookimpl
from fmtune.testing import DEMO_RECORDS, run_cli, write_jsonl

RECORDS = DEMO_RECORDS


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", RECORDS)


def base_args(model, data, out, *extra):
    return ["train", "--model_name_or_path", model, "--training_data_path", data,
            "--output_dir", str(out), "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no", *extra]


def read_logs(out):
    with open(os.path.join(out, "training_logs.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_full_finetune_writes_everything(fmtune_tiny_model, data, tmp_path):
    out, final = tmp_path / "out", tmp_path / "final"
    valid = write_jsonl(tmp_path / "valid.jsonl", RECORDS[:3])
    res = run_cli(base_args(fmtune_tiny_model, data, out, "--max_steps", "6",
                            "--save_strategy", "steps", "--save_steps", "3", "--logging_steps", "2",
                            "--validation_data_path", valid, "--eval_strategy", "steps",
                            "--eval_steps", "3", "--save_model_dir", str(final)))
    assert res.exit_code == 0, res.stderr
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == \
        ["checkpoint-3", "checkpoint-6"]
    # final model + tokenizer, loadable by transformers, weights changed
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(fmtune_tiny_model)
    assert tok.eos_token == "<|endoftext|>" and len(tok) == base.config.vocab_size
    changed = [n for n, p in model.named_parameters()
               if not torch.equal(p, dict(base.named_parameters())[n])]
    assert len(changed) == len(list(model.parameters()))
    # training_logs.jsonl: fms-hf-tuning format, values equal the trainer's own history
    logs = read_logs(out)
    train_logs = [r["data"] for r in logs if r["name"] == "training_loss"]
    eval_logs = [r["data"] for r in logs if r["name"] == "validation_loss"]
    assert [d["step"] for d in train_logs] == [2, 4, 6]
    assert [d["step"] for d in eval_logs] == [3, 6]
    assert set(train_logs[0]) == {"epoch", "step", "timestamp", "value"}
    with open(out / "checkpoint-6" / "trainer_state.json") as f:
        history = json.load(f)["log_history"]
    assert [d["value"] for d in train_logs] == pytest.approx([h["loss"] for h in history if "loss" in h])
    assert [d["value"] for d in eval_logs] == pytest.approx(
        [h["eval_loss"] for h in history if "eval_loss" in h])
    # run summary: 6 steps of 4 records over 8 records = 3 epochs of every token
    summary = json.loads((out / "run_summary.json").read_text())
    n_tokens = sum(len(tok(r["input"])["input_ids"]) +
                   len(tok(" " + r["output"], add_special_tokens=False)["input_ids"]) + 1
                   for r in RECORDS)
    assert summary["global_step"] == 6 and summary["world_size"] == 1
    assert summary["train_tokens"] == 3 * n_tokens
    assert summary["final_loss"] == pytest.approx(train_logs[-1]["value"])
    assert summary["final_eval_loss"] == pytest.approx(eval_logs[-1]["value"])
    assert summary["model_saved_to"] == str(final)
    assert summary["tokens_per_second"] > 0 and summary["peak_rss_mb"] > 0
    assert summary["plugins"] == {} and summary["resumed_from"] is None
    assert "done in" in res.stdout and str(final) in res.stdout
    assert f"fmtune: {data}: 8 examples" in res.stderr  # log lines reach the caller's stderr


class Recorder:
    """An in-test plugin: overrides the collator, wraps the model, records events."""

    def __init__(self, stop_at=None):
        self.events: list[str] = []
        self.collated = 0
        self.stop_at = stop_at

    @hookimpl
    def build_collator(self, tokenizer, config):
        from transformers import DataCollatorForSeq2Seq

        default = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

        def collate(rows):
            self.collated += 1
            return default(rows)
        return collate

    @hookimpl(wrapper=True)
    def load_model(self, config, tokenizer):
        model = yield
        model.fmtune_wrapped = True
        self.events.append("load_model")
        return model

    @hookimpl
    def on_train_begin(self, run):
        self.events.append(f"begin:{run.state.global_step}")

    @hookimpl
    def on_step(self, run):
        self.events.append(f"step:{run.state.global_step}")
        if self.stop_at and run.state.global_step >= self.stop_at:
            return {"should_training_stop": True}

    @hookimpl
    def on_log(self, run, logs):
        if "loss" in logs:
            self.events.append(f"log:{run.state.global_step}")

    @hookimpl
    def on_save(self, run, checkpoint_dir):
        self.events.append(f"save:{os.path.basename(checkpoint_dir)}")

    @hookimpl
    def on_train_end(self, run, summary):
        assert run.model.fmtune_wrapped is True
        summary["recorder_events"] = len(self.events)
        self.events.append(f"end:{summary['global_step']}")


def test_hooks_order_override_and_control(fmtune_tiny_model, data, tmp_path):
    rec = Recorder(stop_at=3)
    out = tmp_path / "out"
    res = run_cli(base_args(fmtune_tiny_model, data, out, "--max_steps", "10",
                            "--save_strategy", "steps", "--save_steps", "2"), plugins=[rec])
    assert res.exit_code == 0, res.stderr
    assert rec.events == ["load_model", "begin:0", "step:1", "log:1", "step:2", "log:2",
                          "save:checkpoint-2", "step:3", "log:3", "end:3"]
    assert rec.collated >= 3  # our collator, not the default, built the batches
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == 3  # stopped by the plugin's control decision
    assert summary["recorder_events"] == 9


def test_unknown_control_decision_is_an_error(fmtune_tiny_model, data, tmp_path):
    class Bad:
        @hookimpl
        def on_step(self, run):
            return {"should_explode": True}

    with pytest.raises(ValueError, match="unknown control decision 'should_explode'"):
        run_cli(base_args(fmtune_tiny_model, data, tmp_path / "o", "--max_steps", "2"), plugins=[Bad()])


def test_resume_from_latest_checkpoint_and_start_over(fmtune_tiny_model, data, tmp_path):
    out = tmp_path / "out"
    args = base_args(fmtune_tiny_model, data, out, "--save_strategy", "steps", "--save_steps", "2")
    assert run_cli([*args, "--max_steps", "4"]).exit_code == 0
    # as if the run had died after step 4 but before its last checkpoint was written
    import shutil
    shutil.rmtree(out / "checkpoint-4")
    res = run_cli([*args, "--max_steps", "6"])
    assert res.exit_code == 0, res.stderr
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["resumed_from"] == str(out / "checkpoint-2")
    assert summary["global_step"] == 6
    steps = [r["data"]["step"] for r in read_logs(out) if r["name"] == "training_loss"]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3-4 were redone: logged once, not twice
    # resume_from_checkpoint=false starts over (and rewrites the log)
    res = run_cli([*args, "--max_steps", "3", "--resume_from_checkpoint", "false"])
    assert res.exit_code == 0, res.stderr
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["resumed_from"] is None and summary["global_step"] == 3
    assert [r["data"]["step"] for r in read_logs(out)] == [1, 2, 3]


def test_uncached_hub_id_fails_fast(data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = run_cli(base_args("no-such-org/no-such-model", data, tmp_path / "o", "--max_steps", "1"))
    assert res.exit_code == 2
    assert "no-such-org/no-such-model: not a local folder and not in the Hugging Face cache" in res.stderr
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_bad_data_leaves_nothing_behind(fmtune_tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n{"input": "a", "outptu": "b"}\n')
    res = run_cli(base_args(fmtune_tiny_model, str(bad), tmp_path / "o", "--max_steps", "1"))
    assert res.exit_code == 2
    assert res.stderr.strip() == f"fmtune: error: {bad}:2: missing field 'output'"
    assert not (tmp_path / "o").exists()


def test_divergence_is_a_failure_and_keeps_the_last_good_checkpoint(fmtune_tiny_model, tmp_path):
    """A loss that becomes NaN stops the run: exit 3, one line, no final model written over the
    last good checkpoint (transformers would log 0.0 and report success)."""
    import json
    import os

    from fmtune.testing import DEMO_RECORDS, run_cli, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", DEMO_RECORDS)
    out = tmp_path / "out"
    res = run_cli(["train", "--model_name_or_path", fmtune_tiny_model, "--training_data_path",
                   data, "--output_dir", str(out), "--max_steps", "6", "--logging_steps", "1",
                   "--per_device_train_batch_size", "2", "--learning_rate", "1e30",
                   "--max_grad_norm", "0", "--save_strategy", "steps", "--save_steps", "1"])
    assert res.exit_code == 3, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("fmtune: error:")]
    assert len(errors) == 1 and "training diverged at step" in errors[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not (out / "model.safetensors").exists()
    logged = [json.loads(line) for line in (out / "training_logs.jsonl").read_text().splitlines()]
    checkpoints = sorted(int(d.split("-")[1]) for d in os.listdir(out) if d.startswith("checkpoint-"))
    bad_step = next(r["data"]["step"] for r in logged if r["data"]["value"] != r["data"]["value"]
                    or abs(r["data"]["value"]) == float("inf"))
    assert checkpoints and max(checkpoints) < bad_step
    assert f"checkpoint-{max(checkpoints)}" in errors[0]


@pytest.mark.parametrize("tear", ["no_state", "truncated_weights", "truncated_header",
                                  "empty_optimizer", "bad_state_json"])
def test_resume_skips_torn_checkpoints(fmtune_tiny_model, data, tmp_path, tear):
    """A run killed while writing its newest checkpoint: resume takes the newest complete one,
    says which it skipped and why, and ends like an uninterrupted run."""
    out = tmp_path / "out"
    args = base_args(fmtune_tiny_model, data, out, "--save_strategy", "steps", "--save_steps", "2",
                     "--logging_steps", "1")
    assert run_cli([*args, "--max_steps", "4"]).exit_code == 0
    ck = out / "checkpoint-4"
    if tear == "no_state":
        (ck / "trainer_state.json").unlink()
    elif tear == "bad_state_json":
        (ck / "trainer_state.json").write_text('{"global_st')
    elif tear == "truncated_weights":
        weights = ck / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    elif tear == "truncated_header":
        (ck / "model.safetensors").write_bytes(b"\x00\x10\x00\x00\x00\x00\x00\x00{")
    else:
        (ck / "optimizer.pt").write_bytes(b"")
    res = run_cli([*args, "--max_steps", "6"])
    assert res.exit_code == 0, res.stderr[-2000:]
    assert f"not resuming from {ck}: " in res.stderr
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["resumed_from"] == str(out / "checkpoint-2") and summary["global_step"] == 6
