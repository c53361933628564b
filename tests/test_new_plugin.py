"""`fmtune new-plugin NAME`: the written distribution pip-installs, is listed, and its own test
passes with it installed (the path docs/plugins.md tells plugin authors to take)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fmtune.scaffold import core_requirement
from fmtune.testing import run_cli

FMTUNE = os.path.join(os.path.dirname(sys.executable), "fmtune")


def test_the_scaffold_installs_and_passes_its_own_test(tmp_path):
    made = run_cli(["new-plugin", "loss_file", "--dir", str(tmp_path)])
    assert made.exit_code == 0, made.stderr
    dist = tmp_path / "fmtune-loss-file"
    assert sorted(str(p.relative_to(dist)) for p in dist.rglob("*") if p.is_file()) == [
        "README.md", "fmtune_loss_file/__init__.py", "pyproject.toml",
        "tests/test_loss_file.py"]
    assert [p.name for p in tmp_path.iterdir()] == ["fmtune-loss-file"]  # no staging left

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(dist)],
                   check=True, capture_output=True, cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(site)}
    listed = subprocess.run([FMTUNE, "plugins", "--json"], env=env, capture_output=True,
                            text=True)
    assert listed.returncode == 0, listed.stderr
    row = {r["name"]: r for r in json.loads(listed.stdout)}["loss_file"]
    assert row["distribution"] == "fmtune-loss-file" and row["error"] is None
    assert row["hooks"] == ["add_options", "on_log", "validate_config"]
    assert row["requires_fmtune"] == "fmtune<0.2,>=0.1"  # packaging's normal form

    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(dist / "tests")], env=env, capture_output=True, text=True,
                           cwd=dist)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert "2 passed" in tests.stdout


def test_an_existing_folder_or_a_bad_name_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "fmtune-taken").mkdir()
    taken = run_cli(["new-plugin", "taken", "--dir", str(tmp_path)])
    assert taken.exit_code == 2
    assert taken.stderr.strip().splitlines() == [
        f"fmtune: error: new-plugin: {tmp_path / 'fmtune-taken'} exists already; nothing was "
        "written"]
    bad = run_cli(["new-plugin", "My-Plugin", "--dir", str(tmp_path)])
    assert bad.exit_code == 2 and "use lower-case letters, digits and _" in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fmtune-taken"]
    assert list((tmp_path / "fmtune-taken").iterdir()) == []


def test_core_requirement_allows_only_the_minor_version_made_for():
    assert core_requirement("0.1.0") == "fmtune>=0.1,<0.2"
    assert core_requirement("1.4.2") == "fmtune>=1.4,<2"
    assert Path(__file__).exists()
