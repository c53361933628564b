"""Start-up to the first training step, and a 1-step LoRA run end to end: fmtune vs fms-hf-tuning
(its own virtualenv) vs a plain TRL ``SFTTrainer`` script vs a plain transformers ``Trainer``
script, side by side in one run (interleaved rounds, medians).

Every tool trains the same tiny random-init Llama (8 layers, hidden 64) with LoRA (r 8, peft's
default target modules) for one step of 4 input/output records, logs every step, and saves the
adapter at the end. "First step" is the moment the tool's ``training_logs.jsonl`` holds the
first step's loss (fmtune and fms-hf-tuning write it; the plain scripts write it from a
callback): wall seconds from the process start, and the CPU seconds the process had used by
then (``/proc/PID/stat``), which a loaded machine disturbs far less than wall time. "End to
end" is the process start to its exit (CPU: the process and every child it waited for).

    .venv/bin/python bench/first_step.py [--rounds 5] [--no-write]

fms-hf-tuning runs from FMS_VENV (default bench/.venv-fms, else /tmp/fms-venv) when it exists;
it pins torch < 2.9 and transformers 4.x, so it is never installed next to fmtune. Without it
the table says so and the ratios are against the plain scripts only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORDS = "the quick brown fox jumps over lazy dog red cat sees a small big old happy".split()
LOG = "training_logs.jsonl"
TICK = os.sysconf("SC_CLK_TCK")


def fms_python() -> Path | None:
    """fms-hf-tuning's virtualenv python: FMS_VENV, bench/.venv-fms or /tmp/fms-venv."""
    candidates = [os.environ.get("FMS_VENV"), ROOT / "bench" / ".venv-fms", "/tmp/fms-venv"]
    for venv in candidates:
        if venv and (Path(venv) / "bin" / "python").exists():
            py = Path(venv) / "bin" / "python"
            ok = subprocess.run([str(py), "-c", "import tuning.sft_trainer"],
                                capture_output=True).returncode == 0
            if ok:
                return py
    return None


# The plain scripts: what a user writes with transformers/peft (Trainer) or TRL (SFTTrainer)
# alone. argv: model data output_dir. Each logs the first step's loss to training_logs.jsonl.
COMMON = r'''
import json, os, sys
from transformers import TrainerCallback

model_dir, data, out = sys.argv[1:4]
os.makedirs(out, exist_ok=True)


class LogFile(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            with open(os.path.join(out, "training_logs.jsonl"), "a") as f:
                f.write(json.dumps({"step": state.global_step, "loss": logs["loss"]}) + "\n")
'''

TRAINER_SCRIPT = COMMON + r'''
import torch
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                          TrainingArguments)

tok = AutoTokenizer.from_pretrained(model_dir)


def tokenize(r):
    prompt = tok(r["input"])["input_ids"]
    answer = tok(" " + r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


ds = load_dataset("json", data_files=data)["train"]
ds = ds.map(tokenize, remove_columns=ds.column_names)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"))
args = TrainingArguments(output_dir=out, max_steps=1, per_device_train_batch_size=4,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True)
trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                  data_collator=DataCollatorForSeq2Seq(tok, padding=True), callbacks=[LogFile()])
trainer.train()
trainer.save_model(out)
'''

TRL_SCRIPT = COMMON + r'''
from datasets import load_dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

ds = load_dataset("json", data_files=data)["train"]
ds = ds.map(lambda r: {"prompt": r["input"], "completion": " " + r["output"]},
            remove_columns=ds.column_names)
args = SFTConfig(output_dir=out, max_steps=1, per_device_train_batch_size=4, logging_steps=1,
                 save_strategy="no", report_to=[], use_cpu=True, bf16=False, max_length=256)
trainer = SFTTrainer(model=model_dir, args=args, train_dataset=ds,
                     peft_config=LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"),
                     callbacks=[LogFile()])
trainer.train()
trainer.save_model(out)
'''


def prepare(d: Path, fms: bool) -> tuple[str, str, str | None]:
    """The data, the model and (for fms-hf-tuning's transformers 4.x) a copy of the model whose
    tokenizer_config names the classic fast tokenizer class."""
    from fmtune.testing import build_tiny_model, write_jsonl

    rng = random.Random(0)
    recs = [{"input": " ".join(rng.choices(WORDS, k=rng.randint(2, 12))),
             "output": " ".join(rng.choices(WORDS, k=rng.randint(2, 30)))} for _ in range(200)]
    data = write_jsonl(d / "data.jsonl", recs)
    model = build_tiny_model(d / "model", [r["input"] + " " + r["output"] for r in recs],
                             num_hidden_layers=8)
    (d / "trainer_script.py").write_text(TRAINER_SCRIPT)
    (d / "trl_script.py").write_text(TRL_SCRIPT)
    if not fms:
        return data, model, None
    import shutil

    fms_model = d / "model_fms"
    shutil.copytree(model, fms_model)
    cfg_path = fms_model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # transformers 5 writes "TokenizersBackend", unknown to the 4.x fms-hf-tuning pins; the
    # classic name loads the same tokenizer.json
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg))
    return data, model, str(fms_model)


