"""Silogen `finetuning` experiment configs run by fmtune (`fmtune sft|dpo CONFIG.yaml`)."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from fmtune import silogen
from fmtune.config import ConfigError
from fmtune.pytest_plugin import DEMO_TEXTS
from fmtune.testing import build_tiny_model, write_jsonl

# An SFT experiment as Silogen users write them (modelled on the configs in Silogen's tests):
# LoRA on a bitsandbytes 4-bit base, MLflow tracking to a local store, automatic batch size.
SFT_CONFIG = """\
data_conf:
  chat_template_name: chat-ml
  training_data:
    type: CONCATENATION
    datasets:
      - path: {data}
  validation_data:
    type: NONE
batchsize_conf:
  total_train_batch_size: 4
  max_per_device_train_batch_size: 2
training_args:
  use_cpu: true
  output_dir: {out}
  learning_rate: 1.0e-3
  logging_steps: 1
  logging_strategy: steps
  lr_scheduler_type: constant
  max_steps: 2
  num_train_epochs: -1
  overwrite_output_dir: true
  push_to_hub: false
  report_to: ["none"]
  save_strategy: "no"
  eval_strategy: "no"
sft_args:
  max_seq_length: 128
  train_on_completions_only: true
peft_conf:
  peft_type: LORA
  task_type: CAUSAL_LM
  peft_kwargs:
    r: 4
    lora_alpha: 8
    lora_dropout: 0.0
    target_modules: [q_proj, v_proj]
quant_conf:
  quantization_type: bits-and-bytes
  load_in_4bit: true
  bnb_4bit_quant_type: nf4
  bnb_4bit_compute_dtype: float32
run_conf:
  model: {model}
  model_args:
    attn_implementation: eager
    use_cache: false
  resume_from_checkpoint: false
tracking:
  mlflow_server_uri: {mlruns}
  experiment_name: silogen-demo
  hf_mlflow_log_artifacts: "False"
