"""The figures of LEARNING_GUIDE.md, regenerated from the code as it stands: `make figures`.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/figures.py            # about a minute on one CPU core

Writes docs/figures/*.png. Three come from `textdiffusion experiment ...` commands on the bundled
wiki-small model and committed runs (masking-viz, levels); the denoising trace, one distillation example and
the schedules are drawn here from the library (DiffusionGenerator, distillation, schedules); the frontier and the AR-vs-diffusion curves are
re-plotted from the committed results of the benchmarks that measured them (`bash benchmarks/experiments.sh`,
`python benchmarks/ar_vs_diffusion.py`, `bash benchmarks/repeated_data.sh`: minutes to hours, a scorer and
an AR model, so not rerun here).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def experiment(name: str, out: Path, *flags: str) -> Path:
    """One `textdiffusion experiment` command, echoed, into out/NAME; returns that folder."""
    cmd = [sys.executable, "-m", "textdiffusion", "experiment", name, *flags, "--output-dir", str(out / name)]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out / name


def masked_rows(results_md: Path, dest: Path) -> None:
    """The masking-viz table ('what the model sees at 10 % ... 100 %') as an image."""
    rows = re.findall(r"^\| (\d+%) \| (.*) \|$", results_md.read_text(), flags=re.M)
    fig, ax = plt.subplots(figsize=(11, 0.42 * len(rows) + 0.6))
    ax.axis("off")
    for i, (level, text) in enumerate(rows):
        text = text.replace("\\|", "|")
        text = text if len(text) <= 120 else text[:117] + "..."
        ax.text(0.0, 1 - (i + 0.5) / len(rows), f"{level:>5}", family="monospace", fontsize=9, va="center", weight="bold")
        ax.text(0.07, 1 - (i + 0.5) / len(rows), text, family="monospace", fontsize=8, va="center")
    ax.set_title("The forward process: one validation sentence at each mask level (▒ = [MASK]; the 5-token prefix is kept)",
                 fontsize=9, loc="left")
    fig.savefig(dest, dpi=110, bbox_inches="tight")
    plt.close(fig)


def denoising_trace(dest: Path, prompt: str = "The river", length: int = 24, steps: int = 8) -> None:
    """The reverse process: each step of one sample, masks grey, tokens committed at that step in colour."""
    from textdiffusion.pipelines.generation import DiffusionGenerator

    gen = DiffusionGenerator.from_pretrained("wiki-small", device="cpu")
    out = gen.generate([prompt], max_length=length, steps=steps, seed=0, return_trace=True, stop_at_eos=False)
    tok, mask_id = gen.tokenizer, gen.tokenizer.mask_token_id
    trace = [x[0] for x in out.trace]  # each [l]
    keep = [i for i, t in enumerate(trace[-1].tolist()) if t not in (tok.pad_token_id,)]
    fig, ax = plt.subplots(figsize=(12, 0.42 * len(trace) + 0.8))
    ax.axis("off")
    char = 0.6 * 8 / 72 / (ax.get_position().width * fig.get_figwidth())  # a monospace 8 pt glyph, in axes units
    for row, x in enumerate(trace):
        prev = trace[row - 1] if row else x
        y = 1 - (row + 0.5) / len(trace)
        ax.text(0, y, f"step {row:>2}", family="monospace", fontsize=8, va="center")
        pos = 0.07
        for i in keep:
            t = int(x[i])
            if t == mask_id:
                piece, color = "▒", "lightgrey"
            else:
                piece = tok.decode([t]).replace("\n", " ") or "·"
                color = "tab:red" if row and int(prev[i]) == mask_id else "black"
            ax.text(pos, y, piece, family="monospace", fontsize=8, va="center", color=color)
            pos += char * max(len(piece), 1)
    ax.set_title(f"The reverse process: wiki-small, {steps} steps, confidence order (red: committed at that step)",
                 fontsize=9, loc="left")
    fig.savefig(dest, dpi=110, bbox_inches="tight")
    plt.close(fig)


def distillation_step(dest: Path, steps: int = 32, seed: int = 3, pair: int = 2) -> None:
    """One SDTT example on wiki-small, drawn by the distillation's own functions: a state x_t of the block sampler
    (real text before the current block, masks from it on), the teacher's two steps from it, and which of the two
    steps' distributions each masked position of the student's one step is taught (distillation.py). ``pair``: which
    of the block's step pairs (its student step) is drawn."""
    from textdiffusion.core.data import load_corpus, pack
    from textdiffusion.pipelines.distillation import DistillPlan, Layout, start_states, teacher_run
    from textdiffusion.pipelines.generation import DiffusionGenerator

    gen = DiffusionGenerator.from_pretrained("wiki-small", device="cpu")
    tok, config, mask_id = gen.tokenizer, gen.config, gen.mask_id
    layout = Layout.of(config, config.generation)
    plan = DistillPlan.of(tok, config.generation, layout)
    blocks = pack(load_corpus("wiki-vital").validation[:40], tok, config.max_length)[:1]
    g = torch.Generator().manual_seed(seed)
    x, editable, attention, sampler = start_states(blocks, plan, steps, g)
    run = teacher_run(gen.denoiser, sampler, x, editable, attention, [torch.Generator().manual_seed(seed)])
    states = run.states[2 * pair:, 0]  # [.., l] from the state before the teacher's step 2 * pair
    current = (run.states[0, 0] == mask_id).nonzero().flatten()
    start, end = int(current[0]), int(current[0]) + layout.span
    shown = range(max(1, start - 20), min(end, config.max_length - 1))
    rows = [("x_t (the student's input)", states[0]), ("teacher step 1", states[1]), ("teacher step 2", states[2]),
            ("student's target", states[2])]
    fig, ax = plt.subplots(figsize=(13, 2.6))
    ax.axis("off")
    char = 0.6 * 8 / 72 / (ax.get_position().width * fig.get_figwidth())
    for r, (label, x_row) in enumerate(rows):
        y = 1 - (r + 0.5) / len(rows)
        ax.text(0, y, label, family="monospace", fontsize=8, va="center")
        pos = 0.17
        for i in shown:
            t = int(x_row[i])
            first = int(states[1][i]) != mask_id and int(states[2][i]) != mask_id
            if r == 3 and int(states[0][i]) == mask_id:  # the target: step 1's distribution (red) or step 2's (blue)
                piece, color = "1" if first else "2", "tab:red" if first else "tab:blue"
            elif t == mask_id:
                piece, color = "▒", "lightgrey"
            else:
                piece = tok.decode([t]).replace("\n", " ") or "·"
                new_here = r in (1, 2) and int(rows[r - 1][1][i]) == mask_id
                color = ("tab:red" if r == 1 else "tab:blue") if new_here else ("black" if r < 3 else "grey")
            ax.text(pos, y, piece, family="monospace", fontsize=8, va="center", color=color)
            pos += char * max(len(piece), 1)
    ax.set_title(f"One SDTT example (wiki-small, {steps} -> {steps // 2} steps): the teacher's two steps from x_t (red: "
                 "committed at step 1, blue: at step 2); the student's one step is taught, at each masked position,\n"
                 "the teacher's distribution from the step that committed it (1) or from step 2 (2: committed then, or "
                 "still masked)", fontsize=8, loc="left")
    fig.savefig(dest, dpi=110, bbox_inches="tight")
    plt.close(fig)


