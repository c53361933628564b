"""`make demo`: held-out accuracy of the quickstart model before and after training.

Runs, in one process, what a user would type:

    fmtune evaluate --config examples/quickstart.yaml --data examples/quickstart/heldout.jsonl
    fmtune train    --config examples/quickstart.yaml --output_dir OUT
    fmtune evaluate --model OUT --data examples/quickstart/heldout.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output_dir", default="runs/quickstart")
    args = ap.parse_args()
    os.chdir(ROOT)  # the quickstart config's paths are relative to the repository root
    from fmtune.cli import main as fmtune

    config = "examples/quickstart.yaml"
    heldout = "examples/quickstart/heldout.jsonl"
    steps = [
        ("untrained model (random init), held-out accuracy",
         ["evaluate", "--config", config, "--data", heldout]),
        ("training", ["train", "--config", config, "--output_dir", args.output_dir,
                      "--resume_from_checkpoint", "false"]),
        ("trained model, held-out accuracy",
         ["evaluate", "--model", args.output_dir, "--data", heldout]),
    ]
    start = time.perf_counter()
    for title, argv in steps:
        print(f"\n== {title}: fmtune {' '.join(argv)}", flush=True)
        code = fmtune(argv)
        if code:
            return code
    print(f"\nquickstart finished in {time.perf_counter() - start:.0f} s; "
          f"the model is in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
