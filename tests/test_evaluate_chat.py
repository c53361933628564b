"""`fmtune evaluate --chat`: chat records scored with the chat template training saved with the
tokenizer (exact match, contains, regex), one JSONL line per record next to the summary; bad
records are one-line errors naming the file, line and field, before any model loads. And
`--tasks` without the plugin that runs lm-eval tasks names the distribution to install."""

from __future__ import annotations

import json

import pytest

from fmtune.inference import matches
from fmtune.testing import DEMO_RECORDS, run_cli, write_jsonl


def chat(record: dict, system: bool = False) -> dict:
    turns = [{"role": "system", "content": "be brief"}] if system else []
    return {"messages": [*turns, {"role": "user", "content": record["input"]},
                         {"role": "assistant", "content": record["output"]}]}


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    return write_jsonl(tmp / "chat.jsonl", [chat(r, system=i % 2 == 0)
                                            for i, r in enumerate(DEMO_RECORDS)])


@pytest.fixture(scope="module")
def chat_model(fmtune_tiny_model, chat_data, tmp_path_factory):
    """The tiny model trained on the chat records (the data plugin renders them with chatml
    and saves the template with the tokenizer)."""
    out = tmp_path_factory.mktemp("chat-model")
    res = run_cli(["train", "--model_name_or_path", fmtune_tiny_model, "--training_data_path",
                   chat_data, "--chat_template", "chatml", "--output_dir", str(out),
                   "--max_steps", "60", "--per_device_train_batch_size", "8",
                   "--learning_rate", "3e-3", "--save_strategy", "no", "--seed", "3"])
    assert res.exit_code == 0, res.stderr[-3000:]
    assert "<|im_start|>" in json.loads((out / "tokenizer_config.json").read_text()).get(
        "chat_template", "") or (out / "chat_template.jinja").is_file()
    return str(out)


def test_chat_records_are_scored_with_the_saved_template(chat_model, chat_data, tmp_path):
    out = tmp_path / "scores"
    res = run_cli(["evaluate", "--model", chat_model, "--data", chat_data, "--chat",
                   "--max_new_tokens", "16", "--output_path", str(out), "--show", "1"])
    assert res.exit_code == 0, res.stderr[-3000:]
    last = res.stdout.splitlines()[-1]
    print(f"\nchat evaluate: {last}")
    summary = json.loads((out / "records.json").read_text())
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert last == f"exact match: {summary['score']:.3f} ({summary['correct']}/8)"
    assert summary["score"] >= 0.75 and summary["total"] == 8 and summary["chat"] is True
    assert [r["record"] for r in rows] == [f"{chat_data}:{i}" for i in range(1, 9)]
    assert [r["reference"] for r in rows] == [r["output"] for r in DEMO_RECORDS]
    assert sum(r["correct"] for r in rows) == summary["correct"]
    assert rows[0]["prompt"][-1] == {"role": "assistant", "content": DEMO_RECORDS[0]["output"]}
    assert res.stdout.startswith(f"  {DEMO_RECORDS[0]['input']!r} -> ")
    assert sorted(p.name for p in out.iterdir()) == ["records.json", "records.jsonl"]


def test_contains_and_regex(chat_model, tmp_path):
    asked = chat(DEMO_RECORDS[0], system=True)["messages"][:-1]  # as in training
    data = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [*asked, {"role": "assistant", "content": ref}]}
        for ref in ("chat rouge", "^le chat .* chien$", "zebra")])
    for metric, expected, line in (("contains", ["True", "False", "False"], "0.333 (1/3)"),
                                   ("regex", ["True", "True", "False"], "0.667 (2/3)")):
        out = tmp_path / metric
        res = run_cli(["evaluate", "--model", chat_model, "--data", data, "--chat", "--metric",
                       metric, "--max_new_tokens", "16", "--output_path", str(out)])
        assert res.exit_code == 0, res.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
        assert rows[0]["prediction"].strip() == DEMO_RECORDS[0]["output"]  # it learned it
        assert [str(r["correct"]) for r in rows] == expected, rows
        assert res.stdout.splitlines()[-1] == f"{metric}: {line}"


