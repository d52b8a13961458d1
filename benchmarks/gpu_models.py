"""One GPU command refreshes the ready models: trains, evaluates and exports, in about 6 minutes on one GPU.

    bash benchmarks/gpu_models.sh                 # CUDA: recipes/wiki-gpu.yaml (preset small, ~45 epochs) and
                                                  # recipes/mpnet-wiki-gpu.yaml (mpnet-base fine-tune), bf16
    bash benchmarks/gpu_models.sh --cpu-smoke     # the same pipeline, shortened, on the CPU (about a minute);
                                                  # also GPU_MODELS_SMOKE=1

For each model: `textdiffusion train --config <recipe>`, an fp16 export into OUT/models/<name>
(`python -m textdiffusion.models.bundled`), `textdiffusion eval` (per-level loss, NELBO per token, nats per word
and bits per byte, so the two tokenizers compare) and samples from `textdiffusion generate`. The bundled wiki-small
is evaluated beside them. Nothing in the package is replaced: to ship the new small model, copy it over
textdiffusion/models/wiki-small (its recipe then is recipes/wiki-gpu.yaml) and commit it with OUT/summary.md.

Each step is one command line of the project, with its output in OUT/<name>.<step>.log. On a GPU every step runs
in a process of its own (--isolate, the default there: one step's memory never stays with the next); the CPU
smoke runs them one after the other in this process (--no-isolate, its default: ~3 s of imports saved per step,
twenty-odd steps), which runs the same command lines through the same entry points.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["wiki-small", "mpnet-wiki", "smollm2-wiki", "wiki-small-sdtt", "smollm2-bd"]

# the recipes cut to seconds (flags after --config win) and the evaluation's sizes, per mode
SHORT = ["--max-steps", "6", "--eval-steps", "3", "--eval-blocks", "4", "--batch-size", "4", "--max-length", "32",
         "--precision", "fp32", "--logging-steps", "3"]
SMOKE = {
    "preset": [*SHORT, "--preset", "micro", "--vocab-size", "512"],
    "mpnet": [*SHORT, "--head-warmup", "2"],
    "smollm2": [*SHORT, "--attention-anneal-steps", "3"],
    "block": SHORT,
    "compare": ["--quick"],
    "distill": ["--rounds", "1", "--steps-per-round", "2", "--start-steps", "8", "--batch-size", "4", "--save-steps", "2",
                "--eval-steps", "2", "--eval-blocks", "4", "--precision", "fp32", "--no-quality-gate"],
    "eval": ["--eval-blocks", "4", "--samples-per-block", "1", "--batch-size", "4"],
    "generate": ["--num-samples", "2", "--max-length", "24", "--steps", "8"],
}
FULL = {"preset": [], "mpnet": [], "smollm2": [], "block": [], "compare": ["--num-prompts", "64", "--new-tokens", "64"],
        "distill": [], "eval": ["--eval-blocks", "256"], "generate": ["--num-samples", "4", "--max-length", "128"]}

# what a step runs: the module a process would run with `python -m`, or a script; and the function to call in-process
ENTRY_POINTS = {
    "textdiffusion": ("textdiffusion.cli.main", "main"),
    "textdiffusion.models.bundled": ("textdiffusion.models.bundled", "main"),
    "benchmarks/block_compare.py": (str(ROOT / "benchmarks" / "block_compare.py"), "main"),
}


class StepFailed(Exception):
    pass


@contextlib.contextmanager
def output_to(log: Path | None):
    """This process's output into ``log`` while the block runs: sys.stdout and sys.stderr, and file descriptors 1
    and 2 beneath them (so a logger or progress bar that holds the original streams follows); nothing changes
    when ``log`` is None."""
    if log is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "w", buffering=1) as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _entry(name: str):
    where, function = ENTRY_POINTS[name]
    if where.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, function)


class Steps:
    """Runs the pipeline's command lines, each in a process of its own (isolate) or in this one."""

    def __init__(self, isolate: bool, device: str):
        self.isolate, self.device = isolate, device

    def run(self, what: str, program: str, argv: list[str], log: Path | None = None) -> None:
        if self.isolate:
            head = [sys.executable, program] if program.endswith(".py") else [sys.executable, "-m", program]
            with open(log, "w") if log else contextlib.nullcontext() as f:
                status = subprocess.run(head + argv, stdout=f, stderr=subprocess.STDOUT if f else None).returncode
        else:
            status = self._in_process(program, argv, log)
        if status != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log and log.exists() else ""
            raise StepFailed(f"{what} failed" + (f"; see {log}\n{tail}" if log else ""))

    def _in_process(self, program: str, argv: list[str], log: Path | None) -> int:
        saved_argv = sys.argv
        sys.argv = [program, *argv]  # what a script reports as its command line
        try:
            with output_to(log):
                try:
                    status = _entry(program)(argv)
                except SystemExit as e:  # argparse's exit
                    status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except Exception:
                    traceback.print_exc()
                    status = 1
        finally:
            sys.argv = saved_argv
            gc.collect()
            if self.device == "cuda":
                import torch

                torch.cuda.empty_cache()
        return status or 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="gpu_models.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", default=os.environ.get("GPU_MODELS_SMOKE", "0") == "1",
                    help="The same pipeline, shortened, on the CPU (also GPU_MODELS_SMOKE=1).")
    ap.add_argument("--out", default=None,
                    help="Results (default benchmarks/results/gpu_models; smoke: .../gpu_models-cpu-smoke).")
    ap.add_argument("--mpnet", default="mpnet-base",
                    help="The pretrained encoder to fine-tune (default mpnet-base, fetched if missing; a folder works).")
    ap.add_argument("--dataset", default="wiki-vital", help="The corpus (default wiki-vital, the recipes' own).")
    ap.add_argument("--models", default="wiki-small,mpnet-wiki",
                    help="Which ready models to refresh, comma-separated (default wiki-small,mpnet-wiki). Opt-in: "
                         "smollm2-wiki (recipes/smollm2-wiki-gpu.yaml, an estimated 15-25 minutes more); "
                         "wiki-small-sdtt (SDTT distillation by recipes/wiki-small-sdtt-gpu.yaml, 32 -> 16 -> 8 -> 4 "
                         "steps, of the wiki-small this run trained when wiki-small is in the list, else of the bundled "
                         "one); smollm2-bd (recipes/smollm2-bd-gpu.yaml, the shipped block-diffusion adapter's recipe "
                         "with ~50x its tokens, exported as an adapter and compared with SmolLM2 by "
                         "benchmarks/block_compare.py).")
    ap.add_argument("--smollm2", default="smollm2",
                    help="The causal LM smollm2-wiki and smollm2-bd adapt (default smollm2, the offline wheel's; a "
                         "Llama folder works).")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="Each step in a process of its own (default: yes on a GPU, no in the CPU smoke).")
    args = ap.parse_args(argv)
    for m in args.models.split(","):
        if m not in MODELS:
            ap.exit(2, f"gpu_models.sh: --models {args.models!r}: {m!r} is not one of {', '.join(MODELS)}\n")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    wanted = args.models.split(",")
    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    if not smoke:
        import torch

        if not torch.cuda.is_available():
            print("gpu_models.sh: torch sees no CUDA device; run with --cpu-smoke", file=sys.stderr)
            return 1
    flags = SMOKE if smoke else FULL
    out = Path(args.out or ("benchmarks/results/gpu_models-cpu-smoke" if smoke else "benchmarks/results/gpu_models"))
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    steps = Steps(isolate=(not smoke) if args.isolate is None else args.isolate, device=device)
    started = time.monotonic()
    evaluated: list[str] = []

    def train(name: str, command: str, recipe: str, *extra: str) -> None:
        t0 = time.monotonic()
        steps.run(f"training {name}", "textdiffusion",
                  [command, "--config", recipe, "--output-dir", str(runs / name), "--overwrite", "--dataset", args.dataset,
                   *extra], out / f"{name}.train.log")
        seconds = int(time.monotonic() - t0)
        print(f"{name}: {'distilled' if command == 'distill' else 'trained'} in {seconds} s", flush=True)
        (out / f"{name}.train_seconds").write_text(f"{seconds}\n")

    def export(run: str, name: str, *extra: str) -> Path:
        dest = out / "models" / name
        steps.run(f"exporting {name}", "textdiffusion.models.bundled",
                  ["--run", str(runs / run), "--name", name, "--dest", str(dest), *extra])
        return dest

    def evaluate(name: str, checkpoint: str) -> None:
        steps.run(f"evaluating {name}", "textdiffusion",
                  ["eval", "--checkpoint", checkpoint, "--dataset", args.dataset, "--device", device,
                   "--output-dir", str(out / f"eval-{name}"), "--overwrite", *flags["eval"]], out / f"{name}.eval.log")
        steps.run(f"generating from {name}", "textdiffusion",
                  ["generate", "--checkpoint", checkpoint, "--device", device, "--prefix", "The history of", "--hide-steps",
                   "--output", str(out / f"eval-{name}" / "samples.jsonl"), *flags["generate"]], out / f"{name}.generate.log")
        evaluated.append(name)

    try:
        if "mpnet-wiki" in wanted and args.mpnet == "mpnet-base":
            steps.run("fetching mpnet-base", "textdiffusion", ["fetch-model", "mpnet-base"])  # a no-op when cached
        evaluate("wiki-small-now", "wiki-small")
        if "wiki-small" in wanted:
            train("wiki-gpu", "train", "recipes/wiki-gpu.yaml", *flags["preset"])
            evaluate("wiki-small-new", str(export("wiki-gpu", "wiki-small")))
        if "mpnet-wiki" in wanted:
            train("mpnet-wiki", "train", "recipes/mpnet-wiki-gpu.yaml", "--model-name", args.mpnet, *flags["mpnet"])
            # saves the ready model's measured sampling defaults (bundled.BUILT); copy it to ~/.cache/textdiffusion/models/
            evaluate("mpnet-wiki", str(export("mpnet-wiki", "mpnet-wiki", "--no-size-limit")))
        if "smollm2-wiki" in wanted:
            train("smollm2-wiki", "train", "recipes/smollm2-wiki-gpu.yaml", "--model-name", args.smollm2, *flags["smollm2"])
            evaluate("smollm2-wiki", str(export("smollm2-wiki", "smollm2-wiki", "--no-size-limit")))
        if "smollm2-bd" in wanted:
            train("smollm2-bd", "train", "recipes/smollm2-bd-gpu.yaml", "--model-name", args.smollm2, *flags["block"])
            adapter = export("smollm2-bd", "smollm2-bd")
            evaluate("smollm2-bd", str(adapter))
            steps.run("block_compare", "benchmarks/block_compare.py",
                      ["--checkpoint", str(adapter), "--base", args.smollm2, "--out", str(out / "block_compare"),
                       *flags["compare"]], out / "smollm2-bd.compare.log")
        if "wiki-small-sdtt" in wanted:
            teacher = str(out / "models" / "wiki-small") if "wiki-small" in wanted else "wiki-small"
            train("wiki-small-sdtt", "distill", "recipes/wiki-small-sdtt-gpu.yaml", "--teacher", teacher, *flags["distill"])
            # each round's gate verdict; the export is the gate's last kept model (every round's student is in
            # runs/wiki-small-sdtt/round-N until the end of this script)
            (out / "wiki-small-sdtt.rounds.csv").write_text((runs / "wiki-small-sdtt" / "distill_rounds.csv").read_text())
            evaluate("wiki-small-sdtt", str(export("wiki-small-sdtt", "wiki-small-sdtt")))
    except StepFailed as e:
        print(f"gpu_models.sh: {e}", file=sys.stderr)
        return 1
    shutil.rmtree(runs, ignore_errors=True)  # checkpoints and optimiser states: the exports are what is kept
    write_summary(out, int(time.monotonic() - started), smoke, evaluated)
    print(f"gpu_models.sh: wrote {out}/summary.json and {out}/summary.md; exports in {out}/models/")
    return 0


