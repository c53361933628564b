"""A sentencepiece-style Llama tokenizer folder (``LlamaTokenizerFast``, tokenizer.json with
byte fallback) loads without importing torch, as the same class AutoTokenizer gives, and
``fmtune preprocess`` writes the same ids and labels on every record as with AutoTokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fmtune import hub
from fmtune.testing import build_llama_tokenizer, run_cli, write_jsonl


TEXTS = ["the quick brown fox", "hello  there, wörld ☃ 東京", " leading space", "a\nb\tc",
         "what is two plus four?", "Zürich café naïve don't e-mail (x)", ""]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp-llama")
    build_llama_tokenizer(out, TEXTS[:5] * 4, vocab_size=350)
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return out


def test_loads_without_torch_like_autotokenizer(folder):
    from transformers import AutoTokenizer

    assert hub.llama_fast_tokenizer(str(folder))
    code = ("import sys, json; from fmtune.hub import load_tokenizer\n"
            f"tok = load_tokenizer({str(folder)!r})\n"
            f"print(json.dumps([type(tok).__name__, 'torch' in sys.modules, "
            f"[tok(t)['input_ids'] for t in {TEXTS!r}], "
            f"[tok(t, add_special_tokens=False)['input_ids'] for t in {TEXTS!r}], "
            "tok.eos_token, tok.bos_token, tok.unk_token, len(tok), tok.decode([5, 6, 7])]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    name, torch_loaded, ids, plain, eos, bos, unk, size, decoded = json.loads(
        out.stdout.splitlines()[-1])
    assert torch_loaded is False
    auto = AutoTokenizer.from_pretrained(str(folder))
    assert name == type(auto).__name__ == "LlamaTokenizer"
    assert ids == [auto(t)["input_ids"] for t in TEXTS]
    assert plain == [auto(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert [eos, bos, unk, size, decoded] == [auto.eos_token, auto.bos_token, auto.unk_token,
                                              len(auto), auto.decode([5, 6, 7])]
    assert any(t.startswith("<0x") for t in auto.convert_ids_to_tokens(auto("€")["input_ids"]))  # byte fallback


def test_other_llama_declarations_keep_autotokenizer(folder, tmp_path):
    import shutil

    def variant(**changes):
        out = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
        shutil.copytree(folder, out)
        for name, values in changes.items():
            data = json.loads((out / name).read_text())
            data.update(values)
            (out / name).write_text(json.dumps(data))
        return str(out)

    assert not hub.llama_fast_tokenizer(variant(**{"config.json": {"model_type": "qwen2"}}))
    assert not hub.llama_fast_tokenizer(variant(**{"tokenizer_config.json": {
        "auto_map": {"AutoTokenizer": ["x.Tok", None]}}}))
    byte_level = variant()
    data = json.loads(Path(byte_level, "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                             "use_regex": True}
    Path(byte_level, "tokenizer.json").write_text(json.dumps(data))
    assert not hub.llama_fast_tokenizer(byte_level)  # AutoTokenizer gives TokenizersBackend


def test_preprocess_ids_and_labels_equal_autotokenizers(folder, tmp_path):
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from fmtune_data_handlers.handlers import tokenize_and_apply_input_masking

    recs = [{"input": TEXTS[i % 6], "output": TEXTS[(i + 1) % 6] or "x"} for i in range(60)]
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    res = run_cli(["preprocess", "--model_name_or_path", str(folder), "--training_data_path",
                   data, "--output_dir", str(tmp_path / "out"), "--max_seq_length", "64"])
    assert res.exit_code == 0, res.stderr[-2000:]
    rows = [r for f in sorted((tmp_path / "out" / "train_dataset").glob("*.parquet"))
            for r in pq.read_table(f).to_pylist()]
    auto = AutoTokenizer.from_pretrained(str(folder))
    want = tokenize_and_apply_input_masking({"input": [r["input"] for r in recs],
                                             "output": [r["output"] for r in recs]}, auto, 64)
    assert [r["input_ids"] for r in rows] == [list(x) for x in want["input_ids"]]
    assert [r["labels"] for r in rows] == [list(x) for x in want["labels"]]
    assert all(r["input_ids"][0] == auto.bos_token_id and r["input_ids"][-1] == auto.eos_token_id
               for r in rows)
