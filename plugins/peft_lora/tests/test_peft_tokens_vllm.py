"""Tokens added in training (tied and untied embeddings), and adapters for vLLM."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from fmtune.testing import load_for_inference, run_cli

TEXTS = ["translate: the red cat sees a dog = <|tool|>", "<|result|> four <|tool|>"]


def logits(model, tok, texts=TEXTS):
    model.eval()
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def vllm_key_ok(key: str) -> bool:
    """vLLM's parse_fine_tuned_lora_name accepts exactly these tensor names."""
    parts = key.split(".")
    return (parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B")) or \
        parts[-1] in ("lora_embedding_A", "lora_embedding_B")


@pytest.fixture(scope="module", params=["tied", "untied"])
def token_run(request, tied_model, fmtune_tiny_model, tool_data, tmp_path_factory, peft_helpers):
    base = tied_model if request.param == "tied" else fmtune_tiny_model
    out = tmp_path_factory.mktemp(f"tokens-{request.param}") / "out"
    extra = ["--lora_post_process_for_vllm", "true"] if request.param == "untied" else []
    rec = peft_helpers.train(peft_helpers.train_args(
        base, tool_data, out, "--plugins", "lora", "--target_modules", "all-linear",
        "--max_steps", "6", *extra), plugins=[peft_helpers.AddTokens()])
    return request.param, base, out, rec


def test_new_token_rows_train_and_nothing_else_in_the_embeddings(token_run):
    kind, base, out, rec = token_run
    tok = AutoTokenizer.from_pretrained(out)
    vocab = AutoConfig.from_pretrained(base).vocab_size
    new_ids = tok.convert_tokens_to_ids(["<|tool|>", "<|result|>"])
    assert new_ids == [vocab, vocab + 1] and len(tok) == vocab + 2
    base_model = AutoModelForCausalLM.from_pretrained(base)
    emb = rec.model.get_input_embeddings()
    rows = emb(torch.arange(vocab + 2)).detach()
    assert torch.equal(rows[:vocab], base_model.get_input_embeddings().weight)  # old rows untouched
    adapter = rec.model.base_model.model.model.embed_tokens.token_adapter
    assert adapter.token_indices["default"] == new_ids
    delta = adapter.trainable_tokens_delta["default"]
    assert not torch.allclose(delta, adapter.trainable_tokens_original["default"])  # trained
    assert torch.equal(rows[vocab:], delta)
    cfg = json.loads((out / "adapter_config.json").read_text())
    expected = {"embed_tokens": new_ids} if kind == "tied" else \
        {"embed_tokens": new_ids, "lm_head": new_ids}
    assert cfg["trainable_token_indices"] == expected and cfg["modules_to_save"] is None


def test_saved_adapter_with_new_tokens_reloads_and_merges(token_run, tmp_path):
    kind, base, out, rec = token_run
    # fmtune generate/evaluate's loader: peft's AutoPeftModelForCausalLM resizes the base to the
    # adapter's tokenizer
    model, tok = load_for_inference(str(out))
    torch.testing.assert_close(logits(model, tok), logits(rec.model, tok), rtol=0, atol=1e-6)
    res = run_cli(["merge", str(out), str(tmp_path / "merged")])
    assert res.exit_code == 0, res.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged, tok), logits(rec.model, tok), rtol=0, atol=1e-5)
    emb, head = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == len(tok)
    if kind == "tied":  # tied weights stay tied: one tensor, new rows included
        assert merged.config.tie_word_embeddings and head.data_ptr() == emb.data_ptr()
    else:
        assert not merged.config.tie_word_embeddings and not torch.equal(head[-2:], emb[-2:])


