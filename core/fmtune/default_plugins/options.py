"""Core options (fms-hf-tuning names) and their validation."""

from __future__ import annotations

import functools
import math
import os
import re

from fmtune import hookimpl

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
              "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau",
              "cosine_with_min_lr", "warmup_stable_decay")
STRATEGIES = ("no", "steps", "epoch")
# fms-hf-tuning flags served by its optional fms-acceleration framework (GPU kernels and
# samplers); fms-hf-tuning refuses them too when that framework is not installed
FMS_ACCELERATION = {
    "fast_moe": "mixture-of-experts models train with transformers' own expert layers.",
    "fused_lora": "--plugins gptq,lora trains LoRA over GPTQ checkpoints.",
    "fast_kernels": "use --use_liger_kernel (transformers' Liger kernels) where installed.",
    "fast_loss": "use --use_liger_kernel (transformers' Liger kernels) where installed.",
    "fast_rms_layernorm": "use --use_liger_kernel (transformers' Liger kernels) where installed.",
    "fast_rope_embeddings": "use --use_liger_kernel (transformers' Liger kernels) where "
                            "installed.",
    "bnb_qlora": "--plugins qlora trains LoRA over a bitsandbytes 4-bit base.",
}
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN = ("eager", "sdpa", "flash_attention_2")


@hookimpl(trylast=True)
def add_options(register):
    """fmtune's own options (fms-hf-tuning names and defaults), then every other field of the
    installed transformers' TrainingArguments (fmtune.training_options)."""
    from fmtune import training_options

    own: set[str] = set()

    def register_own(name, *args, **kwargs):
        own.add(name)
        own.update(kwargs.get("aliases", ()))
        register(name, *args, **kwargs)

    _core_options(register_own)
    training_options.register_all(register, own)
    training_options.register_legacy(register, own)


