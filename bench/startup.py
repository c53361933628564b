"""Start-up cost of the CLI: `fmtune --help` wall time as a ratio to `python -c "import torch"`.

Both are timed side by side in the same run (median of N runs each, alternating),
and the result is printed and written into docs/benchmarks.md.

    .venv/bin/python bench/startup.py [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    cmds = {
        "fmtune --help": [str(BIN / "fmtune"), "--help"],
        "fmtune plugins": [str(BIN / "fmtune"), "plugins"],
        "fmtune train --help": [str(BIN / "fmtune"), "train", "--help"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    }
    for cmd in cmds.values():  # warm the file cache
        timed(cmd)
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(args.runs):
        for name, cmd in cmds.items():
            times[name].append(timed(cmd))
    med = {k: statistics.median(v) for k, v in times.items()}
    torch_s = med["python -c 'import torch'"]
    rows = [f"| `{k}` | {v:.3f} | {v / torch_s:.3f} |" for k, v in med.items()]
    table = "\n".join(["| command | median wall time (s) | ratio to `import torch` |",
                       "|---|---|---|", *rows])
    print(table)
    if not args.no_write:
        write_section("startup", f"Command: `.venv/bin/python bench/startup.py --runs {args.runs}` "
                      f"({os.cpu_count()} CPUs, median of {args.runs} alternating runs). "
                      "Target: `fmtune --help` below 0.25 of `import torch`.\n\n" + table)


def write_section(name: str, body: str, doc: str = "benchmarks.md") -> None:
    """Replace the `<!-- bench:NAME -->` section of docs/DOC (the bench scripts share this)."""
    path = ROOT / "docs" / doc
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## {name}\n\n{block}\n"
    path.write_text(text)

if __name__ == "__main__":
    main()
