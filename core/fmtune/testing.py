"""Helpers for testing fmtune and fmtune plugins without any download (public API for
plugins: documented in docs/plugins.md, "Utilities for plugins").

``build_tiny_model(folder, texts)`` trains a byte-level BPE tokenizer on
``texts`` and saves it with a random-init tiny Llama, loadable with
``from_pretrained``. ``run_cli(argv, plugins=[...])`` runs the CLI in-process
with extra plugin objects registered. The pytest plugin
(:mod:`fmtune.pytest_plugin`) wraps these as fixtures.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .hookspecs import hookimpl

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False)


# The texts the fmtune_tiny_model tokenizer is trained on (its vocabulary), for tests.
DEMO_TEXTS = [
    "translate: the red cat sees a dog = le chat rouge voit un chien",
    "question: what is two plus two? answer: four",
    "The quick brown fox jumps over the lazy dog.",
    "<|user|> hello there <|assistant|> hi, how can I help?",
    "input output label yes no true false positive negative",
] * 4

# Eight input/output records in the fmtune_tiny_model tokenizer's vocabulary, for tests.
DEMO_RECORDS = [
    {"input": "translate: the red cat sees a dog =", "output": "le chat rouge voit un chien"},
    {"input": "question: what is two plus two? answer:", "output": "four"},
    {"input": "The quick brown fox", "output": "jumps over the lazy dog."},
    {"input": "input output label", "output": "yes no true false"},
    {"input": "translate: a dog sees the cat =", "output": "un chien voit le chat"},
    {"input": "hello there", "output": "hi, how can I help?"},
    {"input": "positive negative", "output": "true false"},
    {"input": "what is two plus two?", "output": "four"},
]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer (eos ``<|endoftext|>`` id 0, pad ``<|pad|>`` id 1)."""
    from .bpe import train_bpe_tokenizer

    with tempfile.TemporaryDirectory() as d:
        corpus = os.path.join(d, "corpus.txt")
        Path(corpus).write_text("\n".join(texts), encoding="utf-8")
        return train_bpe_tokenizer([corpus], vocab_size)


def build_tiny_model(folder: str | os.PathLike, texts: Iterable[str], seed: int = 0,
                     vocab_size: int = 400, **config_overrides: Any) -> str:
    """Save a tokenizer trained on ``texts`` and a random-init tiny Llama to ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(texts, vocab_size)
    cfg = LlamaConfig(**{**TINY_LLAMA, **config_overrides}, vocab_size=len(tok),
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> str:
    """``records`` as a JSONL file at ``path``; returns the path."""
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return str(path)


def logged_series(output_dir: str | os.PathLike, name: str,
                  fields: tuple[str, ...] = ("step", "value")) -> tuple[list, ...]:
    """One series a run wrote to ``training_logs.jsonl`` (``name`` e.g. ``training_loss``,
    ``validation_loss``): a list per field, in the file's order, e.g. ``(steps, values)``;
    ``fields=("step", "value", "epoch")`` adds the epochs. What a tracker's own store must
    equal."""
    with open(os.path.join(output_dir, "training_logs.jsonl"), encoding="utf-8") as f:
        rows = [row["data"] for row in map(json.loads, f) if row["name"] == name]
    return tuple([r[field] for r in rows] for field in fields)


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def check_generated(path: str | os.PathLike, text: str, label: str | None = None) -> None:
    """A file generated from the code (docs tables, catalogs) must equal ``text``; with
    ``FMTUNE_WRITE_DOCS=1`` it is rewritten first. Fails with the diff (for doc-drift tests)."""
    import difflib

    path = Path(path)
    if os.environ.get("FMTUNE_WRITE_DOCS") == "1":
        path.write_text(text, encoding="utf-8")
    current = path.read_text(encoding="utf-8") if path.is_file() else ""
    diff = "".join(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                        str(label or path.name), "generated"))
    assert not diff, (f"{label or path} drifted from the code (regenerate with "
                      f"FMTUNE_WRITE_DOCS=1):\n{diff[:3000]}")


def run_cli(argv: list[str], plugins: Iterable[Any] = ()) -> CliResult:
    """Run ``fmtune ARGV`` in this process, with ``plugins`` registered; capture output."""
    from .cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv), extra_plugins=list(plugins))
        except SystemExit as e:  # argparse errors
            code = e.code if isinstance(e.code, int) else 1
    return CliResult(code, out.getvalue(), err.getvalue())


def generate(model: Any, tokenizer: Any, texts: list[str], max_new_tokens: int = 64,
             add_special_tokens: bool = True) -> list[str]:
    """Greedy continuation of each text by ``model`` (the new text only), as ``fmtune
    generate`` prints it: to compare a trained model with what the CLI generates."""
    from .inference import generate as greedy

    return greedy(model, tokenizer, texts, max_new_tokens, add_special_tokens)


def load_for_inference(path: str, trust_remote_code: bool = False,
                       base_model_name_or_path: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a trained folder (full model or adapter over its base), as
    ``fmtune generate --model`` / ``fmtune evaluate --model`` load it."""
    from .inference import load_for_inference as load

    return load(path, trust_remote_code, base_model_name_or_path)


