"""``fmtune k8s render``: Kubernetes documents for a run config (docs/distributed.md).

Two APIs, same container and command (``torchrun -m fmtune.cli train --config
/etc/fmtune/run.yaml``, the run config from a ConfigMap mounted at /etc/fmtune):

* Kubeflow Trainer v2 (``--format v2``): a ``ClusterTrainingRuntime`` for fmtune
  (torch ML policy: the trainer injects ``PET_NNODES``/``PET_NPROC_PER_NODE``/``PET_NODE_RANK``/
  ``PET_MASTER_ADDR``/``PET_MASTER_PORT``, which torchrun reads) and a ``TrainJob`` that
  references it, with Kueue's ``kueue.x-k8s.io/queue-name`` label, its nodes, GPUs and memory
  in ``trainer``, and its own ConfigMap patched over the runtime's ``fmtune-config`` volume
  (``runtimePatches``). The runtime is cluster-scoped: applied once, used by every TrainJob.
* Training Operator v1 (``--format v1``): a ``PyTorchJob`` (Master + Workers), as
  examples/kubernetes/pytorchjob.yaml.

Resources come from :mod:`fmtune.plan`: the predicted accelerator memory per process must fit
``--gpu-memory``; the pod's memory request is the host memory a node needs to load and feed
its processes (see :func:`host_memory_bytes`). Importing this module does not import torch.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import yaml

from . import __version__
from .config import CommandParser, ConfigError

TRAINER_API = "trainer.kubeflow.org/v1alpha1"
TRAINER_GROUP = "trainer.kubeflow.org"
RUNTIME_NAME = "fmtune-torch-distributed"
NODE = "node"  # the Trainer v2 torch runtime's replicated job and container name
CONFIG_DIR = "/etc/fmtune"
CONFIG_KEY = "run.yaml"
CONFIG_VOLUME = "fmtune-config"
DEFAULT_CONFIGMAP = "fmtune-run"  # what the runtime mounts when a TrainJob patches nothing
COMMAND = ["torchrun", "-m", "fmtune.cli", "train", "--config", f"{CONFIG_DIR}/{CONFIG_KEY}"]
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
FRAMEWORK_LABEL = "trainer.kubeflow.org/framework"
PATCH_MANAGER = "fmtune/k8s-render"
PLAN_ANNOTATION = "fmtune/predicted-gpu-memory-per-process"
DEFAULT_IMAGE = f"REGISTRY/fmtune:{__version__}"
GPU = "nvidia.com/gpu"
# host memory a GPU training process holds besides model weights: Python, torch and its CUDA
# libraries, transformers, the tokenizer, the dataset and dataloader (a stated allowance)
HOST_BASELINE_PER_PROCESS = 4 * 1024 ** 3
HOST_HEADROOM = 1.25
BASE_ENV = [{"name": "HF_HUB_OFFLINE", "value": "1"}]
# the image's user (Dockerfile): fsGroup makes the mounted volumes writable for it
SECURITY_CONTEXT = {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000}


def _volumes(configmap: str, pvc: str) -> list[dict[str, Any]]:
    return [{"name": CONFIG_VOLUME, "configMap": {"name": configmap}},
            {"name": "storage", "persistentVolumeClaim": {"claimName": pvc}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}}]


def _mounts() -> list[dict[str, Any]]:
    return [{"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "storage", "mountPath": "/workspace"},
            {"name": "dshm", "mountPath": "/dev/shm"}]


def configmap(name: str, run_yaml: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
            "data": {CONFIG_KEY: run_yaml}}


def cluster_training_runtime(image: str = DEFAULT_IMAGE, pvc: str = "fmtune-storage",
                             name: str = RUNTIME_NAME) -> dict[str, Any]:
    """The fmtune ClusterTrainingRuntime (Kubeflow Trainer v2, torch ML policy)."""
    container = {"name": NODE, "image": image, "imagePullPolicy": "IfNotPresent",
                 "command": list(COMMAND), "env": [dict(e) for e in BASE_ENV],
                 "volumeMounts": _mounts()}
    return {
        "apiVersion": TRAINER_API, "kind": "ClusterTrainingRuntime",
        "metadata": {"name": name, "labels": {FRAMEWORK_LABEL: "torch"}},
        "spec": {
            "mlPolicy": {"numNodes": 1, "torch": {}},
            "template": {"spec": {"replicatedJobs": [{
                "name": NODE,
                "template": {
                    "metadata": {"labels": {ANCESTOR_LABEL: "trainer"}},
                    "spec": {"template": {"spec": {
                        "securityContext": dict(SECURITY_CONTEXT),
                        "containers": [container],
                        "volumes": _volumes(DEFAULT_CONFIGMAP, pvc)}}}}}]}},
        },
    }


def _resources(gpus: int, memory: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if gpus:
        out["limits"] = {GPU: gpus}
    if memory:
        out["requests"] = {"memory": memory}
    return out


def train_job(name: str, configmap_name: str, nodes: int, gpus: int, image: str,
              env: list[dict[str, str]], memory: str | None, queue: str | None,
              priority: str | None = None, annotations: dict[str, str] | None = None,
              runtime: str = RUNTIME_NAME) -> dict[str, Any]:
    """A TrainJob on the fmtune runtime; its ConfigMap replaces the runtime's default one."""
    labels = {QUEUE_LABEL: queue} if queue else {}
    if priority:
        labels[PRIORITY_LABEL] = priority
    metadata: dict[str, Any] = {"name": name}
    if labels:
        metadata["labels"] = labels
    if annotations:
        metadata["annotations"] = dict(annotations)
    trainer: dict[str, Any] = {"image": image, "numNodes": nodes,
                               "numProcPerNode": max(gpus, 1)}
    if env:
        trainer["env"] = [dict(e) for e in env]
    resources = _resources(gpus, memory)
    if resources:
        trainer["resourcesPerNode"] = resources
    patch = {"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {
        "replicatedJobs": [{"name": NODE, "template": {"spec": {"template": {"spec": {
            "volumes": [{"name": CONFIG_VOLUME, "configMap": {"name": configmap_name}}],
        }}}}}]}}}}
    return {"apiVersion": TRAINER_API, "kind": "TrainJob", "metadata": metadata,
            "spec": {"runtimeRef": {"name": runtime, "apiGroup": TRAINER_GROUP,
                                    "kind": "ClusterTrainingRuntime"},
                     "trainer": trainer, "runtimePatches": [patch]}}


