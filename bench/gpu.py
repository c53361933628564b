"""GPU figures in one prepared run: bf16 tokens/s, MFU and peak GPU memory of fmtune training.

Builds, with no download, a random-init Llama (``--size 1b``: TinyLlama-1.1B's shape, 22
layers, hidden 2048, 32 heads / 4 KV heads, intermediate 5632, float32 weights) with fmtune's
byte-level BPE tokenizer, and JSONL input/output records of 100-1000 words. Then runs
``fmtune train`` once per configuration, each in its own process, on the same model and
data, and reads ``run_summary.json`` (tokens/s over the trained tokens, peak GPU memory):

* LoRA (r 16, all-linear) and full fine-tuning, bf16 mixed precision (``--bf16 true``);
* sdpa padded batches vs sdpa padding-free vs flash-attn's varlen kernel padding-free
  (``--use_flash_attn true``, fms-hf-tuning's flag; skipped, with the reason, when ``flash_attn``
  does not import);
* full fine-tuning under FSDP on one GPU (``--num_processes 1 --accelerate_config
  examples/accelerate/fsdp.yaml``) and FSDP2 (``fsdp2.yaml``);
* QLoRA (4-bit nf4 base, when bitsandbytes imports and sees CUDA); Liger kernels
  (``--use_liger_kernel true``, when ``liger_kernel`` imports).

MFU = tokens/s x FLOPs per token / the GPU's dense bf16 peak (H100/H200 SXM: 989.4 TFLOP/s;
another GPU: ``--peak-tflops``). FLOPs per token: full fine-tuning 6N + 12 L d s (N the
parameters without the embedding table, L layers, d hidden, s the mean example length:
the attention scores and values, forward and backward); LoRA 4N + 12 L d s (no weight
gradients for the frozen weights; LoRA's own matmuls are under 1% at r 16). These are the
usual estimates (PaLM's appendix B), not counted FLOPs.

On the GPU machine (see docs/benchmarks.md, "GPU figures", for the installation step):

    python3 bench/gpu.py --size 1b --steps 30 --write
    .venv/bin/python bench/gpu.py --size tiny --steps 2 --device cpu   # a smoke run here
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

SIZES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, intermediate_size=5632, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=176, max_position_embeddings=2048),
}
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
WORDS = ("the quick brown fox jumps over the lazy dog while a small red cat sees two old "
         "happy birds near the river and asks what four plus two is before the answer").split()
LORA = ["--plugins", "lora", "--r", "16", "--lora_alpha", "32", "--target_modules", "all-linear"]


def configurations(device: str) -> list[tuple[str, list[str], str | None]]:
    """``(name, fmtune options, why skipped or None)`` for each run."""
    gpu = device == "cuda"
    flash = None if importable("flash_attn") else "flash_attn does not import"
    if not gpu:
        flash = "flash-attn needs a GPU"
    bnb = None if gpu and importable("bitsandbytes") else "bitsandbytes with CUDA needed"
    liger = None if importable("liger_kernel") else "liger_kernel does not import"
    fsdp = None if gpu else "FSDP on one GPU needs a GPU"
    pf = ["--padding_free", "true"]
    fa = ["--use_flash_attn", "true"]  # fms-hf-tuning's flag (flash_attention_2)
    sdpa = ["--attn_implementation", "sdpa"]
    acc = ROOT / "examples" / "accelerate"
    return [
        ("LoRA, sdpa, padded", [*LORA, *sdpa], None),
        ("LoRA, sdpa, padding-free", [*LORA, *sdpa, *pf], None),
        ("LoRA, flash-attn varlen, padding-free", [*LORA, *fa, *pf], flash),
        ("full, sdpa, padded", [*sdpa], None),
        ("full, sdpa, padding-free", [*sdpa, *pf], None),
        ("full, flash-attn varlen, padding-free", [*fa, *pf], flash),
        ("full, FSDP (1 GPU), sdpa, padding-free",
         [*sdpa, *pf, "--num_processes", "1", "--accelerate_config", str(acc / "fsdp.yaml")],
         fsdp),
        ("full, FSDP2 (1 GPU), sdpa, padding-free",
         [*sdpa, *pf, "--num_processes", "1", "--accelerate_config", str(acc / "fsdp2.yaml")],
         fsdp),
        ("QLoRA (nf4), sdpa, padding-free",
         ["--plugins", "qlora", "--r", "16", "--lora_alpha", "32", "--target_modules",
          "all-linear", *sdpa, *pf], bnb),
        ("full, sdpa, padding-free, Liger kernels", [*sdpa, *pf, "--use_liger_kernel", "true"],
         liger),
    ]


def importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def records(n: int, seed: int = 0, lo: int = 100, hi: int = 1000):
    rng = random.Random(seed)
    for _ in range(n):
        yield {"input": " ".join(rng.choices(WORDS, k=rng.randint(lo // 4, hi // 4))),
               "output": " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))}


def build(folder: Path, size: str, n: int, lo: int, hi: int) -> tuple[str, str]:
    """The model folder and the data file (built once)."""
    from fmtune.testing import build_tiny_model, write_jsonl

    model, data = folder / f"model-{size}", folder / f"data-{n}-{lo}-{hi}.jsonl"
    if not (model / "config.json").exists():
        texts = [f"{r['input']} {r['output']}" for r in records(200, seed=1, lo=lo, hi=hi)]
        build_tiny_model(model, texts, vocab_size=512, **SIZES[size])
    if not data.exists():
        write_jsonl(data, records(n, lo=lo, hi=hi))
    return str(model), str(data)


def flops_per_token(config: dict, mean_len: float, lora: bool) -> float:
    """PaLM-style estimate (see the module docstring)."""
    d, layers = config["hidden_size"], config["num_hidden_layers"]
    kv = d * config["num_key_value_heads"] // config["num_attention_heads"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * config["intermediate_size"]
    n = layers * per_layer + d * config["vocab_size"]  # + the LM head (untied)
    return (4 if lora else 6) * n + 12 * layers * d * mean_len


def run_one(name: str, options: list[str], model: str, data: str, out: Path, args) -> dict:
    cmd = [sys.executable, "-c", "import sys; from fmtune.cli import main; sys.exit(main())",
           "train", "--model_name_or_path", model, "--training_data_path", data,
           "--output_dir", str(out), "--max_steps", str(args.steps),
           "--per_device_train_batch_size", str(args.batch), "--max_seq_length", "2048",
           "--learning_rate", "1e-4", "--logging_steps", "5", "--save_strategy", "no",
           "--seed", "0", *(["--bf16", "true"] if args.device == "cuda" else ["--use_cpu", "true"]),
           *options]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent,
                          timeout=args.timeout)
    wall = time.perf_counter() - t
    if proc.returncode:
        tail = [x for x in proc.stderr.splitlines() if x.strip()][-3:]
        return {"name": name, "error": " / ".join(tail)[-400:], "wall_s": wall}
    summary = json.loads((out / "run_summary.json").read_text())
    return {"name": name, "wall_s": wall, **{k: summary.get(k) for k in (
        "tokens_per_second", "train_tokens", "train_s", "peak_gpu_memory_mb", "peak_rss_mb",
        "final_loss", "global_step")}}


def report(results: list[dict], config: dict, mean_len: float, peak: float | None) -> str:
    base = next((r for r in results if r["name"] == "full, sdpa, padded"
                 and r.get("tokens_per_second")), None)
    lines = ["| run | tokens/s | vs full sdpa padded | MFU | peak GPU memory (GB) | "
             "train s | final loss |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "skipped" in r or "error" in r:
            why = r.get("skipped") or f"failed: {r['error']}"
            lines.append(f"| {r['name']} | - | - | - | - | - | {why} |")
            continue
        tps = r["tokens_per_second"] or 0.0
        lora = r["name"].startswith(("LoRA", "QLoRA"))
        mfu = (f"{100 * tps * flops_per_token(config, mean_len, lora) / (peak * 1e12):.1f}%"
               if peak else "-")
        ratio = f"{tps / base['tokens_per_second']:.2f}x" if base else "-"
        mem = (f"{r['peak_gpu_memory_mb'] / 1024:.1f}" if r.get("peak_gpu_memory_mb")
               else f"(RSS {r['peak_rss_mb']:.0f} MB)")
        lines.append(f"| {r['name']} | {tps:,.0f} | {ratio} | {mfu} | {mem} | "
                     f"{r['train_s']:.1f} | {r['final_loss']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--lengths", default="100,1000", help="words per output, min,max")
    ap.add_argument("--only", default="", help="comma-separated substrings of run names")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per run")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="also write results.json and the table here")
    ap.add_argument("--write", action="store_true", help="write docs/benchmarks.md's section")
    args = ap.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in gpu_name), None)
    lo, hi = (int(x) for x in args.lengths.split(","))
    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    model, data = build(work, args.size, args.records, lo, hi)
    config = json.loads((Path(model) / "config.json").read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    sample = [json.loads(x) for x in open(data, encoding="utf-8").readlines()[:200]]
    mean_len = sum(len(tok(f"{r['input']} {r['output']}")["input_ids"]) for r in sample) / 200
    mean_len = min(mean_len, 2048)
    print(f"{gpu_name}: {args.size} model, {args.records} records of ~{mean_len:.0f} tokens, "
          f"batch {args.batch}, {args.steps} steps; bf16 peak {peak} TFLOP/s", flush=True)
    results = []
    for k, (name, options, skipped) in enumerate(configurations(args.device)):
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        if skipped:
            results.append({"name": name, "skipped": f"not run: {skipped}"})
            print(f"{name}: not run ({skipped})", flush=True)
            continue
        r = run_one(name, options, model, data, work / f"run-{k}", args)
        results.append(r)
        print(f"{name}: " + (f"FAILED {r['error']}" if "error" in r else
                             f"{r['tokens_per_second']:,.0f} tokens/s, peak GPU "
                             f"{r['peak_gpu_memory_mb']} MB, {r['wall_s']:.0f} s"), flush=True)
    table = report(results, config, mean_len, peak)
    print(table)
    body = (f"Command: `python3 bench/gpu.py {' '.join(sys.argv[1:])}` ({gpu_name}, torch "
            f"{torch.__version__}; {args.size} random-init Llama, "
            f"{args.records} records of ~{mean_len:.0f} tokens, "
            f"per-device batch {args.batch}, {args.steps} steps, bf16 mixed precision)\n\n"
            f"{table}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "gpu.md").write_text(body + "\n")
    if args.write:
        from startup import write_section

        write_section("gpu", body)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
