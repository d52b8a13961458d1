"""End to end through the command line, on a 2-layer preset and 300 real documents (seconds each)."""

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from textdiffusion.cli.main import main
from textdiffusion.core.collator import collator_for_tokenizer
from textdiffusion.core.evaluation import per_level_loss
from textdiffusion.pipelines.trainers import LEVEL_CSV

FAST = ["--preset", "micro", "--max-length", "64", "--batch-size", "8", "--eval-blocks", "16", "--logging-steps", "10"]


def train(tmp_path, dataset, *extra, out="run"):
    argv = ["train", "--dataset", str(dataset), "--output-dir", str(tmp_path / out), *FAST, *extra]
    return main(argv)


def levels(out: Path) -> dict[int, dict[float, float]]:
    table: dict[int, dict[float, float]] = {}
    with (out / LEVEL_CSV).open() as f:
        for row in csv.DictReader(f):
            table.setdefault(int(row["step"]), {})[float(row["mask_rate"])] = float(row["loss"])
    return table


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 60-step run shared by the tests that only read its outputs."""
    tmp = tmp_path_factory.mktemp("trained")
    docs = tmp / "docs.jsonl"
    from textdiffusion.core.data import load_corpus

    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in load_corpus("wiki-vital").train[:300]))
    assert train(tmp, docs, "--max-steps", "60", "--eval-steps", "30", "--learning-rate", "3e-3") == 0
    return tmp / "run", docs


@pytest.mark.slow
def test_every_mask_level_improves(trained):
    out, _ = trained
    table = levels(out)
    assert sorted(table) == [0, 30, 60]
    for rate, before in table[0].items():
        assert table[60][rate] < before - 0.5, (rate, before, table[60][rate])


@pytest.mark.slow
def test_checkpoint_round_trip_reproduces_the_final_evaluation(trained):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from textdiffusion.core.data import load_corpus, pack

    out, docs = trained
    for name in ["model.safetensors", "config.json", "tokenizer.json", "diffusion_config.json", "run_args.json",
                 "per_level_loss.png", "checkpoint-60/model.safetensors", "checkpoint-60/diffusion_config.json"]:
        assert (out / name).exists(), name
    from textdiffusion.config import DiffusionConfig

    config = DiffusionConfig.from_pretrained(out)
    assert config.prefix_length == 5 and config.corruption.time_sampling == "grid" and config.corruption.learn_eos
    assert config.corruption.mask_probs == pytest.approx([0.1 * i for i in range(1, 11)])
    assert DiffusionConfig.from_pretrained(out / "checkpoint-60") == config
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForMaskedLM.from_pretrained(out)
    assert config.mask_token_id == tokenizer.mask_token_id
    val = pack(load_corpus(str(docs)).validation, tokenizer, 64, keep_remainder=True)[:16]
    results = per_level_loss(model, val, collator_for_tokenizer(tokenizer, prefix_length=5), batch_size=32)
    final = levels(out)[60]
    for r in results:
        assert abs(r.loss - final[round(r.mask_rate, 2)]) < 1e-3


@pytest.mark.slow
def test_output_dir_holding_a_run_is_refused_and_left_untouched(trained, tmp_path, capsys):
    out, docs = trained
    before = digest(out / "model.safetensors")
    assert main(["train", "--dataset", str(docs), "--output-dir", str(out), *FAST, "--max-steps", "5"]) == 2
    err = capsys.readouterr().err
    assert "--output-dir" in err and str(out) in err and "--overwrite" in err
    assert digest(out / "model.safetensors") == before


def test_resume_continues_from_the_last_checkpoint(tmp_path, small_jsonl):
    assert train(tmp_path, small_jsonl, "--max-steps", "10", "--eval-steps", "10") == 0
    assert train(tmp_path, small_jsonl, "--max-steps", "20", "--eval-steps", "10", "--resume") == 0
    state = json.loads((tmp_path / "run" / "checkpoint-20" / "trainer_state.json").read_text())
    assert state["global_step"] == 20
    assert sorted(levels(tmp_path / "run")) == [0, 10, 20]  # no second step-0 evaluation on resume


def test_resume_refuses_a_different_run(tmp_path, small_jsonl, capsys):
    assert train(tmp_path, small_jsonl, "--max-steps", "5", "--eval-steps", "5") == 0
    assert train(tmp_path, small_jsonl, "--max-steps", "10", "--resume", "--seed", "7") == 2
    assert "holds a different run" in capsys.readouterr().err


def test_overwrite_replaces_the_run_only_after_success(tmp_path, small_jsonl):
    assert train(tmp_path, small_jsonl, "--max-steps", "5", "--eval-steps", "5") == 0
    first = digest(tmp_path / "run" / "model.safetensors")
    assert train(tmp_path, small_jsonl, "--max-steps", "5", "--eval-steps", "5", "--overwrite", "--seed", "3") == 0
    assert digest(tmp_path / "run" / "model.safetensors") != first
    assert not (tmp_path / "run.partial").exists() and not (tmp_path / "run.old").exists()
    assert json.loads((tmp_path / "run" / "run_args.json").read_text())["seed"] == 3


def test_standard_trainer_flags_reach_the_trainer(tmp_path, small_jsonl):
    """--gradient_accumulation_steps doubles the tokens of a step (validation_curve.csv counts them);
    --lr_scheduler_type and --warmup set the schedule the Trainer runs."""
    assert train(tmp_path, small_jsonl, "--max-steps", "4", "--eval-steps", "2", "--logging-steps", "1",
                 "--gradient_accumulation_steps", "2", "--lr_scheduler_type", "constant", "--warmup", "0",
                 "--learning-rate", "1e-3", "--hub_token", "secret") == 0
    run = tmp_path / "run"
    with (run / "validation_curve.csv").open() as f:
        assert [(int(r["step"]), int(r["tokens_seen"])) for r in csv.DictReader(f)] == [
            (0, 0), (2, 2 * 8 * 2 * 64), (4, 4 * 8 * 2 * 64)]  # steps x batch x accumulation x block
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    assert {round(log["learning_rate"], 9) for log in state["log_history"] if "learning_rate" in log} == {1e-3}
    recorded = json.loads((run / "run_args.json").read_text())
    assert (recorded["gradient_accumulation_steps"], recorded["lr_scheduler_type"]) == (2, "constant")
    assert recorded["hub_token"] == "<HUB_TOKEN>"  # the run's record keeps no credentials


@pytest.mark.slow
def test_report_to_tensorboard_writes_event_files(tmp_path, small_jsonl):
    pytest.importorskip("tensorboard")
    assert train(tmp_path, small_jsonl, "--max-steps", "2", "--eval-steps", "2", "--report_to", "tensorboard") == 0
    assert list((tmp_path / "run").glob("runs/*/events.out.tfevents.*"))


@pytest.mark.parametrize("extra, needle", [
    (["--dataset", "no-such-corpus-xyz"], "--dataset 'no-such-corpus-xyz'"),
    (["--dataset", "/nonexistent/file.jsonl"], "no such file"),
    (["--mask-probs", "0", "0.5"], "--mask-probs"),
    (["--mask-probs", "1.5"], "1.5"),
    (["--prefix-length", "64"], "--prefix-length must be smaller than max_length (64), got 64"),
    (["--epochs", "-1"], "--num-train-epochs (--epochs) must be > 0, got -1"),
    (["--batch-size", "0"], "--per-device-train-batch-size (--batch-size) must be a positive integer, got 0"),
    (["--preset", "huge"], "--preset must be one of"),
    (["--time-sampling", "sideways"], "sideways"),
])
def test_bad_train_flags_exit_2_and_write_nothing(tmp_path, small_jsonl, capsys, extra, needle):
    argv = ["train", "--dataset", str(small_jsonl), "--output-dir", str(tmp_path / "out"), *FAST, *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value", [("--max-steps", "1.5"), ("--batch-size", "x"), ("--epochs", "two")])
def test_non_integer_counts_are_rejected_by_the_parser(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["train", "--output-dir", str(tmp_path / "out"), flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and f"'{value}'" in err


def test_unreachable_hub_model_suggests_preset(tmp_path, small_jsonl, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["train", "--dataset", str(small_jsonl), "--model-name", "someone/not-a-model",
                 "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--model-name 'someone/not-a-model'" in err and "--preset" in err
    assert not (tmp_path / "out").exists()


def test_local_model_without_mask_token_is_refused(tmp_path, small_jsonl, tokenizer, capsys):
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    model_dir = tmp_path / "nomask"
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                               intermediate_size=16)).save_pretrained(model_dir)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, pad_token="<pad>").save_pretrained(model_dir)
    assert main(["train", "--dataset", str(small_jsonl), "--model-name", str(model_dir),
                 "--output-dir", str(tmp_path / "out")]) == 2
    assert "has no mask token" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_console_script_exit_status(tmp_path):
    """The installed entry point, not just main(): a real process, a real exit code."""
    r = subprocess.run([sys.executable, "-m", "textdiffusion", "train", "--dataset", "nope-xyz",
                        "--output-dir", str(tmp_path / "o")], capture_output=True, text=True,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "--dataset 'nope-xyz'" in r.stderr


@pytest.mark.parametrize("every_s, drawn", [(30.0, 1), pytest.param(0.0, 3, marks=pytest.mark.slow)])
def test_the_level_plot_is_redrawn_at_most_every_few_seconds_and_at_the_end(tmp_path, small_jsonl, monkeypatch,
                                                                              every_s, drawn):
    """Evaluations at steps 0, 2 and 4 all add rows to the CSV; the PNG is redrawn from it at most every
    PLOT_EVERY_S while training and always when the run ends, so a seconds-long run draws it once."""
    from textdiffusion.pipelines import trainers

    calls = []
    real = trainers.plot_level_curves
    monkeypatch.setattr(trainers, "PLOT_EVERY_S", every_s)
    monkeypatch.setattr(trainers, "plot_level_curves", lambda *a, **k: (calls.append(a[0]), real(*a, **k)))
    assert train(tmp_path, small_jsonl, "--max-steps", "4", "--eval-steps", "2") == 0
    assert len(calls) == drawn and (tmp_path / "run" / "per_level_loss.png").stat().st_size > 0
    assert sorted(levels(tmp_path / "run")) == [0, 2, 4]  # every evaluation's rows are in the CSV either way
