"""The example's own tests, run with it installed (pip install -e '.[test]'; pytest), as a
third-party plugin's tests would be; fmtune's CI runs them (tests/test_example_plugin.py)."""

import csv
import json

TICKETS = [
    {"ticket": {"product": "fox", "subject": "hello", "thread": ["a", "b", "the dog"]},
     "resolution": "fixed"},
    {"ticket": {"product": "cat", "subject": "help", "thread": []}, "resolution": "no"},
] * 4


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _argv(model, data, out, *extra):
    return ["--model_name_or_path", model, "--training_data_path", data,
            "--output_dir", str(out), "--data_handlers", "ticket_to_input_output", *extra]


def test_one_file_with_the_handler_and_its_option(fmtune_run, fmtune_tiny_model, tmp_path):
    data = _write(tmp_path / "tickets.jsonl", TICKETS)
    shown = fmtune_run(["data", "preview", "--plugins", "tickets", "--tickets_separator", " / ",
                        *_argv(fmtune_tiny_model, data, tmp_path / "out")])
    assert shown.exit_code == 0, shown.stderr
    assert "[fox] hello: a / b / the dog" in shown.stdout  # the option, read by the handler
    assert "resolution:" in shown.stdout


def test_a_bad_record_is_one_line_with_its_file_and_line(fmtune_run, fmtune_tiny_model,
                                                          tmp_path):
    bad = [*TICKETS[:3], {"ticket": {"product": "x", "subject": 7}, "resolution": "y"}]
    data = _write(tmp_path / "tickets.jsonl", bad)
    result = fmtune_run(["train", "--plugins", "tickets",
                         *_argv(fmtune_tiny_model, data, tmp_path / "out")])
    assert result.exit_code == 2
    assert f"{data}:4: field 'ticket.subject' must be a string" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_csv_tracker_holds_the_logged_losses(fmtune_run, fmtune_tiny_model, tmp_path):
    data = _write(tmp_path / "tickets.jsonl", TICKETS)
    out, folder = tmp_path / "out", tmp_path / "csv"
    result = fmtune_run(["train", "--plugins", "tickets", "--trackers", "tickets_csv",
                         "--tickets_csv_folder", str(folder), "--max_steps", "3",
                         "--logging_steps", "1", "--per_device_train_batch_size", "2",
                         "--save_strategy", "no", *_argv(fmtune_tiny_model, data, out)])
    assert result.exit_code == 0, result.stderr
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["trackers"]["tickets_csv"] == {"status": "ok"}
    rows = list(csv.reader((folder / f"{summary['tickets_csv_run_id']}.csv").open()))
    logged = [json.loads(line) for line in (out / "training_logs.jsonl").read_text().splitlines()]
    assert [(int(s), float(v)) for s, name, v in rows if name == "loss"] == [
        (e["data"]["step"], e["data"]["value"]) for e in logged if e["name"] == "training_loss"]


def test_a_csv_folder_that_cannot_be_made_is_refused_before_training(fmtune_run,
                                                                      fmtune_tiny_model,
                                                                      tmp_path):
    data = _write(tmp_path / "tickets.jsonl", TICKETS)
    (tmp_path / "file").write_text("")
    result = fmtune_run(["train", "--plugins", "tickets,tickets_csv", "--tickets_csv_folder",
                         str(tmp_path / "file" / "csv"),
                         *_argv(fmtune_tiny_model, data, tmp_path / "out")])
    assert result.exit_code == 2
    assert f"tickets_csv_folder {tmp_path / 'file' / 'csv'}:" in result.stderr
    assert not (tmp_path / "out").exists()
