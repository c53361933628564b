"""dataprocessor.type: odm in real training runs: the Trainer trains on the mixed stream, the
train loss moves the mix toward the dataset whose loss stays high (read from the odm.jsonl and
run_summary.json the run writes), the same seed gives the same examples, and a resumed run
continues with the examples and ratios of the uninterrupted one."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from fmtune import hookimpl
from fmtune.testing import build_tiny_model, run_cli, torchrun, train, write_jsonl

WORDS = ["the", "red", "cat", "sees", "a", "dog", "quick", "brown", "fox", "jumps", "over",
         "lazy", "hello", "there", "four", "two", "plus", "yes", "no", "true", "false"]
EASY = {"input": "hello there", "output": "four"}  # one record: learnt within a few steps


def hard_records(n: int = 40) -> list[dict]:
    """Random outputs: their loss stays high."""
    rng = random.Random(7)
    return [{"input": " ".join(rng.choices(WORDS, k=3)),
             "output": " ".join(rng.choices(WORDS, k=6))} for _ in range(n)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    texts = [" ".join(WORDS)] * 4 + [f"{r['input']} {r['output']}" for r in hard_records()]
    return build_tiny_model(tmp_path_factory.mktemp("odm-llama"), texts)


@pytest.fixture
def data_config(tmp_path):
    write_jsonl(tmp_path / "easy.jsonl", [EASY] * 8)
    write_jsonl(tmp_path / "hard.jsonl", hard_records())
    cfg = tmp_path / "odm.yaml"
    cfg.write_text(f"""
dataprocessor:
  type: odm
  seed: 66
  odm:
    update_interval: 1
    sampling_interval: 4
    reward_type: train_loss
    gamma: 0.3
    eta: 0.3
datasets:
  - name: easy
    sampling: 0.5
    data_paths: [{tmp_path / "easy.jsonl"}]
  - name: hard
    sampling: 0.5
    data_paths: [{tmp_path / "hard.jsonl"}]
""")
    return str(cfg)


class Seen:
    """Every input_ids batch the model's forward was handed."""

    def __init__(self) -> None:
        self.batches: list[list[list[int]]] = []

    @hookimpl
    def on_train_begin(self, run):
        run.model.register_forward_pre_hook(
            lambda m, a, kw: self.batches.append(kw["input_ids"].tolist()), with_kwargs=True)


def argv(model, cfg, out, *extra):
    return ["train", "--model_name_or_path", model, "--data_config_path", cfg,
            "--output_dir", str(out), "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-2", "--logging_steps", "1", "--save_strategy", "no",
            "--seed", "0", "--max_steps", "24", *extra]