def write_summary(out: Path, seconds: int, smoke: bool, evaluated: list[str]) -> None:
    rows = []
    for name in evaluated:
        bound = json.loads((out / f"eval-{name}" / "eval.json").read_text())["nelbo"][0]
        samples = [json.loads(line) for line in (out / f"eval-{name}" / "samples.jsonl").read_text().splitlines()]
        train_s = out / f"{name.replace('wiki-small-new', 'wiki-gpu')}.train_seconds"
        rows.append({"model": name, "nats_per_token": bound["nats_per_token"], "nats_per_word": bound["nats_per_word"],
                     "bits_per_byte": bound["bits_per_byte"], "tokens": bound["tokens"],
                     "train_seconds": int(train_s.read_text()) if train_s.exists() else None,
                     "sample": (samples[0].get("text") or "")[:160] if samples else ""})
    (out / "summary.json").write_text(json.dumps({"smoke": smoke, "seconds": seconds, "models": rows}, indent=2) + "\n")
    md = [f"# benchmarks/gpu_models.sh{' --cpu-smoke (shortened: the numbers mean nothing)' if smoke else ''}", "",
          f"{seconds} s in all. NELBO bound from `textdiffusion eval` on the validation split of the training corpus.", "",
          "| model | nats/token | nats/word | bits/byte | trained in (s) | first sample |",
          "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        trained = r["train_seconds"] if r["train_seconds"] is not None else "-"
        md.append(f"| {r['model']} | {r['nats_per_token']:.3f} | {r['nats_per_word']:.3f} | {r['bits_per_byte']:.3f} | "
                  f"{trained} | {r['sample'].replace('|', '/')} |")
    (out / "summary.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    sys.exit(main())
