"""Contract test: one in-test plugin implements every hook and each one takes effect."""

from __future__ import annotations

import json
import os

import pytest
from datasets import Dataset

from fmtune import hookimpl, hookspecs
from fmtune.hookspecs import hookspec
from fmtune.plugins import hook_names
from fmtune.testing import run_cli, write_jsonl

# The core's hooks (plugin-owned hooks are tested by the plugins that define them).
ALL_HOOKS = sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "fmtune_spec"))


class ContractSpecs:
    """A hook spec an in-test plugin adds through ``add_hookspecs``."""

    @staticmethod
    @hookspec
    def contract_widgets(register):
        """``register(name, obj)``."""


class Everything:
    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.seen: dict[str, object] = {}

    @hookimpl
    def add_hookspecs(self, pluginmanager):
        pluginmanager.add_hookspecs(ContractSpecs)
        self.seen["add_hookspecs"] = pluginmanager.hook.contract_widgets.has_spec()

    @hookimpl
    def add_options(self, register):
        register("contract_rows", int, 6, "How many rows prepare_data makes.")

    @hookimpl
    def validate_config(self, config):
        self.seen["validate_config"] = config.contract_rows
        return [] if config.contract_rows > 0 else ["contract_rows must be > 0"]

    @hookimpl
    def load_tokenizer(self, config):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.model_dir)
        tok.contract = True
        return tok

    @hookimpl
    def load_model(self, config, tokenizer):
        from transformers import AutoModelForCausalLM

        assert tokenizer.contract is True
        self.seen["load_model"] = True
        return AutoModelForCausalLM.from_pretrained(self.model_dir)

    @hookimpl
    def prepare_data(self, config, tokenizer):
        ids = tokenizer("hello there hi, how can I help?")["input_ids"]
        rows = {"input_ids": [ids] * config.contract_rows, "labels": [ids] * config.contract_rows}
        return Dataset.from_dict(rows), Dataset.from_dict({k: v[:2] for k, v in rows.items()})

    @hookimpl
    def wrap_peft(self, model, config, tokenizer):
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))

    @hookimpl
    def build_collator(self, tokenizer, config):
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, padding=True)

    @hookimpl
    def build_trainer(self, model, tokenizer, config, train_dataset, eval_dataset, data_collator,
                      training_args, callbacks):
        from transformers import Trainer

        class ContractTrainer(Trainer):
            pass

        self.seen["train_rows"] = len(train_dataset)
        return ContractTrainer(model=model, args=training_args, data_collator=data_collator,
                               train_dataset=train_dataset, eval_dataset=eval_dataset,
                               callbacks=callbacks)

    @hookimpl
    def train_batch_sampler(self, config, dataset, batch_size, world_size, rank):
        seen = self.seen
        seen["train_batch_sampler"] = (len(dataset), batch_size, world_size, rank)

        class FromTheEnd:  # this rank's batches, the last rows first: [[3, 2], [1, 0]]
            def __len__(self):
                return len(dataset) // batch_size

            def __iter__(self):
                order = list(range(len(dataset)))[::-1]
                for i in range(0, len(order), batch_size):
                    seen.setdefault("batches", []).append(order[i:i + batch_size])
                    yield order[i:i + batch_size]

            def set_epoch(self, epoch):
                seen.setdefault("sampler_epochs", []).append(epoch)

        return FromTheEnd()

    @hookimpl
    def save(self, model, tokenizer, output_dir, config, trainer):
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir)
        self.seen["save"] = type(trainer).__name__
        return output_dir

    @hookimpl
    def on_train_begin(self, run):
        self.seen["on_train_begin"] = run.state.global_step

    @hookimpl
    def on_step(self, run):
        self.seen.setdefault("on_step", []).append(run.state.global_step)

    @hookimpl
    def on_epoch_begin(self, run):
        self.seen.setdefault("on_epoch_begin", []).append(run.state.global_step)

    @hookimpl
    def on_epoch_end(self, run):
        self.seen.setdefault("on_epoch_end", []).append(run.state.global_step)

    @hookimpl
    def on_log(self, run, logs):
        self.seen.setdefault("on_log", []).append(sorted(logs))

    @hookimpl
    def on_evaluate(self, run, metrics):
        self.seen.setdefault("on_evaluate", []).append(round(metrics["eval_loss"], 6))

    @hookimpl
    def on_save(self, run, checkpoint_dir):
        self.seen.setdefault("on_save", []).append(os.path.basename(checkpoint_dir))

    @hookimpl
    def on_train_error(self, run, error):
        self.seen["on_train_error"] = f"{type(error).__name__}: {error}"

    @hookimpl
    def on_train_end(self, run, summary):
        self.seen["on_train_end"] = summary["global_step"]
        self.seen["wall_time_so_far"] = summary["wall_time_s"]


