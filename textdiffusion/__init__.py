"""textdiffusion: train a masked language model as a discrete text diffusion model, and generate with it.

The package in layers; a module imports only from its own layer or the ones below (``.importlinter``):

* ``cli/`` — the command line: parse flags, call a pipeline, print (``textdiffusion train | generate | ...``)
* ``serving/`` (the HTTP server and its step-batching engine) and ``experiments/`` (result folders)
* ``pipelines/`` — whole jobs: training (``training``, ``trainers``, ``objectives``), generation
  (``generation``: DiffusionGenerator, ``denoising``: the one steppable denoising run), evaluation, classification
* ``models/`` — getting a model: presets, loading, heads for encoders without one, a causal LM adapted to
  diffusion, the key/value cache, the AR baseline, bundled and pretrained models, the gen-PPL scorer
* ``core/`` — the diffusion itself: the denoiser call, corruption (``collator``), the loss, the sampler,
  evaluation (per-level loss, NELBO), corpora and labels, text out
* ``config``, ``schedules``, ``errors`` — the settings and their ranges, alpha(t), the user-error type
"""

__version__ = "0.1.0"

# The public API (documented in docs/api.md): name -> the module that defines it, imported on first use so that
# ``import textdiffusion`` (and ``textdiffusion --help``) stays light.
_PUBLIC = {
    "DiffusionGenerator": "textdiffusion.pipelines.generation",
    "DenoisingRun": "textdiffusion.pipelines.denoising",
    "GenerationOutput": "textdiffusion.pipelines.denoising",
    "SamplerConfig": "textdiffusion.config",
    "DiffusionConfig": "textdiffusion.config",
    "DiffusionCollator": "textdiffusion.core.collator",
    "BlockDiffusionLM": "textdiffusion.models.block",
    "BlockKVCache": "textdiffusion.models.block",
    "BlockCorruption": "textdiffusion.models.block",
    "Scorer": "textdiffusion.models.quality",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    """``from textdiffusion import DiffusionGenerator``: the public names, imported on first use."""
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'textdiffusion' has no attribute {name!r}")