def odm_log(out):
    with open(out / "odm.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_the_mix_moves_toward_the_dataset_whose_loss_stays_high(model, data_config, tmp_path):
    out = tmp_path / "out"
    seen = Seen()
    rec = train(argv(model, data_config, out), plugins=[seen])
    lines = odm_log(out)
    assert [x["step"] for x in lines] == list(range(1, 25))  # an update at every step
    # every batch is one dataset (sampling_interval 4 = the batch), credited with its loss
    assert all(sum(x["sampled"].values()) == 4 and 4 in x["sampled"].values() for x in lines)
    assert [x["credited"] for x in lines] == [max(x["sampled"], key=x["sampled"].get)
                                              for x in lines]
    assert [x["loss"] for x in lines] == pytest.approx(rec.losses)
    easy = [x["loss"] for x in lines if x["credited"] == "easy"]
    hard = [x["loss"] for x in lines if x["credited"] == "hard"]
    assert easy and hard and easy[-1] < 1.0 < min(hard[len(hard) // 2:])

    def share(part):
        return sum(x["sampled"]["hard"] for x in part) / sum(4 for _ in part)

    # equal weights at first; the easy dataset, sampled first, gains while it is the only one
    # with a loss; once the hard one's loss is seen the mix moves to it, up to 1 - gamma / 2
    assert lines[0]["sampling_ratios"]["hard"] < 0.5
    assert share(lines[:8]) <= 0.25 and share(lines[-8:]) >= 0.75
    assert 0.8 < lines[-1]["sampling_ratios"]["hard"] <= 0.85
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["odm"]["datasets"] == ["easy", "hard"]
    assert summary["odm"]["sampled"] == {n: sum(x["sampled"][n] for x in lines)
                                         for n in ("easy", "hard")}
    assert summary["odm"]["sampling_ratios"] == lines[-1]["sampling_ratios"]
    assert summary["odm"]["updates"] == 24 and summary["global_step"] == 24
    # the model was handed the mixed rows: 24 batches of 4, the easy one wherever it was sampled
    assert len(seen.batches) == 24 and all(len(b) == 4 for b in seen.batches)


def test_same_seed_same_stream(model, data_config, tmp_path):
    runs = []
    for name in ("a", "b"):
        seen = Seen()
        train(argv(model, data_config, tmp_path / name, "--max_steps", "10"), plugins=[seen])
        runs.append((seen.batches, odm_log(tmp_path / name)))
    assert runs[0][0] == runs[1][0]
    assert [(x["credited"], x["sampled"]) for x in runs[0][1]] == \
        [(x["credited"], x["sampled"]) for x in runs[1][1]]


def test_resume_equals_the_uninterrupted_run(model, data_config, tmp_path):
    saving = ["--save_strategy", "steps", "--save_steps", "8"]
    whole = Seen()
    train(argv(model, data_config, tmp_path / "a", *saving), plugins=[whole])
    full = odm_log(tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoint-8"
    state = json.loads((ckpt / "odm_state.json").read_text())
    assert state["datasets"] == ["easy", "hard"] and len(state["updates"]) == 8
    resumed = Seen()
    train(argv(model, data_config, tmp_path / "r", *saving, "--resume_from_checkpoint",
               str(ckpt)), plugins=[resumed])
    assert resumed.batches == whole.batches[8:]  # the same examples after the checkpoint
    rest = odm_log(tmp_path / "r")
    assert [x["step"] for x in rest] == list(range(9, 25))
    for got, want in zip(rest, full[8:]):
        assert (got["credited"], got["sampled"]) == (want["credited"], want["sampled"])
        assert got["sampling_ratios"] == pytest.approx(want["sampling_ratios"], rel=1e-6)
    summary = json.loads((tmp_path / "r" / "run_summary.json").read_text())
    assert summary["odm"]["sampled"] == json.loads(
        (tmp_path / "a" / "run_summary.json").read_text())["odm"]["sampled"]


@pytest.mark.parametrize("extra, needle", [
    (["--max_steps", "-1"], "dataprocessor.type: odm needs max_steps (the mixed stream has no "
                            "length)"),
    (["--logging_steps", "2"], "dataprocessor.odm.update_interval: 1 is not a multiple of "
                               "logging_steps 2"),
    (["--packing", "true"], "dataprocessor.type: odm: --packing is not supported"),
])
def test_refused_before_anything_loads(model, data_config, tmp_path, extra, needle):
    res = run_cli([*argv(model, data_config, tmp_path / "o"), *extra])
    assert res.exit_code == 2
    errors = [x for x in res.stderr.splitlines() if x.startswith("fmtune: error:")]
    assert len(errors) == 1 and f"{data_config}: {needle}" in errors[0], res.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------- rewards on the validation splits, and gradnorm

def reward_config(tmp_path, reward: str | None, interval: int = 2, hard_split: bool = True):
    """easy (8 identical records) and hard (40 random ones), each split 3/4 train, 1/4
    validation (2 and 10 records); reward_type omitted when ``reward`` is None."""
    write_jsonl(tmp_path / "easy.jsonl", [EASY] * 8)
    write_jsonl(tmp_path / "hard.jsonl", hard_records())
    split = "\n    split: {train: 0.75, validation: 0.25}"
    cfg = tmp_path / f"odm-{reward}.yaml"
    cfg.write_text(f"""
dataprocessor:
  type: odm
  seed: 66
  odm:
    update_interval: {interval}
    sampling_interval: 4{'' if reward is None else f'''
    reward_type: {reward}'''}
    gamma: 0.3
    eta: 0.3
datasets:
  - name: easy
    sampling: 0.5{split}
    data_paths: [{tmp_path / "easy.jsonl"}]
  - name: hard
    sampling: 0.5{split if hard_split else ''}
    data_paths: [{tmp_path / "hard.jsonl"}]
""")
    return str(cfg)


class Trained:
    """The training batches (not the reward computation's eval forwards), the logged
    grad_norms, and at the end the model and each dataset's validation split."""

    def __init__(self) -> None:
        self.batches: list[list[list[int]]] = []
        self.grad_norms: list[float] = []
        self.model = self.validation = None

    @hookimpl
    def on_train_begin(self, run):
        run.model.register_forward_pre_hook(
            lambda m, a, kw: self.batches.append(kw["input_ids"].tolist()) if m.training
            else None, with_kwargs=True)

    @hookimpl
    def on_log(self, run, logs):
        if "grad_norm" in logs:
            self.grad_norms.append(float(logs["grad_norm"]))

    @hookimpl
    def on_train_end(self, run):
        from fmtune_data_handlers.plugin import ODM

        self.model, self.validation = run.model, run.config.stash[ODM].validation


def by_hand(model, ds):
    """Each validation sequence run alone: its normalized mean entropy (log of the model's
    vocabulary) and its summed loss over the trained labels and their number."""
    import math

    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for ids, labels in zip(ds["input_ids"], ds["labels"]):
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            h = -(logp.exp() * logp).sum(-1)[:-1]
            targets = [(t, labels[t + 1]) for t in range(len(ids) - 1) if labels[t + 1] != -100]
            out.append((float(h.mean()) / math.log(logp.shape[-1]),
                        -sum(float(logp[t, y]) for t, y in targets), len(targets)))
    return out


def exp3_ratios(lines, gamma=0.3, eta=0.3, names=("easy", "hard")):
    """The ratios after each logged update, recomputed from the logged rewards and counts."""
    import math

    w, ratio, got = [0.5, 0.5], [0.5, 0.5], []
    for x in lines:
        counts = x.get("counts") or dict.fromkeys(names, 1)
        w = [w[k] * math.exp(eta * x["rewards"][n] / counts[n] / ratio[k] / 2)
             for k, n in enumerate(names)]
        ratio = [(1 - gamma) * wk / sum(w) + gamma / 2 for wk in w]
        got.append(dict(zip(names, ratio)))
    return got


def test_entropy_is_the_default_reward(model, tmp_path):
    cfg = reward_config(tmp_path, None)
    out = tmp_path / "out"
    seen = Trained()
    train(argv(model, cfg, out, "--max_steps", "12", "--per_device_eval_batch_size", "3"),
          plugins=[seen])
    lines = odm_log(out)
    assert [x["step"] for x in lines] == [2, 4, 6, 8, 10, 12]
    assert {x["reward_type"] for x in lines} == {"entropy"}
    assert all(x["counts"] == {"easy": 2, "hard": 10} for x in lines)  # the validation splits
    assert len(seen.batches) == 12  # 12 training steps; the reward forwards are not training
    for got, want in zip(lines, exp3_ratios(lines)):
        assert got["sampling_ratios"] == pytest.approx(want, rel=1e-9)
    # the last update's rewards: the trained model's entropies of the validation sequences
    for name in ("easy", "hard"):
        want = by_hand(seen.model, seen.validation[name])
        assert len(want) == lines[0]["counts"][name]
        assert lines[-1]["rewards"][name] == pytest.approx(sum(h for h, _, _ in want), rel=1e-4)
    # the easy record is learnt: its entropy falls below the hard ones', which gain weight
    first, last = lines[0]["rewards"], lines[-1]["rewards"]
    assert last["easy"] / 2 < first["easy"] / 2 and last["easy"] / 2 < last["hard"] / 10
    ratios = [x["sampling_ratios"]["hard"] for x in lines]
    assert len(set(ratios)) == 6 and ratios[-1] > ratios[-2] > ratios[0] > 0.5
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["odm"]["reward_type"] == "entropy" and summary["odm"]["updates"] == 6


def test_entropy_resume_equals_the_uninterrupted_run(model, tmp_path):
    cfg = reward_config(tmp_path, "ENTROPY3_VARENT1")  # upper case, as fms writes it
    saving = ["--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4"]
    whole = Trained()
    train(argv(model, cfg, tmp_path / "a", *saving), plugins=[whole])
    full = odm_log(tmp_path / "a")
    state = json.loads((tmp_path / "a" / "checkpoint-4" / "odm_state.json").read_text())
    assert state["reward_type"] == "entropy3_varent1"
    assert [u[1:] for u in state["updates"]] == [
        [[x["rewards"]["easy"], x["rewards"]["hard"]], [2.0, 10.0]] for x in full[:2]]
    resumed = Trained()
    train(argv(model, cfg, tmp_path / "r", *saving, "--resume_from_checkpoint",
               str(tmp_path / "a" / "checkpoint-4")), plugins=[resumed])
    assert resumed.batches == whole.batches[4:]
    rest = odm_log(tmp_path / "r")
    assert [x["step"] for x in rest] == [6, 8]
    for got, want in zip(rest, full[2:]):
        assert got["sampled"] == want["sampled"]
        assert got["rewards"] == pytest.approx(want["rewards"], rel=1e-5)
        assert got["sampling_ratios"] == pytest.approx(want["sampling_ratios"], rel=1e-6)


def test_validation_loss_reward(model, tmp_path):
    cfg = reward_config(tmp_path, "validation_loss")
    out = tmp_path / "out"
    seen = Trained()
    train(argv(model, cfg, out, "--max_steps", "6", "--per_device_eval_batch_size", "16"),
          plugins=[seen])
    lines = odm_log(out)
    assert [x["step"] for x in lines] == [2, 4, 6]
    assert all(x["counts"] == {"easy": 1, "hard": 1} for x in lines)
    for got, want in zip(lines, exp3_ratios(lines)):
        assert got["sampling_ratios"] == pytest.approx(want, rel=1e-9)
    # one batch per split: the mean loss over its trained tokens, with the trained model
    for name in ("easy", "hard"):
        want = by_hand(seen.model, seen.validation[name])
        assert lines[-1]["rewards"][name] == pytest.approx(
            sum(s for _, s, _ in want) / sum(n for _, _, n in want), rel=1e-4)
    assert lines[-1]["rewards"]["easy"] < lines[0]["rewards"]["easy"]
    assert lines[-1]["rewards"]["easy"] < lines[-1]["rewards"]["hard"]


def test_gradnorm_reward(model, tmp_path):
    cfg = reward_config(tmp_path, "gradnorm", interval=1, hard_split=False)
    out = tmp_path / "out"
    seen = Trained()
    train(argv(model, cfg, out, "--max_steps", "6"), plugins=[seen])
    lines = odm_log(out)
    assert [x["step"] for x in lines] == list(range(1, 7))
    assert [x["grad_norm"] for x in lines] == pytest.approx(seen.grad_norms)
    buffer = {"easy": 1e-100, "hard": 1e-100}
    for x in lines:  # each batch is one dataset, credited with 1 / (grad_norm + 0.0001)
        assert x["credited"] == max(x["sampled"], key=x["sampled"].get)
        buffer[x["credited"]] = 1 / (x["grad_norm"] + 0.0001)
        assert x["rewards"] == pytest.approx(buffer, rel=1e-12)
    for got, want in zip(lines, exp3_ratios(lines)):
        assert got["sampling_ratios"] == pytest.approx(want, rel=1e-9)
    assert len({x["sampling_ratios"]["hard"] for x in lines}) == 6


def test_a_validation_reward_needs_every_validation_split(model, tmp_path):
    cfg = reward_config(tmp_path, None, hard_split=False)
    res = run_cli(argv(model, cfg, tmp_path / "o"))
    assert res.exit_code == 2
    errors = [x for x in res.stderr.splitlines() if x.startswith("fmtune: error:")]
    assert errors == [f"fmtune: error: invalid config: {cfg}: dataprocessor.odm.reward_type "
                      "entropy computes each dataset's reward on its validation split; "
                      "datasets[hard] has none (add split: {train: 0.9, validation: 0.1})"], \
        res.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("reward, extra, needle", [
    ("gradnorm", ["--max_grad_norm", "0"], "dataprocessor.odm.reward_type gradnorm is computed "
     "from the logged grad_norm, which the Trainer computes only with max_grad_norm > 0 (got "
     "max_grad_norm 0)"),
    ("gradnorm", ["--logging_steps", "2"], "dataprocessor.odm.update_interval: 1 is not a "
     "multiple of logging_steps 2 (the gradnorm reward is the logged grad_norm)"),
])
def test_gradnorm_refusals(model, tmp_path, reward, extra, needle):
    cfg = reward_config(tmp_path, reward, interval=1, hard_split=False)
    res = run_cli([*argv(model, cfg, tmp_path / "o"), *extra])
    assert res.exit_code == 2
    errors = [x for x in res.stderr.splitlines() if x.startswith("fmtune: error:")]
    assert errors == [f"fmtune: error: invalid config: {cfg}: {needle}"], res.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ several processes

ODM_DRIVER = '''
import json, os, sys
from fmtune import hookimpl
from fmtune.cli import main

class Seen:
    rows = []
    @hookimpl
    def on_train_begin(self, run):
        self.stream = run.trainer.train_dataset
        run.model.register_forward_pre_hook(
            lambda m, a, kw: self.rows.append(kw["input_ids"][0].tolist()), with_kwargs=True)
    @hookimpl
    def on_train_end(self, run):
        rank = int(os.environ["RANK"])
        with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
            json.dump({"rows": self.rows, "ratios": self.stream.mixer.ratios,
                       "updates": [list(u) for u in self.stream.updates]}, f)

sys.exit(main(sys.argv[2:], extra_plugins=[Seen()]))
'''


def test_two_processes_train_their_shares_of_one_mixed_stream(model, data_config, tmp_path):
    """Every process reads the same mixed stream (same seed, same updates from the same logged
    loss) and trains its share of each round of batches: rank r the r-th batch of every two,
    padding-free (a batch is one row), as fms-hf-tuning runs online mixing on several GPUs."""
    driver = tmp_path / "driver.py"
    driver.write_text(ODM_DRIVER)
    steps = 6
    torchrun(driver, str(tmp_path), *argv(model, data_config, tmp_path / "out", "--padding_free",
                                          "huggingface", "--max_steps", str(steps)),
             cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(r["rows"]) for r in ranks] == [steps, steps]
    # the same updates (from the same gathered loss) and ratios on both ranks, one per step
    assert ranks[0]["updates"] == ranks[1]["updates"] and len(ranks[0]["updates"]) == steps
    assert ranks[0]["ratios"] == ranks[1]["ratios"]
    lines = odm_log(tmp_path / "out")
    assert [x["step"] for x in lines] == list(range(1, steps + 1))
    assert sum(sum(x["sampled"].values()) for x in lines) == steps * 2 * 4  # both ranks' rows
    # the stream replayed with the recorded updates: rank r trained batch 2k+r of it
    from fmtune_data_handlers.odm import MixingStream

    stream = replayed_stream(model, data_config, tmp_path, ranks[0]["updates"])
    it = iter(stream)
    batches = [[next(it) for _ in range(4)] for _ in range(2 * steps)]
    for k in range(steps):
        for r in (0, 1):
            want = [t for row in batches[2 * k + r] for t in row["input_ids"]]
            assert ranks[r]["rows"][k] == want
    assert ranks[0]["rows"] != ranks[1]["rows"]
    assert isinstance(stream, MixingStream)
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["odm"]["updates"] == steps


def replayed_stream(model, data_config, tmp_path, updates):
    """The run's mixing stream built again from the same data and config, set to replay
    ``updates`` (as a resumed run does)."""
    from fmtune.commands import load_config, validate
    from fmtune_data_handlers.plugin import mixing_stream, prepare

    config, pm, _, _ = load_config([*argv(model, data_config, tmp_path / "again")][1:])
    validate(config, pm)
    prepared = prepare(config, pm.hook.load_tokenizer(config=config), pm)
    stream = mixing_stream(config, prepared.parts, prepared.odm)
    stream.load_state_dict({"datasets": stream.names, "reward_type": "train_loss",
                            "updates": updates})
    return stream


# ------------------------------------------------------------------ auto-categorization

TOPIC_A = ["red", "cat", "sees", "a", "dog", "quick", "brown", "fox"]
TOPIC_B = ["two", "plus", "four", "yes", "no", "true", "false", "hello"]


def topic_records(words: list[str], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"input": " ".join(rng.choices(words, k=12)), "output": " ".join(rng.choices(words, k=12))}
            for _ in range(n)]


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    """A tiny random-init Llama saved as a sentence-transformers folder (mean pooling, then
    normalized), as Qwen3-Embedding's folder is laid out (it pools the last token)."""
    folder = tmp_path_factory.mktemp("embedder")
    build_tiny_model(folder, [" ".join(TOPIC_A + TOPIC_B + WORDS)] * 4, seed=3)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False, "include_prompt": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    return str(folder)


def auto_config(tmp_path, embedder, extra: str = "", reward: str = "train_loss") -> str:
    write_jsonl(tmp_path / "mixed.jsonl",
                [r for pair in zip(topic_records(TOPIC_A, 20, 1), topic_records(TOPIC_B, 20, 2))
                 for r in pair])
    cfg = tmp_path / "auto.yaml"
    cfg.write_text(f"""
dataprocessor:
  type: odm
  seed: 5
  odm:
    update_interval: 1
    reward_type: {reward}
    auto_categorize_input_column: "input"
    auto_categorize_num_categories: "2"
    auto_categorize_model_name: {embedder}
    auto_categorize_batch_size: 8{extra}
datasets:
  - name: mixed
    split: {{train: 0.75, validation: 0.25}}
    data_paths: [{tmp_path / "mixed.jsonl"}]
""")
    return str(cfg)


def embeddings(tok, embedder, rows):
    """Each example's text (its ids decoded) embedded alone, without padding: the mean of the
    hidden states over its tokens after the clustering prompt, normalized."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    etok = AutoTokenizer.from_pretrained(embedder)
    model = AutoModel.from_pretrained(embedder).eval()
    vectors = []
    with torch.no_grad():
        for ids in rows:
            text = "Identify the topic or theme based on the text: " + tok.decode(ids)
            v = model(**etok(text, return_tensors="pt")).last_hidden_state[0].mean(0)
            vectors.append((v / v.norm()).numpy())
    return np.stack(vectors)


def expected_categories(tok, embedder, rows, seed):
    """The clusters computed independently: scikit-learn's KMeans as fms-acceleration calls
    it, seeded, over :func:`embeddings`."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=2, n_init=10, random_state=seed)
    return km.fit_predict(embeddings(tok, embedder, rows)), km


def test_auto_categorize_one_dataset_into_the_clusters_of_its_embeddings(model, embedder,
                                                                         tmp_path):
    from fmtune.commands import load_config, validate
    from fmtune_data_handlers.plugin import auto_categorized, prepare

    cfg = auto_config(tmp_path, embedder, reward="entropy")
    config, pm, _, _ = load_config(["--data_config_path", cfg, "--model_name_or_path", model,
                                    "--output_dir", str(tmp_path / "o"), "--max_steps", "4"])
    validate(config, pm)
    tok = pm.hook.load_tokenizer(config=config)
    prepared = prepare(config, tok, pm)
    parts, odm = auto_categorized(config, tok, prepared)
    valid = odm["validation"]
    assert sorted(parts) == sorted(valid) == ["auto_category_0", "auto_category_1"]
    train_rows = [list(r["input_ids"]) for r in prepared.train]  # the concatenation: all rows
    labels, km = expected_categories(tok, embedder, train_rows, 5)
    for c in (0, 1):
        got = sorted(list(r["input_ids"]) for r in parts[f"auto_category_{c}"])
        assert got == sorted(row for row, x in zip(train_rows, labels) if x == c)
    # the two topics are the two clusters (the examples are read back as text)
    topic = [set(tok.decode(r, skip_special_tokens=True).split()) <= set(TOPIC_A)
             for r in train_rows]
    assert {tuple(sorted({t for t, x in zip(topic, labels) if x == c})) for c in (0, 1)} == \
        {(False,), (True,)}
    # validation rows are assigned to the training clusters (KMeans.predict)
    valid_rows = [list(r["input_ids"]) for r in prepared.validation]
    predicted = km.predict(embeddings(tok, embedder, valid_rows))
    for c in (0, 1):
        assert sorted(list(r["input_ids"]) for r in valid[f"auto_category_{c}"]) == \
            sorted(row for row, x in zip(valid_rows, predicted) if x == c)


def test_auto_categorized_training_mixes_the_categories(model, embedder, tmp_path):
    cfg = auto_config(tmp_path, embedder)
    res = run_cli([*argv(model, cfg, tmp_path / "out", "--max_steps", "6")])
    assert res.exit_code == 0, res.stderr[-3000:]
    lines = odm_log(tmp_path / "out")
    assert len(lines) == 6 and set(lines[0]["sampling_ratios"]) == {"auto_category_0",
                                                                     "auto_category_1"}
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["odm"]["datasets"] == ["auto_category_0", "auto_category_1"]
    assert sum(summary["odm"]["sampled"].values()) == 6 * 4
    assert "odm: auto-categorizing 30 examples into 2 categories" in res.stderr


@pytest.mark.parametrize("change, needle", [
    ("two datasets", "dataprocessor.odm.auto_categorize_input_column splits one dataset into "
                     "categories; this config lists 2 datasets (they are the categories: remove "
                     "the auto_categorize keys)"),
    ("no model", "dataprocessor.odm.auto_categorize_input_column: embedding model "
                 "/nonexistent/embedder: no such folder"),
    ("bad count", "dataprocessor.odm.auto_categorize_num_categories: must be a positive number, "
                  "got 'three'"),
])
def test_auto_categorize_refusals(model, embedder, tmp_path, change, needle):
    cfg = Path(auto_config(tmp_path, embedder))
    text = cfg.read_text()
    if change == "two datasets":
        text += f"""  - name: other
    data_paths: [{tmp_path / "mixed.jsonl"}]
"""
    elif change == "no model":
        text = text.replace(embedder, "/nonexistent/embedder")
    else:
        text = text.replace('"2"', '"three"')
    cfg.write_text(text)
    res = run_cli([*argv(model, str(cfg), tmp_path / "o")])
    assert res.exit_code == 2
    errors = [x for x in res.stderr.splitlines() if x.startswith("fmtune: error:")]
    assert len(errors) == 1 and f"{cfg}: {needle}" in errors[0], res.stderr
    assert not (tmp_path / "o").exists()
