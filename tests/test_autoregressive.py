"""The GPT-2 baseline: same tokens, same Trainer path, exact NLL on the tokens the NELBO scores."""

import csv
import json

import pytest
import torch

from textdiffusion.cli.main import main
from textdiffusion.pipelines.trainers import CURVE_CSV

FAST = ["--preset", "micro", "--max-length", "64", "--batch-size", "8", "--eval-blocks", "16", "--logging-steps", "10"]


def curve(out):
    with (out / CURVE_CSV).open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ar")
    docs = tmp / "docs.jsonl"
    from textdiffusion.core.data import load_corpus

    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in load_corpus("wiki-vital").train[:300]))
    argv = ["train", "--objective", "ar", "--dataset", str(docs), "--output-dir", str(tmp / "ar"), *FAST,
            "--max-steps", "40", "--eval-steps", "20", "--learning-rate", "3e-3"]
    assert main(argv) == 0
    return tmp / "ar", docs


@pytest.mark.slow
def test_ar_baseline_learns_and_keeps_its_best_checkpoint(ar_run):
    out, _ = ar_run
    rows = curve(out)
    assert [int(r["step"]) for r in rows] == [0, 20, 40]
    assert {r["kind"] for r in rows} == {"exact"}
    assert float(rows[-1]["nll"]) < float(rows[0]["nll"]) - 0.3
    assert int(rows[1]["tokens_seen"]) == 20 * 8 * 64
    settings = json.loads((out / "diffusion_config.json").read_text())
    assert settings["objective"] == "ar"


@pytest.mark.slow
def test_eval_reports_exact_nll_on_the_same_tokens_as_a_direct_computation(ar_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from textdiffusion.core.data import load_corpus, pack

    out, docs = ar_run
    assert main(["eval", "--checkpoint", str(out), "--dataset", str(docs), "--eval-blocks", "16",
                 "--output-dir", str(tmp_path / "e")]) == 0
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert result["objective"] == "ar"
    tokenizer, model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out).eval()
    blocks = pack(load_corpus(str(docs)).validation, tokenizer, 64, keep_remainder=True)[:16]
    total, count = 0.0, 0
    special = set(tokenizer.all_special_ids)
    with torch.no_grad():
        for row in blocks:  # token by token, independently of causal_nll's batched masking
            logp = torch.log_softmax(model(input_ids=row[None]).logits[0].double(), -1)
            for i in range(5, len(row)):
                if int(row[i]) not in special:
                    total -= float(logp[i - 1, row[i]])
                    count += 1
    assert result["nll"]["tokens"] == count
    assert result["nll"]["nats_per_token"] == pytest.approx(total / count, rel=1e-4)
    # the training-time curve evaluated the same tokens: the final (best) model's row matches
    best = min(float(r["nll"]) for r in curve(out))
    assert result["nll"]["nats_per_token"] == pytest.approx(best, abs=2e-4)


def test_matched_size(tokenizer):
    from textdiffusion.core.denoiser import count_parameters
    from textdiffusion.models.autoregressive import build_ar_model
    from textdiffusion.models.presets import build_preset_model

    ar, mdm = build_ar_model("tiny", tokenizer, 128), build_preset_model("tiny", tokenizer, 128)
    assert abs(count_parameters(ar) - count_parameters(mdm)) / count_parameters(mdm) < 0.15


@pytest.mark.slow
def test_generate_from_the_ar_baseline(ar_run, tmp_path, capsys):
    out, _ = ar_run
    samples = tmp_path / "s.jsonl"
    assert main(["generate", "--checkpoint", str(out), "--prefix", "The river", "--num-samples", "3",
                 "--max-length", "24", "--output", str(samples)]) == 0
    texts = [json.loads(line)["text"] for line in samples.read_text().splitlines()]
    assert len(texts) == 3 and all(t.startswith("The river") and len(t) > len("The river") for t in texts)
    assert "KV cache" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(out), "--infill", "a <mask:3> b"]) == 2
    assert "--infill" in capsys.readouterr().err


def test_unknown_objective_is_refused(tmp_path, capsys):
    assert main(["train", "--objective", "gpt", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--objective" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
