"""fms-hf-tuning's data_config files work unchanged.

One test per example config in fms-hf-tuning's tests/artifacts/predefined_data_configs
(rewritten here with small local data). Expected ids and labels are computed the way
fms-hf-tuning's handlers compute them (``fms_*`` helpers below), and each config trains a step.
"""

from __future__ import annotations

import base64
import textwrap

import pytest
from datasets import Dataset

from fmtune.commands import load_config, validate
from fmtune.testing import run_cli, write_jsonl
from fmtune_data_handlers.plugin import prepare

IGNORE = -100
IO = [{"input": f"question {w}", "output": f"the answer is {w}"}
      for w in ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")]
CONV = [{"role": "system", "content": "be brief please"},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "the quick fox"},
        {"role": "user", "content": "and then?"},
        {"role": "assistant", "content": "jumps over"}]
# differs from the tokenizer's own template (no newlines), so its use is visible
OTHER_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_config(tmp_path, text: str) -> str:
    path = tmp_path / "data_config.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def configure(tmp_path, *flags):
    config, pm, _, _ = load_config(["--plugins", "data_handlers", "--model_name_or_path", "m",
                                    "--output_dir", str(tmp_path / "o"), *flags])
    return config, pm


def processed(tmp_path, tok, cfg, *flags):
    config, pm = configure(tmp_path, "--data_config_path", cfg, *flags)
    validate(config, pm)
    return prepare(config, tok, pm)


def trains_a_step(tmp_path, model_dir, cfg, *flags):
    res = run_cli(["train", "--model_name_or_path", model_dir, "--data_config_path", cfg,
                   "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
                   "--save_strategy", "no", "--per_device_train_batch_size", "2", *flags])
    assert res.exit_code == 0, res.stderr


def refused(tmp_path, cfg, needle, *flags):
    """Exit 2 with one line naming the file and the key, before any model loads ('m' is no
    model)."""
    res = run_cli(["train", "--model_name_or_path", "m", "--data_config_path", cfg,
                   "--output_dir", str(tmp_path / "o"), *flags])
    assert res.exit_code == 2
    line = next(ln for ln in res.stderr.splitlines() if "error" in ln)
    assert f"{cfg}: " in line and needle in line, res.stderr


def rows(ds):
    return [(list(r["input_ids"]), list(r["labels"])) for r in ds]


def fms_input_masking(tok, inp, out):
    """fms-hf-tuning's tokenize_and_apply_input_masking."""
    sep = "" if inp.endswith((" ", "\n", "\t")) or out.startswith((" ", "\n", "\t")) else " "
    ids = tok(inp + sep + out + tok.eos_token)["input_ids"]
    n = len(tok(inp)["input_ids"])
    return ids, [IGNORE] * n + ids[n:]


