"""Task data from local JSON/JSONL files, for lm-eval task YAMLs (``custom_dataset``).

lm-eval reads a task's data with ``datasets.load_dataset``; a ``data_files`` path in a YAML is
then relative to the working directory, not to the YAML. The project's task folders hold a
``utils.py`` with ``records = records_next_to(__file__)`` and their YAMLs say::

    custom_dataset: !function utils.records
    dataset_kwargs:
      data_files: {test: my_task.jsonl}    # relative to the YAML's folder

The files are read with fmtune's record reader (errors name the file and line), into an
in-memory ``DatasetDict``: no network, no datasets cache. Absolute paths work too (a YAML of
your own, or ``fmtune evaluate --ifeval_prompts FILE``).
"""

from __future__ import annotations

import os
from typing import Any, Callable


def read_split(path: str) -> Any:
    from datasets import Dataset
    from fmtune.records import read_records

    rows = [{k: v for k, v in rec.items() if k != "__line__"} for rec in read_records(path)]
    return Dataset.from_list(rows)


def records_next_to(module_file: str) -> Callable[..., Any]:
    """A ``custom_dataset`` function reading ``data_files`` relative to ``module_file``'s
    folder (lm-eval calls it with the task's metadata and ``dataset_kwargs``)."""
    base = os.path.dirname(os.path.abspath(module_file))

    def records(data_files: dict[str, str] | str | None = None, **_: Any) -> Any:
        from datasets import DatasetDict

        if not data_files:
            raise ValueError("custom_dataset: dataset_kwargs needs data_files")
        files = {"test": data_files} if isinstance(data_files, str) else dict(data_files)
        return DatasetDict({split: read_split(os.path.join(base, os.path.expanduser(path)))
                            for split, path in files.items()})

    return records
