"""Build the sentence splitter IFEval's checks use, offline: ``nltk_data/tokenizers/punkt_tab/
english/`` next to this file.

lm-eval's IFEval checks count sentences and words with nltk's Punkt tokenizer, whose
``punkt_tab`` model nltk downloads at run time. There is no download here, so the plugin ships
a Punkt model of its own: trained with nltk's ``PunktTrainer`` (unsupervised, as nltk's own
models were) on English text this script writes from templates (the project's text, no corpus
copied), saved in nltk's ``punkt_tab`` format. The plugin puts the folder on ``nltk.data.path``
only when no ``punkt_tab`` model is installed (an installed one wins; results say which was
used). Deterministic: re-running it rewrites the same files.

    python -m fmtune_evaluation.make_punkt
"""

from __future__ import annotations

import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_DIR = os.path.join(HERE, "nltk_data", "tokenizers", "punkt_tab", "english")

TITLES = ["Dr.", "Mr.", "Mrs.", "Ms.", "Prof.", "St.", "Gen.", "Sen.", "Rev.", "Capt."]
NAMES = ["Smith", "Jones", "Brown", "Lee", "Garcia", "Novak", "Okafor", "Tanaka", "Silva",
         "Moreau", "Keller", "Rossi"]
ABBREVS = ["e.g.", "i.e.", "etc.", "vs.", "approx.", "cf.", "no.", "vol.", "fig.", "dept.",
           "est.", "inc.", "jan.", "feb.", "aug.", "sept.", "oct.", "nov.", "dec."]
SUBJECTS = ["The model", "A small team", "The report", "Our library", "The new release",
            "Every test", "The tokenizer", "This plugin", "The user", "The evaluation",
            "A checkpoint", "The scheduler", "The trainer", "Each record", "The summary"]
VERBS = ["reads", "writes", "checks", "counts", "keeps", "loads", "saves", "prints", "sorts",
         "measures", "compares", "lists", "skips", "returns", "splits"]
OBJECTS = ["the results", "a short answer", "every line", "the numbers", "two files",
           "the best score", "a clear error", "the last step", "all the prompts",
           "the word count", "three sections", "a plain table", "the model card"]
ENDINGS = ["before noon", "in one pass", "without a network", "on a small machine",
           "after each epoch", "for the next run", "with care", "in the morning",
           "at the end", "twice a day"]
STARTS = ["However", "Then", "Later", "Still", "Meanwhile", "Afterwards", "Next", "Finally",
          "Yesterday", "Today", "Sometimes", "Often"]


def sentence(rng: random.Random) -> str:
    kind = rng.random()
    clause = f"{rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}"
    if kind < 0.25:  # a title before a name, mid-sentence and at the start
        who = f"{rng.choice(TITLES)} {rng.choice(NAMES)}"
        text = (f"{who} {clause}" if rng.random() < 0.5
                else f"{rng.choice(SUBJECTS)} {clause} with {who}")
    elif kind < 0.45:  # a lowercase abbreviation inside the sentence
        text = f"{rng.choice(SUBJECTS)} {clause}, {rng.choice(ABBREVS)} {rng.choice(OBJECTS)}"
    elif kind < 0.6:
        text = f"{rng.choice(STARTS)} {rng.choice(SUBJECTS).lower()} {clause}"
    elif kind < 0.7:  # numbers with a decimal point, initials
        text = (f"{rng.choice(SUBJECTS)} {clause} at {rng.randint(1, 99)}.{rng.randint(0, 9)} "
                f"percent, said {rng.choice('ABCDEFGHJKLMNPRSTW')}. {rng.choice(NAMES)}")
    else:
        text = f"{rng.choice(SUBJECTS)} {clause}"
    end = rng.choices([".", "?", "!"], weights=[8, 1, 1])[0]
    return text + end


def corpus(n_paragraphs: int = 400, seed: int = 18) -> str:
    rng = random.Random(seed)
    paragraphs = [" ".join(sentence(rng) for _ in range(rng.randint(3, 8)))
                  for _ in range(n_paragraphs)]
    return "\n\n".join(paragraphs) + "\n"


def train_params():
    from nltk.tokenize.punkt import PunktTrainer

    trainer = PunktTrainer()
    trainer.INCLUDE_ALL_COLLOCS = True
    trainer.train(corpus(), finalize=True)
    return trainer.get_params()


def write_model(params, folder: str = MODEL_DIR) -> str:
    """The four ``punkt_tab`` files (sorted, so the output is the same on every run)."""
    os.makedirs(folder, exist_ok=True)
    files = {
        "collocations.tab": "\n".join("\t".join(t) for t in sorted(params.collocations)),
        "sent_starters.txt": "\n".join(sorted(params.sent_starters)),
        "abbrev_types.txt": "\n".join(sorted(params.abbrev_types)),
        "ortho_context.tab": "\n".join(f"{k}\t{v}" for k, v in sorted(
            params.ortho_context.items())),
    }
    for name, text in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    return folder


def main() -> None:
    params = train_params()
    folder = write_model(params)
    print(f"wrote a Punkt model ({len(params.abbrev_types)} abbreviations, "
          f"{len(params.sent_starters)} sentence starters) to {folder}")


if __name__ == "__main__":
    main()
