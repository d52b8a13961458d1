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


def resolve_checkpoint(name_or_path: str) -> str:
    """A bundled model's directory for its short name; anything else unchanged (a path or a hub id).

    A local directory of the same name wins, so ``runs/wiki-small`` style paths are never shadowed.
    """
    if name_or_path not in BUNDLED or Path(name_or_path).exists():
        return name_or_path
    path = bundled_path(name_or_path)
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise UsageError(
            f"--checkpoint {name_or_path!r} is the bundled model, but its files are missing from {path}. Rebuild it "
            f"with its recipe: `textdiffusion train --config {BUNDLED[name_or_path]} --output-dir runs/{name_or_path}`, "
            f"then `python benchmarks/export_bundled.py --run runs/{name_or_path} --name {name_or_path}` "
            f"(or pass --checkpoint runs/{name_or_path} directly).")
    return str(path)
