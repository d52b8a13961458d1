"""Tokenizer-independent numbers (nats per word, bits per byte) and WordPiece text that reads like text."""

import json
import math

import pytest
import torch
from mpnet_helpers import wordpiece_tokenizer

from textdiffusion.cli.main import main
from textdiffusion.core.detokenize import decode_text, is_wordpiece, text_units, tidy_wordpiece

SENTENCE = 'India\'s capital (New Delhi) is well-known; it grew 3.5 times to 3,000 "large" towns, and they\'re big.'


@pytest.fixture(scope="module")
def wordpiece(wiki):
    return wordpiece_tokenizer(wiki.train[:300] + [SENTENCE] * 5, vocab_size=1200)


def test_wordpiece_decode_reads_like_text(wordpiece, tokenizer):
    ids = wordpiece(SENTENCE)["input_ids"]
    raw = wordpiece.decode(ids, skip_special_tokens=True)
    assert "india ' s" in raw or "india's" not in raw  # what decode alone gives
    text = decode_text(wordpiece, ids)
    assert text == SENTENCE.lower()
    assert "india ' s" not in text and " ," not in text and "( " not in text
    assert is_wordpiece(wordpiece) and not is_wordpiece(tokenizer)
    bpe_ids = tokenizer("a ( b ) - c")["input_ids"]
    assert decode_text(tokenizer, bpe_ids) == tokenizer.decode(bpe_ids, skip_special_tokens=True)  # BPE: exact, untouched


@pytest.mark.parametrize("raw, want", [("don ' t stop", "don't stop"), ('he said " yes " .', 'he said "yes".'),
                                       ("the 1990s ( early )", "the 1990s (early)"), ("a - b", "a-b"),
                                       ("yangtze – huai", "yangtze–huai")])
def test_tidy_rules(raw, want):
    assert tidy_wordpiece(raw) == want


def test_text_units_count_the_scored_text(wordpiece):
    ids = torch.tensor([wordpiece(SENTENCE)["input_ids"]])
    special = torch.isin(ids, torch.tensor(wordpiece.all_special_ids))
    words, nbytes = text_units(wordpiece, ids, ~special)
    assert (words, nbytes) == (len(SENTENCE.split()), len(SENTENCE.lower().encode("utf-8")))
    # two documents in a block: their texts are joined by a space, not glued together
    two = torch.tensor([wordpiece("one two")["input_ids"] + wordpiece("three")["input_ids"][1:]])
    assert text_units(wordpiece, two, ~torch.isin(two, torch.tensor(wordpiece.all_special_ids))) == (3, len("one two three"))


def test_eval_reports_nats_per_word_and_bits_per_byte(tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["eval", "--checkpoint", "wiki-small", "--eval-blocks", "6", "--samples-per-block", "1",
                 "--output-dir", str(out)]) == 0
    assert "nats/word" in capsys.readouterr().out
    bound = json.loads((out / "eval.json").read_text())["nelbo"][0]
    total = bound["nats_per_token"] * bound["tokens"]
    assert bound["nats_per_word"] == pytest.approx(total / bound["words"])
    assert bound["bits_per_byte"] == pytest.approx(total / bound["bytes"] / math.log(2))
    assert bound["tokens"] < bound["bytes"] and bound["words"] < bound["tokens"]  # BPE: ~4-5 bytes, ~0.75 words per token
    assert 0.5 < bound["bits_per_byte"] < 3.0


def test_generator_output_of_a_wordpiece_model_reads_like_text(tmp_path, wiki):
    """The decode path of generate/serve (DiffusionGenerator.decode): no "india ' s" in a sample."""
    from mpnet_helpers import save_headless_mpnet

    from textdiffusion.errors import UsageError
    from textdiffusion.models.loading import load_masked_lm
    from textdiffusion.pipelines.generation import DiffusionGenerator

    path = str(save_headless_mpnet(tmp_path / "m", wiki.train[:200] + [SENTENCE] * 5))
    with pytest.raises(UsageError, match="without a trained MLM head"):  # a random head would only make noise
        DiffusionGenerator.from_pretrained(path)
    gen = DiffusionGenerator(*load_masked_lm(path)[::-1])
    row = torch.tensor(gen.tokenizer(SENTENCE)["input_ids"])
    text = gen.decode(row, torch.ones_like(row, dtype=torch.bool))
    assert text == SENTENCE.lower() and "india ' s" not in text
    assert "india's" in gen.render(row)