def test_matches():
    assert matches(" four\n", "four", "exact_match") and not matches("four!", "four",
                                                                        "exact_match")
    assert matches("it is four.", "four", "contains") and not matches("fo ur", "four",
                                                                      "contains")
    assert matches("answer: 42", r"\d+", "regex") and not matches("x", r"^\d+$", "regex")


def one_error(res) -> str:
    assert res.exit_code == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stdout + res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("fmtune: error:")]
    assert len(lines) == 1, res.stderr[-2000:]
    return lines[0].removeprefix("fmtune: error: ")


USER = {"role": "user", "content": "hi"}
ANSWER = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize("records,extra,message", [
    ([{"messages": [USER, ANSWER]}, {"text": "hi"}], ["--chat"],
     "{data}:2: missing field 'messages'"),
    ([{"input": "a", "output": "b"}], ["--chat"],
     "{data}:1: missing field 'messages' (an input/output record: leave out --chat)"),
    ([{"messages": [USER]}], ["--chat"], "{data}:1: field 'messages': the last turn must be "
     "the assistant's answer to score against, got role 'user'"),
    ([{"messages": [USER, {"role": "assistant"}]}], ["--chat"],
     "{data}:1: field 'messages' message 2: 'content' must be a string (missing)"),
    ([{"messages": "hi"}], ["--chat"],
     "{data}:1: field 'messages' must be a non-empty list of messages, got str"),
    ([{"messages": [ANSWER]}], ["--chat"],
     "{data}:1: field 'messages': no turn before the assistant's answer"),
    ([{"messages": [USER, {"role": "assistant", "content": "(unclosed"}]}],
     ["--chat", "--metric", "regex"], "{data}:1: the reference is not a valid regular "
     "expression (--metric regex): missing ), unterminated subpattern at position 0"),
    ([{"messages": [USER, ANSWER]}], [],
     "{data}:1: missing field 'input' (a chat record: evaluate compares input/output "
     "records); pass --chat to score chat records"),
    ([{"input": "a", "output": "b"}], ["--metric", "fuzzy"], "evaluate: argument --metric: "
     "invalid choice: 'fuzzy' (choose from exact_match, contains, regex)"),
    ([{"input": "a", "output": "b"}], ["--chat_template", "chatml"],
     "--chat_template needs --chat"),
])
def test_bad_records_are_one_line_before_the_model_loads(tmp_path, records, extra, message):
    data = write_jsonl(tmp_path / "d.jsonl", records)
    res = run_cli(["evaluate", "--model", str(tmp_path / "no-model"), "--data", data, *extra])
    assert one_error(res).startswith(message.format(data=data))


def test_a_model_without_a_chat_template(fmtune_tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [USER, ANSWER]}])
    res = run_cli(["evaluate", "--model", fmtune_tiny_model, "--data", data, "--chat"])
    assert one_error(res) == (f"--chat: the tokenizer of {fmtune_tiny_model} has no chat "
                              "template; pass --chat_template")


def test_tasks_without_the_evaluation_plugin_name_its_distribution(monkeypatch, tmp_path):
    """As a user with only the core installed sees it (the catalog of first-party plugins
    names the distribution that owns eval_tasks)."""
    import fmtune.plugins as plugins

    everything = plugins.installed()
    monkeypatch.setattr(plugins, "installed", lambda: {
        n: i for n, i in everything.items() if i.distribution != "fmtune-evaluation"})
    res = run_cli(["evaluate", "--model", str(tmp_path / "m"), "--tasks", "hellaswag"])
    assert one_error(res) == ("--tasks needs plugin 'evaluation', which is not installed: "
                              "pip install fmtune-evaluation")
