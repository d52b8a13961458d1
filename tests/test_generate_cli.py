"""`textdiffusion generate` end to end on a small saved checkpoint, and its bad-input errors."""

import json
import re

import pytest

from textdiffusion.cli.main import main
from textdiffusion.config import DiffusionConfig
from textdiffusion.models.presets import build_preset_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """An (untrained) micro model saved the way `train` saves one: enough to exercise the whole path."""
    path = tmp_path_factory.mktemp("ckpt")
    build_preset_model("micro", tokenizer, 32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    DiffusionConfig(max_length=24).save_pretrained(path)
    return path


def test_generate_prints_steps_samples_and_nfe(checkpoint, capsys, tmp_path):
    trace = tmp_path / "trace.jsonl"
    out = tmp_path / "samples.jsonl"
    assert main(["generate", "--checkpoint", str(checkpoint), "--prefix", "The river", "--num-samples", "2",
                 "--steps", "4", "--trace-out", str(trace), "--output", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "step   1" in printed and "_" in printed  # intermediate steps with masks visible
    assert "[sample 0] The river" in printed and "[sample 1] The river" in printed
    assert "4 model calls (NFE)" in printed
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(lines) == 5 and lines[0]["masked"][0] > 0 and lines[-1]["masked"] == [0, 0]
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["seed"] for s in samples] == [0, 1] and all(s["text"].startswith("The river") for s in samples)


def test_hide_steps_and_infill(checkpoint, capsys):
    assert main(["generate", "--checkpoint", str(checkpoint), "--infill", "The <mask:3> was built in <mask:2>.",
                 "--hide-steps", "--steps", "5"]) == 0
    printed = capsys.readouterr().out
    assert "step " not in printed
    sample = printed.split("[sample 0] ")[1].splitlines()[0]
    assert re.fullmatch(r"The.+ was built in.+\.", sample), sample  # the fixed text, in order, around the spans


def test_threshold_reports_fewer_calls(checkpoint, capsys):
    assert main(["generate", "--checkpoint", str(checkpoint), "--prefix", "A", "--hide-steps",
                 "--confidence-threshold", "0.0001", "--steps", "20"]) == 0
    assert "1 model calls (NFE)" in capsys.readouterr().out


def test_animate_runs(checkpoint, capsys):
    assert main(["generate", "--checkpoint", str(checkpoint), "--prefix", "A", "--animate", "--steps", "3"]) == 0
    assert "[sample 0] A" in capsys.readouterr().out


@pytest.mark.parametrize("extra, needle", [
    (["--prefix", "word " * 40], "leaves no room to generate within --max-length 24"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--top-k", "0"], "--top-k must be >= 1, got 0"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--temperature", "-2"], "got -2.0"),
    (["--infill", "no spans here"], "has no masked span"),
    (["--strategy", "best-first"], "--strategy must be one of"),
    (["--device", "cuda:7"], "--device 'cuda:7' is not available here (available: cpu"),
    (["--dtype", "float8"], "--dtype must be auto or one of"),
    (["--strategy", "eb", "--remask-fraction", "0.2"], "`remask_fraction` needs a step schedule"),  # not a traceback
    (["--cfg-scale", "-5"], "--cfg-scale must be a finite number >= 0 (0: off), got -5.0"),
    (["--cfg-scale", "nan", "--prefix", "A"], "--cfg-scale must be a finite number >= 0 (0: off), got nan"),
    (["--cfg-scale", "2"], "--cfg-scale 2 cannot apply: the model has no labels"),  # no prompt: nothing to guide by
    (["--cfg-scale", "2", "--infill", "<mask:4>"], "--cfg-scale 2 cannot apply: the model has no labels"),
    (["--label", "Emma", "--prefix", "A"], "was not trained with labels"),
    (["--label", "Emma", "--cfg-scale", "2"], "was not trained with labels"),
])
def test_bad_generate_input(checkpoint, capsys, extra, needle):
    assert main(["generate", "--checkpoint", str(checkpoint), "--hide-steps", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_negative_cfg_scale_is_refused_before_the_checkpoint_is_read(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "missing"), "--cfg-scale", "-5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "textdiffusion generate: error: --cfg-scale must be a finite number >= 0 (0: off), got -5.0.", err


def test_cfg_scale_guides_by_the_prompt_on_a_model_without_labels(checkpoint, capsys):
    """The unconditional pass masks the prompt out (LLaDA's form): with a prompt, guidance applies unlabelled."""
    assert main(["generate", "--checkpoint", str(checkpoint), "--prefix", "The river", "--cfg-scale", "2",
                 "--hide-steps", "--steps", "2"]) == 0
    assert "[sample 0] The river" in capsys.readouterr().out


def test_cfg_scale_on_the_autoregressive_baseline_is_refused_not_ignored():
    from textdiffusion.cli.generate import GenerateArgs, run_causal_generate
    from textdiffusion.errors import UsageError

    with pytest.raises(UsageError, match=r"--cfg-scale 2 needs a masked \(diffusion\) model"):
        run_causal_generate(GenerateArgs(checkpoint="ar-run", prefix="A", cfg_scale=2.0), "cpu", None)


def test_checkpoint_that_is_not_a_language_model(tmp_path, tokenizer, capsys):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=1, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")  # a tokenizer is there: what is missing is a masked-LM head
    assert main(["generate", "--checkpoint", str(tmp_path / "gpt2"), "--prefix", "x"]) == 2
    assert "not a masked language model" in capsys.readouterr().err



def test_missing_checkpoint_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["generate", "--checkpoint", str(tmp_path / "empty")]) == 2
    assert "holds no config.json" in capsys.readouterr().err


def _copy_checkpoint(src, dst, skip=()):
    import shutil

    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_truncated_weights_are_named_before_any_work(checkpoint, tmp_path, capsys, command):
    bad = _copy_checkpoint(checkpoint, tmp_path / "bad")
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main([command, "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(weights) in err and "truncated" in err, err


def test_max_length_beyond_the_position_limit_says_the_limit(checkpoint, capsys):
    assert main(["generate", "--checkpoint", str(checkpoint), "--hide-steps", "--max-length", "100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--max-length 100000 is longer than the model's position limit (512 tokens" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flag", ["--trace-out", "--output"])
def test_unwritable_output_is_refused_before_generating(checkpoint, tmp_path, capsys, flag):
    for path in (tmp_path / "no" / "such" / "dir" / "x.jsonl", tmp_path):  # a missing folder; a folder, not a file
        assert main(["generate", "--checkpoint", str(checkpoint), "--hide-steps", flag, str(path)]) == 2
        err = capsys.readouterr()
        assert flag in err.err and len(err.err.strip().splitlines()) == 1 and "[sample 0]" not in err.out, err


def test_checkpoint_without_tokenizer_files_says_so(checkpoint, tmp_path, capsys):
    bare = _copy_checkpoint(checkpoint, tmp_path / "bare", skip={"tokenizer.json", "tokenizer_config.json",
                                                                  "special_tokens_map.json"})
    assert main(["generate", "--checkpoint", str(bare), "--hide-steps"]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer files" in err and "not a masked language model" not in err


def test_position_limit_counts_the_padding_offset_of_roberta_and_mpnet():
    from transformers import BertConfig, MPNetConfig, RobertaConfig

    from textdiffusion.core.denoiser import position_limit

    assert position_limit(RobertaConfig(max_position_embeddings=514)) == 512  # positions start after padding_idx
    assert position_limit(MPNetConfig(max_position_embeddings=514)) == 512
    assert position_limit(BertConfig(max_position_embeddings=512)) == 512


@pytest.mark.parametrize("command", ["train", "distill", "generate", "eval", "serve", "classify"])
def test_a_misspelled_flag_is_one_line_with_the_closest_flags(command, capsys):
    from textdiffusion.cli.main import main

    assert main([command, "--bogus-flag", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"textdiffusion {command}: error: unknown argument '--bogus-flag'; see `textdiffusion {command} --help`."
    assert main(["generate", "--prefx", "The"]) == 2
    assert "did you mean --prefix?" in capsys.readouterr().err


def test_a_negative_seed_is_refused_as_the_server_refuses_it(capsys):
    assert main(["generate", "--seed", "-1"]) == 2
    assert "--seed must be >= 0, got -1" in capsys.readouterr().err
    from textdiffusion.errors import UsageError
    from textdiffusion.pipelines.generation import DiffusionGenerator

    with pytest.raises(UsageError, match="seed must be >= 0, got -2"):  # the library: the same rule
        DiffusionGenerator.from_pretrained("wiki-small", device="cpu").generate(["The <mask:4>"], seed=-2)


def test_adapting_a_ready_diffusion_model_says_what_it_is(tmp_path, capsys):
    assert main(["train", "--adapt-from-causal", "--model-name", "wiki-small", "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "ready diffusion models, not a causal LM" in err and "Hub" not in err and "huggingface" not in err
