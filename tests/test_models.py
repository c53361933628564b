"""Architectures x methods: each trains a few steps through `fmtune train` and its output reloads.

For every architecture of fms-hf-tuning's support table that transformers has (plus Qwen2/3
and Gemma), a tiny random-init config (hidden 32, 2 layers, 4 experts top-2 for MoE, the test
BPE tokenizer's vocabulary) is trained 2 steps with full fine-tuning, LoRA (all-linear) and
QLoRA (4-bit nf4, all-linear); the saved output is reloaded with transformers / peft, the
reloaded weights must equal the saved files and the logits be finite. The outcome of each
cell must match tests/models_expected.yaml, and docs/supported-models.md must equal the
table rendered from these results (regenerate: FMTUNE_WRITE_DOCS=1 .venv/bin/python -m
pytest tests/test_models.py).

The vision-language models of the vision plugin (LLaVA 1.5, LLaVA-Next, Granite Vision, Llama
3.2 Vision; tiny models built by fmtune_vision.testing) get a second table: full, LoRA and QLoRA
runs reloaded, `fmtune merge` of the LoRA adapter (merged logits = the adapter's) and `fmtune
generate --image` from each output; their expected outcomes are VISION_EXPECTED below.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from pathlib import Path

import pytest
import yaml

from fmtune.pytest_plugin import DEMO_TEXTS
from fmtune.testing import DEMO_RECORDS, build_tokenizer, run_cli, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = yaml.safe_load((Path(__file__).parent / "models_expected.yaml").read_text())
DOC = ROOT / "docs" / "supported-models.md"

COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)
# architecture -> (transformers config class, overrides of COMMON)
ARCHS = {
    "LlamaForCausalLM": ("LlamaConfig", {}),
    "GraniteForCausalLM": ("GraniteConfig", {}),
    "GraniteMoeForCausalLM": ("GraniteMoeConfig", MOE),
    "GraniteMoeHybridForCausalLM": ("GraniteMoeHybridConfig", dict(
        MOE, shared_intermediate_size=64, layer_types=["mamba", "attention"], mamba_n_heads=4,
        mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1, mamba_expand=2)),
    "MistralForCausalLM": ("MistralConfig", {}),
    "MixtralForCausalLM": ("MixtralConfig", MOE),
    "GPTBigCodeForCausalLM": ("GPTBigCodeConfig", dict(n_embd=32, n_layer=2, n_head=4,
                                                       n_positions=128, n_inner=64)),
    "GptOssForCausalLM": ("GptOssConfig", dict(
        MOE, head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"])),
    "Qwen2ForCausalLM": ("Qwen2Config", {}),
    "Qwen3ForCausalLM": ("Qwen3Config", dict(head_dim=8)),
    "GemmaForCausalLM": ("GemmaConfig", dict(head_dim=8)),
    "Gemma2ForCausalLM": ("Gemma2Config", dict(head_dim=8)),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", dict(head_dim=8)),
}
METHODS = {
    "full": [],
    "lora": ["--plugins", "lora", "--target_modules", "all-linear"],
    "qlora": ["--plugins", "qlora", "--target_modules", "all-linear"],
}
CELLS = [(arch, method) for arch in ARCHS for method in METHODS]
_RESULTS: dict[tuple[str, str], dict] = {}


def test_expectations_cover_the_table():
    assert set(EXPECTED) == set(ARCHS)
    assert all(set(row) == set(METHODS) for row in EXPECTED.values())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    tok = build_tokenizer(DEMO_TEXTS)
    data = write_jsonl(base / "train.jsonl", DEMO_RECORDS)
    return base, tok, data


def model_folder(arch: str, base: Path, tok) -> Path:
    """config.json (random weights are built from it) and the tokenizer."""
    import transformers

    folder = base / arch
    if not folder.exists():
        config_cls, overrides = ARCHS[arch]
        config = getattr(transformers, config_cls)(**{**COMMON, **overrides})
        config.architectures = [arch]
        config.save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def saved_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def check_full(out: Path, tok, scratch: Path) -> str:
    """Reload without missing or unexpected keys; saving the reloaded model again gives the
    same tensors (transformers may convert MoE experts between its fused layout and the
    checkpoint's per-expert one, so the files, not the state dicts, are compared)."""
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    saved = saved_tensors(out)
    model.save_pretrained(scratch)
    again = saved_tensors(scratch)
    assert set(again) == set(saved)
    for name, tensor in saved.items():
        assert torch.equal(again[name], tensor), name
    assert_finite_logits(model, tok)
    n = sum(p.numel() for p in model.parameters())
    return f"{n:,} parameters"


def experts_note(model) -> tuple[list[str], str]:
    """Names of fused (3-D) expert parameters, and their dtype."""
    fused = [n for n, p in model.named_parameters() if p.dim() == 3 and "experts" in n]
    dtype = str(next((p.dtype for n, p in model.named_parameters() if n in fused), "")).replace(
        "torch.", "")
    return fused, dtype


def check_adapter(out: Path, tok, quantized: bool) -> str:
    import torch
    from peft import AutoPeftModelForCausalLM, get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    kwargs = {}
    if quantized:
        from transformers import BitsAndBytesConfig

        kwargs = {"device_map": "cpu", "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)}
    model = AutoPeftModelForCausalLM.from_pretrained(out, **kwargs)
    if quantized:  # as a user reloading a QLoRA run on a CPU does (docs/peft.md)
        from fmtune_peft_lora.quant import keep_generic_cpu_path

        keep_generic_cpu_path(model)
    saved = load_file(out / "adapter_model.safetensors")
    state = get_peft_model_state_dict(model)
    full = model.state_dict()  # embeddings saved with the adapter (new tokens) are found here
    assert set(state) <= set(saved)
    for name, tensor in saved.items():
        assert torch.equal(state[name] if name in state else full[name], tensor), name
    assert_finite_logits(model, tok)
    adapted = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                      if isinstance(m, LoraLayer)})
    fused, dtype = experts_note(model)
    if not quantized:
        note = f"LoRA on {', '.join(adapted)}"
        if fused:
            note += "; experts (fused 3-D parameters) not adapted"
        return note
    import bitsandbytes as bnb

    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and not {"lora_A", "lora_B"} & set(n.split("."))]  # the base model's own
    four_bit = [m for m in linears if isinstance(m, bnb.nn.Linear4bit)]
    head = model.get_output_embeddings().weight.dtype
    note = (f"{len(four_bit)} of {len(linears)} linear layers 4-bit (the output layer stays "
            f"{str(head).replace('torch.', '')})")
    if fused:
        note += f"; experts (fused 3-D parameters) stay {dtype}, not adapted"
    return note


