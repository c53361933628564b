"""What lm-eval needs to run without a network.

* Datasets: ``datasets`` runs offline while lm-eval builds the tasks (unless the user set
  ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE``), so a hub dataset that is not cached fails at
  once instead of waiting on the network; the project's tasks read local files.
* IFEval's sentence and word counts use nltk's Punkt model ``punkt_tab``, which lm-eval
  downloads when its IFEval module is imported and the model is not installed. When no
  ``punkt_tab`` model is installed, the plugin's own (``nltk_data/``, trained by
  :mod:`fmtune_evaluation.make_punkt` with nltk's PunktTrainer on text the project wrote) is
  put on ``nltk.data.path`` first, so that nltk finds it and lm-eval never downloads.
"""

from __future__ import annotations

import contextlib
import os

NLTK_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nltk_data")
OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


@contextlib.contextmanager
def offline_datasets():
    """``datasets`` offline while lm-eval builds tasks (a hub dataset that is not cached
    fails at once instead of waiting on the network), unless the user set
    ``HF_DATASETS_OFFLINE`` or ``HF_HUB_OFFLINE``; restored afterwards, so the rest of the
    process (a model from the hub, say) is not affected."""
    if any(os.environ.get(name) is not None for name in OFFLINE_VARS):
        yield
        return
    import datasets.config as config

    before = {name: getattr(config, name, None) for name in OFFLINE_VARS}
    for name in OFFLINE_VARS:
        setattr(config, name, True)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(config, name, value)


def use_punkt() -> str:
    """The folder of the ``punkt_tab`` English model nltk will use: an installed one when there
    is one, else the plugin's (put first on ``nltk.data.path``). Never downloads."""
    import nltk

    try:
        return str(nltk.data.find("tokenizers/punkt_tab/english/"))
    except LookupError:
        pass
    if NLTK_DATA not in nltk.data.path:
        nltk.data.path.insert(0, NLTK_DATA)
    try:
        return str(nltk.data.find("tokenizers/punkt_tab/english/"))
    except LookupError:  # the package is incomplete: refuse rather than let lm-eval download
        raise RuntimeError(f"fmtune-evaluation is incomplete: no Punkt model in {NLTK_DATA} "
                           "(rebuild it with python -m fmtune_evaluation.make_punkt)") from None


def seed_langdetect() -> None:
    """IFEval's language checks use langdetect, which samples: seeded, a response gets the
    same verdict on every run (as langdetect documents)."""
    from langdetect import DetectorFactory

    DetectorFactory.seed = 0


def punkt_is_projects(folder: str) -> bool:
    return os.path.abspath(folder).startswith(os.path.abspath(NLTK_DATA))