def test_vllm_adapter_splits_out_new_token_embeddings(token_run, tmp_path):
    kind, base, out, rec = token_run
    if kind == "tied":
        res = run_cli(["export-vllm", str(out), str(tmp_path / "vllm")])
        assert res.exit_code == 0, res.stderr
        assert res.stdout.strip().endswith("28 LoRA tensors, 2 new-token embeddings")
        vdir = tmp_path / "vllm"
    else:
        vdir = out / "vllm"  # written by --lora_post_process_for_vllm at the end of training
    assert sorted(os.listdir(vdir)) == ["adapter_config.json", "adapter_model.safetensors",
                                        "new_embeddings.safetensors", "tokenizer.json",
                                        "tokenizer_config.json"]
    cfg = json.loads((vdir / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] is None and "trainable_token_indices" not in cfg
    weights = load_file(vdir / "adapter_model.safetensors")
    assert len(weights) == 28 and all(vllm_key_ok(k) for k in weights)
    new = load_file(vdir / "new_embeddings.safetensors")
    hidden = AutoConfig.from_pretrained(base).hidden_size
    assert set(new) == {"input_embeddings", "output_embeddings"}
    assert new["input_embeddings"].shape == new["output_embeddings"].shape == (2, hidden)
    # rebuild what vLLM serves: the base with the new rows appended, plus the LoRA matrices;
    # it computes exactly what the trained model computes
    model = AutoModelForCausalLM.from_pretrained(base)
    vocab = model.config.vocab_size
    model.resize_token_embeddings(vocab + 2)
    with torch.no_grad():
        model.get_input_embeddings().weight[vocab:] = new["input_embeddings"]
        model.get_output_embeddings().weight[vocab:] = new["output_embeddings"]
    if kind == "tied":
        assert torch.equal(new["input_embeddings"], new["output_embeddings"])
    served = PeftModel.from_pretrained(model, vdir)
    tok = AutoTokenizer.from_pretrained(vdir)
    torch.testing.assert_close(logits(served, tok), logits(rec.model, tok), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def refused_adapters(fmtune_tiny_model, data, tmp_path_factory, peft_helpers):
    """One-step adapters vLLM cannot serve, by reason."""
    root = tmp_path_factory.mktemp("refused")
    made = {}
    for name, extra in {"dora": ["--use_dora", "true"],
                        "modules_to_save": ["--modules_to_save", "lm_head"]}.items():
        peft_helpers.train(peft_helpers.train_args(fmtune_tiny_model, data, root / name,
                                                   "--plugins", "lora", "--max_steps", "1", *extra))
        made[name] = root / name
    return made


@pytest.mark.parametrize("name, reason", [
    ("dora", "vLLM does not implement DoRA (the magnitude vectors would be dropped); merge the "
             "adapter (fmtune merge) and serve the merged model"),
    ("modules_to_save", "modules_to_save lm_head: vLLM loads only LoRA matrices, not modules "
                        "trained in full"),
])
def test_export_vllm_refuses_with_the_reason(name, reason, refused_adapters, tmp_path):
    adapter = refused_adapters[name]
    res = run_cli(["export-vllm", str(adapter), str(tmp_path / "v")])
    assert res.exit_code == 2
    assert res.stderr.startswith(f"fmtune: error: {adapter}: vLLM cannot serve this adapter: "
                                 f"{reason}")
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "v").exists()


def test_vllm_post_processing_is_refused_before_training(fmtune_tiny_model, data, tmp_path,
                                                         peft_helpers):
    res = run_cli(peft_helpers.train_args(fmtune_tiny_model, data, tmp_path / "o", "--plugins",
                                          "lora", "--use_dora", "true",
                                          "--lora_post_process_for_vllm", "true"))
    assert res.exit_code == 2
    assert res.stderr.startswith("fmtune: error: invalid config: lora_post_process_for_vllm: vLLM "
                                 "does not implement DoRA")
    assert not (tmp_path / "o").exists()


def test_export_vllm_refuses_added_tokens_without_trained_rows(fmtune_tiny_model, tool_data,
                                                               tmp_path, peft_helpers):
    # LoRA on the (resized) embedding layer: the new tokens have no rows of their own to export
    out = tmp_path / "a"
    peft_helpers.train(peft_helpers.train_args(
        fmtune_tiny_model, tool_data, out, "--plugins", "lora", "--target_modules",
        "embed_tokens,q_proj", "--max_steps", "1"), plugins=[peft_helpers.AddTokens()])
    res = run_cli(["export-vllm", str(out), str(tmp_path / "v")])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines()[-1] == (
        f"fmtune: error: {out}: vLLM cannot serve this adapter: its embeddings were resized but "
        "no new-token rows were trained (trainable tokens), so vLLM would have no embeddings for "
        "the added tokens; merge the adapter instead")
