"""Bad input, one table: each case is an input fmtune must refuse (a data file, a path, an
option value, a YAML file, a plugin's option, a sub-command's argument). Every case runs the CLI
in-process (:func:`fmtune.testing.run_cli`) and checks what README's "Safety of a run" promises:

* the exit code (2: bad input);
* stderr ends with exactly one line ``fmtune: error: ...`` holding the expected text (progress
  bars and ``fmtune:`` info lines before it are fine), and no traceback anywhere;
* nothing new on disk: the case's folder (output_dir and the inputs) and the model folder hold
  the same files, with the same sizes and times, as before the command.

docs/reliability.md is generated from the table and the messages observed
(FMTUNE_WRITE_DOCS=1 .venv/bin/python -m pytest tests/test_reliability.py rewrites it; the test
fails when it drifts). Known failures (in code owned elsewhere) stay in the table as strict xfails
with the reason; the doc lists them as such.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from fmtune import hookimpl
from fmtune.testing import DEMO_RECORDS, check_generated, run_cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
MESSAGE_CHARS = 300  # the doc shows this much of each message

BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
UNSAFE = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
UNCLOSED = "{% for m in messages %}{{ m['content'] }}"
TC_HEAD = ("controller_metrics:\n  - name: state\n    class: TrainingState\ncontrollers:\n"
           "  - name: stop\n    triggers: [on_step_end]\n")
TC_OPS = "    operations: [hfcontrols.should_training_stop]\n"


# ------------------------------------------------------------------ the case's world


class World:
    """What a case's setup gets: its own folder (``tmp``; ``out`` inside it is the output_dir,
    absent unless the case makes it), the tiny model, and helpers that write inputs."""

    def __init__(self, tmp: Path, model: str, monkeypatch) -> None:
        self.tmp, self.model, self.monkeypatch = tmp, model, monkeypatch
        self.out = str(tmp / "out")

    def file(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return str(path)

    def jsonl(self, name: str, records: list[Any]) -> str:
        return self.file(name, "".join(json.dumps(r) + "\n" for r in records))

    def folder(self, name: str) -> str:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    @property
    def good(self) -> str:
        return self.jsonl("train.jsonl", DEMO_RECORDS)

    @property
    def chat(self) -> str:
        return self.jsonl("chat.jsonl", [chat_record() for _ in range(8)])

    def unwritable(self, name: str) -> str:
        """A folder the run may not write into: mode 0555; for root, who may write anyway,
        ``os.access`` answers for it as for any other user."""
        path = self.folder(name)
        os.chmod(path, 0o555)
        if os.access(path, os.W_OK):
            real = os.access
            self.monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if (
                os.path.abspath(p) == path and mode & os.W_OK) else real(p, mode, **kw))
        return path

    def adapter(self, name: str, **config: Any) -> str:
        """A folder with only an adapter_config.json (what the commands read first)."""
        self.file(f"{name}/adapter_config.json", json.dumps(config))
        return str(self.tmp / name)

    def silogen(self, mutate: Callable[[dict], Any] = lambda c: None) -> str:
        """A Silogen sft experiment config (LoRA, chat-ml) changed by ``mutate``."""
        cfg = {"data_conf": {"training_data": {"type": "CONCATENATION",
                                               "datasets": [{"path": self.chat}]},
                             "validation_data": {"type": "NONE"}, "chat_template_name": "chat-ml"},
               "training_args": {"output_dir": self.out, "max_steps": 1, "use_cpu": True,
                                 "save_strategy": "no"},
               "batchsize_conf": {"total_train_batch_size": 4,
                                  "max_per_device_train_batch_size": 2},
               "peft_conf": {"peft_type": "LORA", "task_type": "CAUSAL_LM",
                             "peft_kwargs": {"r": 4, "target_modules": ["q_proj"]}},
               "run_conf": {"model": self.model}, "sft_args": {"max_seq_length": 64}}
        mutate(cfg)
        return self.file("experiment.yaml", yaml.safe_dump(cfg))

    def generation(self, **changes: Any) -> str:
        """A Silogen generation config (open-input prompt) with ``changes`` merged in."""
        cfg = {"model_conf": {"model": self.model},
               "prompt_conf": {"type": "open-input", "input": "translate:"}}
        for key, value in changes.items():
            cfg[key] = {**cfg.get(key, {}), **value}
        return self.file("generation.yaml", yaml.safe_dump(cfg))


def chat_record(role: str = "user") -> dict:
    return {"messages": [{"role": "system", "content": "be brief"},
                         {"role": role, "content": "hello there"},
                         {"role": "assistant", "content": "hi, how can I help?"}]}


def train(w: World, *extra: str, data: str | None = None, out: str | None = None) -> list[str]:
    """A one-step ``fmtune train`` (so a case that is wrongly accepted finishes quickly)."""
    return ["train", "--model_name_or_path", w.model, "--training_data_path", data or w.good,
            "--output_dir", out or w.out, "--max_steps", "1", "--save_strategy", "no", *extra]


def data_config(w: World, text: str, *extra: str) -> list[str]:
    path = w.file("data_config.yaml", text.replace("{good}", w.good))
    return ["train", "--model_name_or_path", w.model, "--data_config_path", path,
            "--output_dir", w.out, "--max_steps", "1", "--save_strategy", "no", *extra]


def controller(w: World, text: str) -> list[str]:
    return train(w, "--trainer_controller_config_file", w.file("rules.yaml", text))


def run_yaml(w: World, text: str) -> list[str]:
    return ["train", "--config", w.file("run.yaml", text)]


def dataset(name: str, extra: str = "") -> str:
    return f"  - name: {name}\n    data_paths: [{{good}}]\n{extra}"


# --------------------------------------------------------------------------- the table


@dataclass
class Case:
    id: str
    group: str
    what: str
    argv: Callable[[World], list[str]]
    message: str  # expected in the one-line message (paths as <tmp>/..., <model>)
    code: int = 2
    known_failure: str | None = None  # strict xfail: what is wrong, and where


CASES: list[Case] = []


def case(group: str, id: str, what: str, argv, message: str, known_failure: str | None = None,
         code: int = 2) -> None:
    CASES.append(Case(id, group, what, argv, message, code, known_failure))


DH = ("--plugins", "data_handlers")
G = "data files (core reader)"
case(G, "data-latin1", "training data in latin-1, not UTF-8",
     lambda w: train(w, data=w.file("latin1.jsonl", '{"input": "café", "output": "x"}\n'
                                    .encode("latin-1"))),
     "<tmp>/latin1.jsonl:1: not UTF-8 text (byte 0xe9 at offset 14)")
case(G, "data-validation-latin1", "validation data in latin-1",
     lambda w: train(w, "--validation_data_path", w.file(
         "valid.jsonl", b'{"input": "a", "output": "b"}\n{"input": "\xff", "output": "c"}\n')),
     "<tmp>/valid.jsonl:2: not UTF-8 text")
case(G, "data-empty", "an empty data file",
     lambda w: train(w, data=w.file("empty.jsonl", "")), "<tmp>/empty.jsonl: no records")
case(G, "data-blank-lines", "a data file of blank lines",
     lambda w: train(w, data=w.file("blank.jsonl", "\n  \n\n")), "<tmp>/blank.jsonl: no records")
case(G, "data-bad-jsonl-line", "JSONL with a broken line 3",
     lambda w: train(w, data=w.file("bad.jsonl", '{"input": "a", "output": "b"}\n'
                                    '{"input": "c", "output": "d"}\n{"input": oops}\n')),
     "<tmp>/bad.jsonl:3: invalid JSON")
case(G, "data-jsonl-not-object", "a JSONL line that is a list",
     lambda w: train(w, data=w.file("list.jsonl", '{"input": "a", "output": "b"}\n[1, 2]\n')),
     "<tmp>/list.jsonl:2: expected an object, got list")
case(G, "data-json-invalid", "a .json list cut short",
     lambda w: train(w, data=w.file("cut.json", '[{"input": "a",\n "output": }]')),
     "<tmp>/cut.json:2: invalid JSON: Expecting value")
case(G, "data-json-not-object", "a .json list with a string in it",
     lambda w: train(w, data=w.file("mixed.json", '[{"input": "a", "output": "b"}, "c"]')),
     "<tmp>/mixed.json: record 2: expected an object, got str")
case(G, "data-missing-field", "a record without output",
     lambda w: train(w, data=w.jsonl("nooutput.jsonl", [{"input": "a"}])),
     "<tmp>/nooutput.jsonl:1: missing field 'output'")
case(G, "data-output-number", "an output that is a number",
     lambda w: train(w, data=w.jsonl("number.jsonl", [{"input": "a", "output": 3}])),
     "<tmp>/number.jsonl:1: field 'output' must be a string, got int")
case(G, "data-output-list", "an output that is a list",
     lambda w: train(w, data=w.jsonl("outlist.jsonl", [{"input": "a", "output": ["x"]}])),
     "<tmp>/outlist.jsonl:1: field 'output' must be a string, got list")
case(G, "data-input-null", "an input that is null",
     lambda w: train(w, data=w.jsonl("null.jsonl", [{"input": None, "output": "b"}])),
     "<tmp>/null.jsonl:1: field 'input' must be a string, got NoneType")
case(G, "data-missing-file", "training_data_path that does not exist",
     lambda w: train(w, data=str(w.tmp / "nope.jsonl")),
     "training_data_path <tmp>/nope.jsonl: no such file")
case(G, "data-folder", "training_data_path that is an empty folder",
     lambda w: train(w, data=w.folder("data")), "<tmp>/data: data file not found")
case(G, "validation-missing-file", "validation_data_path that does not exist",
     lambda w: train(w, "--validation_data_path", str(w.tmp / "valid.jsonl")),
     "validation_data_path <tmp>/valid.jsonl: no such file")
case(G, "text-field-missing", "dataset_text_field naming no field",
     lambda w: train(w, "--dataset_text_field", "text"),
     "<tmp>/train.jsonl:1: missing field 'text'")
case(G, "formatter-field-missing", "data_formatter_template naming no field",
     lambda w: train(w, "--data_formatter_template", "### {{question}} {{output}}"),
     "data_formatter_template field 'question' missing from the record")
case(G, "response-template-alone", "response_template without a text field",
     lambda w: train(w, "--response_template", "### Answer:"),
     "response_template needs dataset_text_field or data_formatter_template")
case(G, "text-field-and-formatter", "dataset_text_field and data_formatter_template",
     lambda w: train(w, "--dataset_text_field", "output", "--data_formatter_template", "{{input}}"),
     "dataset_text_field and data_formatter_template are exclusive")

G = "data files (data_handlers plugin)"
case(G, "dh-latin1", "latin-1 data read by the data plugin",
     lambda w: train(w, *DH, data=w.file("latin1.jsonl", '{"input": "café", "output": "x"}\n'
                                         .encode("latin-1") * 8)),
     "<tmp>/latin1.jsonl:1: not UTF-8 text (byte 0xe9 at offset 14)")
case(G, "dh-bad-jsonl-line", "JSONL with a broken line 3",
     lambda w: train(w, *DH, data=w.file("bad.jsonl", '{"input": "a", "output": "b"}\n'
                                         '{"input": "a", "output": "b"}\n{oops\n')),
     "<tmp>/bad.jsonl:3: invalid JSON")
case(G, "dh-empty", "an empty data file",
     lambda w: train(w, *DH, data=w.file("empty.jsonl", "")), "<tmp>/empty.jsonl: no records")
case(G, "dh-unknown-columns", "records with only an input column",
     lambda w: train(w, *DH, data=w.jsonl("input.jsonl", [{"input": "a"}])),
     "cannot tell the data format from columns ['input']")
case(G, "dh-output-number", "an output that is a number",
     lambda w: train(w, *DH, data=w.jsonl("number.jsonl", [{"input": "a", "output": 3}])),
     "<tmp>/number.jsonl:1: field 'output' must be a string, got int")
case(G, "dh-text-column-missing", "dataset_text_field naming no column",
     lambda w: train(w, *DH, "--dataset_text_field", "text"),
     "tokenize: missing column 'text' (columns: input, output)")
case(G, "chat-no-template", "chat data, and the tokenizer has no chat template",
     lambda w: train(w, *DH, data=w.chat), "the tokenizer has no chat template; pass "
     "--chat_template")
case(G, "chat-unknown-role", "a chat record with the role 'wizard'",
     lambda w: train(w, *DH, "--chat_template", TEMPLATE,
                     data=w.jsonl("wizard.jsonl", [chat_record("wizard")] * 8)),
     "<tmp>/wizard.jsonl:1: field 'messages': message 2 has role 'wizard'")
case(G, "chat-template-syntax", "--chat_template with an unclosed for (train)",
     lambda w: train(w, *DH, "--chat_template", UNCLOSED, data=w.chat),
     "Unexpected end of template")
case(G, "chat-template-unsafe", "--chat_template reaching __class__ (train)",
     lambda w: train(w, *DH, "--chat_template", UNSAFE, data=w.chat),
     "chat template error: access to attribute '__class__' of 'list' object is unsafe")
case(G, "chat-template-raises", "a --chat_template that raises for the records (train)",
     lambda w: train(w, *DH, "--chat_template", "{{ raise_exception('no system turns') }}",
                     data=w.chat), "chat template error: no system turns")

G = "data_config files"
case(G, "dc-handler-kwargs", "a handler given an argument it does not take",
     lambda w: data_config(w, "datasets:\n" + dataset("a", "    data_handlers:\n      - name: "
                           "tokenize_and_apply_input_masking\n        arguments:\n"
                           "          fn_kwargs: {bogus: 1}\n")),
     "<tmp>/data_config.yaml: datasets[0].data_handlers[0].arguments.fn_kwargs.bogus: data "
     "handler 'tokenize_and_apply_input_masking' (dataset 'a') takes no argument 'bogus'")
case(G, "dc-handler-kwargs-type", "fn_kwargs that is not a mapping",
     lambda w: data_config(w, "datasets:\n" + dataset("a", "    data_handlers:\n      - name: "
                           "tokenize\n        arguments:\n          fn_kwargs: 5\n")),
     "datasets[0].data_handlers[0].arguments.fn_kwargs: must be dict, got 5")
case(G, "dc-unknown-handler", "a handler name that does not exist",
     lambda w: data_config(w, "datasets:\n" + dataset("a", "    data_handlers:\n"
                                                           "      - name: tokenise\n")),
     "datasets[0].data_handlers[0].name: unknown data handler 'tokenise'")
case(G, "dc-sampling-zero", "sampling 0 next to sampling 1.0",
     lambda w: data_config(w, "datasets:\n" + dataset("a", "    sampling: 0\n")
                           + dataset("b", "    sampling: 1.0\n")),
     "datasets[0].sampling: must be in (0, 1], got 0")
case(G, "dc-sampling-zero-alone", "sampling 0 on the only dataset",
     lambda w: data_config(w, "datasets:\n" + dataset("a", "    sampling: 0\n")),
     "<tmp>/data_config.yaml: datasets[0].sampling: must be in (0, 1], got 0")
case(G, "dc-sampling-negative", "a negative sampling ratio",
     lambda w: data_config(w, "datasets:\n" + dataset("a", "    sampling: -0.5\n")),
     "datasets[0].sampling: must be in (0, 1], got -0.5")
case(G, "dc-sampling-sum", "sampling ratios summing to 0.5",
     lambda w: data_config(w, "datasets:\n" + dataset("a", "    sampling: 0.5\n")),
     "datasets: sampling ratios must sum to 1")
case(G, "dc-split", "train + validation split of 1.6",
     lambda w: data_config(w, "datasets:\n" + dataset(
         "a", "    split: {train: 0.8, validation: 0.8}\n")),
     "datasets[0].split: train + validation must be in (0, 1]")
case(G, "dc-top-list", "a data_config that is a list",
     lambda w: data_config(w, "- a\n- b\n"), "must be a mapping with dataprocessor and datasets")
case(G, "dc-empty", "an empty data_config", lambda w: data_config(w, ""),
     "datasets: required, a non-empty list")
case(G, "dc-unknown-key", "data_path for data_paths",
     lambda w: data_config(w, "datasets:\n  - name: a\n    data_path: [{good}]\n"),
     "datasets[0].data_path: unknown key (did you mean 'data_paths'?)")
case(G, "dc-missing-data", "a data path that does not exist",
     lambda w: data_config(w, "datasets:\n  - name: a\n    data_paths: [nope.jsonl]\n"),
     "nope.jsonl: no such file")
case(G, "dc-odm", "dataprocessor type odm",
     lambda w: data_config(w, "dataprocessor:\n  type: odm\ndatasets:\n" + dataset("a")),
     "dataprocessor.odm: required with type: odm")
case(G, "dc-odm-reward", "online data mixing with the entropy reward (fms-hf-tuning's "
     "default) and a dataset without a validation split",
     lambda w: data_config(w, "dataprocessor:\n  type: odm\n  odm:\n    gamma: 0.1\n"
                           "datasets:\n" + dataset("a", "    split: {train: 0.8, validation: "
                                                         "0.2}\n") + dataset("b")),
     "<tmp>/data_config.yaml: dataprocessor.odm.reward_type entropy computes each dataset's "
     "reward on its validation split; datasets[b] has none (add split: {train: 0.9, "
     "validation: 0.1})")
case(G, "dc-duplicate-key", "a key written twice",
     lambda w: data_config(w, "datasets:\n" + dataset("a") + "datasets: []\n"),
     "invalid YAML: duplicate key 'datasets'")
case(G, "dc-alias-bomb", "a YAML alias bomb", lambda w: data_config(w, BOMB),
     "the document expands to more than 200,000 values")
case(G, "dc-missing-file", "data_config_path that does not exist",
     lambda w: ["train", "--model_name_or_path", w.model, "--data_config_path",
                str(w.tmp / "dc.yaml"), "--output_dir", w.out],
     "data_config_path: <tmp>/dc.yaml not found")
case(G, "dc-and-training-data", "data_config_path and training_data_path",
     lambda w: data_config(w, "datasets:\n" + dataset("a"), "--training_data_path", w.good),
     "training_data_path and data_config_path are exclusive")

G = "paths"
case(G, "out-is-file", "output_dir that is a file",
     lambda w: train(w, out=w.file("taken", "x")), "output_dir <tmp>/taken: exists and is not a "
     "folder")
case(G, "out-under-file", "output_dir under a file",
     lambda w: train(w, out=w.file("taken", "x") + "/run"),
     "output_dir <tmp>/taken/run: cannot create it, <tmp>/taken is a file")
case(G, "out-not-writable", "output_dir that is not writable",
     lambda w: train(w, out=w.unwritable("locked")),
     "output_dir <tmp>/locked: the folder is not writable")
case(G, "out-under-not-writable", "output_dir under a folder that is not writable",
     lambda w: train(w, out=w.unwritable("locked") + "/run"),
     "output_dir <tmp>/locked/run: cannot create it, <tmp>/locked is not writable")
case(G, "save-dir-is-file", "save_model_dir that is a file",
     lambda w: train(w, "--save_model_dir", w.file("model.bin", "x")),
     "save_model_dir <tmp>/model.bin: exists and is not a folder")
case(G, "save-dir-under-file", "save_model_dir under a file",
     lambda w: train(w, "--save_model_dir", w.file("model.bin", "x") + "/final"),
     "save_model_dir <tmp>/model.bin/final: cannot create it")
case(G, "out-inside-data", "output_dir inside the data folder",
     lambda w: train(w, data=w.folder("data"), out=str(w.tmp / "data" / "run")),
     "output_dir <tmp>/data/run is inside training_data_path <tmp>/data")
case(G, "model-typo", "--model_name_or_path ./typo",
     lambda w: train(w, "--model_name_or_path", "./typo"),
     "model_name_or_path ./typo: no such folder (a hub id is written org/name)")
case(G, "model-missing", "a model folder that does not exist",
     lambda w: train(w, "--model_name_or_path", str(w.tmp / "models" / "llama")),
     "model_name_or_path <tmp>/models/llama: no such folder")
case(G, "tokenizer-missing", "tokenizer_name_or_path that does not exist",
     lambda w: train(w, "--tokenizer_name_or_path", "./tokenizer"),
     "tokenizer ./tokenizer: no such folder")
case(G, "resume-not-checkpoint", "resume_from_checkpoint: a folder that is no checkpoint",
     lambda w: train(w, "--resume_from_checkpoint", w.folder("checkpoint-3")),
     "resume_from_checkpoint: <tmp>/checkpoint-3 is not a checkpoint (trainer_state.json "
     "missing or unreadable)")
case(G, "resume-missing", "resume_from_checkpoint: a path that does not exist",
     lambda w: train(w, "--resume_from_checkpoint", str(w.tmp / "checkpoint-9")),
     "resume_from_checkpoint: <tmp>/checkpoint-9 is not a folder")
case(G, "accelerate-config-missing", "accelerate_config that does not exist",
     lambda w: train(w, "--accelerate_config", str(w.tmp / "fsdp.yaml")),
     "accelerate_config: <tmp>/fsdp.yaml not found")
case(G, "tokenizer-files-missing", "tokenizer_train_files that do not exist",
     lambda w: train(w, "--tokenizer_train_files", str(w.tmp / "corpus.txt")),
     "tokenizer_train_files: <tmp>/corpus.txt not found")

G = "option values"
for name, value, message in [
    ("logging_steps", "0", "logging_steps must be > 0 (a float below 1 is a ratio of all steps), "
                           "got 0.0"),
    ("logging_steps", "-5", "logging_steps must be > 0"),
    ("save_steps", "0", "save_steps must be > 0"),
    ("learning_rate", "nan", "learning_rate must be a finite number >= 0, got nan"),
    ("learning_rate", "inf", "learning_rate must be a finite number >= 0, got inf"),
    ("learning_rate", "-1e-4", "learning_rate must be a finite number >= 0"),
    ("seed", "-1", "seed must be an integer in [0, 2**32 - 1], got -1"),
    ("seed", "4294967296", "seed must be an integer in [0, 2**32 - 1]"),
    ("warmup_steps", "-10", "warmup_steps must be >= 0, got -10"),
    ("warmup_ratio", "1.5", "warmup_ratio must be in [0, 1), got 1.5"),
    ("max_steps", "0", "max_steps must be a positive number of steps"),
    ("max_steps", "-5", "max_steps must be a positive number of steps"),
    ("per_device_train_batch_size", "0", "per_device_train_batch_size must be >= 1, got 0"),
    ("per_device_eval_batch_size", "0", "per_device_eval_batch_size must be >= 1, got 0"),
    ("gradient_accumulation_steps", "0", "gradient_accumulation_steps must be >= 1, got 0"),
    ("max_seq_length", "0", "max_seq_length must be >= 1, got 0"),
    ("max_grad_norm", "-1", "max_grad_norm must be a finite number >= 0"),
    ("weight_decay", "-0.1", "weight_decay must be a finite number >= 0, got -0.1"),
    ("adam_beta1", "2", "adam_beta1 must be in [0, 1), got 2.0"),
    ("adam_epsilon", "-1e-8", "adam_epsilon must be a finite number >= 0"),
    ("label_smoothing_factor", "-0.1", "label_smoothing_factor must be in [0, 1)"),
    ("save_total_limit", "0", "save_total_limit must be >= 1"),
    ("dataloader_num_workers", "-1", "dataloader_num_workers must be >= 0, got -1"),
    ("eval_accumulation_steps", "-2", "eval_accumulation_steps must be >= 1, got -2"),
    ("embedding_size_multiple_of", "0", "embedding_size_multiple_of must be >= 1, got 0"),
    ("num_processes", "0", "num_processes must be >= 1, got 0"),
    ("optim", "adamx", "optim 'adamx' is not an optimizer of the installed transformers"),
    ("report_to", "wandbx", "report_to 'wandbx' is not a reporting integration of the installed "
                            "transformers (did you mean 'wandb'?)"),
    ("trackers", "wandbx", "trackers: no installed tracker plugin named 'wandbx'"),
    ("peft_method", "ia3", "peft_method 'ia3': no installed plugin provides it"),
    ("fsdp", "sideways", "transformers refused the training options: Unknown `fsdp` option: "
                         "sideways"),
    ("tpu_num_cores", "8", "tpu_num_cores 8: removed in transformers 5"),
    ("fast_kernels", "true", "fast_kernels: fms-acceleration's fast_kernels is not part of fmtune"),
    ("lr_scheduler_type", "linearly", "lr_scheduler_type must be one of linear, cosine"),
    ("torch_dtype", "float8", "torch_dtype must be one of auto, float32, bfloat16, float16; "
                              "got 'float8'"),
    ("max_seq_length", "abc", "command line: max_seq_length must be an integer, got 'abc'"),
    ("max_seq_length", "1.5", "command line: max_seq_length must be an integer, got '1.5'"),
    ("gradient_checkpointing", "maybe", "gradient_checkpointing must be true/false, got 'maybe'"),
    ("lr_scheduler_kwargs", "{bad", "lr_scheduler_kwargs must be a mapping (JSON on the CLI)"),
]:
    case(G, f"{name}-{value}", f"--{name} {value}",
         lambda w, n=name, v=value: train(w, f"--{n}", v), message)
for value in ("0", "-1"):
    case(G, f"num_train_epochs-{value}", f"--num_train_epochs {value} (no max_steps)",
         lambda w, v=value: train(w, "--max_steps", "-1", "--num_train_epochs", v),
         "num_train_epochs must be > 0 (or give max_steps)")
case(G, "tokenizer-vocab-0", "--tokenizer_vocab_size 0 with tokenizer_train_files",
     lambda w: train(w, "--tokenizer_train_files", w.good, "--tokenizer_vocab_size", "0"),
     "tokenizer_vocab_size must be at least 258")
case(G, "eval-without-data", "--eval_strategy steps without validation data",
     lambda w: train(w, "--eval_strategy", "steps"),
     "eval_strategy=steps needs validation_data_path")
case(G, "max-per-device-alone", "max_per_device_train_batch_size without a total",
     lambda w: train(w, "--max_per_device_train_batch_size", "2"),
     "max_per_device_train_batch_size needs total_train_batch_size")
case(G, "auto-batch-and-per-device", "max_per_device_train_batch_size auto with a per-device batch",
     lambda w: train(w, "--max_per_device_train_batch_size", "auto",
                     "--per_device_train_batch_size", "4"),
     "max_per_device_train_batch_size auto picks per_device_train_batch_size; remove "
     "per_device_train_batch_size 4")
case(G, "auto-batch-word", "max_per_device_train_batch_size neither a number nor auto",
     lambda w: train(w, "--max_per_device_train_batch_size", "lots"),
     "max_per_device_train_batch_size must be an integer or auto, got 'lots'")
case(G, "auto-memory-alone", "auto_batch_max_memory without auto",
     lambda w: train(w, "--auto_batch_max_memory", "2"),
     "auto_batch_max_memory needs max_per_device_train_batch_size auto")
case(G, "auto-batch-too-small", "auto batch size with memory for no example",
     lambda w: train(w, "--max_per_device_train_batch_size", "auto",
                     "--auto_batch_max_memory", "0.01"),
     "max_per_device_train_batch_size auto: not even 1 example per device fits "
     "auto_batch_max_memory 0.01 GiB")
case(G, "multipack-alone", "fms-hf-tuning's --multipack without --padding_free",
     lambda w: train(w, "--multipack", "16"),
     "--multipack needs --padding_free (as in fms-hf-tuning)")
case(G, "multipack-packing", "--multipack with --packing",
     lambda w: train(w, "--padding_free", "true", "--multipack", "16", "--packing", "true"),
     "multipack and packing are exclusive")
case(G, "no-model", "no model_name_or_path",
     lambda w: ["train", "--training_data_path", w.good, "--output_dir", w.out],
     "model_name_or_path is required (YAML key or --model_name_or_path)")
case(G, "no-output-dir", "no output_dir",
     lambda w: ["train", "--model_name_or_path", w.model, "--training_data_path", w.good],
     "output_dir is required (YAML key or --output_dir)")

G = "command line"
case(G, "flag-ambiguous", "an ambiguous prefix (--per_device)",
     lambda w: train(w, "--per_device", "4"), "--per_device is ambiguous: it could be "
     "--per_device_eval_batch_size, --per_device_train_batch_size")
case(G, "flag-two-values", "two values to a single-value option",
     lambda w: train(w, "--learning_rate", "1e-3", "1e-4"),
     "--learning_rate takes one value, got 2: 1e-3 1e-4")
case(G, "flag-no-value", "an option without its value", lambda w: train(w, "--seed"),
     "command line: --seed needs a value (an integer)")
case(G, "flag-unknown", "a misspelled option", lambda w: train(w, "--learnig_rate", "1e-4"),
     "unknown option 'learnig_rate' (did you mean 'learning_rate'?)")
case(G, "flag-positional", "a stray positional argument",
     lambda w: ["train", "lora", *train(w)[1:]],
     "unexpected argument 'lora' (options are written --name value)")
case(G, "flag-inactive-plugin", "a LoRA option without the lora plugin",
     lambda w: train(w, "--lora_alpha", "16"), "option 'lora_alpha' belongs to plugin")
case(G, "plugin-unknown", "--plugins naming no installed plugin",
     lambda w: train(w, "--plugins", "lora,nosuch"), "plugin 'nosuch' is not installed")
case(G, "config-no-value", "--config without a file", lambda w: ["train", "--config"],
     "--config needs a value")
case(G, "command-unknown", "a misspelled command", lambda w: ["trian"],
     "unknown command 'trian' (did you mean 'train'?)")

G = "run YAML (--config)"
case(G, "yaml-duplicate-key", "a key written twice",
     lambda w: run_yaml(w, "learning_rate: 1e-4\nmax_steps: 3\nlearning_rate: 1e-3\n"),
     "<tmp>/run.yaml: line 3 invalid YAML: duplicate key 'learning_rate'")
case(G, "yaml-alias-bomb", "a YAML alias bomb", lambda w: run_yaml(w, BOMB),
     "invalid YAML: the document expands to more than 200,000 values")
case(G, "yaml-recursive", "a recursive alias", lambda w: run_yaml(w, "a: &a [1, *a]\n"),
     "a recursive document")
case(G, "yaml-top-list", "a list at the top level", lambda w: run_yaml(w, "- learning_rate\n"),
     "<tmp>/run.yaml: the top level must be a mapping of option: value")
case(G, "yaml-latin1", "a config file in latin-1",
     lambda w: ["train", "--config", w.file("run.yaml", "run_name: café\n".encode("latin-1"))],
     "<tmp>/run.yaml:1: not UTF-8 text")
case(G, "yaml-syntax", "an unclosed list", lambda w: run_yaml(w, "target_modules: [q_proj\n"),
     "<tmp>/run.yaml: line 2 invalid YAML")
case(G, "yaml-missing", "--config naming no file",
     lambda w: ["train", "--config", str(w.tmp / "run.yaml")], "<tmp>/run.yaml: config file not "
     "found")
case(G, "yaml-unknown-key", "a misspelled key", lambda w: run_yaml(w, "learnig_rate: 1e-4\n"),
     "unknown option 'learnig_rate' (did you mean 'learning_rate'?)")
case(G, "yaml-plugins-number", "plugins: 3", lambda w: run_yaml(w, "plugins: 3\n"),
     "plugins must be a string (a,b) or a list of plugin names, got 3")
case(G, "yaml-mapping-for-string", "a mapping where a string goes",
     lambda w: run_yaml(w, "output_dir: {path: out}\n"),
     "output_dir must be a string, got {'path': 'out'}")

G = "PEFT (peft_lora plugin)"
LORA = ("--plugins", "lora")
for flag, value, message in [
    ("r", "0", "r must be >= 1, got 0"),
    ("lora_alpha", "nan", "lora_alpha must be > 0 (and finite), got nan"),
    ("lora_dropout", "1", "lora_dropout must be in [0, 1), got 1.0"),
    ("target_modules", "qproj", "target_modules: no module named 'qproj' in LlamaForCausalLM; "
                                "its linear layers are"),
    ("target_modules", "", "target_modules is empty: give module names, or all-linear"),
    ("modules_to_save", "embed", "modules_to_save: no module named 'embed' in LlamaForCausalLM"),
    ("init_lora_weights", "svd", "init_lora_weights must be one of true, false, gaussian"),
    ("layers_to_transform", "first", "layers_to_transform: 'first' is not a layer index"),
    ("layers_to_transform", "7", "layers_to_transform: LlamaForCausalLM has 2 layers (0-1); no "
                                 "layer 7"),
    ("layers_pattern", "layers", "layers_pattern needs layers_to_transform"),
    ("continue_from_adapter", "{model}", "continue_from_adapter: <model> has no "
                                         "adapter_config.json"),
]:
    case(G, f"lora-{flag}-{value or 'empty'}".replace("{model}", "model"), f"--{flag} {value!r}",
         lambda w, f=flag, v=value: train(w, *LORA, f"--{f}", v.replace("{model}", w.model)),
         message)
case(G, "alora-no-invocation", "aLoRA without alora_invocation_string",
     lambda w: train(w, "--peft_method", "alora"), "alora_invocation_string is required")
case(G, "pt-zero-tokens", "prompt tuning with 0 virtual tokens",
     lambda w: train(w, "--peft_method", "pt", "--num_virtual_tokens", "0"),
     "num_virtual_tokens must be >= 1, got 0")
case(G, "pt-text-missing", "prompt_tuning_init TEXT without the text",
     lambda w: train(w, "--peft_method", "pt", "--prompt_tuning_init", "TEXT"),
     "prompt_tuning_init TEXT needs prompt_tuning_init_text")
case(G, "peft-two-methods", "--plugins lora,prompt_tuning",
     lambda w: train(w, "--plugins", "lora,prompt_tuning"),
     "prompt_tuning cannot be combined with lora")
case(G, "qlora-quant-type", "--bnb_4bit_quant_type int3",
     lambda w: train(w, "--plugins", "qlora", "--bnb_4bit_quant_type", "int3"),
     "bnb_4bit_quant_type must be one of nf4, fp4; got 'int3'")
case(G, "qlora-8bit-and-4bit", "load_in_8bit with a 4-bit option",
     lambda w: train(w, "--plugins", "qlora", "--load_in_8bit", "true", "--bnb_4bit_quant_type",
                     "fp4"), "load_in_8bit is set, so bnb_4bit_quant_type (4-bit options) would "
     "be ignored")

G = "quantized bases (quant_gptq plugin)"
case(G, "gptq-not-gptq", "--plugins gptq,lora on a model that is not GPTQ",
     lambda w: train(w, "--plugins", "gptq,lora"),
     "model_name_or_path: <model> is not a GPTQ checkpoint")
case(G, "gptq-backend", "an unknown gptq_backend",
     lambda w: train(w, "--plugins", "gptq,lora", "--gptq_backend", "fast"),
     "gptq_backend must be one of auto_trainable")
case(G, "mxfp4-not-mxfp4", "--plugins mxfp4 --dequantize true on a model that is not MXFP4",
     lambda w: train(w, "--plugins", "mxfp4", "--dequantize", "true"),
     "model_name_or_path: <model> is not an MXFP4 checkpoint")

G = "trainer controller rules"
case(G, "tc-missing-file", "a rules file that does not exist",
     lambda w: train(w, "--trainer_controller_config_file", str(w.tmp / "rules.yaml")),
     "<tmp>/rules.yaml: trainer controller config file not found")
case(G, "tc-attribute", "a rule reading an attribute",
     lambda w: controller(w, TC_HEAD + "    rule: state.__class__ == 1\n" + TC_OPS),
     "<tmp>/rules.yaml:7: controller 'stop': rule 'state.__class__ == 1' is refused: attribute "
     "access is not allowed")
case(G, "tc-call", "a rule calling __import__",
     lambda w: controller(w, TC_HEAD + "    rule: __import__('os')\n" + TC_OPS),
     "'__import__' cannot be called")
case(G, "tc-unknown-name", "a rule naming no metric",
     lambda w: controller(w, TC_HEAD + "    rule: loss['value'] < 1\n" + TC_OPS),
     "is refused: unknown name 'loss'")
case(G, "tc-rule-syntax", "a rule with an unclosed bracket",
     lambda w: controller(w, TC_HEAD + "    rule: state['global_step' > 1\n" + TC_OPS),
     "is not a valid expression: '[' was never closed")
case(G, "tc-trigger", "an unknown trigger",
     lambda w: controller(w, TC_HEAD.replace("on_step_end", "on_lgo")
                          + "    rule: state['global_step'] > 1\n" + TC_OPS),
     "unknown trigger 'on_lgo' (did you mean 'on_log'?)")
case(G, "tc-class", "an unknown metric class",
     lambda w: controller(w, TC_HEAD.replace("TrainingState", "TrainingStat")
                          + "    rule: state['global_step'] > 1\n" + TC_OPS),
     "metric 'state': unknown class 'TrainingStat' (did you mean 'TrainingState'?)")
case(G, "tc-arguments", "a metric given an argument it does not take",
     lambda w: controller(w, TC_HEAD.replace("TrainingState\n", "TrainingState\n    arguments: "
                                             "{window: 3}\n")
                          + "    rule: state['global_step'] > 1\n" + TC_OPS),
     "metric 'state' (class TrainingState): bad arguments: unexpected argument(s): window")
case(G, "tc-action", "an unknown action",
     lambda w: controller(w, TC_HEAD + "    rule: state['global_step'] > 1\n"
                          "    operations: [hfcontrols.should_stop]\n"),
     "operation 'hfcontrols' has no action 'should_stop'")
case(G, "tc-patience", "a negative patience",
     lambda w: controller(w, TC_HEAD + "    rule: state['global_step'] > 1\n"
                          "    patience: {patience_threshold: -1}\n" + TC_OPS),
     "patience_threshold must be an integer >= 0, got -1")
case(G, "tc-duplicate-key", "a key written twice",
     lambda w: controller(w, "controllers: []\ncontrollers: []\n"),
     "invalid YAML: duplicate key 'controllers'")
case(G, "tc-alias-bomb", "a YAML alias bomb", lambda w: controller(w, BOMB),
     "the document expands to more than 200,000 values")
case(G, "tc-empty", "an empty rules file", lambda w: controller(w, ""),
     "the top level must be a mapping with controller_metrics, operations, controllers")
case(G, "tc-latin1", "a rules file in latin-1",
     lambda w: train(w, "--trainer_controller_config_file", w.file(
         "rules.yaml", "controllers: []\n# café\n".encode("latin-1"))),
     "cannot read the trainer controller config file")

G = "preference data (dpo plugin)"
DPO = ("--plugins", "dpo")


def preferences(w: World) -> str:
    return w.jsonl("pref.jsonl", [{"prompt": [{"role": "user", "content": "hello there"}],
                                   "chosen": "hi", "rejected": "go away"}] * 4)


case(G, "dpo-beta-nan", "--beta nan", lambda w: train(w, *DPO, "--beta", "nan"),
     "beta must be a finite number > 0, got nan")
case(G, "dpo-label-smoothing", "--label_smoothing 0.9",
     lambda w: train(w, *DPO, "--label_smoothing", "0.9"),
     "label_smoothing must be in [0, 0.5]")
case(G, "dpo-loss-type", "an unknown loss_type", lambda w: train(w, *DPO, "--loss_type", "dop"),
     "loss_type: unknown 'dop'; TRL's DPO losses are")
case(G, "dpo-missing-field", "input/output records instead of preferences",
     lambda w: train(w, *DPO), "<tmp>/train.jsonl:1: missing field 'chosen'")
case(G, "dpo-no-template", "chat preferences, and the tokenizer has no chat template",
     lambda w: train(w, *DPO, data=preferences(w)),
     "<tmp>/pref.jsonl:1: chat messages need a chat template")
case(G, "dpo-template-syntax", "--chat_template with an unclosed for",
     lambda w: train(w, *DPO, "--chat_template", UNCLOSED, data=preferences(w)),
     "chat_template: invalid Jinja (line 1): Unexpected end of template")
case(G, "dpo-template-raises", "a chat template that raises for the records",
     lambda w: train(w, *DPO, "--chat_template", "{{ raise_exception('system turn first') }}",
                     data=preferences(w)),
     "<tmp>/pref.jsonl:1: --chat_template: the template raised an error: system turn first")

G = "fmtune generate"


def generate(w: World, *extra: str) -> list[str]:
    return ["generate", "--model", w.model, "--text", "hello there", *extra]


case(G, "gen-out-file-folder", "--out_file pointing at a folder",
     lambda w: generate(w, "--out_file", w.folder("results")),
     "<tmp>/results: is a folder; give the path of a file to write")
case(G, "gen-out-file-no-folder", "--out_file in a folder that does not exist",
     lambda w: generate(w, "--out_file", str(w.tmp / "results" / "out.json")),
     "--out_file <tmp>/results/out.json: its folder does not exist")
case(G, "gen-template-syntax", "--chat_template with an unclosed for",
     lambda w: generate(w, "--chat", "--chat_template", UNCLOSED),
     "--chat_template: invalid Jinja (line 1): Unexpected end of template")
case(G, "gen-template-unsafe", "--chat_template reaching __class__",
     lambda w: generate(w, "--chat", "--chat_template", UNSAFE),
     "--chat_template: prompt 1: refused by the Jinja sandbox: access to attribute '__class__'")
case(G, "gen-template-file-raises", "a --chat_template file that raises",
     lambda w: generate(w, "--chat", "--chat_template", w.file(
         "template.jinja", "{{ raise_exception('no user turns') }}")),
     "--chat_template: prompt 1: the template raised an error: no user turns")
case(G, "gen-no-template", "--chat, and the tokenizer has no chat template",
     lambda w: generate(w, "--chat"),
     "--chat: the tokenizer of <model> has no chat template; pass --chat_template")
case(G, "gen-template-without-chat", "--chat_template without --chat",
     lambda w: generate(w, "--chat_template", TEMPLATE), "--chat_template needs --chat")
case(G, "gen-max-new-tokens-0", "--max_new_tokens 0",
     lambda w: generate(w, "--max_new_tokens", "0"), "--max_new_tokens must be >= 1, got 0")
case(G, "gen-text-file-latin1", "a --text_file in latin-1",
     lambda w: ["generate", "--model", w.model, "--text_file",
                w.file("prompts.txt", "hello\ncafé\n".encode("latin-1"))],
     "<tmp>/prompts.txt:2: not UTF-8 text")
case(G, "gen-text-file-missing", "a --text_file that does not exist",
     lambda w: ["generate", "--model", w.model, "--text_file", str(w.tmp / "prompts.txt")],
     "<tmp>/prompts.txt: text file not found")
case(G, "gen-text-file-json-object", "a .json --text_file that is an object",
     lambda w: ["generate", "--model", w.model, "--text_file", w.file("p.json", '{"a": 1}')],
     "<tmp>/p.json: expected a JSON list of strings")
case(G, "gen-text-file-no-input", "a .jsonl --text_file record without input",
     lambda w: ["generate", "--model", w.model, "--text_file", w.file("p.jsonl", '{"a": 1}\n')],
     "<tmp>/p.jsonl:1: missing field 'input'")
case(G, "gen-model-missing", "--model that does not exist",
     lambda w: ["generate", "--model", str(w.tmp / "trained"), "--text", "hi"],
     "<tmp>/trained: no such model folder")
case(G, "gen-model-empty", "--model an empty folder",
     lambda w: ["generate", "--model", w.folder("trained"), "--text", "hi"],
     "<tmp>/trained: neither a model folder (config.json) nor an adapter folder")
case(G, "gen-base-for-full", "--base_model_name_or_path for a full model",
     lambda w: generate(w, "--base_model_name_or_path", w.model),
     "--base_model_name_or_path: <model> is not an adapter folder")
case(G, "gen-adapter-base-missing", "an adapter whose base model is gone",
     lambda w: ["generate", "--model", w.adapter("adapter", peft_type="LORA",
                                                 base_model_name_or_path=str(w.tmp / "base")),
                "--text", "hi"], "tokenizer <tmp>/base: no such folder")
case(G, "gen-max-new-tokens-type", "--max_new_tokens x",
     lambda w: generate(w, "--max_new_tokens", "x"), "max_new_tokens")
case(G, "gen-text-and-file", "--text and --text_file together",
     lambda w: generate(w, "--text_file", w.good), "--text_file")

G = "fmtune evaluate"
case(G, "eval-chat-data", "chat records",
     lambda w: ["evaluate", "--model", w.model, "--data", w.chat],
     "<tmp>/chat.jsonl:1: missing field 'input' (a chat record: evaluate compares input/output "
     "records)")
case(G, "eval-output-number", "an output that is a number",
     lambda w: ["evaluate", "--model", w.model, "--data",
                w.jsonl("number.jsonl", [{"input": "a", "output": 3}])],
     "<tmp>/number.jsonl:1: field 'output' must be a string, got int")
case(G, "eval-data-missing", "--data that does not exist",
     lambda w: ["evaluate", "--model", w.model, "--data", str(w.tmp / "test.jsonl")],
     "<tmp>/test.jsonl: data file not found")
case(G, "eval-data-latin1", "--data in latin-1",
     lambda w: ["evaluate", "--model", w.model, "--data", w.file(
         "test.jsonl", '{"input": "café", "output": "x"}\n'.encode("latin-1"))],
     "<tmp>/test.jsonl:1: not UTF-8 text")
case(G, "eval-max-new-tokens-0", "--max_new_tokens 0",
     lambda w: ["evaluate", "--model", w.model, "--data", w.good, "--max_new_tokens", "0"],
     "--max_new_tokens must be >= 1, got 0")
case(G, "eval-config-unknown-key", "--config with a misspelled key",
     lambda w: ["evaluate", "--config", w.file("run.yaml", f"model_name_or_path: {w.model}\n"
                                               "lerning_rate: 1\n"), "--data", w.good],
     "unknown option 'lerning_rate' (did you mean 'learning_rate'?)")
case(G, "eval-unknown-flag", "an unknown flag with --model",
     lambda w: ["evaluate", "--model", w.model, "--data", w.good, "--bogus", "1"], "--bogus")

G = "fmtune merge / export-vllm"
case(G, "merge-one-path", "one path", lambda w: ["merge", w.model],
     "merge takes [BASE] ADAPTER OUT")
case(G, "merge-dtype", "--dtype int8", lambda w: ["merge", "--dtype", "int8", w.model,
                                                  str(w.tmp / "merged")],
     "merge: argument --dtype: invalid choice: 'int8'")
case(G, "merge-no-arguments", "no arguments", lambda w: ["merge"],
     "merge: the following arguments are required: PATH")
case(G, "merge-device-map", "--device_map that is broken JSON",
     lambda w: ["merge", "--device_map", "{cpu", w.model, str(w.tmp / "merged")],
     "--device_map: not a JSON mapping")
case(G, "merge-not-adapter", "a full model where the adapter goes",
     lambda w: ["merge", w.model, str(w.tmp / "merged")],
     "<model>: not an adapter folder (no adapter_config.json)")
case(G, "merge-adapter-json", "an adapter_config.json that is not JSON",
     lambda w: ["merge", w.model, os.path.dirname(w.file("adapter/adapter_config.json", "{oops")),
                str(w.tmp / "merged")],
     "<tmp>/adapter/adapter_config.json: not a readable JSON object")
case(G, "merge-base-missing", "an adapter whose base model is gone",
     lambda w: ["merge", w.adapter("adapter", peft_type="LORA",
                                   base_model_name_or_path=str(w.tmp / "base")),
                str(w.tmp / "merged")], "<tmp>/base: no such folder")
case(G, "export-not-adapter", "a full model", lambda w: ["export-vllm", w.model,
                                                         str(w.tmp / "vllm")],
     "<model>: not an adapter folder (no adapter_config.json)")
case(G, "export-no-arguments", "no arguments", lambda w: ["export-vllm"],
     "export-vllm: the following arguments are required: adapter")
case(G, "export-prompt-tuning", "a prompt-tuning adapter",
     lambda w: ["export-vllm", w.adapter("adapter", peft_type="PROMPT_TUNING",
                                         base_model_name_or_path=w.model), str(w.tmp / "vllm")],
     "vLLM cannot serve this adapter: vLLM serves LoRA adapters only")
case(G, "export-no-weights", "a LoRA adapter folder without weights",
     lambda w: ["export-vllm", w.adapter("adapter", peft_type="LORA",
                                         base_model_name_or_path=w.model), str(w.tmp / "vllm")],
     "<tmp>/adapter: no adapter_model.safetensors")
case(G, "export-training-config", "--training-config that does not exist",
     lambda w: ["export-vllm", w.model, str(w.tmp / "vllm"), "--training-config",
                str(w.tmp / "train.yaml")], "--training-config <tmp>/train.yaml: no such file")

G = "Silogen configs (fmtune sft / dpo / generate CONFIG.yaml)"
case(G, "silogen-unknown-key", "data_confs for data_conf",
     lambda w: ["sft", w.silogen(lambda c: c.update(data_confs={}))],
     "<tmp>/experiment.yaml: data_confs: unknown key (did you mean 'data_conf'?)")
case(G, "silogen-peft-kwarg", "peft_kwargs.lora_alhpa",
     lambda w: ["sft", w.silogen(lambda c: c["peft_conf"]["peft_kwargs"].update(lora_alhpa=8))],
     "peft_conf.peft_kwargs.lora_alhpa: unknown key (did you mean 'lora_alpha'?)")
case(G, "silogen-peft-type", "peft_type IA3",
     lambda w: ["sft", w.silogen(lambda c: c["peft_conf"].update(peft_type="IA3"))],
     "peft_conf.peft_type: 'IA3' is not supported")
case(G, "silogen-template", "an unknown chat_template_name",
     lambda w: ["sft", w.silogen(lambda c: c["data_conf"].update(chat_template_name="chatml"))],
     "data_conf.chat_template_name: unknown chat template 'chatml'")
case(G, "silogen-data-type", "training_data.type MIXUP",
     lambda w: ["sft", w.silogen(lambda c: c["data_conf"]["training_data"].update(type="MIXUP"))],
     "data_conf.training_data.type: must be one of CONCATENATION, PRECOMPUTE_WEIGHTED_MIX")
case(G, "silogen-weight", "a negative sampling_weight",
     lambda w: ["sft", w.silogen(lambda c: c["data_conf"]["training_data"].update(
         type="PRECOMPUTE_WEIGHTED_MIX", datasets=[{"path": w.chat, "sampling_weight": -1}]))],
     "datasets[0].sampling_weight: must be a positive number, got -1")
case(G, "silogen-quant", "load_in_4bit and load_in_8bit",
     lambda w: ["sft", w.silogen(lambda c: c.update(quant_conf={
         "quantization_type": "bits-and-bytes", "load_in_4bit": True, "load_in_8bit": True}))],
     "quant_conf.load_in_4bit: set exactly one of load_in_4bit and load_in_8bit")
case(G, "silogen-training-args-list", "training_args that is a list",
     lambda w: ["sft", w.silogen(lambda c: c.update(training_args=[1, 2]))],
     "training_args: must be a mapping, got [1, 2]")
case(G, "silogen-seed", "training_args.seed -3",
     lambda w: ["sft", w.silogen(lambda c: c["training_args"].update(seed=-3))],
     "seed must be an integer in [0, 2**32 - 1], got -3")
case(G, "silogen-output-file", "training_args.output_dir that is a file",
     lambda w: ["sft", w.silogen(lambda c: c["training_args"].update(output_dir=w.good))],
     "output_dir <tmp>/train.jsonl: exists and is not a folder")
case(G, "silogen-dpo-sft-args", "sft_args in a dpo config",
     lambda w: ["dpo", w.silogen()], "<tmp>/experiment.yaml: sft_args: unknown key")
case(G, "silogen-missing", "a config file that does not exist",
     lambda w: ["sft", str(w.tmp / "experiment.yaml")],
     "<tmp>/experiment.yaml: config file not found")
case(G, "silogen-logging-level", "--logging-level LOUD",
     lambda w: ["sft", w.silogen(), "--logging-level", "LOUD"],
     "--logging-level: unknown level 'LOUD'")
case(G, "silogen-learning-rate-text", "training_args.learning_rate 'fast'",
     lambda w: ["sft", w.silogen(lambda c: c["training_args"].update(learning_rate="fast"))],
     "<tmp>/experiment.yaml: training_args.learning_rate: must be a number, got 'fast'")
case(G, "silogen-unknown-flag", "an unknown flag", lambda w: ["sft", w.silogen(), "--bogus"],
     "sft: unrecognized arguments: --bogus (see fmtune sft --help)")
case(G, "silogen-gen-prompt-type", "prompt_conf.type eval",
     lambda w: ["generate", w.generation(prompt_conf={"type": "eval"}), str(w.tmp / "out.yaml")],
     "prompt_conf.type: must be one of open-input, eval-data; got 'eval'")
case(G, "silogen-gen-max-new-tokens", "hf_gen_params.max_new_tokens 0",
     lambda w: ["generate", w.generation(hf_gen_params={"max_new_tokens": 0}),
                str(w.tmp / "out.yaml")], "hf_gen_params.max_new_tokens: must be a positive "
     "integer, got 0")
case(G, "silogen-gen-out-folder", "OUTPUT.yaml that is a folder",
     lambda w: ["generate", w.generation(), w.folder("outputs")],
     "<tmp>/outputs: is a folder; give the path of a file to write")
case(G, "silogen-gen-temperature", "hf_gen_params.temperature -1",
     lambda w: ["generate", w.generation(hf_gen_params={"temperature": -1.0, "do_sample": True}),
                str(w.tmp / "out.yaml")], "<tmp>/generation.yaml: hf_gen_params.temperature: "
     "`temperature` (=-1.0) has to be a strictly positive float")

G = "other commands and trackers"
case(G, "plot-missing", "fmtune plot on a folder that does not exist",
     lambda w: ["plot", str(w.tmp / "run")], "<tmp>/run/training_logs.jsonl: not found")
case(G, "preprocess-unknown-option", "fmtune preprocess with an unknown option",
     lambda w: ["preprocess", "--bogus"], "unknown option 'bogus'")
case(G, "dpo-preview-unknown-option", "fmtune dpo preview with an unknown option",
     lambda w: ["dpo", "preview", "--bogus"], "unknown option 'bogus'")
case(G, "data-unknown-subcommand", "fmtune data with an unknown option",
     lambda w: ["data", "--bogus"], "data: unrecognized arguments: --bogus")
case(G, "plugins-unknown-flag", "fmtune plugins --bogus", lambda w: ["plugins", "--bogus"],
     "--bogus")
case(G, "aim-repo-file", "--aim_repo that is a file",
     lambda w: train(w, "--trackers", "aim", "--aim_repo", w.file("aim", "x")),
     "aim_repo <tmp>/aim: exists and is not a folder")
case(G, "mlflow-uri", "--mlflow_tracking_uri with an unknown scheme",
     lambda w: train(w, "--trackers", "mlflow", "--mlflow_tracking_uri", "bogus://tracking"),
     "mlflow_tracking_uri bogus://tracking: unknown scheme 'bogus'")


# ------------------------------------------------------------------------- running them


class LoadSpy:
    """An in-test plugin: what a ``train``/``evaluate --config`` run loaded before it refused."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    @hookimpl(wrapper=True)
    def load_tokenizer(self):
        self.loaded.append("tokenizer")
        return (yield)

    @hookimpl(wrapper=True)
    def load_model(self):
        self.loaded.append("model")
        return (yield)


