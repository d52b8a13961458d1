"""Class-conditional text: each document becomes ``<label> text``, the label a protected prefix.

    textdiffusion train --preset micro --dataset austen --label-column book   # one model of p(text | book)

How a label enters the model. Every label is one added *special* token, ``<label:Emma>``, so that

* a block is ``[cls] <label:X> text... [sep] [sep]...``: the label always sits at position 1, and the
  protected prefix (``prefix_length`` 2: the block opener and the label) keeps it from ever being masked;
* the collator also protects it anywhere (it protects every special token), the likelihoods never score
  it (``scored_positions`` skips special tokens) and decoding drops it;
* every label is one position, so the blocks of one text under different labels differ in one token and
  the same mask draw applies to all of them (``classify.py`` relies on that).

Why one document per block. Unlabelled training packs many documents into a block, and a per-document
label in the middle of a block would need its own protection span and would let a text see the *next*
document's label. ``pack_labelled`` is simpler and exact instead: each document opens its own block
(a long one continues in further blocks, each opening with the same label), and the rest of the block
is end-of-text (as ``pack``'s ``doc_end_fraction`` 1.0), so the model also learns where a text stops.
The price is padding; the bundled corpora's paragraphs fill most of a 128-token block.

An unlabelled document (``label_dropout``, or a label withheld by ``train --label-fraction``) puts the
mask token at position 1: the model learns p(text) with the label unknown too. That is the
unconditional pass of classifier-free guidance (``generate --label X --cfg-scale s`` masks the label
out), and it lets a generative model learn from text whose label it does not have.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from textdiffusion.core.data import boundary_ids
from textdiffusion.core.templates import MASK_SPAN
from textdiffusion.errors import UsageError

LABEL_POSITION = 1  # after the block-opening token
LABEL_PREFIX_LENGTH = 2  # [cls] <label:X>: the protected prefix of a labelled block


def label_token(label: str) -> str:
    """The added token that stands for ``label``."""
    return f"<label:{label}>"


def add_label_tokens(tokenizer, labels: Sequence[str]) -> list[int]:
    """Add one special token per label to ``tokenizer`` (if missing) and return their ids, in order."""
    vocab = tokenizer.get_vocab()
    tokens = [label_token(c) for c in labels if label_token(c) not in vocab]
    if tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    return label_token_ids(tokenizer, labels)


def label_token_ids(tokenizer, labels: Sequence[str]) -> list[int]:
    """The token id of each label; a tokenizer without them was not trained with these labels."""
    vocab = tokenizer.get_vocab()
    missing = [c for c in labels if label_token(c) not in vocab]
    if missing:
        raise UsageError(f"the tokenizer has no token for the label(s) {missing!r}: the checkpoint was not trained "
                         "with them (train --label-column).")
    return [vocab[label_token(c)] for c in labels]


def check_labels(known: Sequence[str] | None, asked: Sequence[str], flag: str, checkpoint: str) -> None:
    """Refuse labels the model never saw (or a model trained without labels)."""
    field = flag.strip("-`").replace("-", "_")  # --label or `label`: label
    if not known:
        raise UsageError(f"{flag}: checkpoint {checkpoint!r} was not trained with labels "
                         "(train it with --label-column COL).", field=field, value=asked[0] if asked else None)
    unknown = sorted(set(asked) - set(known))
    if unknown:
        raise UsageError(f"{flag} {unknown[0]!r} is a label the model never saw (its labels: {list(known)}).",
                         field=field, value=unknown[0])


def check_guidance(scale: float, flag: str, texts: Sequence[str] | None = None,
                   labels: Sequence[str] | None = None) -> None:
    """Refuse classifier-free guidance that cannot apply (``generate --cfg-scale``, the server's ``cfg_scale``).

    Guidance contrasts the model given its condition (the label token and any prompt or template text)
    with the model given the same block with the condition masked out (LLaDA's form, ``unc + (1 + s)(cond
    - unc)``). A negative or non-finite scale has no meaning there. With no condition at all (no label and
    no text around the masked spans: a model trained without labels, asked for text from nothing) the two
    passes are the same block, so a nonzero scale would change nothing and only double the cost.
    ``texts``: the prompts or templates as given to the generator (None: check the scale alone, before a
    model is loaded); ``labels``: the checkpoint's (``DiffusionConfig.labels``), for the message.
    """
    import math

    field = flag.strip("-`").replace("-", "_")  # --cfg-scale or `cfg_scale`: cfg_scale
    if not math.isfinite(scale) or scale < 0:
        raise UsageError(f"{flag} must be a finite number >= 0 (0: off), got {scale!r}.", field=field, value=scale)
    if not scale or texts is None:
        return
    if not any(MASK_SPAN.sub("", t).strip() for t in texts):
        why = "the model has no labels (trained without --label-column)" if not labels else "no label was given"
        raise UsageError(f"{flag} {scale:g} cannot apply: {why} and there is no prompt text, so there is nothing to "
                         f"guide by (the unconditional pass would be the same block); give a prompt"
                         f"{' or a label' if labels else ''}, or leave {flag} at 0.", field=field, value=scale)


def pack_labelled(docs: Sequence[str], label_ids: Sequence[int | None], tokenizer, block_length: int,
                  mask_token_id: int | None = None, pad_with_eos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One document per block: ``[cls] <label> tokens... [sep] [sep]...`` of exactly ``block_length``.

    ``label_ids[i]`` is document i's label token, or None for an unlabelled document (the mask token
    then stands in its place). A document longer than a block continues in the next block, which again
    opens with its label. The tail of a block is end-of-text (``pad_with_eos``) or padding. Returns the
    blocks [n, block_length] and the index of the document each block came from [n].
    """
    cls, sep = boundary_ids(tokenizer)
    if cls is None or sep is None:
        raise UsageError("labelled training needs a tokenizer with a block-opening and an end-of-text token.")
    inner = block_length - 3  # [cls] <label> ... [sep]
    if inner < 1:
        raise UsageError(f"--max-length {block_length} is too short to hold a label and any text.")
    fill = sep if pad_with_eos else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sep)
    ids = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    rows, owner = [], []
    for i, (tokens, label) in enumerate(zip(ids, label_ids)):  # once per document, while preparing data
        label = mask_token_id if label is None else label
        if label is None:
            raise UsageError("an unlabelled document needs the mask token to stand for its label.")
        for start in range(0, max(len(tokens), 1), inner):
            chunk = tokens[start:start + inner]
            if not chunk:
                continue
            row = np.full(block_length, fill, dtype=np.int64)
            row[0], row[LABEL_POSITION] = cls, label
            row[2:2 + len(chunk)] = chunk
            row[2 + len(chunk)] = sep
            rows.append(row)
            owner.append(i)
    if not rows:
        return torch.zeros((0, block_length), dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.from_numpy(np.stack(rows)), torch.tensor(owner)  # [n, l], [n]


def kept_labels(n: int, fraction: float, seed: int) -> np.ndarray:
    """[n] bool: the documents whose label training may use (``train --label-fraction``: a label budget).
    The same draw for every objective, so the discriminative baseline gets the same labelled documents."""
    return np.random.default_rng(seed).random(n) < fraction


def dropped_labels(n: int, dropout: float, seed: int) -> np.ndarray:
    """[n] bool: labelled documents trained with the label masked anyway (``--label-dropout``), so the
    unconditional model that guidance needs is learned even when every label is known."""
    return np.random.default_rng(seed + 1).random(n) < dropout
