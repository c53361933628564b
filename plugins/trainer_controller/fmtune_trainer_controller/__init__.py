"""fmtune trainer controller: rules over training metrics that stop, save, evaluate or log.

Plugin authors add metrics and operations with the ``register_controller_metrics``
/ ``register_controller_operations`` hooks (this plugin's own specs, :mod:`.hookspecs`),
usually subclassing :class:`Metric`
and :class:`Operation` (see the README). Importing this package is cheap: no torch.
"""

from __future__ import annotations

from .metrics import Context, Metric, MetricUnavailable
from .operations import Operation, SafeFormat
from .rules import FUNCTIONS, KeyedNumber, Rule, RuleError, RuleRuntimeError

__version__ = "0.1.0"

__all__ = ["Context", "FUNCTIONS", "KeyedNumber", "Metric", "MetricUnavailable", "Operation",
           "Rule", "RuleError", "RuleRuntimeError", "SafeFormat", "__version__"]
