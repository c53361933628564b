"""Online data mixing's auto-categorization (fms-hf-tuning's ``dataprocessor.odm.
auto_categorize_*``, fms-acceleration's ``DatasetAutoCategorizer``): one dataset is split into
pseudo categories, the arms of the mixer, by clustering sentence embeddings of its examples.

As fms-acceleration does it:

* the text of an example is its tokenized ``input_ids`` decoded back (special tokens kept; the
  handlers have removed the raw columns by then, and fms-hf-tuning passes ``input_ids`` as the
  column whatever ``auto_categorize_input_column`` names), prefixed with the clustering prompt
  ``"Identify the topic or theme based on the text: "``;
* embedded by a sentence-transformers model (default ``Qwen/Qwen3-Embedding-0.6B``; a local
  folder or the Hugging Face cache, never a download when ``HF_HUB_OFFLINE`` is set), its
  ``modules.json`` pipeline: the transformer, its pooling (``1_Pooling/config.json``: cls,
  mean, max or lasttoken), then L2-normalized (``normalize_embeddings=True``);
* clustered by scikit-learn's ``KMeans(n_clusters=k, n_init=10)`` into ``k`` =
  ``auto_categorize_num_categories``, else ``int(sqrt(rows))`` clamped to 2..15, at most the
  number of rows; category ``i`` is ``auto_category_i``.

Differences, decided here: ``KMeans`` gets ``random_state`` = the dataprocessor's seed (fms
leaves it unseeded, so its categories change from run to run); the validation split is
assigned to the *training* clusters (``KMeans.predict``: fms-acceleration clusters it again on
its own, so its ``auto_category_0`` of validation need not be the same topic as of training);
``auto_categorize_model_name`` and ``auto_categorize_batch_size`` are honoured (fms-hf-tuning
reads them but does not pass them on). The embeddings are computed here with transformers
(``AutoModel`` + the pooling the folder declares), not by importing sentence-transformers.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from .loading import DataError

log = logging.getLogger("fmtune")

DEFAULT_MODEL = "Qwen/Qwen3-Embedding-0.6B"
PROMPT = "Identify the topic or theme based on the text: "
# sentence-transformers' Pooling modes this module computes, by their config key
POOLING = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
           "max": "pooling_mode_max_tokens", "lasttoken": "pooling_mode_lasttoken"}


def category_count(rows: int, wanted: int | None) -> int:
    """fms-acceleration's ``_determine_category_count``."""
    k = wanted if wanted is not None else min(max(int(math.sqrt(max(rows, 1))), 2), 15)
    return max(1, min(rows, k))


def _snapshot(path: str, trust_remote_code: bool = False, local_files_only: bool = False,
              **_: Any) -> str:
    """A folder for ``path``: itself, or its snapshot in the Hugging Face cache (or hub)."""
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(path, local_files_only=local_files_only)


def pooling_of(folder: str) -> tuple[str, str, int | None]:
    """``(transformer subfolder, pooling mode, max_seq_length)`` from a sentence-transformers
    folder's ``modules.json``, ``1_Pooling/config.json`` (or the pooling module's path) and
    ``sentence_bert_config.json``; a folder without modules.json is a plain transformers model,
    pooled by mean as sentence-transformers does for one."""
    modules, sub, mode, max_len = [], "", "mean", None
    path = os.path.join(folder, "modules.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            modules = json.load(f)
    for m in modules:
        kind = str(m.get("type", ""))
        if kind.endswith("Transformer"):
            sub = m.get("path", "")
        elif kind.endswith("Pooling"):
            with open(os.path.join(folder, m.get("path", ""), "config.json"),
                      encoding="utf-8") as f:
                cfg = json.load(f)
            on = [p for p, key in POOLING.items() if cfg.get(key)]
            if len(on) != 1 or not cfg.get("include_prompt", True) or any(
                    cfg.get(k) for k in cfg if k.startswith("pooling_mode_")
                    and k not in POOLING.values()):
                raise DataError(f"embedding model {folder}: its pooling ({cfg}) is not one of "
                                f"{', '.join(POOLING)} over the whole input")
            mode = on[0]
    cfg_path = os.path.join(folder, sub, "sentence_bert_config.json")
    if not os.path.isfile(cfg_path):
        cfg_path = os.path.join(folder, "sentence_bert_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            max_len = json.load(f).get("max_seq_length")
    return sub, mode, max_len


def pool(hidden, mask, mode: str):
    """One vector per row of ``hidden`` [rows, length, dim] under ``mask`` [rows, length]."""
    import torch

    mask = mask.to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
    if mode == "max":
        return hidden.masked_fill(mask.unsqueeze(-1) == 0, torch.finfo(hidden.dtype).min).max(1)[0]
    # lasttoken: the last position the mask keeps (left or right padding)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = (positions * mask).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def embed(texts: list[str], model_name: str, batch_size: int = 64,
          trust_remote_code: bool = False):
    """L2-normalized sentence embeddings (numpy, float32) of ``PROMPT + text``."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    from fmtune.models import from_pretrained

    folder = from_pretrained(_snapshot, model_name, "embedding model")
    sub, mode, max_len = pooling_of(folder)
    where = os.path.join(folder, sub) if sub else folder
    tok = from_pretrained(AutoTokenizer.from_pretrained, where, "embedding model tokenizer",
                          trust_remote_code=trust_remote_code)
    model = from_pretrained(AutoModel.from_pretrained, where, "embedding model",
                            trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = tok([PROMPT + t for t in texts[start:start + batch_size]],
                            padding=True, truncation=max_len is not None, max_length=max_len,
                            return_tensors="pt").to(device)
                hidden = model(**batch).last_hidden_state
                vectors = pool(hidden.float(), batch["attention_mask"], mode)
                out.append(torch.nn.functional.normalize(vectors, p=2, dim=1).cpu().numpy())
    finally:
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


def categorize(train, validation, tokenizer, odm: dict, seed: int,
               trust_remote_code: bool = False) -> tuple[dict, dict]:
    """``(train categories, validation categories)``: name -> subset of ``train`` (and of
    ``validation``, None when there is none) by the clusters of their embeddings."""
    from sklearn.cluster import KMeans

    model_name = odm.get("auto_categorize_model_name") or DEFAULT_MODEL
    batch = int(odm.get("auto_categorize_batch_size") or 64)
    k = category_count(len(train), odm.get("auto_categorize_num_categories"))

    def texts(ds) -> list[str]:
        return tokenizer.batch_decode([list(x) for x in ds["input_ids"]])

    log.info("odm: auto-categorizing %d examples into %d categories with %s", len(train), k,
             model_name)
    vectors = embed(texts(train), model_name, batch, trust_remote_code)
    km = KMeans(n_clusters=k, n_init=10, random_state=seed)
    labels = km.fit_predict(vectors)
    cats = {f"auto_category_{c}": train.select([i for i, x in enumerate(labels) if x == c])
            for c in sorted(set(labels.tolist()))}
    valid = {}
    if validation is not None and len(validation):
        vlabels = km.predict(embed(texts(validation), model_name, batch, trust_remote_code))
        valid = {name: validation.select([i for i, x in enumerate(vlabels) if x == c])
                 for c in sorted(set(labels.tolist()))
                 for name in [f"auto_category_{c}"]}
    log.info("odm: categories %s", ", ".join(f"{n}: {len(d)}" for n, d in cats.items()))
    return cats, valid
