"""Shared fixtures: a small real tokenizer and real tokenised text, built once per session, offline."""

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from textdiffusion.core.data import load_corpus, pack
from textdiffusion.models.presets import train_bpe_tokenizer


@pytest.fixture(scope="session")
def wiki():
    return load_corpus("wiki-vital")


@pytest.fixture(scope="session")
def tokenizer(wiki):
    return train_bpe_tokenizer(wiki.train[:600], vocab_size=1024)


@pytest.fixture(scope="session")
def blocks(wiki, tokenizer):
    return pack(wiki.validation[:60], tokenizer, block_length=64)


@pytest.fixture
def small_jsonl(tmp_path, wiki):
    """A local corpus of 300 real documents, for fast end-to-end runs."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in wiki.train[:300]))
    return path
