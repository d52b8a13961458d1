"""Does guidance steer? Samples per topic with no guidance, the label alone, classifier-free guidance,
first-order classifier guidance and particles (smc), judged by an independent classifier.

    python benchmarks/guidance.py --checkpoint runs/wiki-small-topics --guide runs/wiki-small-topics-guide
    bash benchmarks/guidance.sh                                      # the committed run (results/guidance)

The judge is a discriminative ModernBERT trained here on clean text of the same classes (from scratch: it
shares no weights with the generator or the guide, and never sees a sample). Its recall on real validation
text cut to the samples' length is the ceiling: a sample is "on target" when the judge assigns it the topic
asked for, and no method can be expected to beat the judge's reading of real text of that topic. The goal
(issue 22): on-target share >= 90 % of that ceiling at gen PPL within 1.3x of the unguided samples.

Every method uses the same seeds per topic (sample i of topic t: seed + 1000 t + i), the checkpoint's
sampler settings and --steps; each text is what a user reads: the new tokens up to the first end of text.
Gen PPL is scored by SmolLM2 (``--scorer``; ``none`` skips it). Cost is CPU seconds per sample, measured
here in one process, one after another (model calls alone hide the guide's and the particles' cost).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from textdiffusion.core.data import load_corpus
from textdiffusion.core.detokenize import decode_text
from textdiffusion.core.metrics import distinct_n
from textdiffusion.models.discriminative import predict_proba, train_sequence_classifier
from textdiffusion.models.quality import Scorer
from textdiffusion.pipelines.generation import DiffusionGenerator


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="A diffusion checkpoint (labelled for the cfg rows).")
    ap.add_argument("--guide", default=None, help="A guide from `train-guide` (the classifier and smc rows).")
    ap.add_argument("--dataset", default="wiki-vital")
    ap.add_argument("--label-column", default="topic")
    ap.add_argument("--samples", type=int, default=16, help="Samples per topic and method.")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None, help="Denoising steps (default: the checkpoint's).")
    ap.add_argument("--full-length", action="store_true",
                    help="Suppress end-of-text: every sample is --new-tokens long (a model whose texts are shorter "
                         "than --new-tokens otherwise ends most samples early, and empty samples judge nothing).")
    ap.add_argument("--cfg-scales", type=float, nargs="*", default=[1.0, 2.0, 4.0])
    ap.add_argument("--classifier-scales", type=float, nargs="*", default=[1.0, 3.0, 10.0])
    ap.add_argument("--smc-scales", type=float, nargs="*", default=[1.0, 3.0])
    ap.add_argument("--particles", type=int, default=8)
    ap.add_argument("--judge-preset", default="micro")
    ap.add_argument("--judge-steps", type=int, default=1500)
    ap.add_argument("--judge-batch", type=int, default=32)
    ap.add_argument("--judge-lr", type=float, default=2e-3)
    ap.add_argument("--scorer", default="smollm2", help="Gen PPL scorer (smollm2, gemma3, a path) or none.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/guidance")
    return ap.parse_args(argv)


def methods(args, labelled: bool, guided: bool) -> list[tuple[str, str, float, dict]]:
    """(name, family, strength, generate() keywords) of each row; the label is added per topic."""
    rows = [("unguided (no label)", "unguided", 0.0, {"label": False})]
    if labelled:
        rows.append(("label only", "label", 0.0, {}))
        rows += [(f"cfg s={s:g}", "cfg", s, {"guidance": "cfg", "cfg_scale": s}) for s in args.cfg_scales]
    if guided:
        rows += [(f"classifier s={s:g}", "classifier", s, {"guidance": "classifier", "guidance_scale": s})
                 for s in args.classifier_scales]
        rows += [(f"smc {args.particles} particles s={s:g}", "smc", s,
                  {"guidance": "smc", "guidance_scale": s, "particles": args.particles}) for s in args.smc_scales]
    return rows


def new_text(gen: DiffusionGenerator, row: torch.Tensor, editable: torch.Tensor) -> tuple[list[int], str]:
    """The generated tokens of a row up to the first end of text, and their text."""
    ids = row[editable].tolist()
    if gen.sep_id is not None and gen.sep_id in ids:
        ids = ids[: ids.index(gen.sep_id)]
    return ids, decode_text(gen.tokenizer, ids).strip()


def cut(tokenizer, text: str, n: int) -> str:
    """The first ``n`` tokens of ``text`` as text: real text of the samples' length."""
    return decode_text(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"][:n]).strip()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.time()
    gen = DiffusionGenerator.from_pretrained(args.checkpoint, device="cpu")
    guide = gen.open_guide(args.guide) if args.guide else None
    labels = list(gen.config.labels or (guide.labels if guide else []))
    if not labels:
        sys.exit(f"error: --checkpoint {args.checkpoint!r} has no labels and no --guide was given: nothing to steer.")
    corpus = load_corpus(args.dataset, label_column=args.label_column)
    others = sorted(set(corpus.label_set) - set(labels))
    if others:
        corpus = corpus.without_labels(others)
    tok = gen.tokenizer

    # -- the judge: clean text only, from scratch --------------------------------------------------
    t0 = time.process_time()
    judge = train_sequence_classifier(tok, args.judge_preset, corpus.train, corpus.train_labels, labels,
                                      steps=args.judge_steps, batch_size=args.judge_batch, learning_rate=args.judge_lr,
                                      max_length=gen.config.max_length, seed=args.seed)
    judge_cpu = time.process_time() - t0
    truth = np.array([labels.index(c) for c in corpus.validation_labels])
    short = [cut(tok, t, args.new_tokens) for t in corpus.validation]
    recall_full = predict_proba(judge, tok, corpus.validation, gen.config.max_length).numpy().argmax(1)
    recall_short = predict_proba(judge, tok, short, gen.config.max_length).numpy().argmax(1)
    ceiling = {c: float((recall_short[truth == i] == i).mean()) for i, c in enumerate(labels)}
    judge_rows = [{"topic": c, "validation_texts": int((truth == i).sum()), "recall_full": float((recall_full[truth == i] == i).mean()),
                   "recall_short": ceiling[c]} for i, c in enumerate(labels)]
    print(f"judge: {args.judge_preset}, {args.judge_steps} steps, {judge_cpu:.0f} CPU s; recall on real text of "
          f"{args.new_tokens} tokens {np.mean(list(ceiling.values())):.3f} (macro), accuracy "
          f"{float((recall_short == truth).mean()):.3f}", flush=True)

    scorer = None if args.scorer == "none" else Scorer.load(args.scorer)
    reference = [s for s in short if s]
    reference_ppl = scorer.perplexity([""] * len(reference), reference) if scorer else float("nan")

    # -- the samples -------------------------------------------------------------------------------
    template = f"<mask:{args.new_tokens}>"
    editable = gen.build_batch([template])[1][0]  # [width] the row without a label: its generated positions
    width = len(editable)
    settings = {"steps": args.steps} if args.steps else {}
    if args.full_length:
        settings.update(suppress_tokens=[tok.sep_token or tok.eos_token], stop_at_eos=False)
    results, examples = [], {}
    for name, family, strength, extra in methods(args, bool(gen.config.labels), guide is not None):
        on_target, p_asked, ids_all, texts_all, nfe, cpu = [], [], [], [], 0, 0.0
        per_topic = {}
        for t, topic in enumerate(labels):
            kwargs = dict(extra)
            label = None if kwargs.pop("label", True) is False else topic
            if kwargs.get("guidance") in ("classifier", "smc"):
                kwargs["guide"] = guide
            c0 = time.process_time()
            out = gen.generate(templates=[template] * args.samples, seed=args.seed + 1000 * t, label=label, **settings,
                               **kwargs)
            cpu += time.process_time() - c0
            nfe = max(nfe, out.nfe)
            pieces = [new_text(gen, row[-width:], editable) for row in out.token_ids]  # the label prefix sits before
            texts = [text for _, text in pieces]
            probs = predict_proba(judge, tok, texts, gen.config.max_length).numpy()
            hit = probs.argmax(1) == t
            per_topic[topic] = float(hit.mean())
            on_target += hit.tolist()
            p_asked += probs[:, t].tolist()
            ids_all += [ids for ids, _ in pieces]
            texts_all += texts
            examples.setdefault(topic, {})[name] = texts[0]
        ppl = scorer.perplexity([""] * len(texts_all), [t or "." for t in texts_all]) if scorer else float("nan")
        share = float(np.mean(on_target))
        ratio = float(np.mean([per_topic[c] / ceiling[c] if ceiling[c] else float("nan") for c in labels]))
        results.append({"method": name, "family": family, "strength": strength, "on_target": share,
                        "on_target_over_ceiling": share / float(np.mean(list(ceiling.values()))),
                        "mean_topic_ratio": ratio, "mean_p_asked": float(np.mean(p_asked)), "gen_ppl": ppl,
                        "distinct_2": distinct_n(ids_all, 2), "model_calls": nfe,
                        "cpu_s_per_sample": cpu / len(texts_all), "per_topic": per_topic})
        print(f"  {name:28s} on target {share:.3f}  gen PPL {ppl:7.1f}  distinct-2 {results[-1]['distinct_2']:.3f}  "
              f"calls {nfe}  {cpu / len(texts_all):.2f} CPU s/sample", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"checkpoint": args.checkpoint, "guide": args.guide, "labels": labels, "samples_per_topic": args.samples,
               "new_tokens": args.new_tokens, "steps": args.steps or gen.config.generation.steps, "scorer": args.scorer,
               "reference_gen_ppl": reference_ppl, "judge": {"preset": args.judge_preset, "steps": args.judge_steps,
                                                             "cpu_s": judge_cpu, "per_topic": judge_rows},
               "results": results, "examples": examples, "seconds": time.time() - started,
               "command": "python benchmarks/guidance.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s)", "date": time.strftime("%Y-%m-%d")}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(report(summary) + "\n")
    plot(summary, out / "guidance.png")
    print(f"results: {out}/results.md")
    return 0


def report(s: dict) -> str:
    labels, results = s["labels"], s["results"]
    ceiling = {r["topic"]: r["recall_short"] for r in s["judge"]["per_topic"]}
    mean_ceiling = float(np.mean(list(ceiling.values())))
    unguided = results[0]["gen_ppl"]
    lines = [f"# Guidance: does `{Path(s['checkpoint']).name}` write about the topic asked for?", "",
             f"`{s['command']}` ({s['machine']}, {s['date']}, {s['seconds'] / 60:.0f} min): {s['samples_per_topic']} samples "
             f"of {s['new_tokens']} tokens per topic and method ({len(labels)} topics, chance {1 / len(labels):.3f}), "
             f"{s['steps']} denoising steps, the same seeds for every method. Judge: a `{s['judge']['preset']}` "
             f"ModernBERT trained from scratch on clean training text ({s['judge']['steps']} steps); its recall on real "
             f"validation text cut to {s['new_tokens']} tokens is the ceiling, {mean_ceiling:.3f} on average over the "
             f"topics. Gen PPL by `{s['scorer']}` (real text of that length: {s['reference_gen_ppl']:.1f}). "
             "Goal: on target >= 0.9 x the ceiling at gen PPL <= 1.3 x the unguided samples'.", "",
             "| method | on target | / ceiling | mean p(asked) | gen PPL | / unguided | distinct-2 | model calls | CPU s per sample | goal |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        ok = r["on_target_over_ceiling"] >= 0.9 and r["gen_ppl"] <= 1.3 * unguided
        lines.append(f"| {r['method']} | {r['on_target']:.3f} | {r['on_target_over_ceiling']:.2f} | {r['mean_p_asked']:.3f} | "
                     f"{r['gen_ppl']:.1f} | {r['gen_ppl'] / unguided:.2f} | {r['distinct_2']:.3f} | {r['model_calls']} | "
                     f"{r['cpu_s_per_sample']:.2f} | {'met' if ok else ''} |")
    lines += ["", "On target per topic (the judge's recall on real text of that length first):", "",
              "| topic | texts | judge recall | " + " | ".join(r["method"] for r in results) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in results) + " |"]
    for j in s["judge"]["per_topic"]:
        c = j["topic"]
        lines.append(f"| {c} | {j['validation_texts']} | {ceiling[c]:.2f} | "
                     + " | ".join(f"{r['per_topic'][c]:.2f}" for r in results) + " |")
    lines += ["", "First sample per topic (seed of sample 0), side by side:", ""]
    for c in labels:
        lines.append(f"**{c}**")
        lines += [f"- {name}: {text[:220]}" for name, text in s["examples"][c].items()]
        lines.append("")
    return "\n".join(lines)


def plot(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = s["results"]
    ceiling = float(np.mean([r["recall_short"] for r in s["judge"]["per_topic"]]))
    unguided = results[0]["gen_ppl"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, family in enumerate(dict.fromkeys(r["family"] for r in results)):
        mine = [r for r in results if r["family"] == family]
        ax.plot([r["gen_ppl"] for r in mine], [r["on_target"] for r in mine], "o-", color=f"C{i}", label=family)
        for r in mine:
            if r["strength"]:
                ax.annotate(f"{r['strength']:g}", (r["gen_ppl"], r["on_target"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    ax.axhline(ceiling, color="k", lw=0.8, label=f"judge recall on real text ({ceiling:.2f})")
    ax.axhline(0.9 * ceiling, color="k", lw=0.8, ls="--", label="goal: 0.9 x that")
    ax.axhline(1 / len(s["labels"]), color="grey", lw=0.8, ls=":", label="chance")
    if math.isfinite(unguided):
        ax.axvline(1.3 * unguided, color="r", lw=0.8, ls="--", label="goal: 1.3 x unguided gen PPL")
        ax.set_xscale("log")
    ax.set_xlabel(f"gen PPL ({s['scorer']})")
    ax.set_ylabel("share of samples on the asked topic")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"guidance toward a topic: {Path(s['checkpoint']).name}, judged independently", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
