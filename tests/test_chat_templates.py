"""``--chat_template`` takes a built-in name, a file or the text (fmtune.chat_templates), in
``train`` and ``generate``; the template a run trains with is saved with every tokenizer it
writes (final folder, checkpoints, save_model_dir) and carried by ``merge`` and
``export-vllm``, so ``generate --chat`` needs no ``--chat_template`` on any of them."""

from __future__ import annotations

import json
import os

import pytest

from fmtune import chat_templates
from fmtune.chat_templates import resolve
from fmtune.config import ConfigError
from fmtune.testing import build_tokenizer, run_cli, write_jsonl

CONV = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"}]
SYSTEM = [{"role": "system", "content": "Be brief."}]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(["hello world"])  # eos <|endoftext|>, no bos, no chat template


def render(tok, name, conv, gen=True, **special):
    return tok.apply_chat_template(conv, chat_template=resolve(name), tokenize=False,
                                   add_generation_prompt=gen, **special)


def error(value, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        resolve(value, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------- resolve()


def test_names_and_spellings():
    assert chat_templates.names() == ["chatml", "llama3", "granite", "gemma", "mistral"]
    for name in chat_templates.names():
        assert resolve(name) == chat_templates.BUILTIN[name]
        assert chat_templates.name_of(resolve(name)) == name
    assert resolve("Chat-ML") == resolve(" chat_ml ") == chat_templates.CHATML
    assert resolve("Llama-3") == chat_templates.LLAMA3
    assert resolve(None) is None


def test_text_is_taken_as_is():
    text = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve(text) == text


def test_files(tmp_path, tok, monkeypatch):
    text = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (tmp_path / "t.jinja").write_text(text, encoding="utf-8")
    assert resolve(str(tmp_path / "t.jinja")) == text
    # relative: from the working folder, else from ``base`` (a config file's folder)
    monkeypatch.chdir(tmp_path)
    assert resolve("t.jinja") == text
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert resolve("t.jinja", base=str(tmp_path)) == text
    # a tokenizer_config.json: its chat_template, a string or HF's named list ("default")
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"eos_token": "x", "chat_template": text}))
    assert resolve(str(cfg)) == text
    cfg.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "{{ 1 }}"},
                                                 {"name": "default", "template": text}]}))
    assert resolve(str(cfg)) == text
    # a tokenizer folder (transformers 5 writes chat_template.jinja)
    tok2 = build_tokenizer(["hello world"])
    tok2.chat_template = text
    tok2.save_pretrained(tmp_path / "tokdir")
    assert resolve(str(tmp_path / "tokdir")) == text
    # a name wins over a file of that name; ./name is the file
    (tmp_path / "sub" / "chatml").write_text(text)
    assert resolve("chatml") == chat_templates.CHATML
    assert resolve("./chatml") == text


def test_errors_are_one_line(tmp_path):
    assert error("templates/missing.jinja") == \
        "chat_template: templates/missing.jinja: file not found"
    assert error("missing.j2", what="--chat_template") == \
        "--chat_template: missing.j2: file not found"
    assert error("chatm1") == ("chat_template: 'chatm1' is not a built-in chat template (chatml, "
                               "llama3, granite, gemma, mistral), a file, or Jinja template text "
                               "(did you mean 'chatml'?)")
    assert error("{% for m in messages %}{{ m }}").startswith(
        "chat_template: invalid Jinja (line 1): Unexpected end of template.")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ messages }}\n{% if %}")
    assert error(str(bad)).startswith(f"chat_template: {bad}: invalid Jinja (line 2): ")
    (tmp_path / "latin1.jinja").write_bytes(b"{{ caf\xe9 }}")
    assert error(str(tmp_path / "latin1.jinja")) == \
        f"chat_template: {tmp_path / 'latin1.jinja'}: not UTF-8 text (byte offset 6)"
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert error(str(empty)) == f"chat_template: {empty}: empty file"
    (tmp_path / "c.json").write_text('{"eos_token": "x"}')
    assert error(str(tmp_path / "c.json")) == \
        f"chat_template: {tmp_path / 'c.json'}: no \"chat_template\" string in this JSON file"
    (tmp_path / "folder").mkdir()
    assert "a folder with no chat template" in error(str(tmp_path / "folder"))
    assert error("  ") == "chat_template: empty"


# ------------------------------------------------------ the built-ins' formats


def test_chatml(tok):
    assert render(tok, "chatml", CONV) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    assert render(tok, "chatml", SYSTEM + CONV[:1], gen=False) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_llama3(tok):
    assert render(tok, "llama3", SYSTEM + CONV, bos_token="<|begin_of_text|>") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render(tok, "llama3", CONV[:1]).startswith("<|start_header_id|>")  # no bos: none


def test_granite(tok):
    assert render(tok, "granite", SYSTEM + CONV) == (
        "<|start_of_role|>system<|end_of_role|>Be brief.<|end_of_text|>\n"
        "<|start_of_role|>user<|end_of_role|>Hi<|end_of_text|>\n"
        "<|start_of_role|>assistant<|end_of_role|>Hello!<|end_of_text|>\n"
        "<|start_of_role|>user<|end_of_role|>Bye<|end_of_text|>\n"
        "<|start_of_role|>assistant<|end_of_role|>")