def fms_chat_masking(tok, messages, chat_template=None):
    """fms-hf-tuning's tokenize_and_apply_chat_template_with_masking: every non-assistant
    message, up to the next assistant generation prompt, is masked."""
    def n_tokens(msgs, gen):
        return len(tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen,
                                               chat_template=chat_template),
                       add_special_tokens=False)["input_ids"])
    ids = tok(tok.apply_chat_template(messages, tokenize=False, chat_template=chat_template),
              add_special_tokens=False)["input_ids"]
    labels = list(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            start = n_tokens(messages[:i], False) if i else 0
            nxt = i + 1 < len(messages) and messages[i + 1]["role"] == "assistant"
            end = n_tokens(messages[: i + 1], nxt)
            labels[start:end] = [IGNORE] * (end - start)
    return ids, labels


def input_masking_config(tmp_path, name="io", streaming=False, extra=""):
    write_jsonl(tmp_path / f"{name}.jsonl", IO)
    return write_config(tmp_path, f"""
        dataprocessor:
          type: default
          streaming: {str(streaming).lower()}
        datasets:
          - name: {name}
            data_paths: ["{name}.jsonl"]
            data_handlers:
              - name: tokenize_and_apply_input_masking
                arguments:
                  remove_columns: all
                  batched: false
                  fn_kwargs:
                    input_column_name: input
                    output_column_name: output{extra}
    """)


# ------------------------------------------------------ input/output masking


def test_tokenize_and_apply_input_masking(tmp_path, chat_tok, chat_model_dir):
    cfg = input_masking_config(tmp_path, extra="\n                    add_eos_token: true")
    p = processed(tmp_path, chat_tok, cfg)
    assert rows(p.train) == [fms_input_masking(chat_tok, r["input"], r["output"]) for r in IO]
    trains_a_step(tmp_path, chat_model_dir, cfg)


def test_tokenize_and_apply_input_masking_streaming(tmp_path, chat_tok, chat_model_dir):
    cfg = input_masking_config(tmp_path, streaming=True)
    p = processed(tmp_path, chat_tok, cfg, "--max_steps", "1")
    assert rows(p.train) == [fms_input_masking(chat_tok, r["input"], r["output"]) for r in IO]
    trains_a_step(tmp_path, chat_model_dir, cfg)


def test_rename_and_select_columns_with_column_arguments(tmp_path, chat_tok, chat_model_dir):
    write_jsonl(tmp_path / "io.jsonl", [{**r, "id": i} for i, r in enumerate(IO)])
    cfg = write_config(tmp_path, """
        dataprocessor: {type: default}
        datasets:
          - name: renamed
            data_paths: [io.jsonl]
            data_handlers:
              - name: rename_columns
                arguments:
                  column_mapping: {input: instruction, output: response}
              - name: select_columns
                arguments:
                  column_names: [instruction, response]
              - name: tokenize_and_apply_input_masking
                arguments:
                  remove_columns: all
                  batched: false
                  fn_kwargs: {input_column_name: instruction, output_column_name: response}
    """)
    p = processed(tmp_path, chat_tok, cfg)
    assert rows(p.train) == [fms_input_masking(chat_tok, r["input"], r["output"]) for r in IO]
    trains_a_step(tmp_path, chat_model_dir, cfg)


def test_remove_columns_with_column_names_and_misplaced_column_argument(tmp_path, chat_tok):
    write_jsonl(tmp_path / "io.jsonl", [{**r, "id": i} for i, r in enumerate(IO)])
    cfg = write_config(tmp_path, """
        datasets:
          - name: io
            data_paths: [io.jsonl]
            data_handlers:
              - name: remove_columns
                arguments: {column_names: [id]}
              - name: tokenize_and_apply_input_masking
                arguments: {remove_columns: [input, output], batched: false}
    """)
    assert len(processed(tmp_path, chat_tok, cfg).train) == len(IO)
    cfg = write_config(tmp_path, """
        datasets:
          - name: io
            data_paths: [io.jsonl]
            data_handlers:
              - name: tokenize
                arguments: {column_names: [id]}
    """)
    refused(tmp_path, cfg, "datasets[0].data_handlers[0].arguments.column_names: only for "
                           "column handlers")


# ------------------------------------------------- sampling and splitting


def sampled_datasets(tmp_path, n=4):
    for k in range(1, n + 1):
        write_jsonl(tmp_path / f"d{k}.jsonl",
                    [{"input": f"set{k} q{i}", "output": f"a{i}"} for i in range(10)])


def handler_block():
    return """
            data_handlers:
              - name: tokenize_and_apply_input_masking
                arguments:
                  remove_columns: all
                  batched: false
                  fn_kwargs: {input_column_name: input, output_column_name: output}"""


def test_multiple_datasets_with_sampling(tmp_path, chat_tok, chat_model_dir):
    sampled_datasets(tmp_path, 3)
    body = "".join(f"""
          - name: dataset_{k}
            sampling: {r}
            data_paths: [d{k}.jsonl]""" + handler_block() for k, r in ((1, 0.3), (2, 0.4), (3, 0.3)))
    cfg = write_config(tmp_path, """
        dataprocessor:
          type: default
          sampling_stopping_strategy: first_exhausted
          seed: 66
        datasets:""" + body)
    p = processed(tmp_path, chat_tok, cfg)
    from datasets import interleave_datasets

    expected = interleave_datasets(
        [Dataset.from_list([{"k": k, "i": i} for i in range(10)]) for k in (1, 2, 3)],
        probabilities=[0.3, 0.4, 0.3], seed=66, stopping_strategy="first_exhausted")
    got = [chat_tok.decode(ids) for ids, _ in rows(p.train)]
    assert got == [f"set{r['k']} q{r['i']} a{r['i']}<|endoftext|>" for r in expected]
    trains_a_step(tmp_path, chat_model_dir, cfg)


@pytest.mark.parametrize("variant", [1, 2])
def test_sampling_only_on_datasets_with_a_train_split(tmp_path, chat_tok, chat_model_dir, variant):
    """fms-hf-tuning's rule: datasets that only give validation (train 0 or absent in split)
    need no sampling ratio; those giving train all need one, summing to 1."""
    sampled_datasets(tmp_path)
    if variant == 1:
        specs = [("{train: 0.8, validation: 0.2}", 0.3), ("{train: 0.6, validation: 0.2}", 0.4),
                 ("{train: 0.4, validation: 0.1}", 0.3), ("{train: 0.0, validation: 0.3}", None)]
        n_train, n_valid = 8 + 6 + 4, 2 + 2 + 1 + 3
    else:
        specs = [("{train: 0.8, validation: 0.2}", 0.6), ("{train: 0.6}", 0.4),
                 ("{validation: 0.1}", None), ("{train: 0.0, validation: 0.3}", None)]
        n_train, n_valid = 8 + 6, 2 + 1 + 3
    body = "".join(f"""
          - name: dataset_{k}
            split: {split}""" + (f"\n            sampling: {r}" if r else "") + f"""
            data_paths: [d{k}.jsonl]""" + handler_block() for k, (split, r) in enumerate(specs, 1))
    cfg = write_config(tmp_path, """
        dataprocessor:
          type: default
          sampling_stopping_strategy: all_exhausted
          seed: 66
        datasets:""" + body)
    p = processed(tmp_path, chat_tok, cfg)
    assert p.counts["validation"] == {"ok": n_valid}
    valid_sets = {chat_tok.decode(ids).split()[0] for ids, _ in rows(p.validation)}
    assert valid_sets == ({"set1", "set2", "set3", "set4"} if variant == 1 else
                          {"set1", "set3", "set4"})
    train_sets = {chat_tok.decode(ids).split()[0] for ids, _ in rows(p.train)}
    assert train_sets == ({"set1", "set2", "set3"} if variant == 1 else {"set1", "set2"})
    assert p.counts["train"] == {"ok": n_train}
    trains_a_step(tmp_path, chat_model_dir, cfg)


@pytest.mark.parametrize("datasets,needle", [
    ("  - {name: a, data_paths: [d1.jsonl], sampling: 0.5}\n  - {name: b, data_paths: [d2.jsonl]}\n",
     "datasets[1].sampling: required, as other datasets have sampling"),
    ("  - {name: a, data_paths: [d1.jsonl], sampling: 1.0}\n"
     "  - {name: b, data_paths: [d2.jsonl], split: {validation: 0.5}, sampling: 0.2}\n",
     "datasets[1].sampling: dataset 'b' has no train split"),
    ("  - {name: a, data_paths: [d1.jsonl], split: {validation: 1.0}}\n",
     "datasets: no dataset gives a train split"),
])
def test_sampling_errors(tmp_path, datasets, needle):
    sampled_datasets(tmp_path, 2)
    refused(tmp_path, write_config(tmp_path, "datasets:\n" + datasets), needle)


def test_dataset_split_name_and_custom_split(tmp_path, chat_tok, chat_model_dir):
    """A folder in the Hub's layout with a split named train_sft; the chat masking handler
    ignores fms-hf-tuning's formatted_text_column_name as fms-hf-tuning does."""
    folder = tmp_path / "hub_style" / "data"
    folder.mkdir(parents=True)
    Dataset.from_list([{"messages": CONV}] * 10).to_parquet(
        str(folder / "train_sft-00000-of-00001.parquet"))
    handlers = """
            data_handlers:
              - name: tokenize_and_apply_chat_template_with_masking
                arguments:
                  remove_columns: all
                  batched: false
                  fn_kwargs:
                    formatted_text_column_name: formatted_chat_data
                    conversation_column: messages"""
    cfg = write_config(tmp_path, """
        dataprocessor:
          type: default
          sampling_stopping_strategy: first_exhausted
          seed: 66
        datasets:
          - name: with_split
            split: {train: 0.8, validation: 0.2}
            sampling: 0.5
            dataset_split_name: train_sft
            data_paths: [hub_style]""" + handlers + """
          - name: without_split
            sampling: 0.5
            dataset_split_name: train_sft
            data_paths: [hub_style]""" + handlers)
    p = processed(tmp_path, chat_tok, cfg)
    assert len(p.validation) == 2
    expected = fms_chat_masking(chat_tok, CONV)
    assert len(p.train) >= 8 and all(r == expected for r in rows(p.train))
    trains_a_step(tmp_path, chat_model_dir, cfg)
    write_jsonl(tmp_path / "c.jsonl", [{"messages": CONV}])
    cfg = write_config(tmp_path, """
        datasets:
          - {name: a, data_paths: [c.jsonl], dataset_split_name: train_sft}
    """)
    with pytest.raises(Exception, match="dataset_split_name 'train_sft': a data file has only"):
        processed(tmp_path, chat_tok, cfg)


# --------------------------------------------------------------- templates


def formatter_config(tmp_path, streaming=False):
    write_jsonl(tmp_path / "tweets.jsonl", [
        {"Tweet text": "the quick fox", "text_label": "yes"},
        {"Tweet text": "hello there", "text_label": "no"}])
    return write_config(tmp_path, f"""
        dataprocessor:
          type: default
          streaming: {str(streaming).lower()}
        datasets:
          - name: tweets
            data_paths: [tweets.jsonl]
            data_handlers:
              - name: apply_custom_jinja_template
                arguments:
                  remove_columns: all
                  batched: false
                  fn_kwargs:
                    formatted_text_column_name: formatted_text
                    template: "Input: {{{{element['Tweet text']}}}} Label: {{{{text_label}}}}"
    """)


@pytest.mark.parametrize("streaming", [False, True])
def test_apply_custom_jinja_template_then_text_field(tmp_path, chat_tok, chat_model_dir, streaming):
    """fms-hf-tuning's chain: the handler only formats; dataset_text_field and
    response_template (flags) tokenize and mask it."""
    cfg = formatter_config(tmp_path, streaming)
    flags = ["--dataset_text_field", "formatted_text", "--response_template", " Label:",
             "--max_steps", "1"]
    p = processed(tmp_path, chat_tok, cfg, *flags)
    got = [(chat_tok.decode(ids), chat_tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE]))
           for ids, labels in rows(p.train)]
    assert got == [("Input: the quick fox Label: yes<|endoftext|>", " yes<|endoftext|>"),
                   ("Input: hello there Label: no<|endoftext|>", " no<|endoftext|>")]
    trains_a_step(tmp_path, chat_model_dir, cfg, *flags)


