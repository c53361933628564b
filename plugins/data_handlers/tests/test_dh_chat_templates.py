"""Chat templates in both of fms-hf-tuning's forms (``for message in messages['messages']``,
which reads the whole record, and ``for message in messages``) give the same ids and labels
in every chat path; a chat path with no chat template is one line, exit 2; a
``save_to_disk`` folder loads as the dataset it holds."""

from __future__ import annotations

import pytest
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

from fmtune.commands import load_config, validate
from fmtune.testing import build_tokenizer, run_cli, write_jsonl
from fmtune_data_handlers.chat import record_keys
from fmtune_data_handlers.loading import DataError, expand
from fmtune_data_handlers.plugin import prepare

IGNORE = -100
CHAT_TEMPLATE = (  # conftest's, the chat_tok fixture's own
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

# fms-hf-tuning's docs' templates as typed in a shell (bash drops the backslash-newlines
# inside double quotes; the \n inside the Jinja strings stay two characters)
DOCS_RECORD_TEMPLATE = (
    r"{% for message in messages['messages'] %}  {% if message['role'] == 'user' %}"
    r"{{ '<|user|>\n' + message['content'] + eos_token }}  {% elif message['role'] == 'system' %}"
    r"{{ '<|system|>\n' + message['content'] + eos_token }}  {% elif message['role'] == "
    r"'assistant' %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}  {% endif %}  "
    r"{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}  {% endif %}{% endfor %}")
DOCS_LIST_TEMPLATE = (
    r"{%- for message in messages %}  {%- if message['role'] == 'system' %}  "
    r"{{- '<|system|>\n' + message['content'] + '\n' }}  {%- elif message['role'] == 'user' %}  "
    r"{{- '<|user|>\n' + message['content'] + '\n' }}  {%- elif message['role'] == 'assistant' %}"
    r"  {%- if not loop.last %}  {{- '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}"
    r"  {%- else %}  {{- '<|assistant|>\n'  + message['content'] + eos_token }}  {%- endif %}  "
    r"{%- endif %}  {%- if loop.last and add_generation_prompt %}  {{- '<|assistant|>\n' }}  "
    r"{%- endif %}{%- endfor %}")
# the same text from the conversation itself
DOCS_RECORD_AS_LIST = DOCS_RECORD_TEMPLATE.replace("messages['messages']", "messages")
RECORD_TEMPLATE = CHAT_TEMPLATE.replace("for m in messages", "for m in messages['messages']")


def docs_record(word, turns=1):
    msgs = [{"content": "You are an AI language model.", "role": "system"}]
    for k in range(turns):
        msgs += [{"content": f"Look up a word that rhymes with {word} {k}", "role": "user"},
                 {"content": f"mist {word} {k}", "role": "assistant"}]
    return {"messages": msgs, "group": "lab_extension", "dataset": "base/full-extension",
            "metadata": f"{{\"num_turns\": {turns}}}"}


RECORDS = [docs_record("exist"), docs_record("persist", turns=2), docs_record("fox")]
CONV = [{"role": "system", "content": "be brief please"},
        {"role": "user", "content": "what is two plus two?"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "and the quick brown fox?"},
        {"role": "assistant", "content": "jumps over the lazy dog."}]


def configured(tmp_path, *flags):
    config, pm, _, _ = load_config(["--plugins", "data_handlers", "--model_name_or_path", "m",
                                    "--output_dir", str(tmp_path / "o"), *flags])
    validate(config, pm)
    return config, pm


def processed(tmp_path, tok, *flags):
    config, pm = configured(tmp_path, *flags)
    return prepare(config, tok, pm)


def rows(ds):
    return [(list(r["input_ids"]), list(r["labels"])) for r in ds]


def trained_runs(tok, ids, labels):
    out, cur = [], []
    for t, lab in zip(ids + [None], labels + [IGNORE]):
        if lab != IGNORE:
            cur.append(t)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    return out


def test_record_form_is_read_from_the_template_syntax(chat_tok):
    assert chat_tok.chat_template == CHAT_TEMPLATE
    assert record_keys(DOCS_RECORD_TEMPLATE) == ("messages",)
    assert record_keys(DOCS_LIST_TEMPLATE) == ()
    assert record_keys(CHAT_TEMPLATE) == ()
    assert record_keys("{% for m in messages.conversations %}{{ m.content }}{% endfor %}") == \
        ("conversations",)
    assert record_keys('{{ messages["chat"][0]["content"] }}{{ messages["tools"] }}') == \
        ("chat", "tools")
    # reads of the list: by number, slice, variable, filter, list methods; transformers' tags
    assert record_keys("{% set i = 0 %}{{ messages[0]['role'] }}{{ messages[1:]|length }}"
                       "{{ messages[i].content }}{{ messages[-1]['content'] }}"
                       "{{ messages.index }}{% for m in messages %}{% generation %}"
                       "{{ m['content'] }}{% endgeneration %}{% break %}{% endfor %}") == ()
    with pytest.raises(DataError, match="chat template: line 1: "):
        record_keys("{% for m in messages %}")


def test_docs_templates_with_instruction_and_response_templates(tmp_path, chat_tok):
    """The fms docs' command: --chat_template (record form) with --instruction_template and
    --response_template; the same ids/labels as the list form of the same template."""
    data = write_jsonl(tmp_path / "chat.jsonl", RECORDS)
    flags = ["--training_data_path", data, "--instruction_template", "<|user|>",
             "--response_template", "<|assistant|>"]
    got = processed(tmp_path, chat_tok, "--chat_template", DOCS_RECORD_TEMPLATE, *flags)
    assert got.counts["train"] == {"ok": 3}
    want = processed(tmp_path, chat_tok, "--chat_template", DOCS_RECORD_AS_LIST, *flags)
    # \n typed in the shell stays a Jinja escape (--chat_template is not unescaped): a newline
    assert chat_tok.apply_chat_template(RECORDS[0]["messages"], tokenize=False,
                                        chat_template=DOCS_RECORD_AS_LIST) == (
        "  <|system|>\nYou are an AI language model.<|endoftext|>      <|user|>\nLook up a word "
        "that rhymes with exist 0<|endoftext|>      <|assistant|>\nmist exist 0<|endoftext|>    ")
    assert rows(got.train) == rows(want.train)
    for (ids, labels), rec in zip(rows(got.train), RECORDS):
        text = chat_tok.apply_chat_template(rec["messages"], tokenize=False,
                                            chat_template=DOCS_RECORD_AS_LIST)
        assert ids == chat_tok(text, add_special_tokens=False)["input_ids"]
        answers = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
        tails = [" " * 6] * (len(answers) - 1) + [" " * 4]  # up to the next <|user|>
        assert trained_runs(chat_tok, ids, labels) == [
            f"\n{a}<|endoftext|>{t}" for a, t in zip(answers, tails)]
    # the docs' second template (list form) keeps working
    other = processed(tmp_path, chat_tok, "--chat_template", DOCS_LIST_TEMPLATE, *flags)
    ids, labels = rows(other.train)[1]
    assert trained_runs(chat_tok, ids, labels) == ["\nmist persist 0<|endoftext|>\n",
                                                   "\nmist persist 1<|endoftext|>"]


def test_per_turn_masking_record_form_equals_list_form(tmp_path, chat_tok):
    recs = [{"messages": CONV, "group": "g", "metadata": "{}"},
            {"messages": CONV[:3], "group": "h", "metadata": "{}"}]
    data = write_jsonl(tmp_path / "chat.jsonl", recs)
    got = processed(tmp_path, chat_tok, "--training_data_path", data,
                    "--chat_template", RECORD_TEMPLATE)
    want = processed(tmp_path, chat_tok, "--training_data_path", data,
                     "--chat_template", CHAT_TEMPLATE)
    assert rows(got.train) == rows(want.train)
    ids, labels = rows(got.train)[0]
    assert ids == chat_tok(chat_tok.apply_chat_template(CONV, tokenize=False),
                           add_special_tokens=False)["input_ids"]
    assert trained_runs(chat_tok, ids, labels) == ["four<|end|>\n",
                                                   "jumps over the lazy dog.<|end|>\n"]
    # the tokenizer's own template in the record form
    tok = AutoTokenizer.from_pretrained(_saved(tmp_path, chat_tok))
    tok.chat_template = RECORD_TEMPLATE
    assert rows(processed(tmp_path, tok, "--training_data_path", data).train) == \
        rows(want.train)


def _saved(tmp_path, tok):
    folder = tmp_path / "tok"
    tok.save_pretrained(folder)
    return str(folder)


def test_record_form_reading_another_column_is_refused(tmp_path, chat_tok):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONV, "conv": CONV}])
    template = RECORD_TEMPLATE.replace("messages['messages']", "messages['conv']")
    with pytest.raises(DataError, match=r"reads messages\['conv'\] but the conversation column "
                                        r"is 'messages'"):
        processed(tmp_path, chat_tok, "--training_data_path", data, "--chat_template", template)
    got = processed(tmp_path, chat_tok, "--training_data_path", data, "--chat_template",
                    template, "--dataset_conversation_field", "conv")
    want = processed(tmp_path, chat_tok, "--training_data_path", data)
    assert rows(got.train) == rows(want.train)