"""

CHAT_ML = silogen.CHAT_TEMPLATES["chat-ml"][0]


def sft_expected(model, data, out, mlruns):
    return {
        "model_name_or_path": model, "resume_from_checkpoint": "false",
        "attn_implementation": "eager", "use_cache": False, "max_seq_length": 128,
        "chat_template": CHAT_ML, "add_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "training_data_path": data, "total_train_batch_size": 4,
        "max_per_device_train_batch_size": 2, "use_cpu": True, "output_dir": out,
        "learning_rate": 1e-3, "logging_steps": 1, "logging_strategy": "steps",
        "lr_scheduler_type": "constant", "max_steps": 2, "num_train_epochs": -1,
        "push_to_hub": False, "save_strategy": "no", "eval_strategy": "no",
        "save_model_dir": f"{out}/checkpoint-final", "r": 4, "lora_alpha": 8,
        "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": "float32", "mlflow_tracking_uri": mlruns,
        "mlflow_experiment": "silogen-demo",
    }


def test_translate_sft_lora_4bit_mlflow():
    data = yaml.safe_load(SFT_CONFIG.format(data="data/train.jsonl", out="/ckpt", model="/base",
                                            mlruns="file:///tmp/mlruns"))
    opts, plugins = silogen.translate(data, "sft", "exp.yaml")
    assert plugins == ["data_handlers", "qlora", "mlflow"]
    assert opts == sft_expected("/base", "data/train.jsonl", "/ckpt", "file:///tmp/mlruns")


def test_translate_defaults_follow_silogen():
    """Unset keys get Silogen's (peft's, BitsAndBytesConfig's) defaults, not fmtune's."""
    data = {"data_conf": {"training_data": {"type": "CONCATENATION",
                                            "datasets": [{"path": "a.jsonl"}]},
                          "validation_data": {"type": "CONCATENATION",
                                              "datasets": [{"path": "v.jsonl"}]}},
            "training_args": {"learning_rate": 1e-4},
            "overrides": {"lr_multiplier": 2.0, "lr_batch_size_scaling": "sqrt"},
            "batchsize_conf": {"total_train_batch_size": 16, "max_per_device_train_batch_size": 4},
            "sft_args": {"train_on_completions_only": True},
            "peft_conf": {"peft_type": "LORA", "peft_kwargs": {"target_modules": "all-linear"}},
            "quant_conf": {"quantization_type": "bits-and-bytes", "load_in_4bit": True},
            "run_conf": {"model": "m", "determinism": "full",
                         "model_args": {"torch_dtype": "bfloat16"}}}
    opts, plugins = silogen.translate(data, "sft", "exp.yaml")
    assert plugins == ["data_handlers", "qlora"]
    assert opts == {
        "model_name_or_path": "m", "resume_from_checkpoint": "false", "full_determinism": True,
        "torch_dtype": "bfloat16", "max_seq_length": 2048,
        "chat_template": silogen.CHAT_TEMPLATES["mistral-with-system"][0],
        "training_data_path": "a.jsonl", "validation_data_path": "v.jsonl",
        "total_train_batch_size": 16, "max_per_device_train_batch_size": 4,
        "learning_rate": pytest.approx(1e-4 * 2 * 4), "output_dir": "./checkpoints",
        "save_model_dir": "./checkpoints/checkpoint-final", "r": 8, "lora_alpha": 8,
        "lora_dropout": 0.0, "target_modules": ["all-linear"], "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": "float32"}


def test_weighted_mix_and_whole_conversation_become_a_data_config():
    data = {"data_conf": {"chat_template_name": "keep-original",
                          "training_data": {"type": "PRECOMPUTE_WEIGHTED_MIX", "datasets": [
                              {"path": "dolly.jsonl", "sampling_weight": 1.0},
                              {"path": "oasst.jsonl", "sampling_weight": 0.5}]},
                          "validation_data": {"type": "AUTO_SPLIT", "ratio": 0.25}},
            "training_args": {}, "batchsize_conf": {"total_train_batch_size": 8,
                                                     "max_per_device_train_batch_size": 8},
            "peft_conf": {"peft_type": "NO_PEFT"}, "run_conf": {"model": "m"}}
    p = silogen.plan(data, "sft", "exp.yaml")
    assert p.plugins == ["data_handlers"]
    assert p.options["data_config_path"] == silogen.DATA_CONFIG
    assert "training_data_path" not in p.options and "chat_template" not in p.options
    dc = p.files[silogen.DATA_CONFIG]
    assert dc["dataprocessor"] == {"type": "default", "sampling_stopping_strategy":
                                   "all_exhausted", "seed": 19851243}
    assert [(d["data_paths"], d["sampling"], d["split"]) for d in dc["datasets"]] == [
        (["dolly.jsonl"], pytest.approx(2 / 3), {"train": 0.75, "validation": 0.25}),
        (["oasst.jsonl"], pytest.approx(1 / 3), {"train": 0.75, "validation": 0.25})]
    assert [h["name"] for h in dc["datasets"][0]["data_handlers"]] == [
        "apply_tokenizer_chat_template", "tokenize"]


DPO_CONFIG = {
    "data_conf": {"chat_template_name": "chat-ml",
                  "training_data": {"type": "CONCATENATION", "datasets": [{"path": "prefs.jsonl"}]},
                  "validation_data": {"type": "CONCATENATION",
                                      "datasets": [{"path": "prefs-valid.jsonl"}]}},
    "batchsize_conf": {"total_train_batch_size": 8, "max_per_device_train_batch_size": 2},
    "training_args": {"output_dir": "/exp/dpo", "learning_rate": 5e-7, "beta": 0.05,
                      "loss_type": "ipo", "max_length": 1024, "bf16": True,
                      "report_to": ["mlflow"], "eval_strategy": "steps", "eval_steps": 50},
    "peft_conf": {"peft_type": "LORA", "task_type": "CAUSAL_LM",
                  "peft_kwargs": {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj"]}},
    "run_conf": {"model": "/exp/sft/checkpoint-final", "resume_from_checkpoint": "auto"},
}


def test_translate_dpo():
    p = silogen.plan(DPO_CONFIG, "dpo", "dpo.yaml")
    assert p.plugins == ["dpo", "mlflow", "lora"]
    assert p.options == {
        "model_name_or_path": "/exp/sft/checkpoint-final", "resume_from_checkpoint": "auto",
        "chat_template": CHAT_ML,  # Silogen's DPO checks the tokenizer has it; adds no tokens
        "training_data_path": silogen.DPO_TRAIN, "validation_data_path": silogen.DPO_VALID,
        "total_train_batch_size": 8, "max_per_device_train_batch_size": 2,
        "output_dir": "/exp/dpo", "learning_rate": 5e-7, "beta": 0.05, "loss_type": ["ipo"],
        "max_seq_length": 1024, "bf16": True, "eval_strategy": "steps", "eval_steps": 50,
        "save_model_dir": "/exp/dpo/checkpoint-final", "r": 16, "lora_alpha": 32,
        "lora_dropout": 0.0, "target_modules": ["q_proj"]}
    assert p.files == {silogen.DPO_TRAIN: ("preferences", ["prefs.jsonl"]),
                       silogen.DPO_VALID: ("preferences", ["prefs-valid.jsonl"])}
    assert silogen.translate(DPO_CONFIG, "dpo", "dpo.yaml") == (p.options, p.plugins)


def test_preference_records_are_renamed(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{
        "dataset": "d", "id": "1",
        "prompt_messages": [{"role": "user", "content": "hi", "tags": []}],
        "chosen_messages": [{"role": "assistant", "content": "hello"}],
        "rejected_messages": [{"role": "assistant", "content": "go away"}]}])
    out = tmp_path / "out.jsonl"
    silogen.write_preferences([src], out, "dpo.yaml")
    assert json.loads(out.read_text()) == {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}]}
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt_messages": []}])
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: missing field 'chosen_messages'"):
        silogen.write_preferences([str(tmp_path / "bad.jsonl")], out, "dpo.yaml")


def _with(path, value, base=None):
    data = json.loads(json.dumps(base or DPO_CONFIG))
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return data


@pytest.mark.parametrize("path,value,kind,message", [
    ("peft_conf.peft_kwargs.lora_alhpa", 8, "dpo",
     "peft_conf.peft_kwargs.lora_alhpa: unknown key (did you mean 'lora_alpha'?)"),
    ("peft_conf.peft_kwargs.bias", "all", "dpo", "peft_conf.peft_kwargs.bias: 'all' is not "
     "supported"),
    ("data_conf.chat_template_name", "chatml", "dpo", "data_conf.chat_template_name: unknown "
     "chat template 'chatml' (did you mean 'chat-ml'?)"),
    ("training_args.gradient_accumulation_steps", 4, "dpo",
     "training_args.gradient_accumulation_steps: computed from batchsize_conf"),
    ("training_args.learnig_rate", 1e-5, "dpo", "training_args.learnig_rate: not a "
     "TrainingArguments field of the installed transformers nor an fmtune option (did you mean "
     "'learning_rate'?)"),
    ("training_args.rpo_alpha", 0.5, "dpo", "training_args.rpo_alpha: this TRL DPOConfig option"),
    ("run_conf.determinism", "half", "dpo", "run_conf.determinism: 'half'"),
    ("run_conf.model_args.device_map", "cuda:1", "dpo", "run_conf.model_args.device_map:"),
    ("tracking", {"mlflow_server_uri": "file:///x", "experiment_name": "e",
                  "hf_mlflow_log_artifacts": "True"}, "dpo",
     "tracking.hf_mlflow_log_artifacts: fmtune's mlflow plugin logs params and metrics"),
    ("quant_conf", {"quantization_type": "bits-and-bytes", "load_in_4bit": True,
                    "llm_int8_threshold": 5.0}, "dpo", "quant_conf.llm_int8_threshold: 5.0 is "
     "not supported"),
    ("batchsize_conf.total_batch_size", 8, "dpo", "batchsize_conf.total_batch_size: unknown key "
     "(did you mean 'total_train_batch_size'?)"),
    ("peft_conf.peft_type", "PROMPT_TUNING", "dpo", "peft_conf.peft_type: 'PROMPT_TUNING' is not "
     "supported"),
    ("sft_args", {"max_seq_length": 512}, "dpo", "sft_args: unknown key"),
    ("method", "sft", "dpo", "method: 'sft' does not match the command 'fmtune dpo'"),
    ("data_confs", {}, "dpo", "data_confs: unknown key (did you mean 'data_conf'?)"),
])
def test_bad_keys_are_one_line_errors(path, value, kind, message):
    with pytest.raises(ConfigError) as e:
        silogen.translate(_with(path, value), kind, "exp/dpo.yaml")
    text = str(e.value)
    assert text.startswith("exp/dpo.yaml: ") and message in text and "\n" not in text


def test_cmd_errors_exit_2_in_one_line(tmp_path, capsys):
    from fmtune.cli import main

    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(_with("peft_conf.peft_kwargs.lora_alhpa", 8)))
    # the way cli.py runs it: a ConfigError becomes "fmtune: error: ..." and exit 2
    try:
        code = silogen.cmd("dpo", [str(cfg)])
    except ConfigError as e:
        code, text = 2, str(e)
    assert code == 2 and text == (f"{cfg}: peft_conf.peft_kwargs.lora_alhpa: unknown key "
                                  "(did you mean 'lora_alpha'?)")
    assert main(["plugins"]) == 0  # nothing global broken


@pytest.mark.parametrize("argv,message", [
    (["sft", "CFG", "--bogus"], "sft: unrecognized arguments: --bogus (see fmtune sft --help)"),
    (["dpo", "CFG", "--logging-levl", "INFO"], "dpo: unrecognized arguments: --logging-levl"),
    (["sft", "CFG", "--num-preprocess-workers", "many"], "sft: argument "
     "--num-preprocess-workers: invalid int value: 'many' (see fmtune sft --help)"),
    (["generate", "CFG", "OUT", "--bogus"], "generate: unrecognized arguments: --bogus"),
    (["generate", "CFG"], "generate: the following arguments are required: outpath"),
])
def test_usage_errors_are_one_fmtune_error_line(tmp_path, argv, message):
    """Silogen's command lines are parsed by fmtune's CommandParser: one line, exit 2."""
    from fmtune.testing import run_cli

    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(DPO_CONFIG))
    out = tmp_path / "out.yaml"
    res = run_cli([str(cfg) if a == "CFG" else str(out) if a == "OUT" else a for a in argv])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith(f"fmtune: error: {message}"), res.stderr
    assert not [line for line in lines if "usage:" in line or "Traceback" in line]
    assert not out.exists()


@pytest.mark.parametrize("path,value,kind,message", [
    ("training_args.learning_rate", "fast", "sft", "training_args.learning_rate: must be a "
     "number, got 'fast'"),
    ("training_args.lr_scheduler_type", "cosin", "sft", "training_args.lr_scheduler_type: must "
     "be one of linear, cosine"),
    ("training_args.max_steps", 2.5, "sft", "training_args.max_steps: must be an integer, got "
     "2.5"),
    ("training_args.max_length", "long", "dpo", "training_args.max_length: must be an integer, "
     "got 'long' (fmtune option max_seq_length)"),
    ("training_args.beta", "high", "dpo", "training_args.beta: must be a number, got 'high'"),
    ("sft_args.max_seq_length", "long", "sft", "sft_args.max_seq_length: must be an integer, "
     "got 'long'"),
    ("batchsize_conf.total_train_batch_size", "big", "sft", "batchsize_conf."
     "total_train_batch_size: must be an integer, got 'big'"),
    ("peft_conf.peft_kwargs.r", "four", "sft", "peft_conf.peft_kwargs.r: must be an integer, "
     "got 'four'"),
    ("peft_conf.peft_kwargs.use_dora", "maybe", "sft", "peft_conf.peft_kwargs.use_dora: must be "
     "true/false, got 'maybe'"),
    ("run_conf.model_args.attn_implementation", "fast", "sft", "run_conf.model_args."
     "attn_implementation: must be one of eager, sdpa, flash_attention_2; got 'fast'"),
    ("run_conf.model_args.use_cache", "sometimes", "sft", "run_conf.model_args.use_cache: must "
     "be true/false, got 'sometimes'"),
    ("quant_conf.bnb_4bit_quant_type", "nf8", "sft", "quant_conf.bnb_4bit_quant_type: must be "
     "one of nf4, fp4; got 'nf8'"),
    ("overrides.lr_multiplier", "double", "sft", "overrides.lr_multiplier: must be a number, "
     "got 'double'"),
])
def test_translated_values_are_checked_as_the_users_keys(path, value, kind, message):
    """A value of the wrong type (or not a choice) for the fmtune option it becomes names the
    user's file and the Silogen key, not the translated fmtune_train.yaml."""
    base = yaml.safe_load(SFT_CONFIG.format(data="train.jsonl", out="/ckpt", model="/base",
                                            mlruns="file:///tmp/mlruns"))
    if kind == "dpo":
        base = DPO_CONFIG
    with pytest.raises(ConfigError) as e:
        silogen.translate(_with(path, value, base), kind, "exp/run.yaml")
    text = str(e.value)
    assert text.startswith(f"exp/run.yaml: {message}") and "\n" not in text, text


