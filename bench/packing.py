"""Training throughput with padding vs --padding_free vs --packing, side by side in one run.

Same tiny random-init Llama, same data (input/output records whose lengths
vary from a few to ~100 tokens), same steps and batch size; the figure is
trained (non-padding) tokens per second from each run's run_summary.json.

    .venv/bin/python bench/packing.py [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import write_section  # noqa: E402

BIN = Path(sys.executable).parent
WORDS = "the quick brown fox jumps over lazy dog red cat sees a small big old happy".split()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from fmtune.testing import build_tiny_model, write_jsonl

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as d:
        recs = [{"input": " ".join(rng.choices(WORDS, k=rng.randint(2, 12))),
                 "output": " ".join(rng.choices(WORDS, k=rng.choice([2, 4, 8, 30, 90])))}
                for _ in range(2000)]
        data = write_jsonl(os.path.join(d, "data.jsonl"), recs)
        model = build_tiny_model(os.path.join(d, "model"), [r["input"] + " " + r["output"] for r in recs],
                                 hidden_size=128, intermediate_size=384, num_hidden_layers=4)
        rows = []
        for name, flags in (("padded (default collator)", []), ("--padding_free", ["--padding_free"]),
                            ("--packing", ["--packing"])):
            out = os.path.join(d, name.strip("-").split()[0])
            cmd = [str(BIN / "fmtune"), "train", "--plugins", "data_handlers", "--model_name_or_path",
                   model, "--training_data_path", data, "--output_dir", out, "--max_steps",
                   str(args.steps), "--per_device_train_batch_size", str(args.batch),
                   "--save_strategy", "no", "--logging_steps", "20", "--max_seq_length", "256",
                   "--attn_implementation", "sdpa", *flags]
            subprocess.run(cmd, check=True, capture_output=True)
            s = json.loads(Path(out, "run_summary.json").read_text())
            rows.append((name, s["train_tokens"], s["train_s"], s["tokens_per_second"]))
    base = rows[0][3]
    table = "\n".join(["| mode | trained tokens | train time (s) | tokens/s | ratio |", "|---|---|---|---|---|",
                       *(f"| {n} | {t} | {s:.1f} | {tps:.0f} | {tps / base:.2f} |" for n, t, s, tps in rows)])
    print(table)
    if not args.no_write:
        write_section("packing", f"Command: `.venv/bin/python bench/packing.py --steps {args.steps}` "
                      f"({os.cpu_count()} CPUs, CPU training, 4-layer hidden-128 random-init Llama, "
                      f"batch {args.batch}, outputs of 2-90 words). Tokens are non-padding tokens; "
                      "packing puts more examples in each step, so compare tokens/s.\n\n" + table)


if __name__ == "__main__":
    main()
