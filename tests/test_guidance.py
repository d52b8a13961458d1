"""Guidance by a classifier of noised text (#22): on a toy two-topic corpus (rivers vs numbers) an unlabelled
micro diffusion model and a micro guide, trained for seconds, steer samples toward each topic — judged by
keyword counts, against the unguided share — by first-order classifier guidance and by particles (smc); the
guide's accuracy rises with the unmasked fraction; bad input is one line and exit 2; the server takes `label`."""

import json
import random

import pytest
import torch

from textdiffusion.cli.main import main
from textdiffusion.errors import UsageError
from textdiffusion.models.guide import GuideInfo, NoisyClassifier
from textdiffusion.pipelines.generation import DiffusionGenerator
from textdiffusion.pipelines.guidance import systematic_resample

RIVER = "river water bank flows valley stream delta boats shore rain".split()
NUMBER = "seven twelve number sum prime digits count even odd nine".split()
GLUE = ["the", "and", "of", "a"]
# generation settings of the steering tests: the whole row is text (no end-of-text), one token per step
SETTINGS = dict(steps=14, suppress_tokens=["</s>"], stop_at_eos=False)


def toy_rows(n: int, seed: int = 0) -> list[dict]:
    """Sentences about rivers or about numbers (topic words among shared glue words)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic, words = ("rivers", RIVER) if i % 2 else ("numbers", NUMBER)
        text = " ".join(rng.choice(words) if rng.random() < 0.6 else rng.choice(GLUE) for _ in range(rng.randint(6, 10)))
        rows.append({"text": text, "topic": topic})
    return rows


def river_share(texts: list[str]) -> float:
    """The judge: per sample, river keywords over all topic keywords (0.5 with none), averaged."""
    shares = []
    for text in texts:
        words = text.split()
        r, n = sum(w in RIVER for w in words), sum(w in NUMBER for w in words)
        shares.append(r / (r + n) if r + n else 0.5)
    return sum(shares) / len(shares)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(corpus file, unlabelled diffusion checkpoint, guide folder): about 20 s on one core."""
    from textdiffusion.pipelines.training import run_training
    from textdiffusion.pipelines.training_args import TrainArgs

    root = tmp_path_factory.mktemp("guidance")
    data = root / "topics.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in toy_rows(400)))
    checkpoint = run_training(TrainArgs(
        preset="micro", dataset=str(data), max_length=16, max_steps=600, eval_steps=600, eval_blocks=8, batch_size=16,
        vocab_size=420, learning_rate=6e-3, warmup=0.02, validation_fraction=0.1, precision="fp32", logging_steps=600,
        output_dir=str(root / "diffusion")))
    assert main(["train-guide", "--checkpoint", str(checkpoint), "--dataset", str(data), "--label-column", "topic",
                 "--output-dir", str(root / "guide"), "--steps", "200", "--validation-fraction", "0.1"]) == 0
    return data, str(checkpoint), str(root / "guide")


@pytest.fixture(scope="module")
def generator(toy):
    return DiffusionGenerator.from_pretrained(toy[1], device="cpu")


@pytest.fixture(scope="module")
def guide(toy, generator):
    return generator.open_guide(toy[2])


@pytest.fixture(scope="module")
def unguided(generator):
    return river_share(generator.generate([""] * 32, seed=0, **SETTINGS).texts)


# -- the guide --------------------------------------------------------------------------------------
def test_guide_accuracy_rises_with_the_unmasked_fraction(guide):
    levels = sorted(guide.info.accuracy, key=float)  # masked fraction, 0 first
    accuracy = [guide.info.accuracy[k] for k in levels]
    assert float(levels[0]) == 0.0 and float(levels[-1]) == 1.0
    assert accuracy[0] >= 0.9 and accuracy[-1] <= 0.7  # clean text is easy; all-masked is chance
    assert all(a >= b - 0.05 for a, b in zip(accuracy, accuracy[1:]))  # more visible text, no worse
    assert guide.labels == ["numbers", "rivers"] and not guide.info.label_slot


def test_first_order_deltas_point_the_way_exact_scores_move(guide, generator):
    """The Taylor estimate of log p(y | x[pos := v]) - log p(y | x) ranks tokens as exact scoring does."""
    x, _, attention = generator.build_batch(["the<mask:8>"])  # no topic yet: p(y | x) is not saturated
    positions = x == generator.mask_id
    y = torch.tensor([guide.labels.index("rivers")])
    delta = guide.token_deltas(x, attention, y, positions)  # [6, V]
    pos = int(positions[0].nonzero()[0])
    vocab = generator.tokenizer.get_vocab()
    candidates = [vocab["Ġ" + w] for w in RIVER[:5] + NUMBER[:5]]
    rows = x.repeat(len(candidates), 1)
    rows[:, pos] = torch.tensor(candidates)
    exact = guide.log_probs(rows, attention.repeat(len(candidates), 1))[:, int(y)] - guide.log_probs(x, attention)[0, int(y)]
    approx = delta[0, candidates]
    assert float(torch.corrcoef(torch.stack([exact, approx]))[0, 1]) > 0.5
    assert float(approx[:5].min()) > float(approx[5:].max())  # every river word is pushed above every number word