def test_data_formatter_template_flag_reaches_fields_with_spaces(tmp_path, chat_tok):
    write_jsonl(tmp_path / "t.jsonl", [{"Tweet text": "hello there", "label": "no"}])
    config, pm = configure(tmp_path, "--training_data_path", str(tmp_path / "t.jsonl"),
                           "--data_formatter_template",
                           "{{element['Tweet text']}} says {{label}}{{eos_token}}")
    p = prepare(config, chat_tok, pm)
    assert chat_tok.decode(p.train[0]["input_ids"]) == "hello there says no<|endoftext|>"


# -------------------------------------------------------------------- chat


def chat_configs(tmp_path, handler, template_key, template, fn_kwargs):
    for k in (1, 2, 3):
        write_jsonl(tmp_path / f"chat{k}.jsonl", [{"messages": CONV}] * 2)
    body = "".join(f"""
          - name: dataset_{k}
            data_paths: [chat{k}.jsonl]
            data_handlers:
              - name: {handler}
                arguments:
                  remove_columns: all
                  fn_kwargs: {fn_kwargs}""" for k in (1, 2, 3))
    return write_config(tmp_path, f"""
        dataprocessor:
          type: default
          {template_key}: {template}
        datasets:""" + body)


@pytest.mark.parametrize("key", ["chat_template", "chat_template_base64", "chat_template_path"])
def test_chat_masking_with_template_from_data_config(tmp_path, chat_tok, chat_model_dir, key):
    value = {"chat_template": f"\"{OTHER_TEMPLATE}\"",
             "chat_template_base64": base64.b64encode(OTHER_TEMPLATE.encode()).decode(),
             "chat_template_path": "template.jinja"}[key]
    (tmp_path / "template.jinja").write_text(OTHER_TEMPLATE)
    cfg = chat_configs(tmp_path, "tokenize_and_apply_chat_template_with_masking", key, value,
                       "{max_seq_length: 1024, conversation_column: messages}")
    p = processed(tmp_path, chat_tok, cfg)
    expected = fms_chat_masking(chat_tok, CONV, OTHER_TEMPLATE)
    assert chat_tok.decode(expected[0]).startswith("<|system|>be brief please<|end|><|user|>")
    assert rows(p.train) == [expected] * 6
    trains_a_step(tmp_path, chat_model_dir, cfg)


