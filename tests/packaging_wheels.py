"""Each first-party plugin as a user gets it: a wheel, installed alone with the core's wheel
into a clean virtualenv, listed by `fmtune plugins`, passing its own tests there.

Not part of `make test` (pytest collects only test_*.py): `make packaging` runs it with
    .venv/bin/python -m pytest tests/packaging_wheels.py
One clean virtualenv is built per session (torch and the core's dependencies from the
package index / local wheels, then the core's wheel); each plugin's wheel is installed into
it (with the first-party plugins its `test` extra names, which its own tests use), checked,
and uninstalled again, so every plugin is seen without the others.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIRS = sorted(p.parent for p in ROOT.glob("plugins/*/pyproject.toml"))
# the tested set of packages (`make lock`): every install here goes through it, as in the Makefile
LOCK = ROOT / "requirements" / "lock.txt"
IGNORE = shutil.ignore_patterns("*.egg-info", "__pycache__", "build", "dist", ".pytest_cache")


def run(*argv, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)
    command = " ".join(map(str, argv))
    assert res.returncode == 0, f"{command}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def build_wheel(source: Path, tmp: Path, out: Path) -> Path:
    """``pip wheel`` from a copy (the build writes next to the sources)."""
    copy = tmp / f"src-{source.name}"
    shutil.copytree(source, copy, ignore=IGNORE)
    before = set(out.glob("*.whl"))
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "-w", out, copy)
    (wheel,) = set(out.glob("*.whl")) - before
    return wheel


@pytest.fixture(scope="session")
def venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packaging")
    wheels = tmp / "wheels"
    wheels.mkdir()
    core_src = tmp / "core-src"
    core_src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, core_src / name)
    shutil.copytree(ROOT / "core", core_src / "core", ignore=IGNORE)
    core_wheel = build_wheel(core_src, tmp, wheels)
    env_dir = tmp / "venv"
    run(sys.executable, "-m", "venv", env_dir)
    py = env_dir / "bin" / "python"
    # as the Makefile does: the torch on this machine's disk first, so pip downloads none
    run(py, "-m", "pip", "install", "--quiet", "--constraint", LOCK, "torch")
    run(py, "-m", "pip", "install", "--quiet", "--constraint", LOCK, f"{core_wheel}[test]")
    for plugin_dir in PLUGIN_DIRS:  # pip finds a plugin's first-party test extras here
        build_wheel(plugin_dir, tmp, wheels)
    return {"python": py, "bin": env_dir / "bin", "tmp": tmp, "wheels": wheels}


def test_core_alone(venv):
    rows = json.loads(run(venv["bin"] / "fmtune", "plugins", "--json").stdout)
    assert [r["name"] for r in rows if not r["name"].startswith("default:")] == []
    where = run(venv["python"], "-c", "import fmtune; print(fmtune.__file__)").stdout.strip()
    assert where.startswith(str(venv["bin"].parent))


@pytest.mark.parametrize("plugin_dir", PLUGIN_DIRS, ids=[p.name for p in PLUGIN_DIRS])
def test_plugin_wheel_alone(plugin_dir, venv):
    project = tomllib.loads((plugin_dir / "pyproject.toml").read_text())["project"]
    entry_points = sorted(project["entry-points"]["fmtune"])
    # first-party plugins its own tests use, declared in its `test` extra (e.g. dpo's tests
    # train dpo,lora): installed with it, from the wheels built here
    extras = [Requirement(r) for r in project.get("optional-dependencies", {}).get("test", [])]
    first_party = {canonicalize_name(tomllib.loads((d / "pyproject.toml").read_text())[
        "project"]["name"]): d for d in PLUGIN_DIRS}
    helpers = [first_party[canonicalize_name(r.name)] for r in extras
               if canonicalize_name(r.name) in first_party]
    for d in helpers:
        entry_points += tomllib.loads((d / "pyproject.toml").read_text())["project"][
            "entry-points"]["fmtune"]
    entry_points = sorted(entry_points)
    py, fmtune = venv["python"], venv["bin"] / "fmtune"
    wanted = project["name"] + ("[test]" if extras else "")
    run(py, "-m", "pip", "install", "--quiet", "--constraint", LOCK, "--find-links",
        venv["wheels"], wanted)
    try:
        rows = json.loads(run(fmtune, "plugins", "--json").stdout)
        plugins = {r["name"]: r for r in rows if not r["name"].startswith("default:")}
        assert sorted(plugins) == entry_points  # this distribution's plugins (+ test extras)
        for row in plugins.values():
            if row["name"] not in project["entry-points"]["fmtune"]:
                continue
            assert row["error"] is None and row["hooks"], row
            assert row["distribution"] == project["name"]
            assert row["version"] == project["version"]
            assert row["requires_fmtune"].startswith("fmtune")
        own = sorted(project["entry-points"]["fmtune"])
        module = project["entry-points"]["fmtune"][own[0]].split(":")[0]
        where = run(py, "-c", f"import {module}; print({module}.__file__)").stdout.strip()
        assert where.startswith(str(venv["bin"].parent)), where  # the wheel, not the sources
        # the plugin's own tests, against the installed wheels (not the checkout's sources)
        tests = run(py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                    plugin_dir / "tests", cwd=ROOT,
                    env={**os.environ, "PYTHONPATH": "", "PYTHONDONTWRITEBYTECODE": "1"})
        assert " passed" in tests.stdout and " failed" not in tests.stdout
    finally:
        run(py, "-m", "pip", "uninstall", "--quiet", "--yes", project["name"],
            *(tomllib.loads((d / "pyproject.toml").read_text())["project"]["name"]
              for d in helpers))