def test_systematic_resampling():
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    log_w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [-1e9, 0.0, -1e9, -1e9], [0.0, 0.0, -1e9, -1e9]], dtype=torch.float64)
    ancestors = systematic_resample(log_w, gens)
    assert ancestors[0].tolist() == [0, 1, 2, 3]  # equal weights: every particle once
    assert ancestors[1].tolist() == [1, 1, 1, 1]  # all the weight on one
    assert sorted(ancestors[2].tolist()) == [0, 0, 1, 1]  # half and half: exactly two each


# -- steering ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["classifier", "smc"])
def test_guidance_raises_each_topics_share_over_the_unguided_one(generator, guide, unguided, method):
    shares = {}
    for label in ("rivers", "numbers"):
        out = generator.generate([""] * 32, seed=0, label=label, guidance=method, guide=guide, guidance_scale=3.0,
                                 particles=8, **SETTINGS)
        assert len(out.texts) == 32
        shares[label] = river_share(out.texts)
    assert shares["rivers"] > unguided + 0.08, (method, shares, unguided)
    assert shares["numbers"] < unguided - 0.08, (method, shares, unguided)


def test_smc_is_seeded_and_works_in_blocks_with_the_cache(generator, guide):
    kw = dict(label="rivers", guidance="smc", guide=guide, particles=4, block_length=7, **SETTINGS)
    a = generator.generate(["the"] * 3, seed=5, cache="auto", **kw)
    b = generator.generate(["the"] * 3, seed=5, cache="auto", **kw)
    assert a.texts == b.texts and a.token_ids.shape[0] == 3
    assert generator.generate(["the"] * 3, seed=6, cache="auto", **kw).texts != a.texts
    exact = generator.generate(["the"] * 3, seed=5, cache="prefix", cache_refresh="step", **kw)
    plain = generator.generate(["the"] * 3, seed=5, cache="none", **kw)
    assert exact.texts == plain.texts  # the cached rows follow their resampled particles exactly
    assert not bool((a.token_ids == generator.mask_id).any())


# -- bad input --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def foreign_guide(toy, tmp_path_factory):
    """A guide whose tokenizer is not the checkpoint's."""
    from textdiffusion.models.discriminative import build_sequence_classifier
    from textdiffusion.models.presets import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer([r["text"] for r in toy_rows(100, seed=3)] + ["zebra quokka"] * 5, 300)
    model = build_sequence_classifier(tokenizer, "micro", 2, 16)
    path = tmp_path_factory.mktemp("foreign") / "guide"
    NoisyClassifier(model, tokenizer, GuideInfo(["numbers", "rivers"], False, 16, "other")).save(path)
    return str(path)


