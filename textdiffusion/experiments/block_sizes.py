"""`experiment block-sizes`: what the block size does to likelihood and to speed at the bundled model's scale.

    textdiffusion experiment block-sizes --output-dir benchmarks/results/block_sizes     # B = 4 and 16, ~2 core-hours

Block size 1 is an autoregressive model, a block as long as the sequence is MDLM; in between, the model keeps
left-to-right context before the block and decodes inside it in parallel (BD3-LM). Each block size is a
fine-tune of ``--checkpoint`` (``wiki-small``: BD3-LM starts its block models from MDLM) with the recipe
``--recipe`` (``recipes/wiki-small-bd.yaml``), run by ``textdiffusion train`` in its own process on its own core
(``--workers`` at once), resumable: a finished run is reused, an interrupted one resumed.

1. **Likelihood** on test blocks that chose nothing: the recipe's validation blocks (``eval_blocks``) choose each
   run's checkpoint, the next ``--test-blocks`` validation blocks are scored — each block model's exact block
   NELBO (each block given the clean blocks before it), ``--checkpoint``'s MDLM bound and ``--ar-checkpoint``'s
   exact NLL, all on the same tokens (after the prompt prefix, no special token).
2. **The frontier**: ``--num-prompts`` validation prompts, ``--new-tokens`` new tokens, top-k 50, temperature 1,
   repetition penalty 1.1 on every side: the AR (Transformers' KV-cached ``generate``, one token per call), the
   MDLM at its saved defaults, each block model at one token per call and with each ``--thresholds`` (left to
   right: the leftmost mask always, then each next while p >= threshold), through the exact block cache. Gen PPL
   (``--scorer``), distinct-2, tokens per call (per row), tokens/s at batch 1 and 16 (best of 2, this process's
   threads).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from textdiffusion.errors import UsageError

SAMPLING = dict(sampling="topk", top_k=50, temperature=1.0, repetition_penalty=1.1)


def _recipe(path: str) -> dict:
    import yaml

    if not Path(path).is_file():
        raise UsageError(f"--recipe {path!r} does not exist (run from the project's folder, or give the recipe's path).",
                         field="recipe", value=path)
    return yaml.safe_load(Path(path).read_text())


def _run_dir(args, block_size: int) -> Path:
    return Path(args.runs_dir) / f"b{block_size}"


def _train_command(args, block_size: int) -> list[str]:
    run = _run_dir(args, block_size)
    command = [sys.executable, "-m", "textdiffusion", "train", "--config", args.recipe, "--model-name", args.checkpoint,
               "--block-size", str(block_size), "--output-dir", str(run), *args.block_train_args]
    if any(run.glob("checkpoint-*")):
        command.append("--resume")
    elif run.exists():
        command.append("--overwrite")  # a run that died before its first checkpoint: nothing to keep
    return command


def train_block_sizes(args, out: Path) -> dict[int, Path]:
    """Every block size's run, ``--workers`` at once, each pinned to its own core with one thread."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pending = list(args.block_sizes)
    running: list[tuple[int, subprocess.Popen, int | None]] = []
    started: dict[int, float] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while pending or running:
        while pending and len(running) < max(1, args.workers):
            b = pending.pop(0)
            free = [c for c in cores if c not in {core for _, _, core in running}]
            core = free[0] if free else None
            log = open(out / f"train_b{b}.log", "a")
            pin = (lambda c=core: os.sched_setaffinity(0, {c})) if core is not None else None
            print(f"block size {b}: {' '.join(_train_command(args, b))}" + (f" (core {core})" if pin else ""), flush=True)
            started[b] = time.time()
            running.append((b, subprocess.Popen(_train_command(args, b), stdout=log, stderr=subprocess.STDOUT, env=env,
                                                preexec_fn=pin), core))
        time.sleep(0.25)  # a finished run frees its core at once (the runs take minutes; the check is a poll)
        for item in list(running):
            b, process, _ = item
            if process.poll() is not None:
                running.remove(item)
                _add_train_seconds(_run_dir(args, b), time.time() - started[b])
                if process.returncode:
                    for _, other, _ in running:
                        other.terminate()
                    raise RuntimeError(f"training block size {b} failed (exit {process.returncode}); its log is "
                                       f"{out / f'train_b{b}.log'} and the same command resumes it.")
    return {b: _run_dir(args, b) for b in args.block_sizes}


