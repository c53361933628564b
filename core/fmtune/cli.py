"""The ``fmtune`` command line.

``--help``, ``--version`` and ``plugins`` never import torch or transformers;
``train``, ``generate`` and ``evaluate`` import them only once the config is
known to be valid.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import logging
import sys
import textwrap
from typing import Any

import pluggy

from . import __version__
from .config import (CommandParser, ConfigError, OptionRegistry, Sources, parse_cli_flags,
                     read_yaml, resolve)
from . import plugins as plugin_mod

log = logging.getLogger("fmtune")

# plugin objects registered by `main(argv, extra_plugins)` (tests: fmtune.testing.run_cli /
# the fmtune_run fixture) for the whole command, so that a plugin's own sub-command, which
# builds its config with fmtune.commands.load_config, sees them too
_IN_TEST_PLUGINS: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar(
    "fmtune_in_test_plugins", default=())

USAGE = """\
usage: fmtune [--version] [--help] COMMAND ...

Fine-tune Hugging Face causal language models; everything beyond full
fine-tuning comes from plugins.

commands:
  train       fine-tune a model   (fmtune train --config run.yaml --plugins lora,aim)
  generate    greedy generation from a trained model or adapter folder
  evaluate    score outputs on records (input/output, chat) or run lm-eval tasks
  plot        redraw OUTPUT_DIR/loss.png from its training_logs.jsonl
  plugins     list installed plugins, their versions and hooks
  plan        predict peak memory and tokens/s of a run (docs/plan.md)
  k8s         render Kubernetes documents for a run (fmtune k8s render; docs/distributed.md)
  new-plugin  write a new plugin distribution with a passing test (fmtune new-plugin NAME)
  sft         run a Silogen `finetuning sft` experiment config (fmtune sft CONFIG.yaml)
  dpo         run a Silogen `finetuning dpo` experiment config (fmtune dpo CONFIG.yaml)

