"""Component scores: the SVD of the gated update, the one rank count, margins and agreement."""

from __future__ import annotations

import math

import pytest
import torch

from autolora.plan.scores import (
    agreement,
    base_rms,
    margins,
    reference_score,
    spectrum_scores,
    update_svd,
)


@pytest.mark.parametrize(("r", "d_in", "d_out"), [(4, 7, 5), (6, 3, 9), (8, 8, 8)])
def test_update_svd_matches_float64_reference(r, d_in, d_out):
    g = torch.Generator().manual_seed(r)
    a, b = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
    u, s, vh = update_svd(a, b)
    ref = torch.linalg.svdvals(b.double() @ a.double())
    torch.testing.assert_close(s.double(), ref[: s.numel()], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, b @ a, rtol=1e-4, atol=1e-5)
    assert torch.all(s[:-1] >= s[1:])


def test_scores_do_not_change_when_a_and_b_rescale_each_other():
    """The identifiability a gate lacks: B*c, A/c (or any invertible mix) leaves the scores alone."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 10, generator=g), torch.randn(6, 4, generator=g)
    mix = torch.randn(4, 4, generator=g) + 3 * torch.eye(4)
    base = spectrum_scores(a, b, 1.0, 4)
    torch.testing.assert_close(spectrum_scores(a / 5, b * 5, 1.0, 4), base, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(spectrum_scores(torch.linalg.solve(mix, a), b @ mix, 1.0, 4), base, rtol=1e-3, atol=1e-5)


def test_spectrum_scores_pad_and_normalise():
    a, b = torch.ones(5, 2), torch.ones(3, 5)  # a rank-1 update, min dim 2 < r = 5
    s = spectrum_scores(a, b, reference=2.0, rank=5)
    assert s.shape == (5,)
    assert s[0] == pytest.approx(math.sqrt(2 * 3) * 5 / 2.0, rel=1e-5)
    assert torch.all(s[1:] < 1e-5)


def test_base_rms():
    assert base_rms(torch.eye(4)) == pytest.approx(1.0)
    assert base_rms(torch.zeros(3, 2)) == 1.0  # never divide by zero


def test_reference_is_the_median_top_score():
    scores = {"a": torch.tensor([5.0, 1.0]), "b": torch.tensor([1.0, 0.0]), "c": torch.tensor([100.0, 0.0])}
    assert reference_score(scores) == 5.0
    assert reference_score({"a": torch.tensor([2.0]), "b": torch.tensor([4.0])}) == 3.0
    assert reference_score({}) == 0.0


def test_margins_sign_and_size():
    scores = {"clear": torch.tensor([4.0, 0.25]), "forced": torch.tensor([0.5, 0.1]), "full": torch.tensor([4.0, 2.0])}
    m = margins(scores, {"clear": 1, "forced": 1, "full": 2}, threshold=1.0)
    assert m["clear"] == pytest.approx(math.log(4.0))
    assert m["forced"] < 0  # min_rank kept a component below the cut
    assert m["full"] == pytest.approx(math.log(2.0))


def test_agreement():
    final = {"a": 2, "b": 1}
    assert agreement(final, [{"a": 2, "b": 1}, {"a": 2, "b": 3}]) == {"a": 1.0, "b": 0.5}
    assert agreement(final, []) == {"a": 1.0, "b": 1.0}


def test_batched_scores_equal_one_module_at_a_time():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 4, 9, generator=g), torch.randn(5, 7, 4, generator=g)
    refs = torch.rand(5, generator=g) + 0.5
    batched = spectrum_scores(a, b, refs, 4)
    assert batched.shape == (5, 4)
    for i in range(5):
        torch.testing.assert_close(batched[i], spectrum_scores(a[i], b[i], float(refs[i]), 4), rtol=1e-5, atol=1e-6)
