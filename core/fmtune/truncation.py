"""Cut texts to what ``max_seq_length`` tokens can reach, before tokenizing them.

A 50 MB record trained at ``max_seq_length 128`` used to be tokenized whole (minutes, GBs) and
then truncated. No token of a Hugging Face tokenizer covers more characters than its longest
vocabulary string (byte-level vocabularies spell every byte as one character, SentencePiece
spells a space as one ``▁``), so ``n`` tokens never cover more than ``n * longest`` characters.
``char_budget`` keeps twice the needed tokens' worth of characters: the cut changes at most the
tokens around the cut point, which lie far past ``max_seq_length``, and the cut text still
tokenizes to more than ``max_seq_length`` tokens, so the record is counted as truncated exactly
as before. Public for plugins (``from fmtune.truncation import char_budget, cut``).
"""

from __future__ import annotations

_LONGEST: dict[int, tuple[object, int]] = {}


def longest_token_chars(tokenizer) -> int:
    """The most characters one token of ``tokenizer`` can stand for (vocabulary and added
    tokens); cached per tokenizer object."""
    key = id(tokenizer)
    hit = _LONGEST.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    vocab = tokenizer.get_vocab()
    longest = max((len(t) for t in vocab), default=1)
    added = getattr(tokenizer, "added_tokens_encoder", None) or {}
    longest = max([longest, *(len(t) for t in added)])
    _LONGEST[key] = (tokenizer, max(1, longest))
    return _LONGEST[key][1]


def char_budget(tokenizer, max_tokens: int | None) -> int | None:
    """Characters worth keeping of a text that will be cut to ``max_tokens`` tokens (None: no
    limit)."""
    if not max_tokens or max_tokens <= 0:
        return None
    return 2 * (max_tokens + 8) * longest_token_chars(tokenizer)


def cut(text: str, budget: int | None) -> str:
    """``text`` cut to ``budget`` characters (unchanged when shorter or when no budget)."""
    if budget is None or len(text) <= budget:
        return text
    return text[:budget]
