"""YAML read by fmtune (run configs, trainer-controller rules; data_config through the data
plugin): aliases cannot blow up, a repeated key is an error, recursive documents are refused."""

from __future__ import annotations

import resource
import time

import pytest

from fmtune.cli import load_config
from fmtune.config import ConfigError, load_yaml_text

BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))


def test_alias_bomb_refused_fast_and_small(tmp_path):
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(BOMB + "learning_rate: 1e-4\n")
    assert len(BOMB) < 700  # 10**9 values once expanded
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(["--config", str(cfg)])
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100 * 1024  # KiB
    assert str(err.value).startswith(f"{cfg}: invalid YAML: the document expands to more than")
    assert "\n" not in str(err.value)


def test_shared_aliases_within_the_bound_still_work():
    data = load_yaml_text("base: &b {r: 8, alpha: 16}\nrun1: *b\nrun2:\n  <<: *b\n  r: 4\n")
    assert data == {"base": {"r": 8, "alpha": 16}, "run1": {"r": 8, "alpha": 16},
                    "run2": {"r": 4, "alpha": 16}}


def test_recursive_document_and_duplicate_keys(tmp_path):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("learning_rate: 1e-4\nmax_steps: 3\nlearning_rate: 1e-3\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: line 3 invalid YAML: duplicate key "
                                          r"'learning_rate'"):
        load_config(["--config", str(cfg)])
    cfg.write_text("a: &a [1, *a]\n")
    with pytest.raises(ConfigError, match="recursive document"):
        load_config(["--config", str(cfg)])


def test_trainer_controller_file_uses_the_same_reader(tmp_path):
    from fmtune_trainer_controller.loader import LoadError, load

    rules = tmp_path / "rules.yaml"
    rules.write_text(BOMB)
    with pytest.raises(LoadError) as err:
        load(str(rules), {}, {})
    assert "expands to more than" in str(err.value)


def test_data_config_uses_the_same_reader(tmp_path):
    from fmtune_data_handlers.loading import DataError
    from fmtune_data_handlers.processing import read_data_config

    cfg = tmp_path / "data_config.yaml"
    cfg.write_text(BOMB)
    with pytest.raises(DataError, match="expands to more than"):
        read_data_config(str(cfg), None)
    cfg.write_text("datasets: []\ndatasets: []\n")
    with pytest.raises(DataError, match=r"data_config.yaml:2: invalid YAML: duplicate key"):
        read_data_config(str(cfg), None)