def pytorch_job(name: str, configmap_name: str, nodes: int, gpus: int, image: str,
                env: list[dict[str, str]], memory: str | None, pvc: str = "fmtune-storage",
                annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A Training Operator v1 PyTorchJob: Master + (nodes - 1) Workers."""
    container: dict[str, Any] = {"name": "pytorch", "image": image,
                                 "imagePullPolicy": "IfNotPresent", "command": list(COMMAND),
                                 "env": [*(dict(e) for e in env),
                                         *(dict(e) for e in BASE_ENV)],
                                 "volumeMounts": _mounts()}
    resources = _resources(gpus, memory)
    if resources:
        container["resources"] = resources

    def replica(n):
        return {"replicas": n, "restartPolicy": "OnFailure",
                "template": {"spec": {"securityContext": dict(SECURITY_CONTEXT),
                                      "containers": [container],
                                      "volumes": _volumes(configmap_name, pvc)}}}

    replicas = {"Master": replica(1)}
    if nodes > 1:
        replicas["Worker"] = replica(nodes - 1)
    metadata: dict[str, Any] = {"name": name}
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": metadata,
            "spec": {"nprocPerNode": str(max(gpus, 1)),
                     "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 2},
                     "pytorchReplicaSpecs": replicas}}


def accelerate_env(path: str) -> list[dict[str, str]]:
    """The ACCELERATE_*/FSDP_* environment `accelerate launch --config_file PATH` sets for
    the script (the same derivation tests/test_kubernetes.py checks the example against)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_multi_gpu_env

    if not os.path.isfile(path):
        raise ConfigError(f"--accelerate_config {path}: no such file")
    try:
        args = launch_command_parser().parse_args(
            ["--config_file", path, "--main_process_port", "0", "-m", "fmtune.cli"])
        env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    except (Exception, SystemExit) as e:  # noqa: BLE001 - any refusal is a bad file
        raise ConfigError(f"--accelerate_config {path}: not a valid accelerate config: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return [{"name": k, "value": str(v)} for k, v in sorted(env.items())
            if k.startswith(("FSDP_", "ACCELERATE_")) and k != "ACCELERATE_USE_CPU"]


def quantity(n_bytes: float) -> str:
    """Bytes as a Kubernetes quantity in whole Gi, rounded up."""
    return f"{max(1, math.ceil(n_bytes / 1024 ** 3))}Gi"


def host_memory_bytes(plan, gpus: int, fsdp_cpu_efficient: bool) -> int:
    """Host memory one node needs: per process a stated allowance (Python, torch and CUDA
    libraries, data), plus the weights as they pass through host memory on the way to the
    GPU: every process loads a full copy, or one per node with FSDP's
    cpu_ram_efficient_loading; times a headroom."""
    processes = max(gpus, 1)
    weights = plan.memory["weights"] * (plan.world_size if plan.fsdp else 1)
    copies = 1 if fsdp_cpu_efficient else processes
    if not gpus:  # CPU pods: the planned process RSS is the memory
        return int(plan.peak_bytes * HOST_HEADROOM)
    return int((processes * HOST_BASELINE_PER_PROCESS + copies * weights) * HOST_HEADROOM)


def _dns_name(text: str) -> str:
    import re

    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:50].strip("-")
    return name or "fmtune-run"