def snapshot(*folders: str | Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folders``: (size, mtime in ns)."""
    files = {}
    for folder in folders:
        for root, dirs, names in os.walk(folder):
            for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
                path = os.path.join(root, name)
                st = os.lstat(path)
                files[path] = (st.st_size, st.st_mtime_ns)
    return files


def normalize(text: str, w: World) -> str:
    for path, name in ((str(w.tmp), "<tmp>"), (os.path.realpath(w.tmp), "<tmp>"),
                       (w.model, "<model>"), (os.path.realpath(w.model), "<model>")):
        text = text.replace(path, name)
    # memory figures depend on the machine (plan's prediction includes this machine's measured
    # baseline RSS): the doc shows them as <N> MB
    return re.sub(r"\b\d+(?:\.\d+)? MB\b", "<N> MB", text)


@dataclass
class Observed:
    code: int
    message: str  # the one line, without "fmtune: error: ", paths normalized
    loaded: str


OBSERVED: dict[str, Observed] = {}


def run_case(c: Case, tmp: Path, model: str, monkeypatch) -> Observed:
    w = World(tmp, model, monkeypatch)
    monkeypatch.chdir(tmp)  # anything written to a relative path lands where it is checked
    argv = c.argv(w)
    before = snapshot(tmp, model)
    spy = LoadSpy()
    result = run_cli(argv, plugins=[spy])
    after = snapshot(tmp, model)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    assert result.exit_code == c.code, f"exit {result.exit_code}:\n{result.stderr[-3000:]}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("fmtune: error:")]
    after_error = lines[lines.index(errors[0]) + 1:] if len(errors) == 1 else []
    assert len(errors) == 1 and (not after_error or after_error[0].startswith("usage:")), \
        f"not one 'fmtune: error:' line closing stderr (or followed by usage):\n" \
        f"{result.stderr[-3000:]}"
    message = normalize(errors[0].removeprefix("fmtune: error: "), w)
    assert c.message in message, message
    new = sorted(set(after) - set(before))
    changed = sorted(p for p in set(after) & set(before) if after[p] != before[p])
    assert not new and not changed, f"written: {new}, changed: {changed}"
    loaded = ", ".join(spy.loaded) or "nothing" if argv[0] == "train" else "-"
    return Observed(result.exit_code, message, loaded)


def _param(c: Case):
    marks = [pytest.mark.xfail(strict=True, reason=c.known_failure)] if c.known_failure else []
    return pytest.param(c, id=c.id, marks=marks)


def test_case_ids_are_unique_and_enough():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert len(CASES) >= 85


@pytest.mark.parametrize("c", [_param(c) for c in CASES])
def test_bad_input_is_refused_in_one_line(c, tmp_path, fmtune_tiny_model, monkeypatch):
    OBSERVED[c.id] = run_case(c, tmp_path, fmtune_tiny_model, monkeypatch)


# --------------------------------------------------------------------------------- the doc


def render_doc(observed: dict[str, Observed], commands: dict[str, str]) -> str:
    known = [c for c in CASES if c.known_failure]
    lines = [
        "# Bad input: exit codes and messages", "",
        "<!-- Generated by tests/test_reliability.py; do not edit by hand.",
        "     Regenerate: FMTUNE_WRITE_DOCS=1 .venv/bin/python -m pytest "
        "tests/test_reliability.py -->", "",
        "Each row is one bad input, as `tests/test_reliability.py` runs it on a tiny local model. "
        "For every row the test checks: the exit code; stderr ends with exactly one line "
        "`fmtune: error: MESSAGE` (the message column; info lines and progress bars may come "
        "before it) and holds no traceback; and nothing new is on disk: the case's folder "
        "(`<tmp>`, which holds its inputs and `output_dir`) and the model folder (`<model>`) "
        "have the same files, sizes and modification times as before the command.", "",
        "\"loaded\" (`train` only) is what the run had loaded when it refused: `nothing` means "
        "the options, paths and YAML files were checked before the tokenizer and the model.", "",
        f"{len(CASES)} inputs: {len(CASES) - len(known)} refused as described, {len(known)} known "
        "failures (marked; the test expects them to fail until fixed).", ""]
    groups = list(dict.fromkeys(c.group for c in CASES))
    for group in groups:
        lines += [f"## {group}", "", "| input | command | exit | loaded | message |",
                  "|---|---|---|---|---|"]
        for c in CASES:
            if c.group != group:
                continue
            command = f"`fmtune {commands[c.id]}`"
            if c.known_failure:
                lines.append(f"| {c.what} | {command} | - | - | **known failure**: "
                             f"{_cell(c.known_failure)} |")
                continue
            o = observed[c.id]
            message = o.message if len(o.message) <= MESSAGE_CHARS else \
                o.message[:MESSAGE_CHARS - 3] + "..."
            lines.append(f"| {c.what} | {command} | {o.code} | {o.loaded} | "
                         f"`{_cell(message).replace('`', chr(39))}` |")
        lines.append("")
    return "\n".join(lines)


def command_of(argv: list[str]) -> str:
    """``train``, ``dpo preview``, ``sft CONFIG.yaml``: what the doc shows of a command."""
    words = argv[:1]
    if argv[1:2] == ["preview"]:
        words.append("preview")
    elif argv[1:2] and argv[1].endswith(".yaml"):
        words.append("CONFIG.yaml")
    return " ".join(words)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def test_reliability_doc_matches_the_table(tmp_path_factory, fmtune_tiny_model, monkeypatch):
    """Runs the cases not run in this session (e.g. under -k), then compares the doc."""
    for c in CASES:
        if c.known_failure:
            continue
        if c.id not in OBSERVED:
            with monkeypatch.context() as mp:
                OBSERVED[c.id] = run_case(c, tmp_path_factory.mktemp(c.id[:40]),
                                          fmtune_tiny_model, mp)
    scratch = World(tmp_path_factory.mktemp("commands"), fmtune_tiny_model, monkeypatch)
    commands = {c.id: command_of(c.argv(scratch)) for c in CASES}
    check_generated(DOC, render_doc(OBSERVED, commands), "docs/reliability.md")
