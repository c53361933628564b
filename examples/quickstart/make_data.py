"""Generate the fmtune quickstart toy task (stdlib only, deterministic).

Task: word-by-word "English -> toy-French" translation with adjective
reordering.  Adjectives move after the noun and their order is reversed:

    input : translate: the big red dog sees a small cat =
    output: le chien rouge grand voit un chat petit

Writes, next to this script:
    train.jsonl    training records  {"input": ..., "output": ...}
    heldout.jsonl  held-out records (novel inputs, never seen in training)
    corpus.txt     plain text used to train the demo BPE tokenizer (training records only)
"""
import json
import os
import random

SEED = 1234
N_TRAIN = 2000
N_HELDOUT = 100

DETERMINERS = {"the": "le", "a": "un"}
ADJECTIVES = {
    "big": "grand",
    "small": "petit",
    "red": "rouge",
    "blue": "bleu",
    "old": "vieux",
    "happy": "joyeux",
}
NOUNS = {
    "dog": "chien",
    "cat": "chat",
    "bird": "oiseau",
    "fish": "poisson",
    "horse": "cheval",
    "mouse": "souris",
    "cow": "vache",
    "frog": "grenouille",
}
VERBS = {"sees": "voit", "likes": "aime", "eats": "mange", "follows": "suit"}

PREFIX = "translate:"
SUFFIX = "="


def noun_phrase(rng):
    det = rng.choice(sorted(DETERMINERS))
    n_adj = rng.choice([0, 1, 1, 2, 2])
    adjs = rng.sample(sorted(ADJECTIVES), n_adj)
    noun = rng.choice(sorted(NOUNS))
    en = [det] + adjs + [noun]
    fr = [DETERMINERS[det], NOUNS[noun]] + [ADJECTIVES[a] for a in reversed(adjs)]
    return en, fr


def sentence(rng):
    s_en, s_fr = noun_phrase(rng)
    verb = rng.choice(sorted(VERBS))
    o_en, o_fr = noun_phrase(rng)
    en = " ".join([PREFIX] + s_en + [verb] + o_en + [SUFFIX])
    fr = " ".join(s_fr + [VERBS[verb]] + o_fr)
    return {"input": en, "output": fr}


def slots(record):
    """(slot, word) pairs of an input, slot = (phrase, n_adj, position)."""
    words = record["input"].split()[1:-1]
    out = []
    verb_i = next(i for i, w in enumerate(words) if w in VERBS)
    for role, np_words in (("subj", words[:verb_i]), ("obj", words[verb_i + 1:])):
        n_adj = len(np_words) - 2
        for pos, w in enumerate(np_words):
            out.append(((role, n_adj, pos), w))
    out.append((("verb", 0, 0), words[verb_i]))
    return out


def main():
    rng = random.Random(SEED)
    seen = set()
    heldout = []
    while len(heldout) < N_HELDOUT:
        rec = sentence(rng)
        if rec["input"] not in seen:
            seen.add(rec["input"])
            heldout.append(rec)
    train = []
    while len(train) < N_TRAIN:
        rec = sentence(rng)
        if rec["input"] not in seen:
            seen.add(rec["input"])
            train.append(rec)

    # Every (slot, word) used by a held-out input must occur in training.
    train_slots = {sw for rec in train for sw in slots(rec)}
    missing = {sw for rec in heldout for sw in slots(rec)} - train_slots
    assert not missing, f"held-out slot/word pairs never seen in training: {missing}"
    assert not {r["input"] for r in train} & {r["input"] for r in heldout}

    here = os.path.dirname(os.path.abspath(__file__))
    for name, records in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        with open(os.path.join(here, name), "w", encoding="utf-8", newline="\n") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    with open(os.path.join(here, "corpus.txt"), "w", encoding="utf-8", newline="\n") as f:
        for rec in train:  # training text only: held-out records stay unseen
            f.write(rec["input"] + "\n")
            f.write(rec["output"] + "\n")
    print(f"wrote {len(train)} train, {len(heldout)} heldout records to {here}")


if __name__ == "__main__":
    main()
