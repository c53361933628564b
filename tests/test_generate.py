"""`fmtune generate` on a full model folder and on a peft adapter folder."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from fmtune.testing import run_cli

PROMPT = "translate: the red cat"


def test_generate_full_model(fmtune_tiny_model):
    res = run_cli(["generate", "--model", fmtune_tiny_model, "--text", PROMPT,
                   "--max_new_tokens", "5"])
    assert res.exit_code == 0, res.stderr
    tok = AutoTokenizer.from_pretrained(fmtune_tiny_model)
    model = AutoModelForCausalLM.from_pretrained(fmtune_tiny_model).eval()
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    expected = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert res.stdout == expected + "\n"


def test_generate_adapter_folder(fmtune_tiny_model, tmp_path):
    tok = AutoTokenizer.from_pretrained(fmtune_tiny_model)
    base = AutoModelForCausalLM.from_pretrained(fmtune_tiny_model)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    peft_model.eval()
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = peft_model.generate(**enc, max_new_tokens=6, do_sample=False,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        with peft_model.disable_adapter():
            plain = peft_model.generate(**enc, max_new_tokens=6, do_sample=False,
                                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    expected = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert not torch.equal(out, plain)  # the adapter matters, so the test can tell
    res = run_cli(["generate", "--model", str(tmp_path / "adapter"), "--text", PROMPT,
                   "--max_new_tokens", "6"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout == expected + "\n"


def test_generate_errors(tmp_path):
    res = run_cli(["generate", "--model", str(tmp_path / "missing"), "--text", "x"])
    assert res.exit_code == 2 and "no such model folder" in res.stderr
    res = run_cli(["generate", "--model", str(tmp_path), "--text", "x"])
    assert res.exit_code == 2 and "neither a model folder" in res.stderr


# ------------------------------------------------ --text_file, --out_file, --chat

PROMPTS = ["translate: the red cat", "hello there", "question: what is two plus two?"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def greedy(folder, prompts, n, rendered=False):
    """What the model generates, computed here with transformers directly."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    outs = []
    for p in prompts:
        enc = tok(p, return_tensors="pt", add_special_tokens=not rendered)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=n, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        outs.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return outs


