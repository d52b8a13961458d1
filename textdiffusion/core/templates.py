"""The template syntax: text with masked spans ``<mask:N>`` (N positions) or ``<mask>`` (one).

A prompt is the special case of a template whose only span is the rest of the block. The generator encodes
templates (``pipelines.generation``), the server checks their spans against the model's positions, and the
guidance check asks whether any text is left around the spans — all through this one pattern."""

import re

MASK_SPAN = re.compile(r"<mask(?::(\d+))?>")