def test_the_contract_plugin_covers_every_hook():
    assert hook_names(Everything) == ALL_HOOKS


def test_every_hook_takes_effect(fmtune_tiny_model, tmp_path):
    plugin = Everything(fmtune_tiny_model)
    out = tmp_path / "out"
    res = run_cli(["train", "--model_name_or_path", "ignored-by-plugin", "--output_dir", str(out),
                   "--training_data_path", write_jsonl(tmp_path / "unused.jsonl", []),
                   "--max_steps", "3", "--per_device_train_batch_size", "2", "--logging_steps", "1",
                   "--eval_strategy", "steps", "--eval_steps", "3", "--validation_data_path", "x",
                   "--save_strategy", "steps", "--save_steps", "3", "--contract_rows", "4"],
                  plugins=[plugin])
    assert res.exit_code == 0, res.stderr
    seen = plugin.seen
    assert seen["add_hookspecs"] is True
    assert seen["validate_config"] == 4 and seen["train_rows"] == 4
    assert seen["save"] == "ContractTrainer"
    # the plugin's batch sampler fed the trainer (4 rows, batch 2, one process)
    assert seen["train_batch_sampler"] == (4, 2, 1, 0)
    assert seen["batches"][:3] == [[3, 2], [1, 0], [3, 2]], seen
    # set_epoch before each epoch (accelerate's loader calls it again as it starts iterating)
    assert sorted(set(seen["sampler_epochs"])) == [0, 1], seen
    assert seen["on_train_begin"] == 0 and seen["on_step"] == [1, 2, 3]
    # 4 rows, batch 2: epochs end at steps 2 and 4; max_steps=3 stops inside the second
    assert seen["on_epoch_begin"] == [0, 2] and seen["on_epoch_end"] == [2, 3]
    assert seen["on_save"] == ["checkpoint-3"] and seen["on_train_end"] == 3
    assert len(seen["on_evaluate"]) == 1
    assert "on_train_error" not in seen and seen["wall_time_so_far"] > 0
    assert {"epoch", "grad_norm", "learning_rate", "loss"} <= set(seen["on_log"][0])
    # wrap_peft's LoRA model was trained and saved: an adapter, not a full model
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    assert not (out / "model.safetensors").exists()
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["final_eval_loss"] == pytest.approx(seen["on_evaluate"][-1], abs=1e-6)


def test_validate_config_failure_from_a_plugin(fmtune_tiny_model, tmp_path):
    res = run_cli(["train", "--model_name_or_path", "m", "--output_dir", str(tmp_path / "o"),
                   "--training_data_path", "d", "--contract_rows", "0"],
                  plugins=[Everything(fmtune_tiny_model)])
    assert res.exit_code == 2 and "contract_rows must be > 0" in res.stderr


def test_on_train_error_sees_the_failure_which_is_re_raised(fmtune_tiny_model, tmp_path):
    plugin = Everything(fmtune_tiny_model)

    class Exploder:
        @hookimpl
        def on_step(self, run):
            if run.state.global_step == 2:
                raise RuntimeError("boom at step 2")

        @hookimpl
        def on_train_error(self, error):
            raise ValueError("a broken error handler is only logged")

    with pytest.raises(RuntimeError, match="boom at step 2"):
        run_cli(["train", "--model_name_or_path", "m", "--output_dir", str(tmp_path / "out"),
                 "--training_data_path", "unused", "--max_steps", "5", "--save_strategy", "no",
                 "--per_device_train_batch_size", "2"], plugins=[plugin, Exploder()])
    assert plugin.seen["on_train_error"] == "RuntimeError: boom at step 2"
    # pluggy calls the later-registered Exploder first: it raised before step 2 reached us
    assert plugin.seen["on_step"] == [1] and "on_train_end" not in plugin.seen
