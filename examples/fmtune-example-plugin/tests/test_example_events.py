"""The example plugin's own tests: run with it installed (pip install -e .; pytest), as a
third-party plugin's tests would be. fmtune's CI installs it and runs them
(tests/test_example_plugin.py in the fmtune repository)."""

import json


def _train(fmtune_run, model, tmp_path, *extra):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"input": f"count {i}", "output": str(i)}) + "\n"
                            for i in range(8)))
    return fmtune_run(["train", "--model_name_or_path", model, "--training_data_path", str(data),
                       "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
                       "--logging_steps", "1", "--per_device_train_batch_size", "2",
                       "--save_strategy", "no", "--plugins", "example_events", *extra])


def test_the_default_events_file_is_in_the_output_folder(fmtune_run, fmtune_tiny_model, tmp_path):
    result = _train(fmtune_run, fmtune_tiny_model, tmp_path)
    assert result.exit_code == 0, result.stderr
    events = [json.loads(line) for line in
              (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e["event"] != "log"] == ["train_begin", "train_end"]
    assert [e["step"] for e in events if e["event"] == "log" and "loss" in e["logs"]] == [1, 2]
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["events_file"] == str(tmp_path / "out" / "events.jsonl")


def test_logs_can_be_left_out(fmtune_run, fmtune_tiny_model, tmp_path):
    result = _train(fmtune_run, fmtune_tiny_model, tmp_path, "--events_include_logs", "false")
    assert result.exit_code == 0, result.stderr
    events = (tmp_path / "out" / "events.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"] for line in events] == ["train_begin", "train_end"]


def test_a_folder_as_events_file_is_refused_before_training(fmtune_run, fmtune_tiny_model,
                                                             tmp_path):
    result = _train(fmtune_run, fmtune_tiny_model, tmp_path, "--events_file", str(tmp_path))
    assert result.exit_code == 2
    assert f"events_file {tmp_path} is a folder, not a file" in result.stderr
    assert not (tmp_path / "out").exists()
