"""Shared fixtures: a fake installed plugin distribution on sys.path (real entry points)."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest


@pytest.fixture
def install_fake_plugin(tmp_path, monkeypatch):
    """Write a module + ``*.dist-info`` with an ``fmtune`` entry point onto sys.path.

    ``install_fake_plugin("myplug", "source code")`` makes ``--plugins myplug``
    find it through importlib.metadata, exactly as a pip-installed plugin.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    added: list[str] = []

    def install(name: str, source: str, version: str = "1.2.3",
                commands: dict[str, str] | None = None) -> Path:
        module = f"fmtune_fake_{name}"
        (site / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        dist = site / f"fmtune_fake_{name}-{version}.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: fmtune-fake-{name}\nVersion: {version}\n", encoding="utf-8")
        eps = f"[fmtune]\n{name} = {module}\n"
        if commands:
            eps += "[fmtune.commands]\n" + "".join(
                f"{cmd} = {module}:{fn}\n" for cmd, fn in commands.items())
        (dist / "entry_points.txt").write_text(eps, encoding="utf-8")
        added.append(module)
        importlib.invalidate_caches()
        return site

    yield install
    for module in added:
        sys.modules.pop(module, None)
    importlib.invalidate_caches()
