"""Multi-process training: real 2-process runs on CPU (DDP over gloo), the launch shortcut,
torchrun, rank-0-only writing, and the FSDP configuration that can be checked without GPUs.

Tolerance of the 1-process vs 2-process comparison: the same 4 examples make each optimizer
step (1 process x 4, or 2 processes x 2 in the same order: accelerate's seedable sampler
gives every rank the same permutation and the ranks take alternate batches of it), and
transformers divides every rank's loss by the token count of the whole global batch, so
the two runs compute the same sums in a different order (two partial sums and an
all-reduce). Measured here: per-step losses agree to ~1e-7 relative, weights after 4 Adam
steps to ~5e-6; the test allows 1e-5 relative on losses and 1e-4 absolute on weights
(a tenth of one step's learning rate).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fmtune.config import ConfigError
from fmtune.testing import DEMO_RECORDS, run_cli, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FSDP_YAML = os.path.join(ROOT, "examples", "accelerate", "fsdp.yaml")
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64)


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", DEMO_RECORDS * 2)  # 16 records


def train_args(model, data, out, per_device, *extra):
    return ["train", "--model_name_or_path", model, "--training_data_path", data,
            "--output_dir", str(out), "--per_device_train_batch_size", str(per_device),
            "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no",
            "--max_steps", "4", *extra]


def run(cmd, cwd):
    """A real launcher run in a child process; its output is returned for the assertions."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def logs(out):
    with open(os.path.join(out, "training_logs.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out):
    return [(r["data"]["step"], r["data"]["value"]) for r in logs(out)
            if r["name"] == "training_loss"]


def files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder)
                  for d, _, fs in os.walk(folder) for f in fs)


def summary(out):
    return json.loads((out / "run_summary.json").read_text())


def same_losses(one, two):
    assert [s for s, _ in two] == [s for s, _ in one] == [1, 2, 3, 4]
    assert [v for _, v in two] == pytest.approx([v for _, v in one], rel=1e-5)


# ------------------------------------------------------------ 2 real processes


def test_two_processes_match_one_with_the_same_global_batch(fmtune_tiny_model, data, tmp_path):
    """`fmtune train --num_processes 2` (the shortcut through accelerate launch) against one
    process with the same global batch of 4."""
    one, two = tmp_path / "one", tmp_path / "two"
    res = run_cli(train_args(fmtune_tiny_model, data, one, 4))
    assert res.exit_code == 0, res.stderr
    proc = run([sys.executable, "-m", "fmtune.cli",
                *train_args(fmtune_tiny_model, data, two, 2, "--num_processes", "2")], tmp_path)
    assert "launching: accelerate launch" in proc.stderr

    same_losses(losses(one), losses(two))
    s1, s2 = summary(one), summary(two)
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    assert s2["train_tokens"] == s1["train_tokens"]  # counted over both ranks
    assert s2["global_step"] == 4 and s2["final_loss"] == pytest.approx(s1["final_loss"], rel=1e-5)
    # rank 0 alone writes: the same files as the 1-process run, each line once
    assert files(two) == files(one)
    assert len(logs(two)) == len(logs(one)) == 4
    assert proc.stdout.count("fmtune: done in") == 1 and "world size 2" in proc.stdout
    assert proc.stderr.count("train.jsonl: 16 examples") == 1  # rank 1 logs warnings only
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-4)


