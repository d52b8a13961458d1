"""Corpora: bundled, local files or folders, or Hugging Face datasets; then tokenise and pack.

``load_corpus`` returns plain lists of documents for a train and a validation split. ``pack`` turns
documents into fixed-length blocks of token ids, ``[cls] doc1 [sep] doc2 [sep] ... [sep]``, so that no
compute is spent on padding (the same grouping as transformers' ``run_mlm.py``).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from textdiffusion.errors import UsageError

logger = logging.getLogger(__name__)

BUNDLED_CORPORA = {"wiki-vital": "wiki_vital_en.jsonl.gz", "austen": "austen_en.jsonl.gz"}
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz", ".txt.gz")
VALIDATION_SPLIT_NAMES = ("validation", "valid", "dev", "test")


@dataclass
class Corpus:
    train: list[str]
    validation: list[str]
    source: str
    # with ``load_corpus(label_column=...)``: the label of each document, aligned with train / validation
    train_labels: list[str] | None = None
    validation_labels: list[str] | None = None

    @property
    def label_set(self) -> list[str]:
        """The distinct labels of both splits, sorted (empty without a label column)."""
        return sorted(set(self.train_labels or []) | set(self.validation_labels or []))

    def without_labels(self, excluded: Sequence[str], flag: str = "exclude_labels") -> "Corpus":
        """The corpus without the documents of the ``excluded`` classes (a catch-all class such as
        "Uncategorized" teaches a label nothing); both splits keep their order."""
        if self.train_labels is None:
            raise UsageError(f"{flag} needs a labelled corpus (--label-column).")
        unknown = sorted(set(excluded) - set(self.label_set))
        if unknown:
            raise UsageError(f"{flag} {unknown[0]!r} is not a class of {self.source!r} (its classes: {self.label_set}).")
        keep = set(self.label_set) - set(excluded)
        if len(keep) < 2:
            raise UsageError(f"{flag} {list(excluded)!r} leaves {len(keep)} class(es); at least two are needed.")
        train = [(t, c) for t, c in zip(self.train, self.train_labels) if c in keep]
        val = [(t, c) for t, c in zip(self.validation, self.validation_labels) if c in keep]
        return Corpus([t for t, _ in train], [t for t, _ in val], self.source, [c for _, c in train], [c for _, c in val])


# -- reading ----------------------------------------------------------------------------------------
def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in sorted(FILE_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _utf8_lines(raw: bytes, counter: list[int]) -> list[str]:
    """Decode line by line; a line with bytes that are not UTF-8 is skipped and counted."""
    lines = []
    for line in raw.splitlines():
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            counter[0] += 1
    return lines


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.lower().endswith(".gz") else data


def _column(records: list[dict], column: str, path: Path) -> list[str]:
    if records and column not in records[0]:
        raise UsageError(f"--text-column {column!r} is not in {path} (its columns: {sorted(records[0])}).")
    return [str(r[column]) for r in records if r.get(column) is not None]


def read_text_file(path: Path, text_column: str = "text") -> tuple[list[str], int]:
    """Documents of one local file, and the number of lines skipped for bad UTF-8."""
    suffix, bad = _suffix(path), [0]
    if suffix in (".txt", ".txt.gz"):
        # Documents are separated by blank lines (paragraphs), as in WikiText's raw files.
        lines = _utf8_lines(_read_bytes(path), bad)
        docs, current = [], []
        for line in lines + [""]:
            if line.strip():
                current.append(line.strip())
            elif current:
                docs.append(" ".join(current))
                current = []
    elif suffix in (".jsonl", ".jsonl.gz", ".json"):
        records = []
        for i, line in enumerate(_utf8_lines(_read_bytes(path), bad)):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UsageError(f"--dataset {str(path)!r}: line {i + 1} is not valid JSON ({e.msg}).") from None
        docs = _column(records, text_column, path)
    elif suffix == ".csv":
        text = "\n".join(_utf8_lines(_read_bytes(path), bad))
        docs = _column(list(csv.DictReader(io.StringIO(text))), text_column, path)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_column not in table.column_names:
            raise UsageError(f"--text-column {text_column!r} is not in {path} (its columns: {table.column_names}).")
        docs = [str(x) for x in table.column(text_column).to_pylist() if x is not None]
    else:
        raise UsageError(f"--dataset {str(path)!r}: unsupported file type {suffix!r} "
                         f"(supported: {', '.join(FILE_SUFFIXES)}).")
    return [d for d in docs if d.strip()], bad[0]


def read_local(path: Path, text_column: str) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in FILE_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise UsageError(f"--dataset {str(path)!r}: the folder has no {', '.join(FILE_SUFFIXES)} files.")
    docs, bad = [], 0
    for f in files:
        d, b = read_text_file(f, text_column)
        docs += d
        bad += b
    if bad:
        logger.warning("skipped %d line(s) with non-UTF-8 bytes in %s", bad, path)
    return docs


def read_bundled(name: str) -> list[str]:
    ref = resources.files("textdiffusion") / "corpora" / BUNDLED_CORPORA[name]
    with resources.as_file(ref) as path:
        if not path.exists():
            raise UsageError(f"--dataset {name!r}: the bundled file {path} is missing from this install.")
        docs, _ = read_text_file(path)
    return docs


def read_hub(dataset: str, text_column: str) -> tuple[list[str], list[str] | None]:
    """``name`` or ``name:config`` through the datasets library; returns (train, validation or None)."""
    import datasets

    name, _, config = dataset.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None)
    except Exception as e:  # offline, unknown id, bad config: all end the same way for the user
        raise UsageError(
            f"--dataset {dataset!r} is not a bundled corpus ({', '.join(BUNDLED_CORPORA)}), not a local file, "
            f"and could not be loaded from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Offline, use a bundled name or a local .txt/.jsonl/.csv/.parquet file or folder.") from None
    if "train" not in ds:
        raise UsageError(f"--dataset {dataset!r} has no 'train' split (splits: {list(ds)}).")

    def texts(split) -> list[str]:
        if text_column not in split.column_names:
            raise UsageError(f"--text-column {text_column!r} is not in {dataset!r} (columns: {split.column_names}).")
        return [t for t in split[text_column] if t and t.strip()]

    val = next((ds[s] for s in VALIDATION_SPLIT_NAMES if s in ds), None)
    return texts(ds["train"]), (texts(val) if val is not None else None)


def split_documents(docs: list[str], validation_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic document-level split (the same for every run with the same seed)."""
    if len(docs) < 2:
        raise UsageError(f"the corpus has {len(docs)} document(s); at least 2 are needed to split off validation.")
    n_val = min(len(docs) - 1, max(1, round(validation_fraction * len(docs))))
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx = set(order[:n_val])
    return [d for i, d in enumerate(docs) if i not in val_idx], [docs[i] for i in sorted(val_idx)]


