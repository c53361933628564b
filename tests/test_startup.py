"""Start-up work the command line saves (issue 19), and that it changes nothing else:
transformers' import structure read from a cache on disk (fmtune.hub._cache_import_structures)
and the objects start-up makes frozen out of the garbage collector's full collections
(fmtune.hub.freeze_at_imports)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

from fmtune import hub
from fmtune.testing import DEMO_RECORDS, run_cli, write_jsonl

# what transformers exports, as its lazy modules see it: the import structure of its models
# folder (asked both ways transformers asks) and the names of the top-level and models modules
STRUCTURE = r"""
import hashlib, json, os, sys
if sys.argv[1] == "lean":
    from fmtune.hub import lean_imports
    lean_imports()
import transformers, transformers.models
from transformers.utils import import_utils
folder = os.path.join(os.path.dirname(transformers.__file__), "models")
def plain(s):
    return [[sorted(k), {m: sorted(v) for m, v in vv.items()}] for k, vv in s.items()]
found = [plain(import_utils.define_import_structure(folder, prefix="models")),
         plain(import_utils.define_import_structure(os.path.join(folder, "__init__.py"))),
         sorted(dir(transformers)), sorted(dir(transformers.models))]
assert transformers.LlamaConfig.__name__ == "LlamaConfig"
print(json.dumps({"digest": hashlib.sha1(json.dumps(found).encode()).hexdigest(),
                  "cached": getattr(import_utils.define_import_structure, "_fmtune_cached",
                                    False)}))
"""


def _structure(mode: str, cache_home) -> dict:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    res = subprocess.run([sys.executable, "-c", STRUCTURE, mode], capture_output=True,
                         text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_import_structure_cache_gives_transformers_own_answer(tmp_path):
    cache = tmp_path / "cache"
    own = _structure("plain", cache)
    assert not own["cached"] and not (cache / "fmtune").exists()
    first = _structure("lean", cache)  # scanned, then written
    folder = cache / "fmtune" / "transformers-import-structure"
    files = sorted(folder.iterdir())
    assert first["cached"] and len(files) == 2  # transformers/__init__'s and models/__init__'s
    second = _structure("lean", cache)  # read from the cache
    assert first["digest"] == second["digest"] == own["digest"]
    # a cache written for other files (an upgrade, an edit) is not used, nor a broken one
    for f in files:
        saved = json.loads(f.read_text())
        saved["fingerprint"] = "0" * 40
        saved["structure"] = [[[], {"models.nothing": ["Nothing"]}]]
        f.write_text(json.dumps(saved))
    files[0].write_text("{not json")
    assert _structure("lean", cache)["digest"] == own["digest"]
    assert json.loads(files[1].read_text())["fingerprint"] != "0" * 40  # written anew


def test_tree_fingerprint_sees_files_added_edited_and_removed(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "m.py").write_text("__all__ = ['A']\n")
    (tmp_path / "__pycache__").mkdir()
    before = hub._tree_fingerprint(str(tmp_path))
    (tmp_path / "__pycache__" / "x.pyc").write_bytes(b"\0")  # never read by the scan
    assert hub._tree_fingerprint(str(tmp_path)) == before
    (tmp_path / "a" / "m.py").write_text("__all__ = ['A', 'B']\n")
    edited = hub._tree_fingerprint(str(tmp_path))
    assert edited != before
    (tmp_path / "a" / "n.py").write_text("")
    added = hub._tree_fingerprint(str(tmp_path))
    assert added != edited
    (tmp_path / "a" / "n.py").unlink()
    assert hub._tree_fingerprint(str(tmp_path)) == edited


def test_freezing_at_imports_and_handing_back(tmp_path):
    assert not hub._FREEZING
    gc.unfreeze()
    hub.lean_imports()
    sys.path.insert(0, str(tmp_path))
    (tmp_path / "fmtune_freeze_probe.py").write_text("X = 1\n")
    try:
        hub.freeze_at_imports()
        import fmtune_freeze_probe  # noqa: F401 - an import: what exists is frozen

        assert gc.get_freeze_count() > 0
        # the collector still collects what is made after (cyclic garbage included)
        cycle: list = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
    finally:
        hub.freeze_at_imports(False, unfreeze=True)
        sys.path.remove(str(tmp_path))
        sys.modules.pop("fmtune_freeze_probe", None)
    assert gc.get_freeze_count() == 0 and not hub._FREEZING


def test_in_process_command_freezes_nothing(fmtune_tiny_model, tmp_path):
    """A program (here a test) that runs a command goes on with its objects as they were:
    visible to the collector and to gc.get_objects() (which frozen objects leave)."""
    data = write_jsonl(tmp_path / "d.jsonl", DEMO_RECORDS)
    before = gc.get_freeze_count()
    res = run_cli(["train", "--model_name_or_path", fmtune_tiny_model, "--training_data_path",
                   data, "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
                   "--per_device_train_batch_size", "4"])
    assert res.exit_code == 0, res.stderr[-3000:]
    assert gc.get_freeze_count() <= before and not hub._FREEZING


FROZEN = r"""
import gc, json, sys
from fmtune.cli import main
import fmtune.pipeline as pipeline
seen = {}
fit = pipeline.fit_and_save
def fit_and_save(*a, **k):
    import fmtune.hub
    seen["frozen_before_training"] = gc.get_freeze_count()
    seen["freezing_in_training"] = fmtune.hub._FREEZING
    return fit(*a, **k)
pipeline.fit_and_save = fit_and_save
sys.argv = ["fmtune", *sys.argv[1:]]
code = main()  # as the console script runs it (no argv): the process ends after
print(json.dumps({"code": code, **seen, "frozen_after": gc.get_freeze_count()}))
"""


def test_command_line_run_freezes_start_up_objects(fmtune_tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", DEMO_RECORDS)
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-c", FROZEN, "train", "--plugins", "lora",
                          "--model_name_or_path", fmtune_tiny_model, "--training_data_path",
                          data, "--output_dir", str(out), "--max_steps", "2",
                          "--per_device_train_batch_size", "4", "--logging_steps", "1"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    state = json.loads(res.stdout.strip().splitlines()[-1])
    # torch, transformers, peft, the model: hundreds of thousands of objects, out of the
    # collector's full collections; the console script leaves them so until the process ends
    assert state["code"] == 0 and state["frozen_before_training"] > 100_000
    # frozen until the model loads, not after (the model, the trainer, the trackers' runs)
    assert state["freezing_in_training"] is False
    # (nothing frozen after; frozen objects are still freed when their last reference goes)
    assert state["frozen_after"] <= state["frozen_before_training"]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == 2
