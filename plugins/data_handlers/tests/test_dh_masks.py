"""Token-level masks for every use-case: input/output, text + response template, formatter,
chat (multi-turn, templates), pretokenized; prompt/completion boundary never merged."""

from __future__ import annotations

from fmtune.commands import load_config
from fmtune.testing import write_jsonl
from fmtune_data_handlers.plugin import prepare

IGNORE = -100


def run(tmp_path, tok, records, *flags, name="data.jsonl"):
    path = write_jsonl(tmp_path / name, records)
    config, pm, _, _ = load_config(["--plugins", "data_handlers", "--model_name_or_path", "m",
                                    "--output_dir", str(tmp_path / "o"),
                                    "--training_data_path", path, *flags])
    return prepare(config, tok, pm)


def groups(row):
    """Consecutive runs of trained token ids."""
    out, cur = [], []
    for t, l in zip(row["input_ids"], row["labels"]):
        if l != IGNORE:
            cur.append(t)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def test_input_output(tmp_path, chat_tok):
    tok = chat_tok
    recs = [{"input": "translate: the red cat =", "output": "le chat rouge"},
            {"input": "question: what is two plus two?\nanswer:", "output": " four"}]
    p = run(tmp_path, tok, recs)
    assert p.counts["train"] == {"ok": 2}
    for row, rec in zip(p.train, recs):
        sep = "" if rec["output"].startswith(" ") else " "
        prompt = tok(rec["input"])["input_ids"]
        completion = tok(sep + rec["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert row["input_ids"] == prompt + completion
        assert row["labels"] == [IGNORE] * len(prompt) + completion
        assert row["attention_mask"] == [1] * len(row["input_ids"])
        assert tok.decode(groups(row)[0]) == sep + rec["output"] + tok.eos_token


def test_text_field_response_template_and_boundary(tmp_path, chat_tok):
    tok = chat_tok
    recs = [{"text": "question: what is two plus two? answer: four"},
            {"text": "The quick brown fox jumps over the lazy dog."}]
    p = run(tmp_path, tok, recs, "--dataset_text_field", "text", "--response_template", " answer:")
    assert p.counts["train"] == {"ok": 1, "dropped: response_template not found": 1}
    (row,) = list(p.train)
    assert tok.decode(groups(row)[0]) == " four" + tok.eos_token
    assert row["input_ids"] == tok(recs[0]["text"])["input_ids"] + [tok.eos_token_id]
    # a template that ends inside a word: tokens would merge across the boundary
    p = run(tmp_path, tok, recs[1:], "--dataset_text_field", "text", "--response_template", "The qu")
    (row,) = list(p.train)
    prompt = tok("The qu", add_special_tokens=False)["input_ids"]
    rest = tok("ick brown fox jumps over the lazy dog.", add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == prompt + rest + [tok.eos_token_id]
    assert row["labels"] == [IGNORE] * len(prompt) + rest + [tok.eos_token_id]
    # whole sequence without a template
    p = run(tmp_path, tok, recs[1:], "--dataset_text_field", "text")
    (row,) = list(p.train)
    assert row["labels"] == row["input_ids"] == tok(recs[1]["text"])["input_ids"] + [tok.eos_token_id]


def test_formatter_template(tmp_path, chat_tok):
    recs = [{"q": "what is two plus two?", "a": "four"}]
    p = run(tmp_path, chat_tok, recs, "--data_formatter_template",
            "question: {{q}} answer: {{ a }}", "--response_template", " answer:")
    (row,) = list(p.train)
    assert chat_tok.decode(row["input_ids"]) == "question: what is two plus two? answer: four<|endoftext|>"
    assert chat_tok.decode(groups(row)[0]) == " four<|endoftext|>"


CONV = [
    {"role": "system", "content": "be brief please"},
    {"role": "user", "content": "what is two plus two?"},
    {"role": "assistant", "content": "four"},
    {"role": "user", "content": "and the quick brown fox?"},
    {"role": "assistant", "content": "jumps over the lazy dog."},
]


def test_chat_multi_turn_only_assistant_turns_trained(tmp_path, chat_tok):
    tok = chat_tok
    p = run(tmp_path, tok, [{"messages": CONV}, {"messages": CONV[:2]}])
    assert p.counts["train"] == {"ok": 1, "dropped: no assistant turn": 1}
    (row,) = list(p.train)
    text = tok.apply_chat_template(CONV, tokenize=False)
    assert row["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert [tok.decode(g) for g in groups(row)] == ["four<|end|>\n", "jumps over the lazy dog.<|end|>\n"]
    # every untrained token is the prompt side: system, user turns and the assistant headers
    untrained = tok.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l == IGNORE])
    assert untrained == ("<|system|>\nbe brief please<|end|>\n<|user|>\nwhat is two plus two?<|end|>\n"
                         "<|assistant|>\n<|user|>\nand the quick brown fox?<|end|>\n<|assistant|>\n")


def test_chat_custom_field_and_instruction_response_templates(tmp_path, chat_tok):
    p = run(tmp_path, chat_tok, [{"conv": CONV}], "--dataset_conversation_field", "conv",
            "--instruction_template", "<|user|>", "--response_template", "<|assistant|>\n")
    (row,) = list(p.train)
    assert [chat_tok.decode(g) for g in groups(row)] == [
        "four<|end|>\n", "jumps over the lazy dog.<|end|>\n"]


def test_chat_template_from_flag(tmp_path, chat_tok):
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}assistant: {% endif %}"
    p = run(tmp_path, chat_tok, [{"messages": CONV[1:3]}], "--chat_template", template)
    (row,) = list(p.train)
    assert chat_tok.decode(row["input_ids"]) == "user: what is two plus two?\nassistant: four\n"
    assert [chat_tok.decode(g) for g in groups(row)] == ["four\n"]


def test_pretokenized_used_as_is(tmp_path, chat_tok):
    recs = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, {"input_ids": [9, 10]}]
    p = run(tmp_path, chat_tok, recs)
    rows = list(p.train)
    assert rows[0]["input_ids"] == [5, 6, 7, 8] and rows[0]["labels"] == [-100, -100, 7, 8]
    assert rows[1]["labels"] == [9, 10]  # no labels: the whole sequence is trained