def test_torchrun_lora_adapter_holds_every_layer_and_one_tracker_run(fmtune_tiny_model, data,
                                                                     tmp_path):
    """`torchrun -m fmtune.cli train` with LoRA and the MLflow tracker: the adapter saved by
    rank 0 has every lora_A/lora_B of every layer (the same tensors as a 1-process run) and
    MLflow holds one run with one point per step."""
    from mlflow import MlflowClient

    extra = ("--plugins", "lora,mlflow", "--lora_dropout", "0", "--target_modules",
             "q_proj,v_proj")
    one, two = tmp_path / "one", tmp_path / "two"
    store1, store2 = tmp_path / "mlruns1", tmp_path / "mlruns2"
    res = run_cli(train_args(fmtune_tiny_model, data, one, 4, *extra,
                             "--mlflow_tracking_uri", f"file:{store1}"))
    assert res.exit_code == 0, res.stderr
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "fmtune.cli", *train_args(fmtune_tiny_model, data, two, 2, *extra,
                                         "--mlflow_tracking_uri", f"file:{store2}")], tmp_path)

    same_losses(losses(one), losses(two))
    assert summary(two)["world_size"] == 2
    a1 = load_file(one / "adapter_model.safetensors")
    a2 = load_file(two / "adapter_model.safetensors")
    layers = 2  # fmtune_tiny_model
    expected = {f"base_model.model.model.layers.{i}.self_attn.{m}.{ab}.weight"
                for i in range(layers) for m in ("q_proj", "v_proj") for ab in ("lora_A", "lora_B")}
    assert set(a2) == set(a1) == expected
    for name in a1:
        assert a2[name].shape == a1[name].shape and a2[name].abs().sum() > 0
        torch.testing.assert_close(a2[name], a1[name], rtol=0, atol=1e-4)
    assert files(two) == files(one)

    client = MlflowClient(tracking_uri=store2.as_uri())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    points = sorted(client.get_metric_history(runs[0].info.run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in points] == losses(two)  # the same floats
    assert runs[0].data.params["plugin.mlflow"]


# ------------------------------------------------------- launch options, errors


def test_num_processes_must_match_the_launcher(fmtune_tiny_model, data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    res = run_cli(train_args(fmtune_tiny_model, data, tmp_path / "out", 2, "--num_processes", "3"))
    assert res.exit_code == 2
    assert res.stderr.strip() == (
        "fmtune: error: num_processes=3 but the launcher started WORLD_SIZE=2 processes: under "
        "accelerate launch/torchrun leave num_processes unset or make them agree")
    assert not (tmp_path / "out").exists()


def test_bad_launch_options_fail_before_anything_runs(fmtune_tiny_model, data, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: NOT_A_TYPE\nnum_processes: 2\n")
    cases = [
        (["--num_processes", "0"], "fmtune: error: invalid config: num_processes must be >= 1, got 0"),
        (["--accelerate_config", str(tmp_path / "missing.yaml")],
         f"fmtune: error: invalid config: accelerate_config: {tmp_path / 'missing.yaml'} not found"),
        (["--accelerate_config", str(bad)],
         f"fmtune: error: accelerate_config {bad}: not a valid accelerate config: "),
        (["--accelerate_config", FSDP_YAML],
         f"fmtune: error: accelerate_config {FSDP_YAML}: distributed_type FSDP needs GPUs and "
         "this machine has none (--num_processes N alone runs DDP on CPU); FSDP2 "
         "(fsdp_version: 2) runs on CPU"),
    ]
    for extra, message in cases:
        res = run_cli(train_args(fmtune_tiny_model, data, tmp_path / "out", 2, *extra))
        assert res.exit_code == 2, (extra, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), (extra, res.stderr)
    assert not (tmp_path / "out").exists()


def test_fsdp1_under_a_launcher_on_cpu_is_a_one_line_error(fmtune_tiny_model, data, tmp_path,
                                                           monkeypatch):
    """What `accelerate launch --config_file fsdp.yaml` (FSDP1) gives each process, on a CPU
    machine: torch's FSDP1 refuses a CPU device ("Inconsistent compute device and `device_id`
    on rank 0: cpu vs cpu:0"), so fmtune refuses it first, in one line."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    res = run_cli(train_args(fmtune_tiny_model, data, tmp_path / "out", 2))
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [
        "fmtune: error: FSDP needs GPUs and this machine has none for FSDP1 (accelerate_config / "
        "accelerate launch --config_file with distributed_type FSDP, fsdp_version 1: torch's "
        "FSDP1 refuses a CPU device); fsdp_version: 2 runs on CPU over gloo, and without FSDP "
        "the same command runs DDP on CPU"]
    assert not (tmp_path / "out").exists()


FSDP2_CPU_YAML = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
mixed_precision: 'no'
use_cpu: true
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_sync_module_states: false
"""


def test_fsdp2_on_cpu_sharded_checkpoint_resumes_on_another_process_count(fmtune_tiny_model,
                                                                         data, tmp_path):
    """FSDP2 over gloo: 2 processes train 2 steps and write a SHARDED_STATE_DICT checkpoint
    (torch.distributed.checkpoint shards, one per rank); 1 process resumes it to step 4. The
    final weights equal a 1-process run of 4 steps with the same global batch of 4 (same
    tolerance as the DDP comparison above), and the final model is one full checkpoint that
    from_pretrained loads."""
    from transformers import AutoModelForCausalLM

    acc = tmp_path / "fsdp2-cpu.yaml"
    acc.write_text(FSDP2_CPU_YAML)
    common = ("--total_train_batch_size", "4", "--lr_scheduler_type", "constant", "--seed", "0",
              "--use_cpu", "true")
    two, resumed, one = tmp_path / "two", tmp_path / "resumed", tmp_path / "one"
    first = train_args(fmtune_tiny_model, data, two, 2, *common, "--accelerate_config", str(acc))
    first[first.index("--max_steps") + 1] = "2"
    first[first.index("--save_strategy") + 1] = "steps"
    proc = run([sys.executable, "-m", "fmtune.cli", *first, "--save_steps", "2"], tmp_path)
    assert "FSDP2 on CPU (gloo)" in proc.stderr
    ckpt = two / "checkpoint-2"
    assert sorted(os.listdir(ckpt / "pytorch_model_fsdp_0")) == [".metadata", "__0_0.distcp",
                                                                 "__1_0.distcp"]
    assert not (ckpt / "model.safetensors").exists()  # sharded: no full copy in the checkpoint
    assert summary(two)["world_size"] == 2

    proc = run([sys.executable, "-m", "fmtune.cli",
                *train_args(fmtune_tiny_model, data, resumed, 4, *common, "--accelerate_config",
                            str(acc), "--num_processes", "1", "--resume_from_checkpoint",
                            str(ckpt))], tmp_path)
    assert f"resuming from {ckpt}" in proc.stderr
    s = summary(resumed)
    assert (s["world_size"], s["global_step"], s["resumed_from"]) == (1, 4, str(ckpt))
    res = run_cli(train_args(fmtune_tiny_model, data, one, 4, *common[2:]))
    assert res.exit_code == 0, res.stderr
    assert [v for _, v in losses(resumed)] == pytest.approx([v for _, v in losses(one)][2:],
                                                            rel=1e-5)
    w1, wr = load_file(one / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert w1.keys() == wr.keys()
    base = load_file(os.path.join(fmtune_tiny_model, "model.safetensors"))
    assert max((w1[k] - base[k]).abs().max().item() for k in w1) > 1e-3  # it did train
    for name in w1:
        torch.testing.assert_close(wr[name], w1[name], rtol=0, atol=1e-4)
    model = AutoModelForCausalLM.from_pretrained(resumed)  # a full, ordinary checkpoint
    assert {k for k in model.state_dict()} >= set(w1)


def _accelerate_args(cmd):
    """What accelerate's own launcher makes of the command fmtune builds."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(cmd[3:])
    return _validate_launch_command(args)[0]


def test_launch_command_runs_n_processes_through_accelerate(tmp_path):
    from fmtune.distributed import launch_command

    class Cfg(dict):
        get = dict.get

    cmd, env = launch_command(Cfg(num_processes=2), ["--config", "run.yaml"])
    args = _accelerate_args(cmd)
    # the torchrun launcher (accelerate's "multi_gpu" one runs on CPU too; its --cpu
    # launcher would start a single process), 2 processes, a free port
    assert args.multi_gpu and not args.cpu and args.num_processes == 2
    assert args.main_process_port == 0 and args.module
    assert (args.training_script, args.training_script_args) == (
        "fmtune.cli", ["train", "--config", "run.yaml"])

    # an accelerate config of type MULTI_CPU is also started as N processes, on CPU
    cpu = tmp_path / "cpu.yaml"
    cpu.write_text(yaml.safe_dump({"compute_environment": "LOCAL_MACHINE",
                                   "distributed_type": "MULTI_CPU", "num_machines": 1,
                                   "num_processes": 2, "use_cpu": True, "mixed_precision": "no"}))
    cmd, env = launch_command(Cfg(accelerate_config=str(cpu)), [])
    args = _accelerate_args(cmd)
    assert args.multi_gpu and args.num_processes == 2 and env["ACCELERATE_USE_CPU"] == "true"

    # --num_processes overrides the file's count
    cmd, _ = launch_command(Cfg(accelerate_config=str(cpu), num_processes=3), [])
    assert _accelerate_args(cmd).num_processes == 3


# --------------------------------------------------------------------- FSDP


def _tiny(config_cls):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config_cls(**TINY))


@pytest.mark.parametrize("name", ["Llama", "Granite", "Mistral"])
def test_fsdp_wraps_the_decoder_layer_class(name):
    import transformers
    from peft import LoraConfig, get_peft_model

    from fmtune.distributed import fsdp_layer_classes

    model = _tiny(getattr(transformers, f"{name}Config"))
    assert fsdp_layer_classes(model) == [f"{name}DecoderLayer"]
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert fsdp_layer_classes(peft_model) == [f"{name}DecoderLayer"]


def test_fsdp_layer_class_missing_is_a_clear_error():
    from fmtune.distributed import fsdp_layer_classes

    with pytest.raises(ConfigError, match=r"^FSDP TRANSFORMER_BASED_WRAP: Sequential names no "
                                          r"decoder layer class .*set "
                                          r"fsdp_transformer_layer_cls_to_wrap"):
        fsdp_layer_classes(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_fsdp_yaml_through_accelerate_and_the_wrap_policy(monkeypatch):
    """examples/accelerate/fsdp.yaml as accelerate launch turns it into each process's
    environment; fmtune then names the decoder layer, and the transformer wrap policy built
    from that name wraps exactly the model's decoder layers."""
    from accelerate.utils import prepare_multi_gpu_env
    from accelerate.utils.dataclasses import get_module_class_from_name  # what its FSDP plugin uses
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers import LlamaConfig

    from fmtune.distributed import prepare_fsdp

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_YAML,
           "--num_processes", "2", "--main_process_port", "0", "-m", "fmtune.cli", "train"]
    args = _accelerate_args(cmd)
    assert args.use_fsdp
    env = prepare_multi_gpu_env(args)
    assert {k: env[k] for k in ("ACCELERATE_USE_FSDP", "FSDP_SHARDING_STRATEGY",
                                "FSDP_AUTO_WRAP_POLICY", "FSDP_STATE_DICT_TYPE",
                                "FSDP_USE_ORIG_PARAMS")} == {
        "ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT", "FSDP_USE_ORIG_PARAMS": "true"}
    assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env  # left to fmtune
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)

    model = _tiny(LlamaConfig)
    assert prepare_fsdp(model) == ["LlamaDecoderLayer"]
    assert os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaDecoderLayer"
    classes = {get_module_class_from_name(model, n)
               for n in os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(",")}
    wrapped = [n for n, m in model.named_modules()
               if transformer_auto_wrap_policy(m, False, 0, transformer_layer_cls=classes)]
    assert wrapped == ["model.layers.0", "model.layers.1"]

    # a class named in the config is kept
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaMLP")
    assert prepare_fsdp(model) is None
    assert os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaMLP"


def test_a_sharded_checkpoint_is_complete_only_with_its_dcp_metadata(tmp_path):
    """FSDP SHARDED_STATE_DICT checkpoints hold torch.distributed.checkpoint folders, no
    weights file: complete (resumable) when every folder has its shards and the .metadata
    DCP writes last; one cut short while saving is skipped with the reason."""
    from fmtune.pipeline import checkpoint_problem, newest_complete_checkpoint

    def checkpoint(step, metadata=(True, True)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        for name, meta in zip(("pytorch_model_fsdp_0", "optimizer_0"), metadata):
            (folder / name).mkdir()
            (folder / name / "__0_0.distcp").write_bytes(b"x")
            (folder / name / "__1_0.distcp").write_bytes(b"x")
            if meta:
                (folder / name / ".metadata").write_bytes(b"meta")
        return folder

    assert checkpoint_problem(checkpoint(2)) is None
    assert checkpoint_problem(checkpoint(4, (True, False))) == \
        "optimizer_0/.metadata missing (cut short while saving)"
    assert checkpoint_problem(checkpoint(6, (False, True))) == \
        "pytorch_model_fsdp_0/.metadata missing (cut short while saving)"
    assert newest_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    empty = tmp_path / "checkpoint-8"
    empty.mkdir()
    (empty / "trainer_state.json").write_text(json.dumps({"global_step": 8}))
    assert checkpoint_problem(empty) == "no model weights"
