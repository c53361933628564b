"""In-test plugin objects (``fmtune_run(argv, plugins=[obj])``) reach plugins' own sub-commands,
which build their config through ``fmtune.commands.load_config``, not only ``train``."""

from __future__ import annotations

from fmtune import hookimpl
from fmtune.testing import run_cli, write_jsonl


class Refuses:
    """Refuses every config, naming itself: visible only if it was registered."""

    @hookimpl
    def validate_config(self, config):
        return "in-test plugin saw the config of this command"


def test_a_plugin_sub_command_registers_the_in_test_plugins(fmtune_tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"input": "a b", "output": "c"}] * 2)
    argv = ["data", "preview", "--model_name_or_path", fmtune_tiny_model,
            "--training_data_path", data, "--output_dir", str(tmp_path / "out")]
    plain = run_cli(argv)
    assert plain.exit_code == 0, plain.stderr
    refused = run_cli(argv, plugins=[Refuses()])
    assert refused.exit_code == 2
    assert "in-test plugin saw the config of this command" in refused.stderr
    # and nothing leaks into the next command of the same process
    again = run_cli(argv)
    assert again.exit_code == 0, again.stderr
