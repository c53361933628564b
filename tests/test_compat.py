"""The plugin compatibility matrix (compat.yaml at the repository root), executed.

Each allowed row is a real 2-step training through the CLI; the test reads back
run_summary.json's ``hooks_answered`` (which plugin answered each firstresult hook,
which wrappers ran around it) and compares it with the row. Each refused row must
exit 2 from validate_config with its reason, before a tokenizer or model is loaded
and with nothing written. A row naming a plugin that is not installed fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from fmtune import hookimpl
from fmtune.plugins import installed
from fmtune.pytest_plugin import DEMO_TEXTS
from fmtune.testing import DEMO_RECORDS, build_tokenizer, write_jsonl, run_cli

ROOT = Path(__file__).resolve().parents[1]
MATRIX = yaml.safe_load((ROOT / "compat.yaml").read_text(encoding="utf-8"))
HOOKS = ("load_tokenizer", "prepare_data", "load_model", "wrap_peft", "build_collator",
         "build_trainer", "save")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def row_id(row: dict) -> str:
    name = "+".join(row["plugins"]) or "core"
    if "refused" in row:
        name = "refused:" + name + "".join(f",{k}={v}" for k, v in (row.get("options") or {})
                                           .items() if k not in ("alora_invocation_string",))
    return name


ROWS = MATRIX["combinations"]


def test_matrix_is_well_formed():
    ids = [row_id(r) for r in ROWS]
    assert len(ids) == len(set(ids)), "duplicate rows in compat.yaml"
    assert set(MATRIX["defaults"]) == set(HOOKS)
    for row in ROWS:
        assert set(row) <= {"plugins", "options", "expect", "wrappers", "summary", "refused"}, row
        assert set(row.get("expect") or {}) <= set(HOOKS), row
        assert set(row.get("wrappers") or {}) <= set(HOOKS), row
        if "refused" in row:
            assert not (row.get("expect") or row.get("wrappers") or row.get("summary")), row
    # every installed first-party plugin appears alone in the matrix (the example
    # plugins of tests/test_example_plugin.py are installed only inside that test)
    # (gptq trains an adapter over its frozen base by design: its row alone is a refused one)
    alone = {r["plugins"][0] for r in ROWS if len(r["plugins"]) == 1
             and ("refused" not in r or r["plugins"] == ["gptq"])}
    first_party = {name for name, info in installed().items()
                   if info.distribution and info.distribution.startswith("fmtune-")
                   and not info.distribution.startswith("fmtune-example")
                   and not info.distribution.startswith("fmtune-fake")}
    assert first_party <= alone, \
        f"installed plugins without a row of their own in compat.yaml: " \
        f"{sorted(first_party - alone)}"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny random Llama whose tokenizer has a chat template, and the two data files."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fmtune.testing import TINY_LLAMA

    folder = tmp_path_factory.mktemp("compat")
    tok = build_tokenizer(DEMO_TEXTS + ["system user assistant end of turn, be brief please"])
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.chat_template = CHAT_TEMPLATE
    model_dir = folder / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, vocab_size=len(tok), bos_token_id=None,
                                 eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = write_jsonl(folder / "io.jsonl", [{"input": r["input"] + " <|assistant|>",
                                              "output": r["output"]} for r in DEMO_RECORDS])
    chat = write_jsonl(folder / "chat.jsonl", [
        {"messages": [{"role": "user", "content": r["input"]},
                      {"role": "assistant", "content": r["output"]}]} for r in DEMO_RECORDS])
    prefs = write_jsonl(folder / "prefs.jsonl", [
        {"prompt": r["input"], "chosen": r["output"], "rejected": DEMO_RECORDS[i - 1]["output"]}
        for i, r in enumerate(DEMO_RECORDS)])
    return {"model": str(model_dir), "data": data, "chat": chat, "prefs": prefs}


class LoadSpy:
    """Observes (never changes) tokenizer and model loading: a refused run must load neither."""

    def __init__(self):
        self.calls: list[str] = []

    @hookimpl(wrapper=True)
    def load_tokenizer(self):
        self.calls.append("load_tokenizer")
        return (yield)

    @hookimpl(wrapper=True)
    def load_model(self):
        self.calls.append("load_model")
        return (yield)


QUANTIZED = {"gptq_model": "fmtune_gptq_model", "mxfp4_model": "fmtune_mxfp4_model",
             "vision_model": "fmtune_vision_model", "vision_data": "fmtune_vision_data"}


def argv_for(row: dict, env: dict, tmp: Path, request=None) -> list[str]:
    subst = {"data": env["data"], "chat": env["chat"], "prefs": env["prefs"], "tmp": str(tmp),
             "repo": str(ROOT)}
    text = json.dumps(row.get("options") or {})
    for key, fixture in QUANTIZED.items():  # built (once per session) only for rows using them
        if "{" + key + "}" in text:
            subst[key] = str(request.getfixturevalue(fixture))
    options = {"model_name_or_path": env["model"], "training_data_path": "{data}",
               "output_dir": str(tmp / "out"), "max_steps": 2, "per_device_train_batch_size": 4,
               "logging_steps": 1, "save_strategy": "no", "learning_rate": 1e-3,
               **(row.get("options") or {})}
    argv = ["train", "--plugins", ",".join(row["plugins"])]
    for key, value in options.items():
        value = str(value).lower() if isinstance(value, bool) else str(value)
        argv += [f"--{key}", value.format(**subst)]
    return argv


@pytest.mark.parametrize("row", ROWS, ids=[row_id(r) for r in ROWS])
def test_combination(row, env, tmp_path, request):
    have = installed()
    missing = [name for name in row["plugins"] if name not in have]
    if missing:
        pytest.fail(f"compat.yaml row {row_id(row)}: plugin(s) {', '.join(missing)} not "
                    f"installed (installed: {', '.join(have)})")
    argv = argv_for(row, env, tmp_path, request)
    if "refused" in row:
        spy = LoadSpy()
        res = run_cli(argv, plugins=[spy])
        assert res.exit_code == 2, res.stderr
        assert "fmtune: error: invalid config" in res.stderr  # from validate_config
        assert row["refused"] in res.stderr, res.stderr
        assert spy.calls == []
        assert not (tmp_path / "out").exists()
        return

    res = run_cli(argv)
    assert res.exit_code == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["global_step"] == 2
    assert sorted(summary["plugins"]) == sorted(row["plugins"])
    expected = {**MATRIX["defaults"], **(row.get("expect") or {})}
    answered = summary["hooks_answered"]
    assert {h: answered[h]["answered_by"] for h in HOOKS} == expected
    wrappers = {h: [] for h in HOOKS} | (row.get("wrappers") or {})
    assert {h: answered[h]["wrappers"] for h in HOOKS} == wrappers
    for key in row.get("summary") or ():
        assert summary.get(key), f"run_summary.json lacks {key}"
    assert os.path.isdir(summary["model_saved_to"])
