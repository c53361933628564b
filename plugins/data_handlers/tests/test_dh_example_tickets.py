"""The in-repo third-party handler plugin: pip-installed, then used by name in a data_config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
from transformers import AutoTokenizer

from fmtune.testing import write_jsonl

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "fmtune-example-tickets"
FMTUNE = os.path.join(os.path.dirname(sys.executable), "fmtune")


def test_installed_handler_plugin_preprocesses_in_house_data(tmp_path, fmtune_tiny_model):
    source, site = tmp_path / "src", tmp_path / "site"
    shutil.copytree(EXAMPLE, source)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(source)],
                   check=True, capture_output=True)
    write_jsonl(tmp_path / "tickets.jsonl", [
        {"ticket": {"product": "fox", "subject": "hello", "thread": ["a", "b", "the dog"]},
         "resolution": "fixed"},
        {"ticket": {"product": "cat", "subject": "help", "thread": []}, "resolution": "no"}])
    (tmp_path / "tickets.yaml").write_text(textwrap.dedent("""
        datasets:
          - name: tickets
            data_paths: [tickets.jsonl]
            data_handlers:
              - name: ticket_to_input_output
                arguments: {remove_columns: all, fn_kwargs: {max_thread: 2}}
              - name: tokenize_and_apply_input_masking
                arguments: {remove_columns: all}
    """))
    env = {**os.environ, "PYTHONPATH": str(site)}
    args = [FMTUNE, "preprocess", "--data_config_path", str(tmp_path / "tickets.yaml"),
            "--model_name_or_path", fmtune_tiny_model, "--output_dir", str(tmp_path / "out")]
    missing = subprocess.run(args, env=env, capture_output=True, text=True)
    assert missing.returncode == 2  # the handler's plugin is not active
    assert "unknown data handler 'ticket_to_input_output'" in missing.stderr
    ran = subprocess.run([*args, "--plugins", "tickets"], env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    rows = pq.read_table(tmp_path / "out" / "train_dataset").to_pylist()
    tok = AutoTokenizer.from_pretrained(fmtune_tiny_model)
    prompt = "[fox] hello: b | the dog\nresolution:"
    assert rows[0]["input_ids"] == tok(prompt)["input_ids"] + \
        tok(" fixed", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode([t for t, l in zip(rows[0]["input_ids"], rows[0]["labels"]) if l != -100]) \
        == " fixed<|endoftext|>"
    assert len(rows) == 2
