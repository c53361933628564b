"""fmtune-evaluation: lm-evaluation-harness tasks (the project's own, yours, lm-eval's) and
IFEval on models fmtune loads, offline; task scores during training (``eval_tasks``).

See plugins/evaluation/README.md and docs/evaluation.md."""

__version__ = "0.1.0"
