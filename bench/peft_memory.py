"""Memory and speed of full fine-tuning vs LoRA vs QLoRA on the same model and data.

Builds one random-init Llama (saved once, so all three load the same weights), then runs
`fmtune train` three times side by side, each in its own process (so peak RSS is its own):

* full fine-tuning (no plugin),
* `--plugins lora` (r 16, all-linear),
* `--plugins qlora` (the same LoRA on a 4-bit nf4 base, double quantization).

Reported per run: trainable parameters, bytes held by the model's tensors, peak RSS and peak
anonymous RSS while training (sampled every 5 ms from /proc/self/status; anonymous RSS leaves
out the memory-mapped weight files), peak GPU memory when on a GPU, and training tokens/s. The table is printed and written to docs/benchmarks.md
(`<!-- bench:peft -->`).

    .venv/bin/python bench/peft_memory.py [--hidden 1024 --layers 8 --steps 20 --batch 16]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fmtune import hookimpl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

METHODS = {
    "full fine-tuning": [],
    "LoRA (r 16, all-linear)": ["--plugins", "lora", "--r", "16", "--target_modules", "all-linear"],
    "QLoRA (4-bit nf4 + LoRA r 16)": ["--plugins", "qlora", "--r", "16", "--target_modules",
                                      "all-linear", "--bnb_4bit_quant_type", "nf4"],
}


def rss_mb() -> tuple[float, float]:
    """``(VmRSS, RssAnon)`` in MB: all resident memory, and the part not backed by files (mmap'd
    safetensors pages count in VmRSS only)."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon"):
                found[key] = int(line.split()[1]) / 1024
    return found.get("VmRSS", float("nan")), found.get("RssAnon", float("nan"))


def mapped_weights_mb() -> float:
    """Resident pages of memory-mapped *.safetensors files (the checkpoint the model was read
    from), from /proc/self/smaps."""
    total, in_weights = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
                in_weights = line.rstrip().endswith(".safetensors")
            elif in_weights and line.startswith("Rss:"):
                total += int(head[1])
    return total / 1024


def tensor_mb(model) -> float:
    """Bytes held by the model's parameters and buffers (4-bit weights count as packed uint8)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 2**20


class Sampler:
    """An fmtune plugin (registered in the worker) sampling RSS while the trainer runs."""

    def __init__(self):
        self.peak_mb = self.peak_anon_mb = 0.0
        self._stop = threading.Event()
        self._thread = None

    def _loop(self):
        while not self._stop.is_set():
            rss, anon = rss_mb()
            self.peak_mb, self.peak_anon_mb = max(self.peak_mb, rss), max(self.peak_anon_mb, anon)
            time.sleep(0.005)

    @hookimpl
    def on_train_begin(self, run):
        gc.collect()
        try:  # hand memory freed while loading back to the OS, so RSS shows what is live
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.peak_mb, self.peak_anon_mb = rss_mb()
        self.model_mb = tensor_mb(run.model)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @hookimpl
    def on_train_end(self, run, summary):
        self._stop.set()
        self._thread.join()
        weights_file_mb = mapped_weights_mb()
        model = run.model
        summary["bench"] = {
            "model_tensors_mb": round(self.model_mb, 1),
            "rss_train_peak_mb": round(self.peak_mb, 1),
            "anon_rss_train_peak_mb": round(self.peak_anon_mb, 1),
            "weights_file_rss_mb": round(weights_file_mb, 1),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }


def worker(argv: list[str]) -> int:
    from fmtune.cli import main as fmtune_main

    return fmtune_main(argv, extra_plugins=[Sampler()])


def build_model(folder: str, hidden: int, layers: int) -> None:
    from fmtune.testing import build_tiny_model

    texts = (ROOT / "examples" / "quickstart" / "corpus.txt").read_text().splitlines()
    build_tiny_model(folder, texts, vocab_size=512, hidden_size=hidden, num_hidden_layers=layers,
                     intermediate_size=hidden * 11 // 4, num_attention_heads=max(1, hidden // 64),
                     num_key_value_heads=max(1, hidden // 64), max_position_embeddings=256)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        sys.exit(worker(args.worker))

    import torch
    from safetensors.torch import load_file

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        build_model(model_dir, args.hidden, args.layers)
        n_params = sum(t.numel() for t in load_file(
            os.path.join(model_dir, "model.safetensors")).values())
        for name, extra in METHODS.items():
            out = os.path.join(tmp, f"run{len(rows)}")
            cmd = [sys.executable, __file__, "--worker", "train",
                   "--model_name_or_path", model_dir,
                   "--training_data_path", str(ROOT / "examples/quickstart/train.jsonl"),
                   "--output_dir", out, "--max_steps", str(args.steps),
                   "--per_device_train_batch_size", str(args.batch), "--learning_rate", "1e-4",
                   "--logging_steps", str(args.steps), "--save_strategy", "no", "--seed", "0",
                   *extra]
            print(f"running {name} ...", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           cwd=ROOT)
            with open(os.path.join(out, "run_summary.json")) as f:
                rows.append((name, json.load(f)))
    full_tps = rows[0][1]["tokens_per_second"]
    full_rss = rows[0][1]["bench"]["rss_train_peak_mb"]
    gpu = torch.cuda.is_available()
    head = ["method", "trainable params", "model tensors (MB)", "peak RSS training (MB)",
            "of which float32 weight-file pages (MB)", "peak anonymous RSS (MB)",
            *(["peak GPU memory (MB)"] if gpu else []), "tokens/s", "peak RSS / full",
            "tokens/s / full"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in rows:
        b = s["bench"]
        cells = [name, f"{b['trainable_params']:,}", f"{b['model_tensors_mb']:.0f}",
                 f"{b['rss_train_peak_mb']:.0f}", f"{b['weights_file_rss_mb']:.0f}",
                 f"{b['anon_rss_train_peak_mb']:.0f}",
                 *([f"{s['peak_gpu_memory_mb']:.0f}"] if gpu else []),
                 f"{s['tokens_per_second']:.0f}", f"{b['rss_train_peak_mb'] / full_rss:.2f}",
                 f"{s['tokens_per_second'] / full_tps:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    command = (f".venv/bin/python bench/peft_memory.py --hidden {args.hidden} --layers "
               f"{args.layers} --steps {args.steps} --batch {args.batch}")
    device = torch.cuda.get_device_name(0) if gpu else f"CPU, {os.cpu_count()} cores"
    body = (f"Command: `{command}` ({device}; torch {torch.__version__}). One random-init Llama "
            f"(hidden {args.hidden}, {args.layers} layers, {n_params / 1e6:.1f}M parameters, "
            f"float32), `examples/quickstart/train.jsonl`, {args.steps} steps of batch "
            f"{args.batch}, each method in its own process, run one after the other. Model "
            "tensors: bytes of the parameters and buffers when training starts (4-bit weights "
            "packed). At that point freed heap memory is returned to the OS (`malloc_trim`). "
            "Peaks are sampled every 5 ms from /proc/self/status while the trainer runs "
            "(optimizer state included). transformers memory-maps the safetensors checkpoint: "
            "LoRA's frozen float32 weights are those file pages (counted in RSS, not in "
            "anonymous RSS); QLoRA read them once to quantize, and the pages still resident "
            "are reclaimable page cache it never touches again (weight-file pages: from "
            "/proc/self/smaps at the end of training).\n\n" + table)
    print(body)
    if not args.no_write:
        from startup import write_section

        write_section("peft", body)


if __name__ == "__main__":
    main()