`fmtune train --help [--plugins a,b]` lists every option of the active plugins.
`--verbose` (with any command) also shows library notices fmtune keeps quiet.
"""


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (tests and callers may redirect it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging() -> None:
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("fmtune: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


# ----------------------------------------------------------------- train


def _split_train_argv(argv: list[str]) -> tuple[str | None, str | None, bool, list[str]]:
    """Pull --config, --plugins and --help out of the train arguments."""
    config_path = plugins = None
    want_help = False
    rest: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        name, eq, value = tok.partition("=")
        if tok in ("-h", "--help"):
            want_help = True
        elif name in ("--config", "--plugins"):
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{name} needs a value")
                value = argv[i + 1]
                i += 1
            if name == "--config":
                config_path = value
            else:
                plugins = value
        else:
            rest.append(tok)
        i += 1
    return config_path, plugins, want_help, rest


def registry_for(pm) -> OptionRegistry:
    """Every active plugin's options (``add_options``), the core's (trylast) first. A wrapper
    or an implementation that fails is a one-line error naming the plugin."""
    registry = OptionRegistry()

    def report(message: str) -> None:
        raise plugin_mod.PluginError(message)

    plugin_mod.call_each(pm, "add_options",
                         lambda plugin: {"register": registry.register_for(plugin)}, report)
    return registry


def _owner_hint(active: list[str]):
    """Finds which installed, inactive plugin owns an option (imports them only on error)."""
    cache: dict[str, list[str]] = {}

    def hint(name: str) -> list[str]:
        if not cache:
            for pname, info in plugin_mod.installed().items():
                if pname in active:
                    continue
                try:
                    obj = info.load()
                except Exception:  # noqa: BLE001 - a broken plugin just gives no hint
                    continue
                fn = getattr(obj, "add_options", None)
                if fn is None:
                    continue
                names: list[str] = []
                try:
                    fn(lambda n, *a, aliases=(), **k: names.extend([n, *aliases]))
                except Exception:  # noqa: BLE001
                    continue
                for n in dict.fromkeys(names):
                    cache.setdefault(n, []).append(pname)
            cache.setdefault("", [])
        return cache.get(name.replace("-", "_"), [])

    return hint


def load_config(argv: list[str], extra_plugins: list[Any] = (), activate: list[str] = ()):
    """Parse ``train``-style arguments into ``(config, pm, want_help, registry)``.

    ``activate`` names plugins to enable in any case (a plugin's own sub-command
    passes its entry point name). Without ``extra_plugins``, those given to :func:`main` for
    this command are registered (so sub-commands of plugins see in-test plugins).
    """
    extra_plugins = list(extra_plugins) or list(_IN_TEST_PLUGINS.get())
    config_path, cli_plugins, want_help, rest = _split_train_argv(argv)
    yaml_values = read_yaml(config_path) if config_path else {}
    names = plugin_mod.split_names(cli_plugins if cli_plugins is not None
                                   else yaml_values.get("plugins"))
    names += [n for n in activate if n not in names]
    chosen = list(names)  # by the user (or the sub-command), before options imply more
    cli_pairs = parse_cli_flags(rest)
    # fms-hf-tuning's feature flags (--peft_method lora, --trackers aim, --data_config_path F)
    # activate the installed plugin that declares them (plugins.Implication)
    available = plugin_mod.installed()
    for plugin, reason in plugin_mod.implied(yaml_values, cli_pairs, names, available):
        info = available[plugin]
        log.info("%s activates plugin %r (%s %s)", reason, plugin, info.distribution,
                 info.version)
        names.append(plugin)
    missing = plugin_mod.not_installed(yaml_values, cli_pairs, available, chosen)
    if missing:
        raise ConfigError("; ".join(missing))
    pm = plugin_mod.new_manager()
    for obj in extra_plugins:
        try:
            pm.register(obj)
        except pluggy.PluginValidationError as e:
            raise plugin_mod.PluginError(plugin_mod.validation_error(pm, e)) from None
    pm = plugin_mod.load(names, pm)
    # the named plugins and those they need (fmtune_plugins), in registration order
    activated = plugin_mod.active(pm)
    names = [*activated, *(n for n in names if n not in activated)]
    registry = registry_for(pm)
    if want_help:
        return None, pm, True, registry
    config = resolve(registry, Sources(yaml_values, config_path, cli_pairs), names,
                     owner_hint=_owner_hint(names))
    return config, pm, False, registry


def train_help(registry: OptionRegistry, names: list[str]) -> str:
    lines = ["usage: fmtune train [--config FILE.yaml] [--plugins a,b] [--OPTION VALUE ...]", "",
             "Every option is also a YAML key of the same name; the command line wins.",
             f"Active plugins: {', '.join(names) or 'none (core only)'}", ""]
    by_plugin: dict[str, list] = {}
    for opt in registry.options.values():
        by_plugin.setdefault(opt.plugin, []).append(opt)
    for plugin, opts in by_plugin.items():
        lines.append(f"{plugin.removeprefix('default:')} options:" if not plugin.startswith(
            "default:") else f"core options ({plugin.removeprefix('default:')}):")
        for opt in opts:
            flag = f"  --{opt.name} {'|'.join([opt.type.__name__.upper(), *opt.words])}"
            extra = f" [default: {opt.default}]" if opt.default not in (None, "") else ""
            choices = f" {{{', '.join(map(str, opt.choices))}}}" if opt.choices else ""
            alias = f" (alias: {', '.join('--' + a for a in opt.aliases)})" if opt.aliases else ""
            lines.append(flag)
            lines.extend(textwrap.wrap(opt.help + choices + extra + alias, 76,
                                       initial_indent="      ", subsequent_indent="      "))
        lines.append("")
    return "\n".join(lines)


def cmd_train(argv: list[str], extra_plugins: list[Any] = ()) -> int:
    config, pm, want_help, registry = load_config(argv, extra_plugins)
    if want_help:
        names = [n for n, _ in pm.list_name_plugin() if not n.startswith("default:")]
        print(train_help(registry, names))
        return 0
    from .distributed import is_main_process, maybe_relaunch
    from .pipeline import train, validate

    # --num_processes N / --accelerate_config F: validate once, then re-run under accelerate
    code = maybe_relaunch(config, argv, before=lambda: validate(config, pm))
    if code is not None:
        return code
    summary = train(config, pm)
    if is_main_process() and summary.get("data_only"):
        print("fmtune: data processed, no training (do_dataprocessing_only): "
              + "; ".join(f"{v['rows']} rows in {v['folder']}" for k, v in summary.items()
                          if isinstance(v, dict)))
    elif is_main_process() and not summary.get("already_finished"):
        _print_summary(summary)  # a finished run's rerun said its one line already
    return 0


def _print_summary(s: dict) -> None:
    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "n/a"

    print(f"fmtune: done in {fmt(s['wall_time_s'], '.1f')} s: {s['global_step']} steps, "
          f"final loss {fmt(s['final_loss'], '.4f')}, {fmt(s['tokens_per_second'], '.0f')} tokens/s, "
          f"peak RSS {fmt(s['peak_rss_mb'], '.0f')} MB, world size {s['world_size']}")
    print(f"fmtune: model saved to {s['model_saved_to']}; summary in "
          f"{s['output_dir']}/run_summary.json")
    trackers = s.get("trackers") if isinstance(s.get("trackers"), dict) else {}
    for name, status in trackers.items():  # a tracker that failed mid-run did not stop it
        if isinstance(status, dict) and status.get("status") == "failed":
            print(f"fmtune: tracker {name} failed at step {status.get('at_step')} and was "
                  f"disabled: {status.get('error')} (the losses are in training_logs.jsonl)")


# -------------------------------------------------------------- plugins


def cmd_plugins(argv: list[str]) -> int:
    parser = CommandParser(prog="fmtune plugins", description="List installed plugins.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    rows = plugin_mod.describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        version = f" {row['version']}" if row["version"] else ""
        dist = f" ({row['distribution']}{version})" if row["distribution"] else ""
        print(f"{row['name']}{dist}  -> {row['entry_point']}")
        if row["error"]:
            print(f"    warning: failed to load: {row['error']}")
        else:
            print(f"    hooks: {', '.join(row['hooks']) or 'none'}")
            if row.get("needs"):
                print(f"    needs: {', '.join(row['needs'])} (activated with it)")
    return 0


# ------------------------------------------------------ generate/evaluate


def _trust_flag(parser: argparse.ArgumentParser) -> None:
    from .config import parse_bool

    parser.add_argument("--trust_remote_code", type=parse_bool, nargs="?", const=True,
                        default=False, help="run Python code the model folder ships (auto_map); "
                        "off by default, never asked on stdin")


def cmd_generate(argv: list[str]) -> int:
    parser = CommandParser(
        prog="fmtune generate",
        description="Greedy generation from a model or adapter folder. --out_file writes "
                    'fms-hf-tuning\'s inference format: a JSON list of {"input", "output"}.')
    parser.add_argument("--model", required=True, help="trained model folder or adapter folder")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="prompt (repeatable)")
    src.add_argument("--text_file", help="prompts: one per line; or a .json list of strings or "
                     'of {"input"} objects; or .jsonl lines of those')
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--out_file", help='write [{"input", "output"}, ...] JSON here '
                     "(atomically) instead of printing the outputs")
    out.add_argument("--jsonl", action="store_true", help='print one {"input", "output"} JSON '
                     "object per line (ASCII, every control character and line break escaped: "
                     "a reader splitting on newlines gets exactly one record per prompt). "
                     "Without it each output is printed as it is, followed by a newline, for "
                     "people to read")
    parser.add_argument("--chat", action="store_true", help="render each prompt as a user "
                        "message with the tokenizer's chat template (or --chat_template)")
    parser.add_argument("--chat_template", help="chat template for --chat instead of the "
                        "model's: a built-in name (chatml, llama3, granite, gemma, mistral), "
                        "a file (Jinja; a tokenizer_config.json or tokenizer folder is read for "
                        "its template) or the Jinja text")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--base_model_name_or_path", help="for an adapter folder: load it over "
                        "this base model instead of the one its adapter_config.json names "
                        "(fms-hf-tuning's inference flag); nothing on disk is changed")
    _trust_flag(parser)
    args = parser.parse_args(argv)
    import os

    from . import chat_templates
    from .files import write_json
    from .inference import generate, load_for_inference, read_prompts, render_chat

    if args.chat_template and not args.chat:
        raise ConfigError("--chat_template needs --chat")
    texts = read_prompts(args.text_file) if args.text_file else args.text
    if args.out_file and not os.path.isdir(os.path.dirname(os.path.abspath(args.out_file))):
        raise ConfigError(f"--out_file {args.out_file}: its folder does not exist")
    if args.out_file and os.path.isdir(args.out_file):
        raise ConfigError(f"{args.out_file}: is a folder; give the path of a file to write")
    template = chat_templates.resolve(args.chat_template, "--chat_template")
    if args.max_new_tokens < 1:  # checked before the model loads
        raise ConfigError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    model, tokenizer = load_for_inference(args.model, args.trust_remote_code,
                                          args.base_model_name_or_path)
    prompts = render_chat(tokenizer, texts, template, args.model) if args.chat else texts
    outputs = generate(model, tokenizer, prompts, args.max_new_tokens,
                       add_special_tokens=not args.chat)
    if args.out_file:
        write_json(args.out_file, [{"input": t, "output": o} for t, o in zip(texts, outputs)],
                   ensure_ascii=False)
        print(f"fmtune: wrote {len(outputs)} outputs to {args.out_file}")
    elif args.jsonl:
        for text, output in zip(texts, outputs):
            print(json.dumps({"input": text, "output": output}, ensure_ascii=True))
    else:
        for output in outputs:
            print(output)
    return 0


def cmd_evaluate(argv: list[str], extra_plugins: list[Any] = ()) -> int:
    parser = CommandParser(
        prog="fmtune evaluate",
        description="Score greedy outputs on records (--data: exact match, contains or regex; "
                    "input/output records, or chat records with --chat) and/or run "
                    "lm-evaluation-harness tasks (--tasks, from the plugin that provides "
                    "them: pip install fmtune-evaluation). Evaluate a trained folder (--model) "
                    "or the untrained model a config builds (--config, same plugins and "
                    "options as train).")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="trained model folder or adapter folder")
    src.add_argument("--config", help="train config: evaluate the model it starts from")
    parser.add_argument("--base_model_name_or_path", help="for an adapter folder: load it over "
                        "this base model instead of the one its adapter_config.json names")
    parser.add_argument("--data", help="JSONL file of {input, output} records (chat records "
                        'with --chat: {"messages": [..., {"role": "assistant", ...}]}, the '
                        "last turn being the reference answer)")
    parser.add_argument("--chat", action="store_true", help="--data holds chat records: "
                        "render the turns before the last with the model's chat template (the "
                        "one training saved with the tokenizer) or --chat_template, and score "
                        "the output against the last (assistant) turn")
    parser.add_argument("--chat_template", help="chat template for --chat instead of the "
                        "model's: a built-in name, a file, or the Jinja text")
    parser.add_argument("--metric", default="exact_match", help="for --data: exact_match "
                        "(default), contains or regex")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="answer length "
                        "(--data: default 64; --tasks: instead of each generation task's own)")
    parser.add_argument("--show", type=int, default=3, help="print this many predictions")
    parser.add_argument("--tasks", help="comma-separated lm-eval tasks (task, group or tag "
                        "names, or task YAML paths): the fmtune-evaluation plugin's own "
                        "(fmtune_translate, fmtune_translate_mc, fmtune_ifeval), those in "
                        "--include_path, or lm-eval's")
    parser.add_argument("--include_path", action="append", help="folder (or file) of lm-eval "
                        "task YAMLs for --tasks (repeatable)")
    parser.add_argument("--limit", type=float, help="examples per task (a count, or a "
                        "fraction below 1)")
    parser.add_argument("--batch_size", type=int, default=8, help="lm-eval batch size")
    parser.add_argument("--num_fewshot", type=int, help="few-shot examples per task")
    parser.add_argument("--ifeval_prompts", help="IFEval prompts file (JSONL in IFEval's "
                        "format) for --tasks ifeval: read locally, no download")
    parser.add_argument("--apply_chat_template", action="store_true", help="--tasks: render "
                        "prompts with the model's chat template (lm-eval's option)")
    parser.add_argument("--log_samples", action="store_true", help="--tasks: also write each "
                        "task's samples (samples_TASK.jsonl) to --output_path")
    parser.add_argument("--output_path", help="folder to write to (atomically): results.json "
                        "(lm-eval's results JSON), records.json and records.jsonl (--data: "
                        "the score and one line per record)")
    _trust_flag(parser)
    args, rest = parser.parse_known_args(argv)
    import os

    from .inference import METRICS, check_metric, check_records, chat_examples
    from .records import folder_problem, read_records, record_where

    if not args.data and not args.tasks:
        parser.error("one of --data or --tasks is required")
    if args.chat and not args.data:
        parser.error("--chat needs --data")
    if args.chat_template and not args.chat:
        raise ConfigError("--chat_template needs --chat")
    if args.metric not in METRICS:
        parser.error(f"argument --metric: invalid choice: {args.metric!r} (choose from "
                     f"{', '.join(METRICS)})")
    if args.log_samples and not (args.tasks and args.output_path):
        raise ConfigError("--log_samples needs --tasks and --output_path")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.model and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    # everything is checked before any model loads: records, references, template, output
    prompts = references = records = template = None
    if args.data:
        records = read_records(args.data)
        wheres = [record_where(args.data, r, i) for i, r in enumerate(records)]
        if args.chat:
            examples = chat_examples(records, args.data)
            references = [ref for _, ref in examples]
            if args.chat_template:
                from . import chat_templates

                template = chat_templates.resolve(args.chat_template, "--chat_template")
        else:
            try:
                check_records(records, args.data)
            except ConfigError as e:
                if "a chat record" in str(e):
                    raise ConfigError(f"{e}; pass --chat to score chat records") from None
                raise
            prompts, references = [r["input"] for r in records], [r["output"] for r in records]
        check_metric(args.metric, references, wheres)
    if args.output_path:
        if args.output_path.endswith(".json") and not os.path.isdir(args.output_path):
            raise ConfigError(f"--output_path {args.output_path}: give a folder (results.json "
                              "and the other files are written into it)")
        why = folder_problem(args.output_path)
        if why:
            raise ConfigError(f"--output_path {args.output_path}: {why}")
    runner = plugin = None
    if args.tasks:
        from .inference import task_plugin

        plugin = task_plugin("--tasks")
        runner = plugin.prepare_tasks(
            args.tasks, include_path=args.include_path or (), limit=args.limit,
            batch_size=args.batch_size, num_fewshot=args.num_fewshot,
            max_new_tokens=args.max_new_tokens, ifeval_prompts=args.ifeval_prompts,
            apply_chat_template=args.apply_chat_template, log_samples=args.log_samples)
    if args.model:
        from .inference import load_for_inference

        model, tokenizer = load_for_inference(args.model, args.trust_remote_code,
                                              args.base_model_name_or_path)
    else:
        if args.base_model_name_or_path:
            raise ConfigError("--base_model_name_or_path goes with --model (an adapter folder)")
        if args.trust_remote_code:
            rest = [*rest, "--trust_remote_code", "true"]
        config, pm, _, _ = load_config(["--config", args.config, *rest], extra_plugins)
        tokenizer = pm.hook.load_tokenizer(config=config)
        model = pm.hook.load_model(config=config, tokenizer=tokenizer).eval()
    if records is not None:
        from .inference import render_turns, score, turn_end

        stop = None
        if args.chat:
            prompts = render_turns(tokenizer, [turns for turns, _ in examples], template,
                                   args.model or args.config)
            stop = turn_end(tokenizer, template)
        acc, preds, hits = score(model, tokenizer, prompts, references, args.metric,
                                 args.max_new_tokens or 64, add_special_tokens=not args.chat,
                                 stop=stop)
        for i, (pred, ref) in enumerate(list(zip(preds, references))[: args.show]):
            shown = pred.strip() if len(pred.strip()) <= 80 else pred.strip()[:77] + "..."
            asked = examples[i][0][-1]["content"] if args.chat else records[i]["input"]
            print(f"  {asked!r} -> {shown!r} (expected {str(ref)!r})")
        label = {"exact_match": "exact match"}.get(args.metric, args.metric)
        print(f"{label}: {acc:.3f} ({sum(hits)}/{len(hits)})")
        if args.output_path:
            from .inference import write_record_scores

            write_record_scores(args.output_path, records, references, preds, hits, acc,
                                data=args.data, model=args.model or args.config,
                                chat=args.chat, metric=args.metric,
                                max_new_tokens=args.max_new_tokens or 64)
    if runner is not None:
        try:
            results = runner.run(model, tokenizer)
            if args.output_path:
                for path in plugin.write_results(results, args.output_path):
                    print(f"fmtune: wrote {path}", file=sys.stderr)
            print(plugin.summary_table(results))
        finally:
            runner.close()
    return 0


# ------------------------------------------------------------------ plot


def cmd_plot(argv: list[str]) -> int:
    parser = CommandParser(
        prog="fmtune plot",
        description="Redraw OUTPUT_DIR/loss.png from OUTPUT_DIR/training_logs.jsonl: training "
                    "and validation loss against step, and the learning rate on a second axis "
                    "when the latest checkpoint's trainer_state.json has it.")
    parser.add_argument("output_dir", help="the output_dir of a training run")
    parser.add_argument("--output", help="where to write the PNG (default: OUTPUT_DIR/loss.png)")
    args = parser.parse_args(argv)
    from .plots import plot_loss

    print(plot_loss(args.output_dir, path=args.output).describe())
    return 0


# ------------------------------------------------------------------ main


def cmd_sft(argv: list[str]) -> int:
    from . import silogen

    return silogen.cmd("sft", argv)


def cmd_silogen_dpo(argv: list[str]) -> int:
    from . import silogen

    return silogen.cmd("dpo", argv)


def cmd_new_plugin(argv: list[str]) -> int:
    from .scaffold import cmd_new_plugin

    return cmd_new_plugin(argv)


def cmd_plan(argv: list[str]) -> int:
    from .plan import cmd_plan

    return cmd_plan(argv)


def cmd_k8s(argv: list[str]) -> int:
    from .k8s import cmd_k8s

    return cmd_k8s(argv)


COMMANDS = {"train": cmd_train, "plugins": cmd_plugins, "generate": cmd_generate,
            "evaluate": cmd_evaluate, "plot": cmd_plot, "sft": cmd_sft,
            "new-plugin": cmd_new_plugin, "plan": cmd_plan, "k8s": cmd_k8s}
COMMAND_GROUP = "fmtune.commands"


def plugin_commands() -> dict[str, Any]:
    """Sub-commands installed by plugins: entry points ``NAME = "module:function"`` in the
    group ``fmtune.commands``; ``function(argv) -> exit code``. Listed without importing."""
    from importlib import metadata

    found = {}
    for ep in metadata.entry_points(group=COMMAND_GROUP):
        if ep.name not in COMMANDS:
            found.setdefault(ep.name, ep)
    return dict(sorted(found.items()))


GENERATE_GROUP = "fmtune.generate"


def _generate_handler(argv: list[str]):
    """``fmtune generate`` with an option a plugin handles (entry point ``OPTION =
    "module:function"`` in the group ``fmtune.generate``: ``image`` for ``--image``): that
    plugin's ``function(argv)`` runs the command; a one-line error when no installed plugin
    handles it. None for plain text generation."""
    from importlib import metadata

    given = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
    wanted = given & {"image", "dataset_image_field"}  # fms-hf-tuning's image options
    handlers = {ep.name: ep for ep in metadata.entry_points(group=GENERATE_GROUP)}
    for name in sorted(given & set(handlers)):
        ep = handlers[name]

        def run(args: list[str], ep=ep) -> int:
            return int(ep.load()(args) or 0)
        return run
    if wanted:
        option = sorted(wanted)[0]
        known = plugin_mod.provider_of("dataset_image_field")  # from the catalog, not code
        hint = f" (pip install {known[1]})" if known else ""

        def refuse(_args: list[str]) -> int:
            raise ConfigError(f"generate: --{option} needs a plugin that generates from images, "
                              f"and none is installed{hint}")
        return refuse
    return None


def _usage() -> str:
    extra = plugin_commands()
    if not extra:
        return USAGE
    lines = [f"  {name:<11} from {ep.dist.metadata['Name'] if ep.dist else ep.value}"
             for name, ep in extra.items()]
    return USAGE.replace("\n`fmtune train --help",
                         "\nplugin commands (`fmtune COMMAND --help`):\n" + "\n".join(lines)
                         + "\n\n`fmtune train --help")


# Library loggers whose messages are not the user's business in a run that does not use that
# library's feature: torch's pytree deprecation notices (torchao registers its enums at import),
# torch's CUDA_HOME notice on machines without CUDA, bitsandbytes' "pip install kernels" for an
# optional CPU kernel. `--verbose` (any command) or FMTUNE_VERBOSE=1 shows them.
QUIET_LOGGERS = ("torch.utils._pytree", "torch.utils.cpp_extension",
                 "bitsandbytes.backends.cpu.ops")
# deprecation notices a library raises about its own internal calls
QUIET_WARNINGS = (r"`is_gradient_checkpointing` is deprecated",)


def _quiet_libraries(argv: list[str]) -> list[str]:
    """Drop ``--verbose`` from ``argv`` (remembered in FMTUNE_VERBOSE, which launched children
    inherit); unless verbose, raise the level of :data:`QUIET_LOGGERS` to ERROR."""
    import os

    if "--verbose" in argv:
        argv = [a for a in argv if a != "--verbose"]
        os.environ["FMTUNE_VERBOSE"] = "1"
    if os.environ.get("FMTUNE_VERBOSE", "").lower() not in ("1", "true", "yes"):
        import warnings

        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
    return argv


def _close_stdin() -> None:
    """No fmtune command reads stdin: a library prompt (transformers asks "Do you wish to run the
    custom code? [y/N]" when trust_remote_code is left unset) must never be answered by whatever
    is piped in. Every loader passes trust_remote_code explicitly; this is the second guard."""
    import os

    if sys.stdin is not None and sys.stdin is sys.__stdin__:
        sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - lives for the process


def main(argv: list[str] | None = None, extra_plugins: list[Any] = ()) -> int:
    """Entry point; ``extra_plugins`` registers plugin objects (used by tests)."""
    # the console script (no argv): the process ends with the command; given argv, a program
    # (a test) goes on after it, and its objects are left as they are (not frozen, below)
    console = argv is None
    argv = _quiet_libraries(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"fmtune {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if argv[0] == "dpo" and argv[1:2] != ["preview"]:
        # `fmtune dpo CONFIG.yaml` is Silogen's command; `fmtune dpo preview` stays the dpo
        # plugin's (a config file named preview is written ./preview)
        command = cmd_silogen_dpo
    if argv[0] == "generate" and argv[1:2] and not argv[1].startswith("-"):
        from .silogen import cmd_generate as command  # Silogen's `generate CONFIG.yaml OUT.yaml`
    elif argv[0] == "generate":
        command = _generate_handler(argv[1:]) or command
    extra = plugin_commands() if command is None else {}
    if command is None and argv[0] not in extra:
        from .config import suggest

        print(f"fmtune: error: unknown command {argv[0]!r}{suggest(argv[0], [*COMMANDS, *extra])}"
              f"\n\n{_usage()}", file=sys.stderr)
        return 2
    _setup_logging()
    _close_stdin()
    # from here on, peft, transformers and accelerate are imported without the packages they
    # import for features a run does not use (bitsandbytes, gptqmodel, scipy, torchao, boto3;
    # imported on first use instead): fmtune.hub.lean_imports. Done by the command line only,
    # never by importing an fmtune module, so a program that imports fmtune keeps its imports
    # and, run as the console script, the objects start-up makes until the model loads are
    # frozen out of the cyclic garbage collector's full collections
    # (fmtune.hub.freeze_at_imports: ~1.1 CPU-s to a 1-step LoRA run's first step)
    from .hub import freeze_at_imports, lean_imports

    lean_imports()
    if console:
        freeze_at_imports()
    token = _IN_TEST_PLUGINS.set(tuple(extra_plugins))
    try:
        if command is None:
            from .plugins import incompatibility

            why = incompatibility(extra[argv[0]].dist)
            if why:  # as for plugins: never import a plugin built for another core
                raise ConfigError(f"command {argv[0]!r} is not loaded: {why}")
            try:
                command = extra[argv[0]].load()
            except Exception as e:  # noqa: BLE001 - report any import failure the same way
                raise ConfigError(f"command {argv[0]!r} ({extra[argv[0]].value}) failed to load: "
                                  f"{type(e).__name__}: {e}") from e
            return int(command(argv[1:]) or 0)
        if command in (cmd_train, cmd_evaluate):
            return command(argv[1:], extra_plugins)
        return command(argv[1:])
    except ConfigError as e:
        print(f"fmtune: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the training itself failed or was stopped (not the input)
        from .pipeline import TrainingDiverged, TrainingInterrupted

        if not isinstance(e, (TrainingDiverged, TrainingInterrupted)):
            raise
        print(f"fmtune: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 3)
    except BrokenPipeError:  # `fmtune train --help | head`
        sys.stderr.close()
        return 0
    finally:
        _IN_TEST_PLUGINS.reset(token)
        freeze_at_imports(False)


if __name__ == "__main__":
    sys.exit(main())