def load_corpus(dataset: str = "wiki-vital", text_column: str = "text", validation_fraction: float = 0.05,
                split_seed: int = 0, label_column: str | None = None) -> Corpus:
    """Resolve ``dataset`` (bundled name, local path, or hub id) to train/validation documents; with
    ``label_column`` also each document's label (a record without one is dropped)."""
    if not 0.0 < validation_fraction < 1.0:
        raise UsageError(f"--validation-fraction must be in (0, 1), got {validation_fraction}.")
    if label_column:
        return load_labelled_corpus(dataset, text_column, label_column, validation_fraction, split_seed)
    path = Path(dataset).expanduser()
    if dataset in BUNDLED_CORPORA:
        docs, val = read_bundled(dataset), None
    elif path.exists():
        docs, val = read_local(path, text_column), None
    elif _suffix(path) in FILE_SUFFIXES or dataset.startswith((".", "/", "~")):
        raise UsageError(f"--dataset {dataset!r}: no such file or folder.")
    else:
        docs, val = read_hub(dataset, text_column)
    if not docs:
        raise UsageError(f"--dataset {dataset!r} holds no text (column {text_column!r} is empty everywhere).")
    if val:
        return Corpus(docs, val, dataset)
    train, val = split_documents(docs, validation_fraction, split_seed)
    return Corpus(train, val, dataset)