def schedules(dest: Path) -> None:
    """alpha(t) (the fraction of tokens still clean) and the ELBO weight -alpha'/(1-alpha), per schedule."""
    from textdiffusion.schedules import SCHEDULES

    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, s in SCHEDULES.items():
        axes[0].plot(t, s.alpha(t), label=name)
        axes[1].plot(t, s.weight(t), label=name)
    axes[0].set(xlabel="diffusion time t", ylabel="α(t): probability a token is still clean", title="schedules")
    axes[1].set(xlabel="diffusion time t", ylabel="weight −α′(t)/(1−α(t))", yscale="log", title="ELBO loss weight")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


def frontier(dest: Path) -> None:
    """NFE vs gen PPL and distinct-2, from benchmarks/results/experiments/steps/results.json."""
    data = json.loads((RESULTS / "experiments" / "steps" / "results.json").read_text())
    groups: dict[str, list[dict]] = {}
    for r in data["rows"]:
        key = ("AR baseline" if r["setting"].startswith("AR") else "blocks" if "blocks" in r["setting"]
               else "threshold" if r["setting"].startswith("threshold") else r["setting"].split(",")[0])
        groups.setdefault(key, []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in ((axes[0], "gen_ppl"), (axes[1], "distinct-2")):
        for name, rows in groups.items():
            rows = sorted(rows, key=lambda r: r["nfe"])
            if name in ("AR baseline", "threshold"):  # single points, not a curve over steps
                style = dict(marker="*", s=160, color="black", zorder=5) if name == "AR baseline" else dict(marker="s", color="tab:purple")
                ax.scatter([r["nfe"] for r in rows], [r[key] for r in rows], label=name + (" 0.3-0.9" if name == "threshold" else ""), **style)
            else:
                ax.plot([r["nfe"] for r in rows], [r[key] for r in rows], marker="o", label=name)
        ax.axhline(data["reference"][key], color="grey", ls="--", label="real text")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set(xlabel="model calls (NFE) for 48 new tokens", ylabel=key)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("Quality vs speed, wiki-small (benchmarks/results/experiments/steps)", fontsize=10)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


def ar_vs_diffusion(dest: Path) -> None:
    """Validation nats/token against training tokens, from benchmarks/results/ar_vs_diffusion/results.json."""
    data = json.loads((RESULTS / "ar_vs_diffusion" / "results.json").read_text())
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, points in data["curves"].items():
        points = [p for p in points if p["tokens_seen"] > 0]
        ax.plot([p["tokens_seen"] / 1e6 for p in points], [p["nll"] for p in points], marker="o", ms=3, label=name)
    ax.set(xlabel="training tokens seen (millions)", ylabel="validation nats / token",
           title="Same size, same tokens: diffusion (bound) vs autoregressive (exact)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


def repeated_data(dest: Path) -> None:
    """Each side's best run per budget, validation against epochs, from benchmarks/results/repeated_data."""
    data = json.loads((RESULTS / "repeated_data" / "results.json").read_text())
    budgets = data["budgets"]
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.2 * len(budgets), 3.8), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for side, colour, what in (("ar", "tab:red", "AR (exact NLL)"), ("diffusion", "tab:blue", "diffusion (NELBO bound)")):
            run = data["best"][f"{budget}:{side}"]
            ax.plot([p["epoch"] for p in run["curve"]], [p["validation"] for p in run["curve"]], color=colour,
                    label=f"{what}: best {run['best']['validation']:.3f} at epoch {run['best']['epoch']}")
        ax.set(xscale="log", xlabel="epochs over the same tokens", ylabel="validation nats / token",
               title=f"U = {budget:,} unique tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Repeated data, same size (each side's best run)", fontsize=10)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default=str(ROOT / "docs" / "figures"))
    a = p.parse_args(argv)
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        viz = experiment("masking-viz", Path(tmp), "--checkpoint", "wiki-small")
        masked_rows(viz / "results.md", out / "forward_masking.png")
        shutil.copy(viz / "masking-viz.png", out / "mask_rates_and_unmasking.png")
        levels = experiment("levels", Path(tmp), "--run-dir", str(RESULTS / "quick_test"))
        shutil.copy(levels / "levels.png", out / "per_level_loss.png")
    denoising_trace(out / "denoising_trace.png")
    schedules(out / "schedules.png")
    distillation_step(out / "distillation_step.png")
    frontier(out / "frontier.png")
    ar_vs_diffusion(out / "ar_vs_diffusion.png")
    repeated_data(out / "repeated_data.png")
    print(f"figures: {', '.join(sorted(p.name for p in out.glob('*.png')))} in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
