"""Every example command of the documents fmtune replaces (../shared/seeds: fms-hf-tuning's
README, older README and docs/training.md, its inference script), typed with only the command
name changed (`python tuning/sft_trainer.py` / `python -m tuning.sft_trainer` -> `fmtune train`,
`python scripts/run_inference.py` -> `fmtune generate`, `accelerate launch ... tuning/sft_trainer.py`
-> `accelerate launch ... -m fmtune.cli train`) on tiny local models and data in the documented
shapes. Paths become local files; epochs are cut to 1 (gpt-oss: as written); every other flag is
kept as written.

docs/seed-commands.md is generated from SEEDS (FMTUNE_WRITE_DOCS=1 rewrites it; the test fails
when it drifts), with the result each command gets here. Silogen's commands are run by
tests/test_silogen.py; the rows below point there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fmtune.testing import check_generated, run_cli, write_jsonl

DOC = Path(__file__).resolve().parents[1] / "docs" / "seed-commands.md"

GRANITE_TEMPLATE = (
    "{%- for message in messages %}<|start_of_role|>{{ message['role'] }}<|end_of_role|>"
    "{{ message['content'] }}<|end_of_text|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{%- endif %}")
HARMONY_TEMPLATE = (
    "{%- for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>"
    "{%- endfor %}{%- if add_generation_prompt %}<|start|>assistant{%- endif %}")
# the fms README's two templates, as bash passes them (backslash-newline inside double quotes
# is removed by the shell; `\n` stays two characters)
NESTED_TEMPLATE = (
    "{% for message in messages['messages'] %}"
    "  {% if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + eos_token }}"
    "  {% elif message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + "
    "eos_token }}"
    "  {% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n'  + message['content'] + "
    "eos_token }}"
    "  {% endif %}"
    "  {% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}"
    "  {% endif %}"
    "{% endfor %}")
FLAT_TEMPLATE = (
    "{%- for message in messages %}"
    "  {%- if message['role'] == 'system' %}"
    "  {{- '<|system|>\\n' + message['content'] + '\\n' }}"
    "  {%- elif message['role'] == 'user' %}"
    "  {{- '<|user|>\\n' + message['content'] + '\\n' }}"
    "  {%- elif message['role'] == 'assistant' %}"
    "  {%- if not loop.last %}"
    "  {{- '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}"
    "  {%- else %}"
    "  {{- '<|assistant|>\\n'  + message['content'] + eos_token }}"
    "  {%- endif %}"
    "  {%- endif %}"
    "  {%- if loop.last and add_generation_prompt %}"
    "  {{- '<|assistant|>\\n' }}"
    "  {%- endif %}"
    "{%- endfor %}")

COMMON = ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
          "--gradient_accumulation_steps", "4"]
SCHEDULE = ["--save_strategy", "epoch", "--learning_rate", "1e-5", "--weight_decay", "0.",
            "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1",
            "--include_tokens_per_second", "--packing", "False"]
GRANITE_TURNS = ["--instruction_template", "<|start_of_role|>user<|end_of_role|>",
                 "--response_template", "<|start_of_role|>assistant<|end_of_role|>"]


def seed(where, what, argv, result="trains", **kw):
    return {"where": where, "what": what, "argv": argv, "result": result, **kw}


# {model} {granite} {gptoss}: tiny models; {data:NAME}: data files; {out}: the output folder
SEEDS = [
    seed("README §1.1; training.md 1", "single sequence + response template",
         ["train", "--model_name_or_path", "{model}", "--tokenizer_name_or_path", "{model}",
          "--training_data_path", "{data:response}", "--output_dir", "{out}",
          "--num_train_epochs", "1", "--per_device_train_batch_size", "4",
          "--gradient_accumulation_steps", "4", "--learning_rate", "1e-5",
          "--response_template", "\\n### Response:", "--dataset_text_field", "output"]),
    seed("older README, training.md: single GPU", "the full single-GPU command",
         ["train", "--model_name_or_path", "{model}", "--training_data_path", "{data:label}",
          "--output_dir", "{out}", "--num_train_epochs", "1", *COMMON,
          "--evaluation_strategy", "no", *SCHEDULE, "--response_template", "\\n### Label:",
          "--dataset_text_field", "output"], plugins=["data_handlers"]),
    seed("README §1.2; training.md 2", "data_formatter_template (typo fixed)",
         ["train", "--model_name_or_path", "{model}", "--tokenizer_name_or_path", "{model}",
          "--training_data_path", "{data:io_json}", "--output_dir", "{out}",
          "--num_train_epochs", "1", "--per_device_train_batch_size", "4",
          "--gradient_accumulation_steps", "4", "--learning_rate", "1e-5",
          "--response_template", "\\n## Label:",
          "--data_formatter_template", "### Input: {{input}} \\n\\n## Label: {{output}}"]),
    seed("training.md 2, as printed", "`--data_formatter_template:` (stray colon)",
         ["train", "--model_name_or_path", "{model}", "--training_data_path", "{data:io_json}",
          "--output_dir", "{out}", "--response_template", "\\n## Label:",
          "--data_formatter_template:", "### Input: {{input}} \\n\\n## Label: {{output}}"],
         result="exit 2: unknown option 'data_formatter_template:' (did you mean "
                "'data_formatter_template'?)"),
    seed("README §2", "input/output records, no template",
         ["train", "--model_name_or_path", "{model}", "--training_data_path", "{data:io_jsonl}",
          "--output_dir", "{out}", "--num_train_epochs", "1"]),
    seed("README §3", "chat data, the model's chat template, instruction/response templates",
         ["train", "--model_name_or_path", "{granite}", "--training_data_path", "{data:chat}",
          "--output_dir", "{out}", "--num_train_epochs", "1", *GRANITE_TURNS],
         plugins=["data_handlers"]),
    seed("README §3", "chat data and the model's chat template, no other flag",
         ["train", "--model_name_or_path", "{granite}", "--training_data_path", "{data:chat}",
          "--output_dir", "{out}", "--num_train_epochs", "1"], plugins=["data_handlers"]),
    seed("README §3, aligning formats", "--chat_template iterating messages['messages']",
         ["train", "--model_name_or_path", "{model}", "--training_data_path", "{data:chat}",
          "--output_dir", "{out}", "--num_train_epochs", "1", "--chat_template", NESTED_TEMPLATE,
          "--instruction_template", "<|user|>", "--response_template", "<|assistant|>"],
         plugins=["data_handlers"]),
    seed("README §3, aligning formats", "--chat_template iterating messages",
         ["train", "--model_name_or_path", "{model}", "--training_data_path", "{data:chat}",
          "--output_dir", "{out}", "--num_train_epochs", "1", "--chat_template", FLAT_TEMPLATE,
          "--instruction_template", "<|user|>", "--response_template", "<|assistant|>"],
         plugins=["data_handlers"]),
    seed("README §3", "--dataset_conversation_field conversations",
         ["train", "--model_name_or_path", "{granite}", "--training_data_path",
          "{data:conversations}", "--output_dir", "{out}", "--num_train_epochs", "1",
          "--dataset_conversation_field", "conversations", *GRANITE_TURNS],
         plugins=["data_handlers"]),
    seed("README, add special tokens", "--add_special_tokens, space-separated",
         ["train", "--model_name_or_path", "{granite}", "--training_data_path", "{data:chat}",
          "--output_dir", "{out}", "--num_train_epochs", "1", "--add_special_tokens",
          "<|start_of_role|>", "<|end_of_role|>", *GRANITE_TURNS],
         plugins=["data_handlers"], special=["<|start_of_role|>", "<|end_of_role|>"]),
    seed("README §4", "pretokenized .arrow file",
         ["train", "--model_name_or_path", "{model}", "--training_data_path", "{data:arrow}",
          "--output_dir", "{out}", "--num_train_epochs", "1"], plugins=["data_handlers"]),
    seed("older README: LoRA", "the LoRA command (+ --target_modules q_proj v_proj k_proj "
         "o_proj)",
         ["train", "--model_name_or_path", "{model}", "--training_data_path", "{data:label}",
          "--output_dir", "{out}", "--num_train_epochs", "1", *COMMON,
          "--save_strategy", "epoch", "--learning_rate", "1e-4", "--weight_decay", "0.",
          "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1",
          "--include_tokens_per_second", "--packing", "False", "--response_template",
          "\\n### Label:", "--dataset_text_field", "output", "--use_flash_attn", "False",
          "--tokenizer_name_or_path", "{model}", "--torch_dtype", "float32",
          "--peft_method", "lora", "--logging_strategy", "epoch", "--r", "8",
          "--lora_dropout", "0.05", "--lora_alpha", "16",
          "--target_modules", "q_proj", "v_proj", "k_proj", "o_proj"],
         plugins=["data_handlers", "lora"], adapter=(8, 16, ["k_proj", "o_proj", "q_proj",
                                                            "v_proj"])),
    seed("training.md: checkpoints, save_model_dir, gradient checkpointing",
         "save_model_dir inside output_dir, save_total_limit 1, --gradient_checkpointing",
         ["train", "--model_name_or_path", "{model}", "--training_data_path", "{data:response}",
          "--output_dir", "{out}", "--num_train_epochs", "1", "--per_device_train_batch_size",
          "4", "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "1",
          "--save_model_dir", "{out}/save_model_dir", "--gradient_checkpointing",
          "--response_template", "\\n### Response:", "--dataset_text_field", "output",
          "--peft_method", "lora"],
         plugins=["lora"], layout=["checkpoint-4", "save_model_dir", "training_logs.jsonl"]),
    seed("training.md: gpt-oss MXFP4", "the gpt-oss command with its data_config (hub "
         "dataset -> local file); flash-attn 3 hub kernel falls back on a machine without it",
         ["train", "--model_name_or_path", "{gptoss}", "--output_dir", "{out}",
          "--gradient_accumulation_steps", "1", "--per_device_train_batch_size", "2",
          "--num_train_epochs", "1", "--torch_dtype", "bfloat16", "--learning_rate", "2e-4",
          "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine_with_min_lr",
          "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}', "--max_seq_length", "4096",
          "--logging_steps", "1", "--data_config", "{data:gptoss_config}",
          "--gradient_checkpointing", "True", "--peft_method", "lora", "--lora_r", "8",
          "--lora_alpha", "16", "--lora_dropout", "0.0", "--target_modules", "all-linear",
          "--quantization_method", "mxfp4", "--dequantize", "True", "--use_flash_attn", "True",
          "--tracker", "aim", "--aim_repo", "{out}/aimrepo", "--experiment",
          "gpt-oss-120b-lora-tuning-fa3-attn-torch-2.8",
          "--flash_attn_implementation=kernels-community/vllm-flash-attn3"],
         plugins=["data_handlers", "lora", "mxfp4", "aim"], adapter=(8, 16, None)),
    seed("older README, training.md: FSDP", "accelerate launch --config_file "
         "fixtures/accelerate_fsdp_defaults.yaml --num_processes=2 ... on a machine without "
         "GPUs (fms-hf-tuning fails there too)",
         ["accelerate", "launch", "--config_file", "{data:fsdp_yaml}", "--num_processes=2",
          "--main_process_port=29561", "-m", "fmtune.cli", "train", "--model_name_or_path",
          "{model}", "--training_data_path", "{data:response}", "--torch_dtype", "bfloat16",
          "--output_dir", "{out}", "--num_train_epochs", "1", "--per_device_train_batch_size",
          "4", "--gradient_accumulation_steps", "4", "--learning_rate", "1e-5",
          "--response_template", "\\n### Response:", "--dataset_text_field", "output",
          "--tokenizer_name_or_path", "{model}"],
         result="exit 1: fmtune: error: FSDP needs GPUs and this machine has none"),
    seed("older README: inference", "one text, --out_file",
         ["generate", "--model", "{model}", "--text",
          "This is a text the model will run inference on", "--max_new_tokens", "50",
          "--out_file", "{out}/result.json"], result="writes", outputs=1),
    seed("older README: inference", "--text_file, one text per line",
         ["generate", "--model", "{model}", "--text_file", "{data:source_texts}",
          "--max_new_tokens", "50", "--out_file", "{out}/result.json"],
         result="writes", outputs=2),
]

ELSEWHERE = [
    ("older README: inference", "--base_model_name_or_path (adapter over another base)",
     "tests/test_generate.py::test_base_model_name_or_path_replaces_the_adapters_base"),
    ("README: trainer controller", "--trainer_controller_config_file with fms's example rules",
     "plugins/trainer_controller/tests"),
    ("README: Kubernetes example", "the PyTorchJob manifest", "tests/test_kubernetes.py"),
    ("README, older README: validation", "`python main.py --model hf-causal ...` is "
     "lm-evaluation-harness's own command, not fms-hf-tuning's", "not run (lm-eval's CLI)"),
    ("Silogen", "`finetuning sft CONFIG.yaml`, `finetuning dpo CONFIG.yaml`",
     "tests/test_silogen.py (fmtune sft / fmtune dpo)"),
    ("Silogen", "`merge_adapter --tokenizer --device_map`, `create_vllm_compatible_adapter "
     "--training-config`", "tests/test_silogen.py, plugins/peft_lora/tests"),
    ("Silogen", "`generate CONFIG.yaml OUTPUT.yaml`", "tests/test_silogen.py (fmtune generate)"),
    ("Huggingface-LM-SFT", "`python main.py --training|--evaluation|--measure`",
     "a different tool with its own config module; not a compatibility target of issue 14"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, fmtune_tiny_model, fmtune_mxfp4_model):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("seeds")
    granite = d / "granite"
    shutil.copytree(fmtune_tiny_model, granite)
    tok = AutoTokenizer.from_pretrained(granite)
    tok.chat_template = GRANITE_TEMPLATE  # as granite-3.0-8b-instruct ships one
    tok.save_pretrained(granite)
    gptoss = d / "gptoss"
    shutil.copytree(fmtune_mxfp4_model, gptoss)
    tok = AutoTokenizer.from_pretrained(gptoss)
    tok.chat_template = HARMONY_TEMPLATE
    tok.save_pretrained(gptoss)

    def msgs(i):
        return [{"content": "You are an AI language model.", "role": "system"},
                {"content": f"Look up a word that rhymes with exist {i}", "role": "user"},
                {"content": "I found a word that rhymes: mist", "role": "assistant"}]

    extra = {"group": "lab_extension", "dataset": "base/full-extension",
             "metadata": "{\"num_turns\": 1}"}
    data = {
        "response": write_jsonl(d / "twitter_complaints.json", [
            {"output": f"### Input: the red cat sees {i}\n\n### Response: no complaint"}
            for i in range(16)]),
        "label": write_jsonl(d / "twitter_complaints_single.jsonl", [
            {"output": f"### Text: the red cat sees {i}\n\n### Label: no complaint"}
            for i in range(16)]),
        "io_jsonl": write_jsonl(d / "train.jsonl", [
            {"input": f"### Input: Colorado is a state in USA {i} ### Output:",
             "output": "USA : Location"} for i in range(16)]),
        "chat": write_jsonl(d / "chat.jsonl", [{"messages": msgs(i), **extra}
                                               for i in range(16)]),
        "conversations": write_jsonl(d / "conversations.jsonl", [
            {"conversations": msgs(i), **extra} for i in range(16)]),
    }
    io_json = d / "twitter_complaints_io.json"
    io_json.write_text(json.dumps([{"input": f"the red cat {i}", "output": "no complaint"}
                                   for i in range(16)]))
    data["io_json"] = str(io_json)
    from datasets import Dataset

    ids = [[5, 6, 7, 8, 9, 10, 0]] * 16
    Dataset.from_dict({"input_ids": ids, "labels": [[-100, -100, -100, 8, 9, 10, 0]] * 16}) \
        .save_to_disk(str(d / "tokenized"))
    arrow = d / "twitter_complaints_tokenized_with_maykeye_tinyllama_v0.arrow"
    shutil.copy(next((d / "tokenized").glob("*.arrow")), arrow)
    data["arrow"] = str(arrow)
    cfg = d / "data_config.yaml"
    cfg.write_text(f"""dataprocessor:
    type: default