# -- labelled corpora -------------------------------------------------------------------------------
def _labelled_records(records: list[dict], text_column: str, label_column: str, where: str) -> list[tuple[str, str]]:
    if records and label_column not in records[0]:
        raise UsageError(f"--label-column {label_column!r} is not in {where} (its columns: {sorted(records[0])}).")
    if records and text_column not in records[0]:
        raise UsageError(f"--text-column {text_column!r} is not in {where} (its columns: {sorted(records[0])}).")
    return [(str(r[text_column]), str(r[label_column])) for r in records
            if r.get(text_column) is not None and r.get(label_column) is not None and str(r[text_column]).strip()]


def read_labelled_file(path: Path, text_column: str, label_column: str) -> list[tuple[str, str]]:
    """(text, label) pairs of one local file with columns: JSON lines, CSV or Parquet."""
    suffix, bad = _suffix(path), [0]
    if suffix in (".jsonl", ".jsonl.gz", ".json"):
        records = [json.loads(line) for line in _utf8_lines(_read_bytes(path), bad) if line.strip()]
    elif suffix == ".csv":
        records = list(csv.DictReader(io.StringIO("\n".join(_utf8_lines(_read_bytes(path), bad)))))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    else:
        raise UsageError(f"--label-column {label_column!r}: {str(path)!r} is plain text and has no columns; "
                         "use a .jsonl, .csv or .parquet file with a label field.")
    return _labelled_records(records, text_column, label_column, str(path))


def load_labelled_corpus(dataset: str, text_column: str, label_column: str, validation_fraction: float = 0.05,
                         split_seed: int = 0) -> Corpus:
    """Documents and their labels (``label_column``), split as ``load_corpus`` splits the same documents."""
    path = Path(dataset).expanduser()
    val_pairs = None
    if dataset in BUNDLED_CORPORA:
        ref = resources.files("textdiffusion") / "corpora" / BUNDLED_CORPORA[dataset]
        with resources.as_file(ref) as file:
            pairs = read_labelled_file(file, text_column, label_column)
    elif path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in FILE_SUFFIXES) if path.is_dir() else [path]
        pairs = [pair for f in files for pair in read_labelled_file(f, text_column, label_column)]
    elif dataset.startswith((".", "/", "~")) or _suffix(path) in FILE_SUFFIXES:
        raise UsageError(f"--dataset {dataset!r}: no such file or folder.")
    else:
        import datasets

        name, _, config = dataset.partition(":")
        try:
            ds = datasets.load_dataset(name, config or None)
        except Exception as e:
            raise UsageError(f"--dataset {dataset!r} could not be loaded ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}).") from None
        if "train" not in ds:
            raise UsageError(f"--dataset {dataset!r} has no 'train' split (splits: {list(ds)}).")
        pairs = _labelled_records(ds["train"].to_list(), text_column, label_column, repr(dataset))
        val = next((ds[s] for s in VALIDATION_SPLIT_NAMES if s in ds), None)
        val_pairs = _labelled_records(val.to_list(), text_column, label_column, repr(dataset)) if val is not None else None
    if not pairs:
        raise UsageError(f"--dataset {dataset!r} holds no labelled text (columns {text_column!r}, {label_column!r}).")
    train, val = (pairs, val_pairs) if val_pairs else split_documents(pairs, validation_fraction, split_seed)
    corpus = Corpus([t for t, _ in train], [t for t, _ in val], dataset, [c for _, c in train], [c for _, c in val])
    if len(corpus.label_set) < 2:
        raise UsageError(f"--label-column {label_column!r} of {dataset!r} has a single class "
                         f"({corpus.label_set!r}): at least two are needed to condition on or classify.")
    return corpus


# -- tokenising and packing -------------------------------------------------------------------------
def boundary_ids(tokenizer) -> tuple[int | None, int | None]:
    """The ids that open a block and separate documents: (cls or bos, sep or eos)."""
    cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    return cls, sep


