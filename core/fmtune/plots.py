"""The loss plot: training and validation loss against step, learning rate on a second axis,
and, when the run logged task scores (``eval_*`` metrics other than the loss, e.g. the
evaluation plugin's ``eval_TASK_METRIC``), a second panel with them.

``plot_loss(output_dir)`` draws ``OUTPUT_DIR/loss.png`` from
``training_logs.jsonl`` (written by every run) and, when it is given or can be
found, the learning-rate history: ``plot_loss`` looks for it in the latest
``checkpoint-N/trainer_state.json``; the end-of-run plugin passes the
trainer's own, complete history. Without a learning rate there is no second
axis. matplotlib is imported inside the functions (Agg backend, no display
needed), so importing this module costs nothing.

At the end of a run the plot is drawn by a child process (:class:`BackgroundPlot`): started
when training begins, it imports matplotlib (~0.6 s of CPU) on another core while the run
trains, and draws when training ends, while the run saves its model; the run waits for it
before it returns, so loss.png is complete when ``fmtune train`` exits.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from .config import ConfigError
from .logs import FILENAME as LOGS_FILE

PLOT_FILE = "loss.png"
FIGSIZE = (8.0, 5.0)  # inches
DPI = 100  # so loss.png is 800 x 500 pixels
TRAIN_COLOR, EVAL_COLOR, LR_COLOR = "#1f77b4", "#ff7f0e", "#2ca02c"  # blue, orange, green
# task scores (metrics logged as eval_*, e.g. the evaluation plugin's eval_TASK_METRIC) get a
# second panel below the losses, one line each in these colours (purple, brown, pink, ...)
SCORE_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
SCORES_HEIGHT = 3.0  # inches added for the scores panel

Points = list[tuple[int, float]]


@dataclass
class LossPlot:
    """What was drawn, and where."""

    path: str
    train: Points = field(default_factory=list)
    eval: Points = field(default_factory=list)
    learning_rate: Points = field(default_factory=list)
    learning_rate_from: str | None = None
    scores: dict[str, Points] = field(default_factory=dict)

    def describe(self) -> str:
        lr = (f", learning rate from {self.learning_rate_from}" if self.learning_rate
              else ", no learning rate")
        scores = "".join(f", {len(p)} {name} points" for name, p in self.scores.items())
        return (f"{self.path}: {len(self.train)} training and {len(self.eval)} validation loss "
                f"points{lr}{scores}")


def read_losses(output_dir: str) -> tuple[Points, Points]:
    """(training, validation) loss points ``(step, value)`` from ``training_logs.jsonl``."""
    train, evals, _ = read_logs(output_dir)
    return train, evals


def read_logs(output_dir: str) -> tuple[Points, Points, dict[str, Points]]:
    """(training loss, validation loss, scores) points ``(step, value)`` from
    ``training_logs.jsonl``; scores are the other metrics named ``eval_*``, by name."""
    path = os.path.join(output_dir, LOGS_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: not found (is {output_dir} the output_dir of an fmtune run?)")
    train: Points = []
    evals: Points = []
    scores: dict[str, Points] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                name, data = record["name"], record["data"]
                point = (int(data["step"]), float(data["value"]))
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{path}:{lineno}: not a training log record "
                                  f"({type(e).__name__}: {e})") from None
            if name == "training_loss":
                train.append(point)
            elif name == "validation_loss":
                evals.append(point)
            elif str(name).startswith("eval_"):
                scores.setdefault(str(name), []).append(point)
    return train, evals, scores


def latest_checkpoint(output_dir: str) -> str | None:
    """The ``checkpoint-N`` folder with the largest N, or None."""
    best, best_step = None, -1
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            m = re.fullmatch(r"checkpoint-(\d+)", name)
            full = os.path.join(output_dir, name)
            if m and os.path.isdir(full) and int(m.group(1)) > best_step:
                best, best_step = full, int(m.group(1))
    return best


def learning_rates(log_history: list[dict]) -> Points:
    """``(step, learning_rate)`` points of a trainer's ``log_history``."""
    return [(int(h["step"]), float(h["learning_rate"])) for h in log_history
            if "learning_rate" in h and "step" in h]


def checkpoint_learning_rates(output_dir: str) -> tuple[Points, str | None]:
    """Learning rates from the latest checkpoint's ``trainer_state.json``, and that file."""
    ckpt = latest_checkpoint(output_dir)
    path = os.path.join(ckpt, "trainer_state.json") if ckpt else None
    if not path or not os.path.isfile(path):
        return [], None
    try:
        with open(path, encoding="utf-8") as f:
            history = json.load(f).get("log_history", [])
        return learning_rates(history), path
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return [], None