def assert_finite_logits(model, tok) -> None:
    import torch

    ids = tok("translate: the red cat sees a dog =", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[-1] >= len(tok) and torch.isfinite(logits).all()


def run_cell(arch: str, method: str, workspace) -> dict:
    if (arch, method) in _RESULTS:
        return _RESULTS[(arch, method)]
    base, tok, data = workspace
    folder = model_folder(arch, base, tok)
    out = base / f"{arch}-{method}"
    res = run_cli(["train", "--model_name_or_path", str(folder), "--random_init_weights", "true",
                   "--training_data_path", data, "--output_dir", str(out), "--max_steps", "2",
                   "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
                   "--logging_steps", "1", "--save_strategy", "no", *METHODS[method]])
    if res.exit_code != 0:
        result = {"outcome": "fails", "error": last_line(res.stderr)}
    else:
        summary = json.loads((out / "run_summary.json").read_text())
        assert summary["global_step"] == 2 and math.isfinite(summary["final_loss"])
        try:
            if method == "full":
                detail = check_full(out, tok, base / f"{arch}-resaved")
            else:
                detail = check_adapter(out, tok, quantized=method == "qlora")
            result = {"outcome": "ok", "detail": detail}
        except Exception as e:  # noqa: BLE001 - a reload failure is a result, compared below
            result = {"outcome": "fails", "error": f"reload: {type(e).__name__}: {e}"}
    _RESULTS[(arch, method)] = result
    return result


@pytest.mark.parametrize("arch,method", CELLS, ids=[f"{a}-{m}" for a, m in CELLS])
def test_architecture_method(arch, method, workspace):
    result = run_cell(arch, method, workspace)
    expected = EXPECTED[arch][method]
    if expected == "ok":
        assert result["outcome"] == "ok", result.get("error")
    else:
        assert expected.startswith("fails: "), expected
        assert result["outcome"] == "fails", f"expected {expected!r}, got {result}"
        assert expected.removeprefix("fails: ") in result["error"], result["error"]


# Vision-language models (--plugins vision): fms-hf-tuning's four, built by the vision plugin's
# testing helpers (label in the doc, fmtune_vision.testing architecture)
VISION_ARCHS = {
    "LLaVA 1.5 (`LlavaForConditionalGeneration`)": "llava",
    "LLaVA-Next (`LlavaNextForConditionalGeneration`)": "llava_next",
    "Granite 3.2 Vision (`LlavaNextForConditionalGeneration`, SigLIP)": "granite_vision",
    "Llama 3.2 Vision (`MllamaForConditionalGeneration`)": "mllama",
}
VISION_METHODS = {
    "full": ["--plugins", "vision"],
    "lora": ["--plugins", "vision,lora"],
    "qlora": ["--plugins", "vision,qlora"],
    "merge": None,  # fmtune merge of the LoRA adapter
    "generate": None,  # fmtune generate --image from the full, LoRA and merged outputs
}
# the outcome each cell must have (as tests/models_expected.yaml for the text models)
VISION_EXPECTED = {arch: dict.fromkeys(VISION_METHODS, "ok") for arch in VISION_ARCHS.values()}
VISION_CELLS = [(arch, method) for arch in VISION_ARCHS.values() for method in VISION_METHODS]


@pytest.fixture(scope="module")
def vision_workspace(tmp_path_factory):
    from fmtune_vision.testing import draw_shape, shape_records

    base = tmp_path_factory.mktemp("vision-models")
    data = write_jsonl(base / "train.jsonl", shape_records(base / "img", 8))
    image = base / "question.png"
    draw_shape("blue", "triangle", seed=5).save(image)
    return base, data, image


def vision_inputs(model, processor, image: Path):
    from fmtune_vision.inference import model_inputs, question
    from fmtune_vision.testing import QUESTION

    return model_inputs(model, processor, question(QUESTION), [str(image)])


def vision_logits(model, processor, image: Path):
    import torch

    with torch.no_grad():
        logits = model(**vision_inputs(model, processor, image)).logits
    assert torch.isfinite(logits).all()
    return logits


def vision_adapter(folder: Path, out: Path, quantized: bool):
    """The adapter reloaded by peft over its base (4-bit nf4 language model for QLoRA: the
    vision tower, the projector and the output layer unquantized), its saved tensors checked."""
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    kwargs = {}
    if quantized:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, BitsAndBytesConfig

        with init_empty_weights():
            meta = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(folder))
        skip = [f"model.{n}" for n, _ in meta.model.named_children()
                if n != "language_model"] + ["lm_head"]
        kwargs = {"device_map": "cpu", "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip)}
    model = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(folder, **kwargs), out).eval()
    if quantized:
        from fmtune_peft_lora.quant import keep_generic_cpu_path

        keep_generic_cpu_path(model)
    saved = load_file(out / "adapter_model.safetensors")
    state = get_peft_model_state_dict(model)
    assert set(saved) == set(state)
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    return model