def test_apply_tokenizer_chat_template_then_text_field(tmp_path, chat_tok, chat_model_dir):
    """fms-hf-tuning's multi-turn chain: the handler renders the chat, then the text field is
    trained from each response_template up to the next instruction_template."""
    cfg = chat_configs(tmp_path, "apply_tokenizer_chat_template", "chat_template",
                       f"\"{OTHER_TEMPLATE}\"", "{formatted_text_column_name: formatted_chat_data, "
                       "conversation_column_name: messages}")
    flags = ["--dataset_text_field", "formatted_chat_data", "--response_template", "<|assistant|>",
             "--instruction_template", "<|user|>"]
    p = processed(tmp_path, chat_tok, cfg, *flags)
    text = chat_tok.apply_chat_template(CONV, tokenize=False, chat_template=OTHER_TEMPLATE)
    assert len(p.train) == 6
    for ids, labels in rows(p.train):
        assert chat_tok.decode(ids) == text + "<|endoftext|>"
        trained = [t if lab != IGNORE else None for t, lab in zip(ids, labels)]
        spans, cur = [], []
        for t in trained + [None]:
            if t is None and cur:
                spans.append(chat_tok.decode(cur))
                cur = []
            elif t is not None:
                cur.append(t)
        assert spans == ["the quick fox<|end|>", "jumps over<|end|><|endoftext|>"]
    trains_a_step(tmp_path, chat_model_dir, cfg, *flags)


