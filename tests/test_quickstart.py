"""The embedded quickstart learns its task: >= 90% held-out exact match, ~0% before."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fmtune.cli import load_config
from fmtune.records import read_records
from fmtune.inference import exact_match, load_for_inference
from fmtune.testing import run_cli

ROOT = Path(__file__).resolve().parents[1]
QS = ROOT / "examples" / "quickstart"


@pytest.fixture
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the quickstart's paths are relative to the repository root


def test_data_is_regenerated_exactly_and_heldout_is_unseen(tmp_path):
    copy = tmp_path / "qs"
    copy.mkdir()
    shutil.copy(QS / "make_data.py", copy)
    subprocess.run([sys.executable, str(copy / "make_data.py")], check=True, capture_output=True)
    for name in ("train.jsonl", "heldout.jsonl", "corpus.txt"):
        assert filecmp.cmp(copy / name, QS / name, shallow=False), name
    train = {r["input"] for r in read_records(str(QS / "train.jsonl"))}
    heldout = read_records(str(QS / "heldout.jsonl"))
    assert len(heldout) >= 50
    assert not train & {r["input"] for r in heldout}
    corpus = (QS / "corpus.txt").read_text()
    assert all(r["input"] not in corpus for r in heldout)


def test_quickstart_learns_the_task(in_root, tmp_path):
    heldout = read_records("examples/quickstart/heldout.jsonl")
    # before: the random-init model the config builds
    config, pm, _, _ = load_config(["--config", "examples/quickstart.yaml"])
    tok = pm.hook.load_tokenizer(config=config)
    untrained = pm.hook.load_model(config=config, tokenizer=tok).eval()
    before, _ = exact_match(untrained, tok, heldout, max_new_tokens=12)
    # train exactly as the README says (into a temporary output_dir)
    out = tmp_path / "qs"
    res = run_cli(["train", "--config", "examples/quickstart.yaml", "--output_dir", str(out)])
    assert res.exit_code == 0, res.stderr
    model, tok = load_for_inference(str(out))
    after, preds = exact_match(model, tok, heldout, max_new_tokens=16)
    print(f"quickstart held-out exact match: before {before:.2f}, after {after:.2f}")
    assert before <= 0.05
    assert after >= 0.90, list(zip([r["output"] for r in heldout], preds))[:5]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == 252  # 2000 records / batch 32 -> 63 steps x 4 epochs
    assert os.path.isfile(out / "tokenizer.json")


def test_evaluate_command(in_root, tmp_path):
    res = run_cli(["evaluate", "--config", "examples/quickstart.yaml",
                   "--data", "examples/quickstart/heldout.jsonl", "--max_new_tokens", "4",
                   "--show", "1"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "exact match: 0.000 (0/100)"
    assert res.stdout.startswith("  'translate: the bird eats a cat =' -> ")