def data_config(tmp_path, handler, fn_kwargs, template):
    (tmp_path / "t.jinja").write_text(template)
    write_jsonl(tmp_path / "chat.jsonl", RECORDS)
    path = tmp_path / "data_config.yaml"
    path.write_text(f"""
dataprocessor:
  type: default
  chat_template_path: t.jinja
datasets:
  - name: chat
    data_paths: [chat.jsonl]
    data_handlers:
      - name: {handler}
        arguments:
          remove_columns: all
          fn_kwargs: {fn_kwargs}
""")
    return str(path)


@pytest.mark.parametrize("handler, fn_kwargs, flags", [
    ("apply_tokenizer_chat_template", "{formatted_text_column_name: formatted_chat_data}",
     ["--dataset_text_field", "formatted_chat_data", "--instruction_template", "<|user|>",
      "--response_template", "<|assistant|>"]),
    ("tokenize_and_apply_chat_template_with_masking", "{conversation_column: messages}", []),
])
def test_data_config_handlers_record_form(tmp_path, chat_tok, handler, fn_kwargs, flags):
    got = processed(tmp_path, chat_tok, "--data_config_path",
                    data_config(tmp_path, handler, fn_kwargs, RECORD_TEMPLATE), *flags)
    want = processed(tmp_path, chat_tok, "--data_config_path",
                     data_config(tmp_path, handler, fn_kwargs, CHAT_TEMPLATE), *flags)
    assert got.counts["train"] == {"ok": 3}
    assert rows(got.train) == rows(want.train)
    ids, labels = rows(got.train)[1]
    text = chat_tok.apply_chat_template(RECORDS[1]["messages"], tokenize=False)
    eos = "<|endoftext|>" if flags else ""  # the tokenize handler adds an EOS
    assert ids == chat_tok(text + eos, add_special_tokens=False)["input_ids"]
    assert trained_runs(chat_tok, ids, labels) == [
        "\nmist persist 0<|end|>\n" if flags else "mist persist 0<|end|>\n",
        "\nmist persist 1<|end|>\n" + eos if flags else "mist persist 1<|end|>\n"]