def test_invalid_base64_chat_template_is_refused(tmp_path):
    cfg = chat_configs(tmp_path, "tokenize_and_apply_chat_template_with_masking",
                       "chat_template_base64",
                       "'dsa" + base64.b64encode(OTHER_TEMPLATE.encode()).decode() + "'",
                       "{conversation_column: messages}")
    refused(tmp_path, cfg, "dataprocessor.chat_template_base64: not base64 of UTF-8 text")


def test_two_chat_templates_are_refused(tmp_path):
    cfg = write_config(tmp_path, """
        dataprocessor: {chat_template: "x", chat_template_path: t.jinja}
        datasets: [{name: a, data_paths: [x.jsonl]}]
    """)
    refused(tmp_path, cfg, "dataprocessor: chat_template and chat_template_path are exclusive")


# ---------------------------------------------------- pretokenized, columns


@pytest.mark.parametrize("streaming", [False, True])
def test_pretokenized_data(tmp_path, chat_tok, chat_model_dir, streaming):
    recs = [{"input_ids": [5, 6, 7, 8], "labels": [IGNORE, IGNORE, 7, 8],
             "attention_mask": [1, 1, 1, 1]}] * 4
    write_jsonl(tmp_path / "tok.jsonl", recs)
    cfg = write_config(tmp_path, ("dataprocessor:\n  type: default\n  streaming: true\n"
                                  if streaming else "") +
                       "datasets:\n  - name: pretokenized_dataset\n    data_paths: [tok.jsonl]\n")
    p = processed(tmp_path, chat_tok, cfg, "--max_steps", "1")
    assert rows(p.train) == [([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8])] * 4
    trains_a_step(tmp_path, chat_model_dir, cfg)


def test_duplicate_columns_input_ids_to_labels(tmp_path, chat_tok, chat_model_dir):
    write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [5, 6, 7]}, {"input_ids": [9, 10]}])
    cfg = write_config(tmp_path, """
        dataprocessor: {type: default}
        datasets:
          - name: pre_tokenized_with_only_input_ids
            data_paths: [ids.jsonl]
            data_handlers:
              - name: duplicate_columns
                arguments:
                  batched: false
                  fn_kwargs: {existing_column_name: input_ids, new_column_name: labels}
    """)
    p = processed(tmp_path, chat_tok, cfg)
    assert rows(p.train) == [([5, 6, 7], [5, 6, 7]), ([9, 10], [9, 10])]
    trains_a_step(tmp_path, chat_model_dir, cfg)


TEXTS = ["the quick brown fox jumps over", "hello there"]