def test_bad_input_is_one_line_and_exit_2(toy, foreign_guide, tmp_path, capsys):
    data, checkpoint, guide = toy
    base = ["generate", "--checkpoint", checkpoint, "--hide-steps", "--steps", "4"]
    cases = [
        (base + ["--label", "lakes", "--guide", guide], "'lakes' is not a label of the guide"),
        (base + ["--label", "rivers"], "was not trained with labels"),  # an unlabelled model, no guide
        (base + ["--label", "rivers", "--guidance", "classifier"], "--guidance classifier needs a guide (--guide DIR"),
        (base + ["--label", "rivers", "--guidance", "smc", "--guide", guide, "--particles", "0"], "--particles must be in"),
        (base + ["--guide", guide], "--guidance classifier needs --label"),
        (base + ["--label", "rivers", "--guidance", "cfg"], "--guidance cfg needs --cfg-scale > 0"),
        (base + ["--label", "rivers", "--guidance", "beam", "--guide", guide], "--guidance must be one of"),
        (base + ["--label", "rivers", "--guide", foreign_guide], "was trained with another tokenizer"),
        (base + ["--label", "rivers", "--guide", str(tmp_path)], "is not a guide folder"),
        (["train-guide", "--checkpoint", checkpoint, "--dataset", str(data), "--label-column", "nope",
          "--output-dir", str(tmp_path / "g")], "--label-column 'nope'"),
        (["train-guide", "--checkpoint", checkpoint, "--dataset", str(data), "--output-dir", str(tmp_path / "g")],
         "--label-column is required"),
        (["train-guide", "--checkpoint", checkpoint, "--dataset", str(data), "--label-column", "topic",
          "--exclude-labels", "lakes", "--output-dir", str(tmp_path / "g")], "--exclude-labels 'lakes' is not a class"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
    with pytest.raises(UsageError, match=f"--checkpoint {checkpoint!r}"):  # the message names both
        DiffusionGenerator.from_pretrained(checkpoint).open_guide(foreign_guide)


def test_generate_cli_with_a_guide(toy, capsys):
    _, checkpoint, guide = toy
    assert main(["generate", "--checkpoint", checkpoint, "--hide-steps", "--label", "rivers", "--guidance", "smc",
                 "--guide", guide, "--particles", "3", "--num-samples", "2", "--steps", "6"]) == 0
    out = capsys.readouterr().out
    assert "[sample 1]" in out and "[sample 2]" not in out  # one text per sample, not per particle


# -- the server -------------------------------------------------------------------------------------
def test_server_takes_a_label_and_refuses_an_unknown_one(generator, guide):
    from fastapi.testclient import TestClient

    from textdiffusion.serving.app import create_app
    from textdiffusion.serving.engine import Engine

    for with_guide in (True, False):
        engine = Engine(generator, max_batch=32, guide=guide if with_guide else None)
        engine.start()
        try:
            client = TestClient(create_app(engine, model_id="toy"))
            info = client.get("/v1/models").json()["data"][0]
            ok = {"prompt": "the", "steps": 4, "n": 2, "label": "rivers", "max_length": 16}
            if with_guide:
                assert info["labels"] == ["numbers", "rivers"] and info["guidance"] == ["classifier", "smc"]
                for method in ("classifier", "smc"):
                    r = client.post("/v1/generate", json={**ok, "guidance": method, "particles": 3})
                    assert r.status_code == 200, r.text
                    assert len(r.json()["texts"]) == 2
                r = client.post("/v1/generate", json={**ok, "stream": True, "guidance": "smc", "particles": 2})
                assert r.status_code == 200 and "event: done" in r.text
                bad = client.post("/v1/generate", json={**ok, "label": "lakes"})
                assert bad.status_code == 422 and bad.json()["error"]["param"] == "label", bad.text
                many = client.post("/v1/generate", json={**ok, "n": 8, "guidance": "smc", "particles": 8})
                assert many.status_code == 422 and many.json()["error"]["param"] == "n"
            else:
                assert info["labels"] == [] and info["guidance"] == []
                bad = client.post("/v1/generate", json=ok)  # a label on an unlabelled model, no guide
                assert bad.status_code == 422 and bad.json()["error"]["param"] == "label", bad.text
                bad = client.post("/v1/generate", json={**ok, "guidance": "smc"})
                assert bad.status_code == 422 and bad.json()["error"]["param"] == "guide", bad.text
        finally:
            engine.stop()


# -- the benchmark ----------------------------------------------------------------------------------
@pytest.mark.slow  # a benchmark end to end: in `make test`, not the edit-test loop
def test_guidance_benchmark_runs_and_judges_every_method(toy, tmp_path):
    """benchmarks/guidance.py end to end on the toy (an unlabelled model: no label/cfg rows), gen PPL skipped: the
    judge's ceiling per topic, one row per method, the guided rows judged more on target than the unguided one.
    Full length: the toy's sentences are shorter than 12 tokens, and samples cut at end-of-text judge nothing."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from guidance import main as benchmark

    data, checkpoint, guide = toy
    out = tmp_path / "guidance"
    assert benchmark(["--checkpoint", checkpoint, "--guide", guide, "--dataset", str(data), "--samples", "12",
                      "--new-tokens", "12", "--steps", "12", "--full-length", "--classifier-scales", "4", "--smc-scales", "4",
                      "--particles", "4", "--judge-steps", "150", "--scorer", "none", "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in summary["results"]] == ["unguided (no label)", "classifier s=4", "smc 4 particles s=4"]
    assert {j["topic"] for j in summary["judge"]["per_topic"]} == {"numbers", "rivers"}
    assert all(j["recall_short"] > 0.7 for j in summary["judge"]["per_topic"])  # the keywords are easy to judge
    unguided, *guided = summary["results"]
    assert all(r["on_target"] > unguided["on_target"] + 0.1 for r in guided), summary["results"]
    assert guided[1]["cpu_s_per_sample"] > unguided["cpu_s_per_sample"]  # particles cost more than one row
    assert (out / "guidance.png").stat().st_size > 0 and "| smc 4 particles s=4 |" in (out / "results.md").read_text()
