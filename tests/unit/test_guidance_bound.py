"""Properties of the guidance bound (``guidance_clip``): size measured inside the region only,
bounded to the ratio asked for, direction kept, untouched below the bound."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffeditor.sampling import bound_guidance, region_rms


def _tensors(seed: int, scale: float):
    gen = torch.Generator().manual_seed(seed)
    term = scale * torch.randn(1, 4, 6, 6, generator=gen)
    eps = torch.randn(1, 4, 6, 6, generator=gen)
    mask = (torch.rand(1, 1, 6, 6, generator=gen) > 0.5).float()
    mask[..., 0, 0] = 1.0  # never empty
    return term, eps, mask


def test_region_rms_is_over_the_masked_cells_only():
    x = torch.zeros(1, 2, 2, 2)
    x[0, :, 0, 0] = 3.0
    x[0, :, 1, 1] = 100.0  # outside the mask: ignored
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    # cells (0,0) and (0,1), 2 channels: sqrt((9 + 9 + 0 + 0) / 4)
    assert region_rms(x, mask).item() == pytest.approx(4.5 ** 0.5, rel=1e-6)
    assert region_rms(x, torch.zeros_like(mask)).item() == 0.0


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3), bound=st.floats(1e-2, 10.0))
def test_bound_holds_keeps_direction_and_only_shrinks(seed, scale, bound):
    term, eps, mask = _tensors(seed, scale)
    out, ratio = bound_guidance(term, eps, mask, bound)
    expect = region_rms(term, mask) / region_rms(eps, mask)
    torch.testing.assert_close(ratio, expect)
    after = (region_rms(out, mask) / region_rms(eps, mask)).item()
    assert after <= bound * (1 + 1e-5)
    factor = (out.flatten() @ term.flatten()) / (term.flatten() @ term.flatten())
    torch.testing.assert_close(out, factor * term)  # same direction, one factor
    assert 0 < factor.item() <= 1 + 1e-6
    if ratio.item() <= bound:
        assert torch.equal(out, term)  # within the bound: untouched
    else:
        assert after == bound or abs(after - bound) <= 1e-4 * bound  # shrunk exactly to it


def test_bound_is_per_batch_item():
    term, eps, mask = _tensors(0, 1.0)
    big = torch.cat([term, 100 * term])
    out, ratio = bound_guidance(big, torch.cat([eps, eps]), mask, 1.5 * float(ratio_of(term, eps, mask)))
    assert torch.equal(out[0], big[0]) and not torch.equal(out[1], big[1])
    assert ratio.shape == (2,)


def ratio_of(term, eps, mask):
    return region_rms(term, mask) / region_rms(eps, mask)
