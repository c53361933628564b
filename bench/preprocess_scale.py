"""Preprocessing at scale with real tokenizers: fmtune now vs before vs fms-hf-tuning.

Builds, with no download, a sentencepiece-style Llama tokenizer (BPE with byte fallback,
``LlamaTokenizerFast``, ``fmtune.testing.build_llama_tokenizer``) or fmtune's byte-level
BPE, saved with a random-init tiny Llama, and JSONL input/output records. Then runs, end to end
(process start to exit) and in interleaved rounds:

* ``fmtune``: ``fmtune preprocess`` of this working tree;
* ``before``: ``fmtune preprocess`` of a git revision (``--before REV``, default HEAD; its
  ``core`` and ``plugins/data_handlers`` extracted with ``git archive`` and put first on
  PYTHONPATH);
* ``fms-hf-tuning``: ``python -m tuning.sft_trainer --do_dataprocessing_only True`` in its own
  virtualenv (``FMS_VENV``, default /tmp/fms-venv; skipped when it has no ``tuning``).

Every tool's written input_ids/labels are compared record by record with fmtune's.
Reports wall seconds, CPU seconds (user+sys of the process tree) and peak RSS.

    .venv/bin/python bench/preprocess_scale.py --tokenizer llama --records 10000,50000 --repeats 2
    .venv/bin/python bench/preprocess_scale.py --rss-only --records 1000000   # one 1M-record run
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from startup import write_section  # noqa: E402
BIN = Path(sys.executable).parent
WORDS = ("the quick brown fox jumps over lazy dog red cat sees a small big old happy what is "
         "two plus four question answer translate le chat rouge voit un chien café naïve "
         "Zürich 東京 1234 don't (x) e-mail").split()


def records(n: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        yield {"input": " ".join(rng.choices(WORDS, k=rng.randint(3, 40))),
               "output": " ".join(rng.choices(WORDS, k=rng.randint(1, 60)))}


def write_data(path: Path, n: int) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records(n):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def build_model(folder: Path, kind: str) -> str:
    """A tiny random-init Llama with the ``kind`` tokenizer (llama or bpe)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fmtune.testing import TINY_LLAMA, build_tokenizer

    texts = [r["input"] + " " + r["output"] for r in records(2000, seed=1)]
    if kind == "llama":
        from fmtune.testing import build_llama_tokenizer

        build_llama_tokenizer(folder, texts, vocab_size=2000)
        from tokenizers import Tokenizer

        vocab, eos, pad, bos = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(), 2, None, 1
    else:
        tok = build_tokenizer(texts, vocab_size=2000)
        tok.save_pretrained(folder)
        # transformers 5 writes "TokenizersBackend", unknown to fms-hf-tuning's 4.x
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
        vocab, eos, pad, bos = len(tok), tok.eos_token_id, tok.pad_token_id, None
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, vocab_size=vocab, eos_token_id=eos,
                                 pad_token_id=pad, bos_token_id=bos)).save_pretrained(folder)
    return str(folder)