def _core_options(register):
    # model and tokenizer
    register("model_name_or_path", str, None, "Local folder or hub id of the base model (required).")
    register("tokenizer_name_or_path", str, None, "Tokenizer folder or hub id (default: the model's).")
    register("trust_remote_code", bool, False, "Run Python code that a model or tokenizer folder "
             "ships (auto_map in its config). Off unless set; fmtune never asks on stdin.")
    register("torch_dtype", str, "auto", "Weights dtype; auto = bfloat16 on a bf16-capable GPU, "
             "else float32.", choices=DTYPES)
    register("random_init_weights", bool, False, "Build the model from the config at "
             "model_name_or_path with random weights (seeded) instead of loading weights.")
    register("tokenizer_train_files", list, None, "Train a byte-level BPE tokenizer on these text "
             "files (with the tokenizers library) instead of loading one.")
    register("tokenizer_vocab_size", int, 512, "Vocabulary size for tokenizer_train_files.")
    register("use_flash_attn", bool, False, "Use flash attention (flash_attn_implementation; falls "
             "back to sdpa, logged, when its package or a GPU is missing).")
    register("flash_attn_implementation", str, "flash_attention_2", "The implementation "
             "use_flash_attn asks for (fms-hf-tuning's name): flash_attention_2, flash_attention_3, "
             "sdpa, eager, or a kernels hub repo (kernels-community/vllm-flash-attn3). Setting it "
             "turns use_flash_attn on.")
    register("attn_implementation", str, None, "Attention implementation to request.", choices=ATTN)
    # data
    register("training_data_path", str, None, "JSON/JSONL training data (required).")
    register("validation_data_path", str, None, "JSON/JSONL validation data.")
    register("dataset_text_field", str, None, "Train on this text column (whole sequence).")
    register("response_template", str, None, "With dataset_text_field: train only on what follows "
             "this string (\\n typed on the command line is a line break).", cli_unescape=True)
    register("data_formatter_template", str, None, "Render each record with {{field}} "
             "placeholders (\\n typed on the command line is a line break).", cli_unescape=True)
    register("max_seq_length", int, 1024, "Truncate examples to this many tokens.")
    # training
    register("output_dir", str, None, "Checkpoints, logs and (by default) the final model (required).")
    register("save_model_dir", str, None, "Where the final model and tokenizer go (default: output_dir).")
    register("num_train_epochs", float, 3.0, "Epochs to train.")
    register("max_steps", int, -1, "Optimizer steps to train; overrides num_train_epochs when > 0.")
    register("per_device_train_batch_size", int, 8, "Examples per device per step.")
    register("per_device_eval_batch_size", int, 8, "Examples per device per evaluation step.")
    register("gradient_accumulation_steps", int, 1, "Micro-batches per optimizer step.")
    register("total_train_batch_size", int, None, "Examples per optimizer step over all "
             "processes: fmtune picks per_device_train_batch_size and "
             "gradient_accumulation_steps so that processes x per-device x accumulation equals "
             "it exactly (an impossible combination is an error).")
    register("max_per_device_train_batch_size", int, None, "With total_train_batch_size: the "
             "largest per-device batch to use (default: per_device_train_batch_size's value). "
             "auto: the largest that fmtune plan predicts fits this device's memory "
             "(without total_train_batch_size it is the per-device batch).", words=("auto",))
    register("auto_batch_max_memory", float, None, "With max_per_device_train_batch_size auto: "
             "memory per process in GB (GiB) to fit the batch in, instead of the device's "
             "(GPU: 90% of its memory less 1 GiB; CPU: 85% of the RAM available to it).")
    register("learning_rate", float, 5e-5, "Peak learning rate.")
    register("lr_scheduler_type", str, "linear", "Learning-rate schedule.", choices=SCHEDULERS)
    register("warmup_ratio", float, 0.0, "Fraction of steps spent warming up.")
    register("warmup_steps", int, 0, "Warm-up steps (overrides warmup_ratio when > 0).")
    register("weight_decay", float, 0.0, "AdamW weight decay.")
    register("max_grad_norm", float, 1.0, "Gradient clipping norm.")
    register("optim", str, "adamw_torch", "Optimizer name (transformers' OptimizerNames).")
    register("logging_steps", float, 10, "Log every N steps (a float < 1 is a ratio of all steps).")
    register("save_strategy", str, "epoch", "When to write checkpoints.", choices=STRATEGIES)
    register("save_steps", float, 500, "Checkpoint every N steps with save_strategy=steps.")
    register("save_total_limit", int, None, "Keep at most this many checkpoints.")
    register("eval_strategy", str, "no", "When to evaluate on validation data.", choices=STRATEGIES,
             aliases=("evaluation_strategy",))
    register("eval_steps", float, None, "Evaluate every N steps with eval_strategy=steps.")
    register("gradient_checkpointing", bool, False, "Recompute activations to save memory.")
    register("seed", int, 42, "Random seed (model init, data order).")
    register("resume_from_checkpoint", str, "auto", "auto: resume from the latest checkpoint in "
             "output_dir if any; false: start over; or a checkpoint path.")
    register("use_cpu", bool, False, "Train on CPU even when a GPU is present.")
    register("stop_on_nonfinite_loss", bool, True, "Stop the run, without saving the final "
             "model, when a logged loss or gradient norm is NaN or infinite (exit code 3; the "
             "last checkpoint before it is kept). false: train on.")
    # fms-hf-tuning's tracker selection
    register("trackers", list, None, "Trackers to report to (fms-hf-tuning): each names a "
             "tracker plugin, which is activated when installed.")
    register("do_dataprocessing_only", bool, False, "Process the data, write it to output_dir "
             "as parquet shards (train_dataset/, validation_dataset/) and stop without "
             "training (fms-hf-tuning).")
    register("num_train_dataset_shards", int, 1, "Parquet shards of the processed training "
             "data with do_dataprocessing_only.")
    register("num_eval_dataset_shards", int, 1, "Parquet shards of the processed validation "
             "data with do_dataprocessing_only.")
    register("embedding_size_multiple_of", int, 1, "Resize the embeddings to a multiple of this "
             "many rows after the tokenizer grows (fms-hf-tuning; e.g. 64 for tensor cores).")
    register("cache_dir", str, None, "Where downloaded models and tokenizers are cached "
             "(default: the Hugging Face cache).")
    register("enable_reduce_loss_sum", bool, False, "fms-hf-tuning's sum loss reduction: "
             "transformers 5 already sums the loss over the tokens of every micro-batch and "
             "device and divides once (num_items_in_batch, average_tokens_across_devices), so "
             "it is accepted and changes nothing.")
    for name, instead in FMS_ACCELERATION.items():
        register(name, list, None, f"fms-acceleration's {name}: not part of fmtune (an error "
                 f"when set); {instead}")
    register("include_tokens_per_second", bool, False, "fms-hf-tuning's flag (a "
             "TrainingArguments field of transformers 4): fmtune always reports tokens/s "
             "(run_summary.json, the closing line), so it is accepted and changes nothing.")
    register("peft_method", str, None, "fms-hf-tuning's PEFT selector: lora, alora or pt "
             "activate the installed PEFT plugin; none (or unset) is full fine-tuning. The PEFT "
             "plugin takes this option over when active.", weak=True)
    register("experiment", str, None, "Experiment name the trackers file the run under "
             "(fms-hf-tuning; a tracker's own experiment option wins).")
    # multi-process (docs/distributed.md)
    register("num_processes", int, None, "Train with N processes: `fmtune train --num_processes N` "
             "re-runs itself under `accelerate launch` (DDP; on CPU over gloo). Under accelerate "
             "launch/torchrun it must equal the launcher's WORLD_SIZE (or stay unset).")
    register("accelerate_config", str, None, "An accelerate config file (e.g. "
             "examples/accelerate/fsdp.yaml) to re-run this command with through `accelerate "
             "launch`; ignored when already under a launcher.")


