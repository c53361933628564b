"""dataset_num_proc: the handlers' maps in several processes (datasets' num_proc), by default
one per RECORDS_PER_PROCESS records; the same rows as one process, bad records still named by
file and line, and the forked processes tokenize on one thread each."""

from __future__ import annotations

import os

import pytest

from fmtune import hookimpl
from fmtune.commands import load_config, validate
from fmtune.config import ConfigError
from fmtune.testing import write_jsonl
from fmtune_data_handlers import processing
from fmtune_data_handlers.plugin import RECORDS_PER_PROCESS, prepare

RECS = [{"input": f"question {i} about the dog", "output": f"answer {i} the cat"}
        for i in range(40)]


def run(tmp_path, tok, *flags, plugins=()):
    config, pm, _, _ = load_config(["--plugins", "data_handlers", "--model_name_or_path", "m",
                                    "--output_dir", str(tmp_path / "o"), *flags],
                                   extra_plugins=list(plugins))
    validate(config, pm)
    return prepare(config, tok, pm)


def rows(ds) -> list[tuple[list[int], list[int]]]:
    return [(list(r["input_ids"]), list(r["labels"])) for r in ds]


def where_processed(batch, **_):
    """A map handler that writes which process ran it and the tokenizers' parallelism there."""
    n = len(batch["input"])
    return {"input": batch["input"], "output": batch["output"], "pid": [os.getpid()] * n,
            "parallel": [os.environ.get("TOKENIZERS_PARALLELISM")] * n}


class Where:
    @hookimpl
    def register_data_handlers(self, register, config):
        register("where_processed", where_processed, "map")


@pytest.mark.parametrize("cpus, local, rows_, want", [
    (2, None, 10_000, 1), (2, None, 2 * RECORDS_PER_PROCESS, 2), (2, None, 10**6, 2),
    (16, None, 3 * RECORDS_PER_PROCESS + 1, 3), (16, "4", 10**6, 4), (16, "32", 10**6, 1),
    (1, None, 10**6, 1)])
def test_default_is_one_process_per_records_up_to_the_cpus_shared_by_local_ranks(
        monkeypatch, cpus, local, rows_, want):
    monkeypatch.setattr(processing, "usable_cpus", lambda: cpus)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert processing.auto_num_proc(rows_) == want


def test_two_processes_give_the_rows_of_one(tmp_path, chat_tok, monkeypatch):
    write_jsonl(tmp_path / "d.jsonl", RECS)
    data = ["--training_data_path", str(tmp_path / "d.jsonl")]
    one = run(tmp_path, chat_tok, *data)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    two = run(tmp_path, chat_tok, *data, "--dataset_num_proc", "2")
    assert rows(two.train) == rows(one.train) and len(one.train) == 40
    assert two.counts == one.counts == {"train": {"ok": 40}, "validation": {}}
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"  # the user's setting, restored
    # the default on 40 records: one process (forking would cost what it saves)
    assert processing.auto_num_proc(40) == 1


def test_the_handlers_ran_in_forked_processes_on_one_tokenizer_thread(tmp_path, chat_tok,
                                                                      monkeypatch):
    write_jsonl(tmp_path / "d.jsonl", RECS)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    config, pm, _, _ = load_config(
        ["--plugins", "data_handlers", "--model_name_or_path", "m", "--output_dir",
         str(tmp_path / "o"), "--training_data_path", str(tmp_path / "d.jsonl"),
         "--dataset_num_proc", "2"], extra_plugins=[Where()])
    validate(config, pm)
    from fmtune_data_handlers.handlers import collect
    from fmtune_data_handlers.loading import Origins, load_paths

    ds = load_paths([str(tmp_path / "d.jsonl")], origins=Origins())
    out = processing.apply_step(ds, processing.Step("where_processed", batch_size=10),
                                collect(pm, config), chat_tok, config, None, "test")
    pids = set(out["pid"])
    assert len(pids) == 2 and os.getpid() not in pids
    assert set(out["parallel"]) == {"false"}
    assert "TOKENIZERS_PARALLELISM" not in os.environ  # unset before, unset after


def test_a_bad_record_in_a_worker_process_is_named_by_file_and_line(tmp_path, chat_tok):
    write_jsonl(tmp_path / "d.jsonl", RECS[:30] + [{"input": "x", "output": None}] + RECS[:9])
    with pytest.raises(ConfigError) as e:
        run(tmp_path, chat_tok, "--training_data_path", str(tmp_path / "d.jsonl"),
            "--dataset_num_proc", "2")
    assert str(e.value) == f"{tmp_path / 'd.jsonl'}:31: field 'output' must be a string, got " \
        "NoneType"


def test_dataset_num_proc_must_be_positive(tmp_path):
    config, pm, _, _ = load_config(["--plugins", "data_handlers", "--model_name_or_path", "m",
                                    "--output_dir", str(tmp_path / "o"), "--training_data_path",
                                    "d.jsonl", "--dataset_num_proc", "0"])
    with pytest.raises(ConfigError, match="dataset_num_proc must be >= 1, got 0"):
        validate(config, pm)
