"""`textdiffusion experiment classify`: generative classifiers (diffusion NELBO, AR likelihood) against a
discriminative baseline, with every label and with 10% of them, and label-guided generation.

    OMP_NUM_THREADS=1 taskset -c 0 textdiffusion experiment classify --output-dir benchmarks/results/classify

For each ``--datasets`` entry ``corpus:column`` (default Austen ``book`` and wiki-vital ``topic``) and each
label fraction (1.0 and 0.1), three models of the same preset are trained for the same steps and batch:

* diffusion: ``train --label-column`` (one model of p(text | label)); classified by the NELBO, every label
  with the same mask draws (classify.py);
* AR: the GPT-2 baseline of the same size on the same labelled blocks; classified by its exact likelihood;
* discriminative: ModernBertForSequenceClassification of the same preset (discriminative.py);
* and as a reference, the simplest generative classifier: class-conditional token counts (Naive Bayes on
  the same tokens, no training beyond counting) — what a p(text | label) model that uses its label beats.

With 10% of the labels the generative models still read all training text (the other 90% with the label
masked, as unlabelled text: a generative model can use it), the discriminative one only the labelled 10%.
Each is scored on the same evenly spaced validation documents: accuracy, macro-F1, expected calibration
error, a confusion matrix (PNG) and the CPU seconds of training and of classifying.

Guidance: with the all-labels diffusion model, ``guidance_samples`` texts per label at each cfg scale
(the label as prefix, classifier-free guidance against the pass with the label masked out); the
discriminative model says which share is classified as the label asked for, beside distinct-2.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from textdiffusion.core.data import load_corpus
from textdiffusion.core.labels import kept_labels, label_token
from textdiffusion.core.metrics import distinct_n
from textdiffusion.errors import UsageError
from textdiffusion.models.discriminative import predict_proba, train_sequence_classifier
from textdiffusion.pipelines.classification import classification_metrics, load_scorer, plot_confusion, unigram_bayes
from textdiffusion.pipelines.generation import DiffusionGenerator
from textdiffusion.pipelines.training import run_training
from textdiffusion.pipelines.training_args import TrainArgs

FRACTIONS = (1.0, 0.1)
DISCRIMINATIVE_LR = 2e-3  # the preset default; the classifier head trains well with it (the generative models take --learning-rate)


def _cpu() -> float:
    return time.process_time()


def _train_generative(args, dataset: str, column: str, objective: str, fraction: float, work: Path) -> tuple[Path, float]:
    out = work / f"{objective}-{int(fraction * 100)}"
    t0 = _cpu()
    run_training(TrainArgs(objective=objective, preset=args.preset, dataset=dataset, label_column=column,
                           label_fraction=fraction, max_steps=args.train_steps, eval_steps=args.train_steps,
                           eval_blocks=32, batch_size=args.batch_size, learning_rate=args.learning_rate,
                           max_length=args.max_length, output_dir=str(out), precision="fp32", seed=args.seed,
                           logging_steps=max(1, args.train_steps // 4), save_total_limit=1))
    return out, _cpu() - t0


def _evaluate(probabilities: np.ndarray, truth: np.ndarray, labels: list[str], path: Path, title: str) -> dict:
    metrics = classification_metrics(probabilities, truth)
    plot_confusion(np.array(metrics["confusion"]), labels, path, title)
    return metrics


def _guidance(args, checkpoint: Path, discriminative, labels: list[str], out: Path, name: str) -> list[dict]:
    """Share of label-guided samples the discriminative model assigns to the label asked for, per cfg scale."""
    gen = DiffusionGenerator.from_pretrained(str(checkpoint), device="cpu")
    suppress = [label_token(c) for c in labels]
    templates = [f"{label_token(c)}<mask:{args.new_tokens}>" for c in labels for _ in range(args.guidance_samples)]
    asked = np.repeat(np.arange(len(labels)), args.guidance_samples)
    _, editable, _ = gen.build_batch(templates)
    rows = []
    for scale in args.cfg_scales:
        t0 = _cpu()
        result = gen.generate(templates=templates, seed=args.seed, cfg_scale=scale, stop_at_eos=False,
                              suppress_tokens=suppress, steps=args.steps)
        cpu = _cpu() - t0
        new_ids = [row[ed].tolist() for row, ed in zip(result.token_ids, editable)]
        probs = predict_proba(discriminative, gen.tokenizer, result.texts, args.max_length).numpy()
        share = float((probs.argmax(1) == asked).mean())
        rows.append({"dataset": name, "cfg_scale": scale, "classified_as_asked": share,
                     "mean_p_asked": float(probs[np.arange(len(asked)), asked].mean()),
                     "distinct-2": distinct_n(new_ids, 2), "samples": len(templates), "cpu_seconds": round(cpu, 1),
                     "example": f"[{labels[0]}] {result.texts[0][:160]}"})
        print(f"  guidance {name} s={scale}: {share:.3f} classified as asked, distinct-2 {rows[-1]['distinct-2']:.3f}",
              flush=True)
    return rows


def _plot_guidance(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    right = ax.twinx()
    for i, name in enumerate(sorted({r["dataset"] for r in rows})):
        mine = [r for r in rows if r["dataset"] == name]
        s = [r["cfg_scale"] for r in mine]
        ax.plot(s, [r["classified_as_asked"] for r in mine], "o-", color=f"C{i}", label=f"{name}: classified as asked")
        right.plot(s, [r["distinct-2"] for r in mine], "s--", color=f"C{i}", alpha=0.6, label=f"{name}: distinct-2")
    ax.set_xlabel("classifier-free guidance scale s")
    ax.set_ylabel("share classified as the asked label (solid)")
    right.set_ylabel("distinct-2 (dashed)")
    ax.set_ylim(0, 1)
    right.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="lower right")
    ax.set_title("label-guided generation, judged by the discriminative classifier", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(rows: list[dict]) -> str:
    head = ("| corpus | labels used | classifier | accuracy | macro-F1 | ECE | train CPU s | classify CPU s |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- |")
    body = [f"| {r['dataset']} | {r['label_fraction']:.0%} | {r['classifier']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} "
            f"| {r['ece']:.3f} | {r['train_cpu_s']:.0f} | {r['classify_cpu_s']:.1f} |" for r in rows]
    return "\n".join([head] + body)


def run_classify(args, out: Path) -> dict:
    from transformers import AutoTokenizer


    specs = []
    for spec in args.datasets:
        dataset, _, column = spec.partition(":")
        if not column:
            raise UsageError(f"--datasets {spec!r}: write corpus:label_column, e.g. austen:book.")
        specs.append((dataset, column))
    work = Path(tempfile.mkdtemp(prefix="textdiffusion-classify-"))
    rows, guidance = [], []
    try:
        for dataset, column in specs:
            corpus = load_corpus(dataset, label_column=column)  # fails fast on a bad column / a single class
            labels = corpus.label_set
            index = {c: i for i, c in enumerate(labels)}
            keep = np.linspace(0, len(corpus.validation) - 1, min(args.eval_texts, len(corpus.validation))).round().astype(int)
            texts = [corpus.validation[i] for i in keep]
            truth = np.array([index[corpus.validation_labels[i]] for i in keep])
            print(f"\n== {dataset} / {column}: {len(labels)} classes, {len(corpus.train):,} training documents, "
                  f"{len(texts)} validation texts scored", flush=True)
            for fraction in FRACTIONS:
                tag = f"{dataset}-{int(fraction * 100)}"
                models = {}
                for objective in ("diffusion", "ar"):
                    checkpoint, train_cpu = _train_generative(args, dataset, column, objective, fraction, work / tag)
                    models[objective] = checkpoint
                    scorer = load_scorer(str(checkpoint))
                    t0 = _cpu()
                    result = scorer.classify(texts, samples=args.nelbo_samples, seed=args.seed)
                    classify_cpu = _cpu() - t0
                    name = "diffusion (NELBO)" if objective == "diffusion" else "AR (exact NLL)"
                    metrics = _evaluate(result.probabilities.numpy(), truth, labels,
                                        out / f"confusion-{tag}-{objective}.png", f"{name}, {dataset}, {fraction:.0%} labels")
                    rows.append({"dataset": dataset, "label_fraction": fraction, "classifier": name,
                                 "train_cpu_s": train_cpu, "classify_cpu_s": classify_cpu, **metrics})
                    print(f"  {tag} {name}: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}, "
                          f"ECE {metrics['ece']:.3f}", flush=True)
                tokenizer = AutoTokenizer.from_pretrained(str(models["diffusion"]))
                labelled = kept_labels(len(corpus.train), fraction, args.seed)  # the documents whose label is used
                train_texts = [t for t, k in zip(corpus.train, labelled) if k]
                train_labels = [c for c, k in zip(corpus.train_labels, labelled) if k]
                t0 = _cpu()
                disc = train_sequence_classifier(tokenizer, args.preset, train_texts, train_labels, labels,
                                                 steps=args.train_steps, batch_size=args.batch_size,
                                                 learning_rate=DISCRIMINATIVE_LR, max_length=args.max_length,
                                                 seed=args.seed)
                train_cpu = _cpu() - t0
                t0 = _cpu()
                probs = predict_proba(disc, tokenizer, texts, args.max_length).numpy()
                classify_cpu = _cpu() - t0
                metrics = _evaluate(probs, truth, labels, out / f"confusion-{tag}-discriminative.png",
                                    f"discriminative, {dataset}, {fraction:.0%} labels")
                rows.append({"dataset": dataset, "label_fraction": fraction, "classifier": "discriminative (same encoder)",
                             "train_cpu_s": train_cpu, "classify_cpu_s": classify_cpu, "labelled_documents": len(train_texts),
                             **metrics})
                print(f"  {tag} discriminative: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}, "
                      f"ECE {metrics['ece']:.3f} ({len(train_texts):,} labelled documents)", flush=True)
                t0 = _cpu()
                probs = unigram_bayes(tokenizer, train_texts, train_labels, labels, texts).numpy()
                cpu = _cpu() - t0
                metrics = _evaluate(probs, truth, labels, out / f"confusion-{tag}-unigram.png",
                                    f"class-conditional unigram, {dataset}, {fraction:.0%} labels")
                rows.append({"dataset": dataset, "label_fraction": fraction, "classifier": "class-conditional unigram (counts)",
                             "train_cpu_s": cpu, "classify_cpu_s": 0.0, **metrics})
                print(f"  {tag} class-conditional unigram: accuracy {metrics['accuracy']:.3f}", flush=True)
                if fraction == 1.0 and args.cfg_scales:
                    guidance += _guidance(args, models["diffusion"], disc, labels, out, dataset)
                shutil.rmtree(work / tag, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if guidance:
        _plot_guidance(guidance, out / "guidance.png")
    _write_report(args, out, rows, guidance)
    return {"rows": rows, "guidance": guidance}


def _write_report(args, out: Path, rows: list[dict], guidance: list[dict]) -> None:
    lines = ["# Generative classification vs a discriminative baseline", "",
             f"Preset `{args.preset}` for every model, {args.train_steps} steps of {args.batch_size} blocks/documents of "
             f"up to {args.max_length} tokens each; {args.eval_texts} evenly spaced validation documents per corpus; "
             f"the diffusion NELBO from {args.nelbo_samples} mask draws per text shared by all labels. "
             f"Learning rate {args.learning_rate or 2e-3:g} for the generative models, {DISCRIMINATIVE_LR:g} for the "
             "discriminative one. ECE: 10 equal-width confidence bins. CPU seconds are process CPU time (training includes tokenizer "
             "training and two validation passes). With 10% of the labels the generative models also read the other "
             "90% of the training text with the label masked; the discriminative model and the unigram counts see only "
             "the labelled 10% (the counts' CPU time is counting and scoring together).",
             "", _table(rows), "", "Confusion matrices: `confusion-<corpus>-<labels %>-<classifier>.png`."]
    if guidance:
        lines += ["", "## Label-guided generation", "",
                  f"{args.guidance_samples} samples of {args.new_tokens} tokens per label, {args.steps} denoising steps, "
                  "from the all-labels diffusion model; judged by the all-labels discriminative model. `guidance.png`.", "",
                  "| corpus | cfg scale | classified as asked | mean p(asked) | distinct-2 | CPU s |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {g['dataset']} | {g['cfg_scale']:g} | {g['classified_as_asked']:.3f} | {g['mean_p_asked']:.3f} | "
                  f"{g['distinct-2']:.3f} | {g['cpu_seconds']:.1f} |" for g in guidance]
        lines += ["", "First sample at each scale:", ""] + [f"- {g['dataset']} s={g['cfg_scale']:g}: {g['example']}" for g in guidance]
    (out / "results.md").write_text("\n".join(lines) + "\n")
