"""The optional extras (`pip install fmtune[flash-attn]`, `fmtune[kernels]`) resolve against the
package index with the locked set. flash-attn cannot be built here (it needs CUDA), so for it the
index must list a release the extra admits; `kernels` is resolved for real (pip --dry-run)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
LOCK = ROOT / "requirements" / "lock.txt"


def test_extras_declared():
    assert [Requirement(r).name for r in EXTRAS["flash-attn"]] == ["flash-attn"]
    assert [Requirement(r).name for r in EXTRAS["kernels"]] == ["kernels"]


def test_flash_attn_extra_names_a_published_release():
    (req,) = map(Requirement, EXTRAS["flash-attn"])
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", req.name],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    found = re.search(r"^Available versions: (.+)$", out.stdout, re.M)
    assert found, out.stdout
    versions = [Version(v.strip()) for v in found.group(1).split(",")]
    assert any(req.specifier.contains(v) for v in versions), (req, versions[:5])


def test_kernels_extra_resolves_with_the_lock(tmp_path):
    report = tmp_path / "report.json"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
                          "--ignore-installed", "--constraint", str(LOCK), "--report",
                          str(report), *EXTRAS["kernels"]],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert "kernels" in names
