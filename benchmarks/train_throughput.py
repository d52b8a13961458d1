"""Training throughput: `textdiffusion train` against the plain Hugging Face masked-LM recipe, interleaved.

    python benchmarks/train_throughput.py                                   # CPU, tiny preset, fp32 and bf16
    python benchmarks/train_throughput.py --preset small --device cuda --precisions bf16 --compile

Both sides get the same model (the same preset, built from the same seed), the same packed blocks of
the bundled wiki-vital corpus, the same block size, batch and Trainer settings (``training_arguments``
of textdiffusion's own train command). What differs is what each recipe does per step:

* **HF recipe** — ``Trainer`` + ``DataCollatorForLanguageModeling`` (15 % masking, 80/10/10), the
  model's own forward: attention mask passed, LM head and cross-entropy over every position;
* **textdiffusion** — ``DiffusionTrainer`` + the diffusion collator (0.1…1.0 masking): the LM head only
  on masked positions (with ``--compile``, through a static-shape gather padded to one of 8 sizes, as
  ``train --compile`` does), no attention mask when there is no padding (SDPA's fused path).

The configurations run in rounds, alternating which goes first, so drift of a shared machine hits them
alike; tokens/s is from the median step-to-step interval (collation included), ratios are per
precision. Peak memory is measured per configuration, each trained alone for a few steps in a fresh
process: peak resident memory sampled during its steps (CPU; it includes the process's data and
interpreter, about the same for all) or ``torch.cuda.max_memory_allocated`` (GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback

from textdiffusion.core.collator import collator_from_config
from textdiffusion.core.data import BlockDataset, load_corpus, pack
from textdiffusion.core.denoiser import MaskedDiffusionLM
from textdiffusion.models.presets import PRESETS, build_preset_model, preset_tokenizer
from textdiffusion.pipelines.trainers import DiffusionTrainer, training_arguments
from textdiffusion.pipelines.training_args import TrainArgs


class StepClock(TrainerCallback):
    """Wall time between consecutive step ends: the whole step, data collation included."""

    def __init__(self):
        self.marks: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())


class PeakMemory:
    """Peak memory while the training steps run: sampled resident memory (CPU; the kernel's own high-water
    mark would be set by the data preparation before) or ``torch.cuda.max_memory_allocated`` (GPU), in MB."""

    def __init__(self, cuda: bool):
        self.cuda, self.peak, self._stop = cuda, 0.0, threading.Event()

    @staticmethod
    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss_mb())
            time.sleep(0.002)

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self.rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()


def measure_alone(args, config: tuple) -> float:
    """Peak memory of one configuration, trained alone in a fresh process (the timing process holds all four)."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "alone.json"
        cmd = [sys.executable, __file__, "--only", f"{config[0]},{config[1]}", "--preset", args.preset,
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--rounds", "1",
               "--steps-per-round", "4", "--device", args.device, "--alone-json", str(out)]
        subprocess.run(cmd + (["--compile"] if args.compile else []), check=True, capture_output=True)
        return json.loads(out.read_text())["peak_memory_mb"]


def enough_blocks(docs: list[str], tokenizer, args) -> torch.Tensor:
    """Packed blocks for every step the run times (each step a batch of its own), from as few documents as give
    them: the benchmark times steps, and tokenising all of wiki-vital cost each of its processes ~2 s."""
    needed, n = args.batch_size * args.steps_per_round * args.rounds, 64
    while True:
        blocks = pack(docs[:n], tokenizer, args.max_length)
        if len(blocks) >= needed or n >= len(docs):
            return blocks
        n *= 4