def test_docs_command_trains_and_previews(tmp_path, chat_model_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", [docs_record(f"w{k}") for k in range(16)])
    flags = ["--model_name_or_path", chat_model_dir, "--training_data_path", data,
             "--chat_template", DOCS_RECORD_TEMPLATE, "--instruction_template", "<|user|>",
             "--response_template", "<|assistant|>"]
    res = run_cli(["data", "preview", "--n", "1", *flags])
    assert res.exit_code == 0, res.stderr
    assert "<|assistant|>[[\nmist w0 0<|endoftext|>    ]]" in res.stdout
    assert res.stdout.splitlines()[-1] == "train: 16 kept, 0 truncated at max_seq_length, 0 dropped"
    res = run_cli(["train", *flags, "--output_dir", str(tmp_path / "run"), "--num_train_epochs",
                   "1", "--per_device_train_batch_size", "8", "--save_strategy", "no"])
    assert res.exit_code == 0, res.stderr


# ------------------------------------------------------------ no chat template


@pytest.fixture
def plain_tok_dir(tmp_path):
    """A tokenizer folder without a chat template (no model: the error comes first)."""
    tok = build_tokenizer(["system user assistant what is two plus two four"])
    assert not tok.chat_template
    return _saved(tmp_path, tok)


def test_no_chat_template_is_one_line_exit_2(tmp_path, plain_tok_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONV}])
    for extra in ([], ["--instruction_template", "<|user|>", "--response_template",
                       "<|assistant|>"]):
        res = run_cli(["train", "--plugins", "data_handlers", "--model_name_or_path",
                       plain_tok_dir, "--training_data_path", data, "--output_dir",
                       str(tmp_path / "o"), *extra])
        assert res.exit_code == 2, res.stderr
        assert "Traceback" not in res.stderr
        (line,) = [ln for ln in res.stderr.splitlines() if "chat template" in ln]
        assert ("datasets[training_data].data_handlers[0] "
                "(tokenize_and_apply_chat_template_with_masking): the tokenizer has no chat "
                "template; pass --chat_template, or set dataprocessor.chat_template") in line


