"""The four entry points, their shared options, method selection and config errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from peft.tuners.lora import LoraLayer

from fmtune import hookimpl
from fmtune.commands import load_config
from fmtune.testing import run_cli, wrapped_model

LORA_OPTS = ["peft_method", "continue_from_adapter", "r", "lora_alpha", "lora_dropout",
             "target_modules", "modules_to_save", "use_rslora", "use_dora", "init_lora_weights",
             "exclude_modules", "layers_to_transform", "layers_pattern",
             "lora_post_process_for_vllm"]
QLORA_OPTS = ["load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
              "bnb_4bit_compute_dtype"]
PT_OPTS = ["peft_method", "continue_from_adapter", "num_virtual_tokens", "prompt_tuning_init",
           "prompt_tuning_init_text"]


def test_entry_points_and_hooks():
    res = run_cli(["plugins", "--json"])
    assert res.exit_code == 0
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    base = ["add_options", "on_train_error", "save", "validate_config", "wrap_peft"]
    assert {n: (rows[n]["distribution"], rows[n]["hooks"]) for n in
            ("lora", "alora", "qlora", "prompt_tuning")} == {
        "lora": ("fmtune-peft-lora", base),
        "alora": ("fmtune-peft-lora", sorted([*base, "prepare_data"])),
        "qlora": ("fmtune-peft-lora", sorted([*base, "load_model"])),
        "prompt_tuning": ("fmtune-peft-lora", base)}
    usage = run_cli(["--help"]).stdout
    assert "merge       from fmtune-peft-lora" in usage
    assert "export-vllm from fmtune-peft-lora" in usage


def test_importing_the_plugins_stays_cheap():
    code = ("import sys, fmtune_peft_lora.hooks, fmtune_peft_lora.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # `fmtune train --help --plugins lora` imports no torch


def options_of(plugins):
    _, _, _, registry = load_config(["--help", "--plugins", plugins])
    by_plugin = {}
    for opt in registry.options.values():
        by_plugin.setdefault(opt.plugin, []).append(opt.name)
    return by_plugin


def test_each_entry_point_has_the_options_its_users_type():
    assert options_of("lora")["lora"] == LORA_OPTS
    assert options_of("alora")["alora"] == [*LORA_OPTS, "alora_invocation_string"]
    assert options_of("qlora")["qlora"] == [*LORA_OPTS, *QLORA_OPTS]
    assert options_of("prompt_tuning")["prompt_tuning"] == PT_OPTS
    # two PEFT plugins together: every shared option once, owned by the first named
    both = options_of("alora,qlora")
    assert both["alora"] == [*LORA_OPTS, "alora_invocation_string"] and both["qlora"] == QLORA_OPTS
    help_text = run_cli(["train", "--help", "--plugins", "qlora"]).stdout
    assert "  --bnb_4bit_quant_type STR" in help_text and "  --r INT" in help_text


def test_a_foreign_plugin_cannot_take_a_peft_option_silently():
    class Foreign:
        @hookimpl
        def add_options(self, register):
            register("r", int, 1, "someone else's r")

    res = run_cli(["train", "--help", "--plugins", "lora"], plugins=[Foreign()])
    assert res.exit_code == 2
    assert "option 'r' is registered by both" in res.stderr


def test_lora_and_qlora_together_wrap_once(fmtune_tiny_model, tmp_path):
    model = wrapped_model(fmtune_tiny_model, tmp_path, "--plugins", "lora,qlora")
    assert list(model.peft_config) == ["default"]  # one adapter, not one per plugin
    assert all(type(m.get_base_layer()).__name__ == "Linear4bit"
               for m in model.modules() if isinstance(m, LoraLayer))


def test_peft_method_none_trains_in_full(fmtune_tiny_model, tmp_path):
    assert wrapped_model(fmtune_tiny_model, tmp_path, "--plugins", "lora", "--peft_method", "none") is None


@pytest.mark.parametrize("extra, message", [
    (["--plugins", "lora", "--peft_method", "none", "--r", "4"],
     "peft_method none (full fine-tuning) ignores r: remove them or pick a PEFT method"),
    (["--plugins", "lora", "--peft_method", "pt"], "peft_method pt needs --plugins prompt_tuning"),
    (["--plugins", "alora", "--peft_method", "lora"],
     "peft_method lora but the alora plugin is active: drop one of them"),
    (["--plugins", "prompt_tuning", "--peft_method", "lora"],
     "peft_method lora with --plugins prompt_tuning: use --plugins lora"),
    (["--plugins", "lora", "--r", "0", "--lora_dropout", "1"],
     "r must be >= 1, got 0\n  - lora_dropout must be in [0, 1), got 1.0"),
    (["--plugins", "lora", "--init_lora_weights", "eva"],
     "init_lora_weights eva needs a data-driven EvaConfig; supported: true, false, gaussian, "
     "orthogonal, pissa, pissa_niter_N, olora"),
    (["--plugins", "lora", "--init_lora_weights", "pissa_niter_x"],
     "init_lora_weights must be one of true, false, gaussian, orthogonal, pissa, pissa_niter_N "
     "(N >= 1), olora; got 'pissa_niter_x'"),
    (["--plugins", "lora", "--modules_to_save", "lm_head,score"],
     "modules_to_save: no module named 'score' in LlamaForCausalLM; its modules are: act_fn, "
     "down_proj, embed_tokens, gate_proj, input_layernorm, k_proj, layers, lm_head, mlp, model, "
     "norm, o_proj, post_attention_layernorm, q_proj, rotary_emb, self_attn, up_proj, v_proj"),
])
def test_config_errors(extra, message, fmtune_tiny_model, data, tmp_path):
    res = run_cli(["train", "--model_name_or_path", fmtune_tiny_model, "--training_data_path", data,
                   "--output_dir", str(tmp_path / "o"), *extra])
    assert res.exit_code == 2
    sep = ":\n  - " if "\n" in message else ": "
    assert res.stderr.strip() == f"fmtune: error: invalid config{sep}{message}"
    assert not (tmp_path / "o").exists()


def test_run_summary_names_the_plugin(fmtune_tiny_model, data, tmp_path, peft_helpers):
    out = tmp_path / "o"
    rec = peft_helpers.train(peft_helpers.train_args(fmtune_tiny_model, data, out, "--plugins",
                                                     "lora", "--max_steps", "1"))
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["plugins"]["lora"] == "0.1.0" and summary["model_saved_to"] == str(out)
    assert "LoRA (r 8): training 3584 of 128704 parameters (2.78%)" in rec.result.stderr
