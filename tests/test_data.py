import gzip
import json
import math

import pytest
import torch

from textdiffusion.core.data import BUNDLED_CORPORA, load_corpus, pack, split_documents, unigram_entropy
from textdiffusion.errors import UsageError


@pytest.mark.parametrize("name", sorted(BUNDLED_CORPORA))
def test_bundled_corpora_load_and_split_deterministically(name):
    a, b = load_corpus(name), load_corpus(name)
    assert len(a.train) > 9000 and len(a.validation) > 400
    assert a.validation == b.validation
    assert not set(a.validation) & set(a.train[:2000]) - {""} or name == "austen"  # paragraphs may repeat


def test_local_formats_give_the_same_documents(tmp_path):
    docs = [f"document number {i} says something." for i in range(20)]
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    (tmp_path / "a.csv").write_text("id,body\n" + "".join(f'{i},"{d}"\n' for i, d in enumerate(docs)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs}), tmp_path / "a.parquet")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"body": d}) + "\n" for d in docs))
    for name in ["a.txt", "a.jsonl", "a.csv", "a.parquet", "a.jsonl.gz"]:
        c = load_corpus(str(tmp_path / name), text_column="body")
        assert sorted(c.train + c.validation) == sorted(docs), name


def test_folder_reads_every_supported_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "one.txt").write_text("alpha beta.\n\ngamma delta.")
    (tmp_path / "sub" / "two.txt").write_text("epsilon zeta.")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    c = load_corpus(str(tmp_path))
    assert sorted(c.train + c.validation) == ["alpha beta.", "epsilon zeta.", "gamma delta."]


def test_non_utf8_lines_are_skipped_and_counted(tmp_path, caplog):
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"good line one.\n\nbad \xff\xfe line.\n\ngood line two.\n")
    with caplog.at_level("WARNING"):
        c = load_corpus(str(path))
    assert sorted(c.train + c.validation) == ["good line one.", "good line two."]
    assert "skipped 1 line(s) with non-UTF-8 bytes" in caplog.text


@pytest.mark.parametrize("make, needle", [
    (lambda p: "no-such-corpus-xyz", "no-such-corpus-xyz"),
    (lambda p: str(p / "missing.jsonl"), "no such file"),
    (lambda p: (p / "empty.txt").write_text("\n\n  \n") and str(p / "empty.txt"), "holds no text"),
    (lambda p: (p / "x.jsonl").write_text('{"title": "a"}\n') and str(p / "x.jsonl"), "--text-column 'text' is not in"),
    (lambda p: (p / "x.csv").write_text("title\nfoo\n") and str(p / "x.csv"), "--text-column 'text' is not in"),
    (lambda p: (p / "one.txt").write_text("only one document") and str(p / "one.txt"), "at least 2"),
])
def test_bad_datasets_give_clear_errors(tmp_path, make, needle):
    with pytest.raises(UsageError, match=needle):
        load_corpus(make(tmp_path))


def test_split_is_deterministic_and_disjoint():
    docs = [f"d{i}" for i in range(100)]
    tr, va = split_documents(docs, 0.1)
    assert (tr, va) == split_documents(docs, 0.1)
    assert len(va) == 10 and not set(tr) & set(va) and sorted(tr + va) == sorted(docs)


