"""``tickets_csv``: track a run in a CSV file (step, name, value), one file per run.

The tracker of fmtune's docs/plugins.md ("Writing a tracker"), as a team would ship it beside
its data handler: ``fmtune train --plugins tickets,tickets_csv --tickets_csv_folder runs/csv``
(or ``--trackers tickets_csv``).
"""

from __future__ import annotations

import csv
import os
import time

from fmtune.records import folder_problem
from fmtune.tracking import Tracker


class CsvTracker(Tracker):
    name = "tickets_csv"    # --plugins tickets_csv; tickets_csv_tracker.json; --tickets_csv_timeout_s
    target_key = "folder"   # run_summary.json: tickets_csv_run_id, tickets_csv_folder

    @classmethod
    def options(cls, register):
        register("tickets_csv_folder", str, "csv_runs", "Folder of the CSV files, one per run.")

    @classmethod
    def target(cls, config):
        return os.path.abspath(config.tickets_csv_folder)

    @classmethod
    def check(cls, config):  # before anything loads: a one-line error, exit 2
        why = folder_problem(cls.target(config))
        return f"tickets_csv_folder {config.tickets_csv_folder}: {why}" if why else None

    def open(self, run, resume_id):  # resume_id: the run to continue, or None
        os.makedirs(self.where, exist_ok=True)
        run_id = resume_id or f"{os.path.basename(run.output_dir)}-{time.time_ns()}"
        self.file = open(os.path.join(self.where, f"{run_id}.csv"), "a", newline="")
        self.rows = csv.writer(self.file)
        return run_id

    def log(self, metrics, step, epoch, wall_time):
        self.rows.writerows([step, name, value] for name, value in metrics.items())
        self.file.flush()

    def close(self, summary):  # summary: run_summary.json's content (None: abandoned)
        self.file.close()


(add_options, validate_config, on_train_begin, on_log, on_train_end,
 on_train_error) = CsvTracker.hooks()
