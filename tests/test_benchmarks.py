"""The benchmark scripts run (their numbers live in benchmarks/results/, never in assertions here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=300):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.fixture
def saved_checkpoint(tmp_path, tokenizer):
    from textdiffusion.models.presets import build_preset_model

    path = tmp_path / "ckpt"
    build_preset_model("micro", tokenizer, 32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_distillation_table_runs(tmp_path):
    """benchmarks/distill.py --quick: teacher, student and AR rows on the same prompts, a table and a plot."""
    run("benchmarks/distill.py", "--quick", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["kind"] for r in rows] == ["teacher", "student", "ar"]
    assert all(r["tps_b1"] > 0 and 0 < r["distinct-2"] <= 1 for r in rows)
    assert (tmp_path / "frontier.png").stat().st_size > 0 and "| AR (wiki-small-ar)" in (tmp_path / "README.md").read_text()


@pytest.mark.slow
def test_degeneration_benchmark_runs(tmp_path, saved_checkpoint):
    run("benchmarks/degeneration.py", "--checkpoint", str(saved_checkpoint), "--num-prompts", "3",
        "--new-tokens", "8", "--steps", "4", "--out", str(tmp_path / "deg"))
    rows = json.loads((tmp_path / "deg" / "results.json").read_text())["rows"]
    assert rows[0]["setting"].startswith("real text") and len(rows) > 5
    assert all(0 <= r["distinct-2"] <= 1 for r in rows)


def check_generation_speed_quick(out):
    """What `benchmarks/generation_speed.py --quick` must write: every sampler, every cache mode with every strategy."""
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["sampler"] for r in rows} == {"original loop (float32)", "textdiffusion (float32)",
                                            "AR baseline, KV cache (float32)"}
    settings = {r["setting"] for r in rows}
    for cache in ("none", "prefix", "dual"):  # every cache mode with every strategy
        assert {f"cache {cache}, confidence, 4 steps", f"cache {cache}, threshold, p >= 0.5",
                f"cache {cache}, eb, gamma 8"} <= settings
    ar = next(r for r in rows if r["sampler"].startswith("AR"))
    assert ar["nfe_b1"] == ar["nfe_b4"] == 22  # one call per new token (32 - 8 prompt - 2 special)
    assert all(r["tps_b1"] > 0 for r in rows) and all(0 < r["distinct_2"] <= 1 for r in rows if r is not ar)
    readme = (out / "README.md").read_text()
    assert "| sampler | setting |" in readme and (out / "frontier.png").stat().st_size > 0


@pytest.mark.slow
def test_gpu_script_runs_on_the_cpu_in_its_short_mode(tmp_path):
    """benchmarks/gpu.sh --device cpu: training (interleaved, HF recipe vs ours) and generation, summarised. Its
    generation part is `benchmarks/generation_speed.py --quick`, checked here too (one run of it for both)."""
    r = subprocess.run(["bash", "benchmarks/gpu.sh", "--device", "cpu", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"train-eager", "generation"}
    train = summary["train-eager"]["rows"]
    assert [(t["recipe"], t["precision"]) for t in train] == [("HF recipe", "fp32"), ("textdiffusion", "fp32")]
    assert all(t["tokens_per_s"] > 0 and t["peak_memory_mb"] > 0 for t in train)
    assert "| recipe |" in (tmp_path / "summary.md").read_text()
    check_generation_speed_quick(tmp_path / "generation")
    bad = subprocess.run(["bash", "benchmarks/gpu.sh", "--device", "tpu"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--device must be cuda or cpu" in bad.stderr


def test_speed_goals_are_judged_at_equal_quality():
    """The goal lines compare the fastest diffusion row that is at least as good as AR, not the fastest row."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generation_speed import goal_lines

    ar = {"sampler": "AR baseline", "setting": "trained", "tps_b1": 100.0, "tps_b16": 1000.0, "gen_ppl": 200.0,
          "distinct_2": 0.9}
    fast_bad = {"sampler": "textdiffusion", "setting": "fast", "tps_b1": 400.0, "tps_b16": 2000.0, "gen_ppl": 500.0,
                "distinct_2": 0.9}
    slow_good = {"sampler": "textdiffusion", "setting": "slow", "tps_b1": 150.0, "tps_b16": 900.0, "gen_ppl": 190.0,
                 "distinct_2": 0.88}
    repetitive = {"sampler": "textdiffusion", "setting": "repetitive", "tps_b1": 300.0, "tps_b16": 3000.0,
                  "gen_ppl": 100.0, "distinct_2": 0.5}
    lines = "\n".join(goal_lines([fast_bad, slow_good, repetitive, ar], [1, 16], ar, None))
    assert "batch 1, >= 2x AR at equal quality: **not met**, 1.50x (slow" in lines
    assert "batch 16, >= 1x AR at equal quality: **not met**, 0.90x (slow" in lines
    lines = "\n".join(goal_lines([fast_bad, ar], [1, 16], ar, None))
    assert "no diffusion row reaches AR's gen PPL 200.0" in lines and "fast, 4.00x at gen PPL 500.0" in lines


