"""Token ids back to text that reads like text, and the tokenizer-independent units of a text.

A byte-level BPE tokenizer (the presets, RoBERTa) decodes exactly. A WordPiece tokenizer (BERT, MPNet)
does not: it splits punctuation off and lowercases, so ``decode`` gives "india ' s capital ( delhi ) is
well - known" even with ``clean_up_tokenization_spaces``. ``decode_text`` joins what WordPiece split
(contractions, brackets, hyphens, quotes, decimals) so samples read as text and so words and bytes —
the units of ``text_units``, by which models with different tokenizers are compared — are counted on
the text a reader would see.
"""

from __future__ import annotations

import re

_RULES = [
    (re.compile(r"\s*'\s*(s|t|re|ve|m|ll|d)\b"), r"'\1"),  # india ' s -> india's, don ' t -> don't
    (re.compile(r"\s+([.,!?;:%)\]}])"), r"\1"),  # no space before closing punctuation
    (re.compile(r"([(\[{$])\s+"), r"\1"),  # nor after an opening bracket
    (re.compile(r"(\w)\s*([-–])\s*(?=\w)"), r"\1\2"),  # well - known -> well-known; 1931 – 32 -> 1931–32 (as
    # most en dashes of wiki-vital are: 935 unspaced to 203 spaced)
    (re.compile(r"(\d)\.\s+(?=\d)"), r"\1."),  # 3. 5 -> 3.5
    (re.compile(r"(\d),\s+(?=\d{3}\b)"), r"\1,"),  # 3, 000 -> 3,000
    (re.compile(r'"\s*([^"]*?)\s*"'), r'"\1"'),  # " quoted " -> "quoted"
]


def is_wordpiece(tokenizer) -> bool:
    """True for a WordPiece tokenizer (continuation pieces start with ##), whose decode needs tidying."""
    cached = getattr(tokenizer, "_textdiffusion_wordpiece", None)
    if cached is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            cached = type(backend.model).__name__ == "WordPiece"
        else:
            cached = any(piece.startswith("##") for piece in list(tokenizer.get_vocab())[:5000])
        tokenizer._textdiffusion_wordpiece = cached
    return cached


def tidy_wordpiece(text: str) -> str:
    """Join the pieces a WordPiece decode leaves apart (see the module docstring)."""
    for pattern, repl in _RULES:
        text = pattern.sub(repl, text)
    return text


def decode_text(tokenizer, ids) -> str:
    """Text of token ``ids`` (special tokens dropped), as a reader should see it."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=is_wordpiece(tokenizer))
    return tidy_wordpiece(text) if is_wordpiece(tokenizer) else text


def text_units(tokenizer, blocks, scored) -> tuple[int, int]:
    """(words, UTF-8 bytes) of the text of the ``scored`` ([n, l] bool) tokens of ``blocks`` ([n, l]):
    the denominators of nats per word and bits per byte. Words are whitespace-separated; the text of
    each block is decoded on its own, documents in it joined by a space."""
    words = nbytes = 0
    for row, keep in zip(blocks.tolist(), scored.tolist()):
        runs, run = [], []
        for token, k in zip(row + [None], keep + [False]):  # a run of scored tokens ends at a separator
            if k:
                run.append(token)
            elif run:
                runs.append(decode_text(tokenizer, run).strip())
                run = []
        text = " ".join(r for r in runs if r)
        words += len(text.split())
        nbytes += len(text.encode("utf-8"))
    return words, nbytes
