"""The denoiser is an explicit module around the Hugging Face model: Trainer trains and mixed precision wraps
the module, checkpoints save the model inside in its own format, and evaluation runs in full precision."""

import torch
from safetensors.torch import load_file
from test_objective import V, tiny_model

from textdiffusion.core.collator import DiffusionCollator
from textdiffusion.core.denoiser import MaskedDiffusionLM, TrainedModule, masked_logits
from textdiffusion.core.evaluation import per_level_loss
from textdiffusion.pipelines.trainers import DiffusionTrainer, training_arguments
from textdiffusion.pipelines.training_args import TrainArgs


class Blocks(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i]


def trainer_for(tmp_path, precision: str, steps: int = 2):
    torch.manual_seed(0)
    model = tiny_model("roberta")
    ids = torch.randint(5, V, (16, 24))
    ids[:, 0] = 0
    collator = DiffusionCollator(mask_token_id=4, pad_token_id=1, protected_token_ids=[0, 2], seed=3)
    eval_collator = DiffusionCollator(mask_token_id=4, pad_token_id=1, protected_token_ids=[0, 2], seed=5)
    args = TrainArgs(dataset="unused", preset="micro", output_dir=str(tmp_path / "run"), batch_size=8,
                     max_steps=steps, eval_steps=steps, logging_steps=1, precision=precision)
    targs = training_arguments(args, tmp_path / "run")
    trainer = DiffusionTrainer(model=MaskedDiffusionLM(model), args=targs, train_dataset=Blocks(ids),
                               eval_dataset=Blocks(ids[:8]),
                               data_collator=collator, loss_weighting="none", tokens_per_step=8 * 24,
                               level_eval={"report_dir": str(tmp_path), "blocks": ids[:8], "collator": eval_collator,
                                           "references": {}})
    return trainer, model, ids


def test_the_hugging_face_model_keeps_its_own_forward_and_checkpoint_format(tmp_path):
    trainer, model, ids = trainer_for(tmp_path, "fp32")
    trainer.train()
    assert "forward" not in model.__dict__  # nothing patched onto the model instance
    checkpoint = tmp_path / "run" / "checkpoint-2"
    keys = set(load_file(checkpoint / "model.safetensors"))
    assert keys and not any(k.startswith("model.") for k in keys)  # the model's own names, loadable by Transformers
    from transformers import AutoModelForMaskedLM

    reloaded = AutoModelForMaskedLM.from_pretrained(checkpoint)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_denoiser_gives_the_full_forward_logits_at_masked_positions():
    torch.manual_seed(0)
    model = tiny_model("modernbert").eval()
    ids = torch.randint(5, V, (2, 16))
    positions = torch.rand(2, 16) < 0.5
    full = model(input_ids=ids).logits[positions]  # [n, V]
    assert torch.allclose(masked_logits(MaskedDiffusionLM(model), ids, None, positions), full, atol=1e-5)
    assert torch.allclose(masked_logits(model, ids, None, positions), full, atol=1e-5)  # a plain model is wrapped


def test_evaluation_runs_in_full_precision_while_training_autocasts(tmp_path):
    trainer, model, ids = trainer_for(tmp_path, "bf16", steps=1)
    trainer.train()
    evaluated = trainer.evaluation_model()
    model.eval()  # no dropout in the comparison
    assert isinstance(evaluated, TrainedModule) and evaluated.model is model
    positions = ids[:4] != 0
    reference = masked_logits(MaskedDiffusionLM(model), ids[:4], None, positions)  # plain fp32
    with torch.no_grad():
        assert torch.equal(masked_logits(evaluated, ids[:4], None, positions), reference)
        trained = trainer.model(input_ids=ids[:4], masked_positions=positions)  # through Accelerate's autocast
    assert not torch.allclose(trained.float(), reference, atol=1e-4)  # bf16 rounding shows: it did autocast
    level = per_level_loss(evaluated, ids[:8], trainer.level_eval["collator"], batch_size=8)
    assert level == per_level_loss(MaskedDiffusionLM(model), ids[:8], trainer.level_eval["collator"], batch_size=8)