def build(recipe: str, precision: str, args, tokenizer, blocks, out: Path, compile_model: bool):
    train_args = TrainArgs(preset=args.preset, precision=precision, batch_size=args.batch_size,
                           max_steps=args.steps_per_round, max_length=args.max_length, compile=compile_model,
                           output_dir=str(out))
    targs = dataclasses.replace(training_arguments(train_args, out), eval_strategy="no", save_strategy="no",
                                load_best_model_at_end=False, logging_steps=10_000, logging_first_step=False,
                                disable_tqdm=True, warmup_steps=0)
    torch.manual_seed(0)
    model = build_preset_model(args.preset, tokenizer, args.max_length)
    clock = StepClock()
    dataset = BlockDataset(blocks)
    if recipe == "HF recipe":
        trainer = Trainer(model=model, args=targs, train_dataset=dataset, callbacks=[clock],
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15))
    else:
        trainer = DiffusionTrainer(model=MaskedDiffusionLM(model), args=targs, train_dataset=dataset, callbacks=[clock],
                                   data_collator=collator_from_config(tokenizer, train_args.corruption(),
                                                                      gather_buckets=8 if compile_model else 0),
                                   loss_weighting="none", tokens_per_step=args.batch_size * args.max_length,
                                   level_eval={"report_dir": str(out)})
    return trainer, clock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--precisions", default="fp32,bf16", help="Comma-separated: fp32, bf16 (fp16 on CUDA).")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps-per-round", type=int, default=12)
    ap.add_argument("--warmup-steps", type=int, default=2, help="Intervals dropped at the start of each round.")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (GPU).")
    ap.add_argument("--out", default="benchmarks/results/train_throughput")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # "recipe,precision": the memory subprocess
    ap.add_argument("--alone-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA device.")
    if args.device == "cpu" and torch.cuda.is_available():
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # Trainer would otherwise pick the GPU
    precisions = args.precisions.split(",")

    corpus = load_corpus("wiki-vital")
    tmp = Path(tempfile.mkdtemp(prefix="throughput-"))
    tokenizer = preset_tokenizer(corpus.train, PRESETS[args.preset].vocab_size, Path("runs/.tokenizer-cache") / args.preset)
    blocks = enough_blocks(corpus.train, tokenizer, args)
    configs = [(recipe, p) for p in precisions for recipe in ("HF recipe", "textdiffusion")]
    if args.only:
        configs = [tuple(args.only.split(","))]
    built = {c: build(*c, args, tokenizer, blocks, tmp / f"{c[0]}-{c[1]}".replace(" ", "_"), args.compile) for c in configs}
    intervals: dict[tuple, list[float]] = {c: [] for c in configs}
    for r in range(args.rounds):
        order = configs if r % 2 == 0 else configs[::-1]
        for c in order:
            trainer, clock = built[c]
            clock.marks.clear()
            if args.only:  # the memory process; the timing process runs no sampling thread beside its steps
                with PeakMemory(args.device == "cuda") as mem:
                    trainer.train()
                alone_peak = mem.peak
            else:
                trainer.train()
            gaps = [b - a for a, b in zip(clock.marks, clock.marks[1:])][args.warmup_steps:]
            intervals[c].extend(gaps)
            print(f"round {r + 1}: {c[0]:>13} {c[1]}: {statistics.median(gaps) * 1000:.0f} ms/step", flush=True)

    if args.only:
        Path(args.alone_json).write_text(json.dumps({"peak_memory_mb": alone_peak}))
        return
    peaks = {c: measure_alone(args, c) for c in configs}
    tokens = args.batch_size * args.max_length
    rows = []
    for recipe, p in configs:
        step = statistics.median(intervals[(recipe, p)])
        rows.append({"recipe": recipe, "precision": p, "ms_per_step": step * 1000, "tokens_per_s": tokens / step,
                     "peak_memory_mb": peaks[(recipe, p)], "steps_timed": len(intervals[(recipe, p)])})
    for row in rows:
        base = next(x for x in rows if x["recipe"] == "HF recipe" and x["precision"] == row["precision"])
        row["ratio_vs_hf_same_precision"] = row["tokens_per_s"] / base["tokens_per_s"]
        fp32 = next((x for x in rows if x["recipe"] == "HF recipe" and x["precision"] == "fp32"), None)
        row["ratio_vs_hf_fp32"] = row["tokens_per_s"] / fp32["tokens_per_s"] if fp32 else float("nan")

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    meta = {"command": "python " + " ".join(sys.argv), "device": device, "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "preset": args.preset, "batch_size": args.batch_size,
            "max_length": args.max_length, "rounds": args.rounds, "steps_per_round": args.steps_per_round,
            "compile": args.compile}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    memory = "peak GPU memory (MB)" if args.device == "cuda" else "peak RSS (MB)"
    lines = [f"Command: `{meta['command']}`  ", f"Device: {device}; torch {torch.__version__}; {meta['date']}  ",
             f"Model: preset `{args.preset}`; blocks of {args.max_length} tokens, batch {args.batch_size}; "
             f"{args.rounds} interleaved rounds of {args.steps_per_round} steps{', torch.compile' if args.compile else ''}", "",
             f"| recipe | precision | ms/step | tokens/s | vs HF (same precision) | vs HF fp32 | {memory} |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['recipe']} | {row['precision']} | {row['ms_per_step']:.0f} | {row['tokens_per_s']:,.0f} | "
                     f"{row['ratio_vs_hf_same_precision']:.2f}x | {row['ratio_vs_hf_fp32']:.2f}x | {row['peak_memory_mb']:,.0f} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