def before_tree(rev: str, dest: Path) -> dict:
    """``core`` and ``plugins/data_handlers`` of git revision ``rev``, first on PYTHONPATH."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "core",
                              "plugins/data_handlers"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return {"PYTHONPATH": f"{dest / 'core'}:{dest / 'plugins' / 'data_handlers'}"}


def measured(cmd: list[str], env: dict, cwd: Path) -> dict:
    """Run ``cmd`` under GNU time: wall s, CPU s (user+sys, children included), peak RSS MB."""
    stats = cwd / ".time"
    out = subprocess.run(["/usr/bin/time", "-o", str(stats), "-f", "%e %U %S %M", *cmd],
                         capture_output=True, text=True, env=env, cwd=cwd)
    if out.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    wall, user, system, rss = stats.read_text().split()[-4:]
    return {"wall": float(wall), "cpu": float(user) + float(system), "rss": int(rss) / 1024,
            "stderr": out.stderr}


def read_rows(folder: Path):
    import pyarrow.parquet as pq

    for f in sorted(folder.rglob("*.parquet")):
        for batch in pq.ParquetFile(f).iter_batches(columns=["input_ids", "labels"]):
            yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())


def same_rows(a: Path, b: Path) -> tuple[int, int, int]:
    """(rows of b, identical input_ids, identical labels) comparing b's rows with a's."""
    n = ids = labels = 0
    for (ia, la), (ib, lb) in zip(read_rows(a), read_rows(b)):
        n, ids, labels = n + 1, ids + (ia == ib), labels + (list(la) == list(lb))
    return n, ids, labels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", choices=("llama", "bpe"), default="llama")
    ap.add_argument("--records", default="10000,50000,200000")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tools", default="fmtune,before,fms-hf-tuning")
    ap.add_argument("--before", default="HEAD", help="git revision of the 'before' fmtune")
    ap.add_argument("--rss-only", action="store_true",
                    help="one fmtune run per size: wall, CPU, peak RSS (no comparison)")
    ap.add_argument("--extra", default="", help="more fmtune preprocess options")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--write", action="store_true", help="write docs/data-at-scale.md's section")
    args = ap.parse_args()
    sizes = [int(x) for x in args.records.split(",")]
    tools = args.tools.split(",") if not args.rss_only else ["fmtune"]
    fms_py = Path(os.environ.get("FMS_VENV", "/tmp/fms-venv")) / "bin" / "python"
    if "fms-hf-tuning" in tools and subprocess.run(
            [str(fms_py), "-c", "import tuning"], capture_output=True).returncode:
        print(f"no fms-hf-tuning in {fms_py.parent.parent}: skipped")
        tools.remove("fms-hf-tuning")
    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    d = Path(args.workdir or tmp.name)
    d.mkdir(parents=True, exist_ok=True)
    model = build_model(d / f"model-{args.tokenizer}", args.tokenizer) if not (
        d / f"model-{args.tokenizer}" / "config.json").exists() else str(d / f"model-{args.tokenizer}")
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}
    envs = {"fmtune": {}, "fms-hf-tuning": {}}
    if "before" in tools:
        envs["before"] = before_tree(args.before, d / "before")
    results = []
    for n in sizes:
        data = d / f"data-{n}.jsonl"
        if not data.exists():
            write_data(data, n)
        times = {t: [] for t in tools}
        for k in range(args.repeats if not args.rss_only else 1):
            for tool in tools:  # interleaved: every round runs each tool once
                out = d / f"out-{tool}-{n}"
                env = {**base_env, **envs[tool], "HF_DATASETS_CACHE": str(d / f"cache-{tool}-{n}-{k}")}
                if tool == "fms-hf-tuning":
                    cmd = [str(fms_py), "-m", "tuning.sft_trainer", "--model_name_or_path", model,
                           "--training_data_path", str(data), "--output_dir", str(out),
                           "--do_dataprocessing_only", "True", "--max_seq_length", "1024",
                           "--use_cpu", "True", "--use_flash_attn", "False"]
                else:
                    cmd = [str(BIN / "fmtune"), "preprocess", "--model_name_or_path", model,
                           "--training_data_path", str(data), "--output_dir", str(out),
                           "--max_seq_length", "1024", *args.extra.split()]
                r = measured(cmd, env, d)
                times[tool].append(r)
                print(f"{n} {tool} round {k}: wall {r['wall']:.1f} s, cpu {r['cpu']:.1f} s, "
                      f"peak RSS {r['rss']:.0f} MB", flush=True)
                subprocess.run(["rm", "-rf", env["HF_DATASETS_CACHE"]])
        checks = {t: same_rows(d / f"out-fmtune-{n}" / "train_dataset",
                               d / f"out-{t}-{n}" / "train_dataset")
                  for t in tools if t != "fmtune"}
        results.append((n, times, checks))
    table = report(results, tools)
    print(table)
    if args.write:
        write_section(f"preprocess-{args.tokenizer}" if not args.rss_only else "preprocess-rss",
                      f"Command: `.venv/bin/python bench/preprocess_scale.py "
                      f"{' '.join(sys.argv[1:])}` ({os.cpu_count()} CPUs, "
                      f"load average {os.getloadavg()[0]:.1f} at the end)\n\n{table}",
                      doc="data-at-scale.md")
    if tmp is not None:
        tmp.cleanup()


def report(results, tools) -> str:
    med = statistics.median
    lines = ["| records | tool | wall s (median) | CPU s (median) | peak RSS MB | runs (wall/CPU) |"
             " CPU ratio vs fmtune | identical ids / labels |", "|---|---|---|---|---|---|---|---|"]
    for n, times, checks in results:
        base = med(r["cpu"] for r in times["fmtune"])
        for t in tools:
            rs = times[t]
            cpu = med(r["cpu"] for r in rs)
            same = checks.get(t)
            lines.append(
                f"| {n:,} | {t} | {med(r['wall'] for r in rs):.1f} | {cpu:.1f} | "
                f"{max(r['rss'] for r in rs):.0f} | "
                f"{', '.join('%.1f/%.1f' % (r['wall'], r['cpu']) for r in rs)} | "
                f"{cpu / base:.2f}x | "
                f"{f'{same[1]:,} / {same[2]:,} of {same[0]:,}' if same else '-'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
