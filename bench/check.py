"""The performance check CI runs (`make bench-check`): quick versions of the benchmarks, each a
ratio of two things measured side by side in this one run (never an absolute time), checked
against a stated limit. Exit 1 when any ratio is past its limit, with one line per check.

    .venv/bin/python bench/check.py [--only NAME ...] [--json FILE]

Checks (CPU seconds = user + system of the processes, which a loaded machine disturbs far less
than wall time; medians of interleaved rounds):

- ``startup``: ``fmtune --help`` / ``python -c 'import torch'`` (CPU).
- ``first_step``: a 1-step LoRA ``fmtune train`` / the plain transformers ``Trainer`` script of
  bench/first_step.py: CPU seconds to the first step's log.
- ``preprocess``: ``fmtune preprocess`` of 10,000 input/output records / a straightforward
  ``datasets.map`` script (AutoTokenizer, masks, parquet), end to end (CPU).
- ``padding_free``: trained tokens per CPU-second of training of a ``--padding_free`` run / a
  padded run of the same records (``--plugins data_handlers``, in this process, after a short
  warm-up run; the CPU is counted from the trainer's first event to its last log).

The limits (LIMITS) come from the spread measured on a loaded 2-core machine; see
docs/benchmarks.md ("CI performance check").
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
import first_step  # noqa: E402

from fmtune import hookimpl  # noqa: E402

BIN = Path(sys.executable).parent
WORDS = first_step.WORDS

# name -> (limit, "max" (the ratio must stay below) or "min" (above), what the ratio is)
LIMITS = {
    "startup": (0.25, "max", "fmtune --help CPU / import torch CPU"),
    "first_step": (1.10, "max", "fmtune CPU to first step / plain Trainer script's"),
    "preprocess": (0.75, "max", "fmtune preprocess CPU / datasets.map script's"),
    # 1.17-1.25 on the quiet machine (12 short steps are noisy), 1.61-1.62 loaded: the limit
    # says padding-free never costs more per token than padding
    "padding_free": (1.00, "min", "padding-free tokens per training CPU-s / padded"),
}

PREPROCESS_SCRIPT = r'''
import sys
from datasets import load_dataset
from transformers import AutoTokenizer

model, data, out = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(model)


def tokenize(batch):
    ids, labels = [], []
    for prompt, answer in zip(batch["input"], batch["output"]):
        p = tok(prompt)["input_ids"]
        a = tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids.append((p + a)[:1024])
        labels.append(([-100] * len(p) + a)[:1024])
    return {"input_ids": ids, "labels": labels, "attention_mask": [[1] * len(i) for i in ids]}


ds = load_dataset("json", data_files=data)["train"]
ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names)
ds.to_parquet(out + "/train.parquet")
'''


def cpu_of(argv: list[str], env: dict | None = None, cwd: Path | None = None) -> float:
    """CPU seconds of a command (and the children it waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    if res.returncode:
        raise SystemExit(f"failed: {' '.join(argv)}\n{res.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def alternate(cmds: dict[str, tuple[list[str], dict | None]], rounds: int, cwd: Path,
              before_each=None) -> dict[str, float]:
    """Median CPU seconds of each command over interleaved rounds, after a warm-up run."""
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for name, (argv, env) in cmds.items():
        if before_each:
            before_each(name, -1)
        cpu_of(argv, env, cwd)
    for k in range(rounds):
        for name, (argv, env) in (cmds.items() if k % 2 == 0 else reversed(cmds.items())):
            if before_each:
                before_each(name, k)
            times[name].append(cpu_of(argv, env, cwd))
    return {k: statistics.median(v) for k, v in times.items()}


def check_startup(d: Path, rounds: int) -> tuple[float, str]:
    med = alternate({"fmtune": ([str(BIN / "fmtune"), "--help"], None),
                     "torch": ([sys.executable, "-c", "import torch"], None)}, rounds, d)
    return med["fmtune"] / med["torch"], (f"fmtune --help {med['fmtune']:.2f} s CPU, import "
                                          f"torch {med['torch']:.2f} s")


def check_first_step(d: Path, rounds: int) -> tuple[float, str]:
    data, model, _ = first_step.prepare(d, fms=False)
    cmds = first_step.commands(d, data, model, None, None)
    cmds = {k: cmds[k] for k in ("fmtune", "plain Trainer script")}
    # no warm-up run: CI runs this after the test suite, with the files in the page cache
    med = first_step.medians(first_step.measure(cmds, rounds, d, warmup=False))
    f, t = med["fmtune"], med["plain Trainer script"]
    return f["first_cpu"] / t["first_cpu"], (
        f"fmtune {f['first_cpu']:.2f} s CPU to the first step ({f['total_cpu']:.2f} end to "
        f"end), plain Trainer script {t['first_cpu']:.2f} s ({t['total_cpu']:.2f})")


def records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"input": " ".join(rng.choices(WORDS, k=rng.randint(3, 40))),
             "output": " ".join(rng.choices(WORDS, k=rng.choice([2, 4, 8, 30, 90])))}
            for _ in range(n)]


