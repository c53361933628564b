"""`fmtune vision preview` and `fmtune vision generate`; --dataset_image_field activates the
plugin."""

from __future__ import annotations

from fmtune.commands import load_config
from fmtune.testing import run_cli
from fmtune_vision.testing import QUESTION, draw_shape


def test_dataset_image_field_activates_the_vision_plugin(shapes):
    config, _, _, _ = load_config(["--model_name_or_path", "m", "--output_dir", "o",
                                   "--training_data_path", shapes, "--dataset_text_field",
                                   "messages", "--dataset_image_field", "images"])
    assert config.plugins == ["vision"]


def test_preview_shows_image_tokens_and_trained_tokens(vlm, shapes):
    res = run_cli(["vision", "preview", "--n", "1", "--color", "never", "--model_name_or_path",
                   vlm("llava"), "--training_data_path", shapes, "--dataset_text_field",
                   "messages"])
    assert res.exit_code == 0, res.stderr[-2000:]
    example = res.stdout.split("--- example 1")[1]
    assert "16 image tokens" in example and "2 trained" in example
    assert f"USER: <IMAGE x16>\n{QUESTION} ASSISTANT:[[ " in example
    assert example.rstrip().endswith("<|endoftext|>]]")


def test_generate_answers_about_an_image(vlm, tmp_path):
    image = tmp_path / "a.png"
    draw_shape("red", "circle").save(image)
    res = run_cli(["vision", "generate", "--model", vlm("llava"), "--image", str(image),
                   "--prompt", QUESTION, "--max_new_tokens", "3"])
    assert res.exit_code == 0, res.stderr[-2000:]
    res = run_cli(["vision", "generate", "--model", vlm("llava"), "--image",
                   str(tmp_path / "gone.png"), "--prompt", QUESTION])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines()[-1] == (
        f"fmtune: error: --image: {tmp_path}/gone.png: image file not found")


def test_fmtune_generate_with_an_image_is_the_plugins(vlm, tmp_path):
    """`fmtune generate --image FILE --text PROMPT` (the core's command, fms-hf-tuning's
    names) answers through this plugin, exactly as `fmtune vision generate` does."""
    image = tmp_path / "a.png"
    draw_shape("red", "circle").save(image)
    core = run_cli(["generate", "--model", vlm("llava"), "--image", str(image),
                    "--text", QUESTION, "--max_new_tokens", "3"])
    assert core.exit_code == 0, core.stderr[-2000:]
    own = run_cli(["vision", "generate", "--model", vlm("llava"), "--image", str(image),
                   "--prompt", QUESTION, "--max_new_tokens", "3"])
    assert core.stdout == own.stdout and core.stdout.strip()


def test_fmtune_data_preview_of_a_vision_run_is_the_plugins(vlm, shapes):
    """`fmtune data preview` (the data_handlers plugin's command) hands a vision run (the
    plugin named, or activated by --dataset_image_field) to this plugin's preview through its
    `fmtune.data_preview` entry point: where the image tokens sit and which tokens train."""
    train = ["--n", "1", "--color", "never", "--model_name_or_path", vlm("llava"),
             "--training_data_path", shapes, "--dataset_text_field", "messages"]
    own = run_cli(["vision", "preview", *train])
    assert own.exit_code == 0, own.stderr[-2000:]
    for how in (["--plugins", "vision"], ["--dataset_image_field", "images"]):
        res = run_cli(["data", "preview", *train, *how])
        assert res.exit_code == 0, res.stderr[-2000:]
        assert res.stdout == own.stdout
        assert f"USER: <IMAGE x16>\n{QUESTION} ASSISTANT:[[ " in res.stdout