def test_cmd_names_the_users_file_for_a_bad_value(tmp_path):
    """Through the CLI: one line naming the user's file and key, exit 2, nothing written."""
    from fmtune.testing import run_cli

    out = tmp_path / "out"
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(SFT_CONFIG.format(data=tmp_path / "train.jsonl", out=out, model="/base",
                                     mlruns=f"file://{tmp_path / 'mlruns'}")
                   .replace("learning_rate: 1.0e-3", "learning_rate: fast"))
    res = run_cli(["sft", str(cfg)])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines()[-1] == (
        f"fmtune: error: {cfg}: training_args.learning_rate: must be a number, got 'fast'")
    assert "fmtune_train.yaml" not in res.stderr and sorted(os.listdir(tmp_path)) == ["exp.yaml"]


def test_print_config_is_the_fmtune_yaml(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(SFT_CONFIG.format(data="train.jsonl", out="/ckpt", model="/base",
                                     mlruns="file:///tmp/mlruns"))
    assert silogen.cmd("sft", [str(cfg), "--print-config", "--experiment-name", "cli-exp"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = sft_expected("/base", "train.jsonl", "/ckpt", "file:///tmp/mlruns")
    assert printed == {"plugins": "data_handlers,qlora,mlflow", **expected,
                       "mlflow_experiment": "cli-exp"}


def test_sft_trains_qlora_with_mlflow(tmp_path, monkeypatch):
    model = build_tiny_model(tmp_path / "model", DEMO_TEXTS)
    data = write_jsonl(tmp_path / "train.jsonl", [
        {"dataset": "demo", "id": f"demo-{i}", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "translate: the red cat sees a dog ="},
            {"role": "assistant", "content": "le chat rouge voit un chien"}]} for i in range(8)])
    out, mlruns = tmp_path / "out", tmp_path / "mlruns"
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(SFT_CONFIG.format(data=data, out=out, model=model, mlruns=f"file://{mlruns}"))
    monkeypatch.chdir(tmp_path)
    assert silogen.cmd("sft", [str(cfg)]) == 0
    final = out / "checkpoint-final"  # Silogen's run_conf.final_checkpoint_name
    assert (final / "adapter_model.safetensors").is_file()
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == 2
    assert summary["total_train_batch_size"] == 4
    assert summary["per_device_train_batch_size"] == 2
    assert summary["gradient_accumulation_steps"] == 2
    assert (out / "mlflow_tracker.json").is_file() and mlruns.is_dir()
    assert not [p for p in os.listdir(tmp_path) if p.startswith("fmtune-silogen")]
    # Silogen's generate with the trained adapter folder as model_conf.model (its chat-ml
    # tokens were added in training): loaded over its base with the embeddings fitted
    gen, answers = tmp_path / "gen.yaml", tmp_path / "answers.yaml"
    gen.write_text(yaml.safe_dump({
        "model_conf": {"model": str(final)},
        "prompt_conf": {"type": "open-input", "input": "translate: the red cat sees a dog =",
                        "num_samples": 1},
        "hf_gen_params": {"max_new_tokens": 4, "do_sample": False}}))
    assert silogen.cmd_generate([str(gen), str(answers)]) == 0
    record = yaml.safe_load(answers.read_text())[0]
    assert record["prompt"] == "translate: the red cat sees a dog =" and "answer" in record


def test_dpo_trains_lora_on_silogen_preference_records(tmp_path):
    model = build_tiny_model(tmp_path / "model", DEMO_TEXTS)
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [
        {"dataset": "d", "id": str(i),
         "prompt_messages": [{"role": "user", "content": "say cat twice:"}],
         "chosen_messages": [{"role": "assistant", "content": "cat cat"}],
         "rejected_messages": [{"role": "assistant", "content": "dog cat"}]} for i in range(4)])
    out = tmp_path / "dpo"
    cfg = {"data_conf": {"chat_template_name": "chat-ml",
                         "training_data": {"type": "CONCATENATION", "datasets": [{"path": prefs}]},
                         "validation_data": {"type": "NONE"}},
           "batchsize_conf": {"total_train_batch_size": 2, "max_per_device_train_batch_size": 2},
           "training_args": {"use_cpu": True, "output_dir": str(out), "max_steps": 1,
                             "save_strategy": "no", "beta": 0.1, "report_to": ["none"]},
           "peft_conf": {"peft_type": "LORA", "peft_kwargs": {"r": 4,
                                                             "target_modules": ["q_proj"]}},
           "run_conf": {"model": model}}
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(cfg))
    assert silogen.cmd("dpo", [str(tmp_path / "dpo.yaml")]) == 0
    assert (out / "checkpoint-final" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "run_summary.json").read_text())["global_step"] == 1