def test_gemma(tok):
    assert render(tok, "gemma", CONV, bos_token="<bos>") == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    # no system role: the system text opens the first user turn
    assert render(tok, "gemma", SYSTEM + CONV[:1], gen=False, bos_token="<bos>") == \
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"


def test_mistral(tok):
    assert render(tok, "mistral", CONV, bos_token="<s>", eos_token="</s>") == \
        "<s>[INST] Hi [/INST]Hello!</s>[INST] Bye [/INST]"
    assert render(tok, "mistral", SYSTEM + CONV[:1], bos_token="<s>") == \
        "<s>[INST] Be brief.\n\nHi [/INST]"


@pytest.mark.parametrize("name", chat_templates.names())
def test_builtins_render_turn_by_turn(tok, name):
    """Each prefix of a conversation renders as the start of the longer one (the masking
    handler trains each assistant turn as the difference)."""
    conv = SYSTEM + CONV + [{"role": "assistant", "content": "Bye."}]
    done = ""
    for i in range(1, len(conv) + 1):
        full = render(tok, name, conv[:i], gen=False, bos_token="<s>", eos_token="</s>")
        assert full.startswith(done), (name, i)
        if i < len(conv) and conv[i]["role"] == "assistant":
            prompt = render(tok, name, conv[:i], bos_token="<s>", eos_token="</s>")
            assert prompt.startswith(full)
            assert render(tok, name, conv[:i + 1], gen=False, bos_token="<s>",
                          eos_token="</s>").startswith(prompt)
        done = full


# ------------------------------------------------------ the commands


def test_generate_refuses_a_bad_template_before_loading(tmp_path):
    res = run_cli(["generate", "--model", str(tmp_path / "no-model"), "--text", "hi", "--chat",
                   "--chat_template", "chatm1"])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines()[-1].endswith("(did you mean 'chatml'?)")
    assert "--chat_template: 'chatm1' is not a built-in chat template" in res.stderr


def test_train_refuses_a_missing_template_file_at_config_time(tmp_path, fmtune_tiny_model):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONV}])
    res = run_cli(["train", "--model_name_or_path", fmtune_tiny_model, "--training_data_path",
                   data, "--output_dir", str(tmp_path / "o"), "--chat_template",
                   "templates/chat.jinja"])
    assert res.exit_code == 2
    assert "chat_template: templates/chat.jinja: file not found" in res.stderr
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


CHAT = [{"messages": [{"role": "user", "content": "what is two plus two?"},
                      {"role": "assistant", "content": "four"}]},
        {"messages": [{"role": "user", "content": "hello there"},
                      {"role": "assistant", "content": "hi, how can I help?"}]},
        {"messages": [{"role": "user", "content": "The quick brown fox"},
                      {"role": "assistant", "content": "jumps over the lazy dog."}]},
        {"messages": [{"role": "user", "content": "translate: the red cat sees a dog ="},
                      {"role": "assistant", "content": "le chat rouge voit un chien"}]}]
PROMPT = "what is two plus two?"


def generate_chat(folder, monkeypatch) -> list[str]:
    """``fmtune generate --chat`` on ``folder``; returns the prompts it rendered."""
    import fmtune.inference as inference

    seen, real = [], inference.generate

    def spy(model, tokenizer, texts, *a, **kw):
        seen.extend(texts)
        return real(model, tokenizer, texts, *a, **kw)

    monkeypatch.setattr(inference, "generate", spy)
    res = run_cli(["generate", "--model", str(folder), "--text", PROMPT, "--chat",
                   "--max_new_tokens", "3"])
    assert res.exit_code == 0, res.stderr
    return seen


def test_trained_template_reaches_every_saved_tokenizer(tmp_path, fmtune_tiny_model, monkeypatch):
    from transformers import AutoTokenizer

    chatml = chat_templates.CHATML
    want = [f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"]
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    out, final = tmp_path / "run", tmp_path / "final"
    res = run_cli(["train", "--model_name_or_path", fmtune_tiny_model, "--training_data_path",
                   data, "--output_dir", str(out), "--save_model_dir", str(final),
                   "--peft_method", "lora", "--chat_template", "chatml", "--max_steps", "2",
                   "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
                   "--save_strategy", "steps", "--save_steps", "1", "--seed", "0"])
    assert res.exit_code == 0, res.stderr
    assert "4 ok" in res.stderr  # every example trained (a name is not template text)
    assert not AutoTokenizer.from_pretrained(fmtune_tiny_model).chat_template  # base unchanged
    for folder in (final, out / "checkpoint-1", out / "checkpoint-2"):
        assert AutoTokenizer.from_pretrained(folder).chat_template == chatml, folder
    assert generate_chat(final, monkeypatch) == want
    merged = tmp_path / "merged"
    res = run_cli(["merge", str(final), str(merged)])
    assert res.exit_code == 0, res.stderr
    assert AutoTokenizer.from_pretrained(merged).chat_template == chatml
    assert generate_chat(merged, monkeypatch)[-1] == want[0]
    vllm = tmp_path / "vllm"
    res = run_cli(["export-vllm", str(final), str(vllm)])
    assert res.exit_code == 0, res.stderr
    assert AutoTokenizer.from_pretrained(vllm).chat_template == chatml
