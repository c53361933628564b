"""A run imports only what it uses (fmtune.hub.lean_imports): peft without bitsandbytes and
gptqmodel, transformers without scipy and torchao, accelerate without boto3, and the run's own
process without matplotlib (loss.png is drawn by a child process). Whatever was left out is
imported on first use, so the features that need it work as before."""

from __future__ import annotations

import json
import subprocess
import sys

from fmtune.testing import DEMO_RECORDS, write_jsonl

PROBE = r"""
import json, sys
from fmtune.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "imported": sorted(m for m in (
    "bitsandbytes", "gptqmodel", "scipy", "torchao", "boto3", "matplotlib") if m in sys.modules),
    "peft": "peft" in sys.modules}))
"""


def test_lora_run_imports_only_what_it_uses(fmtune_tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", DEMO_RECORDS)
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-c", PROBE, "train", "--plugins", "lora",
                          "--model_name_or_path", fmtune_tiny_model, "--training_data_path",
                          data, "--output_dir", str(out), "--max_steps", "2",
                          "--per_device_train_batch_size", "4", "--logging_steps", "1"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    state = json.loads(res.stdout.strip().splitlines()[-1])
    assert state == {"code": 0, "imported": [], "peft": True}
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["loss_plot"] == str(out / "loss.png") and (out / "loss.png").stat().st_size
    assert not (out / ".loss.png.pending").exists()


DEFERRED = r"""
import importlib.util, sys
from fmtune.hub import lean_imports
lean_imports()  # as every command does
import numpy as np
import peft, peft.helpers
import transformers.loss.loss_for_object_detection as od
import transformers.quantizers.quantizer_torchao as qt
import accelerate.commands.config.sagemaker as sm
from peft.import_utils import is_bnb_available, is_bnb_4bit_available
from transformers.utils import is_scipy_available, is_torchao_available
assert not {"scipy", "torchao", "bitsandbytes", "boto3"} & set(sys.modules)
installed = {m: importlib.util.find_spec(m) is not None for m in ("scipy", "torchao", "bitsandbytes", "boto3")}
# the libraries' answers are the truth again once the imports are done
assert is_scipy_available() == installed["scipy"] and is_torchao_available() == installed["torchao"]
assert is_bnb_available() == installed["bitsandbytes"]
if installed["scipy"]:  # the object-detection loss's matcher works, importing scipy then
    rows, cols = od.linear_sum_assignment(np.array([[4.0, 1.0], [2.0, 8.0]]))
    assert list(rows) == [0, 1] and list(cols) == [1, 0] and "scipy" in sys.modules
if installed["bitsandbytes"]:
    assert is_bnb_4bit_available() and peft.helpers.bnb.nn.Linear4bit is not None
if installed["torchao"]:  # the quantizer's saving helper is torchao's own, once asked for
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    assert qt.flatten_tensor_state_dict._resolve() is flatten_tensor_state_dict
if installed["boto3"]:
    assert sm.boto3.client is not None and "boto3" in sys.modules
print("ok")
"""


def test_what_was_left_out_is_imported_on_first_use():
    res = subprocess.run([sys.executable, "-c", DEFERRED], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
