"""IFEval's checks on hand-written responses whose verdicts are known, the offline Punkt model,
and the one-line errors `fmtune evaluate --tasks` gives before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fmtune.testing import run_cli, write_jsonl
from fmtune_evaluation.harness import TASKS_DIR
from fmtune_evaluation.ifeval import check_prompts, verdicts

PROMPTS = {r["key"]: r for r in map(json.loads, Path(
    TASKS_DIR, "fmtune_ifeval", "fmtune_ifeval.jsonl").read_text().splitlines())}

# key, response, strict verdict per instruction, loose verdict per instruction
CASES = [
    (1000, "le chien grand voit un chat", [True], [True]),
    (1000, "le chat voit un oiseau", [False], [False]),
    (1001, "un oiseau rouge mange le poisson", [True], [True]),
    (1001, "un oiseau rouge mange le poisson\n(done)", [False], [True]),  # loose: last line cut
    (1002, "le vache vieux aime un souris", [True], [True]),
    (1002, "le cheval vieux aime un souris", [False], [False]),
    (1003, "un grenouille petit suit le cheval", [True, True], [True, True]),
    (1003, "un grenouille grand suit le cheval", [False, True], [False, True]),
    (1004, "le chat joyeux voit le chien bleu", [True, True], [True, True]),
    # one sentence for the Punkt model: "Dr." is an abbreviation, not a sentence end
    (1004, "Dr. Smith saw le chat joyeux today", [True, True], [True, True]),
    (1004, "Dr. Smith saw le chat joyeux. He left.", [False, True], [False, True]),
    (1005, "le poisson mange un souris", [True], [True]),
    (1005, "le chat mange un chien", [False], [False]),
    (1006, "<<The Sea>>\nWaves roll in and out all day.", [True], [True]),
    (1006, "The Sea\nWaves roll in and out all day.", [False], [False]),
    (1007, "* a hammer\n* a saw", [True], [True]),
    (1007, "* a hammer\n* a saw\n* a drill", [False], [True]),  # loose: a line cut
    (1007, "* a hammer\n* a saw\n* a drill\n* a file\n* a rule", [False], [False]),
    (1008, "Tests catch bugs early. Is there anything else I can help with?", [True], [True]),
    (1008, "Tests catch bugs early. Is there anything else I can help with?\nBye", [False],
     [True]),
    (1009, "RIVERS FLOW DOWN FROM THE MOUNTAINS TO THE SEA. THEY CARRY WATER AND STONES "
           "ALONG THE WAY.", [True], [True]),
    (1009, "Rivers flow down from the mountains to the sea. They carry water and stones "
           "along the way.", [False], [False]),
    (1010, '"A checkpoint is a saved state of the model during training."', [True], [True]),
    (1010, "A checkpoint is a saved state of the model during training.", [False], [False]),
    (1011, "Dear Ann, the walk in the park was lovely.\nP.S. Bring a hat next time.", [True],
     [True]),
    (1011, "Dear Ann, the walk in the park was lovely.", [False], [False]),
    (1012, "a tokenizer splits the text into small pieces that the model can read and "
           "count.", [True], [True]),
    (1012, "A tokenizer splits the text into small pieces that the model can read and "
           "count.", [False], [False]),
    (1013, "red green and blue", [True, True], [True, True]),
    (1013, "red, green and blue", [False, True], [False, True]),
    (1014, "The moon is bright tonight. It orbits the earth. It has no air at all.", [True],
     [True]),
    (1014, "The moon is bright tonight.", [False], [False]),
]


@pytest.mark.parametrize("key,response,strict,loose", CASES,
                         ids=[f"{k}-{i}" for i, (k, *_) in enumerate(CASES)])
def test_ifeval_verdicts_on_hand_written_responses(key, response, strict, loose):
    v = verdicts(PROMPTS[key], response)
    assert v["inst_level_strict_acc"] == strict
    assert v["inst_level_loose_acc"] == loose
    assert v["prompt_level_strict_acc"] is all(strict)
    assert v["prompt_level_loose_acc"] is all(loose)


def test_every_project_prompt_has_a_case_and_the_file_checks():
    assert {k for k, *_ in CASES} == set(PROMPTS)
    assert check_prompts(str(Path(TASKS_DIR, "fmtune_ifeval", "fmtune_ifeval.jsonl"))) == 15


def test_the_punkt_model_is_shipped_offline_and_rebuilds_identically(tmp_path):
    import nltk

    from fmtune_evaluation import make_punkt
    from fmtune_evaluation.offline import NLTK_DATA, use_punkt

    used = use_punkt()
    assert Path(used).is_dir()
    if used.startswith(NLTK_DATA):  # no punkt_tab installed on this machine: the project's
        rebuilt = make_punkt.write_model(make_punkt.train_params(), str(tmp_path / "english"))
        for name in ("abbrev_types.txt", "collocations.tab", "ortho_context.tab",
                     "sent_starters.txt"):
            assert (Path(rebuilt) / name).read_bytes() == (Path(used) / name).read_bytes(), name
        assert {"dr", "mr", "e.g", "etc"} <= set((Path(used) / "abbrev_types.txt")
                                                 .read_text().split())
    assert nltk.sent_tokenize("Dr. Smith came home. He slept, e.g. on the sofa. Then J. Lee "
                              "called!") == ["Dr. Smith came home.", "He slept, e.g. on the sofa.",
                                             "Then J. Lee called!"]


def one_error(res) -> str:
    assert res.exit_code == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stdout + res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("fmtune: error:")]
    assert len(lines) == 1, res.stderr[-2000:]
    return lines[0].removeprefix("fmtune: error: ")


def prompt(**changes):
    return {"key": 1, "prompt": "Say hi without commas.",
            "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], **changes}


@pytest.mark.parametrize("record,message", [
    ({"key": 2, "prompt": "x", "kwargs": [{}]}, "p.jsonl:2: missing field "
     "'instruction_id_list' (an IFEval prompt has key, prompt, instruction_id_list and kwargs)"),
    (prompt(instruction_id_list=["punctuation:no_comas"]), "p.jsonl:2: field "
     "'instruction_id_list': unknown instruction 'punctuation:no_comas' (did you mean "
     "'punctuation:no_comma'?)"),
    (prompt(kwargs=[]), "p.jsonl:2: field 'kwargs' has 0 entries for 1 instruction (one "
     "mapping per instruction)"),
    (prompt(prompt=3), "p.jsonl:2: field 'prompt' must be str, got int"),
    (prompt(instruction_id_list=["length_constraints:number_words"],
            kwargs=[{"relation": "about", "num_words": 3}]),
     "p.jsonl:2: field 'kwargs' entry 1 (length_constraints:number_words): The supported "
     "relation for comparison must be in ('less than', 'at least'), but about is given."),
])
def test_a_bad_ifeval_prompts_file_is_one_line_before_the_model_loads(tmp_path, record,
                                                                       message):
    path = write_jsonl(tmp_path / "p.jsonl", [prompt(), record])
    res = run_cli(["evaluate", "--model", str(tmp_path / "no-model"), "--tasks", "ifeval",
                   "--ifeval_prompts", path])
    assert one_error(res) == message.replace("p.jsonl", path)


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "fmtune_translate", "--ifeval_prompts", "p.jsonl"],
     "--ifeval_prompts needs --tasks ifeval (or fmtune_ifeval)"),
    (["--tasks", "fmtune_translate", "--include_path", "nowhere"],
     "--include_path {tmp}/nowhere: no such folder or file"),
    (["--tasks", "fmtune_translate", "--limit", "0"],
     "--limit must be > 0 (a count, or a fraction below 1), got 0.0"),
    (["--tasks", "fmtune_translate", "--log_samples"],
     "--log_samples needs --tasks and --output_path"),
    (["--tasks", "fmtune_translate", "--output_path", "r.json"],
     "--output_path r.json: give a folder (results.json and the other files are written "
     "into it)"),
    (["--chat"], "evaluate: one of --data or --tasks is required"),
])
def test_task_option_errors(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    res = run_cli(["evaluate", "--model", str(tmp_path / "no-model"), *argv])
    assert one_error(res).startswith(message.replace("{tmp}", str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_an_unknown_task_is_named_with_a_suggestion(tmp_path):
    """A name that is neither the project's nor in --include_path: lm-eval's own tasks are
    indexed, then the error names the closest."""
    res = run_cli(["evaluate", "--model", str(tmp_path / "no-model"), "--tasks",
                   "fmtune_translat"])
    assert one_error(res) == ("--tasks: unknown task 'fmtune_translat' (did you mean "
                              "'fmtune_translate'?); `--include_path DIR` adds the task YAML "
                              "files in DIR")