@pytest.mark.parametrize("handler", ["apply_tokenizer_chat_template",
                                     "tokenize_and_apply_chat_template_with_masking"])
def test_no_chat_template_in_data_config(tmp_path, plain_tok_dir, handler):
    cfg = data_config(tmp_path, handler, "{}", CHAT_TEMPLATE)
    text = (tmp_path / "data_config.yaml").read_text().replace("  chat_template_path: t.jinja\n",
                                                               "")
    (tmp_path / "data_config.yaml").write_text(text)
    tok = AutoTokenizer.from_pretrained(plain_tok_dir)
    with pytest.raises(DataError) as e:
        processed(tmp_path, tok, "--data_config_path", cfg, "--dataset_text_field", "x")
    assert str(e.value) == (f"{cfg}: datasets[chat].data_handlers[0] ({handler}): the tokenizer "
                            "has no chat template; pass --chat_template, or set "
                            "dataprocessor.chat_template (or chat_template_path) in the "
                            "data_config")
    # given in the data_config, it is used
    p = processed(tmp_path, tok, "--data_config_path",
                  data_config(tmp_path, handler, "{}", CHAT_TEMPLATE),
                  *(["--dataset_text_field", "formatted_chat_data"]
                    if handler == "apply_tokenizer_chat_template" else []))
    assert p.counts["train"] == {"ok": 3}


# ------------------------------------------------------------- save_to_disk


def test_save_to_disk_folder_loads_as_its_dataset(tmp_path, chat_tok):
    recs = [{"input": f"question {w}", "output": f"answer {w}"} for w in ("one", "two", "three")]
    want = rows(processed(tmp_path, chat_tok, "--training_data_path",
                          write_jsonl(tmp_path / "io.jsonl", recs)).train)
    saved = Dataset.from_list(recs)
    saved.set_format("numpy")  # the saved format is not what the handlers get
    saved.save_to_disk(str(tmp_path / "saved"))
    assert [f.rsplit("/", 1)[1] for f in expand(str(tmp_path / "saved"))] == [
        "data-00000-of-00001.arrow"]
    assert rows(processed(tmp_path, chat_tok, "--training_data_path",
                          str(tmp_path / "saved")).train) == want
    # a DatasetDict folder: its train split, or dataset_split_name
    DatasetDict({"train": Dataset.from_list(recs[:1]), "test": Dataset.from_list(recs)}) \
        .save_to_disk(str(tmp_path / "dict"))
    assert rows(processed(tmp_path, chat_tok, "--training_data_path",
                          str(tmp_path / "dict")).train) == want[:1]
    cfg = tmp_path / "dc.yaml"
    cfg.write_text(f"datasets: [{{name: d, data_paths: ['{tmp_path / 'dict'}'], "
                   "dataset_split_name: test}]\n")
    assert rows(processed(tmp_path, chat_tok, "--data_config_path", str(cfg)).train) == want
    cfg.write_text(cfg.read_text().replace("split_name: test", "split_name: dev"))
    with pytest.raises(DataError, match="has no split 'dev' \\(splits: train, test\\)"):
        processed(tmp_path, chat_tok, "--data_config_path", str(cfg))
    # inside a folder of data: its Arrow files, not its JSON metadata
    assert [f.rsplit("/", 2)[1] for f in expand(str(tmp_path))
            if f.endswith(".json")] == []
