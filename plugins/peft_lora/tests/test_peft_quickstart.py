"""The core quickstart with `--plugins lora`: the adapter learns the task like full fine-tuning.

The quickstart model has random weights, so LoRA alone has little to adapt: the (tied)
embeddings are trained in full (modules_to_save embed_tokens) and every linear layer gets a
rank-16 adapter. 3 epochs (189 steps, batch 32) reach 100/100 held-out exact match here; full
fine-tuning runs 4 epochs (252 steps) in tests/test_quickstart.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fmtune.records import read_records
from fmtune.testing import exact_match, load_for_inference, run_cli

ROOT = Path(__file__).resolve().parents[3]


def test_quickstart_with_lora_learns_the_task(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)  # the quickstart's paths are relative to the repository root
    out = tmp_path / "qs-lora"
    res = run_cli(["train", "--config", "examples/quickstart.yaml", "--output_dir", str(out),
                   "--plugins", "lora", "--r", "16", "--target_modules", "all-linear",
                   "--modules_to_save", "embed_tokens", "--num_train_epochs", "3"])
    assert res.exit_code == 0, res.stderr[-2000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == 189  # 2000 records / batch 32 -> 63 steps x 3 epochs
    # an adapter, and the random base it was trained on (saved, since nothing else has it)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(out / "base_model")
    assert os.path.isfile(out / "base_model" / "model.safetensors")
    heldout = read_records("examples/quickstart/heldout.jsonl")
    model, tok = load_for_inference(str(out))  # what fmtune evaluate --model OUT uses
    acc, preds = exact_match(model, tok, heldout, max_new_tokens=16)
    print(f"quickstart with LoRA: held-out exact match {acc:.2f} after 189 steps")
    assert acc >= 0.90, list(zip([r["output"] for r in heldout], preds))[:5]
    # the trained embeddings serve as the (tied) output layer too, and stay tied when merged
    merged = model.merge_and_unload()
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
