"""Data loader for the tasks in this folder (see fmtune_evaluation.taskdata)."""

from fmtune_evaluation.taskdata import records_next_to

records = records_next_to(__file__)