datasets:
  - name: dataset_1
    data_paths:
      - "{data['chat']}"
    data_handlers:
      - name: tokenize_and_apply_chat_template_with_masking
        arguments:
          remove_columns: all
          fn_kwargs:
            conversation_column_name: "messages"
""")
    data["gptoss_config"] = str(cfg)
    fsdp = d / "accelerate_fsdp_defaults.yaml"  # fms-hf-tuning's fixtures file, comments cut
    fsdp.write_text("""compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_backward_prefetch: BACKWARD_PRE
  fsdp_backward_prefetch_policy: BACKWARD_PRE
  fsdp_forward_prefetch: false
  fsdp_offload_params: false
  fsdp_sharding_strategy: 1
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: true
  fsdp_sync_module_states: true
mixed_precision: 'no'
machine_rank: 0
num_machines: 1
num_processes: 1
rdzv_backend: static
same_network: true
""")
    data["fsdp_yaml"] = str(fsdp)
    texts = d / "source_texts.txt"
    texts.write_text("This is the first text to be processed.\n"
                     "And this is the second text to be processed.\n")
    data["source_texts"] = str(texts)
    return {"model": fmtune_tiny_model, "granite": str(granite), "gptoss": str(gptoss),
            "data": data}


def fill(argv, world, out):
    filled = []
    for a in argv:
        for key in ("model", "granite", "gptoss"):
            a = a.replace("{" + key + "}", world[key])
        if a.startswith("{data:"):
            a = world["data"][a[6:-1]]
        filled.append(a.replace("{out}", str(out)))
    return filled


@pytest.mark.parametrize("case", SEEDS, ids=[f"{s['where']} | {s['what']}"[:90] for s in SEEDS])
def test_seed_command(case, world, tmp_path):
    out = tmp_path / "out"
    argv = fill(case["argv"], world, out)
    if argv[0] == "generate":
        out.mkdir()  # the seeds write result.json into the current folder
    if argv[0] == "accelerate":
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run([str(Path(sys.executable).with_name("accelerate")), *argv[1:]],
                              capture_output=True, text=True, timeout=600, env=env)
        code, stderr = proc.returncode, proc.stdout + proc.stderr
    else:
        res = run_cli(argv)
        code, stderr = res.exit_code, res.stderr
    result = case["result"]
    if result.startswith("exit "):
        want_code, line = result[5:].split(": ", 1)
        assert code == int(want_code), stderr[-3000:]
        assert line in stderr
        assert not (out / "run_summary.json").exists()
        return
    assert code == 0, stderr[-3000:]
    if result == "writes":
        written = json.loads((out / "result.json").read_text())
        assert len(written) == case["outputs"]
        assert all(set(r) == {"input", "output"} and r["output"] for r in written)
        return
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] >= 1 and summary["train_tokens"] > 0
    assert [p for p in summary["plugins"] if p in ("data_handlers", "lora", "mxfp4", "aim")] \
        == case.get("plugins", []), "no --plugins typed: the flags activate them"
    if "adapter" in case:
        r, alpha, modules = case["adapter"]
        model_dir = out / "save_model_dir" if "layout" in case else out
        adapter = json.loads((model_dir / "adapter_config.json").read_text())
        assert (adapter["r"], adapter["lora_alpha"]) == (r, alpha)
        if modules:
            assert sorted(adapter["target_modules"]) == modules
    for name in case.get("layout", []):
        assert (out / name).exists(), sorted(p.name for p in out.iterdir())
    if "layout" in case:
        assert (out / "save_model_dir" / "adapter_model.safetensors").is_file()
    for token in case.get("special", []):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out)
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1


def render_doc() -> str:
    lines = ["# The seed documents' commands in fmtune", "",
             "<!-- Generated by tests/test_seed_commands.py; do not edit by hand.",
             "     Regenerate: FMTUNE_WRITE_DOCS=1 .venv/bin/python -m pytest "
             "tests/test_seed_commands.py -k doc -->", "",
             "Each command of fms-hf-tuning's documents (`../shared/seeds`), with only the "
             "command name changed, as `tests/test_seed_commands.py` runs it on tiny local "
             "models (paths made local, epochs cut to 1). No `--plugins` is typed: the flags "
             "activate the plugins listed.", "",
             "| where | command | result here | plugins the flags activate |", "|---|---|---|---|"]
    for s in SEEDS:
        tool = {"train": "fmtune train", "generate": "fmtune generate"}.get(
            s["argv"][0], "accelerate launch ... -m fmtune.cli train")
        result = {"trains": "trains, exit 0", "writes": f"writes {s.get('outputs')} "
                  "outputs, exit 0"}.get(s["result"], s["result"])
        lines.append(f"| {s['where']} | `{tool}`: {s['what']} | {result} | "
                     f"{', '.join(s.get('plugins', [])) or '-'} |")
    lines += ["", "Run elsewhere:", "", "| where | command | test |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in ELSEWHERE]
    return "\n".join(lines) + "\n"


def test_seed_commands_doc_matches_the_table():
    check_generated(DOC, render_doc(), "docs/seed-commands.md")
