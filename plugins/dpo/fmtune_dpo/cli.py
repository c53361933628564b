"""``fmtune dpo preview [--n N] [train options]``: the preference pairs as the trainer sees them."""

from __future__ import annotations

import argparse
import os
import sys

NAME = "dpo"
USAGE = ("usage: fmtune dpo preview [--n N] [--color auto|always|never] [train options]\n"
         "Shows tokenized preference pairs (prompt, then the trained chosen and rejected tokens "
         "marked) and what was kept, truncated and dropped.")


def mark(text: str, color: bool, code: str) -> str:
    return f"\033[{code}m{text}\033[0m" if color else f"[[{text}]]"


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "preview":
        help_asked = argv[:1] in (["-h"], ["--help"])
        print(USAGE, file=sys.stdout if help_asked else sys.stderr)
        return 0 if help_asked else 2
    from fmtune.commands import load_config, train_help, validate

    from .data import prepare

    ap = argparse.ArgumentParser(prog="fmtune dpo preview", add_help=False)
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    args, rest = ap.parse_known_args(argv[1:])
    if not any(a.split("=")[0] == "--output_dir" for a in rest):
        rest += ["--output_dir", os.devnull]  # preview writes nothing
    config, pm, want_help, registry = load_config(rest, activate=[NAME])
    if want_help:
        print(train_help(registry, [n for n, _ in pm.list_name_plugin()
                                    if not n.startswith("default:")]).replace(
            "usage: fmtune train", "usage: fmtune dpo preview", 1))
        return 0
    validate(config, pm)
    tokenizer = pm.hook.load_tokenizer(config=config)
    train, _, counts = prepare(config, tokenizer)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(f"trained tokens are marked {'green (chosen) / red (rejected)' if color else '[[ ]]'}\n")
    for k in range(min(args.n, len(train))):
        row = train[k]
        print(f"--- pair {k + 1}: prompt {len(row['prompt_ids'])} tokens, chosen "
              f"{len(row['chosen_ids'])}, rejected {len(row['rejected_ids'])}")
        prompt = tokenizer.decode(row["prompt_ids"])
        print(f"chosen:   {prompt}{mark(tokenizer.decode(row['chosen_ids']), color, '1;32')}")
        print(f"rejected: {prompt}{mark(tokenizer.decode(row['rejected_ids']), color, '1;31')}")
    print()
    for split, c in counts.items():
        print(f"{split}: {c.line()}")
    return 0
