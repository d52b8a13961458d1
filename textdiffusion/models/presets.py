"""From-scratch models: the presets (a ModernBERT configuration per size) and the byte-level BPE tokenizer
trained on the training corpus.

Why the presets are "local first". At initialisation attention is uniform, so in a global layer a masked
token's neighbours make up 1/128 of what it sees, and the gradient that would teach attention to look at
them is just as weak: trained from scratch on the small bundled corpus, a post-LN RoBERTa *and* a
ModernBERT with its stock layout (global every third layer, 128-token windows) sit on the unigram
plateau for thousands of steps. With a narrow sliding window (+-2 tokens) in the lower layers the
neighbours carry 1/5 of the signal from step one: the model learns bigram-like statistics at once and
the global layers above it build longer-range context. ``benchmarks/preset_plateau.py`` measures this.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from textdiffusion.errors import UsageError

logger = logging.getLogger(__name__)

TOKENIZER_STAMP = "textdiffusion_tokenizer.json"


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer_config.json")


SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    local_layers: int  # the lowest layers use a narrow sliding window; the rest attend globally
    local_window: int = 4  # total window of a local layer (ModernBERT's local_attention): +-2 tokens


PRESETS = {
    # "micro" exists for tests and smoke runs: two layers, seconds per hundred steps on a CPU.
    "micro": Preset(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=1024,
                    local_layers=1),
    # "mini": the data-constrained experiment's size (experiment repeated-data), ~0.8M parameters at vocab 1024
    "mini": Preset(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, vocab_size=1024,
                   local_layers=2),
    "tiny": Preset(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, vocab_size=4096,
                   local_layers=2),
    "small": Preset(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=768, vocab_size=16384,
                    local_layers=3),
    # DistilRoBERTa's size (6 x 768, a GLU as wide in weights as its 3072 MLP): the GPU benchmark's model
    "distil": Preset(hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=2048, vocab_size=32768,
                     local_layers=2),
    "base": Preset(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1152, vocab_size=32768,
                   local_layers=4),
}


# -- tokenizer --------------------------------------------------------------------------------------
def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A RoBERTa-style byte-level BPE tokenizer trained on ``texts`` with the ``tokenizers`` library."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>",
        unk_token="<unk>", pad_token="<pad>", mask_token=AddedToken("<mask>", lstrip=True, special=True),
    )


def corpus_fingerprint(texts: list[str], vocab_size: int) -> str:
    h = hashlib.sha256(str(vocab_size).encode())
    for t in texts:
        h.update(t.encode("utf-8", "replace"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def preset_tokenizer(texts: list[str], vocab_size: int, cache_dir: Path | None):
    """Train the preset tokenizer, or reuse one trained before on the same corpus at the same size: the one in
    ``cache_dir`` (the run's own), else the shared copy in ``$TEXTDIFFUSION_CACHE/tokenizers/`` that every run on
    that corpus and size reuses (BPE training is deterministic; on a large corpus it takes minutes). The result
    is kept in both."""
    import tokenizers
    from transformers import AutoTokenizer

    stamp = {"vocab_size": vocab_size, "corpus": corpus_fingerprint(texts, vocab_size)}
    shared = _shared_tokenizer_dir(stamp, tokenizers.__version__)
    found = next((d for d in (cache_dir, shared) if d is not None and _stamped(d) == stamp), None)
    if found is not None:
        logger.info("reusing the tokenizer cached in %s", found)
        tokenizer = AutoTokenizer.from_pretrained(found)
    else:
        logger.info("training a byte-level BPE tokenizer (vocab %d) on %d documents", vocab_size, len(texts))
        tokenizer = train_bpe_tokenizer(texts, vocab_size)
        _keep(tokenizer, stamp, shared)
    if cache_dir is not None and found != cache_dir:
        tokenizer.save_pretrained(cache_dir)
        (cache_dir / TOKENIZER_STAMP).write_text(json.dumps(stamp))
    return tokenizer


def _stamped(folder: Path) -> dict | None:
    stamp = folder / TOKENIZER_STAMP
    return json.loads(stamp.read_text()) if stamp.is_file() else None


def _shared_tokenizer_dir(stamp: dict, tokenizers_version: str) -> Path:
    from textdiffusion.models.pretrained import cache_root

    return cache_root() / "tokenizers" / f"bpe{stamp['vocab_size']}-{stamp['corpus']}-tokenizers{tokenizers_version}"


def _keep(tokenizer, stamp: dict, target: Path) -> None:
    """Into the shared cache (models.pretrained.keep_in_cache: a reader never sees half a tokenizer); a cache that
    cannot be written only costs the next run the training again."""
    from textdiffusion.models.pretrained import keep_in_cache

    def write(staging: Path) -> None:
        tokenizer.save_pretrained(staging)
        (staging / TOKENIZER_STAMP).write_text(json.dumps(stamp))

    if (error := keep_in_cache(target, write)) is not None:  # read-only, full, or another run's copy got there first
        logger.debug("not keeping the tokenizer in %s (%s)", target, error)


# -- model ------------------------------------------------------------------------------------------
PRESET_ARCHITECTURES = ("modernbert", "modernbert-stock", "roberta")


def build_preset_model(preset: str, tokenizer, max_length: int, dropout: float = 0.0, architecture: str = "modernbert"):
    """A randomly initialised masked LM sized by ``preset`` for ``tokenizer``.

    ``architecture="modernbert"`` (default): pre-norm, rotary positions, GLU MLP, local-first attention
    (see the module docstring). ``"modernbert-stock"``: the same with ModernBERT's own attention layout,
    and ``"roberta"``: the classic post-LN encoder of the same width and depth. Both are kept for
    comparison only: from scratch on the bundled corpus they stall at the unigram plateau.
    """
    from transformers import ModernBertConfig, ModernBertForMaskedLM, RobertaConfig, RobertaForMaskedLM

    if preset not in PRESETS:
        raise UsageError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}.")
    if architecture not in PRESET_ARCHITECTURES:
        raise UsageError(f"--architecture must be one of {PRESET_ARCHITECTURES}, got {architecture!r}.")
    p = PRESETS[preset]
    tokens = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    size = dict(hidden_size=p.hidden_size, num_hidden_layers=p.num_hidden_layers,
                num_attention_heads=p.num_attention_heads)
    if architecture == "roberta":
        # A GLU MLP of width w has as many weights as a plain MLP of width 1.5 w.
        config = RobertaConfig(**tokens, **size, intermediate_size=p.intermediate_size * 3 // 2,
                               max_position_embeddings=max(512, max_length) + 2, hidden_dropout_prob=dropout,
                               attention_probs_dropout_prob=dropout)
        return RobertaForMaskedLM(config)
    attention = {}
    if architecture == "modernbert":
        layers = ["sliding_attention"] * p.local_layers + ["full_attention"] * (p.num_hidden_layers - p.local_layers)
        attention = dict(layer_types=layers, local_attention=p.local_window)
    config = ModernBertConfig(
        **tokens, **size, intermediate_size=p.intermediate_size, max_position_embeddings=max(512, max_length),
        cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
        embedding_dropout=dropout, mlp_dropout=dropout, attention_dropout=dropout, **attention,
    )
    return ModernBertForMaskedLM(config)