def render(run_yaml: str, config, pm, *, nodes: int, gpus: int, image: str, fmt: str,
           name: str, queue: str | None, priority: str | None, pvc: str,
           accelerate_config: str | None, gpu_memory_gb: float, memory: str | None,
           model_config_dir: str | None) -> list[dict[str, Any]]:
    """The documents for ``fmt`` (v1, v2 or both) in apply order."""
    env = accelerate_env(accelerate_config) if accelerate_config else []
    env_map = {e["name"]: e["value"] for e in env}
    fsdp = env_map.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    world = nodes * max(gpus, 1)
    wanted = config.get("num_processes")
    if wanted and wanted != world:
        raise ConfigError(f"num_processes={wanted} in the config but {nodes} node(s) x "
                          f"{max(gpus, 1)} process(es) = {world}: leave num_processes unset "
                          "(the launcher decides) or make them agree")
    annotations = {}
    if model_config_dir:  # the plan reads config.json and the tokenizer from the local copy
        config.set_from("model_name_or_path", model_config_dir, "--model-config")
    if memory is None:
        from .plan import model_config, predict, _gb

        cfg = model_config(config.model_name_or_path, bool(config.get("trust_remote_code")))
        plan = predict(config, pm, device="cuda" if gpus else "cpu", world_size=world,
                       fsdp=fsdp, model_cfg=cfg, tflops=1.0,
                       baseline_bytes=0 if gpus else 1024 ** 3)
        if gpus and plan.peak_bytes > gpu_memory_gb * 1024 ** 3:
            raise ConfigError(
                f"fmtune plan predicts {_gb(plan.peak_bytes)} of GPU memory per process, more "
                f"than --gpu-memory {gpu_memory_gb:g} GB (per_device_train_batch_size "
                f"{plan.per_device_train_batch_size}, max_seq_length {plan.seq_len}); lower "
                "them, turn on gradient_checkpointing or FSDP (--accelerate_config)")
        efficient = env_map.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").lower() == "true"
        memory = quantity(host_memory_bytes(plan, gpus, efficient))
        if gpus:
            annotations[PLAN_ANNOTATION] = _gb(plan.peak_bytes)
    cm_name = f"{name}-config"
    docs: list[dict[str, Any]] = [configmap(cm_name, run_yaml)]
    if fmt in ("v2", "both"):
        docs.append(cluster_training_runtime(image, pvc))
        docs.append(train_job(name, cm_name, nodes, gpus, image, env, memory, queue, priority,
                              annotations))
    if fmt in ("v1", "both"):
        docs.append(pytorch_job(name, cm_name, nodes, gpus, image, env, memory, pvc,
                                annotations))
    return docs


