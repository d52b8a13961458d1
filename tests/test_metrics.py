import math

import pytest

from textdiffusion.core.metrics import distinct_n, diversity, doubled_rate, repetition_rate, unigram_entropy_bits


def test_distinct_n_on_hand_made_samples():
    assert distinct_n([[1, 2, 3, 4]], 1) == 1.0
    assert distinct_n([[1, 1, 1, 1]], 1) == 0.25
    assert distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)  # (1,2) (2,1) (1,2)
    assert distinct_n([[1, 2], [1, 2]], 2) == 0.5  # repeats across samples count too
    assert distinct_n([[1]], 2) == 0.0


def test_repetition_rate_counts_repeats_within_a_sample_only():
    assert repetition_rate([[1, 2, 1, 2, 1, 2]]) == pytest.approx(3 / 5)
    assert repetition_rate([[1, 2], [1, 2]]) == 0.0


def test_doubled_rate_counts_adjacent_pairs_within_a_sample():
    assert doubled_rate([["has", "has", "been"]]) == 0.5  # (has, has) of 2 pairs
    assert doubled_rate([["a", "b", "a", "b"]]) == 0.0  # a repeat that is not adjacent is not doubled
    assert doubled_rate([["a"], ["a", "a"]]) == 1.0  # pairs never span two samples; a 1-word sample has none
    assert doubled_rate([]) == 0.0


def test_entropy_in_bits():
    assert unigram_entropy_bits([[1, 2, 3, 4]]) == pytest.approx(2.0)
    assert unigram_entropy_bits([[7, 7, 7]]) == 0.0
    assert unigram_entropy_bits([[1, 1, 2]]) == pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3))


def test_degenerate_text_scores_low_everywhere():
    music = [[5, 6] * 20]
    real = [list(range(40))]
    d_music, d_real = diversity(music), diversity(real)
    assert d_music["distinct-2"] < 0.1 < d_real["distinct-2"] == 1.0
    assert d_music["repetition-2"] > 0.9 and d_real["repetition-2"] == 0.0
