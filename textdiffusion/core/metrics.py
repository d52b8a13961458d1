"""Diversity metrics of generated text: the numbers that expose degenerate, repetitive samples.

A low generative perplexity is easy to get by repeating one phrase ("music, music, music"), so samples
are always judged with these beside it: distinct-n (unique n-grams / all n-grams, over a set of
samples), the repetition rate (share of n-grams that already occurred earlier in the same sample), and
the unigram entropy of the tokens. Computed on token ids of one tokenizer so the reference row (real text)
is measured the same way.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence


def ngrams(tokens: Sequence, n: int) -> list[tuple]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[Sequence], n: int) -> float:
    """Unique n-grams over all samples / total n-grams (Li et al., 2016). 1.0 = no n-gram repeats."""
    grams = [g for s in samples for g in ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(samples: Sequence[Sequence], n: int = 2) -> float:
    """Share of n-grams that repeat an earlier n-gram of the same sample (0 = none)."""
    repeated = total = 0
    for s in samples:
        grams = ngrams(s, n)
        repeated += len(grams) - len(set(grams))
        total += len(grams)
    return repeated / total if total else 0.0


def doubled_rate(samples: Sequence[Sequence]) -> float:
    """Share of adjacent pairs that are the same token twice ("the the"): an error diffusion samples show and
    left-to-right models rarely do, so it is worth counting apart from n-gram repetition."""
    doubled = total = 0
    for s in samples:
        doubled += sum(a == b for a, b in zip(s, s[1:]))
        total += max(len(s) - 1, 0)
    return doubled / total if total else 0.0


def unigram_entropy_bits(samples: Sequence[Sequence]) -> float:
    """Entropy (bits) of the token distribution pooled over the samples."""
    counts = Counter(t for s in samples for t in s)
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def diversity(samples: Sequence[Sequence]) -> dict[str, float]:
    return {"distinct-1": distinct_n(samples, 1), "distinct-2": distinct_n(samples, 2), "distinct-3": distinct_n(samples, 3),
            "repetition-2": repetition_rate(samples, 2), "entropy-bits": unigram_entropy_bits(samples)}
