"""The fmtune hooks of the evaluation plugin (entry point ``evaluation``) and what
``fmtune evaluate --tasks`` calls.

``fmtune evaluate --tasks T1,T2`` (core command) finds this plugin as the owner of the option
``eval_tasks`` (entry point group ``fmtune.implied_by``) and calls :func:`prepare_tasks`
before the model loads, then ``TaskRun.run(model, tokenizer)``, :func:`write_results` and
:func:`summary_table`.

During training, ``eval_tasks`` runs lm-eval tasks on the main process:

* at every evaluation the trainer makes (``eval_strategy`` steps/epoch, with validation
  data): the scores join the evaluation's metrics as ``eval_TASK_METRIC``, before the trainer
  logs them, so they reach ``training_logs.jsonl``, trackers, ``on_evaluate`` (trainer
  controller rules) and ``metric_for_best_model`` / ``load_best_model_at_end``;
* or every ``eval_tasks_steps`` steps on their own (no validation data needed): logged
  through the trainer's ``log`` (``training_logs.jsonl``, trackers, ``on_log`` rules).
"""

from __future__ import annotations

import logging
from typing import Any

from fmtune import hookimpl
from fmtune.logs import append_metrics
from fmtune.stash import StashKey

from .harness import TaskRun, scores, split_list, summary_table, write_results

log = logging.getLogger("fmtune")

__all__ = ["TaskRun", "prepare_tasks", "scores", "summary_table", "write_results"]

OPTIONS = ("eval_tasks", "eval_tasks_steps", "eval_tasks_limit", "eval_tasks_include_path",
           "eval_tasks_batch_size", "eval_tasks_max_new_tokens", "eval_ifeval_prompts")
# per-run state, on the run's config
RUNNER = StashKey[TaskRun]()  # the tasks, checked and built in validate_config
_CACHE = StashKey[dict]()  # {"step", "values"}: one run of the tasks per step
_LOGGED = StashKey[set]()  # the metric names the tasks gave, for training_logs.jsonl
_LAST = StashKey[dict]()  # the latest scores, for run_summary.json


def prepare_tasks(tasks: Any, **options: Any) -> TaskRun:
    """What ``fmtune evaluate --tasks`` calls before it loads the model: the tasks checked
    and built (:class:`TaskRun`); options as its constructor's."""
    return TaskRun(tasks, **options)


@hookimpl
def add_options(register):
    register("eval_tasks", list, None,
             "lm-eval tasks to run during training (the project's fmtune_translate, "
             "fmtune_translate_mc, fmtune_ifeval, tasks of --eval_tasks_include_path, or "
             "lm-eval's own): at every evaluation (eval_strategy) as eval_TASK_METRIC metrics, "
             "usable as metric_for_best_model and by trainer controller rules; or every "
             "eval_tasks_steps steps")
    register("eval_tasks_steps", int, 0,
             "run eval_tasks every N optimizer steps on their own (logged like any metric; "
             "no validation data needed) instead of at each evaluation; 0: at each evaluation")
    register("eval_tasks_limit", float, None,
             "examples per task (a count; a fraction below 1 of each task)")
    register("eval_tasks_include_path", list, None,
             "folders (or files) of lm-eval task YAMLs for eval_tasks")
    register("eval_tasks_batch_size", int, 8, "lm-eval batch size for eval_tasks")
    register("eval_tasks_max_new_tokens", int, None,
             "answer length for generation tasks (lm-eval's max_gen_toks), instead of each "
             "task's own")
    register("eval_ifeval_prompts", str, None,
             "IFEval prompts file (JSONL in IFEval's format) for eval_tasks ifeval")


def _runner(config: Any) -> TaskRun:
    return TaskRun(config.get("eval_tasks"), what="eval_tasks",
                   include_path=split_list(config.get("eval_tasks_include_path")),
                   limit=config.get("eval_tasks_limit"),
                   batch_size=config.get("eval_tasks_batch_size") or 8,
                   max_new_tokens=config.get("eval_tasks_max_new_tokens"),
                   ifeval_prompts=config.get("eval_ifeval_prompts"))