def check_preprocess(d: Path, rounds: int, n: int = 10_000) -> tuple[float, str]:
    from fmtune.testing import build_tiny_model, write_jsonl

    recs = records(n)
    data = write_jsonl(d / "pre.jsonl", recs)
    model = build_tiny_model(d / "pre_model", [r["input"] + " " + r["output"] for r in recs[:2000]])
    (d / "pre_script.py").write_text(PREPROCESS_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    outs = {"fmtune": d / "pre_fmtune", "baseline": d / "pre_baseline"}

    def fresh(name: str, k: int) -> None:
        import shutil

        shutil.rmtree(outs[name], ignore_errors=True)
        os.makedirs(outs[name])
        env["HF_DATASETS_CACHE"] = str(d / f"cache-{name}-{k}")  # nothing reused

    cmds = {"fmtune": ([str(BIN / "fmtune"), "preprocess", "--model_name_or_path", model,
                        "--training_data_path", data, "--output_dir", str(outs["fmtune"]),
                        "--max_seq_length", "1024"], env),
            "baseline": ([sys.executable, str(d / "pre_script.py"), model, data,
                          str(outs["baseline"])], env)}
    med = alternate(cmds, rounds, d, before_each=fresh)
    return med["fmtune"] / med["baseline"], (f"{n} records: fmtune preprocess "
                                             f"{med['fmtune']:.2f} s CPU, datasets.map script "
                                             f"{med['baseline']:.2f} s")


class TrainingClock:
    """An in-run plugin: CPU seconds of this process from the trainer's first event to its last
    log (training alone: no data preparation, model load or save)."""

    def __init__(self) -> None:
        self.start = self.cpu = None

    @hookimpl
    def on_train_begin(self, run):
        self.start = time.process_time()

    @hookimpl
    def on_log(self, run, logs):
        if "train_loss" in logs and "loss" not in logs and self.start is not None:
            self.cpu = time.process_time() - self.start


def check_padding_free(d: Path, rounds: int, steps: int = 12) -> tuple[float, str]:
    from fmtune.testing import build_tiny_model, run_cli, write_jsonl

    recs = records(400, seed=1)
    data = write_jsonl(d / "pf.jsonl", recs)
    model = build_tiny_model(d / "pf_model", [r["input"] + " " + r["output"] for r in recs],
                             hidden_size=128, intermediate_size=384, num_hidden_layers=4)
    modes = {"padded": [], "padding_free": ["--padding_free"]}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for k in range(-1, rounds):  # -1: a short warm-up (imports, caches)
        for mode, flags in (modes.items() if k % 2 == 0 else reversed(modes.items())):
            out = d / f"pf-{mode}-{k}"
            clock = TrainingClock()
            res = run_cli(["train", "--plugins", "data_handlers", "--model_name_or_path", model,
                           "--training_data_path", data, "--output_dir", str(out),
                           "--max_steps", str(steps if k >= 0 else 2),
                           "--per_device_train_batch_size", "8", "--save_strategy", "no",
                           "--logging_steps", str(steps), "--max_seq_length", "256",
                           "--attn_implementation", "sdpa", *flags], plugins=[clock])
            if res.exit_code or clock.cpu is None:
                raise SystemExit(f"padding_free check: {mode} run failed:\n{res.stderr[-3000:]}")
            tokens = json.loads((out / "run_summary.json").read_text())["train_tokens"]
            if k >= 0:
                rates[mode].append(tokens / clock.cpu)
    med = {m: statistics.median(v) for m, v in rates.items()}
    return med["padding_free"] / med["padded"], (
        f"{steps} steps of batch 8: padded {med['padded']:.0f} trained tokens per CPU-s of "
        f"training, padding-free {med['padding_free']:.0f}")


CHECKS = {"startup": (check_startup, 3), "first_step": (check_first_step, 2),
          "preprocess": (check_preprocess, 2), "padding_free": (check_padding_free, 2)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="+", choices=list(CHECKS), default=list(CHECKS))
    ap.add_argument("--rounds", type=int, default=None, help="rounds of every check")
    ap.add_argument("--json", help="also write the ratios to this file")
    args = ap.parse_args()
    failed, found = [], {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            fn, rounds = CHECKS[name]
            t = time.perf_counter()
            d = Path(tmp) / name
            d.mkdir()
            ratio, detail = fn(d, args.rounds or rounds)
            limit, kind, what = LIMITS[name]
            ok = ratio <= limit if kind == "max" else ratio >= limit
            found[name] = {"ratio": round(ratio, 3), "limit": limit, "kind": kind, "ok": ok}
            sign = "<=" if kind == "max" else ">="
            print(f"bench-check {name}: {what} = {ratio:.2f} (limit {sign} {limit}) "
                  f"{'ok' if ok else 'FAILED'} [{detail}; {time.perf_counter() - t:.0f} s]",
                  flush=True)
            if not ok:
                failed.append(name)
    print(f"bench-check: {len(args.only) - len(failed)} of {len(args.only)} ratios within their "
          f"limits in {time.perf_counter() - start:.0f} s (load average "
          f"{os.getloadavg()[0]:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps(found, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
