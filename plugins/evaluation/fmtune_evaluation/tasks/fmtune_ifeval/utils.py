"""IFEval's scoring for the tasks in this folder and for ``ifeval`` over a local prompts file:
lm-eval's own ``process_results`` and aggregation, imported after the Punkt sentence model is
made available offline (see fmtune_evaluation.offline), and a local data loader."""

from fmtune_evaluation.offline import seed_langdetect, use_punkt
from fmtune_evaluation.taskdata import records_next_to

use_punkt()
seed_langdetect()

from lm_eval.tasks.ifeval.utils import agg_inst_level_acc, process_results  # noqa: E402

records = records_next_to(__file__)

__all__ = ["agg_inst_level_acc", "process_results", "records"]