def check_vision(arch: str, method: str, folder: Path, base: Path, image: Path) -> str:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from fmtune_vision.models import part_of

    out = base / f"{arch}-{method}"
    processor = AutoProcessor.from_pretrained(out if method in ("full", "lora", "qlora")
                                              else folder)
    if method == "full":
        model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
        saved = saved_tensors(out)
        model.save_pretrained(base / f"{arch}-resaved")
        again = saved_tensors(base / f"{arch}-resaved")
        assert set(again) == set(saved)
        assert all(torch.equal(again[n], t) for n, t in saved.items())
        vision_logits(model, processor, image)
        return f"{sum(p.numel() for p in model.parameters()):,} parameters"
    if method in ("lora", "qlora"):
        from peft.tuners.lora import LoraLayer

        model = vision_adapter(folder, out, quantized=method == "qlora")
        vision_logits(model, processor, image)
        adapted = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
        assert adapted and all(part_of(n) == "language_model" for n in adapted)
        leaves = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in adapted}))
        if method == "lora":
            return f"LoRA on the language model's {len(adapted)} linear layers ({leaves})"
        import bitsandbytes as bnb

        linears = [(n, m) for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and ".lora_" not in n]
        four_bit = [n for n, m in linears if isinstance(m, bnb.nn.Linear4bit)]
        assert four_bit and all(part_of(n) == "language_model" for n in four_bit)
        return (f"{len(four_bit)} of {len(linears)} linear layers 4-bit (the language model's; "
                "vision tower, projector and output layer stay float32)")
    lora = vision_adapter(folder, base / f"{arch}-lora", quantized=False)
    merged = base / f"{arch}-merge"
    if method == "merge":
        res = run_cli(["merge", str(base / f"{arch}-lora"), str(merged)])
        assert res.exit_code == 0, last_line(res.stderr)
        model = AutoModelForImageTextToText.from_pretrained(merged).eval()
        assert not any("lora" in k for k in model.state_dict())
        processor = AutoProcessor.from_pretrained(merged)
        torch.testing.assert_close(vision_logits(model, processor, image),
                                   vision_logits(lora, processor, image), atol=1e-4, rtol=1e-4)
        return ("`fmtune merge`: reloads with `AutoModelForImageTextToText` + "
                "`AutoProcessor`, logits equal the adapter's (within 1e-4)")
    from fmtune_vision.inference import generate, question
    from fmtune_vision.testing import QUESTION

    models = {"full model": AutoModelForImageTextToText.from_pretrained(base / f"{arch}-full"),
              "adapter": lora, "merged model": AutoModelForImageTextToText.from_pretrained(merged)}
    for where, model in zip((f"{arch}-full", f"{arch}-lora", f"{arch}-merge"), models.values()):
        res = run_cli(["generate", "--model", str(base / where), "--image", str(image),
                       "--text", QUESTION, "--max_new_tokens", "3"])
        assert res.exit_code == 0, last_line(res.stderr)
        assert res.stdout.strip() == generate(model.eval(), processor, [question(QUESTION)],
                                              [[str(image)]], max_new_tokens=3)[0]
    return ("`fmtune generate --image`: the full model, the adapter and the merged model "
            "answer as in Python")


