"""Shared fixtures: a small real tokenizer and real tokenised text, built once per session, offline."""

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from textdiffusion.core.data import load_corpus, pack
from textdiffusion.models.presets import train_bpe_tokenizer

# The longest files, longest first (seconds on one core, from `pytest --durations=40`): `make test` runs files
# whole on each worker (--dist loadfile) in collection order (--no-loadscope-reorder; xdist's own order is by the
# number of tests, which put the one-test end-to-end files last and left one worker finishing them alone).
LONGEST_FIRST = ["test_howto.py", "test_deploy.py", "test_benchmarks.py", "test_resume.py", "test_quality.py",
                 "test_bundled.py", "test_guidance.py", "test_block_encoder.py", "test_serve_browser.py",
                 "test_classify.py", "test_gpu_models.py", "test_launch_configs.py", "test_quickstart.py", "test_adapt.py",
                 "test_serve.py", "test_train.py", "test_repeated_data.py", "test_distill.py", "test_serve_door.py",
                 "test_sampler.py", "test_experiments.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order


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