def dump(docs: list[dict[str, Any]]) -> str:
    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value):  # the run config stays readable: a literal block
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    Dumper.ignore_aliases = lambda self, data: True  # no &id001 anchors: each pod spelled out
    return yaml.dump_all(docs, Dumper=Dumper, sort_keys=False, default_flow_style=False,
                         width=100)


def render_parser() -> CommandParser:
    parser = CommandParser(
        prog="fmtune k8s render",
        description="Write Kubernetes documents for a run config: a ConfigMap holding it, "
        "and a Kubeflow Trainer v2 ClusterTrainingRuntime + TrainJob (v2) and/or a "
        "Training Operator v1 PyTorchJob (v1). docs/distributed.md.")
    add = parser.add_argument
    add("--config", required=True, help="the run config (YAML) the pods train with")
    add("--nodes", type=int, default=1)
    add("--gpus-per-node", "--gpus_per_node", type=int, default=8, dest="gpus",
        help="processes per node, one per GPU (0: CPU pods, one process each)")
    add("--image", default=DEFAULT_IMAGE, help="an image with fmtune and the run's plugins "
        "(the repository's Dockerfile)")
    add("--format", choices=("v1", "v2", "both"), default="v2", dest="fmt")
    add("--name", help="job name (default: from the config file's name)")
    add("--queue", default="user-queue", help="Kueue LocalQueue (v2; '' for none)")
    add("--priority-class", "--priority_class", dest="priority",
        help="Kueue WorkloadPriorityClass (v2)")
    add("--pvc", default="fmtune-storage", help="a ReadWriteMany PersistentVolumeClaim "
        "mounted at /workspace (model, data, output_dir)")
    add("--accelerate_config", "--accelerate-config", dest="accelerate_config",
        help="an accelerate config (examples/accelerate/fsdp.yaml): its FSDP settings as "
        "the environment of the pods")
    add("--gpu-memory", "--gpu_memory", type=float, default=80.0, dest="gpu_memory",
        metavar="GB", help="memory of one GPU: the planned peak per process must fit")
    add("--memory", help="the pod memory request (default: from fmtune plan)")
    add("--model-config", "--model_config", dest="model_config", metavar="FOLDER",
        help="a local copy of the model's config.json, for the plan (model_name_or_path "
        "is a path on the cluster)")
    add("--output", "-o", help="write here instead of stdout")
    return parser


def cmd_render(argv: list[str]) -> int:
    from .cli import load_config

    args = render_parser().parse_args(argv)
    if args.nodes < 1 or args.gpus < 0:
        raise ConfigError("k8s render: --nodes must be >= 1 and --gpus-per-node >= 0")
    try:
        with open(args.config, encoding="utf-8") as f:
            run_yaml = f.read()
    except OSError as e:
        raise ConfigError(f"--config {args.config}: {e.strerror}") from None
    config, pm, _, _ = load_config(["--config", args.config])  # strict: unknown keys fail here
    name = _dns_name(args.name or os.path.splitext(os.path.basename(args.config))[0])
    docs = render(run_yaml, config, pm, nodes=args.nodes, gpus=args.gpus, image=args.image,
                  fmt=args.fmt, name=name, queue=args.queue or None, priority=args.priority,
                  pvc=args.pvc, accelerate_config=args.accelerate_config,
                  gpu_memory_gb=args.gpu_memory, memory=args.memory,
                  model_config_dir=args.model_config)
    text = dump(docs)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"fmtune: wrote {len(docs)} documents to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


SUBCOMMANDS = {"render": cmd_render}


def cmd_k8s(argv: list[str]) -> int:
    """``fmtune k8s render ...``."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fmtune k8s render --config run.yaml --nodes N --gpus-per-node G "
              "[--image IMG] [--format v1|v2|both] [...]\n\n`fmtune k8s render --help` "
              "lists the options.")
        return 0
    sub = SUBCOMMANDS.get(argv[0])
    try:
        if sub is None:
            raise ConfigError(f"k8s: unknown sub-command {argv[0]!r} (one of: "
                              f"{', '.join(SUBCOMMANDS)})")
        return sub(argv[1:])
    except ConfigError as e:
        print(f"fmtune: error: {e}", file=sys.stderr)
        return 2
