"""examples/kubernetes/pytorchjob.yaml: the manifests parse, match the typed models of the
Kubeflow training SDK (kubeflow-training, a test dependency) and of the Kubernetes Python
client, the fmtune config in the ConfigMap passes fmtune's own strict config loading, the
container command is a valid torchrun command pointing at the mounted config, and the FSDP
environment is the one `accelerate launch --config_file examples/accelerate/fsdp.yaml` sets.

Schema check (`schema_errors`): each document is deserialized the way the SDK's
TrainingClient reads a job from the API server (`ApiClient.deserialize` of a
`FakeResponse`) into `KubeflowOrgV1PyTorchJob` / `V1ConfigMap`, with client-side validation
on, so a missing required field raises; then serialized back with
`ApiClient.sanitize_for_serialization` and compared with the document, because the
deserializer silently drops keys the schema does not have and coerces values to the
declared type (str(8), int("1")). Neither library checks enum values client-side (no model
in kubeflow-training 1.9.4 or kubernetes 35 has `allowed_values`), so the enums the
manifest uses are checked explicitly against the values the SDK/API documents.
"""

from __future__ import annotations

import copy
import os
import re

import pytest
import yaml
from kubeflow.training import ApiClient, constants, models
from kubeflow.training.utils.utils import FakeResponse
from kubernetes.utils import parse_quantity

from fmtune.cli import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = os.path.join(ROOT, "examples", "kubernetes", "pytorchjob.yaml")
FSDP_YAML = os.path.join(ROOT, "examples", "accelerate", "fsdp.yaml")
DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# KubeflowOrgV1ReplicaSpec.restart_policy: "One of Always, OnFailure, Never and ExitCode"
RESTART_POLICIES = {"Always", "OnFailure", "Never", "ExitCode"}
# the training operator's v1 CleanPodPolicy (its SDK docstring does not list them)
CLEAN_POD_POLICIES = {"None", "Running", "All"}
# V1Container.image_pull_policy: "One of Always, Never, IfNotPresent"
IMAGE_PULL_POLICIES = {"Always", "Never", "IfNotPresent"}
MODELS = {"ConfigMap": "V1ConfigMap", constants.PYTORCHJOB_KIND: constants.PYTORCHJOB_MODEL}
REPLICA_TYPES = {t.capitalize() for t in constants.PYTORCHJOB_REPLICA_TYPES}  # Master, Worker


def _where(path):
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", p):
            out += f".{p}" if out else p
        else:
            out += f"[{p!r}]"
    return out


def _is_quantity(path):
    return len(path) >= 3 and path[-3] == "resources" and path[-2] in ("limits", "requests")


def _differences(orig, back, path=()):
    """Where the model's serialization differs from the document: dropped keys, coerced
    values. A resource quantity may be a YAML number (resource.Quantity unmarshals JSON
    numbers; the Python client types it str) but must parse as a quantity."""
    if isinstance(orig, dict) and isinstance(back, dict):
        out = []
        for key, value in orig.items():
            if key not in back:
                what = "is null" if value is None else "is not a field of the schema"
                out.append(f"{_where(path + (key,))}: {what} (dropped on deserialization)")
            else:
                out += _differences(value, back[key], path + (key,))
        out += [f"{_where(path + (k,))}: added on deserialization" for k in back if k not in orig]
        return out
    if isinstance(orig, list) and isinstance(back, list) and len(orig) == len(back):
        pairs = enumerate(zip(orig, back))
        return [d for i, (o, b) in pairs for d in _differences(o, b, path + (i,))]
    if _is_quantity(path):
        try:
            parse_quantity(orig)
        except (ValueError, TypeError):
            return [f"{_where(path)}: {orig!r} is not a resource quantity"]
        if not isinstance(orig, bool) and back == str(orig):
            return []
    if type(orig) is type(back) and orig == back:
        return []
    return [f"{_where(path)}: {orig!r} is {type(orig).__name__}, the schema reads it as {back!r}"]


def _enum_errors(job):
    out = []
    spec = job.spec
    if spec.run_policy.clean_pod_policy not in CLEAN_POD_POLICIES | {None}:
        out.append(f"spec.runPolicy.cleanPodPolicy: {spec.run_policy.clean_pod_policy!r} "
                   f"is not one of {sorted(CLEAN_POD_POLICIES)}")
    for name, rs in spec.pytorch_replica_specs.items():
        where = f"spec.pytorchReplicaSpecs.{name}"
        if name not in REPLICA_TYPES:
            out.append(f"{where}: {name!r} is not a PyTorchJob replica type "
                       f"{sorted(REPLICA_TYPES)}")
        if rs.restart_policy not in RESTART_POLICIES | {None}:
            out.append(f"{where}.restartPolicy: {rs.restart_policy!r} "
                       f"is not one of {sorted(RESTART_POLICIES)}")
        pod = rs.template.spec if rs.template else None
        for i, c in enumerate(pod.containers if pod else ()):
            if c.image_pull_policy not in IMAGE_PULL_POLICIES | {None}:
                out.append(f"{where}.template.spec.containers[{i}].imagePullPolicy: "
                           f"{c.image_pull_policy!r} is not one of {sorted(IMAGE_PULL_POLICIES)}")
    return out


