"""Quiet by default: a LoRA run that uses no GPTQ model neither imports gptqmodel (its banner,
its environment changes) nor prints library notices that are not the user's business;
`--verbose` shows the notices (issue 13)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fmtune.testing import train_argv

SCRIPT = """
import json, os, sys
from fmtune.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "gptqmodel": "gptqmodel" in sys.modules,
                  "alloc_conf": os.environ.get("PYTORCH_ALLOC_CONF")}))
"""
NOISE = ("GPT-QModel", "Python GIL is enabled", "ENV: Auto setting", "_pytree.py",
         "pip install kernels", "No CUDA runtime is found", "is_gradient_checkpointing")


def _run(argv):
    # gptqmodel, imported by earlier tests in this process, set these in our environment
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTORCH_ALLOC_CONF", "CUDA_DEVICE_ORDER")}
    res = subprocess.run([sys.executable, "-c", SCRIPT, *argv], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1]), res.stdout + res.stderr


def test_lora_run_is_quiet_and_never_imports_gptqmodel(fmtune_tiny_model, data, tmp_path):
    argv = train_argv(fmtune_tiny_model, data, tmp_path / "out", "--plugins", "lora",
                      "--max_steps", "1")
    state, output = _run(argv)
    assert state == {"code": 0, "gptqmodel": False, "alloc_conf": None}
    assert [n for n in NOISE if n in output] == []
    assert "fmtune: done" in output
    # loading the adapter again (generate, merge) does not import it either
    for argv in (["generate", "--model", str(tmp_path / "out"), "--text", "hello",
                  "--max_new_tokens", "2"],
                 ["merge", str(tmp_path / "out"), str(tmp_path / "merged")]):
        state, output = _run(argv)
        assert state == {"code": 0, "gptqmodel": False, "alloc_conf": None}, argv
        assert [n for n in NOISE if n in output] == [], argv