def exact_match(model: Any, tokenizer: Any, records: list[dict],
                max_new_tokens: int = 64) -> tuple[float, list[str]]:
    """``(accuracy, predictions)``: the fraction of ``{"input", "output"}`` records whose
    greedy output equals ``output``, as ``fmtune evaluate`` reports it."""
    from .inference import exact_match as score

    return score(model, tokenizer, records, max_new_tokens)


class RunRecorder:
    """An in-test plugin: keeps the trained model (``model``), the logged losses (``losses``)
    and, after :func:`train`, the CLI result (``result``) of a run."""

    def __init__(self) -> None:
        self.model = None
        self.losses: list[float] = []
        self.result: CliResult | None = None

    @hookimpl
    def on_log(self, run, logs):
        if "loss" in logs:
            self.losses.append(float(logs["loss"]))

    @hookimpl
    def on_train_end(self, run):
        self.model = run.model


def train(argv: list[str], plugins: Iterable[Any] = ()) -> RunRecorder:
    """Run ``fmtune train ...`` (``argv`` starts with "train") in this process with a
    :class:`RunRecorder` and ``plugins``; a non-zero exit raises AssertionError with stderr."""
    rec = RunRecorder()
    res = run_cli(argv, plugins=[rec, *plugins])
    if res.exit_code != 0:
        raise AssertionError(f"fmtune exited {res.exit_code}:\n{res.stderr[-3000:]}")
    rec.result = res
    return rec


def torchrun(script: str | os.PathLike, *args: str, cwd: str | os.PathLike,
             nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node NPROC SCRIPT ARGS`` in
    ``cwd`` (a driver script that calls ``fmtune.cli.main`` with in-test plugins, say), without
    the launcher variables of an enclosing run; a non-zero exit raises AssertionError with the
    end of stderr."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_RANK", "RANK")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", str(nproc), str(script), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"torchrun exited {proc.returncode}:\n{proc.stderr[-5000:]}")
    return proc


def wrapped_model(model_dir: str, output_dir: str | os.PathLike, *extra: str):
    """load_tokenizer -> load_model -> wrap_peft through the plugins that ``extra`` (train
    flags, e.g. ``--plugins lora``) activates, as a run does, without reading data."""
    from .cli import load_config
    from .pipeline import validate

    with tempfile.TemporaryDirectory(prefix="fmtune-wrapped-") as tmp:
        # validation checks that the data path exists; nothing here reads it
        data = write_jsonl(os.path.join(tmp, "x.jsonl"), DEMO_RECORDS[:1])
        config, pm, _, _ = load_config(["--model_name_or_path", str(model_dir),
                                        "--training_data_path", data,
                                        "--output_dir", str(output_dir), *extra])
        validate(config, pm)
    tok = pm.hook.load_tokenizer(config=config)
    model = pm.hook.load_model(config=config, tokenizer=tok)
    return pm.hook.wrap_peft(model=model, config=config, tokenizer=tok)