def to_model(doc):
    """(typed model, problems) for one manifest document; the model is None when the
    deserializer itself refuses the document (a missing required field)."""
    kind = doc.get("kind")
    if kind not in MODELS:
        return None, [f"kind {kind!r} is not one of {sorted(MODELS)}"]
    api = ApiClient()
    try:
        obj = api.deserialize(FakeResponse(doc), MODELS[kind])
    except (ValueError, TypeError) as e:
        return None, [f"{kind}: {e}"]
    problems = _differences(doc, api.sanitize_for_serialization(obj))
    if not problems and kind == constants.PYTORCHJOB_KIND:
        problems = _enum_errors(obj)
    return obj, [f"{kind}: {p}" for p in problems]


def schema_errors(doc):
    return to_model(doc)[1]


@pytest.fixture(scope="module")
def docs():
    with open(MANIFEST, encoding="utf-8") as f:
        found = [d for d in yaml.safe_load_all(f) if d is not None]
    return {d["kind"]: d for d in found}


def container(job, replica="Master"):
    (c,) = job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"]
    return c


def test_configmap_and_pytorchjob_required_fields(docs):
    assert sorted(docs) == ["ConfigMap", "PyTorchJob"]
    cm = docs["ConfigMap"]
    assert cm["apiVersion"] == "v1" and DNS1123.fullmatch(cm["metadata"]["name"])
    assert cm["data"] and all(isinstance(v, str) for v in cm["data"].values())

    job = docs["PyTorchJob"]
    assert job["apiVersion"] == "kubeflow.org/v1" and DNS1123.fullmatch(job["metadata"]["name"])
    spec = job["spec"]
    assert isinstance(spec["runPolicy"], dict)  # required by the v1 API
    assert spec["runPolicy"]["cleanPodPolicy"] in {"None", "Running", "All"}
    assert isinstance(spec["nprocPerNode"], str) and spec["nprocPerNode"].isdigit()  # a string
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) <= {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    for name, rs in replicas.items():
        assert isinstance(rs["replicas"], int) and rs["replicas"] >= 1, name
        assert rs["restartPolicy"] in RESTART_POLICIES, name
        pod = rs["template"]["spec"]
        c = container(job, name)
        assert c["name"] == "pytorch"  # the container the operator configures
        assert isinstance(c["image"], str) and c["image"]
        assert all(isinstance(a, str) for a in c["command"])
        assert all(isinstance(e["name"], str) and isinstance(e["value"], str) for e in c["env"])
        gpus = c["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus == int(spec["nprocPerNode"])  # one process per GPU
        volumes = {v["name"]: v for v in pod["volumes"]}
        for mount in c["volumeMounts"]:
            assert mount["name"] in volumes and mount["mountPath"].startswith("/")


def test_manifests_match_the_sdk_models(docs):
    """Both documents deserialize into the SDK's typed models and serialize back to exactly
    themselves: no required field missing, no key dropped, no value coerced."""
    for doc in docs.values():
        assert schema_errors(doc) == []
    cm, cm_problems = to_model(docs["ConfigMap"])
    job, job_problems = to_model(docs["PyTorchJob"])
    assert cm_problems == job_problems == []
    assert isinstance(cm, models.V1ConfigMap) and isinstance(job, models.KubeflowOrgV1PyTorchJob)
    assert job.api_version == constants.API_VERSION and job.kind == constants.PYTORCHJOB_KIND
    assert sorted(job.spec.pytorch_replica_specs) == sorted(REPLICA_TYPES)
    assert job.spec.nproc_per_node == "8" and job.spec.run_policy.backoff_limit == 2
    for rs in job.spec.pytorch_replica_specs.values():
        (c,) = rs.template.spec.containers
        assert isinstance(c, models.V1Container) and c.name == constants.PYTORCHJOB_CONTAINER
        assert c.resources.limits == {"nvidia.com/gpu": "8"}  # Quantity: a str in the model
        assert parse_quantity(c.resources.limits["nvidia.com/gpu"]) == 8
        mounts = {m.name: m.mount_path for m in c.volume_mounts}
        vols = {v.name: v for v in rs.template.spec.volumes}
        assert vols["fmtune-config"].config_map.name == cm.metadata.name
        assert mounts["fmtune-config"] == "/etc/fmtune"
    assert sorted(cm.data) == ["run.yaml"]


MASTER = ("spec", "pytorchReplicaSpecs", "Master")
CONTAINER = MASTER + ("template", "spec", "containers", 0)
# The Master and Worker pods are one YAML anchor: a change to the Master's pod shows in both.
BOTH = ["spec.pytorchReplicaSpecs.{}.template.spec.containers[0]".format(r)
        for r in ("Master", "Worker")]
DROPPED = "is not a field of the schema (dropped on deserialization)"


def at(doc, path):
    for p in path:
        doc = doc[p]
    return doc


def rename(parent, old, new):
    parent[new] = parent.pop(old)


# name: (document, change, expected problems)
MUTATIONS = {
    "missing pytorchReplicaSpecs": (
        "PyTorchJob", lambda d: d["spec"].pop("pytorchReplicaSpecs"),
        ["PyTorchJob: Invalid value for `pytorch_replica_specs`, must not be `None`"]),
    "missing runPolicy": (
        "PyTorchJob", lambda d: d["spec"].pop("runPolicy"),
        ["PyTorchJob: Invalid value for `run_policy`, must not be `None`"]),
    "missing container name": (
        "PyTorchJob", lambda d: at(d, CONTAINER).pop("name"),
        ["PyTorchJob: Invalid value for `name`, must not be `None`"]),
    "typo restartPolicyy": (
        "PyTorchJob", lambda d: rename(at(d, MASTER), "restartPolicy", "restartPolicyy"),
        [f"PyTorchJob: spec.pytorchReplicaSpecs.Master.restartPolicyy: {DROPPED}"]),
    "typo in a pod field": (
        "PyTorchJob", lambda d: rename(at(d, CONTAINER), "imagePullPolicy", "imagePullpolicy"),
        [f"PyTorchJob: {c}.imagePullpolicy: {DROPPED}" for c in BOTH]),
    "typo in the ConfigMap": (
        "ConfigMap", lambda d: rename(d, "data", "dat"),
        [f"ConfigMap: dat: {DROPPED}"]),
    "nprocPerNode an int": (
        "PyTorchJob", lambda d: d["spec"].update(nprocPerNode=8),
        ["PyTorchJob: spec.nprocPerNode: 8 is int, the schema reads it as '8'"]),
    "replicas a string": (
        "PyTorchJob", lambda d: at(d, MASTER).update(replicas="1"),
        ["PyTorchJob: spec.pytorchReplicaSpecs.Master.replicas: '1' is str, "
         "the schema reads it as 1"]),
    "backoffLimit a bool": (
        "PyTorchJob", lambda d: d["spec"]["runPolicy"].update(backoffLimit=True),
        ["PyTorchJob: spec.runPolicy.backoffLimit: True is bool, the schema reads it as 1"]),
    "command a string": (
        "PyTorchJob", lambda d: at(d, CONTAINER).update(command="torchrun"),
        [f"PyTorchJob: {c}.command: 'torchrun' is str, the schema reads it as "
         "['t', 'o', 'r', 'c', 'h', 'r', 'u', 'n']" for c in BOTH]),
    "ConfigMap value not a string": (
        "ConfigMap", lambda d: d["data"].update({"run.yaml": 3}),
        ["ConfigMap: data['run.yaml']: 3 is int, the schema reads it as '3'"]),
    "GPU limit not a quantity": (
        "PyTorchJob",
        lambda d: at(d, CONTAINER)["resources"]["limits"].update({"nvidia.com/gpu": "eight"}),
        [f"PyTorchJob: {c}.resources.limits['nvidia.com/gpu']: 'eight' is not a resource "
         "quantity" for c in BOTH]),
    "unknown restartPolicy": (
        "PyTorchJob", lambda d: at(d, MASTER).update(restartPolicy="Sometimes"),
        ["PyTorchJob: spec.pytorchReplicaSpecs.Master.restartPolicy: 'Sometimes' is not one "
         "of ['Always', 'ExitCode', 'Never', 'OnFailure']"]),
    "unknown replica type": (
        "PyTorchJob", lambda d: d["spec"]["pytorchReplicaSpecs"].update(Chief={"replicas": 1}),
        ["PyTorchJob: spec.pytorchReplicaSpecs.Chief: 'Chief' is not a PyTorchJob replica "
         "type ['Master', 'Worker']"]),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_broken_manifest_fails_the_schema_check(docs, name):
    kind, change, expected = MUTATIONS[name]
    doc = copy.deepcopy(docs[kind])
    change(doc)
    assert schema_errors(doc) == expected
    assert schema_errors(docs[kind]) == []  # the fixture's document is untouched


def test_gpu_limit_may_be_a_number_or_a_quantity_string(docs):
    """resource.Quantity accepts a JSON number or a string ("8", "1k")."""
    for value in (8, "8", "1k"):
        doc = copy.deepcopy(docs["PyTorchJob"])
        container(doc)["resources"]["limits"]["nvidia.com/gpu"] = value
        assert schema_errors(doc) == [], value


def test_container_runs_torchrun_on_the_mounted_config(docs, tmp_path):
    """The command parses as torchrun's own parser reads it, and --config names the
    ConfigMap key at the path the ConfigMap volume mounts it."""
    from torch.distributed.run import get_args_parser

    job, cm = docs["PyTorchJob"], docs["ConfigMap"]
    c = container(job)
    assert c["command"][0] == "torchrun"
    args = get_args_parser().parse_args(c["command"][1:])
    assert args.module and args.training_script == "fmtune.cli"
    assert args.training_script_args[:2] == ["train", "--config"]
    config_path = args.training_script_args[2]

    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    (cm_volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert cm_volume["configMap"]["name"] == cm["metadata"]["name"]
    folder, key = os.path.split(config_path)
    assert folder == mounts[cm_volume["name"]] and key in cm["data"]


def test_configmap_holds_a_valid_fmtune_config(docs, tmp_path):
    cm = docs["ConfigMap"]
    (text,) = cm["data"].values()
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    config, pm, _, _ = load_config(["--config", str(path)])  # strict: unknown keys fail
    assert "lora" in dict(pm.list_name_plugin())  # the plugin it names is installed and loads
    assert config.r == 16 and config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert config.learning_rate == pytest.approx(1e-4)
    assert config.output_dir.startswith("/workspace/")  # on the shared volume
    assert config.num_processes is None  # the launcher decides


def test_fsdp_env_is_what_accelerate_derives_from_fsdp_yaml(docs):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", FSDP_YAML, "--main_process_port", "0", "-m", "fmtune.cli"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    for replica in ("Master", "Worker"):
        pod_env = {e["name"]: e["value"] for e in container(docs["PyTorchJob"], replica)["env"]}
        fsdp = {k: v for k, v in pod_env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}
        assert len(fsdp) >= 10
        assert {k: env.get(k) for k in fsdp} == fsdp, replica


def test_manifest_file_is_the_one_documented():
    with open(os.path.join(ROOT, "docs", "distributed.md"), encoding="utf-8") as f:
        doc = f.read()
    assert "examples/kubernetes/pytorchjob.yaml" in doc and "REGISTRY/fmtune" in doc


# ------------------------------------------------------------------ Kubeflow Trainer v2
#
# examples/kubernetes/cluster-training-runtime.yaml + trainjob.yaml and the output of
# `fmtune k8s render` are validated against the typed models of kubeflow-trainer-api (a test
# dependency; pydantic v2 models generated from the Trainer's OpenAPI). Those models ignore
# unknown keys (their model_config sets no `extra`, pydantic's default is "ignore", and
# `from_dict` picks the known keys only), so `v2_unknown_keys` walks each document beside the
# model classes and refuses any key that is not a field (by its JSON alias): extra="forbid",
# recursively, without changing the library's classes. `from_dict` then validates types
# (Strict*: no coercion), required fields and the enums the generator wrote validators for
# (imagePullPolicy, ...); the Trainer-level values the schema types as plain strings
# (runtimeRef.kind/apiGroup, apiVersion) are checked explicitly.

import typing  # noqa: E402

import pydantic  # noqa: E402
from kubeflow_trainer_api import models as v2  # noqa: E402

from fmtune import k8s  # noqa: E402

V2_DIR = os.path.join(ROOT, "examples", "kubernetes")
V2_MODELS = {"ClusterTrainingRuntime": v2.TrainerV1alpha1ClusterTrainingRuntime,
             "TrainJob": v2.TrainerV1alpha1TrainJob, "ConfigMap": v2.IoK8sApiCoreV1ConfigMap}
RUNTIME_KINDS = {"ClusterTrainingRuntime", "TrainingRuntime"}  # TrainJob runtimeRef.kind


def _model_of(annotation):
    """The pydantic model class inside Optional[...] / List[...] / Dict[str, ...], and how
    the value nests it: (cls, "one" | "list" | "dict") or (None, None) for a leaf."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return _model_of(inner[0]) if len(inner) == 1 else (None, None)
    if origin in (list, typing.List):
        cls, how = _model_of(args[0])
        return (cls, "list") if how == "one" else (None, None)
    if origin in (dict, typing.Dict):
        cls, how = _model_of(args[1])
        return (cls, "dict") if how == "one" else (None, None)
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel) \
            and "actual_instance" not in annotation.model_fields:  # oneOf wrappers are leaves
        return annotation, "one"
    return None, None


def _has_one_of(annotation):
    """A oneOf wrapper (resource.Quantity, IntOrString) inside: checked as a quantity."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return "actual_instance" in annotation.model_fields
    return any(_has_one_of(a) for a in typing.get_args(annotation))


def _leaf_errors(cls, alias, value, path):
    """The field's own validation (strict type, enum validator) with the document's path:
    the models validate on assignment."""
    name = next(n for n, f in cls.model_fields.items() if (f.alias or n) == alias)
    try:
        setattr(cls.model_construct(), name, value)
    except pydantic.ValidationError as e:
        return [f"{_where(path)}: {x['msg']}" for x in e.errors()]
    return []


def v2_unknown_keys(cls, data, path=()):
    """extra="forbid" for the whole document: every key must be a field of its model (and
    every required field there)."""
    if not isinstance(data, dict):
        return []
    fields = {(f.alias or name): f.annotation for name, f in cls.model_fields.items()}
    out = [f"{_where(path + (f.alias or name,))}: Field required"
           for name, f in cls.model_fields.items()
           if f.is_required() and (f.alias or name) not in data and name not in data]
    for key, value in data.items():
        if key not in fields:
            out.append(f"{_where(path + (key,))}: is not a field of {cls.__name__}")
            continue
        sub, how = _model_of(fields[key])
        if sub is None and value is not None and not _has_one_of(fields[key]):
            out += _leaf_errors(cls, key, value, path + (key,))
        if sub is None or value is None:
            continue
        if how == "one":
            out += v2_unknown_keys(sub, value, path + (key,))
        elif how == "list" and isinstance(value, list):
            for i, item in enumerate(value):
                out += v2_unknown_keys(sub, item, path + (key, i))
        elif how == "dict" and isinstance(value, dict):
            for k, item in value.items():
                out += v2_unknown_keys(sub, item, path + (key, k))
    return out


def _quantity_errors(data, path=()):
    out = []
    if isinstance(data, dict):
        for k, v in data.items():
            out += _quantity_errors(v, path + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _quantity_errors(v, path + (i,))
    elif len(path) >= 3 and path[-3] in ("resources", "resourcesPerNode") \
            and path[-2] in ("limits", "requests"):
        try:
            parse_quantity(data)
        except (ValueError, TypeError):
            out.append(f"{_where(path)}: {data!r} is not a resource quantity")
    return out


def v2_to_model(doc):
    """(typed model, problems) for one Trainer v2 (or ConfigMap) document."""
    kind = doc.get("kind")
    if kind not in V2_MODELS:
        return None, [f"kind {kind!r} is not one of {sorted(V2_MODELS)}"]
    cls = V2_MODELS[kind]
    problems = v2_unknown_keys(cls, doc) + _quantity_errors(doc)
    if problems:  # with their full path (from_dict's errors name the innermost model's field)
        return None, [f"{kind}: {p}" for p in problems]
    try:
        obj = cls.from_dict(copy.deepcopy(doc))
    except (pydantic.ValidationError, ValueError, TypeError) as e:
        errors = e.errors() if isinstance(e, pydantic.ValidationError) else [{"msg": str(e)}]
        return None, [f"{kind}: {_where(tuple(x.get('loc', ())))}: {x['msg']}" for x in errors]
    if kind != "ConfigMap" and doc.get("apiVersion") != k8s.TRAINER_API:
        problems.append(f"apiVersion: {doc.get('apiVersion')!r} is not {k8s.TRAINER_API!r}")
    if kind == "TrainJob":
        ref = obj.spec.runtime_ref
        if ref.kind not in RUNTIME_KINDS | {None}:
            problems.append(f"spec.runtimeRef.kind: {ref.kind!r} is not one of "
                            f"{sorted(RUNTIME_KINDS)}")
        if ref.api_group not in (k8s.TRAINER_GROUP, None):
            problems.append(f"spec.runtimeRef.apiGroup: {ref.api_group!r} is not "
                            f"{k8s.TRAINER_GROUP!r}")
    return obj, [f"{kind}: {p}" for p in problems]


def v2_errors(doc):
    return v2_to_model(doc)[1]


def _load(name):
    with open(os.path.join(V2_DIR, name), encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


@pytest.fixture(scope="module")
def v2_docs():
    found = _load("cluster-training-runtime.yaml") + _load("trainjob.yaml")
    return {d["kind"]: d for d in found}


def node_container(runtime):
    (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    (c,) = job["template"]["spec"]["template"]["spec"]["containers"]
    return c


def test_v2_examples_match_the_trainer_api_models(v2_docs):
    assert sorted(v2_docs) == ["ClusterTrainingRuntime", "ConfigMap", "TrainJob"]
    for doc in v2_docs.values():
        assert v2_errors(doc) == []
    rt, _ = v2_to_model(v2_docs["ClusterTrainingRuntime"])
    job, _ = v2_to_model(v2_docs["TrainJob"])
    assert isinstance(rt, v2.TrainerV1alpha1ClusterTrainingRuntime)
    assert rt.spec.ml_policy.torch is not None and rt.spec.ml_policy.num_nodes == 1
    (rj,) = rt.spec.template.spec.replicated_jobs
    assert rj.name == "node" and rj.template.metadata.labels == {
        "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    (c,) = rj.template.spec.template.spec.containers
    assert c.name == "node" and c.image == "REGISTRY/fmtune:0.1.0"
    assert job.metadata.labels["kueue.x-k8s.io/queue-name"] == "user-queue"
    assert job.spec.runtime_ref.name == rt.metadata.name
    assert job.spec.runtime_ref.kind == "ClusterTrainingRuntime"
    assert job.spec.trainer.num_nodes == 2 and job.spec.trainer.num_proc_per_node == 8
    gpus = job.spec.trainer.resources_per_node.limits["nvidia.com/gpu"].actual_instance
    assert parse_quantity(gpus) == job.spec.trainer.num_proc_per_node  # one process per GPU


def test_v2_command_mounts_and_configmap(v2_docs, docs, tmp_path):
    """The runtime runs the PyTorchJob's command on the config mounted from a ConfigMap; the
    TrainJob patches that volume with its own ConfigMap, which holds the same run config as
    the v1 example's, and the FSDP environment is the v1 example's."""
    runtime, job, cm = v2_docs["ClusterTrainingRuntime"], v2_docs["TrainJob"], v2_docs["ConfigMap"]
    c = node_container(runtime)
    assert c["command"] == container(docs["PyTorchJob"])["command"]
    pod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    folder, key = os.path.split(c["command"][-1])
    (vol,) = [v for v in pod["volumes"] if "configMap" in v]
    assert mounts[vol["name"]] == folder and key == "run.yaml"
    (patch,) = job["spec"]["runtimePatches"]
    (rj,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rj["name"] == "node"
    (pvol,) = rj["template"]["spec"]["template"]["spec"]["volumes"]
    assert pvol["name"] == vol["name"] and pvol["configMap"]["name"] == cm["metadata"]["name"]
    assert key in cm["data"] and cm["data"] == docs["ConfigMap"]["data"]
    v1_env = {e["name"]: e["value"] for e in container(docs["PyTorchJob"])["env"]
              if e["name"].startswith(("FSDP_", "ACCELERATE_"))}
    assert {e["name"]: e["value"] for e in job["spec"]["trainer"]["env"]} == v1_env


V2_RUNTIME_CONTAINER = ("spec", "template", "spec", "replicatedJobs", 0, "template", "spec",
                        "template", "spec", "containers", 0)
RC = "spec.template.spec.replicatedJobs[0].template.spec.template.spec.containers[0]"
# name: (document, change, expected problems)
V2_MUTATIONS = {
    "typo in the ML policy": (
        "ClusterTrainingRuntime", lambda d: rename(d["spec"], "mlPolicy", "mlpolicy"),
        ["ClusterTrainingRuntime: spec.mlpolicy: is not a field of "
         "TrainerV1alpha1TrainingRuntimeSpec"]),
    "numProcPerNode in the torch policy (removed in Trainer v2.2)": (
        "ClusterTrainingRuntime",
        lambda d: d["spec"]["mlPolicy"]["torch"].update(numProcPerNode="auto"),
        ["ClusterTrainingRuntime: spec.mlPolicy.torch.numProcPerNode: is not a field of "
         "TrainerV1alpha1TorchMLPolicySource"]),
    "typo deep in the pod": (
        "ClusterTrainingRuntime", lambda d: rename(at(d, V2_RUNTIME_CONTAINER), "volumeMounts",
                                                   "volumemounts"),
        [f"ClusterTrainingRuntime: {RC}.volumemounts: is not a field of IoK8sApiCoreV1Container"]),
    "unknown imagePullPolicy": (
        "ClusterTrainingRuntime",
        lambda d: at(d, V2_RUNTIME_CONTAINER).update(imagePullPolicy="Sometimes"),
        ["ClusterTrainingRuntime: spec.template.spec.replicatedJobs[0].template.spec.template."
         "spec.containers[0].imagePullPolicy: Value error, must be one of enum values "
         "('Always', 'IfNotPresent', 'Never')"]),
    "numNodes a string": (
        "TrainJob", lambda d: d["spec"]["trainer"].update(numNodes="2"),
        ["TrainJob: spec.trainer.numNodes: Input should be a valid integer"]),
    "missing runtimeRef": (
        "TrainJob", lambda d: d["spec"].pop("runtimeRef"),
        ["TrainJob: spec.runtimeRef: Field required"]),
    "missing patch manager": (
        "TrainJob", lambda d: d["spec"]["runtimePatches"][0].pop("manager"),
        ["TrainJob: spec.runtimePatches[0].manager: Field required"]),
    "unknown runtimeRef kind": (
        "TrainJob", lambda d: d["spec"]["runtimeRef"].update(kind="PyTorchRuntime"),
        ["TrainJob: spec.runtimeRef.kind: 'PyTorchRuntime' is not one of "
         "['ClusterTrainingRuntime', 'TrainingRuntime']"]),
    "v1 field in a TrainJob": (
        "TrainJob", lambda d: d["spec"].update(runPolicy={"cleanPodPolicy": "None"}),
        ["TrainJob: spec.runPolicy: is not a field of TrainerV1alpha1TrainJobSpec"]),
    "memory not a quantity": (
        "TrainJob", lambda d: d["spec"]["trainer"]["resourcesPerNode"]["requests"].update(
            memory="lots"),
        ["TrainJob: spec.trainer.resourcesPerNode.requests.memory: 'lots' is not a resource "
         "quantity"]),
}


@pytest.mark.parametrize("name", sorted(V2_MUTATIONS))
def test_broken_v2_document_fails_the_schema_check(v2_docs, name):
    kind, change, expected = V2_MUTATIONS[name]
    doc = copy.deepcopy(v2_docs[kind])
    change(doc)
    assert v2_errors(doc) == expected
    assert v2_errors(v2_docs[kind]) == []


# -------------------------------------------------------------- fmtune k8s render


@pytest.fixture(scope="module")
def run_yaml(tmp_path_factory):
    """A LoRA run config naming a real (tiny) model folder: the plan reads its config.json
    and tokenizer; the data and output paths are the cluster's."""
    from fmtune.testing import DEMO_TEXTS, build_tiny_model

    d = tmp_path_factory.mktemp("render")
    model = build_tiny_model(d / "model", DEMO_TEXTS)
    path = d / "lora-run.yaml"
    path.write_text(f"plugins: [lora]\nmodel_name_or_path: {model}\n"
                    "training_data_path: /workspace/data/train.jsonl\n"
                    "output_dir: /workspace/runs/tiny\nmax_seq_length: 512\n"
                    "per_device_train_batch_size: 4\nr: 8\n", encoding="utf-8")
    return str(path)


def _render(capsys, *argv):
    code = k8s.cmd_k8s(["render", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return [d for d in yaml.safe_load_all(out) if d is not None]


def test_render_both_formats_validate(run_yaml, capsys):
    found = _render(capsys, "--config", run_yaml, "--nodes", "2", "--gpus-per-node", "4",
                    "--format", "both", "--image", "ghcr.io/acme/fmtune:0.1.0",
                    "--accelerate_config", FSDP_YAML, "--queue", "team-a")
    kinds = [d["kind"] for d in found]
    assert kinds == ["ConfigMap", "ClusterTrainingRuntime", "TrainJob", "PyTorchJob"]
    by = {d["kind"]: d for d in found}
    for kind in ("ConfigMap", "ClusterTrainingRuntime", "TrainJob"):
        assert v2_errors(by[kind]) == [], kind
    for kind in ("ConfigMap", "PyTorchJob"):
        assert schema_errors(by[kind]) == [], kind
    with open(run_yaml, encoding="utf-8") as f:
        assert by["ConfigMap"]["data"] == {"run.yaml": f.read()}  # the run config verbatim
    job, pj = by["TrainJob"], by["PyTorchJob"]
    assert job["metadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "team-a"}
    assert job["spec"]["trainer"]["numNodes"] == 2
    assert job["spec"]["trainer"]["numProcPerNode"] == 4
    assert job["spec"]["trainer"]["image"] == "ghcr.io/acme/fmtune:0.1.0"
    assert pj["spec"]["nprocPerNode"] == "4"
    assert pj["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    memory = job["spec"]["trainer"]["resourcesPerNode"]["requests"]["memory"]
    assert container(pj)["resources"]["requests"]["memory"] == memory
    # (4 processes x the stated 4 GiB host allowance + one copy of the tiny weights: FSDP's
    # cpu_ram_efficient_loading) x 1.25, rounded up to whole Gi
    assert memory == "21Gi"
    env = {e["name"]: e["value"] for e in job["spec"]["trainer"]["env"]}
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "1"
    assert job["metadata"]["annotations"]["fmtune/predicted-gpu-memory-per-process"]


def test_render_v1_single_node_has_no_workers_and_the_command_parses(run_yaml, capsys):
    from torch.distributed.run import get_args_parser

    cm, pj = _render(capsys, "--config", run_yaml, "--nodes", "1", "--gpus-per-node", "8",
                     "--format", "v1", "--memory", "96Gi")
    assert schema_errors(cm) == schema_errors(pj) == []
    assert sorted(pj["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    c = container(pj)
    assert c["resources"] == {"limits": {"nvidia.com/gpu": 8}, "requests": {"memory": "96Gi"}}
    args = get_args_parser().parse_args(c["command"][1:])
    assert args.module and args.training_script == "fmtune.cli"
    assert args.training_script_args == ["train", "--config", "/etc/fmtune/run.yaml"]


def test_render_refuses_a_run_that_does_not_fit_the_gpu(run_yaml, capsys):
    code = k8s.cmd_k8s(["render", "--config", run_yaml, "--nodes", "1", "--gpus-per-node", "1",
                        "--gpu-memory", "0.01"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    # the plan wraps the model with the LoRA plugin, whose info line may come first when
    # fmtune's log handler is installed (as under the CLI): the error is one line, the last
    errors = [line for line in err.splitlines() if line.startswith("fmtune: error:")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0]
    assert errors[0].startswith("fmtune: error: fmtune plan predicts ")
    assert "more than --gpu-memory 0.01 GB" in errors[0]


def test_render_errors_are_one_line(tmp_path, run_yaml, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins: [lora]\nmodel_name_or_path: m\nlearning_rat: 0.1\n",
                   encoding="utf-8")
    for argv, needle in (
            (["render", "--config", str(bad)], "learning_rat"),
            (["render", "--config", str(tmp_path / "none.yaml")], "none.yaml"),
            (["render", "--config", run_yaml, "--nodes", "0"], "--nodes"),
            (["render", "--config", run_yaml, "--format", "v3"], "v3"),
            (["rendre"], "rendre")):
        code = k8s.cmd_k8s(argv)
        out, err = capsys.readouterr()
        assert code == 2 and out == "", argv
        assert err.startswith("fmtune: error:") and err.count("\n") == 1 and needle in err, err


# ------------------------------------------------------------------------- FSDP2
#
# examples/accelerate/fsdp2.yaml beside fsdp.yaml. Nothing runs FSDP on a machine without a
# GPU, so these check the configuration path only: accelerate's launcher derives the
# environment, accelerate's FSDP plugin accepts it, fmtune fills in the decoder layer class
# for both versions, and FSDP2's auto-wrap policy then wraps exactly the decoder layers.
FSDP2_YAML = os.path.join(ROOT, "examples", "accelerate", "fsdp2.yaml")


def _launch_env(path):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", path, "--main_process_port", "0", "-m", "fmtune.cli"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}


@pytest.mark.parametrize("path,version", [(FSDP_YAML, 1), (FSDP2_YAML, 2)])
def test_fsdp_configs_parse_and_wrap_the_decoder_layer(fmtune_tiny_model, monkeypatch, path,
                                                       version):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import AutoModelForCausalLM

    from fmtune.distributed import prepare_fsdp

    # prepare_fsdp writes os.environ itself: recorded here so that the test leaves none behind
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP")
    env = _launch_env(path)
    assert env["FSDP_VERSION"] == str(version) and env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env  # left to fmtune
    # the plugin refuses sync_module_states' parameter init on CPU: that pair is a GPU matter
    env.update(FSDP_CPU_RAM_EFFICIENT_LOADING="false", FSDP_SYNC_MODULE_STATES="false")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    model = AutoModelForCausalLM.from_pretrained(fmtune_tiny_model)
    assert prepare_fsdp(model) == ["LlamaDecoderLayer"]
    assert os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaDecoderLayer"
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == version
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    if version == 2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

        assert plugin.reshard_after_forward is True  # FULL_SHARD's FSDP2 spelling
        assert plugin.forward_prefetch is None and plugin.backward_prefetch is None
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        wrapped = [type(m).__name__ for m in model.modules() if policy(m)]
        assert wrapped == ["LlamaDecoderLayer"] * model.config.num_hidden_layers
    else:
        assert plugin.sharding_strategy.name == "FULL_SHARD"


def test_fsdp2_env_on_a_cpu_machine_runs_on_cpu_and_fsdp1_is_refused(monkeypatch):
    """FSDP2 runs on CPU over gloo (docs/distributed.md; the real run is in
    tests/test_distributed.py); FSDP1 is refused before loading."""
    import os

    from fmtune.config import ConfigError
    from fmtune.distributed import setup_process

    monkeypatch.setenv("ACCELERATE_USE_CPU", "false")  # restored after the test
    for k, v in {**_launch_env(FSDP2_YAML), "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    setup_process()
    assert os.environ["ACCELERATE_USE_CPU"] == "true"
    for k, v in {**_launch_env(FSDP_YAML), "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    with pytest.raises(ConfigError, match="FSDP needs GPUs and this machine has none for FSDP1"):
        setup_process()


def test_render_with_fsdp2(run_yaml, capsys):
    _, runtime, job = _render(capsys, "--config", run_yaml, "--nodes", "1",
                              "--gpus-per-node", "2", "--accelerate_config", FSDP2_YAML)
    assert v2_errors(runtime) == v2_errors(job) == []
    env = {e["name"]: e["value"] for e in job["spec"]["trainer"]["env"]}
    assert env == _launch_env(FSDP2_YAML)
    assert env["FSDP_VERSION"] == "2"