def _problems_for(config):
    problems = []
    for name in ("model_name_or_path", "output_dir"):
        if not config.get(name):
            problems.append(f"{name} is required (YAML key or --{name})")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_seq_length",
                 "num_train_dataset_shards", "num_eval_dataset_shards"):
        if config.get(name) is not None and config.get(name) < 1:
            problems.append(f"{name} must be >= 1, got {config.get(name)}")
    from fmtune.batching import problems as batch_problems

    problems.extend(batch_problems(config))
    if config.learning_rate is not None and not 0 <= config.learning_rate < float("inf"):
        problems.append(f"learning_rate must be a finite number >= 0, got {config.learning_rate}")
    if config.max_steps == 0 or config.max_steps < -1:
        problems.append(f"max_steps must be a positive number of steps (or -1: train "
                        f"num_train_epochs epochs), got {config.max_steps}")
    elif config.max_steps == -1 and not 0 < config.num_train_epochs < float("inf"):
        problems.append(f"num_train_epochs must be > 0 (or give max_steps), got "
                        f"{config.num_train_epochs}: nothing would be trained")
    for name in ("logging_steps", "save_steps", "eval_steps"):
        value = config.get(name)
        if value is not None and not 0 < value < float("inf"):
            problems.append(f"{name} must be > 0 (a float below 1 is a ratio of all steps), "
                            f"got {value}")
    if not 0 <= config.warmup_ratio < 1:
        problems.append(f"warmup_ratio must be in [0, 1), got {config.warmup_ratio}")
    if config.random_init_weights and config.model_name_or_path and os.path.isdir(
            config.model_name_or_path) and not os.path.isfile(
            os.path.join(config.model_name_or_path, "config.json")):
        problems.append(f"random_init_weights: {config.model_name_or_path} has no config.json")
    if config.get("num_processes") is not None and config.num_processes < 1:
        problems.append(f"num_processes must be >= 1, got {config.num_processes}")
    if config.get("accelerate_config") and not os.path.isfile(config.accelerate_config):
        problems.append(f"accelerate_config: {config.accelerate_config} not found")
    for path in (config.tokenizer_train_files or []):
        if not os.path.isfile(path):
            problems.append(f"tokenizer_train_files: {path} not found")
    problems.extend(_attn_problems(config))
    problems.extend(_path_problems(config))
    for name, instead in FMS_ACCELERATION.items():
        if config.get(name):
            problems.append(f"{name}: fms-acceleration's {name} is not part of fmtune; "
                            f"{instead}")
    for tracker in config.get("trackers") or []:
        if tracker not in config.plugins and tracker != "none":
            from fmtune.plugins import installed

            problems.append(f"trackers: no installed tracker plugin named {tracker!r} "
                            f"(installed plugins: {', '.join(installed()) or 'none'}; install "
                            "the fmtune plugin that provides it)")
    rfc = str(config.resume_from_checkpoint).lower()
    if rfc not in ("auto", "true", "false", "none") and not os.path.isdir(config.resume_from_checkpoint):
        problems.append(f"resume_from_checkpoint: {config.resume_from_checkpoint} is not a folder "
                        "(use auto, false, or a checkpoint path)")
    elif rfc not in ("auto", "true", "false", "none"):
        from fmtune.pipeline import checkpoint_problem

        why = checkpoint_problem(config.resume_from_checkpoint)
        if why:
            problems.append(f"resume_from_checkpoint: {config.resume_from_checkpoint} is not a "
                            f"checkpoint ({why}); give a checkpoint-N folder a run saved, or "
                            "auto, or false")
    problems.extend(_number_problems(config))
    problems.extend(_choice_problems(config))
    return problems