def run_vision_cell(arch: str, method: str, vision_workspace, vlm) -> dict:
    if ("vision", arch, method) in _RESULTS:
        return _RESULTS[("vision", arch, method)]
    base, data, image = vision_workspace
    folder = Path(vlm(arch))
    needs = {"merge": ["lora"], "generate": ["full", "lora", "merge"]}.get(method, [])
    failed = [m for m in needs if run_vision_cell(arch, m, vision_workspace, vlm)["outcome"]
              != "ok"]
    if failed:
        result = {"outcome": "fails", "error": f"needs {', '.join(failed)}"}
    else:
        res = None
        if VISION_METHODS[method] is not None:
            out = base / f"{arch}-{method}"
            res = run_cli(["train", "--model_name_or_path", str(folder), "--training_data_path",
                           data, "--output_dir", str(out), "--max_steps", "2",
                           "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
                           "--logging_steps", "1", "--save_strategy", "no",
                           *VISION_METHODS[method]])
        if res is not None and res.exit_code != 0:
            result = {"outcome": "fails", "error": last_line(res.stderr)}
        else:
            if res is not None:
                summary = json.loads((base / f"{arch}-{method}" / "run_summary.json").read_text())
                assert summary["global_step"] == 2 and math.isfinite(summary["final_loss"])
            try:
                result = {"outcome": "ok",
                          "detail": check_vision(arch, method, folder, base, image)}
            except Exception as e:  # noqa: BLE001 - a failure is a result, compared below
                result = {"outcome": "fails", "error": f"{type(e).__name__}: {e}"}
    _RESULTS[("vision", arch, method)] = result
    return result


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    from fmtune_vision.testing import tiny_vlm_builder

    return tiny_vlm_builder(tmp_path_factory)


@pytest.mark.parametrize("arch,method", VISION_CELLS, ids=[f"{a}-{m}" for a, m in VISION_CELLS])
def test_vision_architecture_method(arch, method, vision_workspace, vlm):
    result = run_vision_cell(arch, method, vision_workspace, vlm)
    expected = VISION_EXPECTED[arch][method]
    if expected == "ok":
        assert result["outcome"] == "ok", result.get("error")
    else:
        assert result["outcome"] == "fails" and expected.removeprefix("fails: ") in \
            result["error"], result


def table_cell(r: dict) -> str:
    """A table cell of one run's result."""
    text = f"yes: {r['detail']}" if r["outcome"] == "ok" else f"**no**: {r['error']}"
    return text.replace("|", "\\|")