TRAIN_SECONDS = "train_seconds.json"  # in a run's folder: the wall seconds of every invocation that trained it


def _add_train_seconds(run: Path, seconds: float) -> None:
    path = run / TRAIN_SECONDS
    spent = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(spent + [round(seconds, 1)]) + "\n")


def _core_hours(run: Path) -> float:
    """One core per run: its training's wall hours, over every invocation (NaN when it was never timed)."""
    path = run / TRAIN_SECONDS
    return sum(json.loads(path.read_text())) / 3600 if path.exists() else float("nan")


def likelihood(args, runs: dict[int, Path], recipe: dict) -> list[dict]:
    """Each model's bound (or exact NLL) on the same test tokens."""
    from textdiffusion.core.collator import collator_from_config
    from textdiffusion.core.data import load_corpus, pack
    from textdiffusion.core.evaluation import nelbo, scored_positions
    from textdiffusion.models.autoregressive import causal_nll, load_causal_lm
    from textdiffusion.models.block import block_nelbo, scoring_corruption
    from textdiffusion.models.loading import open_checkpoint

    mdlm = open_checkpoint(args.checkpoint)
    tok = mdlm.tokenizer
    blocks = pack(load_corpus(args.dataset, args.text_column).validation, tok, mdlm.config.max_length,
                  keep_remainder=True)
    first = int(recipe.get("eval_blocks", 0))
    test = blocks[first:first + args.test_blocks]
    if len(test) == 0:
        raise UsageError(f"--test-blocks: the validation split has {len(blocks)} blocks, all used for selection.")
    prefix = mdlm.config.prefix_length
    scored = scored_positions(test, tok, prefix)
    rows = []
    eval_collator = collator_from_config(tok, mdlm.config.corruption, training=False)
    bound = nelbo(mdlm.denoiser, test, eval_collator, samples_per_block=args.nelbo_samples)
    rows.append({"model": f"{args.checkpoint} (MDLM, whole sequence)", "block_size": mdlm.config.max_length,
                 "nats": bound.nats_per_token, "stderr": bound.stderr, "tokens": bound.tokens, "kind": "MDLM bound"})
    for b, run in runs.items():
        opened = open_checkpoint(str(run))
        bound = block_nelbo(opened.denoiser, test, scoring_corruption(tok, b, False, prefix),
                            samples_per_block=args.nelbo_samples)
        rows.append({"model": f"blocks of {b} (from {args.checkpoint})", "block_size": b, "nats": bound.nats_per_token,
                     "stderr": bound.stderr, "tokens": bound.tokens, "kind": "block NELBO",
                     "core_hours": _core_hours(run), "checkpoint": str(run)})
    ar_tok, ar = load_causal_lm(args.ar_checkpoint)
    if ar_tok.get_vocab() != tok.get_vocab():
        raise UsageError(f"--ar-checkpoint {args.ar_checkpoint!r} uses another tokenizer than --checkpoint: the same "
                         "tokens cannot be scored.", field="ar_checkpoint", value=args.ar_checkpoint)
    exact = causal_nll(ar, test, scored)
    rows.append({"model": f"{args.ar_checkpoint} (AR)", "block_size": 1, "nats": exact.nats_per_token,
                 "stderr": exact.stderr, "tokens": exact.tokens, "kind": "exact NLL"})
    ar_nats = exact.nats_per_token
    for r in rows:
        r["ppl_ratio_to_ar"] = float(torch.tensor(r["nats"] - ar_nats).exp())
    print("\n".join(f"{r['model']}: {r['nats']:.4f} ± {r['stderr']:.4f} nats/token ({r['kind']})" for r in rows), flush=True)
    return rows


