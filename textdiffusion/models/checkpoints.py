"""Checkpoints that survive a crash: written aside and renamed into place, checked before they are trusted.

A ``kill -9`` or a full disk during a save must never leave a folder that looks like a checkpoint but is
not one. So a checkpoint is written to ``.checkpoint-N.partial`` and renamed to ``checkpoint-N`` only when
every file is in it (a rename within one directory is atomic). ``--resume`` still checks what it finds —
a truncated weights file can come from elsewhere (a copy, a sync) — and falls back to the newest good one
with a warning that names what it skipped.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from textdiffusion.config import DiffusionConfig
from textdiffusion.errors import UsageError

logger = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
PARTIAL_SUFFIX = ".partial"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def check_weights_file(path: Path) -> str | None:
    """Why the safetensors file at ``path`` cannot be used (None if it can): the header must parse and the
    file must be as long as the header says, which catches a save cut short."""
    from safetensors import safe_open

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                return f"it is truncated ({size:,} bytes, too short for its own header)"
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            return f"it is truncated ({size:,} bytes of {8 + header_len + end:,})"
        with safe_open(str(path), framework="pt"):
            pass
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"it cannot be read ({str(e).splitlines()[0][:120]})"
    except Exception as e:  # safetensors raises its own SafetensorError for a corrupt header
        return f"it cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a usable training checkpoint (None if it is)."""
    if not (folder / "trainer_state.json").is_file():
        return "no trainer_state.json (the save did not finish)"
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "an unreadable trainer_state.json"
    weights = folder / "model.safetensors"
    if not weights.is_file():
        return "no model.safetensors"
    problem = check_weights_file(weights)
    return f"model.safetensors: {problem}" if problem else None


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``checkpoint-N`` in ``run_dir``, oldest first."""
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted(found)


def newest_good_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that passes ``checkpoint_problem``; a warning for each newer one skipped."""
    for _step, folder in reversed(checkpoints(run_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning("skipping %s: %s; resuming from an earlier checkpoint", folder, problem)
        print(f"warning: skipping {folder}: {problem}; resuming from an earlier checkpoint", flush=True)
    return None


def trainer_state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


def remove_partial_saves(run_dir: Path) -> None:
    """A save cut short leaves a ``.checkpoint-N.partial`` folder: never used, removed at the next start."""
    for p in run_dir.glob(f".checkpoint-*{PARTIAL_SUFFIX}"):
        shutil.rmtree(p, ignore_errors=True)


def staging_folder(final: Path) -> Path:
    return final.with_name(f".{final.name}{PARTIAL_SUFFIX}")


def require_loadable_weights(directory: str | Path, flag: str = "--checkpoint") -> None:
    """A one-line error, before any work, when a model directory's weights cannot be read."""
    directory = Path(directory)
    weights = directory / "model.safetensors"
    if directory.is_dir() and weights.is_file():
        problem = check_weights_file(weights)
        if problem:
            raise UsageError(f"{flag} {str(directory)!r}: the weights file {weights} cannot be used: {problem}.")


# -- what a checkpoint is ----------------------------------------------------------------------------
def is_causal_checkpoint(path: str) -> bool:
    """True for a directory holding a causal LM (our AR baseline or any *ForCausalLM save) that was not
    adapted to diffusion (train --adapt-from-causal: its weights are a causal LM's, but it denoises)."""
    config = Path(path) / "config.json"
    if not config.exists():
        return False
    settings = DiffusionConfig.from_pretrained(path)
    if settings.objective == "ar":
        return True
    if settings.adapted_from_causal:
        return False
    architectures = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures)


def checkpoint_objective(path: str) -> str:
    """``"ar"`` or ``"diffusion"``: the objective a checkpoint directory was trained with (a causal LM from
    elsewhere counts as ar; one adapted with --adapt-from-causal is diffusion, and its readers rebuild the
    adapted wrapper)."""
    return "ar" if Path(path).exists() and is_causal_checkpoint(path) else "diffusion"