def _finite(low: float, high: float = math.inf):
    """A test that a number lies in [low, high) (NaN never does)."""
    return lambda v: low <= v < high


# options transformers (or torch, or the tokenizer trainer) would refuse with a traceback after
# the run started, or take silently with another meaning: name -> (test, what it must be)
NUMBER_RULES = {
    "seed": (_finite(0, 2**32), "an integer in [0, 2**32 - 1]"),
    "data_seed": (_finite(0, 2**32), "an integer in [0, 2**32 - 1]"),
    "warmup_steps": (_finite(0), ">= 0"),
    "weight_decay": (_finite(0), "a finite number >= 0"),
    "max_grad_norm": (_finite(0), "a finite number >= 0 (0: no clipping)"),
    "adam_beta1": (_finite(0, 1), "in [0, 1)"),
    "adam_beta2": (_finite(0, 1), "in [0, 1)"),
    "adam_epsilon": (_finite(0), "a finite number >= 0"),
    "label_smoothing_factor": (_finite(0, 1), "in [0, 1)"),
    "save_total_limit": (_finite(1), ">= 1 (unset: keep every checkpoint; --save_strategy no "
                                     "writes none)"),
    "dataloader_num_workers": (_finite(0), ">= 0"),
    "eval_accumulation_steps": (_finite(1), ">= 1"),
    "per_device_eval_batch_size": (_finite(1), ">= 1"),
    "max_per_device_train_batch_size": (_finite(1), ">= 1 or auto"),
    "auto_batch_max_memory": (lambda v: math.isfinite(v) and v > 0, "a number of GB > 0"),
    "embedding_size_multiple_of": (_finite(1), ">= 1"),
    "tokenizer_vocab_size": (_finite(258), "at least 258 (the 256 byte symbols, eos and pad)"),
}


def _number_problems(config) -> list[str]:
    problems = []
    for name, (ok, what) in NUMBER_RULES.items():
        value = config.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
            problems.append(f"{name} must be {what}, got {value}")
    return problems


def _choice_problems(config) -> list[str]:
    """Values transformers checks only when the trainer is built; checked here, before anything
    loads, against the installed transformers' own lists."""
    from fmtune.config import suggest

    problems = []
    optimizers = _training_choices("optim")
    if optimizers and config.get("optim") and config.optim not in optimizers:
        problems.append(f"optim {config.optim!r} is not an optimizer of the installed "
                        f"transformers{suggest(config.optim, optimizers)}; one of "
                        f"{', '.join(optimizers)}")
    integrations = _report_integrations()
    wanted = config.get("report_to")
    names = [] if wanted is None else [wanted] if isinstance(wanted, str) else list(wanted)
    names = [n.strip() for item in names for n in str(item).split(",") if n.strip()]
    if integrations:
        for name in names:
            if name not in integrations and name not in ("all", "none"):
                problems.append(f"report_to {name!r} is not a reporting integration of the "
                                f"installed transformers{suggest(name, integrations)}; one of "
                                f"all, none, {', '.join(integrations)} (fmtune's own trackers "
                                "are --trackers)")
    problems.extend(_peft_method_problems(config))
    return problems


def _training_choices(name: str) -> list[str]:
    from fmtune import training_options

    for row in training_options.table():
        if row["name"] == name:
            return [str(c) for c in row["choices"] or []]
    return []


