"""Fixtures: a chat-capable tokenizer built in the tests, and data file writers."""

from __future__ import annotations

import pytest

from fmtune.testing import DEMO_TEXTS, build_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


@pytest.fixture(scope="session")
def chat_tok():
    tok = build_tokenizer(DEMO_TEXTS + ["system user assistant end of turn, be brief please"])
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory, chat_tok):
    """A tiny model folder whose tokenizer has the chat template and special tokens."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fmtune.testing import TINY_LLAMA

    folder = tmp_path_factory.mktemp("chat-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, vocab_size=len(chat_tok), bos_token_id=None,
                                 eos_token_id=chat_tok.eos_token_id,
                                 pad_token_id=chat_tok.pad_token_id)).save_pretrained(folder)
    chat_tok.save_pretrained(folder)
    return str(folder)
