"""Write ``fmtune_ifeval.jsonl``: the project's own prompts in IFEval's format (``key``,
``prompt``, ``instruction_id_list``, ``kwargs``), checked by lm-eval's IFEval instruction
checkers. Written by the fmtune project (not IFEval's prompts). The first six are sentences of
the quickstart's toy translation task with instructions that a model which learned the
task follows (and random text does not); the rest ask for what a tiny model cannot do.
Deterministic; run from anywhere.
"""

from __future__ import annotations

import json
import os

PROMPTS = [
    ("translate: the big dog sees a cat =",
     [("keywords:existence", {"keywords": ["chien"]})]),
    ("translate: a red bird eats the fish =",
     [("startend:end_checker", {"end_phrase": "poisson"})]),
    ("translate: the old cow likes a mouse =",
     [("keywords:frequency", {"keyword": "vache", "frequency": 1, "relation": "at least"})]),
    ("translate: a small frog follows the horse =",
     [("keywords:forbidden_words", {"forbidden_words": ["grand", "vieux"]}),
      ("keywords:existence", {"keywords": ["grenouille"]})]),
    ("translate: the happy cat sees the blue dog =",
     [("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 2}),
      ("keywords:existence", {"keywords": ["joyeux"]})]),
    ("translate: the fish eats a mouse =",
     [("keywords:letter_frequency", {"letter": "o", "let_relation": "at least",
                                     "let_frequency": 3})]),
    ("Write a short poem about the sea. Give it a title wrapped in double angular brackets, "
     "such as <<my title>>.", [("detectable_format:title", {})]),
    ("Describe your favourite tool. Your answer must contain exactly 2 bullet points, using "
     "markdown bullets such as:\n* This is a point.",
     [("detectable_format:number_bullet_lists", {"num_bullets": 2})]),
    ("Explain why tests matter. Finish your answer with the exact phrase 'Is there anything "
     "else I can help with?'. No other words should follow this phrase.",
     [("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"})]),
    ("Write two sentences about rivers. Your entire response should be in English, and in all "
     "capital letters.", [("change_case:english_capital", {})]),
    ("What is a checkpoint? Wrap your entire response with double quotation marks.",
     [("startend:quotation", {})]),
    ("Write a note to a friend about a walk in the park. At the end of your response, please "
     "explicitly add a postscript starting with P.S.",
     [("detectable_content:postscript", {"postscript_marker": "P.S."})]),
    ("What does a tokenizer do? Your entire response should be in English, and in all "
     "lowercase letters. No capital letters are allowed.",
     [("change_case:english_lowercase", {})]),
    ("List three colours you like. Do not use any commas in your response, and answer in "
     "fewer than 20 words.",
     [("punctuation:no_comma", {}),
      ("length_constraints:number_words", {"relation": "less than", "num_words": 20})]),
    ("Tell me about the moon in at least 3 sentences.",
     [("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 3})]),
]


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "fmtune_ifeval.jsonl")
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for key, (prompt, instructions) in enumerate(PROMPTS, 1000):
            f.write(json.dumps({"key": key, "prompt": prompt,
                                "instruction_id_list": [i for i, _ in instructions],
                                "kwargs": [k for _, k in instructions]}) + "\n")
    print(f"wrote {len(PROMPTS)} prompts to {path}")


if __name__ == "__main__":
    main()