def frontier(args, runs: dict[int, Path]) -> list[dict]:
    """Generation quality against tokens per call and tokens/s, every side with the same sampling."""
    from textdiffusion.core.data import load_corpus
    from textdiffusion.core.metrics import distinct_n
    from textdiffusion.models.autoregressive import CausalGenerator
    from textdiffusion.models.quality import Scorer, prompts_from_documents, tokens_per_call
    from textdiffusion.pipelines.generation import DiffusionGenerator

    cpu = torch.device("cpu")
    mdlm = DiffusionGenerator.from_pretrained(args.checkpoint, device="cpu")
    prompts = prompts_from_documents(load_corpus(args.dataset, args.text_column).validation, mdlm.tokenizer,
                                     args.num_prompts, args.prompt_tokens, args.new_tokens, args.dataset)
    n = args.new_tokens
    ar = CausalGenerator.from_pretrained(args.ar_checkpoint, cpu)
    sides = [("AR, one token per call", lambda p: (ar.generate_ids(p, n, seed=args.seed, min_new_tokens=n,
                                                                     **SAMPLING), 1.0))]
    d = mdlm.config.generation
    sides.append((f"MDLM at its defaults ({d.steps} steps, blocks of {d.block_length})",
                  lambda p: tokens_per_call(mdlm, p, n, args.seed, **SAMPLING)))
    for b, run in runs.items():
        g = DiffusionGenerator.from_pretrained(str(run), device="cpu")
        common = {**SAMPLING, "strategy": "left-to-right", "steps": n, "order_temperature": 0.0}
        sides.append((f"blocks of {b}, one token per call",
                      lambda p, g=g, c=common: tokens_per_call(g, p, n, args.seed, confidence_threshold=None, **c)))
        for tau in args.thresholds:
            sides.append((f"blocks of {b}, threshold {tau}",
                          lambda p, g=g, c=common, tau=tau: tokens_per_call(g, p, n, args.seed, confidence_threshold=tau,
                                                                            **c)))
    rows = []
    for name, run_side in sides:
        ids, per_call = run_side(prompts.prompts)
        speed = {}
        for batch in args.speed_batches:
            subset = prompts.prompts[:batch]
            run_side(subset)  # warm-up
            best = min(_timed(run_side, subset) for _ in range(2))
            speed[str(batch)] = len(subset) * n / best
        rows.append({"setting": name, "new_ids": ids, "tokens_per_call": per_call, "distinct_2": distinct_n(ids, 2),
                     "tokens_per_second": speed,
                     "texts": [mdlm.tokenizer.decode(i, skip_special_tokens=True) for i in ids]})
        print(f"{name}: {per_call:.2f} tokens/call, " + ", ".join(f"{v:.0f} tok/s at batch {k}" for k, v in speed.items()),
              flush=True)
    for spec in scorers(args):
        scorer = Scorer.load(spec)
        for row in rows:
            row[f"gen_ppl_{spec}"] = scorer.perplexity(prompts.prompts, row["texts"])
        del scorer
    ar_speed = rows[0]["tokens_per_second"]
    for row in rows:
        row["speed_vs_ar"] = {k: v / ar_speed[k] for k, v in row["tokens_per_second"].items()}
        row["example"] = prompts.prompts[0] + row["texts"][0]
    return rows


def scorers(args) -> list[str]:
    """The gen-PPL judges: --scorer, comma-separated (gemma3,smollm2: one that shares no weights with SmolLM2)."""
    return [] if args.scorer == "none" else args.scorer.split(",")


def _timed(fn, arg) -> float:
    t0 = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t0