@hookimpl
def validate_config(config, pm):
    if not config.get("eval_tasks"):
        given = [o for o in ("eval_tasks_steps", "eval_ifeval_prompts", "eval_tasks_limit",
                             "eval_tasks_include_path") if config.get(o)]
        return [f"{o} is set but eval_tasks is not" for o in given] or None
    from fmtune.config import ConfigError

    steps = config.get("eval_tasks_steps") or 0
    if steps < 0:
        return f"eval_tasks_steps must be >= 0, got {steps}"
    if steps == 0 and str(config.get("eval_strategy") or "no") == "no":
        return ("eval_tasks needs evaluations to run at: set eval_strategy (steps or epoch, "
                "with validation_data_path), or eval_tasks_steps N")
    try:
        config.stash[RUNNER] = _runner(config)
    except ConfigError as e:
        return str(e)
    return None


def _get_runner(config: Any) -> TaskRun:
    runner = config.stash.get(RUNNER)
    if runner is None:  # validate_config was not called (a program driving the pipeline)
        runner = config.stash[RUNNER] = _runner(config)
    return runner


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _shared(values: dict[str, float] | None) -> dict[str, float]:
    """Rank 0's scores on every process (each rank decides best checkpoints and rules)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values or {}
    box = [values]
    dist.broadcast_object_list(box, src=0)
    return box[0] or {}


def run_tasks(trainer: Any, config: Any, prefix: str = "eval") -> dict[str, float]:
    """The tasks' scores for the trainer's current model, as ``{prefix}_TASK_METRIC``; lm-eval
    runs on the main process only."""
    values = None
    if _is_main():
        runner = _get_runner(config)
        model = trainer.model
        tokenizer = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer")
        results = runner.run(model, tokenizer, full=False)
        values = {f"{prefix}_{k}": v for k, v in scores(results).items()}
        config.stash.setdefault(_LOGGED, set()).update(values)
        config.stash[_LAST] = {"step": trainer.state.global_step, "values": values}
        log.info("eval_tasks at step %d: %s", trainer.state.global_step,
                 ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    return _shared(values)


@hookimpl(wrapper=True)
def build_trainer(config):
    trainer = yield
    if not config.get("eval_tasks") or config.get("eval_tasks_steps"):
        return trainer
    original = trainer.evaluation_loop

    def evaluation_loop(*args: Any, **kwargs: Any):
        output = original(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        state = trainer.state
        cache = config.stash.setdefault(_CACHE, {})
        if cache.get("step") != state.global_step:  # several eval datasets: run once a step
            cache.update(step=state.global_step, values=run_tasks(trainer, config, "eval"))
        extra = {prefix + k.removeprefix("eval"): v for k, v in cache["values"].items()}
        output.metrics.update(extra)
        return output

    trainer.evaluation_loop = evaluation_loop
    return trainer




@hookimpl
def on_log(run, logs):
    """Task scores go to training_logs.jsonl like the losses (one line per metric, named as
    the trainer logs them: ``eval_TASK_METRIC``)."""
    names = run.config.stash.get(_LOGGED) or ()
    mine = {k: k for k in logs if k in names}
    if mine:
        append_metrics(run, logs, mine)
    return None


@hookimpl
def on_step(run):
    config = run.config
    steps = config.get("eval_tasks_steps") or 0
    if not config.get("eval_tasks") or not steps or run.state.global_step % steps:
        return None
    values = run_tasks(run.trainer, config, "eval")
    if values:
        run.trainer.log(dict(values))
    return None


@hookimpl
def on_train_end(run, summary):
    """run_summary.json: the tasks, and their scores at the last step they ran (what
    training_logs.jsonl holds step by step)."""
    if not run.config.get("eval_tasks"):
        return None
    last = run.config.stash.get(_LAST) or {}
    summary["eval_tasks"] = {"tasks": split_list(run.config.get("eval_tasks")),
                             "step": last.get("step"), "scores": last.get("values", {})}
    return None
