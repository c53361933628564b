"""docs/plugins.md, "Writing a tracker": the CSV tracker's code is taken from the doc and
trained with (read back, resumed, a bad folder, a failure mid-run), so the recipe cannot drift
from what fmtune.tracking.Tracker does."""

from __future__ import annotations

import csv
import json
import shlex
import tomllib
from pathlib import Path

import pytest

from fmtune.testing import doc_blocks, doc_module, logged_series, run_cli, write_jsonl

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
SECTION = "## Writing a tracker"
RECORDS = [
    {"input": "translate: the red cat sees a dog =", "output": "le chat rouge voit un chien"},
    {"input": "question: what is two plus two? answer:", "output": "four"},
    {"input": "The quick brown fox", "output": "jumps over the lazy dog."},
    {"input": "hello there", "output": "hi, how can I help?"},
]


def blocks(lang: str) -> list[str]:
    return doc_blocks(DOC, SECTION, lang)


@pytest.fixture
def csv_plugin():
    """The recipe's module, as `pip install` of it would import it."""
    module = doc_module(DOC, SECTION, "fmtune_csv")
    return module


def argv(model, tmp_path, out, *extra):
    """The doc's command line, with the in-test plugin instead of --trackers (which needs it
    installed) and short-run settings."""
    (line,) = [x for x in blocks("console")[0].splitlines() if x]
    words = shlex.split(line)
    assert words[:4] == ["fmtune", "train", "--trackers", "csv"]
    subst = {"MODEL": model, "train.jsonl": write_jsonl(tmp_path / "train.jsonl", RECORDS),
             "out": str(out), "runs/csv": str(tmp_path / "runs" / "csv")}
    return ["train", *(subst.get(w, w) for w in words[4:]), "--per_device_train_batch_size",
            "2", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2",
            *extra]


def rows(folder, run_id, name):
    with open(folder / f"{run_id}.csv", newline="") as f:
        found = [(int(step), float(value)) for step, key, value in csv.reader(f) if key == name]
    return [s for s, _ in found], [v for _, v in found]



def test_the_pyproject_declares_the_plugin_and_its_selector():
    (toml,) = blocks("toml")
    eps = tomllib.loads(toml)["project"]["entry-points"]
    assert eps["fmtune"] == {"csv": "fmtune_csv"}
    assert eps["fmtune.implied_by"] == {"trackers:csv": "csv"}
    assert set(eps["fmtune.implied_by"].values()) <= set(eps["fmtune"])  # plugin names


def test_the_recipe_tracks_resumes_and_never_stops_training(fmtune_tiny_model, tmp_path,
                                                            csv_plugin, monkeypatch):
    out, folder = tmp_path / "out", tmp_path / "runs" / "csv"
    res = run_cli(argv(fmtune_tiny_model, tmp_path, out, "--max_steps", "4"),
                  plugins=[csv_plugin])
    assert res.exit_code == 0, res.stderr
    state = json.loads((out / "csv_tracker.json").read_text())
    assert state["folder"] == str(folder)
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["csv_run_id"] == state["run_id"] and summary["csv_folder"] == str(folder)
    assert summary["trackers"] == {"csv": {"status": "ok"}}
    assert rows(folder, state["run_id"], "loss") == logged_series(out, "training_loss")
    assert rows(folder, state["run_id"], "loss")[0] == [1, 2, 3, 4]
    assert rows(folder, state["run_id"], "learning_rate")[0] == [1, 2, 3, 4]

    # a resumed run continues the same CSV file (the recipe appends)
    res = run_cli(argv(fmtune_tiny_model, tmp_path, out, "--max_steps", "6"),
                  plugins=[csv_plugin])
    assert res.exit_code == 0, res.stderr
    assert json.loads((out / "csv_tracker.json").read_text())["run_id"] == state["run_id"]
    assert [p.name for p in folder.iterdir()] == [f"{state['run_id']}.csv"]
    assert rows(folder, state["run_id"], "loss")[0] == [1, 2, 3, 4, 5, 6]

    # the tracker failing mid-run disables it; the training completes
    def broken(self, metrics, step, epoch, wall_time):
        if step == 2:
            raise OSError("disk full")

    monkeypatch.setattr(csv_plugin.CsvTracker, "log", broken)
    out2 = tmp_path / "out2"
    res = run_cli(argv(fmtune_tiny_model, tmp_path, out2, "--max_steps", "4"),
                  plugins=[csv_plugin])
    assert res.exit_code == 0, res.stderr
    summary = json.loads((out2 / "run_summary.json").read_text())
    assert summary["trackers"] == {"csv": {"status": "failed", "error": "OSError: disk full",
                                           "at_step": 2}}
    assert "tracker csv failed at step 2: OSError: disk full; disabled" in res.stderr
    assert summary["global_step"] == 4 and logged_series(out2, "training_loss")[0] == [1, 2, 3, 4]


def test_a_bad_folder_is_one_line_before_anything_loads(tmp_path, csv_plugin):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    out = tmp_path / "out"
    res = run_cli(argv("no-model-needed", tmp_path, out, "--max_steps", "1",
                       "--csv_folder", str(a_file)), plugins=[csv_plugin])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines()[-1] == \
        f"fmtune: error: invalid config: csv_folder {a_file}: exists and is not a folder"
    assert not out.exists()