def test_commands_are_routed_from_the_fmtune_cli(tmp_path):
    """`fmtune sft|dpo CONFIG.yaml` reach this module; `fmtune dpo preview` stays the dpo
    plugin's sub-command."""
    from fmtune.testing import run_cli

    missing = tmp_path / "nope.yaml"
    for kind in ("sft", "dpo"):
        res = run_cli([kind, str(missing)])
        assert res.exit_code == 2 and f"{missing}: config file not found" in res.stderr
    res = run_cli(["dpo", "preview", "--help"])
    assert res.exit_code == 0 and res.stdout.startswith("usage: fmtune dpo preview")


# ------------------------------------------------------------------- generate
# Silogen's `generate CONFIG.yaml OUTPUT.yaml` (finetuning.generate): `fmtune generate` with two
# positional YAML paths.

def _gen(tmp_path, cfg, name="gen.yaml"):
    from fmtune.testing import run_cli

    path, out = tmp_path / name, tmp_path / "generated.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return run_cli(["generate", str(path), str(out)]), path, out


def _fmtune_generate(tmp_path, model, texts, max_new_tokens, base=None):
    """What `fmtune generate` (fmtune's own, greedy) answers for ``texts``."""
    from fmtune.testing import run_cli

    prompts, out = tmp_path / "prompts.json", tmp_path / "fmtune_out.json"
    prompts.write_text(json.dumps(texts))
    argv = ["generate", "--model", model, "--text_file", str(prompts), "--max_new_tokens",
            str(max_new_tokens), "--out_file", str(out)]
    res = run_cli(argv + (["--base_model_name_or_path", base] if base else []))
    assert res.exit_code == 0, res.stderr
    return [r["output"] for r in json.loads(out.read_text())]


