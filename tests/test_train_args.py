"""`train`'s settings are transformers' TrainingArguments plus the project's: every standard flag passes
through, the older names still parse to the same values (flags, recipes, Python), a setting given both
ways is one error line, and the defaults are this project's, not Transformers'."""

from pathlib import Path

import pytest
import yaml
from transformers import TrainingArguments

from textdiffusion.cli.main import _parse, main
from textdiffusion.pipelines.trainers import batches_before
from textdiffusion.pipelines.training_args import ALIASES, TrainArgs

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def parse(*argv: str) -> TrainArgs:
    return _parse(TrainArgs, list(argv), "textdiffusion train")


def one_error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_the_settings_are_training_arguments():
    args = parse("--gradient_accumulation_steps", "2", "--lr_scheduler_type", "linear", "--report_to", "tensorboard",
                 "--push_to_hub", "--hub_model_id", "me/my-model", "--optim", "adafactor", "--max_grad_norm", "0.5")
    assert isinstance(args, TrainingArguments)
    assert args.gradient_accumulation_steps == 2 and args.lr_scheduler_type == "linear"
    assert args.report_to == ["tensorboard"] and args.push_to_hub and args.hub_model_id == "me/my-model"
    assert args.optim == "adafactor" and args.max_grad_norm == 0.5
    assert parse("--gradient-accumulation-steps", "3").gradient_accumulation_steps == 3  # dashes, as our flags


def test_todays_behaviour_is_the_default():
    """Where Transformers' defaults differ, the project's hold (evaluation schedule, no trackers, ...)."""
    args = parse()
    assert args.report_to == []  # nothing sent anywhere unless --report_to says so
    assert (args.eval_strategy, args.eval_steps, args.save_strategy, args.save_steps) == ("steps", 500, "steps", 500)
    assert (args.logging_steps, args.logging_first_step, args.save_total_limit) == (50, True, 2)
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size, args.num_train_epochs) == (16, 32, 3)
    assert (args.lr_scheduler_type, args.warmup_steps, args.weight_decay, args.max_grad_norm) == ("cosine", 0.05, 0.01, 1.0)
    assert (args.load_best_model_at_end, args.metric_for_best_model, args.greater_is_better) == (True, "nll", False)
    assert not args.remove_unused_columns and args.dataloader_drop_last and args.ddp_find_unused_parameters is False
    assert (args.output_dir, args.data_seed, args.learning_rate) == ("runs/textdiffusion", 42, 5e-5)
    assert parse("--preset", "micro").learning_rate == 2e-3
    assert parse("--eval-steps", "40").save_steps == 40  # a checkpoint at every evaluation
    assert parse("--batch-size", "64").per_device_eval_batch_size == 64


@pytest.mark.parametrize("old, new, value", [
    ("--batch-size", "--per_device_train_batch_size", "8"),
    ("--batch_size", "--per-device-train-batch-size", "8"),
    ("--epochs", "--num_train_epochs", "2"),
    ("--warmup", "--warmup_steps", "0.1"),
    ("--warmup", "--warmup_steps", "100"),
    ("--num-workers", "--dataloader_num_workers", "2"),
    ("--compile", "--torch_compile", "true"),
    ("--resume", "--resume_from_checkpoint", "last"),
    ("--learning-rate", "--learning_rate", "3e-4"),
    ("--max-steps", "--max_steps", "7"),
    ("--eval-steps", "--eval_steps", "30"),
    ("--logging-steps", "--logging_steps", "5"),
    ("--save-total-limit", "--save_total_limit", "4"),
    ("--output-dir", "--output_dir", "runs/x"),
    ("--weight-decay", "--weight_decay", "0.1"),
])
def test_old_flags_parse_to_the_same_settings(old, new, value):
    assert parse(old, value).to_dict() == parse(new, value).to_dict()


def test_old_names_in_python_and_flags_without_a_value():
    assert TrainArgs(batch_size=8, epochs=2, warmup=0.1, num_workers=1).to_dict() == TrainArgs(
        per_device_train_batch_size=8, num_train_epochs=2, warmup_steps=0.1, dataloader_num_workers=1).to_dict()
    assert parse("--resume").resume_from_checkpoint == "last" == TrainArgs(resume=True).resume_from_checkpoint
    assert TrainArgs(resume=False).resume_from_checkpoint is None and parse("--resume", "false").resume_from_checkpoint is None
    assert parse("--compile").torch_compile
    assert set(ALIASES.values()) <= {f for f in TrainingArguments.__dataclass_fields__}