def test_pack_separates_documents_and_wastes_nothing(tokenizer):
    docs = ["The cat sat on the mat.", "A dog barked twice at the moon."] * 20
    blocks = pack(docs, tokenizer, 32)
    stream = []
    for d in docs:
        stream += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    assert blocks.shape == (len(stream) // 30, 32)
    assert blocks[:, 1:-1].flatten().tolist() == stream[: blocks.shape[0] * 30]  # documents joined by </s>, in order
    assert (blocks[:, 0] == tokenizer.cls_token_id).all() and (blocks[:, -1] == tokenizer.sep_token_id).all()
    assert not (blocks == tokenizer.pad_token_id).any()


def test_unigram_entropy_of_uniform_tokens():
    blocks = torch.arange(10, 18).repeat(4, 1)
    assert abs(unigram_entropy(blocks, []) - math.log(8)) < 1e-12


def test_document_ends_can_end_their_block_padded_with_end_of_text(wiki, tokenizer):
    from textdiffusion.core.data import pack

    docs = wiki.train[:200]
    sep = tokenizer.sep_token_id
    plain = pack(docs, tokenizer, 64)
    padded = pack(docs, tokenizer, 64, doc_end_fraction=1.0, seed=0)
    runs = lambda b: int(((b[:, 1:-1] == sep)[:, 1:] & (b[:, 1:-1] == sep)[:, :-1]).sum())  # noqa: E731 sep after sep
    assert runs(plain) == 0 and runs(padded) > 0
    # every block of the fully padded packing holds the tail of at most one document: after a separator,
    # only separators follow (up to the block's closing one)
    body = padded[:, 1:-1] == sep
    after_first = body.long().cumsum(1) > 0
    assert bool((body | ~after_first).all())
    assert torch.equal(pack(docs, tokenizer, 64, doc_end_fraction=0.3, seed=1),
                       pack(docs, tokenizer, 64, doc_end_fraction=0.3, seed=1))
    with pytest.raises(ValueError, match="--doc-end-fraction"):
        pack(docs, tokenizer, 64, doc_end_fraction=1.5)


def test_without_labels_drops_a_class_from_both_splits_and_refuses_what_it_cannot_do():
    from textdiffusion.core.data import Corpus

    corpus = Corpus(["a", "b", "c", "d"], ["e", "f"], "toy", ["x", "y", "z", "x"], ["z", "y"])
    kept = corpus.without_labels(["z"], "--exclude-labels")
    assert (kept.train, kept.train_labels, kept.validation, kept.validation_labels) == (
        ["a", "b", "d"], ["x", "y", "x"], ["f"], ["y"])
    with pytest.raises(UsageError, match="--exclude-labels 'w' is not a class of 'toy'"):
        corpus.without_labels(["w"], "--exclude-labels")
    with pytest.raises(UsageError, match="leaves 1 class"):
        corpus.without_labels(["x", "y"], "--exclude-labels")
    with pytest.raises(UsageError, match="needs a labelled corpus"):
        Corpus(["a"], ["b"], "toy").without_labels(["x"], "--exclude-labels")


def test_a_preset_tokenizer_is_trained_once_per_corpus_and_size(tmp_path, monkeypatch, wiki):
    """A second run on the same corpus at the same size reuses the shared copy (the same ids) instead of training
    again; another size is another tokenizer; a cache that cannot be written costs a training, never the run."""
    from textdiffusion.models import presets

    monkeypatch.setenv("TEXTDIFFUSION_CACHE", str(tmp_path / "cache"))
    texts = wiki.train[:200]
    first = presets.preset_tokenizer(texts, 512, tmp_path / "run1")
    monkeypatch.setattr(presets, "train_bpe_tokenizer", lambda *a: pytest.fail("trained again"))
    second = presets.preset_tokenizer(texts, 512, tmp_path / "run2")
    sample = wiki.validation[0]
    assert second(sample)["input_ids"] == first(sample)["input_ids"]
    assert (tmp_path / "run2" / presets.TOKENIZER_STAMP).is_file()  # the run keeps its own copy too
    with pytest.raises(pytest.fail.Exception, match="trained again"):
        presets.preset_tokenizer(texts, 600, tmp_path / "run3")
    monkeypatch.undo()
    (tmp_path / "readonly").write_text("a file where the cache folder should be")
    monkeypatch.setenv("TEXTDIFFUSION_CACHE", str(tmp_path / "readonly"))
    assert presets.preset_tokenizer(texts, 512, None)(sample)["input_ids"] == first(sample)["input_ids"]
