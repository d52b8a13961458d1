"""Class-conditional training and generative classification: the label prefix is never masked, every
label of a text is scored with the same mask draws, the same seed gives the same probabilities, bad input
is one line and exit 2, and a toy two-language corpus is separated perfectly (slow: it trains)."""

import json
import random

import numpy as np
import pytest
import torch

from textdiffusion.cli.main import main
from textdiffusion.config import ConfigError, DiffusionConfig
from textdiffusion.core.collator import collator_from_config
from textdiffusion.core.data import load_corpus
from textdiffusion.core.labels import LABEL_POSITION, add_label_tokens, kept_labels, label_token, pack_labelled
from textdiffusion.errors import UsageError
from textdiffusion.models.presets import build_preset_model, train_bpe_tokenizer
from textdiffusion.pipelines.classification import (
    classification_metrics,
    expected_calibration_error,
    load_scorer,
    macro_f1,
)
from textdiffusion.pipelines.training_args import TrainArgs

ALPHA = "ka lo mi ne sa ti wu pe".split()
BETA = "zorg thrax vulm krynn bazz quop fjord glimt".split()


def toy_rows(n: int = 240, seed: int = 0) -> list[dict]:
    """Two synthetic 'languages' with disjoint words: the text alone says its class."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        lang, words = ("alpha", ALPHA) if i % 2 else ("beta", BETA)
        rows.append({"text": " ".join(rng.choice(words) for _ in range(rng.randint(6, 14))), "lang": lang,
                     "same": "x"})
    return rows


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in toy_rows()))
    return path


@pytest.fixture(scope="module")
def untrained(toy_file, tmp_path_factory):
    """An untrained micro denoiser with the toy labels, saved as a checkpoint (seconds, no training)."""
    corpus = load_corpus(str(toy_file), label_column="lang")
    tokenizer = train_bpe_tokenizer(corpus.train, 300)
    add_label_tokens(tokenizer, corpus.label_set)
    torch.manual_seed(0)
    model = build_preset_model("micro", tokenizer, 24)
    args = TrainArgs(preset="micro", label_column="lang", max_length=24)
    config = DiffusionConfig(max_length=24, mask_token_id=tokenizer.mask_token_id, cls_token_id=tokenizer.cls_token_id,
                             sep_token_id=tokenizer.sep_token_id,
                             corruption=args.corruption(), labels=corpus.label_set, label_column="lang")
    out = tmp_path_factory.mktemp("untrained")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    config.save_pretrained(out)
    return out


# -- data and config --------------------------------------------------------------------------------
def test_labels_are_aligned_and_the_split_matches_the_unlabelled_one():
    labelled, plain = load_corpus("austen", label_column="book"), load_corpus("austen")
    assert labelled.train == plain.train and labelled.validation == plain.validation
    assert len(labelled.train_labels) == len(labelled.train) and len(labelled.label_set) == 6
    # the first paragraph of Emma carries Emma's label
    i = labelled.train.index("EMMA") if "EMMA" in labelled.train else None
    if i is not None:
        assert labelled.train_labels[i] == "Emma"


def test_no_such_label_column_and_a_single_class_are_usage_errors(toy_file):
    with pytest.raises(UsageError, match="--label-column 'nope' is not in"):
        load_corpus(str(toy_file), label_column="nope")
    with pytest.raises(UsageError, match="single class"):
        load_corpus(str(toy_file), label_column="same")


def test_config_keeps_labels_and_old_configs_load(tmp_path):
    config = DiffusionConfig(labels=["a", "b"], label_column="lang")
    config.save_pretrained(tmp_path)
    again = DiffusionConfig.from_pretrained(tmp_path)
    assert again.labels == ["a", "b"] and again.label_column == "lang"
    old = DiffusionConfig().to_dict()
    del old["labels"], old["label_column"]  # a version-2 file written before labels existed
    assert DiffusionConfig.from_dict(old).labels is None
    assert DiffusionConfig.from_dict({"prefix_length": 5, "mask_token_id": 4}).labels is None  # version 1
    with pytest.raises(ConfigError):
        DiffusionConfig(labels=["only"])


# -- the label prefix -------------------------------------------------------------------------------
def test_label_prefix_is_never_masked(toy_file):
    corpus = load_corpus(str(toy_file), label_column="lang")
    tokenizer = train_bpe_tokenizer(corpus.train, 300)
    ids = add_label_tokens(tokenizer, corpus.label_set)
    to_id = dict(zip(corpus.label_set, ids))
    docs = corpus.train[:64]
    labels = [None if i % 5 == 0 else to_id[c] for i, c in enumerate(corpus.train_labels[:64])]  # some unlabelled
    blocks, owner = pack_labelled(docs, labels, tokenizer, 16, tokenizer.mask_token_id)
    assert bool((blocks[:, 0] == tokenizer.cls_token_id).all())
    expected = torch.tensor([tokenizer.mask_token_id if labels[i] is None else labels[i] for i in owner.tolist()])
    assert torch.equal(blocks[:, LABEL_POSITION], expected)
    assert owner.unique().numel() == len(docs)  # every document opens at least one block
    corruption = TrainArgs(preset="micro", label_column="lang", max_length=16, time_sampling="uniform").corruption()
    assert corruption.prefix_length == 2
    collator = collator_from_config(tokenizer, corruption, seed=3)
    for _ in range(50):  # every level, including all-masked rows
        batch = collator(list(blocks))
        assert torch.equal(batch["input_ids"][:, LABEL_POSITION], blocks[:, LABEL_POSITION])
        assert bool((batch["labels"][:, :2] == -100).all())  # never a target either
        assert not bool(torch.isin(batch["labels"], torch.tensor(ids)).any())


def test_a_label_target_masks_and_predicts_the_label_of_labelled_rows_only(toy_file):
    """--label-target p: each labelled row's label is masked and becomes a target with probability p, on its own
    draw (the text's masks are the ones the collator draws without it); a row whose label is unknown (the mask
    token at the slot) never is; the label's cross-entropy counts --label-target-weight times."""
    from textdiffusion.core.loss import diffusion_loss

    corpus = load_corpus(str(toy_file), label_column="lang")
    tokenizer = train_bpe_tokenizer(corpus.train, 300)
    ids = add_label_tokens(tokenizer, corpus.label_set)
    labels = [None if i % 4 == 0 else dict(zip(corpus.label_set, ids))[c] for i, c in enumerate(corpus.train_labels[:64])]
    blocks, _ = pack_labelled(corpus.train[:64], labels, tokenizer, 16, tokenizer.mask_token_id)
    known = blocks[:, LABEL_POSITION] != tokenizer.mask_token_id
    corruption = TrainArgs(preset="micro", label_column="lang", max_length=16, mask_per="example").corruption()
    plain = collator_from_config(tokenizer, corruption, seed=3)(list(blocks))
    for p, expected in ((1.0, known), (0.0, torch.zeros_like(known))):
        batch = collator_from_config(tokenizer, corruption, seed=3, label_target=p, label_token_ids=ids,
                                     label_target_weight=5.0)(list(blocks))
        targeted = batch["labels"][:, LABEL_POSITION] != -100
        assert torch.equal(targeted, expected)
        assert torch.equal(batch["labels"][targeted, LABEL_POSITION], blocks[targeted, LABEL_POSITION])
        assert bool((batch["input_ids"][targeted, LABEL_POSITION] == tokenizer.mask_token_id).all())
        text = torch.arange(16) != LABEL_POSITION
        assert torch.equal(batch["labels"][:, text], plain["labels"][:, text])  # the text's draw is unchanged
    half = collator_from_config(tokenizer, corruption, seed=3, label_target=0.5, label_token_ids=ids)(list(blocks))
    assert 0 < int((half["labels"][:, LABEL_POSITION] != -100).sum()) < int(known.sum())

    torch.manual_seed(0)
    model = build_preset_model("micro", tokenizer, 16).eval()
    batch = collator_from_config(tokenizer, corruption, seed=3, label_target=1.0, label_token_ids=ids,
                                 label_target_weight=5.0)(list(blocks))
    positions = batch["labels"] != -100
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[positions]
        ce = torch.nn.functional.cross_entropy(logits.float(), batch["labels"][positions], reduction="none")
        w = torch.where(positions.nonzero()[:, 1] == LABEL_POSITION, 5.0, 1.0)
        assert torch.allclose(diffusion_loss(model, batch), (ce * w).sum() / w.sum(), atol=1e-5)
        assert not torch.allclose(diffusion_loss(model, batch), ce.mean(), atol=1e-4)


