"""Train a masked LM as a text diffusion model: a thin layer over ``transformers.Trainer``.

    textdiffusion train --quick-test --preset tiny            # minutes on a laptop CPU
    textdiffusion train --quick-test --preset tiny --objective ar   # the GPT-2 baseline, same tokens
    textdiffusion train --model-name distilroberta-base --dataset wikitext:wikitext-2-raw-v1
    torchrun --nproc_per_node 2 -m textdiffusion train ...    # DDP, unchanged

What this layer adds to Trainer: the variable-masking collator, the loss with the LM head on masked
positions only, a deterministic per-mask-level validation (``per_level_loss.csv`` + PNG after every
evaluation), the NELBO bound against tokens seen (``validation_curve.csv``; the AR baseline writes its
exact NLL there, so the two curves compare directly), the best checkpoint by that number kept as the
final model, tokens/s in the logs, the diffusion settings saved beside every checkpoint, and guards that
keep a failed or mistaken run from overwriting an earlier one.

The command's settings are ``training_args.TrainArgs`` (a ``TrainingArguments``); the run is training.py.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import Trainer, TrainerCallback

from textdiffusion.config import DiffusionConfig
from textdiffusion.core.denoiser import TrainedModule
from textdiffusion.core.evaluation import nelbo, per_level_loss
from textdiffusion.core.loss import diffusion_loss
from textdiffusion.core.reporting import append_level_csv, format_level_table, plot_level_curves
from textdiffusion.models.autoregressive import causal_nll
from textdiffusion.models.checkpoints import staging_folder

if TYPE_CHECKING:
    from textdiffusion.pipelines.training_args import TrainArgs

logger = logging.getLogger("textdiffusion")


LEVEL_CSV = "per_level_loss.csv"
LEVEL_PNG = "per_level_loss.png"
PLOT_EVERY_S = 30.0  # the per-level PNG is redrawn at most this often during training, and at its end
CURVE_CSV = "validation_curve.csv"

# -- the Trainers -----------------------------------------------------------------------------------
def batches_before(step: int, batches_per_epoch: int, accumulation: int, skips_data: bool = True) -> int:
    """How many training batches an uninterrupted run has collated before optimiser step ``step``: an epoch
    is ceil(batches / accumulation) steps (the last one takes the remainder), and a resumed epoch skips its
    trained batches without collating them (unless --ignore_data_skip)."""
    updates_per_epoch = max(math.ceil(batches_per_epoch / accumulation), 1)
    epochs, in_epoch = divmod(step, updates_per_epoch)
    return epochs * batches_per_epoch + (min(in_epoch * accumulation, batches_per_epoch) if skips_data else 0)


class AttentionAnnealCallback(TrainerCallback):
    """Tells the denoiser the optimiser step before each step (so a resumed run continues the schedule);
    an unset ``anneal_steps`` becomes a tenth of the run."""

    def __init__(self, denoiser):  # a models.adapt.CausalDiffusionLM
        self.denoiser = denoiser

    def on_train_begin(self, args, state, control, **kwargs):
        if self.denoiser.anneal_steps is None:
            self.denoiser.anneal_steps = max(1, state.max_steps // 10)
        self.denoiser.set_step(state.global_step)
        if state.is_world_process_zero:
            steps = self.denoiser.anneal_steps
            when = f"causal at step 0, full from step {steps}" if steps else "full from the start"
            print(f"\nattention: {when} (--attention-anneal-steps)", flush=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self.denoiser.set_step(state.global_step)


class ResumedMaskStream(TrainerCallback):
    """A resumed run continues the collator's random stream where the uninterrupted run was: batch j's masks
    depend only on (seed, j), so kill -9 + --resume gives the same weights. Counted in batches, not steps:
    with --gradient_accumulation_steps a step takes several."""

    def __init__(self, collator):
        self.collator = collator

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if state.global_step and train_dataloader is not None:
            offset = batches_before(state.global_step, len(train_dataloader), args.gradient_accumulation_steps,
                                    skips_data=not args.ignore_data_skip)
            self.collator.reseed(self.collator.seed, batch_offset=offset)


class _ProjectTrainer(Trainer):
    """What both objectives share: tokens/s in the logs, and the validation NLL (bound) vs tokens seen."""

    def __init__(self, *args, level_eval: dict, tokens_per_step: int, diffusion_config: DiffusionConfig | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.diffusion_config = diffusion_config or DiffusionConfig()
        self.level_eval = level_eval
        self.tokens_per_step = tokens_per_step
        self.level_results: dict[int, list] = {}  # step -> per-level results (diffusion only)
        self._throughput_mark = None
        if hasattr(self.data_collator, "reseed"):  # the diffusion collator (the AR baseline's draws nothing)
            self.add_callback(ResumedMaskStream(self.data_collator))
        from transformers.integrations import TensorBoardCallback
        from transformers.integrations.integration_utils import default_logdir

        for callback in self.callback_handler.callbacks:  # --report_to tensorboard: our step-0 evaluation logs
            # before on_train_begin, where the callback picks its folder; without one it writes into ./runs
            if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                callback.logging_dir = str(Path(self.args.output_dir) / default_logdir())

    def log(self, logs: dict, *args, **kwargs) -> None:
        now, step = time.perf_counter(), self.state.global_step
        if "loss" in logs and self._throughput_mark is not None:
            last_time, last_step = self._throughput_mark
            if step > last_step:
                logs["tokens_per_second"] = round((step - last_step) * self.tokens_per_step / (now - last_time))
        if "loss" in logs or self._throughput_mark is None:
            self._throughput_mark = (now, step)
        super().log(logs, *args, **kwargs)

    def evaluation_model(self) -> torch.nn.Module:
        """The model as evaluation calls it: outside DDP/compile, and in full precision even when training
        autocasts to bf16 (Accelerate puts autocast on the trained module's forward only, so a fresh wrapper
        around the same weights runs in fp32): validation numbers match `textdiffusion eval`."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)  # the eager module under compile
        return model.fresh() if isinstance(model, TrainedModule) else model

    @contextlib.contextmanager
    def _hugging_face_model(self):
        """Within it, ``self.model`` is the Hugging Face model inside the trained module, for Trainer's own
        saving: checkpoints keep the model's format (no ``model.`` prefix, config.json beside). Loading needs
        no such switch: ``TrainedModule.load_state_dict`` takes that format."""
        trained = self.model
        if isinstance(trained, TrainedModule):
            self.model = trained.model
        try:
            yield
        finally:
            self.model = trained

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the Hugging Face model inside (every checkpoint and the final model come through here)."""
        with self._hugging_face_model():
            super().save_model(output_dir, _internal_call)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's save, made crash-safe: everything is written into ``.checkpoint-N.partial/`` (with the
        diffusion config), and renamed to ``checkpoint-N`` only when complete (see checkpoints.py).

        Why this private override remains: no public hook runs before a checkpoint's first file is written
        (``on_save`` comes after the last), so only here can the write be pointed aside. It is pointed by a
        copy of the arguments whose ``output_dir`` is the staging folder (nothing of Trainer's is patched),
        with pushing off: the Hub gets the checkpoint from its final place, after the rename."""
        from transformers.trainer import TRAINING_ARGS_NAME
        from transformers.trainer_utils import rotate_checkpoints

        run_dir = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        final = run_dir / name
        staging_root = staging_folder(final)
        staged = staging_root / name
        args, self.args = self.args, copy.copy(self.args)
        self.args.output_dir, self.args.push_to_hub = str(staging_root), False
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args = args
        if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint) == staged:
            self.state.best_model_checkpoint = str(final)
        if self.args.world_size > 1:
            torch.distributed.barrier()  # every rank's RNG state is in the staged folder
        if self.args.should_save:
            self.state.save_to_json(str(staged / "trainer_state.json"))  # with the final path of the best checkpoint
            torch.save(self.args, staged / TRAINING_ARGS_NAME)  # the real output dir, not the staging one
            self.diffusion_config.save_pretrained(staged)
            if final.exists():  # the same step saved again: the new save replaces it
                shutil.rmtree(final)
            staged.rename(final)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
            if self.args.push_to_hub:  # what Trainer would have pushed (per --hub_strategy), from the final folder
                self._push_from_checkpoint(str(final))
        if self.args.world_size > 1:
            torch.distributed.barrier()

    def _finish_evaluation(self, metrics: dict, nll, kind: str) -> dict:
        """Append (step, tokens seen, NLL) to validation_curve.csv, log, and run the callbacks."""
        metrics["eval_nll"] = round(nll.nats_per_token, 5)
        metrics["eval_ppl"] = round(nll.perplexity_bound, 3)
        if self.is_world_process_zero():
            path = Path(self.level_eval["report_dir"]) / CURVE_CSV
            new = not path.exists()
            with path.open("a") as f:
                if new:
                    f.write("step,tokens_seen,nll,stderr,perplexity,kind\n")
                step = self.state.global_step
                f.write(f"{step},{step * self.tokens_per_step},{nll.nats_per_token:.5f},{nll.stderr:.5f},"
                        f"{nll.perplexity_bound:.3f},{kind}\n")
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class DiffusionTrainer(_ProjectTrainer):
    """Trainer with the diffusion loss and a deterministic per-mask-level evaluation plus the NELBO."""

    def __init__(self, *args, loss_weighting: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_weighting = loss_weighting
        self.model_accepts_loss_kwargs = False  # our loss is already a mean; let Trainer scale it
        self._last_plot, self._plot_pending = time.monotonic(), False

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        self._plot_levels(now=True)  # the finished run's curves, whenever the last redraw was
        return result

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = diffusion_loss(model, inputs, self.loss_weighting)
        return (loss, None) if return_outputs else loss

    # what validation measures and how it is named; BlockDiffusionTrainer measures the block bound instead
    level_heading = "validation loss at each mask level"
    bound_kind = "nelbo"

    def bound_name(self) -> str:
        return "NELBO"

    def measure(self, model, batch: int) -> tuple[list, object]:
        """(per-level results, bound) of ``model`` on the validation blocks."""
        cfg = self.level_eval
        results = per_level_loss(model, cfg["blocks"], cfg["collator"], batch_size=batch)
        return results, nelbo(model, cfg["blocks"], cfg["collator"], samples_per_block=2, batch_size=batch)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        cfg = self.level_eval
        results, bound = self.measure(self.evaluation_model(), self.args.per_device_eval_batch_size)
        metrics = {f"{metric_key_prefix}_loss": sum(r.loss for r in results) / len(results)}
        metrics.update({f"{metric_key_prefix}_loss@{r.mask_rate:.1f}": round(r.loss, 4) for r in results})
        if self.is_world_process_zero():
            out = Path(cfg["report_dir"])
            append_level_csv(out / LEVEL_CSV, self.state.global_step, results)
            self._plot_pending = True
            self._plot_levels()
            print(format_level_table(results, cfg["references"], f"\n{self.level_heading}, step {self.state.global_step}:"), flush=True)
            print(f"{self.bound_name()} {bound.nats_per_token:.4f} ± {bound.stderr:.4f} nats/token "
                  f"(perplexity <= {bound.perplexity_bound:.1f})", flush=True)
        self.level_results[self.state.global_step] = results
        return self._finish_evaluation(metrics, bound, self.bound_kind)

    def _plot_levels(self, now: bool = False) -> None:
        """Redraw per_level_loss.png from the CSV when an evaluation added rows to it: at most every PLOT_EVERY_S
        seconds while training (a redraw costs ~0.3 s, most of a short run's evaluation) and at the end."""
        if not self._plot_pending or not self.is_world_process_zero():
            return
        if now or time.monotonic() - self._last_plot >= PLOT_EVERY_S:
            cfg = self.level_eval
            out = Path(cfg["report_dir"])
            plot_level_curves(out / LEVEL_CSV, out / LEVEL_PNG, cfg["references"], cfg.get("title", ""))
            self._last_plot, self._plot_pending = time.monotonic(), False


class CausalTrainer(_ProjectTrainer):
    """The AR baseline: Trainer's own causal-LM loss, evaluated as exact NLL on the tokens the NELBO scores."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        cfg = self.level_eval
        nll = causal_nll(self.evaluation_model(), cfg["blocks"], cfg["scored"],
                         batch_size=self.args.per_device_eval_batch_size)
        if self.is_world_process_zero():
            print(f"\nvalidation NLL, step {self.state.global_step}: {nll.nats_per_token:.4f} ± {nll.stderr:.4f} "
                  f"nats/token (perplexity {nll.perplexity_bound:.1f})", flush=True)
        return self._finish_evaluation({f"{metric_key_prefix}_loss": nll.nats_per_token}, nll, "exact")


# -- the run ---------------------------------------------------------------------------------------
def training_arguments(args: TrainArgs, work_dir: Path) -> TrainArgs:
    """The Trainer settings of a run: ``args`` itself (it is a TrainingArguments), writing into ``work_dir``
    (the staging folder of an --overwrite run). Also used by benchmarks/train_throughput.py."""
    return args if Path(args.output_dir) == Path(work_dir) else dataclasses.replace(args, output_dir=str(work_dir))


class BlockDiffusionTrainer(DiffusionTrainer):
    """Block diffusion of a causal LM (models/block.py): the batches carry the clean copy beside x_t, the
    loss is ``block_loss``, and validation reports per-level losses (every block at one level) and the block
    NELBO. With LoRA adapters the checkpoints hold the adapter, and resuming loads it back."""

    def __init__(self, *args, corruption, **kwargs):
        super().__init__(*args, **kwargs)
        self.corruption = corruption

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from textdiffusion.models.block import block_loss

        loss = block_loss(model, inputs, self.loss_weighting)
        return (loss, None) if return_outputs else loss

    level_heading = "validation loss at each mask level (every block)"
    bound_kind = "block-nelbo"

    def bound_name(self) -> str:
        return f"block NELBO (blocks of {self.corruption.block_size})"

    def measure(self, model, batch: int) -> tuple[list, object]:
        from textdiffusion.config import DEFAULT_MASK_PROBS
        from textdiffusion.models.block import block_level_loss, block_nelbo

        blocks, was_training = self.level_eval["blocks"], model.training
        corruption = self.corruption
        if corruption.clean_prefix is not None:  # an encoder: score the tokens the MDLM bound scores (no end-of-text)
            protected = tuple(int(i) for i in self.level_eval["collator"]._protected)
            corruption = corruption.like(protected_token_ids=protected)
        model.eval()
        results = block_level_loss(model, blocks, corruption, DEFAULT_MASK_PROBS, batch_size=batch)
        bound = block_nelbo(model, blocks, corruption, samples_per_block=4, batch_size=batch)
        model.train(was_training)
        return results, bound

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """An adapter checkpoint (adapter_model.safetensors) loads into the adapters; anything else as Trainer does."""
        from textdiffusion.models.block import is_peft

        inner = self.accelerator.unwrap_model(model or self.model).model
        if is_peft(inner) and (Path(resume_from_checkpoint) / "adapter_model.safetensors").exists():
            from peft import set_peft_model_state_dict
            from peft.utils import load_peft_weights

            set_peft_model_state_dict(inner, load_peft_weights(resume_from_checkpoint))
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        from textdiffusion.models.block import is_peft

        best = self.state.best_model_checkpoint
        inner = self.accelerator.unwrap_model(self.model).model
        if best and is_peft(inner):
            self._load_from_checkpoint(best)
            return
        super()._load_best_model()
