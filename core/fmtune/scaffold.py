"""``fmtune new-plugin NAME``: write a plugin distribution that installs, runs and passes its test.

The result is the smallest complete plugin, following docs/plugins.md: a pyproject with the
entry point users type (``--plugins NAME``) and the core versions it was made for, one
option, two hooks (a check of the option before anything loads, and an event hook that writes
each logged loss to the file the option names), a README, and a test that trains the tiny
model of ``fmtune.testing`` with the plugin installed. Nothing is written when the folder
exists already; the files appear together (written in a temporary folder, then renamed).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from . import __version__
from .config import CommandParser, ConfigError

NAME = re.compile(r"[a-z][a-z0-9_]{0,40}")


def core_requirement(version: str = __version__) -> str:
    """``fmtune>=X.Y,<X.Y+1`` for a 0.x core (a minor version may change the API), else
    ``fmtune>=X.Y,<X+1``."""
    major, minor = (int(p) for p in version.split(".")[:2])
    upper = f"{major}.{minor + 1}" if major == 0 else f"{major + 1}"
    return f"fmtune>={major}.{minor},<{upper}"


def files(name: str) -> dict[str, str]:
    """The distribution's files, by relative path."""
    dist = "fmtune-" + name.replace("_", "-")
    pkg = "fmtune_" + name
    option = f"{name}_losses_file"
    return {
        "pyproject.toml": f'''\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "An fmtune plugin: writes each logged training loss to a JSONL file"
requires-python = ">=3.11"
# the core versions this plugin was made for: checked before the plugin is imported
dependencies = ["{core_requirement()}"]

[project.optional-dependencies]
test = ["pytest>=8"]

# the entry point's name is what users type: fmtune train --plugins {name}
[project.entry-points.fmtune]
{name} = "{pkg}"

[tool.setuptools]
packages = ["{pkg}"]
''',
        f"{pkg}/__init__.py": f'''\
"""fmtune plugin {name!r}: writes each logged training loss to a JSONL file.

Hooks: see the table in fmtune's docs/plugins.md; the public modules a plugin may import are
listed there under "Utilities for plugins".
"""

from __future__ import annotations

import json
import os

from fmtune import hookimpl


@hookimpl
def add_options(register):
    register("{option}", str, None,
             "write {{step, loss}} to this JSONL file at every logging step")


@hookimpl
def validate_config(config):
    path = config.{option}
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        return f"{option}: the folder of {{path}} does not exist"
    return None


@hookimpl
def on_log(run, logs):
    path = run.config.{option}
    if path and run.is_main_process and "loss" in logs:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({{"step": run.state.global_step, "loss": logs["loss"]}}) + "\\n")
''',
        f"tests/test_{name}.py": f'''\
"""Runs with the plugin installed (pip install -e .[test]; pytest)."""

import json


def _train(fmtune_run, model, tmp_path, *extra):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({{"input": f"say {{i}}", "output": f"{{i}}"}}) + "\\n"
                            for i in range(8)))
    return fmtune_run(["train", "--model_name_or_path", model, "--training_data_path", str(data),
                       "--output_dir", str(tmp_path / "out"), "--max_steps", "4",
                       "--logging_steps", "2", "--per_device_train_batch_size", "2",
                       "--save_strategy", "no", "--plugins", "{name}", *extra])


def test_losses_are_written_at_each_logging_step(fmtune_run, fmtune_tiny_model, tmp_path):
    out = tmp_path / "losses.jsonl"
    result = _train(fmtune_run, fmtune_tiny_model, tmp_path, "--{option}", str(out))
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    logged = [json.loads(line) for line in (tmp_path / "out" / "training_logs.jsonl")
              .read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert [r["loss"] for r in rows] == [e["data"]["value"] for e in logged
                                         if e["name"] == "training_loss"]


def test_a_missing_folder_is_refused_before_training(fmtune_run, fmtune_tiny_model, tmp_path):
    result = _train(fmtune_run, fmtune_tiny_model, tmp_path,
                    "--{option}", str(tmp_path / "nowhere" / "losses.jsonl"))
    assert result.exit_code == 2
    assert "{option}: the folder of" in result.stderr
    assert not (tmp_path / "out").exists()
''',
        "README.md": f'''\
# {dist}

An [fmtune](https://pypi.org/project/fmtune/) plugin, made by `fmtune new-plugin {name}`.

```bash
pip install -e '.[test]'
fmtune plugins                        # lists {name}
fmtune train --config run.yaml --plugins {name} --{option} losses.jsonl
pytest                                # trains fmtune's tiny test model with the plugin
```

Start from `{pkg}/__init__.py`: the hooks a plugin may implement and the core modules it may
import are in fmtune's `docs/plugins.md`.
''',
    }


def write(name: str, parent: str | os.PathLike) -> Path:
    """Write the distribution for plugin ``name`` under ``parent``; return its folder."""
    if not NAME.fullmatch(name):
        raise ValueError(f"plugin name {name!r}: use lower-case letters, digits and _ "
                         "(it is what users type after --plugins), starting with a letter")
    target = Path(parent) / ("fmtune-" + name.replace("_", "-"))
    if target.exists():
        raise FileExistsError(f"{target} exists already; nothing was written")
    if not Path(parent).is_dir():
        raise FileNotFoundError(f"{parent} is not a folder")
    staging = Path(tempfile.mkdtemp(prefix=".fmtune-new-plugin-", dir=parent))
    try:
        for rel, text in files(name).items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def cmd_new_plugin(argv: list[str]) -> int:
    parser = CommandParser(prog="fmtune new-plugin",
                           description="Write a new plugin distribution (pyproject with its "
                                       "entry point, one option, two hooks, a README and a "
                                       "passing test) in DIR/fmtune-NAME.")
    parser.add_argument("name", help="the plugin's name, what users type after --plugins")
    parser.add_argument("--dir", default=".", help="where to create it (default: here)")
    args = parser.parse_args(argv)
    try:
        target = write(args.name, args.dir)
    except (ValueError, OSError) as e:
        raise ConfigError(f"new-plugin: {e}") from None
    print(f"wrote {target}\nnext: cd {target} && pip install -e '.[test]' && pytest")
    return 0