def report(args, lik: list[dict], front: list[dict], machine: str) -> str:
    ar = next(r for r in lik if r["kind"] == "exact NLL")
    blocks = [r for r in lik if r["kind"] == "block NELBO"]
    best = min(blocks, key=lambda r: r["nats"])
    lines = ["# Block sizes at the bundled model's scale (`experiment block-sizes`)", "",
             f"Command: `textdiffusion experiment block-sizes --block-sizes {' '.join(map(str, args.block_sizes))}` "
             f"(recipe `{args.recipe}`, from `{args.checkpoint}`). Machine: {machine}.", "",
             f"## Likelihood ({lik[0]['tokens']:,} test tokens: validation blocks after the ones that chose the "
             "checkpoints; the same tokens for every row)", "",
             "| model | what | nats/token | ± | perplexity | × AR perplexity | core-hours |", "|---|---|---|---|---|---|---|"]
    for r in lik:
        hours = r.get("core_hours")
        lines.append(f"| {r['model']} | {r['kind']} | {r['nats']:.4f} | {r['stderr']:.4f} | "
                     f"{float(torch.tensor(r['nats']).exp()):.1f} | {r['ppl_ratio_to_ar']:.3f} | "
                     f"{'' if hours is None else f'{hours:.2f}'} |")
    goal = 4.172 - 3.872 + ar["nats"]  # the 1.35x, on these tokens
    lines += ["", f"Goal: the best block model's bound <= 1.35x the AR's perplexity ({goal:.3f} nats here): best is "
              f"blocks of {best['block_size']} at {best['nats']:.4f} ({best['ppl_ratio_to_ar']:.2f}x) — "
              f"**{'met' if best['ppl_ratio_to_ar'] <= 1.35 else 'not met'}**; moonshot <= 1.15x: "
              f"**{'met' if best['ppl_ratio_to_ar'] <= 1.15 else 'not met'}**.", "",
              f"## Generation ({args.num_prompts} validation prompts of {args.prompt_tokens} tokens, {args.new_tokens} "
              f"new tokens; top-k 50, T 1, repetition penalty 1.1 everywhere)", "",
              "| setting | " + "".join(f"gen PPL ({s}) | " for s in scorers(args)) + "distinct-2 | tokens/call | " +
              " | ".join(f"tok/s b{b} (× AR)" for b in args.speed_batches) + " |",
              "|---|---|---|" + "---|" * (len(args.speed_batches) + len(scorers(args)))]
    for r in front:
        speeds = " | ".join(f"{r['tokens_per_second'][str(b)]:.0f} ({r['speed_vs_ar'][str(b)]:.2f}×)"
                            for b in args.speed_batches)
        ppl = "".join(f"{r[f'gen_ppl_{s}']:.1f} | " for s in scorers(args))
        lines.append(f"| {r['setting']} | {ppl}{r['distinct_2']:.3f} | {r['tokens_per_call']:.2f} | {speeds} |")
    lines += ["", "## One sample per row (prompt 0)", ""] + [f"- **{r['setting']}**: {r['example']}" for r in front]
    return "\n".join(lines) + "\n"


def plot(lik: list[dict], front: list[dict], path: Path, judge: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["block_size"] for r in lik]
    a.errorbar(xs, [r["nats"] for r in lik], yerr=[r["stderr"] for r in lik], fmt="o-")
    a.set_xscale("log", base=2)
    a.set_xlabel("block size (1 = AR, 128 = MDLM)")
    a.set_ylabel("nats/token (bound; AR exact)")
    a.set_title("likelihood vs block size")
    for r in front if judge else []:
        b.scatter(r["tokens_per_call"], r[f"gen_ppl_{judge}"])
        b.annotate(r["setting"], (r["tokens_per_call"], r[f"gen_ppl_{judge}"]), fontsize=6)
    b.set_xlabel("tokens per model call")
    b.set_ylabel(f"gen PPL ({judge})")
    b.set_title("generation frontier")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_block_sizes(args, out: Path) -> dict:
    if not args.block_sizes or any(b < 1 for b in args.block_sizes):
        raise UsageError(f"--block-sizes must be block sizes >= 1, got {args.block_sizes}.", field="block_sizes",
                         value=args.block_sizes)
    recipe = _recipe(args.recipe)
    for b in args.block_sizes:
        if int(recipe.get("max_length", 128)) % b:
            raise UsageError(f"--block-sizes {b} does not divide the recipe's max_length {recipe.get('max_length')}.",
                             field="block_sizes", value=b)
    args.ar_checkpoint = args.ar_checkpoint or "wiki-small-ar"
    started = time.time()
    runs = train_block_sizes(args, out)
    lik = likelihood(args, runs, recipe)
    front = frontier(args, runs)
    machine = f"{platform.machine()} {_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}"
    (out / "results.md").write_text(report(args, lik, front, machine))
    plot(lik, front, out / "block_sizes.png", (scorers(args) or [None])[0])
    return {"likelihood": lik, "frontier": [{k: v for k, v in r.items() if k != "new_ids"} for r in front],
            "machine": machine, "seconds_after_training": time.time() - started}