def test_generate_open_input_writes_silogens_records(tmp_path, fmtune_tiny_model):
    from transformers import AutoTokenizer

    prompt = "translate: the red cat sees a dog ="
    res, _, out = _gen(tmp_path, {
        "model_conf": {"model": fmtune_tiny_model},
        "prompt_conf": {"type": "open-input", "input": prompt, "num_samples": 2},
        "hf_gen_params": {"max_new_tokens": 5, "do_sample": False}})
    assert res.exit_code == 0, res.stderr
    assert f"wrote 2 generations to {out}" in res.stdout
    records = yaml.safe_load(out.read_text())
    assert isinstance(records, list) and len(records) == 2
    expected = _fmtune_generate(tmp_path, fmtune_tiny_model, [prompt], 5)[0]
    tok = AutoTokenizer.from_pretrained(fmtune_tiny_model)
    for i, rec in enumerate(records):
        assert tuple(rec) == silogen.GEN_OUTPUT_KEYS
        assert rec["dataset"] == rec["data_collection"] == "_open_prompt_data_"
        assert rec["id"] == str(i) and rec["prompt"] == prompt
        assert rec["answer"] == expected  # greedy: what `fmtune generate` gives
        assert rec["correct_answers"] == [""] and rec["test_type"] == "open-ended"
        assert rec["truncated"] is False and rec["all_text_raw"].startswith(prompt)
        assert rec["gen_params"] == {
            "max_new_tokens": 5, "do_sample": False, "eos_token_id": [tok.eos_token_id],
            "pad_token_id": tok.pad_token_id, "bos_token_id": None, "max_length": 2048,
            "quant_conf": {},
            "model_conf": {"model": fmtune_tiny_model, "tokenizer": fmtune_tiny_model}}
    assert "&id" not in out.read_text()  # each record's gen_params written out


