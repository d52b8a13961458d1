"""A GGUF file is converted once and then loaded from the cache: the same weights and tokenizer, another file
is another entry, and a cache that cannot be written costs a conversion, never the load (a tiny Llama stands
in for transformers' slow conversion; the real SmolLM2 goes through it in the quickstart and demo tests)."""

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_adapt import save_tiny_causal
from transformers import AutoModelForCausalLM, AutoTokenizer

from textdiffusion.models import gguf


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, wiki):
    """A stand-in .gguf file, and a conversion that reads a tiny Llama instead of it and counts its calls."""
    monkeypatch.setenv("TEXTDIFFUSION_CACHE", str(tmp_path / "cache"))
    save_tiny_causal(tmp_path / "tiny", wiki.train[:50])
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF stand-in")
    calls = []

    def convert(p):
        calls.append(p)
        return AutoTokenizer.from_pretrained(tmp_path / "tiny"), AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")

    monkeypatch.setattr(gguf, "_convert", convert)
    return path, calls


def entries(folder):
    """The converted copies in the cache (not the lock files beside them)."""
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


def test_the_first_load_converts_and_later_ones_read_the_cache(fake_gguf):
    path, calls = fake_gguf
    tokenizer, model = gguf.load_gguf_causal(path)
    assert len(calls) == 1 and gguf.is_converted(path)
    assert gguf.gguf_architecture(path) == "llama"  # from the converted config, without reading the header
    again_tokenizer, again = gguf.load_gguf_causal(path, dtype=torch.bfloat16)
    assert len(calls) == 1  # not converted again
    assert again.dtype == torch.bfloat16
    for name, weight in model.state_dict().items():
        assert torch.equal(weight.to(torch.bfloat16), again.state_dict()[name]), name
    text = "The river flows, 1900."
    assert again_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert not list(gguf.converted_dir(path).parent.glob(".*partial*"))  # no staging folder left behind

    path.write_bytes(b"another GGUF under the same name")  # another file: another entry, converted afresh
    gguf.load_gguf_causal(path)
    assert len(calls) == 2 and len(entries(gguf.converted_dir(path).parent)) == 2


def test_a_cache_that_cannot_be_written_costs_a_conversion_not_the_load(fake_gguf, monkeypatch, caplog):
    path, calls = fake_gguf

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", disk_full)
    with caplog.at_level(logging.WARNING, logger="textdiffusion.models.gguf"):
        _, model = gguf.load_gguf_causal(path)
    assert model.config.model_type == "llama" and "No space left" in caplog.text
    assert not gguf.is_converted(path) and not entries(gguf.converted_dir(path).parent)
    gguf.load_gguf_causal(path)
    assert len(calls) == 2


def test_two_loads_at_once_convert_once(fake_gguf, monkeypatch):
    """Two test workers (or a server and a benchmark) loading the same file at once: one converts, the other
    waits for its copy."""
    path, calls = fake_gguf
    convert = gguf._convert

    def slow_convert(p):
        time.sleep(0.3)  # the second load arrives while the first converts
        return convert(p)

    monkeypatch.setattr(gguf, "_convert", slow_convert)
    with ThreadPoolExecutor(2) as pool:
        loaded = list(pool.map(lambda _: gguf.load_gguf_causal(path), range(2)))
    assert len(calls) == 1 and gguf.is_converted(path)
    for name, weight in loaded[0][1].state_dict().items():
        assert torch.equal(weight, loaded[1][1].state_dict()[name]), name


def _header_only_gguf(path, arch):
    import gguf as gguf_package

    writer = gguf_package.GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.block_count", 2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_architecture_is_read_from_the_first_header_field(tmp_path, monkeypatch):
    """general.architecture comes first in a llama.cpp file: read alone, without gguf's whole-header parse (the
    whole vocabulary: seconds); a file laid out otherwise still gets its answer from gguf's reader."""
    pytest.importorskip("gguf")
    import gguf as gguf_package

    monkeypatch.setenv("TEXTDIFFUSION_CACHE", str(tmp_path / "cache"))
    path = _header_only_gguf(tmp_path / "model.gguf", "qwen2")
    real_reader = gguf_package.GGUFReader
    monkeypatch.setattr(gguf_package, "GGUFReader", lambda *a, **k: pytest.fail("parsed the whole header"))
    assert gguf.gguf_architecture(path) == "qwen2"
    monkeypatch.setattr(gguf_package, "GGUFReader", real_reader)
    monkeypatch.setattr(gguf, "_first_string_field", lambda p: ("general.alignment", "?"))  # another layout
    assert gguf.gguf_architecture(path) == "qwen2"
    (tmp_path / "junk.gguf").write_bytes(b"not a GGUF file at all")
    assert gguf.gguf_architecture(tmp_path / "junk.gguf") is None
