"""`fmtune preprocess` vs fms-hf-tuning's `--do_dataprocessing_only`, side by side in one run.

Generates 50,000 input/output JSONL records and one tokenizer (saved with a
tiny model folder, as both tools want a model path), then runs, end to end
(process start to exit), fms-hf-tuning in its own virtualenv and fmtune in
.venv, alternating, and compares the written input_ids/labels record by
record. fms-hf-tuning pins torch < 2.9 and transformers 4.x, so it gets its
own virtualenv (FMS_VENV, default bench/.venv-fms), created on first use.

    .venv/bin/python bench/preprocess.py [--records 50000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
FMS_VENV = Path(os.environ.get("FMS_VENV", ROOT / "bench" / ".venv-fms"))
FMS_VERSION = "3.2.2"
WORDS = ("the quick brown fox jumps over lazy dog red cat sees a small big old happy what is "
         "two plus four question answer translate le chat rouge voit un chien").split()


def ensure_fms() -> Path:
    py = FMS_VENV / "bin" / "python"
    if not py.exists():
        print(f"creating {FMS_VENV} with fms-hf-tuning=={FMS_VERSION} (several minutes)...")
        subprocess.run(["python3.11", "-m", "venv", str(FMS_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "--quiet",
                        f"fms-hf-tuning=={FMS_VERSION}"], check=True)
    return py


def timed(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> float:
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if out.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return time.perf_counter() - t


def read_rows(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    files = sorted(folder.rglob("*.parquet"))
    return [r for f in files for r in pq.read_table(f, columns=["input_ids", "labels"]).to_pylist()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    fms_py = ensure_fms()
    from fmtune.testing import build_tiny_model, write_jsonl

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        recs = [{"input": " ".join(rng.choices(WORDS, k=rng.randint(3, 40))),
                 "output": " ".join(rng.choices(WORDS, k=rng.randint(1, 60)))}
                for _ in range(args.records)]
        data = write_jsonl(d / "data.jsonl", recs)
        model = build_tiny_model(d / "model", [r["input"] + " " + r["output"] for r in recs[:2000]])
        # transformers 5 writes tokenizer_class "TokenizersBackend", unknown to the 4.x that
        # fms-hf-tuning pins; the classic name loads the same tokenizer.json in both.
        cfg_path = d / "model" / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(d / "cache"),
               "TOKENIZERS_PARALLELISM": "true"}
        fms_cmd = [str(fms_py), "-m", "tuning.sft_trainer", "--model_name_or_path", str(model),
                   "--training_data_path", data, "--output_dir", str(d / "fms"),
                   "--do_dataprocessing_only", "True", "--max_seq_length", "1024",
                   "--use_cpu", "True", "--use_flash_attn", "False"]
        fmt_cmd = [str(BIN / "fmtune"), "preprocess", "--model_name_or_path", str(model),
                   "--training_data_path", data, "--output_dir", str(d / "fmtune"),
                   "--max_seq_length", "1024"]
        times = {"fms-hf-tuning": [], "fmtune": []}
        for k in range(args.repeats):
            # a fresh datasets cache for every run of each tool: nothing converted or mapped
            # by one run (or by the other tool) is reused.
            # fms-hf-tuning writes error.log into its working directory: keep it in the temp dir
            env["HF_DATASETS_CACHE"] = str(d / f"cache-fms-{k}")
            times["fms-hf-tuning"].append(timed(fms_cmd, env, cwd=d))
            env["HF_DATASETS_CACHE"] = str(d / f"cache-fmtune-{k}")
            times["fmtune"].append(timed(fmt_cmd, env, cwd=d))
        fms_rows = read_rows(d / "fms" / "train_dataset")
        fmt_rows = read_rows(d / "fmtune" / "train_dataset")
    same_ids = sum(a["input_ids"] == b["input_ids"] for a, b in zip(fms_rows, fmt_rows))
    same_labels = sum(list(a["labels"]) == list(b["labels"]) for a, b in zip(fms_rows, fmt_rows))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["fms-hf-tuning"] / med["fmtune"]
    table = "\n".join([
        "| tool | end-to-end wall time (s), median | runs |", "|---|---|---|",
        *(f"| {k} | {med[k]:.1f} | {', '.join(f'{t:.1f}' for t in v)} |" for k, v in times.items()),
        "", f"fmtune is **{ratio:.1f}x** faster. Records compared: {len(fmt_rows)} fmtune, "
        f"{len(fms_rows)} fms-hf-tuning; identical input_ids: {same_ids}, identical labels: "
        f"{same_labels}."])
    print(table)
    if not args.no_write:
        write_section("preprocess", f"Command: `.venv/bin/python bench/preprocess.py --records "
                      f"{args.records} --repeats {args.repeats}` ({os.cpu_count()} CPUs; "
                      f"fms-hf-tuning {FMS_VERSION} in its own virtualenv, "
                      "`--do_dataprocessing_only True`; fmtune `preprocess`; same JSONL of "
                      "input/output records, same byte-level BPE tokenizer, fresh datasets cache "
                      "for every run).\n\n" + table)


if __name__ == "__main__":
    main()