def test_generate_cuts_prompts_to_max_length_minus_max_new_tokens(tmp_path, fmtune_tiny_model):
    prompt = "translate: the red cat sees a dog = le chat rouge voit un chien"
    res, _, out = _gen(tmp_path, {
        "model_conf": {"model": fmtune_tiny_model},
        "prompt_conf": {"type": "open-input", "input": prompt},
        "hf_gen_params": {"max_length": 8, "max_new_tokens": 3}})
    assert res.exit_code == 0, res.stderr
    (rec,) = yaml.safe_load(out.read_text())
    assert rec["truncated"] is True and rec["prompt"] == prompt  # Silogen keeps the full text
    assert not rec["all_text_raw"].startswith(prompt)


def test_generate_eval_data_with_adapter_and_chat_template(tmp_path, fmtune_tiny_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(3)  # a random adapter, so that it changes the answers
    model = AutoModelForCausalLM.from_pretrained(fmtune_tiny_model)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                     init_lora_weights=False)).save_pretrained(tmp_path / "lora")
    tok = AutoTokenizer.from_pretrained(fmtune_tiny_model)  # the same, with a chat template
    tok.chat_template = CHAT_ML
    tok.save_pretrained(tmp_path / "tok")
    data = write_jsonl(tmp_path / "eval.jsonl", [
        {"dataset": "demo", "id": "q1", "response": "le chat",
         "prompt_messages": [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": "translate: the red cat"}]},
        {"response": "un chien", "prompt_messages": [
            {"role": "user", "content": "translate: a dog", "tags": []}]}])
    res, _, out = _gen(tmp_path, {
        "model_conf": {"model": fmtune_tiny_model, "adapter": str(tmp_path / "lora"),
                       "tokenizer": str(tmp_path / "tok"), "model_args": {"dtype": "float32"}},
        "prompt_conf": {"type": "eval-data", "data": {"path": data}},
        "hf_gen_params": {"max_new_tokens": 4}})
    assert res.exit_code == 0, res.stderr
    records = yaml.safe_load(out.read_text())
    prompts = [tok.apply_chat_template([{"role": "system", "content": "be brief"},
                                        {"role": "user", "content": "translate: the red cat"}],
                                       tokenize=False, add_generation_prompt=True),
               tok.apply_chat_template([{"role": "user", "content": "translate: a dog"}],
                                       tokenize=False, add_generation_prompt=True)]
    assert [r["prompt"] for r in records] == prompts
    assert [(r["dataset"], r["id"], r["correct_answers"]) for r in records] == [
        ("demo", "q1", ["le chat"]), ("unknown", 1, ["un chien"])]
    with_adapter = _fmtune_generate(tmp_path, str(tmp_path / "lora"), prompts, 4,
                                    base=fmtune_tiny_model)
    assert [r["answer"] for r in records] == with_adapter
    assert with_adapter != _fmtune_generate(tmp_path, fmtune_tiny_model, prompts, 4)
    assert records[0]["gen_params"]["model_conf"] == {
        "model": fmtune_tiny_model, "adapter": str(tmp_path / "lora"),
        "tokenizer": str(tmp_path / "tok"),
        "model_args": {"dtype": "float32", "device_map": "auto"}}


def test_plan_generate_reads_silogens_docstring_example():
    p = silogen.plan_generate(yaml.safe_load("""\
prompt_conf:
  type: "eval-data"
  data:
    path: "/datasets/illy_qa_data_topk_2_evalfmt.jsonl"
hf_gen_params:
  max_length: 2048
  max_new_tokens: 512
  do_sample: false
quant_conf:
  quantization_type: "bits-and-bytes"
  load_in_4bit: true
  bnb_4bit_compute_dtype: bfloat16
  bnb_4bit_quant_type: "nf4"
model_conf:
  model: "/models/Poro-34B"
  adapter: "/experiments/SDX-359/poro-v1-D/checkpoint-3000"
  model_args:
    attn_implementation: "flash_attention_2"
    use_cache: False
    device_map: {'transformer.word_embeddings': 0, 'lm_head': 0, 'transformer.h.0': 1}
"""), "gen.yaml")
    assert p.tokenizer == p.adapter == "/experiments/SDX-359/poro-v1-D/checkpoint-3000"
    assert p.load == {"attn_implementation": "flash_attention_2", "use_cache": False,
                      "device_map": {"transformer.word_embeddings": 0, "lm_head": 0,
                                     "transformer.h.0": 1}}
    assert p.quant == {"load_in_4bit": True, "bnb_4bit_compute_dtype": "bfloat16",
                       "bnb_4bit_quant_type": "nf4"}
    assert p.prompt == {"type": "eval-data",
                        "path": "/datasets/illy_qa_data_topk_2_evalfmt.jsonl"}


GEN_BASE = {"model_conf": {"model": "MODEL"},
            "prompt_conf": {"type": "open-input", "input": "translate:"}}


@pytest.mark.parametrize("path,value,message", [
    ("prompt_confs", {}, "prompt_confs: unknown key (did you mean 'prompt_conf'?)"),
    ("prompt_conf.type", "eval", "prompt_conf.type: must be one of open-input, eval-data"),
    ("prompt_conf.data", {"path": "x.jsonl"}, "prompt_conf.data: unknown key"),
    ("prompt_conf.num_samples", 0, "prompt_conf.num_samples: must be a positive integer"),
    ("hf_gen_params.max_new_token", 4, "hf_gen_params.max_new_token: not a GenerationConfig "
     "field of the installed transformers (did you mean 'max_new_tokens'?)"),
    ("hf_gen_params.max_length", 100, "hf_gen_params.max_length: must be larger than "
     "max_new_tokens"),
    ("model_conf.model_args.revision", "v2", "model_conf.model_args.revision: 'v2' is not "
     "supported"),
    ("model_conf.adapters", "a", "model_conf.adapters: unknown key (did you mean 'adapter'?)"),
    ("quant_conf", {"quantization_type": "no-quantization", "load_in_4bit": True},
     "quant_conf.load_in_4bit: only with quantization_type: bits-and-bytes"),
    ("quant_conf", {"load_in_4bit": True, "load_in_8bit": True}, "quant_conf.load_in_4bit: set "
     "exactly one of load_in_4bit and load_in_8bit"),
    ("quant_conf", {"quantization_type": "bits-and-bytes"}, "quant_conf.load_in_4bit: set "
     "exactly one of load_in_4bit and load_in_8bit"),
])
def test_generate_config_errors_are_one_line_exit_2(tmp_path, fmtune_tiny_model, path, value,
                                                    message):
    base = json.loads(json.dumps(GEN_BASE).replace("MODEL", fmtune_tiny_model))
    res, cfg, out = _gen(tmp_path, _with(path, value, base))
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines()[-1].startswith(f"fmtune: error: {cfg}: {message}")
    assert not out.exists()


@pytest.mark.parametrize("params,message", [
    ({"temperature": -1.0, "do_sample": True}, "hf_gen_params.temperature: `temperature` "
     "(=-1.0) has to be a strictly positive float"),
    ({"top_k": -3, "do_sample": True}, "hf_gen_params.top_k: `top_k` has to be a strictly "
     "positive integer, but is -3"),
    ({"top_p": "most", "do_sample": True}, "hf_gen_params.top_p: must be a number, got 'most'"),
    ({"repetition_penalty": -2.0}, "hf_gen_params.repetition_penalty: `penalty` has to be a "
     "strictly positive float"),
    ({"num_return_sequences": 3}, "hf_gen_params: Greedy methods (do_sample != True) without "
     "beam search do not support `num_return_sequences` different than 1"),
    ({"early_stopping": "soon"}, "hf_gen_params: `early_stopping` must be a boolean or 'never'"),
])
def test_generation_params_transformers_refuses_are_one_line_before_loading(
        tmp_path, fmtune_tiny_model, monkeypatch, params, message):
    """What transformers' GenerationConfig or generate() would refuse with a traceback is one
    line naming the file and hf_gen_params, before the tokenizer or the model loads."""
    def no_load(*a, **k):
        raise AssertionError("loaded something")

    monkeypatch.setattr(silogen, "_load_generation_tokenizer", no_load)
    monkeypatch.setattr(silogen, "_load_generation_model", no_load)
    base = json.loads(json.dumps(GEN_BASE).replace("MODEL", fmtune_tiny_model))
    res, cfg, out = _gen(tmp_path, {**base, "hf_gen_params": params})
    assert res.exit_code == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(f"fmtune: error: {cfg}: {message}")
    assert "Traceback" not in res.stderr and not out.exists()


def test_generation_params_greedy_ignores_sampling_values():
    """As in transformers (and Silogen), greedy generation never builds the sampling warpers:
    ``temperature: 0`` with ``do_sample: false`` (or unset) is accepted."""
    for params in ({"temperature": 0.0, "do_sample": False}, {"temperature": 0.0},
                   {"top_p": 0.9, "temperature": 0.7, "do_sample": True}):
        p = silogen.plan_generate({**GEN_BASE, "hf_gen_params": params}, "gen.yaml",
                                  silogen.generation_field_names())
        assert p.hf_gen_params == params


def test_generate_data_errors_name_the_record_and_write_nothing(tmp_path, fmtune_tiny_model):
    data = write_jsonl(tmp_path / "eval.jsonl", [
        {"prompt_messages": [{"role": "user", "content": "hi"}], "response": "a"},
        {"prompt_messages": [{"role": "user", "content": "hi"}]}])
    cfg = {"model_conf": {"model": fmtune_tiny_model},
           "prompt_conf": {"type": "eval-data", "data": {"path": data}}}
    res, _, out = _gen(tmp_path, cfg)
    assert res.exit_code == 2 and f"{data}:2: missing field 'response'" in res.stderr
    assert not out.exists()
    write_jsonl(data, [{"prompt_messages": [{"role": "user", "content": "hi"}],
                        "response": "a"}])
    res, cfg_path, out = _gen(tmp_path, cfg)  # the tiny tokenizer has no chat template
    assert res.exit_code == 2 and f"{cfg_path}: prompt_conf.type: eval-data renders " \
        "prompt_messages with the tokenizer's chat template" in res.stderr
    assert not out.exists()


def test_generate_routing(tmp_path):
    """`fmtune generate CONFIG.yaml OUTPUT.yaml` is Silogen's; `fmtune generate --model ...`
    stays fmtune's own."""
    from fmtune.testing import run_cli

    missing = tmp_path / "nope.yaml"
    res = run_cli(["generate", str(missing), str(tmp_path / "out.yaml")])
    assert res.exit_code == 2 and f"{missing}: config file not found" in res.stderr
    res = run_cli(["generate", "--help"])
    assert res.exit_code == 0 and "--model" in res.stdout


def test_generate_on_a_bitsandbytes_4bit_base(tmp_path, fmtune_tiny_model):
    pytest.importorskip("bitsandbytes")
    quant = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
             "bnb_4bit_compute_dtype": "float32"}  # no quantization_type: Silogen reads bnb
    res, _, out = _gen(tmp_path, {
        "model_conf": {"model": fmtune_tiny_model},
        "prompt_conf": {"type": "open-input", "input": "translate: the red cat"},
        "hf_gen_params": {"max_new_tokens": 3}, "quant_conf": quant})
    assert res.exit_code == 0, res.stderr
    (rec,) = yaml.safe_load(out.read_text())
    assert rec["gen_params"]["quant_conf"] == quant and isinstance(rec["answer"], str)