def pack(docs: list[str], tokenizer, block_length: int, keep_remainder: bool = False,
         doc_end_fraction: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Tokenise ``docs`` and pack them into blocks ``[cls] tokens... [sep]`` of exactly ``block_length``.

    Documents are joined with the separator token, so a block can span a document boundary. The tail
    that does not fill a block is dropped, unless ``keep_remainder`` (then it is padded), which matters
    only for a corpus smaller than one block.

    ``doc_end_fraction``: that fraction of the documents (drawn with ``seed``) end their block: the rest of
    the block after the document's separator is filled with more separators, so the model sees text that
    stops and learns to predict end-of-text where a document ends (LLaDA and SMDM train variable-length
    output the same way). The next document then starts a fresh block.
    """
    if not 0.0 <= doc_end_fraction <= 1.0:
        raise UsageError(f"--doc-end-fraction must be in [0, 1], got {doc_end_fraction!r}.")
    cls, sep = boundary_ids(tokenizer)
    inner = block_length - (cls is not None) - (sep is not None)
    if inner < 1:
        raise UsageError(f"--max-length {block_length} is too short to hold any text between the special tokens.")
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    pieces = [np.asarray(x, dtype=np.int64) for x in ids if len(x)]
    if sep is not None:
        ends_block = np.random.default_rng(seed).random(len(pieces)) < doc_end_fraction if doc_end_fraction else None
        parts_of_stream, used = [], 0
        for i, p in enumerate(pieces):  # once per document, while preparing data (not a hot path)
            part = np.append(p, sep)
            used += len(part)
            if ends_block is not None and ends_block[i] and used % inner:
                fill = inner - used % inner  # end-of-text up to the end of this block
                part = np.concatenate([part, np.full(fill, sep, dtype=np.int64)])
                used += fill
            parts_of_stream.append(part)
        stream = np.concatenate(parts_of_stream) if parts_of_stream else np.zeros(0, np.int64)
    else:
        stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    n_blocks = len(stream) // inner
    if n_blocks == 0 and keep_remainder and len(stream):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        stream = np.concatenate([stream, np.full(inner - len(stream), pad)])
        n_blocks = 1
    body = torch.from_numpy(stream[: n_blocks * inner].copy()).view(n_blocks, inner)  # [n, inner]
    parts = []
    if cls is not None:
        parts.append(torch.full((n_blocks, 1), cls))
    parts.append(body)
    if sep is not None:
        parts.append(torch.full((n_blocks, 1), sep))
    return torch.cat(parts, dim=1)  # [n, block_length]


class BlockDataset(torch.utils.data.Dataset):
    """Packed blocks as a map-style dataset of ``{"input_ids": LongTensor[l]}``."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i]}


def _token_counts(blocks: torch.Tensor, ignore_ids: list[int], minlength: int = 0) -> torch.Tensor:
    ids = blocks.flatten()
    if ignore_ids:
        ids = ids[~torch.isin(ids, torch.tensor(ignore_ids))]
    return torch.bincount(ids, minlength=minlength).double()


def unigram_entropy(blocks: torch.Tensor, ignore_ids: list[int]) -> float:
    """Entropy (nats) of the empirical token distribution of ``blocks``, special tokens excluded.

    Computed on the whole validation set: on a few thousand tokens this plug-in estimate is biased low
    by about (distinct tokens) / (2 * tokens) nats.
    """
    counts = _token_counts(blocks, ignore_ids)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def unigram_cross_entropy(train_blocks: torch.Tensor, val_blocks: torch.Tensor, ignore_ids: list[int],
                          smoothing: float = 0.5) -> float:
    """Loss (nats/token) on ``val_blocks`` of the best context-free model: training-set token
    frequencies (add-``smoothing``). A denoiser that is not clearly below it has learned no context."""
    vocab = int(max(train_blocks.max(), val_blocks.max())) + 1
    train = _token_counts(train_blocks, ignore_ids, vocab) + smoothing
    val = _token_counts(val_blocks, ignore_ids, vocab)
    log_p = (train / train.sum()).log()
    return float(-(val * log_p).sum() / val.sum())
