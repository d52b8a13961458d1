"""Models shipped inside the package, loadable by a short name (``--checkpoint wiki-small``).

Without network access no pretrained masked LM can be downloaded, so the project ships its own small
diffusion model, trained by its own ``train`` command from ``recipes/<name>.yaml``. A short name that
is bundled but whose weights are missing (a clone without the file, say) gets an error that says how
to rebuild it, rather than a confusing attempt to reach the Hugging Face Hub.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError

MODELS_DIR = Path(__file__).resolve().parent / "models"
BUNDLED = {"wiki-small": "recipes/wiki-small.yaml"}


def bundled_path(name: str) -> Path:
    return MODELS_DIR / name


def resolve_checkpoint(name_or_path: str, flag: str = "--checkpoint") -> str:
    """A bundled model's directory for its short name; anything else unchanged (a path or a hub id).

    A local directory of the same name wins, so ``runs/wiki-small`` style paths are never shadowed. A
    pretrained encoder's short name (``mpnet-base``, see pretrained.py) resolves to its cache folder.
    """
    from .pretrained import PRETRAINED, require_fetched

    if name_or_path in PRETRAINED and not Path(name_or_path).exists():
        return str(require_fetched(name_or_path, flag))
    if name_or_path not in BUNDLED or Path(name_or_path).exists():
        return name_or_path
    path = bundled_path(name_or_path)
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise UsageError(
            f"--checkpoint {name_or_path!r} is the bundled model, but its files are missing from {path}. Rebuild it "
            f"with its recipe: `textdiffusion train --config {BUNDLED[name_or_path]} --output-dir runs/{name_or_path}`, "
            f"then `python -m textdiffusion.bundled --run runs/{name_or_path} --name {name_or_path}` "
            f"(or pass --checkpoint runs/{name_or_path} directly).")
    return str(path)


# -- building the bundled copy from a training run ----------------------------------------------------
MAX_BUNDLED_MB = 30
# what travels with the weights: the tokenizer, the diffusion settings, and the run's own record of
# training (so `experiment levels --checkpoint wiki-small` works on the bundled copy too)
RUN_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "diffusion_config.json",
             "run_args.json", "references.json", "per_level_loss.csv", "per_level_loss.png", "validation_curve.csv")


def export_bundled(run_dir: str, name: str, dest: Path | None = None, max_mb: float | None = MAX_BUNDLED_MB) -> Path:
    """Save a run's final (validation-best) model as fp16 safetensors under ``textdiffusion/models/<name>``
    (or ``dest``; ``max_mb=None`` lifts the size cap for a model that is not shipped, such as an mpnet fine-tune).

    The model card (README.md) already in the destination is kept: it is written by hand from
    `textdiffusion eval` and the samples, and this only replaces the weights and run files.
    """
    import shutil

    import torch
    from transformers import AutoModelForMaskedLM

    run = Path(run_dir)
    if not (run / "model.safetensors").exists():
        raise UsageError(f"--run {run_dir!r} holds no model.safetensors: pass the output dir of a finished run.")
    dest = dest or bundled_path(name)
    staging = dest.with_name(dest.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    model = AutoModelForMaskedLM.from_pretrained(run, dtype=torch.float32)
    model.to(torch.float16).save_pretrained(staging, safe_serialization=True)
    for f in RUN_FILES:
        if (run / f).exists():
            shutil.copy2(run / f, staging / f)
    if (dest / "README.md").exists():
        shutil.copy2(dest / "README.md", staging / "README.md")
    size_mb = (staging / "model.safetensors").stat().st_size / 2**20
    if max_mb is not None and size_mb > max_mb:
        shutil.rmtree(staging)
        raise UsageError(f"the fp16 weights are {size_mb:.1f} MB, over the {max_mb} MB a bundled model may take.")
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)
    print(f"bundled {name}: {dest} ({size_mb:.1f} MB fp16 safetensors)")
    return dest


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m textdiffusion.bundled",
                                 description="Export a training run as a bundled model (fp16 safetensors).")
    ap.add_argument("--run", required=True, help="Output dir of `textdiffusion train`.")
    ap.add_argument("--name", required=True, help=f"The bundled name ({', '.join(sorted(BUNDLED))}), or any name with --dest.")
    ap.add_argument("--dest", default=None, help="Export into this folder instead of textdiffusion/models/NAME.")
    ap.add_argument("--no-size-limit", action="store_true", help=f"Allow more than {MAX_BUNDLED_MB} MB (with --dest).")
    args = ap.parse_args(argv)
    try:
        if args.dest is None and args.name not in BUNDLED:
            raise UsageError(f"--name must be one of {sorted(BUNDLED)} without --dest, got {args.name!r}.")
        export_bundled(args.run, args.name, Path(args.dest) if args.dest else None,
                       None if args.no_size_limit and args.dest else MAX_BUNDLED_MB)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