def plot_loss(output_dir: str, path: str | None = None, lr: Points | None = None,
              lr_from: str | None = None, title: str | None = None) -> LossPlot:
    """Draw the loss plot of the run in ``output_dir`` to ``path`` (default ``loss.png`` there).

    ``lr``: learning-rate points to draw; ``None`` reads them from the latest checkpoint.
    Raises :class:`ConfigError` when there is no training log or no loss to draw.
    """
    train, evals, scores = read_logs(output_dir)
    if not train and not evals:
        raise ConfigError(f"{os.path.join(output_dir, LOGS_FILE)}: no loss logged yet, "
                          "nothing to plot")
    if lr is None:
        lr, lr_from = checkpoint_learning_rates(output_dir)
    plot = LossPlot(path or os.path.join(output_dir, PLOT_FILE), train, evals, list(lr),
                    lr_from if lr else None, scores)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # The object API, not pyplot: no global figure state, no GUI backend, thread-safe.
    width, height = FIGSIZE
    fig = Figure(figsize=(width, height + (SCORES_HEIGHT if scores else 0)), dpi=DPI)
    FigureCanvasAgg(fig)
    if scores:
        ax, ax_scores = fig.subplots(2, 1, sharex=True, height_ratios=(height, SCORES_HEIGHT))
    else:
        ax, ax_scores = fig.add_subplot(), None
    handles = []
    if train:
        handles += ax.plot(*zip(*train), color=TRAIN_COLOR, marker="o" if len(train) <= 50 else None,
                           markersize=3, linewidth=1.5, label="training loss")
    if evals:
        handles += ax.plot(*zip(*evals), color=EVAL_COLOR, marker="s", markersize=4,
                           linewidth=1.5, label="validation loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if plot.learning_rate:
        ax2 = ax.twinx()
        handles += ax2.plot(*zip(*plot.learning_rate), color=LR_COLOR, linestyle="--",
                            linewidth=1.2, label="learning rate")
        ax2.set_ylabel("learning rate", color=LR_COLOR)
        ax2.tick_params(axis="y", colors=LR_COLOR)
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax2.set_ylim(bottom=0)
    ax.legend(handles=handles, loc="upper right", fontsize="small")
    ax.set_title(title or f"fmtune: {os.path.basename(os.path.abspath(output_dir))}")
    if ax_scores is not None:
        for i, (name, points) in enumerate(sorted(scores.items())):
            ax_scores.plot(*zip(*points), color=SCORE_COLORS[i % len(SCORE_COLORS)], marker="D",
                           markersize=4, linewidth=1.5, label=name.removeprefix("eval_"))
        ax_scores.set_xlabel("step")
        ax_scores.set_ylabel("evaluation score")
        ax_scores.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_scores.grid(True, alpha=0.3)
        ax_scores.legend(loc="lower right", fontsize="small")
        ax.set_xlabel("")
    fig.tight_layout()
    tmp = plot.path + ".tmp.png"
    fig.savefig(tmp, format="png")
    os.replace(tmp, plot.path)
    return plot


def _import_matplotlib() -> None:
    import importlib

    for name in ("matplotlib.backends.backend_agg", "matplotlib.figure", "matplotlib.ticker"):
        importlib.import_module(name)


def serve() -> None:
    """The child of :class:`BackgroundPlot`: imports matplotlib at once, then reads one request
    (a JSON line: ``output_dir``, ``path``, ``lr``, ``lr_from``) from stdin, draws it and
    answers one JSON line on stdout: ``{"path": ...}``, ``{"nothing": why}`` (no loss logged)
    or ``{"error": why}``. End of input without a request (the run failed or was killed):
    exits without drawing."""
    _import_matplotlib()
    line = sys.stdin.readline()
    if not line.strip():
        return
    request = json.loads(line)
    try:
        plot = plot_loss(request["output_dir"], path=request["path"],
                         lr=[(int(s), float(v)) for s, v in request["lr"]],
                         lr_from=request.get("lr_from"))
        answer = {"path": plot.path}
    except ConfigError as e:
        answer = {"nothing": str(e)}
    except Exception as e:  # noqa: BLE001 - reported to the run, which draws it itself
        answer = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


class BackgroundPlot:
    """loss.png drawn by a child process (:func:`serve`) so that neither importing matplotlib
    nor drawing holds up the run: :meth:`start` when training begins, :meth:`request` when it
    ends, :meth:`result` before the run returns, :meth:`cancel` when it fails. Any failure of
    the child itself makes :meth:`result` None: the caller then draws in its own process."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.requested = False

    @classmethod
    def start(cls) -> "BackgroundPlot | None":
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent,
                                                        env.get("PYTHONPATH")) if p)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", "import fmtune.plots as p; p.serve()"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                env=env, text=True, encoding="utf-8")
        except OSError:
            return None
        return cls(proc)

    def request(self, output_dir: str, path: str, lr: Points, lr_from: str | None) -> None:
        """Ask the child to draw ``output_dir``'s losses to ``path`` (once)."""
        if self.requested:
            return
        self.requested = True
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"output_dir": output_dir, "path": path,
                                              "lr": [list(p) for p in lr],
                                              "lr_from": lr_from}) + "\n")
            self.proc.stdin.close()
        except OSError:  # the child is gone: result() says so
            pass

    def result(self, timeout: float = 120.0) -> dict[str, Any] | None:
        """The child's answer (see :func:`serve`), or None when it failed or took too long."""
        try:
            self.proc.wait(timeout=timeout)  # its answer is one short line: no pipe fills up
            assert self.proc.stdout is not None
            out = self.proc.stdout.read()
            self.proc.stdout.close()
        except (subprocess.TimeoutExpired, OSError, ValueError):
            self.cancel()
            return None
        try:
            answer = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
        except ValueError:
            return None
        return answer if isinstance(answer, dict) and self.proc.returncode == 0 else None

    def cancel(self) -> None:
        """Stop the child (it draws nothing) and reap it."""
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None and not stream.closed:
                    stream.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except (subprocess.TimeoutExpired, OSError):
            pass