def train_argv(model: str, data: str, out: str | os.PathLike, *extra: str) -> list[str]:
    """``fmtune train`` arguments for short in-test runs: batch 4, learning rate 1e-2, a loss
    logged every step, no checkpoints, seed 0, then ``extra``."""
    return ["train", "--model_name_or_path", str(model), "--training_data_path", str(data),
            "--output_dir", str(out), "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-2", "--logging_steps", "1", "--save_strategy", "no",
            "--seed", "0", *extra]


class AtStep:
    """An in-test plugin: at the end of step ``step`` (before it is logged), once
    ``ready(run)`` returned true (e.g. a tracker's guard drained), runs ``action()``: a fault
    injected mid-run (a tracker's store deleted, its server stopped)."""

    def __init__(self, step: int, action, ready=lambda run: True) -> None:
        self.step, self.action, self.ready = step, action, ready

    @hookimpl
    def on_step(self, run):
        if run.state.global_step == self.step:
            assert self.ready(run), "not ready before the fault"
            self.action()


def writes_despite_read_only(folder: str | os.PathLike) -> bool:
    """Whether this process writes into read-only folders anyway (root with CAP_DAC_OVERRIDE;
    ``setpriv --bounding-set -dac_override`` runs tests as a root that cannot)."""
    probe = Path(folder) / "read-only-probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        (probe / "x").touch()
        return True
    except PermissionError:
        return False
    finally:
        probe.chmod(0o755)


class NotRankZero:
    """An in-test plugin: this process looks like rank 1 of a multi-process run to the hooks
    that run after the trainer is built (``run.is_main_process`` is False)."""

    @hookimpl(wrapper=True)
    def build_trainer(self):
        trainer = yield
        trainer.is_world_process_zero = lambda: False
        return trainer


def doc_blocks(path: str | os.PathLike, section: str, lang: str) -> list[str]:
    """The ```LANG code blocks of a Markdown file's SECTION (a heading line such as
    ``## Writing a tracker``, up to the next heading of that level): a test runs a doc's code
    so the doc cannot drift from what works."""
    import re

    text = Path(path).read_text(encoding="utf-8")
    assert section in text, f"{path}: no {section!r} section"
    level = section.split(" ", 1)[0]
    body = text.split(section, 1)[1].split(f"\n{level} ", 1)[0]
    return re.findall(rf"```{re.escape(lang)}\n(.*?)```", body, re.S)


def doc_module(path: str | os.PathLike, section: str, name: str):
    """The one ```python block of a doc's SECTION, run as module ``name`` (a plugin module
    written in the docs, usable as an in-test plugin object)."""
    import types

    (code,) = doc_blocks(path, section, "python")
    module = types.ModuleType(name)
    exec(compile(code, f"{path}: {name}", "exec"), module.__dict__)  # the doc's own code
    return module


def build_llama_tokenizer(folder: str | os.PathLike, texts: Iterable[str],
                          vocab_size: int = 600) -> str:
    """A sentencepiece-style (Llama 2) tokenizer trained on ``texts`` with the ``tokenizers``
    library and saved to ``folder`` (returned): BPE over ``▁``-joined words with byte fallback
    (``<0x00>``..``<0xFF>``), ``<unk>`` 0, ``<s>`` 1 (BOS, added in front of every text),
    ``</s>`` 2 (EOS), as ``tokenizer.json`` and a ``tokenizer_config.json`` declaring
    ``LlamaTokenizerFast``, as Llama 2 / TinyLlama tokenizers on the hub are. No download."""
    import json

    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                            pre_tokenizers, processors, trainers)

    texts = list(texts)
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
    learner.pre_tokenizer = pre_tokenizers.Split(Regex("▁[^▁]*|[^▁]+"), "isolated")
    learner.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    # Llama 2's tokenizer.json: no pre-tokenizer, a normalizer that prepends and replaces
    # spaces with ▁, and a decoder undoing it
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>",
                   "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
                   "add_bos_token": True, "add_eos_token": False, "legacy": False,
                   "clean_up_tokenization_spaces": False, "model_max_length": 2048}, f, indent=1)
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)
    return str(folder)