@pytest.mark.slow  # a benchmark end to end: in `make test`, not the edit-test loop
def test_pretrained_comparison_sweeps_temperature_and_compares_at_the_same_one():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from pretrained_compare import causal_counterpart, configurations, parse_args

    args = parse_args(["--checkpoints", "wiki-small", "smollm2-wiki", "--sweep-blocks", "8", "16",
                       "--sweep-tokens-per-call", "2", "--sweep-thresholds", "0.7", "--sweep-temperatures", "1.0", "0.8",
                       "--temperature", "0.9"])
    grid = [(c["block_length"], c["tokens_per_step"], c["threshold"], c["temperature"])
            for c in configurations(args, "smollm2-wiki")]
    assert grid == [(8, 2, None, 1.0), (8, 1, 0.7, 1.0), (16, 2, None, 1.0), (16, 1, 0.7, 1.0),
                    (8, 2, None, 0.8), (8, 1, 0.7, 0.8), (16, 2, None, 0.8), (16, 1, 0.7, 0.8)]
    assert [c["temperature"] for c in configurations(args, "wiki-small")] == [0.9]  # not swept: --temperature
    causal = [{"kind": "autoregressive", "temperature": t} for t in (1.0, 0.8)]
    assert causal_counterpart(causal, {"temperature": 0.8}) is causal[1]
    assert causal_counterpart(causal, {"temperature": 0.5}) is causal[0]  # none at that temperature: the first
    r = subprocess.run([sys.executable, "benchmarks/pretrained_compare.py", "--sweep-temperatures", "0"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "temperatures must be > 0, got 0.0" in r.stderr
    r = subprocess.run([sys.executable, "benchmarks/pretrained_compare.py", "--sweep-thresholds", "1.5"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "--sweep-thresholds must be in (0, 1], got 1.5" in r.stderr


@pytest.mark.slow
def test_pretrained_comparison_measures_both_tokenizers_in_words(tmp_path):
    """wiki-small (cased BPE) beside a lowercase WordPiece MPNet: each gets as many masks as it needs for the
    same number of words, and diversity is counted on words, so the rows compare."""
    import torch
    from mpnet_helpers import wordpiece_tokenizer
    from transformers import MPNetConfig, MPNetForMaskedLM

    from textdiffusion.core.data import load_corpus

    tokenizer = wordpiece_tokenizer(load_corpus("wiki-vital").train[:300])
    config = MPNetConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    MPNetForMaskedLM(config).save_pretrained(tmp_path / "wp")
    tokenizer.save_pretrained(tmp_path / "wp")
    run("benchmarks/pretrained_compare.py", "--quick", "--checkpoints", "wiki-small", str(tmp_path / "wp"),
        "--sweep", "wiki-small", "--sweep-thresholds", "0.2", "--ar", "wiki-small-ar", "--out", str(tmp_path / "out"))
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = result["rows"]
    # wiki-small swept (blocks of 8 at 1 and 2 tokens per call, and by threshold), the WordPiece model once, the AR
    # model once
    assert [(r["checkpoint"], r["kind"], r["lowercase"], r["commit"]) for r in rows] == [
        ("wiki-small", "diffusion", False, "1/call"), ("wiki-small", "diffusion", False, "2/call"),
        ("wiki-small", "diffusion", False, "p >= 0.2"), (str(tmp_path / "wp"), "diffusion", True, "4/call"),
        ("wiki-small-ar", "autoregressive", False, "1/call")]
    assert [r["tokens_per_call"] for r in rows[:2] + rows[3:]] == [1.0, 2.0, 4.0, 1.0]  # whole blocks: the asked rate
    assert [r["nfe"] for r in rows[:2]] == [rows[0]["new_tokens"], rows[0]["new_tokens"] // 2]
    assert 1 <= rows[2]["tokens_per_call"] <= rows[2]["new_tokens"]  # a threshold's rate is measured
    headlines = [r for r in rows if r.get("headline")]  # one per swept model, >= 2 tokens per call
    assert len(headlines) == 1 and headlines[0]["checkpoint"] == "wiki-small" and headlines[0]["tokens_per_call"] >= 2
    for r in rows:
        assert 0.2 < r["words_per_token"] < 1.5 and r["new_tokens"] == 32  # 8 words' worth, in whole blocks of 32
        assert 0 < r["distinct_2"] <= 1 and r["words_per_s_b1"] > 0 and r["reference"]["words"] > 0
        assert len(r["samples"]) == 2  # every sample kept, each after its prompt (a lowercase model's is lowercase)
        assert all(s.lower().startswith(p.lower()) for s, p in zip(r["samples"], result["meta"]["prompts"]))
    # the doubled-word recount of saved samples gives what the run reported
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from doubled_words import recount

    assert [c["doubled"] for c in recount(result)] == pytest.approx([r["doubled"] for r in rows])
    report = (tmp_path / "out" / "README.md").read_text()
    assert "| **wiki-small** | diffusion | 3.7M | no |" in report and "| wiki-small-ar | autoregressive |" in report
