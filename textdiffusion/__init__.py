"""textdiffusion: train a masked language model as a discrete text diffusion model, and generate with it.

Modules, one idea each: ``schedules`` (alpha(t) and the ELBO weight), ``collator`` (what gets masked),
``data`` (corpora, packing), ``modeling`` (models, presets, tokenizers), ``objective`` (the loss),
``evaluation`` (per-mask-level loss, NELBO), ``train`` (the Trainer layer), ``sampler`` (the denoising
decisions), ``generation`` (DiffusionGenerator), ``metrics`` (diversity), ``cli`` (the command line).
"""

__version__ = "0.1.0"
