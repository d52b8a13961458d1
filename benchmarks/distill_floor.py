"""How much of SDTT's divergence a student can learn at all: the floor set by the teacher's own first-step draws.

    OMP_NUM_THREADS=1 python benchmarks/distill_floor.py --teacher wiki-small --student wiki-small-sdtt

At a state x_t the teacher's two steps *draw* tokens at its first step, and the targets of the positions its
second step fills are conditioned on those draws, which a student looking at x_t alone cannot see. Against
targets p_1 .. p_M from M independent teacher runs from the same x_t, the best any one-step distribution q can
do in reverse KL is min_q mean_m KL(q || p_m) = -log sum_v exp(mean_m log p_m(v)) per position (q proportional to
the geometric mean of the targets): the floor. Printed beside it, on the same states and draws: the undistilled
teacher's one step (where distillation starts) and the student's. The states are the first student step of a
block (x_t = the block fully masked, earlier blocks real text), the only state the M runs share. Writes
results.json and README.md in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from textdiffusion.core.data import load_corpus, pack  # noqa: E402
from textdiffusion.core.denoiser import masked_logits  # noqa: E402
from textdiffusion.pipelines.distillation import (  # noqa: E402
    DistillPlan,
    Layout,
    TeacherRun,
    distillation_batch,
    divergence,
    start_states,
    teacher_run,
)
from textdiffusion.pipelines.generation import DiffusionGenerator  # noqa: E402


@torch.no_grad()
def measure(teacher: DiffusionGenerator, student: DiffusionGenerator, steps: int, blocks: torch.Tensor, draws: int,
            seed: int = 0) -> dict:
    config = teacher.config
    plan = DistillPlan.of(teacher.tokenizer, config.generation, Layout.of(config, config.generation))
    x, editable, attention, sampler = start_states(blocks, plan, steps, torch.Generator().manual_seed(seed))
    targets, positions = [], None
    for m in range(draws):  # the same x_t, other first-step draws
        gens = [torch.Generator().manual_seed(seed * 100_003 + m * 1_009 + i) for i in range(len(blocks))]
        run = teacher_run(teacher.denoiser, sampler, x, editable, attention, gens)
        first_two = TeacherRun(run.states[:3], run.read[:2], run.log_probs)  # one student step: teacher steps 0, 1
        batch = distillation_batch(first_two, attention, plan.mask_token_id)
        assert positions is None or torch.equal(positions, batch.positions)
        positions = batch.positions
        targets.append(batch.targets)
    stacked = torch.stack(targets)  # [M, n, V] log-probabilities
    floor = -torch.logsumexp(stacked.mean(0), -1)  # [n]

    def expected(model: DiffusionGenerator) -> torch.Tensor:
        logits = masked_logits(model.denoiser, x, attention, positions).float()  # [n, V]
        return torch.stack([divergence(logits, t, "reverse-kl") for t in targets]).mean(0)  # [n]

    return {"positions": int(positions.sum()), "draws": draws, "floor": float(floor.mean()),
            "teacher_one_step": float(expected(teacher).mean()), "student_one_step": float(expected(student).mean())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="wiki-small")
    ap.add_argument("--student", default="wiki-small-sdtt")
    ap.add_argument("--steps", type=int, default=32, help="The teacher's step count (the student learns half).")
    ap.add_argument("--blocks", type=int, default=64, help="Validation blocks of wiki-vital (one x_t each).")
    ap.add_argument("--draws", type=int, default=8, help="Independent teacher runs per x_t.")
    ap.add_argument("--out", default="benchmarks/results/distill_floor")
    args = ap.parse_args(argv)
    teacher = DiffusionGenerator.from_pretrained(args.teacher, device="cpu")
    student = DiffusionGenerator.from_pretrained(args.student, device="cpu")
    blocks = pack(load_corpus("wiki-vital").validation, teacher.tokenizer, teacher.config.max_length)[: args.blocks]
    row = measure(teacher, student, args.steps, blocks, args.draws)
    learnable = row["teacher_one_step"] - row["floor"]
    row["learnt_share"] = (row["teacher_one_step"] - row["student_one_step"]) / learnable if learnable > 0 else float("nan")
    print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU"
    (out / "results.json").write_text(json.dumps({"machine": machine, "args": vars(args), **row}, indent=2) + "\n")
    (out / "README.md").write_text(
        "# The divergence floor of one SDTT step\n\n"
        f"`python benchmarks/distill_floor.py {' '.join(argv if argv is not None else sys.argv[1:])}` on {machine}. "
        f"{row['positions']} masked positions (the first student step of a block in {args.blocks} validation blocks), "
        f"{args.draws} teacher runs each, reverse KL, mean over positions (nats):\n\n"
        "| floor (best possible one step) | undistilled teacher's one step | student's one step | share of the learnable gap learnt |\n"
        "|---:|---:|---:|---:|\n"
        f"| {row['floor']:.4f} | {row['teacher_one_step']:.4f} | {row['student_one_step']:.4f} | {row['learnt_share']:.0%} |\n")


if __name__ == "__main__":
    main()
