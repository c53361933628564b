"""lm-evaluation-harness on a model fmtune loaded: tasks from local YAML, offline.

:class:`TaskRun` is built before any model loads (task names, include paths, an IFEval
prompts file and the output folder are checked there, so a typo costs nothing); ``run``
evaluates a loaded ``(model, tokenizer)`` through lm-eval's Python API
(``HFLM(pretrained=model)``, ``simple_evaluate``) and returns lm-eval's results dict;
:func:`write_results` writes it (atomically) and :func:`summary_table` renders lm-eval's table.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any, Iterable

from fmtune.config import ConfigError, suggest
from fmtune.records import folder_problem, write_json

from .offline import offline_datasets, punkt_is_projects, use_punkt

log = logging.getLogger("fmtune")
TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
IFEVAL_TASKS = ("ifeval", "fmtune_ifeval")
LM_EVAL = "lm-eval[ifeval]>=0.4.13,<0.5"


def require_lm_eval() -> None:
    import importlib

    try:
        importlib.import_module("lm_eval")
    except ImportError as e:
        raise ConfigError(f"evaluating tasks needs the lm-eval package, which fails to import "
                          f"({e}): pip install fmtune-evaluation (it requires {LM_EVAL})") from None


def _quiet_lm_eval() -> None:
    if os.environ.get("FMTUNE_VERBOSE", "").lower() not in ("1", "true", "yes"):
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        logging.getLogger("lm-eval").setLevel(logging.ERROR)


def split_list(value: Any) -> list[str]:
    items = value if isinstance(value, (list, tuple)) else [value] if value else []
    return [p.strip() for item in items for p in str(item).split(",") if p.strip()]


class TaskRun:
    """Tasks checked and built (data read) before a model loads; ``run(model, tokenizer)``."""

    def __init__(self, tasks: Iterable[str] | str, include_path: Iterable[str] | str = (),
                 limit: float | None = None, batch_size: int = 8,
                 num_fewshot: int | None = None, max_new_tokens: int | None = None,
                 ifeval_prompts: str | None = None, apply_chat_template: bool = False,
                 output_path: str | None = None, log_samples: bool = False,
                 what: str = "--tasks"):
        self._tmp: str | None = None
        self.names = split_list(tasks)
        self.what = what
        if not self.names:
            raise ConfigError(f"{what}: no task named")
        if limit is not None and not limit > 0:
            raise ConfigError(f"--limit must be > 0 (a count, or a fraction below 1), got {limit}")
        if batch_size < 1:
            raise ConfigError(f"--batch_size must be >= 1, got {batch_size}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ConfigError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
        self.limit = int(limit) if limit is not None and limit >= 1 else limit
        self.batch_size, self.num_fewshot = batch_size, num_fewshot
        self.max_new_tokens, self.apply_chat_template = max_new_tokens, apply_chat_template
        self.log_samples = log_samples
        self.output_path = output_path
        if output_path:
            folder = output_path if not output_path.endswith(".json") else (
                os.path.dirname(os.path.abspath(output_path)))
            why = folder_problem(folder)
            if why:
                raise ConfigError(f"--output_path {folder}: {why}")
        paths = [os.path.abspath(p) for p in split_list(include_path)]
        for path in paths:
            if not os.path.exists(path):
                raise ConfigError(f"--include_path {path}: no such folder or file")
        require_lm_eval()
        _quiet_lm_eval()
        self.punkt = use_punkt()  # before lm-eval's IFEval module is imported: no download
        if ifeval_prompts:
            if not set(self.names) & set(IFEVAL_TASKS):
                raise ConfigError("--ifeval_prompts needs --tasks ifeval (or fmtune_ifeval)")
            from .ifeval import check_prompts

            check_prompts(ifeval_prompts)
            self._tmp = tempfile.mkdtemp(prefix="fmtune-ifeval-")
            for name in set(self.names) & set(IFEVAL_TASKS):
                self._write_ifeval_task(name, os.path.abspath(ifeval_prompts))
            paths.append(self._tmp)
        try:
            self.manager = self._manager([TASKS_DIR, *paths])
            self.tasks = self._load()
        except BaseException:
            self.close()
            raise

    def _write_ifeval_task(self, name: str, prompts: str) -> None:
        import yaml

        spec = {"include": os.path.join(TASKS_DIR, "fmtune_ifeval", "fmtune_ifeval.yaml"),
                "task": name, "dataset_kwargs": {"data_files": {"train": prompts}}}
        if name == "ifeval":  # lm-eval's own answer length
            spec["generation_kwargs"] = {"until": [], "do_sample": False, "temperature": 0.0,
                                         "max_gen_toks": 1280}
        with open(os.path.join(self._tmp, f"{name}.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(spec, f)

    def _manager(self, paths: list[str]):
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=paths, include_defaults=False)
        missing = [n for n in self.names if n not in manager.all_tasks]
        if missing:  # lm-eval's own tasks: indexing thousands of YAML files takes a while
            log.info("indexing lm-eval's built-in tasks for %s", ", ".join(missing))
            manager = TaskManager(include_path=paths)
            for name in self.names:
                if name not in manager.all_tasks and not os.path.isfile(name):
                    raise ConfigError(f"{self.what}: unknown task {name!r}"
                                      f"{suggest(name, manager.all_tasks)}; `--include_path "
                                      "DIR` adds the task YAML files in DIR")
        return manager

    def _load(self) -> list[Any]:
        """Build the tasks (lm-eval reads their data here): a dataset that cannot be read is
        a one-line error before the model loads."""
        try:
            with offline_datasets():
                loaded = self.manager.load(self.names)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - datasets/lm-eval raise many kinds
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            hint = ""
            if "ifeval" in self.names and "google/IFEval" in str(e) + repr(e.__cause__):
                hint = ("; with no network, pass --ifeval_prompts FILE (IFEval's "
                        "input_data.jsonl, or prompts of yours in its format)")
            raise ConfigError(f"{self.what} {','.join(self.names)}: cannot build the tasks: "
                              f"{type(e).__name__}: {first}{hint}") from None
        self.loaded = loaded
        self.leaves = list(loaded["tasks"].values())
        if not self.leaves:
            raise ConfigError(f"{self.what}: no task to run in {','.join(self.names)}")
        # built tasks are passed on (their data is read once); groups go by name
        return self.names if loaded["groups"] else self.leaves

    @property
    def uses_ifeval(self) -> bool:
        def module(task: Any) -> str:
            fn = getattr(getattr(task, "config", None), "process_results", None)
            return getattr(fn, "__module__", "") or ""

        return any("ifeval" in module(t) for t in self.leaves)

    def run(self, model: Any, tokenizer: Any, full: bool = True) -> dict[str, Any]:
        """lm-eval's results dict for ``model`` (evaluation mode, no gradients; the model's
        training mode and the global random generators are restored afterwards).

        ``full``: through ``lm_eval.simple_evaluate``, the document its CLI writes (with the
        environment report, which runs ``pip`` and takes seconds); otherwise (evaluation
        during training) ``lm_eval.evaluator.evaluate`` on the tasks built once, with the same
        overrides and seeds."""
        import lm_eval
        import torch
        from lm_eval.models.huggingface import HFLM

        was_training = getattr(model, "training", False)
        model.eval()
        rng = _rng_state()  # lm-eval seeds the global generators: a training run keeps its own
        gen = {"max_gen_toks": self.max_new_tokens} if self.max_new_tokens else None
        try:
            with torch.no_grad(), offline_datasets():
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
                if full:
                    results = lm_eval.simple_evaluate(
                        model=lm, tasks=self.tasks, task_manager=self.manager,
                        limit=self.limit, num_fewshot=self.num_fewshot, gen_kwargs=gen,
                        bootstrap_iters=0, log_samples=self.log_samples,
                        apply_chat_template=self.apply_chat_template)
                else:
                    results = self._evaluate(lm, gen)
        finally:
            _restore_rng(rng)
            if was_training:
                model.train()
        if results is None:  # not rank 0
            return {}
        results["fmtune"] = {"tasks_from": TASKS_DIR}
        if self.uses_ifeval:
            results["fmtune"]["punkt_tab"] = self.punkt
            results["fmtune"]["punkt_model"] = (
                "fmtune-evaluation's own Punkt model (trained on the project's text; an "
                "installed nltk punkt_tab is used instead when there is one)"
                if punkt_is_projects(self.punkt) else "installed nltk punkt_tab")
        return results

    def _evaluate(self, lm: Any, gen: dict | None) -> dict[str, Any] | None:
        """``simple_evaluate``'s steps without its environment report: its task overrides
        (answer length, few-shot count, few-shot seed), its seeds, then ``evaluate``."""
        import random

        import numpy as np
        import torch
        from lm_eval.evaluator import evaluate

        for task in self.leaves:
            if gen and task.get_config("output_type") == "generate_until":
                task.set_config(key="generation_kwargs", value=gen, update=True)
            if self.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=self.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=1234)
        random.seed(0)
        np.random.seed(1234)
        torch.manual_seed(1234)
        return evaluate(lm=lm, task_dict=self.loaded, limit=self.limit, bootstrap_iters=0,
                        log_samples=False, apply_chat_template=self.apply_chat_template)

    def close(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __del__(self):
        self.close()


def _rng_state() -> tuple:
    import random

    import numpy as np
    import torch

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _restore_rng(state: tuple) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])
    if state[3] is not None:
        torch.cuda.set_rng_state_all(state[3])


def results_file(output_path: str) -> str:
    return output_path if output_path.endswith(".json") else os.path.join(output_path,
                                                                          "results.json")


def write_results(results: dict[str, Any], output_path: str) -> list[str]:
    """lm-eval's results JSON (its CLI's content, without the samples) at ``output_path``
    (a ``.json`` file, or ``results.json`` in that folder), and with samples one
    ``samples_TASK.jsonl`` each next to it. Every file is written atomically."""
    import json

    from lm_eval.utils import handle_non_serializable

    path = results_file(output_path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    samples = results.pop("samples", None)
    write_json(path, results, default=handle_non_serializable, ensure_ascii=False)
    written = [path]
    for task, rows in (samples or {}).items():
        target = os.path.join(os.path.dirname(os.path.abspath(path)), f"samples_{task}.jsonl")
        text = "".join(json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n"
                       for r in rows)
        tmp = f"{target}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
        written.append(target)
    if samples is not None:
        results["samples"] = samples
    return written


def summary_table(results: dict[str, Any]) -> str:
    """lm-eval's own markdown table(s) of the results."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text.rstrip("\n")


def scores(results: dict[str, Any]) -> dict[str, float]:
    """Flat ``{TASK_METRIC: value}`` of lm-eval's results (stderr and non-numbers left out).
    The filter name is dropped when it is ``none`` or the metric has one filter, and kept
    as ``TASK_METRIC_FILTER`` otherwise: ``fmtune_translate_exact_match``,
    ``ifeval_prompt_level_strict_acc``."""
    out: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, values in (results.get(section) or {}).items():
            metrics: dict[str, list[tuple[str, float]]] = {}
            for key, value in values.items():
                metric, sep, filt = key.partition(",")
                if not sep or metric.endswith("_stderr") or isinstance(value, bool) \
                        or not isinstance(value, (int, float)):
                    continue
                metrics.setdefault(metric, []).append((filt, float(value)))
            for metric, entries in metrics.items():
                for filt, value in entries:
                    name = f"{task}_{metric}" if len(entries) == 1 or filt == "none" \
                        else f"{task}_{metric}_{filt}"
                    out[name.replace("-", "_").replace(" ", "_")] = value
    return out