# -- scoring ----------------------------------------------------------------------------------------
def test_every_label_is_scored_with_the_same_mask_draws(untrained, monkeypatch):
    import textdiffusion.pipelines.classification as classify

    seen = {}
    real = classify.masked_ce_sums

    def spy(model, ids, masked, *args, **kwargs):
        seen["ids"], seen["masked"] = ids, masked
        return real(model, ids, masked, *args, **kwargs)

    monkeypatch.setattr(classify, "masked_ce_sums", spy)
    scorer = load_scorer(str(untrained))
    scorer.classify(["ka lo mi ne", "zorg thrax vulm krynn bazz"], samples=3)
    C = len(scorer.labels)
    ids, masked = seen["ids"].view(-1, C, seen["ids"].shape[1]), seen["masked"].reshape(-1, C, seen["ids"].shape[1])
    assert bool((masked == masked[:, :1]).all())  # one draw per (block, sample), shared by the labels
    assert bool(masked.any(2).all())  # and every row masks something
    differs = (ids != ids[:, :1]).any(0).any(0)  # [l] positions where the labels' rows differ
    assert differs.nonzero().flatten().tolist() == [LABEL_POSITION]
    assert not bool(masked[:, :, :2].any())  # the prefix is never masked for scoring either


def test_same_seed_same_probabilities_and_another_seed_differs(untrained):
    scorer = load_scorer(str(untrained))
    texts = ["ka lo mi ne sa", "zorg thrax", "wu pe ti"]
    a, b = scorer.classify(texts, samples=2, seed=5), scorer.classify(texts, samples=2, seed=5)
    assert torch.equal(a.bounds, b.bounds)
    c = scorer.classify(texts, samples=2, seed=6)
    assert not torch.equal(a.bounds, c.bounds)
    assert torch.allclose(a.probabilities.sum(1), torch.ones(3, dtype=torch.float64))
    assert a.tokens.tolist() == [len(scorer.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def test_shared_draws_give_lower_variance_differences_than_independent_ones(untrained):
    """The point of common draws: the label difference of the bound varies less across seeds."""
    scorer = load_scorer(str(untrained))
    text = ["ka lo mi ne sa ti wu pe ka lo mi ne"]
    shared = torch.stack([scorer.classify(text, samples=1, seed=s).bounds[0] for s in range(12)])  # [12, C]
    independent = torch.stack([torch.stack([scorer.classify(text, samples=1, seed=100 * s + c).bounds[0, c]
                                            for c in range(len(scorer.labels))]) for s in range(12)])
    assert float((shared[:, 0] - shared[:, 1]).var()) < 0.5 * float((independent[:, 0] - independent[:, 1]).var())


def test_metrics():
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    truth = np.array([0, 1, 1, 1])
    m = classification_metrics(p, truth)
    assert m["accuracy"] == 0.75 and m["confusion"] == [[1, 0], [1, 2]]
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["recall"] == pytest.approx([1.0, 2 / 3])
    assert classification_metrics(np.array([[0.9, 0.1, 0.0]]), np.array([0]))["recall"] == [1.0, None, None]  # no texts
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == 0.0
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([1])) == 1.0
    assert macro_f1(np.array([[3, 0], [0, 0]])) == 1.0  # a class never present nor predicted is skipped


# -- bad input on the command line ------------------------------------------------------------------
def test_bad_input_is_one_line_and_exit_2(untrained, toy_file, tmp_path, capsys):
    cases = [
        (["classify", "--checkpoint", str(untrained), "--text", "   "], "--text is empty"),
        (["classify", "--checkpoint", "wiki-small", "--text", "hello"], "was not trained with labels"),
        (["classify", "--checkpoint", str(untrained), "--dataset", str(toy_file), "--label-column", "nope"],
         "--label-column 'nope' is not in"),
        (["generate", "--checkpoint", str(untrained), "--label", "gamma", "--hide-steps"], "never saw"),
        (["train", "--preset", "micro", "--dataset", str(toy_file), "--label-column", "same", "--output-dir",
          str(tmp_path / "run")], "single class"),
        (["train", "--preset", "micro", "--dataset", str(toy_file), "--label-column", "nope", "--output-dir",
          str(tmp_path / "run")], "--label-column 'nope'"),
        (["train", "--preset", "micro", "--dataset", str(toy_file), "--label-target", "0.5", "--output-dir",
          str(tmp_path / "run")], "--label-target needs --label-column"),
        (["train", "--preset", "micro", "--dataset", str(toy_file), "--label-column", "lang", "--label-target", "1.5",
          "--output-dir", str(tmp_path / "run")], "--label-target must be in [0, 1]"),
        (["classify", "--checkpoint", str(untrained), "--text", "ka lo", "--method", "label-slot"],
         "--method label-slot needs a diffusion model trained with --label-target"),
        (["classify", "--checkpoint", str(untrained), "--text", "ka lo", "--method", "vote"],
         "--method must be nelbo or label-slot"),
    ]
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": "ka lo", "lang": c}) + "\n" for c in ("alpha", "gamma") * 10))
    cases.append((["classify", "--checkpoint", str(untrained), "--dataset", str(other)], "'gamma' is a label the model never saw"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_generate_with_a_label_and_guidance(untrained, capsys):
    assert main(["generate", "--checkpoint", str(untrained), "--label", "alpha", "--cfg-scale", "2", "--hide-steps",
                 "--num-samples", "2", "--max-length", "16", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "[sample 1]" in out and label_token("alpha") not in out


# -- end to end (trains) ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_models(toy_file, tmp_path_factory):
    from textdiffusion.pipelines.training import run_training

    root = tmp_path_factory.mktemp("toy-runs")
    runs = {}
    # the label slot learns its read-out more slowly than p(text | label) separates the toy (~80 % at 200 steps)
    for name, objective, label_target, steps in (("diffusion", "diffusion", 0.0, 200), ("ar", "ar", 0.0, 200),
                                                 ("label-slot", "diffusion", 0.5, 600)):
        runs[name] = run_training(TrainArgs(
            objective=objective, preset="micro", dataset=str(toy_file), label_column="lang", max_length=24,
            max_steps=steps, eval_steps=steps, eval_blocks=8, batch_size=16, vocab_size=300, learning_rate=6e-3,
            warmup=0.02, validation_fraction=0.1, precision="fp32", logging_steps=200, label_target=label_target,
            output_dir=str(root / name)))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["diffusion", "ar"])
def test_toy_languages_are_separated_perfectly(toy_models, toy_file, objective):
    corpus = load_corpus(str(toy_file), label_column="lang", validation_fraction=0.1)
    scorer = load_scorer(str(toy_models[objective]))
    assert scorer.labels == ["alpha", "beta"] and scorer.causal == (objective == "ar")
    fresh = toy_rows(40, seed=1)  # texts the model never saw, and the validation split
    texts = corpus.validation + [r["text"] for r in fresh]
    truth = corpus.validation_labels + [r["lang"] for r in fresh]
    result = scorer.classify(texts, samples=16)  # 4 draws misjudge about one text in 60
    assert result.predictions == truth
    assert float(result.probabilities.max(1).values.mean()) > 0.9  # confident, not just right


@pytest.mark.slow
def test_the_label_slot_separates_the_toy_languages_in_one_pass(toy_models, toy_file, capsys):
    """A model trained with --label-target reads the label at its slot: one forward a text, no mask draws."""
    corpus = load_corpus(str(toy_file), label_column="lang", validation_fraction=0.1)
    scorer = load_scorer(str(toy_models["label-slot"]))
    assert scorer.config.label_target == 0.5
    texts = corpus.validation + [r["text"] for r in toy_rows(40, seed=1)]
    truth = corpus.validation_labels + [r["lang"] for r in toy_rows(40, seed=1)]
    result = scorer.label_slot(texts)
    assert result.predictions == truth and float(result.probabilities.max(1).values.mean()) > 0.9
    assert torch.allclose(result.probabilities.sum(1), torch.ones(len(texts), dtype=torch.float64))
    assert main(["classify", "--checkpoint", str(toy_models["label-slot"]), "--dataset", str(toy_file),
                 "--validation-fraction", "0.1", "--method", "label-slot"]) == 0
    assert "accuracy 1.000" in capsys.readouterr().out


@pytest.mark.slow
def test_classify_cli_reports_accuracy(toy_models, toy_file, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    assert main(["classify", "--checkpoint", str(toy_models["diffusion"]), "--dataset", str(toy_file),
                 "--validation-fraction", "0.1", "--samples", "16", "--output", str(out)]) == 0
    assert "accuracy 1.000" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r["prediction"] == r["label"] for r in rows)


def test_unigram_bayes_separates_the_toy_languages(toy_file):
    from textdiffusion.pipelines.classification import unigram_bayes

    corpus = load_corpus(str(toy_file), label_column="lang")
    tokenizer = train_bpe_tokenizer(corpus.train, 300)
    p = unigram_bayes(tokenizer, corpus.train, corpus.train_labels, corpus.label_set, corpus.validation)
    predicted = [corpus.label_set[i] for i in p.argmax(1).tolist()]
    assert predicted == corpus.validation_labels
    assert torch.allclose(p.sum(1), torch.ones(len(p), dtype=torch.float64))


def test_guidance_contrasts_with_the_label_masked_out(untrained, monkeypatch):
    """--cfg-scale runs a second pass whose only change is the label token replaced by the mask."""
    import textdiffusion.pipelines.denoising as generation  # the run makes the model calls
    from textdiffusion.pipelines.generation import DiffusionGenerator

    calls = []
    real = generation.masked_logits

    def spy(model, input_ids, attention_mask, positions):
        calls.append(input_ids.clone())
        return real(model, input_ids, attention_mask, positions)

    monkeypatch.setattr(generation, "masked_logits", spy)
    gen = DiffusionGenerator.from_pretrained(str(untrained), device="cpu")
    alpha = gen.tokenizer.convert_tokens_to_ids(label_token("alpha"))
    out = gen.generate(templates=[f"{label_token('alpha')}<mask:6>"] * 2, cfg_scale=2.0, steps=3, stop_at_eos=False,
                       suppress_tokens=[label_token("alpha"), label_token("beta")])
    first = calls[0]  # [2b, l]: conditional rows, then unconditional ones
    cond, uncond = first.chunk(2)
    assert bool((cond[:, LABEL_POSITION] == alpha).all())
    assert bool((uncond[:, LABEL_POSITION] == gen.mask_id).all())
    assert torch.equal(torch.cat([cond[:, :1], cond[:, 2:]], 1), torch.cat([uncond[:, :1], uncond[:, 2:]], 1))
    assert not bool(torch.isin(out.token_ids[:, 2:], torch.tensor([alpha, gen.mask_id])).any())  # never sampled


# -- the experiment, from pretrained starts ---------------------------------------------------------
@pytest.fixture(scope="module")
def three_class_file(tmp_path_factory):
    """The toy languages plus a catch-all class ('misc': words of both) that the experiment must leave out."""
    rows = toy_rows(200) + [{"text": " ".join(random.Random(i).choice(ALPHA + BETA) for _ in range(8)), "lang": "misc"}
                            for i in range(40)]
    path = tmp_path_factory.mktemp("three") / "three.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def starts(three_class_file, tmp_path_factory):
    """A 'pretrained' micro masked LM and causal LM sharing one tokenizer and trained without labels, saved in
    fp16 as the bundled wiki-small / wiki-small-ar are (untrained: the plumbing is under test, not the numbers)."""
    from textdiffusion.config import CorruptionConfig
    from textdiffusion.models.autoregressive import build_ar_model

    tokenizer = train_bpe_tokenizer(load_corpus(str(three_class_file)).train, 300)
    root = tmp_path_factory.mktemp("starts")
    torch.manual_seed(0)
    builders = {"diffusion": build_preset_model, "ar": build_ar_model}
    for objective, build in builders.items():
        build("micro", tokenizer, 24).half().save_pretrained(root / objective)
        tokenizer.save_pretrained(root / objective)
        DiffusionConfig(objective=objective, max_length=24, mask_token_id=tokenizer.mask_token_id,
                        cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                        corruption=CorruptionConfig(mask_per="example")).save_pretrained(root / objective)
    return {objective: str(root / objective) for objective in builders}


def test_the_pretrained_discriminative_keeps_the_encoder_and_adds_a_head(starts):
    from transformers import AutoModelForMaskedLM

    from textdiffusion.models.discriminative import build_sequence_classifier

    encoder = AutoModelForMaskedLM.from_pretrained(starts["diffusion"], dtype=torch.float32).model.state_dict()
    torch.manual_seed(0)
    pretrained = build_sequence_classifier(None, None, 3, 24, init_from=starts["diffusion"])
    fresh = build_sequence_classifier(None, None, 3, 24, init_from=starts["diffusion"], load_weights=False)
    for model in (pretrained, fresh):  # float32 from an fp16 checkpoint, mean pooling as the preset classifier
        assert {p.dtype for p in model.parameters()} == {torch.float32} and model.config.classifier_pooling == "mean"
        assert model.classifier.out_features == 3
    assert all(torch.equal(v, pretrained.model.state_dict()[k]) for k, v in encoder.items())
    assert not torch.equal(encoder["embeddings.tok_embeddings.weight"], fresh.model.embeddings.tok_embeddings.weight)


@pytest.mark.slow  # an experiment end to end, fine-tuned starts: seconds: in `make test`, not the edit-test loop
def test_experiment_fine_tunes_from_the_starts_and_reports_every_row(starts, three_class_file, tmp_path, monkeypatch):
    """Fractions 1 and 0.5 from the micro starts: each generative model fine-tunes its own start (its
    tokenizer kept, the label tokens appended, the start's corruption), 'misc' is left out everywhere, and
    every row carries recall per class and the cost per text."""
    from transformers import AutoTokenizer

    import textdiffusion.experiments.classify as experiment
    from textdiffusion.experiments.registry import ExperimentArgs, run_experiment

    start_vocab = AutoTokenizer.from_pretrained(starts["diffusion"]).get_vocab()
    seen = []
    real = experiment.run_training

    def spy(args):
        out = real(args)
        tokenizer = AutoTokenizer.from_pretrained(out)
        vocab = tokenizer.get_vocab()
        assert {k: vocab[k] for k in start_vocab} == start_vocab  # the start's tokenizer, its ids unchanged
        assert sorted(set(vocab) - set(start_vocab)) == [label_token("alpha"), label_token("beta")]
        assert json.loads((out / "config.json").read_text())["vocab_size"] >= len(tokenizer)  # new embedding rows
        seen.append(args)
        return out

    monkeypatch.setattr(experiment, "run_training", spy)
    args = ExperimentArgs(datasets=[f"{three_class_file}:lang"], start_from=starts["diffusion"],
                          ar_start_from=starts["ar"], exclude_labels=["misc"], label_fractions=[1.0, 0.5],
                          train_steps=2, batch_size=8, max_length=24, eval_texts=8, nelbo_samples=1, cfg_scales=[],
                          output_dir=str(tmp_path / "out"))
    final = run_experiment("classify", args)
    assert [(a.objective, a.model_name, a.label_fraction, a.label_target) for a in seen] == [
        (o, starts[o], f, t) for f in (1.0, 0.5) for o, t in (("diffusion", 0.0), ("ar", 0.0), ("diffusion", 1.0))]
    assert all(a.preset is None and a.exclude_labels == ["misc"] and a.mask_per == "example" for a in seen)
    assert all(a.unlabelled == "drop" and a.label_dropout == 0.0 for a in seen)  # fine-tunes read the labelled share

    result = json.loads((final / "results.json").read_text())
    rows, name = result["rows"], f"{three_class_file}"
    kinds = [f"diffusion (NELBO), from {starts['diffusion']}", f"AR (exact NLL), from {starts['ar']}",
             f"diffusion (label slot, one pass), from {starts['diffusion']}",
             f"discriminative ({starts['diffusion']} encoder + new head)",
             f"discriminative ({starts['diffusion']} size, from scratch)", "class-conditional unigram (counts)"]
    assert [(r["label_fraction"], r["classifier"]) for r in rows] == [(f, k) for f in (1.0, 0.5) for k in kinds]
    assert all(r["dataset"] == name and list(r["per_class_recall"]) == ["alpha", "beta"] for r in rows)
    assert all(r["classify_cpu_s_per_text"] == pytest.approx(r["classify_cpu_s"] / r["n"]) for r in rows)
    corpus = load_corpus(str(three_class_file), label_column="lang").without_labels(["misc"])
    labelled = int(kept_labels(len(corpus.train), 0.5, args.seed).sum())
    assert {r["labelled_documents"] for r in rows if r["label_fraction"] == 0.5 and "labelled_documents" in r} == {labelled}
    assert result["guidance"] == [] and not (final / "guidance.png").exists()
    report = (final / "results.md").read_text()
    assert "classify CPU ms / text" in report and "## Recall per class" in report and "misc" in report
    assert sorted(p.name for p in final.glob("confusion-three.jsonl-50-*.png")) == [
        f"confusion-three.jsonl-50-{k}.png" for k in ("ar", "diffusion", "discriminative-pretrained",
                                                     "discriminative-scratch", "label-slot", "unigram")]

    # --classifiers diffusion reruns that one classifier alone: the same texts, seeds and fine-tune give the same row
    seen.clear()
    args.classifiers, args.label_fractions, args.output_dir = ["diffusion"], [0.5], str(tmp_path / "rerun")
    (rerun,) = json.loads((run_experiment("classify", args) / "results.json").read_text())["rows"]
    assert [(a.objective, a.label_fraction) for a in seen] == [("diffusion", 0.5)]
    (full,) = [r for r in rows if r["label_fraction"] == 0.5 and r["classifier"] == kinds[0]]
    assert {k: rerun[k] for k in ("classifier", "accuracy", "macro_f1", "ece", "n")} == {
        k: full[k] for k in ("classifier", "accuracy", "macro_f1", "ece", "n")}


def test_bad_experiment_input_is_one_line_and_exit_2(starts, three_class_file, tmp_path, capsys):
    out = str(tmp_path / "out")
    base = ["experiment", "classify", "--datasets", f"{three_class_file}:lang", "--output-dir", out]
    pair = ["--start-from", starts["diffusion"], "--ar-start-from", starts["ar"]]
    cases = [
        (["--label-fractions", "0"], "--label-fractions must each be in (0, 1], got 0.0"),
        (["--label-fractions", "1", "1.5"], "--label-fractions must each be in (0, 1], got 1.5"),
        (["--start-from", "nope", "--ar-start-from", starts["ar"]], "--start-from 'nope' is neither a bundled model"),
        (["--start-from", starts["diffusion"], "--ar-start-from", "nope"], "--ar-start-from 'nope' is neither"),
        (["--start-from", starts["ar"], "--ar-start-from", starts["ar"]], f"--start-from {starts['ar']!r} is a causal LM"),
        (["--start-from", starts["diffusion"], "--ar-start-from", starts["diffusion"]], "is a masked LM"),
        (["--start-from", starts["diffusion"]], "needs --ar-start-from too"),
        (pair + ["--preset", "micro"], "are two starts"),
        (pair + ["--exclude-labels", "gamma"], "--exclude-labels 'gamma' is a class of none of --datasets"),
        (pair + ["--classifiers", "diffusion", "bayes"], "--classifiers 'bayes' is not one of diffusion, ar,"),
        (["--classifiers", "ar", "unigram"], "--classifiers ar unigram without diffusion needs --start-from"),
        (pair + ["--classifiers", "diffusion", "--cfg-scales", "1"], "needs --classifiers diffusion and discriminative"),
        (pair + ["--classifiers", "label-slot", "--label-target", "0"], "--label-target must be in (0, 1]"),
    ]
    for argv, message in cases:
        assert main(base + argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_experiment_from_scratch_keeps_its_rows_and_guidance(three_class_file, tmp_path):
    """Without --start-from every model is the preset (one discriminative row), and the guidance part runs
    from the all-labels model."""
    from textdiffusion.experiments.registry import ExperimentArgs, run_experiment

    args = ExperimentArgs(datasets=[f"{three_class_file}:lang"], exclude_labels=["misc"], label_fractions=[1.0],
                          train_steps=2, batch_size=8, max_length=24, eval_texts=6, nelbo_samples=1, cfg_scales=[2.0],
                          guidance_samples=1, new_tokens=4, steps=2, output_dir=str(tmp_path / "out"))
    result = json.loads((run_experiment("classify", args) / "results.json").read_text())
    assert [r["classifier"] for r in result["rows"]] == ["diffusion (NELBO)", "AR (exact NLL)",
                                                         "diffusion (label slot, one pass)",
                                                         "discriminative (same encoder)", "class-conditional unigram (counts)"]
    assert result["meta"]["args"]["preset"] == "micro"
    (row,) = result["guidance"]
    assert row["cfg_scale"] == 2.0 and row["samples"] == 2 and 0.0 <= row["classified_as_asked"] <= 1.0


def test_unlabelled_drop_trains_on_the_label_budget_only(toy_file, untrained):
    """--unlabelled drop leaves the documents without a label out; masked keeps them with the label slot masked."""
    from transformers import AutoTokenizer

    from textdiffusion.pipelines.training import labelled_blocks

    corpus = load_corpus(str(toy_file), label_column="lang")
    tokenizer = AutoTokenizer.from_pretrained(untrained)
    blocks = {}
    for mode in ("masked", "drop"):
        args = TrainArgs(preset="micro", label_column="lang", max_length=24, label_fraction=0.3, label_dropout=0.0,
                         unlabelled=mode)
        blocks[mode], _ = labelled_blocks(args, corpus, tokenizer, args.corruption())
    kept = int(kept_labels(len(corpus.train), 0.3, args.seed).sum())
    masked_slot = blocks["masked"][:, 1] == tokenizer.mask_token_id
    assert 0 < kept < len(corpus.train) and int(masked_slot.sum()) > 0
    assert torch.equal(blocks["drop"], blocks["masked"][~masked_slot])  # the same labelled blocks, nothing else
    with pytest.raises(UsageError, match="unlabelled"):
        TrainArgs(preset="micro", label_column="lang", unlabelled="keep")
