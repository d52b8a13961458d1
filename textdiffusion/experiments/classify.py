"""`textdiffusion experiment classify`: generative classifiers (diffusion NELBO, AR likelihood) against a
discriminative baseline, with every label and with a share of them, and label-guided generation.

    OMP_NUM_THREADS=1 taskset -c 0 textdiffusion experiment classify --output-dir benchmarks/results/classify
    textdiffusion experiment classify --start-from wiki-small --ar-start-from wiki-small-ar \
        --datasets wiki-vital:topic --exclude-labels Uncategorized --label-fractions 1 0.1 0.03 --cfg-scales

For each ``--datasets`` entry ``corpus:column`` (default Austen ``book`` and wiki-vital ``topic``; the classes
of ``--exclude-labels`` left out) and each ``--label-fractions`` share f (default 1.0 and 0.1), models are
trained for the same steps and batch:

* diffusion: ``train --label-column`` (one model of p(text | label)); classified by the NELBO, every label
  with the same mask draws (classify.py);
* AR: the GPT-2 baseline of the same size on the same labelled blocks; classified by its exact likelihood;
* discriminative: ModernBertForSequenceClassification (discriminative.py);
* and as a reference, the simplest generative classifier: class-conditional token counts (Naive Bayes on
  the same tokens, no training beyond counting) — what a p(text | label) model that uses its label beats.

From scratch (default) every model is ``--preset``. With ``--start-from`` (a masked LM: the bundled
wiki-small) and ``--ar-start-from`` (a causal LM: wiki-small-ar) the generative models are fine-tuned from
them, each with its start's tokenizer (the label tokens added as new embeddings) and corruption settings,
and the discriminative baseline starts from the same knowledge: the start's encoder with a new head; the
same architecture from scratch beside it shows what the pretraining gives.

With a share f of the labels a generative model from scratch still reads all training text (the rest with
the label masked, as unlabelled text: a generative model can use it); a fine-tuned one reads only the
labelled share (``train --unlabelled drop``: its start already read the rest), as the discriminative ones
do. Without guidance no label is dropped (``--label-dropout 0``): every labelled document teaches its label.
Each is scored on the same evenly spaced validation documents: accuracy, macro-F1, expected calibration
error, recall per class, a confusion matrix (PNG) and the CPU seconds of training and of classifying (also
per text).

Guidance (empty ``--cfg-scales``: none): with the all-labels diffusion model, ``guidance_samples`` texts per
label at each cfg scale (the label as prefix, classifier-free guidance against the pass with the label
masked out); the discriminative model says which share is classified as the label asked for, beside distinct-2.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from textdiffusion.config import DiffusionConfig
from textdiffusion.core.data import Corpus, load_corpus
from textdiffusion.core.labels import kept_labels, label_token
from textdiffusion.core.metrics import distinct_n
from textdiffusion.errors import UsageError
from textdiffusion.models.bundled import BUNDLED, resolve_checkpoint
from textdiffusion.models.checkpoints import checkpoint_objective
from textdiffusion.models.discriminative import predict_proba, train_sequence_classifier
from textdiffusion.pipelines.classification import classification_metrics, load_scorer, plot_confusion, unigram_bayes
from textdiffusion.pipelines.generation import DiffusionGenerator
from textdiffusion.pipelines.training import run_training
from textdiffusion.pipelines.training_args import TrainArgs

SCRATCH_LR = 2e-3  # from a preset: the preset default (the discriminative head trains well with it too)
# from a pretrained start: its fine-tunes are short (hundreds of steps), so twice the 5e-4 of the 2,500-step
# recipes/wiki-small-topics.yaml and half wiki-small's own 2e-3 (a choice, not tuned)
FINE_TUNE_LR = 1e-3


def _cpu() -> float:
    return time.process_time()


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}"


def _file_tag(dataset: str, fraction: float) -> str:
    """``wiki-vital-10``: the corpus (a local file: its name) and the label share, safe in a file name."""
    return re.sub(r"[^\w.-]+", "_", Path(dataset).name) + f"-{_percent(fraction)}"


@dataclass(frozen=True)
class Start:
    """Where the models begin: ``preset`` from scratch, or the ``diffusion`` and ``ar`` checkpoint folders
    (``name``, ``ar_name``: as the flags named them, for the rows and the report)."""

    preset: str | None
    diffusion: str | None = None
    ar: str | None = None
    name: str | None = None
    ar_name: str | None = None

    @property
    def pretrained(self) -> bool:
        return self.diffusion is not None

    def checkpoint(self, objective: str) -> str | None:
        return self.diffusion if objective == "diffusion" else self.ar


# the classifiers an experiment can train and score (``--classifiers``): the two generative ones, the discriminative
# baseline(s) and the class-conditional token counts
CLASSIFIERS = ("diffusion", "ar", "discriminative", "unigram", "label-slot")
KINDS = {"diffusion": "a masked LM (diffusion), such as wiki-small", "ar": "a causal LM (AR), such as wiki-small-ar"}


def _start_checkpoint(name: str, flag: str, objective: str) -> str:
    """The folder of a start checkpoint; a missing one or one of the other objective is refused before any
    training, in one line."""
    path = resolve_checkpoint(name, flag)
    if not (Path(path) / "config.json").is_file():
        raise UsageError(f"{flag} {name!r} is neither a bundled model ({', '.join(BUNDLED)}) nor a local model "
                         "directory.", field=flag[2:].replace("-", "_"), value=name)
    found = checkpoint_objective(path)
    if found != objective:
        raise UsageError(f"{flag} {name!r} is {KINDS[found].split(',')[0]}; it takes {KINDS[objective]}.",
                         field=flag[2:].replace("-", "_"), value=name)
    return path


def start_of(args) -> Start:
    if not args.start_from:
        return Start(args.preset)
    return Start(None, _start_checkpoint(args.start_from, "--start-from", "diffusion"),
                 _start_checkpoint(args.ar_start_from, "--ar-start-from", "ar"), args.start_from, args.ar_start_from)


def learning_rate(args, start: Start) -> float:
    """The generative models' peak learning rate, and the pretrained discriminative one's."""
    return args.learning_rate or (FINE_TUNE_LR if start.pretrained else SCRATCH_LR)


def _train_generative(args, start: Start, dataset: str, column: str, excluded: list[str], objective: str,
                      fraction: float, work: Path, label_target: float = 0.0, label_target_weight: float = 10.0
                      ) -> tuple[Path, float]:
    out = work / f"{objective}{'-label-slot' if label_target else ''}-{_percent(fraction)}"
    checkpoint = start.checkpoint(objective)
    # a fine-tune keeps the corruption its start was trained with (wiki-small: a level per example)
    model = ({"preset": start.preset} if checkpoint is None else
             {"model_name": checkpoint, **asdict(DiffusionConfig.from_pretrained(checkpoint).corruption)})
    t0 = _cpu()
    run_training(TrainArgs(objective=objective, **model, dataset=dataset, label_column=column, exclude_labels=excluded,
                           label_fraction=fraction, unlabelled="drop" if start.pretrained else "masked",
                           label_target=label_target, label_target_weight=label_target_weight,
                           **({} if args.cfg_scales else {"label_dropout": 0.0}),  # no guidance: every label teaches
                           max_steps=args.train_steps, eval_steps=args.train_steps,
                           eval_blocks=32, batch_size=args.batch_size, learning_rate=learning_rate(args, start),
                           max_length=args.max_length, output_dir=str(out), precision="fp32", seed=args.seed,
                           logging_steps=max(1, args.train_steps // 4), save_total_limit=1))
    return out, _cpu() - t0


def _discriminatives(args, start: Start) -> list[tuple[str, str, dict]]:
    """(key for file names, row name, train_sequence_classifier settings) of each discriminative baseline."""
    if not start.pretrained:
        return [("discriminative", "discriminative (same encoder)", {"preset": start.preset, "learning_rate": SCRATCH_LR})]
    return [("discriminative-pretrained", f"discriminative ({start.name} encoder + new head)",
             {"preset": None, "init_from": start.diffusion, "learning_rate": learning_rate(args, start)}),
            ("discriminative-scratch", f"discriminative ({start.name} size, from scratch)",
             {"preset": None, "init_from": start.diffusion, "load_weights": False, "learning_rate": SCRATCH_LR})]


def _evaluate(probabilities: np.ndarray, truth: np.ndarray, labels: list[str], path: Path, title: str) -> dict:
    metrics = classification_metrics(probabilities, truth)
    metrics["per_class_recall"] = dict(zip(labels, metrics.pop("recall")))
    plot_confusion(np.array(metrics["confusion"]), labels, path, title)
    return metrics


def _row(dataset: str, fraction: float, classifier: str, train_cpu: float, classify_cpu: float, texts: int,
         metrics: dict, **more) -> dict:
    print(f"  {dataset}-{_percent(fraction)} {classifier}: accuracy {metrics['accuracy']:.3f}, macro-F1 "
          f"{metrics['macro_f1']:.3f}, ECE {metrics['ece']:.3f}", flush=True)
    return {"dataset": dataset, "label_fraction": fraction, "classifier": classifier, "train_cpu_s": train_cpu,
            "classify_cpu_s": classify_cpu, "classify_cpu_s_per_text": classify_cpu / texts, **more, **metrics}


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
    head = ("| corpus | labels used | classifier | accuracy | macro-F1 | ECE | train CPU s | classify CPU s "
            "| classify CPU ms / text |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    body = [f"| {r['dataset']} | {_percent(r['label_fraction'])}% | {r['classifier']} | {r['accuracy']:.3f} "
            f"| {r['macro_f1']:.3f} | {r['ece']:.3f} | {r['train_cpu_s']:.0f} | {r['classify_cpu_s']:.1f} "
            f"| {1000 * r['classify_cpu_s_per_text']:.2f} |" for r in rows]
    return "\n".join([head] + body)


def _recall_table(rows: list[dict]) -> str:
    """Recall per class, one table per corpus (its classes as columns)."""
    parts = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == dataset]
        classes = list(mine[0]["per_class_recall"])
        parts += [f"**{dataset}**", "", "| labels used | classifier | " + " | ".join(classes) + " |",
                  "| --- | --- |" + " --- |" * len(classes)]
        parts += [f"| {_percent(r['label_fraction'])}% | {r['classifier']} | "
                  + " | ".join("-" if v is None else f"{v:.2f}" for v in r["per_class_recall"].values()) + " |"
                  for r in mine]
        parts.append("")
    return "\n".join(parts)


def _datasets(args) -> list[tuple[str, str, list[str], Corpus]]:
    """(corpus, column, its excluded classes, the corpus without them) of each --datasets entry; fails fast
    (a bad column, a single class, an excluded class that is in none of them) before anything trains."""
    out, classes = [], set()
    for spec in args.datasets:
        dataset, _, column = spec.partition(":")
        if not column:
            raise UsageError(f"--datasets {spec!r}: write corpus:label_column, e.g. austen:book.")
        corpus = load_corpus(dataset, label_column=column)
        classes |= set(corpus.label_set)
        excluded = [c for c in args.exclude_labels if c in corpus.label_set]
        out.append((dataset, column, excluded, corpus.without_labels(excluded, "--exclude-labels") if excluded else corpus))
    unknown = sorted(set(args.exclude_labels) - classes)
    if unknown:
        raise UsageError(f"--exclude-labels {unknown[0]!r} is a class of none of --datasets {args.datasets}.",
                         field="exclude_labels", value=unknown[0])
    return out


def run_classify(args, out: Path) -> dict:
    from transformers import AutoTokenizer

    start = start_of(args)  # a bad start checkpoint fails here, before any training
    datasets = _datasets(args)
    work = Path(tempfile.mkdtemp(prefix="textdiffusion-classify-"))
    rows, guidance = [], []
    try:
        for dataset, column, excluded, corpus in datasets:
            labels = corpus.label_set
            index = {c: i for i, c in enumerate(labels)}
            keep = np.linspace(0, len(corpus.validation) - 1, min(args.eval_texts, len(corpus.validation))).round().astype(int)
            texts = [corpus.validation[i] for i in keep]
            truth = np.array([index[corpus.validation_labels[i]] for i in keep])
            print(f"\n== {dataset} / {column}: {len(labels)} classes, {len(corpus.train):,} training documents, "
                  f"{len(texts)} validation texts scored" + (f" (left out: {', '.join(excluded)})" if excluded else ""),
                  flush=True)
            for fraction in args.label_fractions:
                tag = _file_tag(dataset, fraction)
                models = {}
                for objective in (o for o in ("diffusion", "ar") if o in args.classifiers):
                    checkpoint, train_cpu = _train_generative(args, start, dataset, column, excluded, objective,
                                                              fraction, work / tag)
                    models[objective] = checkpoint
                    scorer = load_scorer(str(checkpoint))
                    t0 = _cpu()
                    result = scorer.classify(texts, samples=args.nelbo_samples, seed=args.seed)
                    classify_cpu = _cpu() - t0
                    name = "diffusion (NELBO)" if objective == "diffusion" else "AR (exact NLL)"
                    if start.pretrained:
                        name += f", from {start.name if objective == 'diffusion' else start.ar_name}"
                    metrics = _evaluate(result.probabilities.numpy(), truth, labels, out / f"confusion-{tag}-{objective}.png",
                                        f"{name}, {dataset}, {_percent(fraction)}% labels")
                    rows.append(_row(dataset, fraction, name, train_cpu, classify_cpu, len(texts), metrics))
                if "label-slot" in args.classifiers:  # the same fine-tune, the label also a target; one pass a block
                    checkpoint, train_cpu = _train_generative(args, start, dataset, column, excluded, "diffusion",
                                                              fraction, work / tag, label_target=args.label_target,
                                                              label_target_weight=args.label_target_weight)
                    t0 = _cpu()
                    result = load_scorer(str(checkpoint)).label_slot(texts)
                    classify_cpu = _cpu() - t0
                    name = "diffusion (label slot, one pass)" + (f", from {start.name}" if start.pretrained else "")
                    metrics = _evaluate(result.probabilities.numpy(), truth, labels,
                                        out / f"confusion-{tag}-label-slot.png",
                                        f"{name}, {dataset}, {_percent(fraction)}% labels")
                    rows.append(_row(dataset, fraction, name, train_cpu, classify_cpu, len(texts), metrics))
                # the discriminative models and the counts read the start's tokenizer (from scratch: the run's)
                tokenizer = AutoTokenizer.from_pretrained(start.diffusion or str(models["diffusion"]))
                labelled = kept_labels(len(corpus.train), fraction, args.seed)  # the documents whose label is used
                train_texts = [t for t, k in zip(corpus.train, labelled) if k]
                train_labels = [c for c, k in zip(corpus.train_labels, labelled) if k]
                judge = None  # the first discriminative model judges the guided samples
                for key, name, settings in _discriminatives(args, start) if "discriminative" in args.classifiers else []:
                    t0 = _cpu()
                    disc = train_sequence_classifier(tokenizer, texts=train_texts, labels=train_labels, label_set=labels,
                                                     steps=args.train_steps, batch_size=args.batch_size,
                                                     max_length=args.max_length, seed=args.seed, **settings)
                    train_cpu = _cpu() - t0
                    t0 = _cpu()
                    probs = predict_proba(disc, tokenizer, texts, args.max_length).numpy()
                    classify_cpu = _cpu() - t0
                    metrics = _evaluate(probs, truth, labels, out / f"confusion-{tag}-{key}.png",
                                        f"{name}, {dataset}, {_percent(fraction)}% labels")
                    rows.append(_row(dataset, fraction, name, train_cpu, classify_cpu, len(texts), metrics,
                                     labelled_documents=len(train_texts)))
                    if judge is None:
                        judge = disc
                if "unigram" in args.classifiers:
                    t0 = _cpu()
                    probs = unigram_bayes(tokenizer, train_texts, train_labels, labels, texts).numpy()
                    cpu = _cpu() - t0
                    metrics = _evaluate(probs, truth, labels, out / f"confusion-{tag}-unigram.png",
                                        f"class-conditional unigram, {dataset}, {_percent(fraction)}% labels")
                    rows.append(_row(dataset, fraction, "class-conditional unigram (counts)", cpu, 0.0, len(texts), metrics))
                if fraction == 1.0 and args.cfg_scales:
                    guidance += _guidance(args, models["diffusion"], judge, labels, out, dataset)
                shutil.rmtree(work / tag, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if guidance:
        _plot_guidance(guidance, out / "guidance.png")
    _write_report(args, start, out, rows, guidance, {d: e for d, _, e, _ in datasets if e})
    return {"rows": rows, "guidance": guidance}


def _write_report(args, start: Start, out: Path, rows: list[dict], guidance: list[dict],
                  excluded: dict[str, list[str]]) -> None:
    lr = learning_rate(args, start)
    if start.pretrained:
        models = (f"The diffusion model is fine-tuned from `{start.name}` and the AR model from `{start.ar_name}` (each "
                  "with its start's tokenizer, the label tokens added as new embeddings, and its start's corruption "
                  f"settings), at peak learning rate {lr:g}; the discriminative baseline is `{start.name}`'s encoder "
                  f"with a new head (learning rate {lr:g}) and, beside it, the same architecture from scratch "
                  f"({SCRATCH_LR:g}). Every model trains")
    else:
        models = (f"Preset `{start.preset}` for every model, learning rate {lr:g} for the generative models and "
                  f"{SCRATCH_LR:g} for the discriminative one; each trains")
    left_out = "; ".join(f"{d}: {', '.join(e)}" for d, e in excluded.items())
    lines = ["# Generative classification vs a discriminative baseline", "",
             f"{models} {args.train_steps} steps of {args.batch_size} blocks/documents of up to {args.max_length} "
             f"tokens each; {args.eval_texts} evenly spaced validation documents per corpus (at most)"
             + (f", classes left out ({left_out})" if left_out else "") + ". "
             + (f"The diffusion NELBO is estimated from {args.nelbo_samples} mask draws per text shared by all labels. "
                if "diffusion" in args.classifiers else "")
             + (f"The label-slot model is the same diffusion fine-tune with `--label-target {args.label_target:g}` (the label "
                f"also masked and predicted, weight {args.label_target_weight:g}): it "
                "classifies in one pass, by the label it predicts at its slot. "
                if "label-slot" in args.classifiers else "") +
             "ECE: 10 equal-width confidence bins. CPU seconds are process CPU time (training includes loading, "
             "tokenizing and two validation passes; the counts' CPU time is counting and scoring together). With a "
             "share of the labels " + ("every model sees only the labelled share (the fine-tuned generative ones: "
             "`--unlabelled drop`; their starts already read all the text)" if start.pretrained else
             "the generative models also read the rest of the training text with the label masked; the "
             "discriminative models and the unigram counts see only the labelled share") + ".",
             "", _table(rows), "", "## Recall per class", "", _recall_table(rows),
             "Confusion matrices: `confusion-<corpus>-<labels %>-<classifier>.png`."]
    if guidance:
        lines += ["", "## Label-guided generation", "",
                  f"{args.guidance_samples} samples of {args.new_tokens} tokens per label, {args.steps} denoising steps, "
                  "from the all-labels diffusion model; judged by the all-labels discriminative model. `guidance.png`.", "",
                  "| corpus | cfg scale | classified as asked | mean p(asked) | distinct-2 | CPU s |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {g['dataset']} | {g['cfg_scale']:g} | {g['classified_as_asked']:.3f} | {g['mean_p_asked']:.3f} | "
                  f"{g['distinct-2']:.3f} | {g['cpu_seconds']:.1f} |" for g in guidance]
        lines += ["", "First sample at each scale:", ""] + [f"- {g['dataset']} s={g['cfg_scale']:g}: {g['example']}" for g in guidance]
    (out / "results.md").write_text("\n".join(lines) + "\n")
