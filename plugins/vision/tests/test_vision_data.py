"""Vision data: rendering, exact masks, image tokens, lazy images, and bad input."""

from __future__ import annotations

import os
import shutil

import pytest

from fmtune.commands import load_config, validate
from fmtune.records import IGNORE
from fmtune.testing import run_cli, write_jsonl
from fmtune_vision.testing import QUESTION, draw_shape


def prepared(model, data, tmp_path, *extra):
    """(tokenizer, train dataset, collator) as a run prepares them."""
    config, pm, _, _ = load_config(["--plugins", "vision", "--model_name_or_path", model,
                                    "--training_data_path", str(data), "--output_dir",
                                    str(tmp_path / "out"), *extra])
    validate(config, pm)
    tok = pm.hook.load_tokenizer(config=config)
    train, _ = pm.hook.prepare_data(config=config, tokenizer=tok, pm=pm)
    return tok, train, pm.hook.build_collator(tokenizer=tok, config=config)


def runs(labels):
    """Maximal runs of trained positions: [(start, end)]."""
    out, start = [], None
    for p, lab in enumerate(labels + [IGNORE]):
        if lab != IGNORE and start is None:
            start = p
        elif lab == IGNORE and start is not None:
            out.append((start, p))
            start = None
    return out


def conversation(img, answer1="red", answer2="circle"):
    return {"messages": [
        {"role": "system", "content": "you answer about a picture"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer1}]},
        {"role": "user", "content": [{"type": "text", "text": "what shape is it?"}]},
        {"role": "assistant", "content": answer2},
    ], "images": img}


def test_masks_are_exact_for_every_architecture(arch, vlm, tmp_path):
    """Only the assistant turns (answer + end-of-turn token) train; image tokens, the system
    and user turns and the template's markers are -100; the image tokens the processor
    inserted are as many as the data step counted for max_seq_length."""
    img = tmp_path / "a.png"
    draw_shape("red", "circle").save(img)
    data = write_jsonl(tmp_path / "d.jsonl", [conversation(str(img))])
    tok, train, collator = prepared(vlm(arch), data, tmp_path)
    batch = collator([train[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    image_id = collator.image_token_id
    image_positions = [p for p, t in enumerate(ids) if t == image_id]
    assert image_positions and all(labels[p] == IGNORE for p in image_positions)
    eot = tok.eos_token
    trained = [tok.decode(ids[a:b]) for a, b in runs(labels)]
    assert trained == [f" red{eot}" if arch in ("llava", "llava_next") else f"red{eot}",
                       f" circle{eot}" if arch in ("llava", "llava_next") else f"circle{eot}"]
    for a, b in runs(labels):
        assert labels[a:b] == ids[a:b]
    # everything else is exactly -100
    trained_positions = {p for a, b in runs(labels) for p in range(a, b)}
    assert all(labels[p] == IGNORE for p in range(len(ids)) if p not in trained_positions)
    from fmtune_vision.data import expanded_length, image_token_counts

    counts = image_token_counts(collator.processor, [(32, 32)])
    assert len(ids) == expanded_length(train[0]["input_ids"], image_id, counts)
    if arch != "mllama":  # Mllama reads the image by cross-attention: one token stands for it
        assert len(image_positions) == counts[0] > 1


def test_images_are_references_until_the_batch_is_built(vlm, tmp_path):
    """Rows keep paths (JSON) or references into the memory-mapped parquet file (bytes), never
    decoded images; the collator decodes them."""
    import io

    from datasets import Dataset, Image, List

    buf = io.BytesIO()
    draw_shape("blue", "square").save(buf, format="PNG")
    messages = [  # parquet columns hold one type: every content is a list of parts
        {"role": "user", "content": [{"type": "image", "text": None},
                                     {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": "blue"}]}]
    ds = Dataset.from_dict({"messages": [messages], "images": [[{"bytes": buf.getvalue(),
                                                                  "path": None}]]})
    ds = ds.cast_column("images", List(Image()))
    assert isinstance(ds.features["images"].feature, Image)
    path = str(tmp_path / "d.parquet")
    ds.to_parquet(path)
    tok, train, collator = prepared(vlm("llava"), path, tmp_path)
    assert train[0]["images"] == ["dataset:train:0:images:0"]
    batch = collator([train[0]])
    assert tuple(batch["pixel_values"].shape) == (1, 3, 32, 32)


def test_one_image_models_use_the_first_image_and_say_so_once(vlm, tmp_path, caplog):
    paths = []
    for colour in ("red", "blue"):
        paths.append(str(tmp_path / f"{colour}.png"))
        draw_shape(colour, "circle").save(paths[-1])
    two = {"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                     {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": "red"}], "images": paths}
    data = write_jsonl(tmp_path / "d.jsonl", [two, two])
    import logging

    with caplog.at_level(logging.WARNING, logger="fmtune"):
        tok, train, collator = prepared(vlm("llava"), data, tmp_path)
    lines = [r.getMessage() for r in caplog.records if "one image" in r.getMessage()]
    assert len(lines) == 1 and "2 record(s)" in lines[0]
    assert train[0]["images"] == [paths[0]]
    assert collator([train[0]])["pixel_values"].shape[0] == 1
    # Mllama takes several images per conversation
    tok, train, collator = prepared(vlm("mllama"), data, tmp_path)
    assert train[0]["images"] == paths


def _bad(tmp_path, record):
    return write_jsonl(tmp_path / "bad.jsonl", [conversation(str(tmp_path / "ok.png")), record])


@pytest.mark.parametrize("case,expected", [
    ("missing image", "bad.jsonl:2: field 'images': {tmp}/gone.png: image file not found"),
    ("unreadable image", "bad.jsonl:2: field 'images': {tmp}/junk.png: not a readable image"),
    ("more placeholders", "bad.jsonl:2: field 'messages' has 2 image placeholder(s) but field "
                          "'images' has 1 image(s)"),
    ("no image field", "bad.jsonl:2: field 'messages' has 1 image placeholder(s) but there is "
                       "no field 'images' image(s)"),
    ("no text field", "bad.jsonl:2: missing field 'messages'"),
    ("bad part", "bad.jsonl:2: field 'messages' message 2 part 1: expected"),
])
def test_bad_input_is_one_line_before_the_model_loads(vlm, tmp_path, case, expected):
    """A model folder without weights: the data error must come first."""
    model = tmp_path / "model"
    shutil.copytree(vlm("llava"), model)
    os.remove(model / "model.safetensors")
    draw_shape("red", "circle").save(tmp_path / "ok.png")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    rec = conversation(str(tmp_path / "ok.png"))
    if case == "missing image":
        rec["images"] = str(tmp_path / "gone.png")
    elif case == "unreadable image":
        rec["images"] = [str(tmp_path / "junk.png")]
    elif case == "more placeholders":
        rec["messages"][3]["content"] = [{"type": "image"}, {"type": "text", "text": "and?"}]
    elif case == "no image field":
        del rec["images"]
    elif case == "no text field":
        rec = {"conversation": rec["messages"], "images": rec["images"]}
    elif case == "bad part":
        rec["messages"][1]["content"][0] = {"type": "video"}
    data = _bad(tmp_path, rec)
    res = run_cli(["train", "--plugins", "vision", "--model_name_or_path", str(model),
                   "--training_data_path", data, "--output_dir", str(tmp_path / "out")])
    assert res.exit_code == 2, res.stderr[-2000:]
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("fmtune: error: ") and f"{tmp_path}/" in line
    assert expected.format(tmp=tmp_path) in line, line
    assert not (tmp_path / "out").exists()
