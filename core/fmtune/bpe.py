"""Train a small byte-level BPE tokenizer with the ``tokenizers`` library.

Used when ``tokenizer_train_files`` is set (the quickstart builds its tokenizer
this way, so it needs no download). Deterministic for the same files.
"""

from __future__ import annotations

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_bpe_tokenizer(files: list[str], vocab_size: int = 512):
    """Return a ``PreTrainedTokenizerFast`` (eos id 0, pad id 1) trained on ``files``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tok.train([str(f) for f in files], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
