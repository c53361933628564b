"""A hub id that is neither a local folder nor cached, on a machine that cannot reach the hub,
is one line after one connect attempt (huggingface_hub retried for about a minute first)."""

from __future__ import annotations

import pytest

from fmtune.config import ConfigError
from fmtune.hub import from_pretrained, hub_unreachable
from fmtune.testing import run_cli, write_jsonl


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    # an endpoint nothing listens on stands for "no network" wherever the test runs
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))


def test_uncached_hub_id_without_network_is_one_line(tmp_path, no_hub):
    data = write_jsonl(tmp_path / "d.jsonl", [{"input": "a", "output": "b"}])
    res = run_cli(["train", "--model_name_or_path", "ibm-granite/granite-3.0-8b-instruct",
                   "--training_data_path", data, "--output_dir", str(tmp_path / "out")])
    assert res.exit_code == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("fmtune: error:")]
    assert errors == ["fmtune: error: tokenizer ibm-granite/granite-3.0-8b-instruct: not a local "
                      "folder, not in the Hugging Face cache, and 127.0.0.1 cannot be reached "
                      "(Connection refused). Give a local path, or download it on a machine "
                      "with network."]


def test_the_loader_is_not_asked_to_download_when_the_hub_is_unreachable(no_hub):
    calls = []

    def loader(path, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        raise OSError("not cached")

    assert hub_unreachable() == "127.0.0.1 cannot be reached (Connection refused)"
    with pytest.raises(ConfigError, match="127.0.0.1 cannot be reached"):
        from_pretrained(loader, "org/model", "model")
    assert calls == [True]  # the cache was asked; no download attempt (no retries)
