"""Training throughput with padding vs --padding_free vs --packing, side by side in one run.

Same tiny random-init Llama, same data (input/output records whose lengths
vary from a few to ~100 tokens), same steps and batch size; the figure is
trained (non-padding) tokens per second from each run's run_summary.json.

    .venv/bin/python bench/packing.py [--steps 60]              # -> docs/benchmarks.md
    .venv/bin/python bench/packing.py --multipack [--repeats 3]  # -> docs/data-at-scale.md

``--multipack`` compares --padding_free with --padding_free --multipack 16 (rounds
interleaved, the median of each mode's tokens/s).
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
    ap.add_argument("--multipack", action="store_true",
                    help="padding-free without and with --multipack (docs/data-at-scale.md)")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    modes = (("--padding_free", ["--padding_free"]),
             ("--padding_free --multipack 16", ["--padding_free", "--multipack", "16"])) \
        if args.multipack else (("padded (default collator)", []),
                                ("--padding_free", ["--padding_free"]), ("--packing", ["--packing"]))
    from fmtune.testing import build_tiny_model, write_jsonl

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as d:
        recs = [{"input": " ".join(rng.choices(WORDS, k=rng.randint(2, 12))),
                 "output": " ".join(rng.choices(WORDS, k=rng.choice([2, 4, 8, 30, 90])))}
                for _ in range(2000)]
        data = write_jsonl(os.path.join(d, "data.jsonl"), recs)
        model = build_tiny_model(os.path.join(d, "model"), [r["input"] + " " + r["output"] for r in recs],
                                 hidden_size=128, intermediate_size=384, num_hidden_layers=4)
        runs: dict[str, list] = {name: [] for name, _ in modes}
        for k in range(args.repeats):
            for name, flags in modes:
                out = os.path.join(d, f"{k}-" + name.replace("-", "").replace(" ", "_"))
                cmd = [str(BIN / "fmtune"), "train", "--plugins", "data_handlers",
                       "--model_name_or_path", model, "--training_data_path", data,
                       "--output_dir", out, "--max_steps", str(args.steps),
                       "--per_device_train_batch_size", str(args.batch), "--save_strategy", "no",
                       "--logging_steps", "20", "--max_seq_length", "256",
                       "--attn_implementation", "sdpa", *flags]
                subprocess.run(cmd, check=True, capture_output=True)
                s = json.loads(Path(out, "run_summary.json").read_text())
                runs[name].append((s["train_tokens"], s["train_s"], s["tokens_per_second"]))
    rows = []
    for name, _ in modes:
        ordered = sorted(runs[name], key=lambda r: r[2])
        tokens, secs, tps = ordered[len(ordered) // 2]
        rows.append((name, tokens, secs, tps, [r[2] for r in runs[name]]))
    base = rows[0][3]
    table = "\n".join(["| mode | trained tokens | train time (s) | tokens/s | ratio |"
                       + (" runs (tokens/s) |" if args.repeats > 1 else ""),
                       "|---|---|---|---|---|" + ("---|" if args.repeats > 1 else ""),
                       *(f"| {n} | {t} | {s:.1f} | {tps:.0f} | {tps / base:.2f} |"
                         + (f" {', '.join(f'{x:.0f}' for x in all_)} |" if args.repeats > 1
                            else "")
                         for n, t, s, tps, all_ in rows)])
    print(table)
    if args.multipack and not args.no_write:
        write_section("multipack", f"Command: `.venv/bin/python bench/packing.py --multipack "
                      f"--steps {args.steps} --repeats {args.repeats}` ({os.cpu_count()} CPUs, CPU "
                      f"training, one process, 4-layer hidden-128 random-init Llama, batch "
                      f"{args.batch}, outputs of 2-90 words; rounds interleaved, median shown). "
                      "Tokens are trained tokens; a multipack step holds about batch x mean "
                      "length tokens, so compare tokens/s.\n\n" + table, doc="data-at-scale.md")
        return
    if not args.no_write:
        write_section("packing", f"Command: `.venv/bin/python bench/packing.py --steps {args.steps}` "
                      f"({os.cpu_count()} CPUs, CPU training, 4-layer hidden-128 random-init Llama, "
                      f"batch {args.batch}, outputs of 2-90 words). Tokens are non-padding tokens; "
                      "packing puts more examples in each step, so compare tokens/s.\n\n" + table)


if __name__ == "__main__":
    main()
