"""``fmtune plan``: will a run fit, and how fast will it go? (docs/plan.md)

For a run config (model, PEFT method, dtype, sequence lengths from the data, batch, processes,
FSDP, gradient checkpointing) predict the peak memory of one training process, the tokens/s,
and the largest per-device batch that fits a given memory.

* Parameters are counted exactly: the model is built on torch's ``meta`` device from its
  ``config.json`` (no weights read) and wrapped by the active PEFT plugin's own ``wrap_peft``
  hook, so LoRA/QLoRA count exactly the adapter parameters the run will train, in the dtype
  the run will train them in.
* Memory (bytes per process) = weights (QLoRA: 4-bit base linears) + gradients and optimizer
  states of the trainable parameters + saved activations (tokens x per-layer tensors, a
  Llama-style decoder: fewer with a frozen base, one layer input per layer with gradient
  checkpointing) + logits/loss buffers; FULL_SHARD FSDP divides weights/gradients/states by
  the processes; DDP adds a gradient-sized bucket copy. On CPU the prediction is the process
  RSS and adds the process baseline (Python + torch + transformers + the run's own setup),
  measured once per environment by a one-step run of a tiny model (cached). On a GPU it is
  ``torch.cuda.max_memory_allocated`` (the CUDA context is not in it).
* tokens/s = achieved FLOP/s / FLOPs per token (6N for full training, 4N + 6N_adapter for a
  frozen base, + 2N with gradient checkpointing, + attention); achieved FLOP/s = the device's
  peak (``--tflops``; a GPU table; on CPU a short matmul measurement) x an efficiency
  (``--mfu``), or calibrated with ``--probe``: a few real steps of ``fmtune train``.

Importing this module does not import torch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import CommandParser, ConfigError

log = logging.getLogger("fmtune")

GiB = 1024 ** 3
MiB = 1024 ** 2
# bf16 dense peak TFLOP/s by GPU name (substring of torch.cuda.get_device_name), vendors' data
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0,
                   "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "A10": 125.0,
                   "L4": 121.0, "MI300X": 1307.0, "MI250": 362.0}
DEFAULT_MFU = {"cuda": 0.40, "cpu": 0.50}
# optimizer state bytes per trainable parameter as a multiple of the parameter's element size
# (torch keeps AdamW's exp_avg/exp_avg_sq in the parameter's dtype), or fixed bytes (8-bit)
OPTIMIZER_STATES = {"adamw": ("x", 2), "adam": ("x", 2), "lion": ("x", 1), "sgd": ("x", 0),
                    "adagrad": ("x", 1), "rmsprop": ("x", 1), "adafactor": ("x", 0.05)}
BNB_4BIT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # nf4 + double-quantized absmax (blocksize 64)
BNB_4BIT_PLAIN = 0.5 + 4 / 64                    # nf4 + fp32 absmax per 64
BASELINE_FILE = "plan-baseline.json"
GPU_BASELINE_BYTES = 0  # max_memory_allocated has no CUDA context in it


@dataclass
class Shape:
    """What the memory and FLOP formulas need from the model config."""
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @property
    def kv_dim(self) -> int:
        return self.hidden // max(self.heads, 1) * self.kv_heads


@dataclass
class Counts:
    """Exact parameter counts of the model as the run wraps it."""
    total: int = 0
    trainable: int = 0
    trainable_bytes: int = 0       # in the dtype they train in (PEFT adapters: often fp32)
    frozen_bytes: int = 0          # as loaded (QLoRA: the quantized linears at 4 bits)
    matmul_params: int = 0         # non-embedding weights that take part in matmuls (FLOPs)
    layer_bytes: int = 0           # one decoder layer's weights (FSDP gathers one at a time)
    lora_inputs_per_layer: int = 0  # sum of in_features over one layer's LoRA-wrapped linears
    quantized: int = 0             # parameters stored at 4 bits


@dataclass
class Plan:
    device: str
    dtype: str
    method: str
    world_size: int
    fsdp: bool
    gradient_checkpointing: bool
    per_device_train_batch_size: int
    seq_len: int
    mean_seq_len: float
    seq_len_source: str
    params: dict[str, int]
    memory: dict[str, int]
    peak_bytes: int
    flops_per_token: float
    device_tflops: float
    mfu: float
    tokens_per_second: float
    padding: float = 1.0
    largest_batch: int | None = None
    max_memory_bytes: int | None = None
    probe: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- the model


def model_config(path: str, trust_remote_code: bool = False):
    """The transformers config of ``path`` (a folder or a hub id already in the local cache)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True,
                                          trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a missing file, a bad json, an unknown model type
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"model_name_or_path {path}: cannot read its config.json here "
                          f"({first[:200]}); pass --model-config FOLDER holding a copy") from None


