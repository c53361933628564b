"""Write the task data of ``fmtune_translate`` and ``fmtune_translate_mc`` (stdlib only,
deterministic; run from anywhere, writes next to this script).

The records are the quickstart's toy "English -> toy-French" translation (adjectives move after
the noun, in reverse order), drawn with their own seed and kept only when the sentence is not
in the quickstart's training file, so a model trained with ``examples/quickstart.yaml`` is
scored on sentences it never saw. Written by the fmtune project; no benchmark data.

    fmtune_translate.jsonl     {"input", "output"}: generate_until, exact match
    fmtune_translate_mc.jsonl  {"input", "choices", "label"}: four candidate translations, the
                               three wrong ones built by rules the task is about (adjective
                               order kept, adjectives before the noun, subject and object
                               swapped, another verb)
"""

from __future__ import annotations

import json
import os
import random

SEED = 20261203
N = 40
DET = {"the": "le", "a": "un"}
ADJ = {"big": "grand", "small": "petit", "red": "rouge", "blue": "bleu", "old": "vieux",
       "happy": "joyeux"}
NOUN = {"dog": "chien", "cat": "chat", "bird": "oiseau", "fish": "poisson", "horse": "cheval",
        "mouse": "souris", "cow": "vache", "frog": "grenouille"}
VERB = {"sees": "voit", "likes": "aime", "eats": "mange", "follows": "suit"}


def phrase(rng: random.Random) -> tuple[str, list[str], str]:
    return (rng.choice(sorted(DET)), rng.sample(sorted(ADJ), rng.choice([0, 1, 1, 2, 2])),
            rng.choice(sorted(NOUN)))


def french(np: tuple[str, list[str], str], reverse: bool = True, before: bool = False) -> list[str]:
    det, adjs, noun = np
    fr_adjs = [ADJ[a] for a in (reversed(adjs) if reverse else adjs)]
    return [DET[det], *fr_adjs, NOUN[noun]] if before else [DET[det], NOUN[noun], *fr_adjs]


def english(np: tuple[str, list[str], str]) -> list[str]:
    det, adjs, noun = np
    return [det, *adjs, noun]


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    train_file = os.path.join(here, *[os.pardir] * 5, "examples", "quickstart", "train.jsonl")
    with open(train_file, encoding="utf-8") as f:
        seen = {json.loads(line)["input"] for line in f if line.strip()}
    rng = random.Random(SEED)
    gen, mc = [], []
    while len(gen) < N:
        subj, verb, obj = phrase(rng), rng.choice(sorted(VERB)), phrase(rng)
        text = " ".join(["translate:", *english(subj), verb, *english(obj), "="])
        if text in seen:
            continue
        seen.add(text)
        right = " ".join([*french(subj), VERB[verb], *french(obj)])
        other_verb = VERB[sorted(VERB)[(sorted(VERB).index(verb) + 1) % len(VERB)]]
        wrong = [
            " ".join([*french(subj, reverse=False), VERB[verb], *french(obj, reverse=False)]),
            " ".join([*french(subj, before=True), VERB[verb], *french(obj, before=True)]),
            " ".join([*french(obj), VERB[verb], *french(subj)]),
            " ".join([*french(subj), other_verb, *french(obj)]),
        ]
        distinct = [w for i, w in enumerate(wrong) if w != right and w not in wrong[:i]][:3]
        if len(distinct) < 3:
            continue
        label = len(gen) % 4
        choices = distinct[:label] + [right] + distinct[label:]
        gen.append({"input": text, "output": right})
        mc.append({"input": text, "choices": choices, "label": label})
    for name, records in (("fmtune_translate.jsonl", gen), ("fmtune_translate_mc.jsonl", mc)):
        with open(os.path.join(here, name), "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    print(f"wrote {len(gen)} records to each task file in {here}")


if __name__ == "__main__":
    main()