def render_vision(results: dict) -> list[str]:
    from fmtune_vision.testing import IMAGE_SIZE, TEXT, VISION

    lines = [
        "",
        "## Vision-language models (`--plugins vision`)",
        "",
        "Each cell is a real run on CPU: a tiny random-init model of the architecture with its "
        "processor, built by `fmtune_vision.testing.build_tiny_vlm` (vision tower hidden "
        f"{VISION['hidden_size']}, {VISION['num_hidden_layers']} layers, {IMAGE_SIZE}-px "
        f"images; language model hidden {TEXT['hidden_size']}, "
        f"{TEXT['num_hidden_layers']} layers), trained 2 steps by `fmtune train` on 8 "
        "image + text conversations, then its saved output reloaded (full: "
        "`AutoModelForImageTextToText` + `AutoProcessor`, saved again to the same tensors; "
        "LoRA/QLoRA: `peft.PeftModel` over the base, QLoRA over a 4-bit nf4 language model, the "
        "saved adapter tensors equal) with finite logits on an image. Merge: the LoRA adapter "
        "merged by `fmtune merge` and reloaded. Generate: `fmtune generate --image FILE --text "
        "PROMPT` on each output prints what `fmtune_vision.inference.generate` gives in Python. "
        "docs/vision.md tells the rest (data, masks, what trains).",
        "",
        "| model | full fine-tuning | LoRA (`vision,lora`) | QLoRA (`vision,qlora`) | merge "
        "| generate |",
        "|---|---|---|---|---|---|",
    ]
    for label, arch in VISION_ARCHS.items():
        lines.append(f"| {label} | " + " | ".join(table_cell(results[("vision", arch, m)])
                                                  for m in VISION_METHODS) + " |")
    return lines


def render(results: dict[tuple[str, str], dict], vocab: int) -> str:
    import peft
    import torch
    import transformers

    lines = [
        "# Supported model architectures",
        "",
        "<!-- Generated by tests/test_models.py from its results; do not edit by hand.",
        "     Regenerate: FMTUNE_WRITE_DOCS=1 .venv/bin/python -m pytest tests/test_models.py -->",
        "",
        "Each cell is a real run on CPU: a tiny random-init model of the architecture (hidden 32, "
        f"2 layers, 4 experts with 2 active for MoE models, a {vocab}-token BPE vocabulary) "
        "trained 2 steps by `fmtune train --random_init_weights true`, then its saved output "
        "reloaded (full: `AutoModelForCausalLM.from_pretrained`; LoRA/QLoRA: "
        "`peft.AutoPeftModelForCausalLM.from_pretrained`, QLoRA on a 4-bit nf4 base); the "
        "reloaded weights equal the saved files and the logits are finite. LoRA and QLoRA use "
        "`--target_modules all-linear` (every `nn.Linear` but the output layer).",
        "",
        f"Versions: transformers {transformers.__version__}, peft {peft.__version__}, "
        f"torch {torch.__version__.split('+')[0]}.",
        "",
        "| architecture | full fine-tuning | LoRA (`--plugins lora`) | QLoRA (`--plugins qlora`) |",
        "|---|---|---|---|",
    ]
    for arch in ARCHS:
        lines.append(f"| `{arch}` | " + " | ".join(table_cell(results[(arch, m)]) for m in METHODS)
                     + " |")
    fused = [a for a in ARCHS if any("fused 3-D" in results[(a, m)].get("detail", "")
                                     for m in METHODS)]
    if fused:
        lines += [
            "",
            f"The mixture-of-experts models here ({', '.join(f'`{a}`' for a in fused)}) keep "
            "their experts in fused 3-D parameters in this transformers version, not in "
            "`nn.Linear` layers: `all-linear` LoRA adapts the other linear layers but not the "
            "experts, and bitsandbytes, which quantizes `nn.Linear` only, leaves the experts "
            "unquantized under QLoRA.",
        ]
    if any(key[0] == "vision" for key in results):
        lines += render_vision(results)
    lines.append("")
    return "\n".join(lines)


def test_supported_models_doc(workspace, vision_workspace, vlm):
    results = {cell: run_cell(*cell, workspace) for cell in CELLS}
    results.update({("vision", *cell): run_vision_cell(*cell, vision_workspace, vlm)
                    for cell in VISION_CELLS})
    text = render(results, len(workspace[1]))
    if os.environ.get("FMTUNE_WRITE_DOCS") == "1":
        from fmtune.files import write_atomic

        write_atomic(str(DOC), text)
    current = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    if current != text:
        diff = "".join(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                            str(DOC), "generated"))
        pytest.fail(f"{DOC.relative_to(ROOT)} differs from the table these results give; "
                    "regenerate it with FMTUNE_WRITE_DOCS=1 .venv/bin/python -m pytest "
                    f"tests/test_models.py\n{diff}")