def test_truncation_counted(tmp_path, chat_tok):
    recs = [{"input": "a " * 40, "output": "b"}, {"input": "a", "output": "b " * 40},
            {"input": "hello", "output": "there"}]
    p = run(tmp_path, chat_tok, recs, "--max_seq_length", "12")
    assert p.counts["train"] == {"ok": 1, "truncated": 1,
                                 "dropped: no trained token left after truncation to max_seq_length": 1}
    assert all(len(r["input_ids"]) <= 12 for r in p.train)


def test_batched_maps_keep_dataset_map_semantics(chat_tok):
    """fmtune runs batched map handlers on Arrow batches (ArrowBatches); the result must be
    what Dataset.map gives: columns, order, types, values, removed columns, errors."""
    import pytest
    from datasets import Dataset

    from fmtune_data_handlers.handlers import Registry
    from fmtune_data_handlers.loading import DataError
    from fmtune_data_handlers.processing import Step, apply_step

    def shout(batch, suffix="!"):
        return {"text": [t.upper() + suffix for t in batch["text"]],
                "n": [len(t) for t in batch["text"]], "ids": [[1, 2][:len(t) % 3] for t in
                                                            batch["text"]]}

    def halve(batch):
        return {"text": batch["text"][::2]}

    registry = Registry()
    registry.register_for("test")("shout", shout)
    registry.register_for("test")("halve", halve)
    ds = Dataset.from_dict({"id": [1, 2, 3], "text": ["ab", "c", "def"], "keep": [0.5, 1.5, 2.5]})

    class Cfg:
        max_seq_length = 16

    for remove in (None, ["keep"], "all"):
        step = Step("shout", {"suffix": "?"}, remove_columns=remove, batch_size=2)
        got = apply_step(ds, step, registry, chat_tok, Cfg, None, "here")
        want = ds.map(shout, fn_kwargs={"suffix": "?"}, batched=True, batch_size=2,
                      remove_columns=ds.column_names if remove == "all" else remove)
        assert got.column_names == want.column_names
        assert got.features == want.features
        assert got.to_list() == want.to_list()
        assert got.format["type"] is None
    fewer = apply_step(ds, Step("halve", remove_columns="all"), registry, chat_tok, Cfg, None, "x")
    assert fewer["text"] == ["ab", "def"]
    with pytest.raises(DataError, match="returned columns of \\[2\\] rows for a batch of 3"):
        apply_step(ds, Step("halve"), registry, chat_tok, Cfg, None, "x")
