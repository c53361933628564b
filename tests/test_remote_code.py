"""A model folder's own Python code (``auto_map``) never runs unless --trust_remote_code is given,
and fmtune never asks on stdin: ``echo y | fmtune ...`` must not run it (issue 15)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fmtune.testing import write_jsonl

FMTUNE = [sys.executable, "-m", "fmtune.cli"]

EVIL = '''
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "evil"


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
'''


def _evil_folder(tiny: str, where: Path) -> tuple[Path, Path]:
    folder = where / "evil"
    shutil.copytree(tiny, folder)
    marker = where / "REMOTE_CODE_RAN"
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)), encoding="utf-8")
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cfg["model_type"] = "evil"  # unknown to transformers: only the folder's code can load it
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return folder, marker


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "modules")}
    return subprocess.run([*FMTUNE, *argv], input="y\ny\ny\n", capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize("command", ["train", "generate"])
def test_yes_on_stdin_runs_no_remote_code(fmtune_tiny_model, tmp_path, command):
    folder, marker = _evil_folder(fmtune_tiny_model, tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", [{"input": "a", "output": "b"}] * 4)
    if command == "train":
        argv = ["train", "--model_name_or_path", str(folder), "--training_data_path", data,
                "--output_dir", str(tmp_path / "out"), "--max_steps", "1"]
    else:
        argv = ["generate", "--model", str(folder), "--text", "hello"]
    res = _run(argv, tmp_path)
    assert res.returncode == 2, res.stderr
    assert not marker.exists(), "the folder's code ran"
    errors = [line for line in res.stderr.splitlines() if line.startswith("fmtune: error:")]
    assert len(errors) == 1 and "--trust_remote_code true" in errors[0], res.stderr
    assert "Traceback" not in res.stderr and "[y/N]" not in res.stderr + res.stdout


def test_trust_remote_code_true_runs_it(fmtune_tiny_model, tmp_path):
    """The explicit option is the one way in (and proves the folder's code is really loadable)."""
    folder, marker = _evil_folder(fmtune_tiny_model, tmp_path)
    res = _run(["generate", "--model", str(folder), "--text", "hello", "--max_new_tokens", "2",
                "--trust_remote_code", "true"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert marker.read_text() == "ran"
