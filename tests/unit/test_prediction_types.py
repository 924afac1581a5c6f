"""Prediction types against diffusers' own schedulers: one step of ours (ε from the model's
output by :func:`eps_from_prediction`, then the shared DDIM arithmetic) equals one step of
diffusers' ``DDIMScheduler`` / ``DDIMInverseScheduler`` configured with that
``prediction_type``: the new latent and x̂0, with and without SDE noise, inside and outside a
region. Computed in float64, so the bound is rounding only."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from diffeditor.sampling import (
    PREDICTION_TYPES,
    DDIMTimesteps,
    ddim_invert_step,
    eps_from_prediction,
    regional_step,
)

EXAMPLES = settings(max_examples=60, deadline=None)
TOL = dict(rtol=1e-9, atol=1e-9)


def _config(prediction_type: str, beta_end: float, set_alpha_to_one: bool, offset: int) -> dict:
    return dict(beta_start=0.00085, beta_end=beta_end, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=set_alpha_to_one, steps_offset=offset,
                prediction_type=prediction_type)


def _float64(sch):
    """The scheduler's ᾱ table in float64 (it keeps float32 scalars, whose rounding would
    otherwise set the bound), for a comparison down to rounding."""
    sch.alphas_cumprod = sch.alphas_cumprod.double()
    for name in ("final_alpha_cumprod", "initial_alpha_cumprod"):
        if hasattr(sch, name):
            setattr(sch, name, torch.as_tensor(getattr(sch, name), dtype=torch.float64))
    return sch


def _draw(seed: int, shape=(1, 4, 3, 5)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)]


cases = dict(
    prediction_type=st.sampled_from(PREDICTION_TYPES),
    n=st.integers(2, 60),
    pick=st.floats(0, 1),
    beta_end=st.sampled_from([0.012, 0.02]),
    alpha_one=st.booleans(),
    offset=st.sampled_from([0, 1]),
    seed=st.integers(0, 2**16),
)


@EXAMPLES
@given(eta=st.sampled_from([0.0, 0.3, 1.0]), **cases)
def test_one_step_equals_diffusers_ddim(prediction_type, n, pick, beta_end, alpha_one, offset, seed, eta):
    sch = _float64(DDIMScheduler(**_config(prediction_type, beta_end, alpha_one, offset)))
    grid = DDIMTimesteps.from_scheduler(sch, n)
    i = min(int(pick * n), n - 1)
    z, out, noise = _draw(seed)
    theirs = sch.step(out, int(grid.timesteps[i]), z, eta=eta, variance_noise=noise)
    eps = eps_from_prediction(out, z, grid.alphas[i], prediction_type)
    ours, x0 = regional_step(z, eps, grid.alphas[i], grid.alphas_prev[i], eta_in=eta,
                             noise=noise if eta > 0 else None)
    torch.testing.assert_close(x0, theirs.pred_original_sample, **TOL)
    torch.testing.assert_close(ours, theirs.prev_sample, **TOL)


@EXAMPLES
@given(eta_in=st.sampled_from([0.2, 1.0]), eta_out=st.sampled_from([0.0, 0.5]), **cases)
def test_regional_sde_is_diffusers_ddim_inside_and_outside(prediction_type, n, pick, beta_end, alpha_one,
                                                           offset, seed, eta_in, eta_out):
    sch = _float64(DDIMScheduler(**_config(prediction_type, beta_end, alpha_one, offset)))
    grid = DDIMTimesteps.from_scheduler(sch, n)
    i = min(int(pick * n), n - 1)
    z, out, noise = _draw(seed)
    mask = (torch.rand((1, 1, 3, 5), generator=torch.Generator().manual_seed(seed)) > 0.5).double()
    t = int(grid.timesteps[i])
    inside = sch.step(out, t, z, eta=eta_in, variance_noise=noise).prev_sample
    outside = sch.step(out, t, z, eta=eta_out, variance_noise=noise).prev_sample
    eps = eps_from_prediction(out, z, grid.alphas[i], prediction_type)
    ours, _ = regional_step(z, eps, grid.alphas[i], grid.alphas_prev[i], mask=mask,
                            eta_in=eta_in, eta_out=eta_out, noise=noise)
    torch.testing.assert_close(ours, mask * inside + (1 - mask) * outside, **TOL)


@EXAMPLES
@given(**cases)
def test_one_inversion_step_equals_diffusers_ddim_inverse(prediction_type, n, pick, beta_end, alpha_one,
                                                          offset, seed):
    cfg = _config(prediction_type, beta_end, alpha_one, offset)
    sch = _float64(DDIMScheduler(**cfg))
    grid = DDIMTimesteps.from_scheduler(sch, n)
    inv = _float64(DDIMInverseScheduler(**cfg))
    inv.set_timesteps(n)
    i = min(int(pick * n), n - 1)
    if prediction_type == "sample" and alpha_one:
        i = min(i, n - 2)  # the first inversion step starts at ᾱ = 1: ε of an x0-model is 0/0
    z, out, _ = _draw(seed)
    theirs = inv.step(out, int(grid.timesteps[i]), z).prev_sample
    # the model is called at timestep t on the less noisy latent: its output is read at that
    # latent's own level ᾱ_prev
    # (ᾱ as a Python float here: the conversion computes in float64 whatever it is given)
    eps = eps_from_prediction(out, z, float(grid.alphas_prev[i]), prediction_type)
    ours = ddim_invert_step(z, eps, grid.alphas_prev[i], grid.alphas[i])
    torch.testing.assert_close(ours, theirs, **TOL)


def test_epsilon_is_passed_through_untouched():
    out, z = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert eps_from_prediction(out, z, torch.tensor(0.5), "epsilon") is out


def test_an_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="not one of epsilon, v_prediction, sample"):
        eps_from_prediction(torch.zeros(1), torch.zeros(1), 0.5, "flow")
