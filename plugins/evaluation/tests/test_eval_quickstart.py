"""`fmtune evaluate --tasks` through lm-evaluation-harness on the quickstart model, offline.

One quickstart training (examples/quickstart.yaml, as `make demo` runs it) is shared by the
tests of this module. The scores are read from lm-eval's results JSON that `fmtune evaluate
--output_path` writes, never recomputed here. Run from the repository root (the quickstart's
paths are relative to it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fmtune.testing import run_cli

ROOT = Path(__file__).resolve().parents[3]
QUICKSTART = "examples/quickstart.yaml"
TASKS = "fmtune_translate,fmtune_translate_mc,fmtune_ifeval"
IFEVAL_METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                  "inst_level_loose_acc")


@pytest.fixture(scope="module")
def in_root():
    before = os.getcwd()
    os.chdir(ROOT)
    try:
        yield ROOT
    finally:
        os.chdir(before)


@pytest.fixture(scope="module")
def trained(in_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    res = run_cli(["train", "--config", QUICKSTART, "--output_dir", str(out)])
    assert res.exit_code == 0, res.stderr[-3000:]
    return str(out)


def evaluate(tmp: Path, name: str, *argv: str) -> dict:
    out = tmp / name
    res = run_cli(["evaluate", *argv, "--tasks", TASKS, "--max_new_tokens", "24",
                   "--output_path", str(out)])
    assert res.exit_code == 0, res.stderr[-3000:]
    assert "|fmtune_translate   |" in res.stdout  # lm-eval's table on stdout
    assert res.stdout.count("exact_match") == 1
    results = json.loads((out / "results.json").read_text())
    assert sorted(os.listdir(out)) == ["results.json"]  # written atomically: no temporary left
    return results


@pytest.fixture(scope="module")
def before_after(trained, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scores")
    before = evaluate(tmp, "before", "--config", QUICKSTART)  # the random-init model
    after = evaluate(tmp, "after", "--model", trained)
    return before, after


def test_task_score_rises_from_near_zero_to_at_least_0_9(before_after):
    before, after = before_after
    em = [r["results"]["fmtune_translate"]["exact_match,strip"] for r in (before, after)]
    mc = [r["results"]["fmtune_translate_mc"]["acc,none"] for r in (before, after)]
    print(f"\nfmtune_translate exact_match: before {em[0]:.3f}, after {em[1]:.3f}; "
          f"fmtune_translate_mc acc: before {mc[0]:.3f}, after {mc[1]:.3f}")
    assert em[0] <= 0.05 and em[1] >= 0.9
    assert mc[0] <= 0.5 and mc[1] >= 0.9
    for results in (before, after):  # lm-eval's own results document
        assert results["n-samples"]["fmtune_translate"] == {"original": 40, "effective": 40}
        assert results["configs"]["fmtune_translate"]["output_type"] == "generate_until"
        assert results["configs"]["fmtune_translate_mc"]["output_type"] == "multiple_choice"
        assert "lm_eval_version" in results and "samples" not in results


def test_ifeval_strict_and_loose_accuracy_before_and_after_training(before_after):
    before, after = before_after
    for label, results in (("untrained", before), ("trained", after)):
        row = results["results"]["fmtune_ifeval"]
        values = {m: row[f"{m},none"] for m in IFEVAL_METRICS}
        print(f"\nfmtune_ifeval ({label} quickstart model): " + ", ".join(
            f"{m} {v:.3f}" for m, v in values.items()))
        assert all(0.0 <= v <= 1.0 for v in values.values())
        assert values["prompt_level_loose_acc"] >= values["prompt_level_strict_acc"]
        assert values["inst_level_loose_acc"] >= values["inst_level_strict_acc"]
        assert results["n-samples"]["fmtune_ifeval"]["effective"] == 15
        assert results["fmtune"]["punkt_tab"]  # which sentence splitter scored it
    # the six translation prompts carry instructions a model that learned the task follows
    assert after["results"]["fmtune_ifeval"]["prompt_level_strict_acc,none"] > \
        before["results"]["fmtune_ifeval"]["prompt_level_strict_acc,none"]


def test_ifeval_over_a_prompts_file_and_samples(trained, tmp_path):
    """lm-eval's `ifeval` task name over a local prompts file (no download), --limit, and the
    per-sample file lm-eval's --log_samples gives."""
    from fmtune_evaluation.harness import TASKS_DIR

    prompts = tmp_path / "input_data.jsonl"
    lines = Path(TASKS_DIR, "fmtune_ifeval", "fmtune_ifeval.jsonl").read_text().splitlines()
    prompts.write_text("\n".join(lines[:4]) + "\n")
    out = tmp_path / "out"
    res = run_cli(["evaluate", "--model", trained, "--tasks", "ifeval", "--ifeval_prompts",
                   str(prompts), "--max_new_tokens", "16", "--limit", "3", "--log_samples",
                   "--output_path", str(out)])
    assert res.exit_code == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["n-samples"]["ifeval"] == {"original": 4, "effective": 3}
    assert set(f"{m},none" for m in IFEVAL_METRICS) <= set(results["results"]["ifeval"])
    samples = [json.loads(line) for line in (out / "samples_ifeval.jsonl").read_text().splitlines()]
    assert [s["doc"]["key"] for s in samples] == [1000, 1001, 1002]
    assert samples[0]["prompt_level_strict_acc"] in (True, False)
