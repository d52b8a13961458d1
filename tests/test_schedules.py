import pytest
import torch

from textdiffusion.schedules import SCHEDULES, get_schedule

T = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_mask_ratio_is_monotone_bounded_and_pinned(name):
    s = get_schedule(name)
    r = s.mask_ratio(T)
    assert torch.all(r[1:] >= r[:-1]), "mask ratio must not decrease with t"
    assert torch.all((r >= 0) & (r <= 1))
    ends = s.mask_ratio(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(ends, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_alpha_prime_matches_finite_difference(name):
    s = get_schedule(name)
    h = 1e-6
    numeric = (s.alpha(T + h) - s.alpha(T - h)) / (2 * h)
    assert torch.allclose(s.alpha_prime(T), numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_weight_is_positive(name):
    assert torch.all(get_schedule(name).weight(T) > 0)


def test_linear_weight_is_one_over_t():
    assert torch.allclose(get_schedule("linear").weight(T), 1.0 / T)


def test_unknown_schedule_names_the_value():
    with pytest.raises(ValueError, match="'zigzag'"):
        get_schedule("zigzag")