def shape_of(cfg) -> Shape:
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    def first(*names, default=None):
        for n in names:
            v = getattr(text, n, None)
            if v is not None:
                return v
        if default is None:
            raise ConfigError(f"model config ({cfg.model_type}): none of {names} is set; "
                              "fmtune plan knows decoder-only transformers")
        return default

    hidden = int(first("hidden_size", "n_embd", "d_model"))
    heads = int(first("num_attention_heads", "n_head"))
    return Shape(model_type=cfg.model_type, hidden=hidden,
                 layers=int(first("num_hidden_layers", "n_layer")), heads=heads,
                 kv_heads=int(first("num_key_value_heads", default=heads)),
                 intermediate=int(first("intermediate_size", "n_inner", "ffn_dim",
                                        default=4 * hidden)),
                 vocab=int(first("vocab_size")))


def meta_model(cfg, dtype, trust_remote_code: bool = False):
    """The model skeleton on the meta device: exact parameter shapes, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype,
                                                trust_remote_code=trust_remote_code)


def _element_size(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype, device="meta").element_size()


def count(model, quantize_4bit: bool, double_quant: bool = True) -> Counts:
    """Parameter counts and bytes of a (PEFT-wrapped) meta model. With ``quantize_4bit`` the
    frozen weights of ``nn.Linear`` modules other than the output head are stored at 4 bits
    (bitsandbytes' nf4/fp4, as transformers' BitsAndBytesConfig quantizes them)."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out_head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    in_head = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    embedding_ids = {id(p) for m in (out_head, in_head) if m is not None for p in m.parameters()}
    linear_weights = {id(m.weight) for m in base.modules()
                      if isinstance(m, torch.nn.Linear) and m is not out_head
                      and "lora_" not in type(m).__name__}
    q_bytes = BNB_4BIT_BYTES if double_quant else BNB_4BIT_PLAIN
    c = Counts()
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied embeddings count once
            continue
        seen.add(id(p))
        n = p.numel()
        c.total += n
        if p.requires_grad:
            c.trainable += n
            c.trainable_bytes += n * p.element_size()
        elif quantize_4bit and id(p) in linear_weights and ".lora_" not in name:
            c.quantized += n
            c.frozen_bytes += math.ceil(n * q_bytes)
        else:
            c.frozen_bytes += n * p.element_size()
        if id(p) not in embedding_ids and p.dim() >= 2:
            c.matmul_params += n
    if out_head is not None and id(out_head.weight) in embedding_ids:
        c.matmul_params += out_head.weight.numel()  # the LM head is a matmul, tied or not
    layers = _decoder_layers(base)
    if layers:
        first = layers[0]
        c.layer_bytes = sum(p.numel() * p.element_size() for p in first.parameters())
        c.lora_inputs_per_layer = sum(
            int(getattr(getattr(m, "base_layer", None), "in_features", 0) or 0)
            for m in first.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    return c


def _decoder_layers(base) -> list:
    import torch

    names = set(getattr(base, "_no_split_modules", None) or [])
    found = [m for m in base.modules() if type(m).__name__ in names]
    if found:
        return found
    lists = [m for m in base.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


# ------------------------------------------------------------- memory, FLOPs


def activation_bytes(shape: Shape, counts: Counts, tokens: int, e: int, *, frozen_base: bool,
                     checkpointing: bool, lora_dropout: bool) -> dict[str, int]:
    """Saved activations of one forward/backward over ``tokens`` (= batch x padded length),
    element size ``e``. Per decoder layer and token (Llama-style: RMSNorm, attention through
    sdpa/flash without the s x s matrix, gated MLP), what autograd keeps for backward:
    9h + 2kv + 4i elements (each norm's input, normalized and scaled output; q/k/v after
    RoPE, the attention output and its reshaped copy; gate, up, act, act*up). A frozen base
    keeps as much (measured: the inputs of frozen linears are saved all the same), plus each
    LoRA input (its dropout copy and mask) when lora_dropout > 0. Gradient checkpointing
    keeps one layer input per layer and recomputes one layer at a time."""
    h, i, kv, L = shape.hidden, shape.intermediate, shape.kv_dim, shape.layers
    per_layer_bytes = (9 * h + 2 * kv + 4 * i) * e
    if frozen_base and lora_dropout:
        per_layer_bytes += counts.lora_inputs_per_layer * (e + 1)
    if checkpointing:
        saved = tokens * (L * h * e + per_layer_bytes)
    else:
        saved = tokens * L * per_layer_bytes
    final = tokens * 2 * h * e  # final norm + LM head input
    # logits (dtype) + their fp32 copy for the loss + log-softmax saved + its gradient
    logits = tokens * shape.vocab * (e + 4 + 4 + 4)
    # gradient buffers of the widest activations alive while backward walks a layer
    workspace = tokens * 2 * max(h, i) * e
    return {"activations": saved + final, "logits_and_loss": logits,
            "backward_workspace": workspace}


def optimizer_bytes(optim: str, counts: Counts) -> int:
    name = (optim or "adamw_torch").lower()
    if "8bit" in name:
        return counts.trainable * 2
    for key, (_, factor) in OPTIMIZER_STATES.items():
        if name.startswith(key):
            return int(counts.trainable_bytes * factor)
    return counts.trainable_bytes * 2  # unknown: as AdamW


def flops_per_token(shape: Shape, counts: Counts, seq_len: float, *, frozen_base: bool,
                    checkpointing: bool) -> float:
    """Training FLOPs per token: matmuls (forward 2N; backward 4N with weight gradients, 2N
    for a frozen base plus 6 per adapter parameter), causal attention (2*L*s*h forward, 3x
    with backward), one more forward with gradient checkpointing."""
    n = counts.matmul_params - (counts.trainable if frozen_base else 0)
    attention_fwd = 2.0 * shape.layers * seq_len * shape.hidden
    forward = 2.0 * n + attention_fwd
    if frozen_base:
        total = 2.0 * n + 2.0 * n + 3 * attention_fwd + 6.0 * counts.trainable
    else:
        total = 6.0 * n + 3 * attention_fwd
    return total + (forward if checkpointing else 0.0)


def cpu_matmul_tflops(dtype, seconds: float = 0.5) -> float:
    """Achieved TFLOP/s of a 1024-square matmul on this CPU in ``dtype`` (all threads)."""
    import time

    import torch

    a = torch.randn(1024, 1024).to(dtype)
    b = torch.randn(1024, 1024).to(dtype)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 1024 ** 3 * n / (time.perf_counter() - t0) / 1e12


def gpu_peak_tflops() -> tuple[float | None, str]:
    import torch

    if not torch.cuda.is_available():
        return None, "no GPU"
    name = torch.cuda.get_device_name()
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return GPU_PEAK_TFLOPS[key], name
    return None, name


# ------------------------------------------------------------ the data


def sequence_lengths(config, pm, tokenizer) -> tuple[list[int], str]:
    """Token lengths of the training records as the run prepares them (the run's own
    tokenizer and data hooks, truncation included); ([], why) when the data is not here."""
    path = config.get("training_data_path")
    if not path or not os.path.exists(str(path).split(",")[0]):
        return [], f"training_data_path {path!r} is not on this machine"
    train_ds, _ = pm.hook.prepare_data(config=config, tokenizer=tokenizer, pm=pm)
    if train_ds is None or "input_ids" not in getattr(train_ds, "column_names", []):
        return [], "the prepared data has no input_ids"
    return [len(x) for x in train_ds["input_ids"]], f"{len(train_ds)} records of {path}"


# --------------------------------------------------------------- baseline


def _baseline_key(plugins: list[str]) -> str:
    import platform

    import torch
    import transformers

    from . import __version__

    return "|".join([sys.executable, platform.machine(), torch.__version__,
                     transformers.__version__, __version__, ",".join(sorted(plugins))])


def _cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "fmtune")


def measure_baseline(plugins: list[str], extra: list[str] = ()) -> float:
    """Peak RSS (MB) of a one-step ``fmtune train`` of a tiny random Llama (0.5 MB of
    weights) with ``plugins``: the Python, torch, transformers, data and trainer setup that
    every CPU run carries whatever its model. Runs in a subprocess."""
    from .testing import DEMO_RECORDS, build_tiny_model, write_jsonl

    with tempfile.TemporaryDirectory(prefix="fmtune-baseline-") as d:
        texts = [r["input"] + " " + r["output"] for r in DEMO_RECORDS]
        model = build_tiny_model(os.path.join(d, "model"), texts)
        data = write_jsonl(os.path.join(d, "train.jsonl"), DEMO_RECORDS)
        out = os.path.join(d, "out")
        cmd = [sys.executable, "-m", "fmtune.cli", "train", "--model_name_or_path", model,
               "--training_data_path", data, "--output_dir", out, "--max_steps", "1",
               "--per_device_train_batch_size", "2", "--save_strategy", "no",
               "--logging_steps", "1", "--use_cpu", "true", *extra]
        if plugins:
            cmd += ["--plugins", ",".join(plugins)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
        summary = os.path.join(out, "run_summary.json")
        if proc.returncode != 0 or not os.path.exists(summary):
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConfigError(f"measuring the CPU baseline failed: {tail}")
        with open(summary, encoding="utf-8") as f:
            return float(json.load(f)["peak_rss_mb"])


def cpu_baseline_mb(plugins: list[str], extra: list[str] = ()) -> tuple[float, str]:
    """The measured CPU baseline for this environment and plugin set (cached)."""
    key = _baseline_key(plugins)
    path = os.path.join(_cache_dir(), BASELINE_FILE)
    cache: dict[str, float] = {}
    try:
        with open(path, encoding="utf-8") as f:
            cache = json.load(f)
    except (OSError, ValueError):
        pass
    if key in cache:
        return float(cache[key]), f"measured, cached in {path}"
    log.info("fmtune plan: measuring the CPU baseline once (a one-step run of a tiny model)")
    value = measure_baseline(plugins, extra)
    cache[key] = value
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cache, f, indent=1)
    except OSError:
        pass
    return value, "measured now"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        env.pop(name, None)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


# ------------------------------------------------------------------ planning


def method_of(pm) -> str:
    names = {n for n, _ in pm.list_name_plugin()}
    for method in ("qlora", "alora", "lora", "prompt_tuning"):
        if method in names:
            return method
    return "full"


def predict(config, pm, *, device: str, world_size: int = 1, fsdp: bool = False,
            seq_lens: list[int] | None = None, seq_len: int | None = None,
            batch: int | None = None, baseline_bytes: int = 0, model_cfg=None,
            tflops: float | None = None, mfu: float | None = None, tokenizer=None) -> Plan:
    """The plan for ``config`` (its plugins active in ``pm``) on ``device`` ("cpu"/"cuda")."""
    import torch

    from .models import resolve_dtype

    trust = bool(config.get("trust_remote_code"))
    cfg = model_cfg or model_config(config.model_name_or_path, trust)
    shape = shape_of(cfg)
    if config.torch_dtype == "auto":
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    else:
        dtype = resolve_dtype(config.torch_dtype)
    method = method_of(pm)
    model = meta_model(cfg, dtype, trust)
    if tokenizer is None:
        tokenizer = pm.hook.load_tokenizer(config=config)
    wrapped = pm.hook.wrap_peft(model=model, config=config, tokenizer=tokenizer) or model
    quantized = method == "qlora" and not config.get("load_in_8bit")
    counts = count(wrapped, quantize_4bit=quantized,
                   double_quant=bool(config.get("bnb_4bit_use_double_quant", True)))
    frozen_base = counts.trainable < counts.total
    e = _element_size(dtype)
    if method == "qlora":  # compute dtype of the dequantized matmuls
        compute = config.get("bnb_4bit_compute_dtype") or "auto"
        e = _element_size(dtype if compute == "auto" else getattr(torch, compute))
    batch = int(batch or config.per_device_train_batch_size)
    checkpointing = bool(config.get("gradient_checkpointing"))
    max_len = int(config.get("max_seq_length") or cfg.max_position_embeddings)
    notes: list[str] = []
    if seq_len:
        lens, source = [seq_len], "--seq-len"
    elif seq_lens:
        lens, source = seq_lens, "the data"
    else:
        lens, source = [max_len], "max_seq_length (the data is not read)"
    longest = min(max(lens), max_len)
    mean = min(sum(lens) / len(lens), max_len)

    shard = world_size if fsdp else 1
    grads = counts.trainable_bytes
    memory = {
        "weights": (counts.frozen_bytes + counts.trainable_bytes) // shard,
        "gradients": grads // shard,
        "optimizer_states": optimizer_bytes(config.get("optim"), counts) // shard,
    }
    if fsdp and shard > 1:
        memory["fsdp_gathered_layers"] = 2 * counts.layer_bytes  # current + prefetched layer
    elif world_size > 1:
        memory["ddp_gradient_buckets"] = grads
    memory.update(activation_bytes(shape, counts, batch * longest, e, frozen_base=frozen_base,
                                   checkpointing=checkpointing,
                                   lora_dropout=float(config.get("lora_dropout") or 0) > 0))
    if baseline_bytes:
        memory["process_baseline"] = int(baseline_bytes)
    peak = sum(memory.values())

    fpt = flops_per_token(shape, counts, mean, frozen_base=frozen_base,
                          checkpointing=checkpointing)
    if tflops is None:
        if device == "cuda":
            tflops, name = gpu_peak_tflops()
            if tflops is None:
                tflops = 100.0
                notes.append(f"GPU {name}: peak TFLOP/s unknown, 100 assumed (--tflops)")
        else:
            tflops = cpu_matmul_tflops(dtype)
            notes.append(f"CPU: {tflops * 1e3:.1f} GFLOP/s measured on a {dtype} matmul")
    mfu = mfu if mfu is not None else DEFAULT_MFU.get(device, 0.4)
    # the non-padding share of the computed tokens (batches are padded to their longest)
    padding = mean / max(longest, 1) if batch > 1 else 1.0
    tokens_per_second = tflops * 1e12 * mfu / fpt * padding
    if batch > 1 and longest > mean:
        notes.append("tokens/s counts non-padding tokens: batches are padded to their longest "
                     "record (taken as the longest of the data)")
    return Plan(device=device, dtype=str(dtype).removeprefix("torch."), method=method,
                world_size=world_size, fsdp=fsdp, gradient_checkpointing=checkpointing,
                per_device_train_batch_size=batch, seq_len=longest, mean_seq_len=round(mean, 1),
                seq_len_source=source,
                params={"total": counts.total, "trainable": counts.trainable,
                        "quantized_4bit": counts.quantized,
                        "matmul": counts.matmul_params},
                memory={k: int(v) for k, v in memory.items()}, peak_bytes=int(peak),
                flops_per_token=fpt, device_tflops=tflops, mfu=mfu, padding=padding,
                tokens_per_second=tokens_per_second * world_size, notes=notes)


def largest_batch(make_plan, max_bytes: int, limit: int = 1 << 16) -> int:
    """The largest per-device batch whose predicted peak fits ``max_bytes`` (0: none);
    the peak is linear in the batch: two predictions give it."""
    p1, p2 = make_plan(1).peak_bytes, make_plan(2).peak_bytes
    per_sample = p2 - p1
    fixed = p1 - per_sample
    if p1 > max_bytes:
        return 0
    if per_sample <= 0:
        return limit
    return int(min(limit, (max_bytes - fixed) // per_sample))


# ------------------------------------------- max_per_device_train_batch_size auto

GPU_HEADROOM = (0.90, 1 * GiB)  # fraction of the device's memory, less the CUDA context's room
CPU_HEADROOM = 0.85             # fraction of the RAM available to the process


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
        return int(text) if text.isdigit() else None  # "max": no limit
    except (OSError, ValueError):
        return None


def available_ram() -> tuple[int, str]:
    """Bytes of RAM this machine (or its container) can still give: MemAvailable of
    /proc/meminfo (psutil where there is none), less where the cgroup's memory limit is
    nearer (Kubernetes, Docker: meminfo shows the host's)."""
    avail, source = None, ""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail, source = int(line.split()[1]) * 1024, "MemAvailable"
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            import psutil

            avail, source = int(psutil.virtual_memory().available), "psutil"
        except ImportError:
            raise ConfigError("max_per_device_train_batch_size auto: cannot read the available "
                              "RAM here (no /proc/meminfo, no psutil); give "
                              "auto_batch_max_memory GB") from None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < (1 << 60):
            if limit - usage < avail:
                avail, source = max(0, limit - usage), "the cgroup memory limit"
            break
    return avail, source


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory_budget(device: str, local_processes: int = 1,
                  max_memory_gb: float | None = None) -> tuple[int, str]:
    """(bytes, why) one training process may use, for ``max_per_device_train_batch_size auto``:
    ``max_memory_gb`` (GiB) when given; on a GPU 90 % of its memory less 1 GiB (the plan
    predicts max_memory_allocated: the CUDA context and the allocator's reserve are not in
    it); on CPU 85 % of (the RAM available, shared by this machine's processes, + what this
    process holds already: the plan's CPU prediction is the whole process's peak RSS)."""
    if max_memory_gb is not None:
        return int(max_memory_gb * GiB), f"auto_batch_max_memory {max_memory_gb:g} GiB"
    if device == "cuda":
        import torch

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        budget = int(props.total_memory * GPU_HEADROOM[0] - GPU_HEADROOM[1])
        return budget, (f"{_gb(budget)} of {props.name}'s {_gb(props.total_memory)} "
                        f"(90% less 1 GiB for the CUDA context)")
    avail, source = available_ram()
    share = avail // max(local_processes, 1)
    rss = _rss_bytes()
    budget = int((share + rss) * CPU_HEADROOM)
    shared = f", shared by {local_processes} processes" if local_processes > 1 else ""
    return budget, (f"{_gb(budget)} of RAM (85% of {_gb(avail)} available ({source}){shared}, "
                    f"+ this process's {_gb(rss)})")


def _min_over_ranks(value: int) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return min(values)


def _from_rank0(value: Any) -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def fit_batch(config, pm, tokenizer, train_dataset, args) -> dict[str, Any]:
    """The largest per-device batch whose predicted peak fits this device's memory
    (:func:`memory_budget`), for ``max_per_device_train_batch_size auto``: the plan of
    ``fmtune plan --max-memory`` with the run's own config, plugins, tokenizer and prepared
    data (its sequence lengths), on the run's device and processes. Every process takes the
    smallest budget of all processes, and rank 0's plan (the same for all). At most the
    examples per process (a bigger batch has nothing to fill it)."""
    from . import distributed

    device = getattr(getattr(args, "device", None), "type", "cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"max_per_device_train_batch_size auto: fmtune plan models CPU and "
                          f"CUDA memory, not {device}; give the cap as a number")
    world = int(getattr(args, "world_size", 1) or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or world)
    budget, why = memory_budget(device, local, config.get("auto_batch_max_memory"))
    smallest = _min_over_ranks(budget)
    if smallest < budget:
        budget, why = smallest, f"{_gb(smallest)} (the smallest of the processes' budgets)"
    result: dict[str, Any] | None = None
    if int(getattr(args, "process_index", 0) or 0) == 0:
        ids = (train_dataset["input_ids"] if "input_ids" in
               (getattr(train_dataset, "column_names", None) or []) else [])
        lens = [len(x) for x in ids]
        baseline, note = 0, "GPU: max_memory_allocated"
        if device == "cpu":
            mb, how = cpu_baseline_mb(list(config.plugins))
            baseline, note = int(mb * MiB), f"CPU process baseline {mb:.0f} MB ({how})"
        cfg = model_config(config.model_name_or_path, bool(config.get("trust_remote_code")))

        def make(batch):
            return predict(config, pm, device=device, world_size=world,
                           fsdp=distributed.fsdp_enabled(), seq_lens=lens, batch=batch,
                           baseline_bytes=baseline, model_cfg=cfg, tflops=1.0, mfu=0.5,
                           tokenizer=tokenizer)

        p1, p2 = make(1), make(2)
        cap = max(1, -(-len(lens) // world)) if lens else 1 << 16
        best = largest_batch(make, budget, limit=cap)
        result = {"largest_batch": best, "capped_by_examples": best == cap,
                  "memory_budget_mb": round(budget / MiB, 1), "budget": why,
                  "device": device, "seq_len": p1.seq_len, "seq_len_source": p1.seq_len_source,
                  "peak_at_1_mb": round(p1.peak_bytes / MiB, 1),
                  "per_example_mb": round((p2.peak_bytes - p1.peak_bytes) / MiB, 3),
                  "baseline": note, "examples_per_process_cap": cap}
    return _from_rank0(result)


# ------------------------------------------------------------------- probe


def probe(train_argv: list[str], steps: int = 3) -> dict[str, Any]:
    """Run ``fmtune train`` (``train_argv``: the run's config and flags) for ``steps`` steps in
    a subprocess, without checkpoints or evaluation, into a temporary output_dir; returns
    its run_summary.json (peak_rss_mb, peak_gpu_memory_mb, tokens_per_second, ...)."""
    with tempfile.TemporaryDirectory(prefix="fmtune-probe-") as out:
        cmd = [sys.executable, "-m", "fmtune.cli", "train", *train_argv,
               "--output_dir", out, "--max_steps", str(steps), "--save_strategy", "no",
               "--eval_strategy", "no", "--logging_steps", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
        path = os.path.join(out, "run_summary.json")
        if proc.returncode != 0 or not os.path.exists(path):
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConfigError(f"--probe: fmtune train exited {proc.returncode}: {tail}")
        with open(path, encoding="utf-8") as f:
            return json.load(f)


# ------------------------------------------------------------------ command


def _gb(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def render(plan: Plan) -> str:
    p = plan
    lines = [f"fmtune plan: {p.method} on {p.device} ({p.dtype}), {p.world_size} process(es)"
             f"{', FSDP full shard' if p.fsdp else ''}"
             f"{', gradient checkpointing' if p.gradient_checkpointing else ''}",
             f"  parameters: {p.params['total']:,} total, {p.params['trainable']:,} trainable"
             + (f", {p.params['quantized_4bit']:,} at 4 bits" if p.params["quantized_4bit"] else ""),
             f"  batch {p.per_device_train_batch_size} per device, sequence length "
             f"{p.seq_len} longest / {p.mean_seq_len} mean (from {p.seq_len_source})",
             "  memory per process:"]
    for k, v in p.memory.items():
        lines.append(f"    {k.replace('_', ' '):<22} {_gb(v):>11}")
    what = "peak RSS" if p.device == "cpu" else "peak torch.cuda.max_memory_allocated"
    lines.append(f"    {'= ' + what:<22} {_gb(p.peak_bytes):>11}")
    lines.append(f"  throughput: {p.tokens_per_second:,.0f} tokens/s "
                 f"({p.flops_per_token / 1e9:.3f} GFLOP/token, {p.device_tflops:.4g} TFLOP/s "
                 f"peak x {p.mfu:.2f} efficiency)")
    if p.max_memory_bytes is not None:
        fits = p.peak_bytes <= p.max_memory_bytes
        lines.append(f"  fits {_gb(p.max_memory_bytes)}: {'yes' if fits else 'NO'}; largest "
                     f"per-device batch that fits: {p.largest_batch}")
    if p.probe:
        lines.append(f"  probe ({p.probe['steps']} steps): measured {p.probe['measured']}, "
                     f"predicted {_gb(p.peak_bytes)} ({p.probe['memory_error_pct']:+.1f}%); "
                     f"{p.probe['tokens_per_second']:,.0f} tokens/s measured -> efficiency "
                     f"{p.mfu:.3f} (used above)")
    for n in p.notes:
        lines.append(f"  note: {n}")
    return "\n".join(lines)


def plan_parser() -> CommandParser:
    parser = CommandParser(
        prog="fmtune plan", description="Predict peak memory per process and tokens/s of a "
        "run, and the largest per-device batch that fits (docs/plan.md). Every other flag "
        "is a train option (--config run.yaml, --per_device_train_batch_size 8, ...).")
    add = parser.add_argument
    add("--max-memory", "--max_memory", type=float, dest="max_memory", metavar="GB",
        help="memory per process in GB (GiB): says whether the run fits, and the largest "
        "per-device batch that does")
    add("--probe", action="store_true", help="run a few real steps of `fmtune train` here "
        "and calibrate the throughput (and report the memory error)")
    add("--probe-steps", "--probe_steps", type=int, default=3, dest="probe_steps")
    add("--device", choices=("cpu", "cuda"), help="plan for this device (default: a GPU if "
        "this machine has one, else the CPU)")
    add("--num-processes", "--num_processes", type=int, dest="world", metavar="N",
        help="processes in all (default: the config's num_processes, else 1)")
    add("--fsdp", action="store_true", help="FULL_SHARD FSDP over the processes")
    add("--seq-len", "--seq_len", type=int, dest="seq_len", help="padded sequence length "
        "(default: the data's, tokenized as the run does; else max_seq_length)")
    add("--model-config", "--model_config", dest="model_config", metavar="FOLDER",
        help="a local copy of the model folder without its weights (config.json and the "
        "tokenizer files): the model itself is elsewhere")
    add("--tflops", type=float, help="the device's peak TFLOP/s (default: a GPU table; on "
        "CPU a short matmul measurement)")
    add("--mfu", type=float, help="fraction of the peak a step achieves (default 0.4 GPU, "
        "0.5 CPU)")
    add("--baseline-mb", "--baseline_mb", type=float, dest="baseline_mb", help="CPU process "
        "baseline in MB (default: measured once by a one-step tiny run, cached)")
    add("--json", action="store_true", help="machine-readable output")
    return parser


def plan_from_argv(argv: list[str]) -> tuple[Plan, Any]:
    """(plan, args) for ``fmtune plan ARGV``."""
    from .cli import load_config

    if any(a in ("-h", "--help") for a in argv):
        plan_parser().parse_args(["--help"])
    args, rest = plan_parser().parse_known_args(argv)
    config, pm, _, _ = load_config(rest)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = args.world or int(config.get("num_processes") or 1)
    fsdp = bool(args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true")
    if args.model_config:  # config.json and the tokenizer from the local copy
        config.set_from("model_name_or_path", args.model_config, "--model-config")
    cfg = model_config(config.model_name_or_path,
                       bool(config.get("trust_remote_code")))
    tokenizer = pm.hook.load_tokenizer(config=config)
    lens, source = ([], "") if args.seq_len else sequence_lengths(config, pm, tokenizer)
    plugins = list(config.plugins)
    baseline = 0
    notes = []
    if device == "cpu":
        if args.baseline_mb is not None:
            mb, how = args.baseline_mb, "--baseline-mb"
        else:
            mb, how = cpu_baseline_mb(plugins)
        baseline = int(mb * MiB)
        notes.append(f"CPU process baseline {mb:.0f} MB ({how})")
    if not lens and not args.seq_len:
        notes.append(f"sequence lengths: {source}; max_seq_length used")

    def make(batch=None, tflops=args.tflops, mfu=args.mfu):
        return predict(config, pm, device=device, world_size=world, fsdp=fsdp, seq_lens=lens,
                       seq_len=args.seq_len, batch=batch, baseline_bytes=baseline,
                       model_cfg=cfg, tflops=tflops, mfu=mfu, tokenizer=tokenizer)

    plan = make()
    if args.probe:
        summary = probe(rest, args.probe_steps)
        measured_mb = (summary.get("peak_gpu_memory_mb") if device == "cuda"
                       else summary.get("peak_rss_mb"))
        tps = float(summary.get("tokens_per_second") or 0)
        # the FLOP/s the steps achieved, padding tokens included (tokens/s counts real ones)
        achieved = tps / plan.padding * plan.flops_per_token / max(world, 1)
        mfu = achieved / (plan.device_tflops * 1e12) if plan.device_tflops else plan.mfu
        plan = make(tflops=plan.device_tflops, mfu=mfu)
        plan.probe = {"steps": args.probe_steps, "tokens_per_second": tps,
                      "measured": f"{measured_mb:.0f} MB" if measured_mb else "n/a",
                      "measured_mb": measured_mb,
                      "memory_error_pct": (100.0 * (plan.peak_bytes / MiB - measured_mb)
                                           / measured_mb if measured_mb else 0.0)}
        notes.append("the probe's steps take the first batches, not necessarily the longest")
    if args.max_memory is not None:
        plan.max_memory_bytes = int(args.max_memory * GiB)
        plan.largest_batch = largest_batch(lambda b: make(batch=b, tflops=plan.device_tflops,
                                                          mfu=plan.mfu), plan.max_memory_bytes)
    plan.notes = notes + plan.notes
    return plan, args


def cmd_plan(argv: list[str]) -> int:
    """``fmtune plan --config run.yaml [--max-memory GB] [--probe] [...]``."""
    try:
        plan, args = plan_from_argv(list(argv))
    except ConfigError as e:
        print(f"fmtune: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=1) if args.json else render(plan))
    if plan.max_memory_bytes is not None and plan.peak_bytes > plan.max_memory_bytes:
        return 1
    return 0


__all__ = ["Plan", "predict", "largest_batch", "fit_batch", "memory_budget", "probe", "cmd_plan", "plan_from_argv",
           "cpu_baseline_mb", "measure_baseline", "count", "meta_model", "shape_of"]
