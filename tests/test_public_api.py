"""The public API for plugins is what docs/plugins.md lists under "Utilities for plugins".

* every listed name exists in its module;
* the modules that exist for plugins (``fmtune.models``, ``records``, ``logs``, ``commands``,
  ``stash``) export (``__all__``) exactly what is listed;
* no first-party plugin (``plugins/*/fmtune_*``, the packages under ``examples/*``) imports
  anything else from the core; their ``tests/`` folders and the example scripts are held to
  the same rule and may also use the entry point the doc lists "for tests and scripts only";
* importing a listed module imports neither torch nor transformers (each in a fresh process).
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"
SECTION = "## Utilities for plugins"
# modules written for plugins: their __all__ is the documented list
API_MODULES = ("fmtune.models", "fmtune.records", "fmtune.logs", "fmtune.commands", "fmtune.stash")
HEADING = re.compile(r"^### `(fmtune(?:\.\w+)*)`(.*)$")
ROW = re.compile(r"^\| `([A-Za-z_][A-Za-z0-9_]*)` \|")


def documented() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(public, tests_only)``: module -> names, from the doc section's ``### `module` ``
    headings and the first column of the table under each (a heading that says "tests and
    scripts only" lists names for tests and scripts)."""
    text = DOC.read_text(encoding="utf-8")
    assert SECTION in text, f"{DOC}: no {SECTION!r} section"
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    public: dict[str, set[str]] = {}
    tests_only: dict[str, set[str]] = {}
    names: set[str] | None = None
    for line in body.splitlines():
        heading = HEADING.match(line)
        if heading:
            table = tests_only if "tests and scripts only" in heading.group(2) else public
            names = table.setdefault(heading.group(1), set())
            continue
        row = ROW.match(line)
        if row and names is not None:
            names.add(row.group(1))
    return public, tests_only


PUBLIC, TESTS_ONLY = documented()


def test_the_section_lists_the_api():
    assert {"fmtune", "fmtune.models", "fmtune.records", "fmtune.logs", "fmtune.tracking",
            "fmtune.testing", "fmtune.stash", "fmtune.commands", "fmtune.plugins",
            "fmtune.config", "fmtune.hookspecs"} <= set(PUBLIC)
    assert all(PUBLIC.values()), {m for m, names in PUBLIC.items() if not names}
    assert TESTS_ONLY == {"fmtune.cli": {"main"}}


@pytest.mark.parametrize("module,name", sorted((m, n) for m, names in {**PUBLIC, **TESTS_ONLY}.items()
                                               for n in names))
def test_listed_name_exists(module, name):
    assert hasattr(importlib.import_module(module), name), f"{module}.{name} is documented but missing"


@pytest.mark.parametrize("module", API_MODULES)
def test_api_module_exports_what_is_listed(module):
    assert sorted(importlib.import_module(module).__all__) == sorted(PUBLIC[module])


def first_party_files() -> list[tuple[Path, bool]]:
    """``(file, held_as_test)`` for every .py file of the first-party plugins and examples:
    package code (``plugins/*/fmtune_*``, ``examples/*/<package>``) is plugin code; files
    under a ``tests`` folder and the example scripts (``examples/*/*.py``) are tests/scripts."""
    files: list[tuple[Path, bool]] = []
    for top in sorted((ROOT / "plugins").iterdir()) + sorted((ROOT / "examples").iterdir()):
        if not top.is_dir():
            continue
        for path in sorted(top.rglob("*.py")):
            rel = path.relative_to(top)
            if any(part.startswith(".") or part.endswith(".egg-info") or part == "build"
                   for part in rel.parts):
                continue
            files.append((path, "tests" in rel.parts or len(rel.parts) == 1))
    return files


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def core_uses(tree: ast.AST) -> list[tuple[int, str, str]]:
    """``(line, module, name)`` for each core name a file takes: ``from fmtune.X import Y``,
    and the attributes read through ``import fmtune.X`` or ``from fmtune import X``."""
    uses: list[tuple[int, str, str]] = []
    bound: dict[str, str] = {}  # local name -> the core module it is
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "fmtune" or node.module.startswith("fmtune.")):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in PUBLIC or sub in TESTS_ONLY:  # a listed module, imported by name
                    bound[alias.asname or alias.name] = sub
                else:
                    uses.append((node.lineno, node.module, alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "fmtune" or alias.name.startswith("fmtune."):
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        bound["fmtune"] = "fmtune"
                    if alias.name not in PUBLIC and alias.name not in TESTS_ONLY:
                        uses.append((node.lineno, alias.name, "(module)"))
    for node in ast.walk(tree):
        dotted = _dotted(node) if isinstance(node, ast.Attribute) else None
        if not dotted or dotted.split(".", 1)[0] not in bound:
            continue
        head, _, rest = dotted.partition(".")
        path = [*bound[head].split("."), *rest.split(".")]
        for cut in range(len(path) - 1, 0, -1):  # the longest listed module, then its name
            module = ".".join(path[:cut])
            if module in PUBLIC or module in TESTS_ONLY:
                if ".".join(path[:cut + 1]) not in PUBLIC:  # not itself a listed module
                    uses.append((node.lineno, module, path[cut]))
                break
    return sorted(set(uses))


def allowed(module: str, name: str, as_test: bool) -> bool:
    if name in PUBLIC.get(module, ()):
        return True
    return as_test and name in TESTS_ONLY.get(module, ())


def test_first_party_plugins_import_only_the_public_api():
    files = first_party_files()
    assert any("fmtune_dpo" in str(f) for f, _ in files) and any(t for _, t in files)
    bad = []
    for path, as_test in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for line, module, name in core_uses(tree):
            if not allowed(module, name, as_test):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {module}.{name}")
    assert not bad, ("not in docs/plugins.md's 'Utilities for plugins' (use a listed name, or "
                     "list it there):\n  " + "\n  ".join(bad))


def test_the_scan_sees_every_way_of_importing():
    tree = ast.parse("from fmtune.records import read_records, build_dataset\n"
                     "from fmtune import hookimpl, chat_templates, records\n"
                     "import fmtune.hub\n"
                     "import fmtune.logs as L\n"
                     "records.join; records.tokenize_pairs; L.FILENAME; L.NAMES\n"
                     "import fmtune\n"
                     "fmtune.models.resolve_dtype; fmtune.truncation.cut; fmtune.__version__\n")
    bad = [(m, n) for _, m, n in core_uses(tree) if not allowed(m, n, False)]
    assert sorted(bad) == [("fmtune", "chat_templates"), ("fmtune", "truncation"),
                           ("fmtune.hub", "(module)"), ("fmtune.logs", "NAMES"),
                           ("fmtune.records", "build_dataset"),
                           ("fmtune.records", "tokenize_pairs")]


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_importing_a_public_module_is_cheap(module):
    code = (f"import sys, {module}; "
            "print(' '.join(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"import {module} imports {out.stdout.strip()}"