def test_precision_sets_the_standard_flags():
    assert parse("--precision", "bf16").bf16 and not parse("--precision", "fp32").bf16
    assert parse("--bf16").precision == "bf16"  # the standard flag alone works, and is what the run records
    assert parse("--precision", "auto", "--bf16").bf16


def test_conflicting_precisions_are_one_line(tmp_path, capsys):
    err = one_error_line(capsys, ["train", "--precision", "fp32", "--bf16", "--output-dir", str(tmp_path / "x")])
    assert "--precision 'fp32' conflicts with --bf16" in err


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_every_recipe_parses_with_its_keys_on_the_standard_fields(name):
    recipe = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    if "teacher" in recipe:  # a distillation recipe: `textdiffusion distill --config`
        from textdiffusion.pipelines.distill_run import DistillArgs

        args = _parse(DistillArgs, ["--config", str(RECIPES / f"{name}.yaml")], "textdiffusion distill")
    else:
        args = parse("--config", str(RECIPES / f"{name}.yaml"))
    for key, value in recipe.items():
        field = ALIASES.get(key, key)
        if key == "precision":
            continue  # 'auto' is resolved to what runs here
        assert getattr(args, field) == value, key
    assert args.report_to == [] and args.eval_strategy == "steps" and args.save_steps == recipe["eval_steps"]


def test_a_recipe_setting_a_key_both_ways_is_one_error_line(tmp_path, capsys):
    recipe = tmp_path / "both.yaml"
    recipe.write_text("batch_size: 8\nper_device_train_batch_size: 16\n")
    err = one_error_line(capsys, ["train", "--config", str(recipe), "--output-dir", str(tmp_path / "x")])
    assert "batch_size and per_device_train_batch_size are the same setting" in err and str(recipe) in err
    assert not (tmp_path / "x").exists()


def test_a_flag_given_both_ways_is_one_error_line(tmp_path, capsys):
    err = one_error_line(capsys, ["train", "--epochs", "2", "--num_train_epochs", "3", "--output-dir", str(tmp_path)])
    assert "--epochs and --num-train-epochs are the same setting" in err


def test_a_transformers_check_is_one_error_line(tmp_path, capsys):
    """TrainingArguments' own checks (here: the best model needs matching save and eval schedules)."""
    err = one_error_line(capsys, ["train", "--eval_strategy", "no", "--output-dir", str(tmp_path / "x")])
    assert "--load_best_model_at_end requires the save and eval strategy to match" in err


def test_resume_from_a_named_checkpoint_of_the_run_only(tmp_path, capsys, small_jsonl):
    run = tmp_path / "run"
    assert main(["train", "--dataset", str(small_jsonl), "--output-dir", str(run), "--preset", "micro",
                 "--max-length", "64", "--batch-size", "8", "--eval-blocks", "8", "--max-steps", "2",
                 "--eval-steps", "2"]) == 0
    capsys.readouterr()
    base = ["train", "--dataset", str(small_jsonl), "--output-dir", str(run), "--preset", "micro", "--max-length", "64",
            "--batch-size", "8", "--max-steps", "4"]
    err = one_error_line(capsys, base + ["--resume_from_checkpoint", str(tmp_path)])
    assert "is not a checkpoint-N folder of --output-dir" in err
    assert main(base + ["--resume_from_checkpoint", "checkpoint-2"]) == 0  # a bare name: this run's
    assert f"resuming from {run / 'checkpoint-2'}" in capsys.readouterr().out and (run / "checkpoint-4").is_dir()


def test_batches_before_a_step_counts_accumulation_and_epoch_ends():
    assert [batches_before(s, 10, 1) for s in (0, 3, 10, 13)] == [0, 3, 10, 13]  # one batch a step
    # 5 batches an epoch, 2 a step: steps of 2, 2, 1 batches per epoch
    assert [batches_before(s, 5, 2) for s in range(7)] == [0, 2, 4, 5, 7, 9, 10]
    assert batches_before(4, 5, 2, skips_data=False) == 5  # --ignore_data_skip: the epoch is replayed