@functools.cache
def _report_integrations() -> tuple[str, ...]:
    """transformers' ``INTEGRATION_TO_CALLBACK`` keys (what ``report_to`` accepts besides all and
    none), read from its source: importing the module imports torch. Empty (no check) when it
    cannot be read."""
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return ()
    source = os.path.join(list(spec.submodule_search_locations)[0], "integrations",
                          "integration_utils.py")
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return ()
    found = re.search(r"^INTEGRATION_TO_CALLBACK\s*=\s*\{(.*?)^\}", text, re.S | re.M)
    return tuple(re.findall(r'^\s*"([\w.-]+)"\s*:', found.group(1), re.M)) if found else ()


def _peft_method_problems(config) -> list[str]:
    """``peft_method`` while no PEFT plugin is active (the core's own option): a value that no
    installed plugin implements would otherwise train in full, silently."""
    from fmtune.plugins import implications

    value = config.get("peft_method")
    if value in (None, "", "none"):
        return []
    owners = {spec.plugin: spec.value for spec in implications() if spec.option == "peft_method"}
    if any(plugin in config.plugins for plugin in owners):
        return []  # the active PEFT plugin owns the option and checks it
    known = sorted({v for v in owners.values() if v})
    return [f"peft_method {value!r}: no installed plugin provides it (installed PEFT methods: "
            f"{', '.join(known) or 'none'}; none is full fine-tuning)"]


DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".csv", ".tsv")


def _path_problems(config) -> list[str]:
    """Paths checked before anything loads (a typo used to surface after minutes of work)."""
    problems = []
    from fmtune.files import folder_problem

    refused = None
    for name in ("output_dir", "save_model_dir"):
        path = config.get(name)
        why = folder_problem(path) if path and path != os.devnull else None  # previews: devnull
        if why and refused and os.path.abspath(path).startswith(refused + os.sep):
            continue  # inside the output_dir just refused: that problem says it
        if why:
            problems.append(f"{name} {path}: {why}")
            refused = os.path.abspath(path)
    from fmtune.hub import looks_local

    model = config.model_name_or_path
    if model and not os.path.exists(model) and looks_local(model):
        problems.append(f"model_name_or_path {model}: no such folder (a hub id is written "
                        "org/name)")
    for name in ("training_data_path", "validation_data_path"):
        path = config.get(name)
        for part in (path.split(",") if isinstance(path, str) else []):  # a list of files too
            part = part.strip()
            if (part.lower().endswith(DATA_SUFFIXES) and not any(c in part for c in "*?[")
                    and not os.path.exists(part)):
                problems.append(f"{name} {part}: no such file")
        if isinstance(path, str) and os.path.isdir(path) and config.get("output_dir"):
            data, out = os.path.realpath(path), os.path.realpath(config.output_dir)
            if out == data or out.startswith(data + os.sep):
                problems.append(f"output_dir {config.output_dir} is inside {name} {path}: the "
                                "next run would read its files as data; choose a folder outside")
    return problems


_HUB_KERNEL = re.compile(r"[\w.-]+/[\w.-]+(@[\w.-]+)?(:[\w.-]+)?")


def _attn_problems(config) -> list[str]:
    from fmtune.models import flash_requested

    flash = config.get("flash_attn_implementation")
    if flash is None:
        return []
    problems = []
    if flash not in (*ATTN, "flash_attention_3") and not _HUB_KERNEL.fullmatch(flash):
        problems.append(f"flash_attn_implementation must be flash_attention_2, flash_attention_3, "
                        f"sdpa, eager or a kernels hub repo (org/name); got {flash!r}")
    explicit = config.source("flash_attn_implementation") != "default"
    if explicit and config.source("use_flash_attn") != "default" and not config.use_flash_attn:
        problems.append(f"flash_attn_implementation {flash} with use_flash_attn false: drop one "
                        "of them")
    wanted = flash_requested(config)
    if wanted and config.attn_implementation and config.attn_implementation != wanted:
        problems.append(f"attn_implementation {config.attn_implementation} conflicts with "
                        f"use_flash_attn/flash_attn_implementation ({wanted}): set one of them")
    return problems


@hookimpl(trylast=True)
def validate_config(config):
    from fmtune import training_options

    # first: the transformers-4 names become the options the checks below read
    return training_options.translate_legacy(config) + _problems_for(config)
