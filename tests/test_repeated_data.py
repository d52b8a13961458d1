"""`experiment repeated-data`: every side trains on the same few tokens, curves and verdicts come from the runs,
a run resumes where it stopped, and bad input is one line (micro models, seconds)."""

import json
from types import SimpleNamespace

import pytest

from textdiffusion.cli.main import main
from textdiffusion.experiments import repeated_data
from textdiffusion.experiments.registry import ExperimentArgs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """300 wiki-vital documents as a local corpus (its own tokenizer trains in a second)."""
    from textdiffusion.core.data import load_corpus

    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in load_corpus("wiki-vital").train[:300]))
    return path


def quick(corpus, out, *extra):
    return main(["experiment", "repeated-data", "--quick", "--dataset", str(corpus), "--output-dir", str(out), *extra])


def test_quick_run_trains_every_side_and_reports_from_their_curves(corpus, tmp_path):
    out = tmp_path / "rd"
    assert quick(corpus, out, "--block-side-sizes", "4") == 0
    result = json.loads((out / "results.json").read_text())
    runs = {r["run"]["side"]: r for r in result["runs"]}
    assert set(runs) == {"diffusion", "block", "ar"}
    assert runs["block"]["name"].startswith("U8192-block4-")
    for r in runs.values():
        epochs = [p["epoch"] for p in r["curve"]]
        assert epochs == sorted(epochs) and epochs[-1] == r["stopped_at_epoch"] >= 2
        assert r["best"]["validation"] == min(p["validation"] for p in r["curve"])
        assert r["curve"][-1]["flops"] == 6 * r["parameters"] * r["curve"][-1]["tokens"]
    best = result["best"]
    verdicts = result["verdicts"]["8192"]
    assert set(verdicts) == {"diffusion", "block"}
    for side, verdict in verdicts.items():
        # the verdict is the paired test difference of the two best models, not their validation numbers
        gap = best[f"8192:{side}"]["test"] - best["8192:ar"]["test"]
        assert verdict["minus_ar"] == pytest.approx(gap, abs=1e-9)
        assert verdict["wins"] == (verdict["minus_ar"] + 2 * verdict["stderr"] < 0)
        assert best[f"8192:{side}"]["test"] != best["8192:ar"]["test"]
    # the block model's checkpoint is a block model: eval and generate read its block size from it
    from textdiffusion.config import DiffusionConfig

    assert DiffusionConfig.from_pretrained(out / runs["block"]["name"] / runs["block"]["best_dir"]).block_size == 4
    text = (out / "results.md").read_text()
    assert "Goal (diffusion's" in text and "Goal (the block side's" in text
    assert ("met at U = 8,192" in text) == any(v["wins"] for v in verdicts.values())
    assert (out / "repeated_data.png").stat().st_size > 10_000
    assert [q["side"] for q in result["quality"][1:]] == ["ar", "block", "diffusion"]  # generated from each best model


def _args(corpus, **changes):
    return ExperimentArgs(quick=True, dataset=str(corpus), preset="micro", **changes)


def test_an_interrupted_run_resumes_to_the_same_curve(corpus, tmp_path, monkeypatch):
    args = _args(corpus, epochs=4)
    data = repeated_data.prepare_data(args, tmp_path)
    run = repeated_data.Run("diffusion", 8192, 3e-3, 4)
    straight = repeated_data.train_run(run, data, args, tmp_path / "straight")

    real = repeated_data._atomic_save
    saves = []

    def stop_after_two_evaluations(obj, path):
        real(obj, path)
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(repeated_data, "_atomic_save", stop_after_two_evaluations)
    with pytest.raises(KeyboardInterrupt):
        repeated_data.train_run(run, data, args, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "state.pt").exists() and not (tmp_path / "resumed" / "done.json").exists()
    resumed = repeated_data.train_run(run, data, args, tmp_path / "resumed")
    assert [p["validation"] for p in resumed["curve"]] == pytest.approx([p["validation"] for p in straight["curve"]],
                                                                        abs=1e-5)
    assert (tmp_path / "resumed" / resumed["best_dir"] / "model.safetensors").exists()
    assert not (tmp_path / "resumed" / "state.pt").exists()  # a finished run keeps its curve and best model only
    assert repeated_data.train_run(run, data, args, tmp_path / "resumed") == resumed  # finished: not trained again
    import shutil

    shutil.rmtree(tmp_path / "resumed" / resumed["best_dir"])  # a copy without its models (benchmarks/results)
    again = repeated_data.train_run(run, data, args, tmp_path / "resumed")
    assert (tmp_path / "resumed" / again["best_dir"]).is_dir() and again["curve"] == resumed["curve"]


def test_a_failed_experiment_keeps_finished_runs_and_the_same_command_resumes(corpus, tmp_path, monkeypatch):
    out = tmp_path / "rd"
    real = repeated_data.train_run
    trained = []

    def fail_on_the_second_run(run, data, args, run_dir):
        if (run_dir / "done.json").exists():
            return real(run, data, args, run_dir)
        trained.append(run.name)
        if len(trained) == 2:
            raise RuntimeError("the machine went away")
        return real(run, data, args, run_dir)

    monkeypatch.setattr(repeated_data, "train_run", fail_on_the_second_run)
    with pytest.raises(RuntimeError):
        quick(corpus, out)
    staging = tmp_path / "rd.partial"
    assert not out.exists() and len(list(staging.glob("*/done.json"))) == 1
    assert quick(corpus, out) == 0
    assert len(trained) == 3  # the finished run was not trained again
    assert not staging.exists() and (out / "results.md").exists()


@pytest.mark.parametrize("extra, needle", [
    (["--budgets", "100000000"], "--budgets 100000000: larger than the corpus"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--ar-epochs", "0"], "--ar-epochs must be >= 1, got 0"),
    (["--ar-dropout", "1.5"], "--ar-dropout must be in [0, 1), got 1.5"),
    (["--preset", "huge"], "--preset must be one of"),
    (["--block-side-sizes", "5"], "--block-side-sizes 5 does not divide --max-length 128"),
])
def test_bad_input_is_one_line_and_leaves_nothing(corpus, tmp_path, capsys, extra, needle):
    out = tmp_path / "rd"
    args = ["experiment", "repeated-data", "--dataset", str(corpus), "--output-dir", str(out),
            "--preset", "micro", "--budgets", "8192", "--epochs", "2", "--ar-epochs", "2", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "rd.partial").exists()


def test_eval_schedule_and_learning_rate_shape():
    assert repeated_data.eval_epochs(100, 10) == [1, 2, 3, 4, 6, 8] + list(range(10, 101, 10))
    assert repeated_data.eval_epochs(2, 40) == [1, 2]
    factors = [repeated_data.lr_factor(s, 100, 10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:])) and factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_a_resumed_folder_must_hold_the_same_experiment(tmp_path):
    args = SimpleNamespace(**{k: 1 for k in repeated_data.IDENTITY})
    repeated_data._check_same_experiment(args, tmp_path)
    args.vocab_size = 2
    with pytest.raises(Exception, match="--vocab-size 2 differs from the unfinished experiment"):
        repeated_data._check_same_experiment(args, tmp_path)