def commands(d: Path, data: str, model: str, fms_model: str | None,
             fms_py: Path | None) -> dict[str, list[str]]:
    """Tool -> argv with the output folder ``{out}``."""
    cmds = {
        "fmtune": [str(BIN / "fmtune"), "train", "--plugins", "lora", "--model_name_or_path",
                   model, "--training_data_path", data, "--output_dir", "{out}", "--max_steps",
                   "1", "--per_device_train_batch_size", "4", "--logging_steps", "1",
                   "--save_strategy", "no", "--max_seq_length", "256"],
        "plain Trainer script": [sys.executable, str(d / "trainer_script.py"), model, data,
                                 "{out}"],
        "plain TRL script": [sys.executable, str(d / "trl_script.py"), model, data, "{out}"],
    }
    if fms_py is not None and fms_model is not None:
        cmds["fms-hf-tuning"] = [
            str(fms_py), "-m", "tuning.sft_trainer", "--model_name_or_path", fms_model,
            "--training_data_path", data, "--output_dir", "{out}", "--save_model_dir",
            "{out}/final", "--max_steps", "1", "--per_device_train_batch_size", "4",
            "--peft_method", "lora", "--logging_steps", "1", "--save_strategy", "no",
            "--use_cpu", "True", "--use_flash_attn", "False", "--max_seq_length", "256"]
    return cmds


def proc_cpu(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) a live process has used."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return None


def run_once(cmd: list[str], out: Path, cwd: Path) -> dict[str, float]:
    """One run: wall and CPU seconds to the first step's log, and to the process's exit."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    argv = [a.replace("{out}", str(out)) for a in cmd]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(out) + "-cache"}
    log = out / LOG
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    first = first_cpu = None
    while proc.poll() is None:
        if first is None and log.exists() and log.stat().st_size > 0:
            first, first_cpu = time.perf_counter() - start, proc_cpu(proc.pid)
        time.sleep(0.005)
    total = time.perf_counter() - start
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}\n{err[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if first is None:  # the step and the exit fell between two polls
        first, first_cpu = total, cpu
    return {"first_wall": first, "first_cpu": first_cpu if first_cpu is not None else cpu,
            "total_wall": total, "total_cpu": cpu}


def measure(cmds: dict[str, list[str]], rounds: int, d: Path,
            warmup: bool = True) -> dict[str, dict[str, list[float]]]:
    """Interleaved rounds (the order rotates every round) after one warm-up run of each."""
    names = list(cmds)
    if warmup:
        for name in names:
            run_once(cmds[name], d / "warmup", d)
    results: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for k in range(rounds):
        order = names[k % len(names):] + names[:k % len(names)]
        for name in order:
            for key, value in run_once(cmds[name], d / f"out-{k}", d).items():
                results[name].setdefault(key, []).append(value)
    return results


def medians(results: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}


def table(med: dict[str, dict[str, float]], base: str) -> str:
    rows = ["| tool | first step, wall (s) | first step, CPU (s) | end to end, wall (s) | "
            f"end to end, CPU (s) | first step / {base} (wall, CPU) | end to end / {base} "
            "(wall, CPU) |", "|---|---|---|---|---|---|---|"]
    b = med[base]
    for name, m in med.items():
        rows.append(f"| {name} | {m['first_wall']:.2f} | {m['first_cpu']:.2f} | "
                    f"{m['total_wall']:.2f} | {m['total_cpu']:.2f} | "
                    f"{m['first_wall'] / b['first_wall']:.2f}, "
                    f"{m['first_cpu'] / b['first_cpu']:.2f} | "
                    f"{m['total_wall'] / b['total_wall']:.2f}, "
                    f"{m['total_cpu'] / b['total_cpu']:.2f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--no-fms", action="store_true", help="leave fms-hf-tuning out")
    args = ap.parse_args()
    fms_py = None if args.no_fms else fms_python()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        data, model, fms_model = prepare(d, fms_py is not None)
        cmds = commands(d, data, model, fms_model, fms_py)
        load = os.getloadavg()[0]
        med = medians(measure(cmds, args.rounds, d))
    base = "fms-hf-tuning" if "fms-hf-tuning" in med else "plain Trainer script"
    text = table(med, base)
    print(text)
    if args.no_write:
        return
    note = ("" if fms_py else " fms-hf-tuning's virtualenv was not found (FMS_VENV), so it is "
            "left out.")
    write_section("first_step", (
        f"Command: `.venv/bin/python bench/first_step.py --rounds {args.rounds}` "
        f"({os.cpu_count()} CPUs, load average {load:.1f} at the start; medians of "
        f"{args.rounds} interleaved rounds after a warm-up run of each). A 1-step LoRA run "
        "(r 8, peft's default targets) of an 8-layer hidden-64 random-init Llama, batch 4, "
        "adapter saved at the end; first step = the first step's loss in "
        "training_logs.jsonl. CPU seconds are the steadier figure on a shared machine."
        f"{note}\n\n" + text))


if __name__ == "__main__":
    main()
