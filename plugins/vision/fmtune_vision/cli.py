"""``fmtune vision``: ``preview`` (what the model is trained on: image tokens and trained
tokens marked) and ``generate`` (answers about images from a trained folder)."""

from __future__ import annotations

import json
import sys
import tempfile

from fmtune.commands import CommandParser, load_config, train_help, validate
from fmtune.config import ConfigError
from fmtune.records import IGNORE, read_records

NAME = "vision"


def _parser() -> CommandParser:
    ap = CommandParser(prog="fmtune vision", description="Commands of the vision plugin.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    preview = sub.add_parser(
        "preview", add_help=False, allow_abbrev=False,
        help="show processed conversations as the model gets them: image tokens and trained "
        "tokens marked",
        description="fmtune vision preview [--n N] [--color auto|always|never] [train options]")
    preview.add_argument("--n", type=int, default=3, help="conversations to show (default 3)")
    preview.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    gen = sub.add_parser(
        "generate", allow_abbrev=False, help="answer a prompt about images, or the "
        "conversations of a records file, with a trained folder",
        description="fmtune vision generate --model DIR (--image FILE ... --prompt TEXT | "
        "--text_file RECORDS)")
    gen.add_argument("--model", required=True, help="trained folder (full model or adapter)")
    gen.add_argument("--base_model_name_or_path", help="the base of an adapter (default: the "
                     "adapter's own record of it)")
    gen.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    gen.add_argument("--prompt", "--text", dest="prompt",
                     help="the question asked about the images (--text: fmtune generate's name)")
    gen.add_argument("--text_file", help="JSONL/JSON records: each conversation (up to its last "
                     "assistant turn, if any) is answered, one JSON line per record")
    gen.add_argument("--dataset_text_field", default="messages")
    gen.add_argument("--dataset_image_field", default="images")
    gen.add_argument("--max_new_tokens", type=int, default=64)
    gen.add_argument("--trust_remote_code", action="store_true")
    return ap


def main(argv: list[str]) -> int:
    ap = _parser()
    args, rest = ap.parse_known_args(argv)
    if args.command is None:
        ap.error("a sub-command is required: preview or generate")
    if args.command == "generate":
        if rest:
            ap.error(f"unrecognized arguments: {' '.join(rest)}")
        return generate_command(args)
    if "--output_dir" not in " ".join(rest):  # preview writes nothing; the core wants a folder
        with tempfile.TemporaryDirectory(prefix="fmtune-vision-preview-") as tmp:
            return preview_command(args, rest + ["--output_dir", tmp])
    return preview_command(args, rest)


def generate_images(argv: list[str]) -> int:
    """``fmtune generate --image FILE --text PROMPT`` (or ``--dataset_image_field`` with
    ``--text_file``): the core hands image generation to this plugin (entry point ``image`` in
    the group ``fmtune.generate``)."""
    return main(["generate", *argv])


def data_preview(argv: list[str]) -> int:
    """``fmtune data preview`` (the data_handlers plugin's command) on a vision run: this
    plugin's preview (entry point ``vision`` in the group ``fmtune.data_preview``)."""
    return main(["preview", *argv])


def generate_command(args) -> int:
    from .inference import exact_match, generate, load_for_inference, question

    if bool(args.text_file) == bool(args.prompt):
        raise ConfigError("vision generate: give --prompt (with --image) or --text_file")
    if args.prompt and not args.image:
        raise ConfigError("vision generate: --prompt needs --image FILE")
    records = None
    if args.text_file:
        records = read_records(args.text_file)
    else:
        from . import images as imgs

        for path in args.image:  # one line before the model loads
            try:
                imgs.check(*imgs.resolve(path, path))
            except imgs.ImageProblem as e:
                raise ConfigError(f"--image: {e}") from None
    model, processor = load_for_inference(args.model, args.base_model_name_or_path,
                                          args.trust_remote_code)
    if records is None:
        print(generate(model, processor, [question(args.prompt, len(args.image))],
                       [args.image], args.max_new_tokens)[0])
        return 0
    _, predictions = exact_match(model, processor, _questions(records, args),
                                 args.dataset_text_field, args.dataset_image_field,
                                 args.max_new_tokens)
    for pred in predictions:
        print(json.dumps({"output": pred}))
    return 0


def _questions(records: list[dict], args) -> list[dict]:
    """Records whose conversation ends with a user turn get an empty assistant turn to answer."""
    out = []
    for rec in records:
        msgs = rec.get(args.dataset_text_field)
        if not isinstance(msgs, list) or not msgs:
            raise ConfigError(f"{args.text_file}: a record has no {args.dataset_text_field!r} "
                              "conversation")
        if msgs[-1].get("role") != "assistant":
            msgs = [*msgs, {"role": "assistant", "content": ""}]
        out.append({**rec, args.dataset_text_field: msgs})
    return out


def preview_command(args, rest: list[str]) -> int:
    config, pm, want_help, registry = load_config(rest, activate=[NAME])
    if want_help:
        print(train_help(registry, [n for n, _ in pm.list_name_plugin()
                                    if not n.startswith("default:")]).replace(
            "usage: fmtune train", "usage: fmtune vision preview", 1))
        return 0
    validate(config, pm)
    tokenizer = pm.hook.load_tokenizer(config=config)
    train, _ = pm.hook.prepare_data(config=config, tokenizer=tokenizer, pm=pm)
    collator = pm.hook.build_collator(tokenizer=tokenizer, config=config)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    rows = [train[i] for i in range(min(args.n, len(train)))]
    print(f"trained tokens are marked {'green' if color else '[[ ]]'}; image tokens as "
          "<IMAGE xN>\n")
    for k, row in enumerate(rows):
        batch = collator([row])
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        n_img = sum(t == collator.image_token_id for t in ids)
        n_trained = sum(lab != IGNORE for lab in labels)
        print(f"--- example {k + 1} ({row['where']}): {len(ids)} tokens, {n_img} image "
              f"tokens, {n_trained} trained")
        print(mark(tokenizer, ids, labels, collator.image_token_id, color))
    return 0


def mark(tokenizer, ids: list[int], labels: list[int], image_id: int | None,
         color: bool) -> str:
    """The decoded tokens: runs of image tokens as ``<IMAGE xN>``, trained ones marked."""
    groups: list[tuple[str, list[int]]] = []
    for tid, lab in zip(ids, labels):
        kind = "image" if tid == image_id else "trained" if lab != IGNORE else "plain"
        if groups and groups[-1][0] == kind:
            groups[-1][1].append(tid)
        else:
            groups.append((kind, [tid]))
    parts = []
    for kind, toks in groups:
        if kind == "image":
            parts.append(f"<IMAGE x{len(toks)}>")
            continue
        text = tokenizer.decode(toks)
        if kind == "trained":
            text = f"\033[1;32m{text}\033[0m" if color else f"[[{text}]]"
        parts.append(text)
    return "".join(parts)