@pytest.mark.parametrize("skip", [False, True])
def test_tokenize_duplicate_and_skip_large_columns(tmp_path, chat_tok, chat_model_dir, skip):
    """fms-hf-tuning's tokenize (+ duplicate_columns input_ids -> labels, + a filter). fmtune's
    tokenize appends EOS (add_eos_token: true) where fms-hf-tuning's does not."""
    write_jsonl(tmp_path / "t.jsonl", [{"input": "x", "output": t} for t in TEXTS])
    limit = len(chat_tok(TEXTS[1])["input_ids"]) + 1
    cfg = write_config(tmp_path, """
        dataprocessor: {type: default}
        datasets:
          - name: non_tokenized
            data_paths: [t.jsonl]
            data_handlers:
              - name: tokenize
                arguments:
                  remove_columns: all
                  batched: true
                  fn_kwargs: {text_column_name: output, truncation: true, max_length: 1024}
              - name: duplicate_columns
                arguments:
                  batched: true
                  fn_kwargs: {existing_column_name: input_ids, new_column_name: labels}
    """ + (f"""
              - name: skip_samples_with_large_columns
                arguments:
                  fn_kwargs: {{column_name: input_ids, max_allowed_length: {limit}}}
    """ if skip else ""))
    p = processed(tmp_path, chat_tok, cfg)
    expected = [chat_tok(t)["input_ids"] + [chat_tok.eos_token_id] for t in TEXTS]
    expected = [e for e in expected if not skip or len(e) <= limit]
    assert rows(p.train) == [(e, e) for e in expected]
    assert len(expected) == (1 if skip else 2)
    trains_a_step(tmp_path, chat_model_dir, cfg)


def test_duplicate_columns_refuses_an_existing_column(tmp_path, chat_tok):
    cfg = input_masking_config(tmp_path)
    text = open(cfg).read() + textwrap.indent(textwrap.dedent("""
        - name: duplicate_columns
          arguments:
            fn_kwargs: {existing_column_name: input_ids, new_column_name: labels}
    """), " " * 6)
    open(cfg, "w").write(text)
    with pytest.raises(Exception, match="duplicate_columns: column 'labels' already exists"):
        processed(tmp_path, chat_tok, cfg)


# ---------------------------------------------------------------- refused


ODM_REFUSED = [
    ("reward_type: perplexity", 2, "dataprocessor.odm.reward_type: 'perplexity' is not a reward; "
     "one of entropy, entropy3_varent1, entropy_last_token, train_loss, validation_loss, "
     "gradnorm"),
    ("reward_type: Entropy_Last", 2, "dataprocessor.odm.reward_type: 'Entropy_Last' is not a "
     "reward (did you mean 'entropy_last_token'?); one of entropy, "),
    ("reward_type: train_loss", 1, "datasets: type: odm mixes datasets: give two or more"),
    ("{reward_type: train_loss, auto_categorize_input_column: input}", 2,
     "dataprocessor.odm.auto_categorize_input_column splits one dataset into categories; this "
     "config lists 2 datasets"),
    ("{reward_type: train_loss, auto_categorize_num_categories: 3}", 1,
     "dataprocessor.odm.auto_categorize_input_column: required to auto-categorize"),
    ("{reward_type: train_loss, gama: 0.1}", 2, "dataprocessor.odm.gama: unknown key (did you "
     "mean 'gamma'?)"),
    ("{reward_type: train_loss, eta: 0}", 2, "dataprocessor.odm.eta: must be positive, got 0.0"),
]


@pytest.mark.parametrize("given, reward", [
    # fms-hf-tuning's example (tests/artifacts/predefined_data_configs/multiple_datasets_with_odm)
    ("reward_type: validation_loss", "validation_loss"),
    ("gamma: 0.1", "entropy"),  # fms-hf-tuning's default
    ("reward_type: ENTROPY3_VARENT1", "entropy3_varent1"),  # fms uppercases the name
    ("reward_type: GradNorm", "gradnorm"),
])
def test_online_data_mixing_rewards_accepted(tmp_path, given, reward):
    from fmtune_data_handlers.handlers import collect
    from fmtune_data_handlers.processing import read_data_config

    sampled_datasets(tmp_path, 2)
    cfg = write_config(tmp_path, f"""
        dataprocessor:
          type: odm
          odm: {{{given}}}
        datasets:
          - name: dataset_1
            split: {{train: 0.8, validation: 0.2}}
            data_paths: [d1.jsonl]
          - name: dataset_2
            split: {{train: 0.8, validation: 0.2}}
            data_paths: [d2.jsonl]
    """)
    config, pm = configure(tmp_path, "--data_config_path", cfg, "--max_steps", "4")
    assert read_data_config(cfg, collect(pm, config)).odm["reward_type"] == reward
    validate(config, pm)  # no problem: each dataset has a validation split


