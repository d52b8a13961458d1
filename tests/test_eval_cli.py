"""`textdiffusion eval` on a small trained checkpoint: the report, the files, and bad input."""

import json

import pytest

from textdiffusion.cli.main import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from textdiffusion.core.data import load_corpus

    tmp = tmp_path_factory.mktemp("evalrun")
    docs = tmp / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in load_corpus("wiki-vital").train[:200]))
    assert main(["train", "--preset", "micro", "--dataset", str(docs), "--output-dir", str(tmp / "run"),
                 "--max-length", "32", "--batch-size", "8", "--max-steps", "20", "--eval-steps", "20",
                 "--eval-blocks", "8"]) == 0
    return tmp / "run", docs


def test_eval_reports_levels_and_both_bounds(trained, tmp_path, capsys):
    run, docs = trained
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(run), "--dataset", str(docs), "--eval-blocks", "8",
                 "--estimator", "both", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "validation loss at each mask level" in printed and "perplexity <=" in printed
    result = json.loads((out / "eval.json").read_text())
    assert [round(r["mask_rate"], 1) for r in result["per_level"]] == [round(0.1 * i, 1) for i in range(1, 11)]
    k, t = (b["nats_per_token"] for b in result["nelbo"])
    assert abs(k - t) / k < 0.15  # two independent estimators of one bound (few samples here)
    assert result["max_length"] == 32  # the checkpoint's training length, from diffusion_config.json
    # the same fixed-seed masks as training's last evaluation: the numbers match per_level_loss.csv
    last = [line.split(",") for line in (run / "per_level_loss.csv").read_text().splitlines()[1:] if line.startswith("20,")]
    assert [float(r[2]) for r in last] == pytest.approx([r["loss"] for r in result["per_level"]], abs=1e-4)


def test_eval_refuses_to_overwrite_and_checks_flags(trained, tmp_path, capsys):
    run, docs = trained
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "eval.json").write_text("{}")
    assert main(["eval", "--checkpoint", str(run), "--output-dir", str(tmp_path / "e")]) == 2
    assert "already holds an evaluation" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run), "--estimator", "guess"]) == 2
    assert "--estimator must be" in capsys.readouterr().err


def test_eval_refuses_bad_paths_and_lengths_before_work(trained, tmp_path, capsys):
    run, docs = trained
    (tmp_path / "a-file").write_text("x")
    assert main(["eval", "--checkpoint", str(run), "--dataset", str(docs), "--output-dir", str(tmp_path / "a-file")]) == 2
    assert "--output-dir" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run), "--dataset", str(docs), "--max-length", "100000"]) == 2
    assert "position limit (512 tokens" in capsys.readouterr().err