def test_text_file_formats_and_out_file(fmtune_tiny_model, tmp_path):
    import json

    expected = [{"input": p, "output": o} for p, o in zip(PROMPTS, greedy(fmtune_tiny_model, PROMPTS, 4))]
    files = {
        "prompts.txt": "\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n",  # blank line skipped
        "strings.json": json.dumps(PROMPTS),
        "objects.json": json.dumps([{"input": p, "output": "ignored"} for p in PROMPTS]),
        "lines.jsonl": "\n".join(json.dumps(x) for x in [PROMPTS[0], {"input": PROMPTS[1]},
                                                          PROMPTS[2]]),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        out = tmp_path / f"{name}.out.json"
        res = run_cli(["generate", "--model", fmtune_tiny_model, "--text_file", str(tmp_path / name),
                       "--out_file", str(out), "--max_new_tokens", "4"])
        assert res.exit_code == 0, res.stderr
        assert res.stdout == f"fmtune: wrote 3 outputs to {out}\n"
        assert json.loads(out.read_text(encoding="utf-8")) == expected, name
        assert not (tmp_path / f"{name}.out.json.tmp").exists()
    # without --out_file the outputs are printed, one per prompt
    res = run_cli(["generate", "--model", fmtune_tiny_model, "--text_file",
                   str(tmp_path / "strings.json"), "--max_new_tokens", "4"])
    assert res.stdout == "".join(e["output"] + "\n" for e in expected)


def test_chat_renders_a_user_message(fmtune_tiny_model, tmp_path):
    import json
    import shutil

    with_template = tmp_path / "chat-model"
    shutil.copytree(fmtune_tiny_model, with_template)
    tok = AutoTokenizer.from_pretrained(with_template)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(with_template)
    rendered = [f"<|user|> {p} <|assistant|>" for p in PROMPTS[:2]]
    assert rendered == [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                add_generation_prompt=True) for p in PROMPTS[:2]]
    expected = [{"input": p, "output": o}
                for p, o in zip(PROMPTS[:2], greedy(with_template, rendered, 5, rendered=True))]
    assert expected[0]["output"] != greedy(fmtune_tiny_model, PROMPTS[:1], 5)[0]  # chat matters
    out = tmp_path / "chat.json"
    res = run_cli(["generate", "--model", str(with_template), "--chat", "--text", PROMPTS[0],
                   "--text", PROMPTS[1], "--out_file", str(out), "--max_new_tokens", "5"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(out.read_text(encoding="utf-8")) == expected
    # the same template given on the command line (string or file) to a tokenizer without one
    (tmp_path / "t.jinja").write_text(TEMPLATE, encoding="utf-8")
    for template in (TEMPLATE, str(tmp_path / "t.jinja")):
        res = run_cli(["generate", "--model", fmtune_tiny_model, "--chat", "--chat_template",
                       template, "--text", PROMPTS[0], "--text", PROMPTS[1],
                       "--max_new_tokens", "5"])
        assert res.exit_code == 0, res.stderr
        assert res.stdout == "".join(e["output"] + "\n" for e in expected)


def test_text_file_and_chat_errors(fmtune_tiny_model, tmp_path):
    out = tmp_path / "out.json"

    def fails(*argv):
        res = run_cli(["generate", "--model", fmtune_tiny_model, *argv, "--out_file", str(out)])
        assert res.exit_code == 2
        errors = [line for line in res.stderr.splitlines() if line.startswith("fmtune: error:")]
        assert len(errors) == 1, res.stderr  # one line (after any model-loading progress bar)
        assert not out.exists()
        return errors[0]

    assert "has no chat template; pass --chat_template" in fails("--chat", "--text", "hi")
    (tmp_path / "bad.json").write_text('["a", {"text": "b"}]', encoding="utf-8")
    assert "bad.json: record 2: missing field 'input'" in fails("--text_file", str(tmp_path / "bad.json"))
    (tmp_path / "bad.jsonl").write_text('"a"\n{"input": 3}\n', encoding="utf-8")
    assert ("bad.jsonl:2: expected a string or an object with a string 'input', got int"
            in fails("--text_file", str(tmp_path / "bad.jsonl")))
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    assert "empty.txt: no prompts" in fails("--text_file", str(tmp_path / "empty.txt"))
    assert "missing.txt: text file not found" in fails("--text_file", str(tmp_path / "missing.txt"))
    res = run_cli(["generate", "--model", fmtune_tiny_model, "--text", "hi", "--out_file",
                   str(tmp_path / "no" / "such" / "dir.json")])
    assert res.exit_code == 2 and "its folder does not exist" in res.stderr


def test_jsonl_output_survives_any_text(fmtune_tiny_model, monkeypatch):
    """--jsonl: one record per prompt however the output looks (line breaks, the separators
    str.splitlines also splits on, NUL, non-ASCII), read back with splitlines + json."""
    import json

    import fmtune.inference as inference

    awkward = ["two\nlines\r\n", "group\x1dsep\x1cfile\x1erec", "nel\x85ls\u2028ps\u2029",
               "nul\x00tab\t", "é中🙂"]
    real = greedy(fmtune_tiny_model, PROMPTS[:1], 4)
    monkeypatch.setattr(inference, "generate", lambda model, tok, prompts, n, **kw:
                        [real[0], *awkward][:len(prompts)])
    argv = ["generate", "--model", fmtune_tiny_model, "--jsonl", "--max_new_tokens", "4"]
    for p in PROMPTS[:1] + ["p"] * len(awkward):
        argv += ["--text", p]
    res = run_cli(argv)
    assert res.exit_code == 0, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["output"] for r in records] == [real[0], *awkward]
    assert [r["input"] for r in records] == PROMPTS[:1] + ["p"] * len(awkward)
    assert res.stdout.isascii()


def test_base_model_name_or_path_replaces_the_adapters_base(fmtune_tiny_model, tmp_path):
    """fms-hf-tuning's inference flag: an adapter trained over a base at another path (another
    machine) runs over the base given here; its adapter_config.json is left as it was."""
    import json
    import shutil

    from peft import LoraConfig, get_peft_model

    moved_base = tmp_path / "elsewhere" / "base"
    shutil.copytree(fmtune_tiny_model, moved_base)
    tok = AutoTokenizer.from_pretrained(moved_base)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(moved_base), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    shutil.rmtree(tmp_path / "elsewhere")  # the recorded base path no longer exists
    cfg_file = tmp_path / "adapter" / "adapter_config.json"
    before = cfg_file.read_text()
    assert json.loads(before)["base_model_name_or_path"] == str(moved_base)
    peft_model.eval()
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = peft_model.generate(**enc, max_new_tokens=6, do_sample=False,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    expected = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    argv = ["generate", "--model", str(tmp_path / "adapter"), "--text", PROMPT,
            "--max_new_tokens", "6"]
    assert run_cli(argv).exit_code == 2  # the recorded base is gone
    res = run_cli([*argv, "--base_model_name_or_path", fmtune_tiny_model])
    assert res.exit_code == 0, res.stderr
    assert res.stdout == expected + "\n"
    assert cfg_file.read_text() == before
    res = run_cli(["generate", "--model", fmtune_tiny_model, "--text", PROMPT,
                   "--base_model_name_or_path", fmtune_tiny_model])
    assert res.exit_code == 2 and "is not an adapter folder" in res.stderr


def test_an_image_without_a_plugin_that_reads_images_is_one_line(fmtune_tiny_model, tmp_path,
                                                                  monkeypatch):
    """`--image` goes to the plugin declaring it in the `fmtune.generate` entry-point group;
    with none installed, one line naming the distribution from the plugin catalog."""
    from importlib import metadata

    real = metadata.entry_points
    monkeypatch.setattr(metadata, "entry_points", lambda **kw: [] if kw.get(
        "group") == "fmtune.generate" else real(**kw))
    res = run_cli(["generate", "--model", fmtune_tiny_model, "--image", str(tmp_path / "a.png"),
                   "--text", "what colour?"])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [
        "fmtune: error: generate: --image needs a plugin that generates from images, and none "
        "is installed (pip install fmtune-vision)"]
    plain = run_cli(["generate", "--model", fmtune_tiny_model, "--text", "hello",
                     "--max_new_tokens", "2"])
    assert plain.exit_code == 0, plain.stderr