@pytest.mark.parametrize("given", ["gamma: 0.1", "reward_type: validation_loss"])
def test_a_validation_reward_refuses_a_dataset_without_validation_split(tmp_path, given):
    sampled_datasets(tmp_path, 3)
    cfg = write_config(tmp_path, f"""
        dataprocessor:
          type: odm
          odm: {{{given}}}
        datasets:
          - name: dataset_1
            split: {{train: 0.8, validation: 0.2}}
            data_paths: [d1.jsonl]
          - name: dataset_2
            data_paths: [d2.jsonl]
          - name: dataset_3
            split: {{train: 1.0}}
            data_paths: [d3.jsonl]
    """)
    reward = "entropy" if given.startswith("gamma") else "validation_loss"
    refused(tmp_path, cfg, f"dataprocessor.odm.reward_type {reward} computes each dataset's "
            "reward on its validation split; datasets[dataset_2], datasets[dataset_3] have none "
            "(add split: {train: 0.9, validation: 0.1})", "--max_steps", "4")


@pytest.mark.parametrize("odm, datasets, needle", ODM_REFUSED)
def test_online_data_mixing_refusals(tmp_path, odm, datasets, needle):
    sampled_datasets(tmp_path, 2)
    odm = odm if odm.startswith("{") else "{" + odm + "}"
    cfg = write_config(tmp_path, f"""
        dataprocessor:
          type: odm
          seed: 66
          odm: {odm}
        datasets:
          - name: dataset_1
            split: {{train: 0.8, validation: 0.2}}
            data_paths: [d1.jsonl]
    """ + ("" if datasets == 1 else """
          - name: dataset_2
            split: {train: 0.8, validation: 0.2}
            data_paths: [d2.jsonl]
    """))
    refused(tmp_path, cfg, needle, "--max_steps", "4")


def test_fms_single_dataset_with_odm_auto_categorize(tmp_path, monkeypatch):
    """fms-hf-tuning's tests/artifacts/predefined_data_configs/single_dataset_with_odm.yaml,
    as written (FILE_PATH filled in): read as one dataset to cluster into 3 categories with
    the validation_loss reward; with HF_HUB_OFFLINE and the default embedding model
    (Qwen/Qwen3-Embedding-0.6B) not in the cache, refused in one line before anything loads."""
    from fmtune_data_handlers.handlers import collect
    from fmtune_data_handlers.processing import read_data_config

    sampled_datasets(tmp_path, 1)
    cfg = write_config(tmp_path, f"""
        dataprocessor:
            type: odm
            sampling_stopping_strategy: first_exhausted # ignored
            seed: 66
            odm:
              update_interval: 1              # update every step
              sampling_interval: 1            # sample category for every sample
              reward_type: validation_loss    # uses eval loss of each dataset as reward
              gamma: 0.1                      # MAB hyper-parameter
              eta: 0.2                        # MAB hyper-parameter
              auto_categorize_input_column: "input"   # Required: Input field on which we need to apply clustering for forming pseudo categories
              auto_categorize_num_categories: "3"   # Optional: Number of categories for clustering
                                                    # if not provided, this will be inferred based on dataset size
        datasets:
          - name: dataset_1
            split:
              train: 0.8
              validation: 0.2 # validation set is also used in ODM reward computation when reward_type is validation_loss.
            data_paths:
              - "{tmp_path / 'd1.jsonl'}"
            data_handlers:
              - name: tokenize_and_apply_input_masking
                arguments:
                  remove_columns: all
                  batched: false
                  fn_kwargs:
                    input_column_name: input
                    output_column_name: output
    """)
    config, pm = configure(tmp_path, "--data_config_path", cfg, "--max_steps", "4")
    odm = read_data_config(cfg, collect(pm, config)).odm
    assert (odm["reward_type"], odm["auto_categorize_num_categories"],
            odm["auto_categorize_input_column"]) == ("validation_loss", 3, "input")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused(tmp_path, cfg, "dataprocessor.odm.auto_categorize_input_column: embedding model "
            "Qwen/Qwen3-Embedding-0.6B is not a local folder and not in the Hugging Face cache, "
            "and HF_HUB_OFFLINE is set", "--max_steps", "4")
