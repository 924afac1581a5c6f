"""Property tests of the sampler's math (diffeditor.sampling) and of the regional combination of
guidance gradients (Engine.guidance), against diffusers' own DDIMScheduler configured as SD 1.5.

Everything runs on small CPU tensors; no UNet is needed.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from diffusers import DDIMScheduler
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from diffeditor.engine import Counters, Engine
from diffeditor.interfaces import AttentionPolicy, EditPlan, EnergyTerm
from diffeditor.sampling import (
    DDIMTimesteps,
    combine_cfg,
    ddim_invert,
    ddim_invert_step,
    predict_x0,
    region_rms,
    regional_step,
    sde_sigma,
)

SHAPE = (1, 4, 8, 8)
FAST = settings(max_examples=40, deadline=None)
SLOW = settings(max_examples=15, deadline=None)


def sd15_scheduler(**overrides) -> DDIMScheduler:
    return DDIMScheduler(**{
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        **overrides,
    })


# other spacings: with no offset, the last-but-one step of "leading" denoises to t = 0 exactly
SCHEDULER_VARIANTS = [{}, {"steps_offset": 0}, {"timestep_spacing": "trailing", "steps_offset": 0},
                      {"timestep_spacing": "linspace", "steps_offset": 0},
                      {"set_alpha_to_one": True}]


@st.composite
def grid_point(draw):
    """(scheduler set to N steps, grid, step index i) for N in 2..100 and any i < N."""
    n = draw(st.integers(2, 100))
    i = draw(st.integers(0, n - 1))
    sched = sd15_scheduler()
    grid = DDIMTimesteps.from_scheduler(sched, n)  # also calls sched.set_timesteps(n)
    return sched, grid, i


def randn(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def make_mask(seed: int, kind: str, shape=SHAPE) -> torch.Tensor:
    """A binary latent mask (1, 1, h, w): random, all zero, all one or a half plane."""
    h, w = shape[-2:]
    if kind == "zeros":
        return torch.zeros(1, 1, h, w)
    if kind == "ones":
        return torch.ones(1, 1, h, w)
    if kind == "half":
        m = torch.zeros(1, 1, h, w)
        m[..., : w // 2] = 1
        return m
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, 1, h, w, generator=g) > 0.5).float()


seeds = st.integers(0, 2**31 - 1)
mask_kinds = st.sampled_from(["random", "zeros", "ones", "half"])
etas = st.floats(0.05, 1.0)


def close(a, b, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# -- DDIMTimesteps ---------------------------------------------------------------------------


@FAST
@given(n=st.integers(2, 100), variant=st.sampled_from(SCHEDULER_VARIANTS))
def test_grid_matches_scheduler(n, variant):
    sched = sd15_scheduler(**variant)
    grid = DDIMTimesteps.from_scheduler(sched, n)
    ts = grid.timesteps
    # diffusers' trailing spacing can give one timestep more than asked (floating-point arange):
    # the grid follows the scheduler (see the test below)
    assume(len(sched.timesteps) == n)
    assert grid.num_steps == n
    assert ts.dtype == torch.long
    assert torch.equal(ts, sched.timesteps.long())
    assert bool((ts[:-1] > ts[1:]).all()), "timesteps must be strictly descending"
    assert grid.alphas.dtype == torch.float64 and grid.alphas_prev.dtype == torch.float64
    assert torch.equal(grid.alphas, sched.alphas_cumprod.double()[ts])
    if sched.config.timestep_spacing == "leading":  # evenly spaced by the ratio below:
        # alphas_prev[i] is the alpha of the next (less noisy) grid timestep
        assert torch.equal(grid.alphas_prev[:-1], grid.alphas[1:])
    assert grid.alphas_prev[-1].item() == float(sched.final_alpha_cumprod)
    # and it is what diffusers' step() uses as alpha_prod_t_prev
    ratio = sched.config.num_train_timesteps // sched.num_inference_steps
    for i in range(n):
        prev = int(ts[i]) - ratio
        expect = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
        assert grid.alphas_prev[i].item() == float(expect)
    # the timestep each step denoises to (where time travel evaluates its rollback), >= 0
    assert grid.timesteps_prev.dtype == torch.long
    assert grid.timesteps_prev.tolist() == [max(int(t) - ratio, 0) for t in ts]


def test_grid_follows_the_scheduler_when_it_gives_an_extra_timestep():
    """Trailing spacing at 61 steps: diffusers' own arange yields 62 timesteps; the grid takes
    the scheduler's timesteps as they are (the edit runs 62 steps, as diffusers would)."""
    sched = sd15_scheduler(timestep_spacing="trailing", steps_offset=0)
    grid = DDIMTimesteps.from_scheduler(sched, 61)
    assert len(sched.timesteps) == 62
    assert grid.num_steps == 62 and torch.equal(grid.timesteps, sched.timesteps.long())


def test_grid_keeps_the_schedulers_alphas_exact():
    """The grid is float64 end to end: a float64 alpha table and a Python-float final alpha
    arrive unrounded (float32 would round both)."""
    table = torch.linspace(0.9991, 0.0047, 1000, dtype=torch.float64) ** 1.5

    def set_timesteps(n):
        sched.timesteps = torch.arange(0, 1000, 1000 // n).flip(0)

    sched = types.SimpleNamespace(config=types.SimpleNamespace(num_train_timesteps=1000),
                                  alphas_cumprod=table, final_alpha_cumprod=1 / 3,
                                  set_timesteps=set_timesteps)
    grid = DDIMTimesteps.from_scheduler(sched, 10)
    assert grid.timesteps.tolist() == list(range(900, -1, -100))
    assert torch.equal(grid.alphas, table[grid.timesteps])
    assert torch.equal(grid.alphas_prev[:-1], table[grid.timesteps[1:]])
    assert grid.alphas_prev[-1].item() == 1 / 3


def test_grid_50_steps_is_reference():
    grid = DDIMTimesteps.from_scheduler(sd15_scheduler(), 50)
    assert grid.timesteps.tolist() == [981 - 20 * i for i in range(50)]
    assert grid.timesteps[11].item() == 761 and grid.timesteps[19].item() == 601
    assert grid.timesteps[22].item() == 541 and grid.timesteps[28].item() == 421


@FAST
@given(gp=grid_point(), eta=st.floats(0.0, 1.0))
def test_sde_sigma_matches_diffusers_variance(gp, eta):
    sched, grid, i = gp
    t = int(grid.timesteps[i])
    prev = t - sched.config.num_train_timesteps // sched.num_inference_steps
    expect = eta * float(sched._get_variance(t, prev)) ** 0.5
    got = float(sde_sigma(eta, grid.alphas[i], grid.alphas_prev[i]))
    assert got == pytest.approx(expect, rel=1e-5, abs=1e-9)
    assert got <= math.sqrt(1 - float(grid.alphas_prev[i])) + 1e-12  # direction stays real


# -- regional_step vs diffusers ----------------------------------------------------------------


@FAST
@given(gp=grid_point(), seed=seeds, kind=mask_kinds, use_mask=st.booleans())
def test_eta_zero_is_diffusers_ddim(gp, seed, kind, use_mask):
    sched, grid, i = gp
    z, eps = randn(seed), randn(seed + 1)
    t = int(grid.timesteps[i])
    mask = make_mask(seed, kind) if use_mask else None
    out, x0 = regional_step(z, eps, grid.alphas[i], grid.alphas_prev[i], mask=mask)
    ref = sched.step(eps, t, z, eta=0.0)
    close(out, ref.prev_sample)
    close(x0, ref.pred_original_sample, atol=1e-4, rtol=1e-5)
    # noise is ignored (and not required) when both etas are 0
    out2, _ = regional_step(
        z, eps, grid.alphas[i], grid.alphas_prev[i], mask=mask, noise=randn(seed + 2)
    )
    assert torch.equal(out, out2)


@FAST
@given(gp=grid_point(), seed=seeds, eta=etas)
def test_global_sde_is_diffusers_ddim_with_eta(gp, seed, eta):
    sched, grid, i = gp
    z, eps, n = randn(seed), randn(seed + 1), randn(seed + 2)
    t = int(grid.timesteps[i])
    out, _ = regional_step(
        z, eps, grid.alphas[i], grid.alphas_prev[i], mask=None, eta_in=eta, eta_out=eta, noise=n
    )
    ref = sched.step(eps, t, z, eta=eta, variance_noise=n).prev_sample
    close(out, ref)
    # an all-ones mask with eta_in = eta is the same thing
    ones = make_mask(0, "ones")
    out1, _ = regional_step(
        z, eps, grid.alphas[i], grid.alphas_prev[i], mask=ones, eta_in=eta, eta_out=0.0, noise=n
    )
    close(out1, ref)


@FAST
@given(gp=grid_point(), seed=seeds, eta=etas)
def test_zero_mask_ignores_noise(gp, seed, eta):
    sched, grid, i = gp
    z, eps = randn(seed), randn(seed + 1)
    a, ap = grid.alphas[i], grid.alphas_prev[i]
    zero = make_mask(0, "zeros")
    kw = dict(mask=zero, eta_in=eta, eta_out=0.0)
    out1, _ = regional_step(z, eps, a, ap, noise=randn(seed + 2), **kw)
    out2, _ = regional_step(z, eps, a, ap, noise=randn(seed + 3), **kw)
    assert torch.equal(out1, out2)
    # ... and it is the ODE (eta = 0) step
    ode, _ = regional_step(z, eps, a, ap)
    assert torch.equal(out1, ode)
    close(out1, sched.step(eps, int(grid.timesteps[i]), z, eta=0.0).prev_sample)


@SLOW
@given(gp=grid_point(), seed=seeds, eta=st.floats(0.1, 1.0),
       kind=st.sampled_from(["random", "half"]))
def test_noise_inside_mask_has_sigma_in(gp, seed, eta, kind):
    _, grid, i = gp
    shape = (1, 4, 64, 64)
    z, eps, n = randn(seed, shape), randn(seed + 1, shape), randn(seed + 2, shape)
    a, ap = grid.alphas[i], grid.alphas_prev[i]
    m = make_mask(seed, kind, shape)
    sigma_in = float(sde_sigma(eta, a, ap))
    noisy, _ = regional_step(z, eps, a, ap, mask=m, eta_in=eta, eta_out=0.0, noise=n)
    clean, _ = regional_step(
        z, eps, a, ap, mask=m, eta_in=eta, eta_out=0.0, noise=torch.zeros(shape)
    )
    diff = noisy - clean
    inside = m.expand(shape).bool()
    assert torch.equal(diff[~inside], torch.zeros_like(diff[~inside])), "noise leaked outside"
    d_in = diff[inside].double()
    k = d_in.numel()
    assert k > 1000
    std = d_in.std().item()
    # std of a std estimate ~ sigma / sqrt(2k); allow 6 of those plus the estimate of n itself
    tol = 6 * sigma_in / math.sqrt(2 * k)
    assert abs(std - sigma_in) < tol + 1e-6, (std, sigma_in)
    # and exactly: the injected noise is sigma_in * n
    close(d_in, sigma_in * n[inside].double(), atol=1e-5 + 1e-4 * sigma_in, rtol=1e-3)
    # the deterministic part inside keeps the variance budget: |direction coefficient|^2
    # + sigma_in^2 = 1 - a_prev (check the eps direction coefficient)
    clean_eps2, _ = regional_step(
        z, eps + 1, a, ap, eps_hat=eps, mask=m, eta_in=eta, eta_out=0.0, noise=torch.zeros(shape)
    )
    coef = ((clean_eps2 - clean)[inside]).double().mean().item()
    expect = math.sqrt(max(1 - float(ap) - sigma_in**2, 0.0))
    assert coef == pytest.approx(expect, abs=2e-5)


@FAST
@given(gp=grid_point(), seed=seeds, eta1=st.floats(0.0, 1.0), eta2=st.floats(0.0, 1.0),
       eta_out=st.sampled_from([0.0, 0.3]), kind=mask_kinds)
def test_outside_mask_does_not_depend_on_eta_in(gp, seed, eta1, eta2, eta_out, kind):
    _, grid, i = gp
    z, eps, n = randn(seed), randn(seed + 1), randn(seed + 2)
    a, ap = grid.alphas[i], grid.alphas_prev[i]
    m = make_mask(seed, kind)
    o1, _ = regional_step(z, eps, a, ap, mask=m, eta_in=eta1, eta_out=eta_out, noise=n)
    o2, _ = regional_step(z, eps, a, ap, mask=m, eta_in=eta2, eta_out=eta_out, noise=n)
    outside = (m == 0).expand(SHAPE)
    assert torch.equal(o1[outside], o2[outside])
    # symmetric: inside never depends on eta_out
    o3, _ = regional_step(z, eps, a, ap, mask=m, eta_in=eta1, eta_out=0.7, noise=n)
    inside = ~outside
    assert torch.equal(o1[inside], o3[inside])
    # outside equals the global step with eta_out, inside the global step with eta_in
    g_out, _ = regional_step(z, eps, a, ap, eta_in=eta_out, eta_out=eta_out, noise=n)
    g_in, _ = regional_step(z, eps, a, ap, eta_in=eta1, eta_out=eta1, noise=n)
    close(o1[outside], g_out[outside])
    close(o1[inside], g_in[inside])


@FAST
@given(gp=grid_point(), seed=seeds, eta_in=st.floats(0.0, 1.0), kind=mask_kinds,
       scale=st.floats(-3.0, 3.0))
def test_eps_hat_enters_only_through_x0(gp, seed, eta_in, kind, scale):
    _, grid, i = gp
    z, eps, n, d = randn(seed), randn(seed + 1), randn(seed + 2), randn(seed + 3)
    a, ap = grid.alphas[i], grid.alphas_prev[i]
    m = make_mask(seed, kind)
    kw = dict(mask=m, eta_in=eta_in, eta_out=0.0, noise=n)
    base, x0_base = regional_step(z, eps, a, ap, **kw)
    none_hat, _ = regional_step(z, eps, a, ap, eps_hat=eps, **kw)
    assert torch.equal(base, none_hat), "eps_hat=None must mean eps_hat=eps"
    guided, x0 = regional_step(z, eps, a, ap, eps_hat=eps + scale * d, **kw)
    coef = math.sqrt(float(ap)) * -(math.sqrt(1 - float(a)) / math.sqrt(float(a)))
    close(guided - base, coef * scale * d, atol=2e-4, rtol=1e-4)
    # x̂0 is predict_x0 with ᾱ_t in the latent's dtype, bit for bit
    assert torch.equal(x0, predict_x0(z, eps + scale * d, a.float()))
    close(x0 - x0_base, -(math.sqrt(1 - float(a)) / math.sqrt(float(a))) * scale * d,
          atol=2e-4, rtol=1e-4)


# -- inversion ---------------------------------------------------------------------------------


@FAST
@given(gp=grid_point(), seed=seeds, kind=mask_kinds)
def test_invert_step_inverts_ddim_step(gp, seed, kind):
    _, grid, i = gp
    z, eps = randn(seed), randn(seed + 1)
    a, ap = grid.alphas[i], grid.alphas_prev[i]
    z_prev, _ = regional_step(z, eps, a, ap, mask=make_mask(seed, kind))
    back = ddim_invert_step(z_prev, eps, ap, a)
    close(back, z, atol=1e-4, rtol=1e-4)
    # and the other way round
    z_t = ddim_invert_step(z, eps, ap, a)
    fwd, _ = regional_step(z_t, eps, a, ap)
    close(fwd, z, atol=1e-4, rtol=1e-4)


@SLOW
@given(n=st.integers(2, 30), seed=seeds)
def test_ddim_invert_indexing_round_trip(n, seed):
    """latents[N - i] is the latent denoising step i starts from; eps_fn gets that index."""
    grid = DDIMTimesteps.from_scheduler(sd15_scheduler(), n)
    eps_by_index = {i: randn(seed + 10 + i) for i in range(n)}
    calls, ticks, seen, called_back = [], [], [], []

    def eps_fn(z, i):
        calls.append(i)
        seen.append(z)
        return eps_by_index[i]

    def callback(i, z):
        ticks.append(i)
        called_back.append(z)

    z0 = randn(seed)
    latents = ddim_invert(z0, eps_fn, grid, callback=callback)
    assert len(latents) == n + 1 and latents[0] is z0
    assert calls == list(range(n - 1, -1, -1)) and ticks == calls
    # eps_fn sees the latent being inverted, the callback the one just made
    assert all(a is b for a, b in zip(seen, latents[:-1]))
    assert all(a is b for a, b in zip(called_back, latents[1:]))
    z = latents[-1]
    for i in range(n):
        z, _ = regional_step(z, eps_by_index[i], grid.alphas[i], grid.alphas_prev[i])
        close(z, latents[n - i - 1], atol=1e-3, rtol=1e-4)


@FAST
@given(seed=seeds, scale=st.floats(0.0, 20.0))
def test_combine_cfg(seed, scale):
    u, c = randn(seed), randn(seed + 1)
    close(combine_cfg(u, c, scale), u + scale * (c - u))
    assert torch.equal(combine_cfg(u, c, 1.0), u + (c - u))
    assert torch.equal(combine_cfg(u, c, 0.0), u)


def test_noise_required_when_stochastic():
    grid = DDIMTimesteps.from_scheduler(sd15_scheduler(), 50)
    z = randn(0)
    with pytest.raises(ValueError, match="^a noise tensor is required when eta > 0$"):
        regional_step(z, z, grid.alphas[15], grid.alphas_prev[15], eta_in=0.4)
    with pytest.raises(ValueError, match="^a noise tensor is required when eta > 0$"):
        regional_step(z, z, grid.alphas[15], grid.alphas_prev[15], mask=make_mask(0, "half"),
                      eta_out=0.4)


@FAST
@given(a=st.floats(0.01, 0.99), gap=st.floats(1e-7, 1e-2), seed=seeds, eta=st.floats(0.05, 1.0),
       kind=mask_kinds)
def test_alphas_as_floats_or_float64_tensors_give_the_same_step(a, gap, seed, eta, kind):
    """The step's coefficients are computed in float64 whatever form the alphas come in:
    Python floats give exactly the float64 tensors' result. (diffusers' tables are float32
    values, which float32 would keep; close alphas off that grid show any rounding through
    σ's 1 − ᾱ_t/ᾱ_prev.)"""
    z, eps, n = randn(seed), randn(seed + 1), randn(seed + 2)
    a, ap = torch.tensor(a, dtype=torch.float64), torch.tensor(a + gap, dtype=torch.float64)
    kw = dict(mask=make_mask(seed, kind), eta_in=eta, eta_out=eta / 2, noise=n)
    want, want_x0 = regional_step(z, eps, a, ap, **kw)
    got, got_x0 = regional_step(z, eps, float(a), float(ap), **kw)
    assert torch.equal(got, want) and torch.equal(got_x0, want_x0)
    assert torch.equal(ddim_invert_step(z, eps, float(ap), float(a)), ddim_invert_step(z, eps, ap, a))


@FAST
@given(gp=grid_point(), seed=seeds, eta=st.floats(0.0, 1.0))
def test_mask_of_any_dtype(gp, seed, eta):
    """A boolean or float64 mask is the float32 mask: same step, in the latent's dtype."""
    _, grid, i = gp
    z, eps, n = randn(seed), randn(seed + 1), randn(seed + 2)
    a, ap = grid.alphas[i], grid.alphas_prev[i]
    m = make_mask(seed, "random")
    want, _ = regional_step(z, eps, a, ap, mask=m, eta_in=eta, noise=n)
    for other in (m.bool(), m.double()):
        got, _ = regional_step(z, eps, a, ap, mask=other, eta_in=eta, noise=n)
        assert got.dtype == torch.float32 and torch.equal(got, want)


@FAST
@given(seed=seeds)
def test_region_rms_by_hand(seed):
    """√(Σ m·x² / (C·Σ m)) per batch item, m the mask's weights, in x's dtype; 0 for an empty
    mask. C, h, w differ; one item's mask weighs less than one cell."""
    x = randn(seed, (2, 3, 4, 5)) + 0.1
    m = torch.rand(2, 1, 4, 5, generator=torch.Generator().manual_seed(seed)).double()
    m[1] = 0
    m[1, 0, 2, 3] = 0.01
    want = ((m * x.double() ** 2).sum((1, 2, 3)) / (3 * m.sum((1, 2, 3)))).sqrt()
    for mask in (m.float(), m):  # any mask dtype: the result follows x
        got = region_rms(x, mask)
        assert got.dtype == torch.float32 and got.shape == (2,)
        close(got.double(), want, atol=0, rtol=1e-5)
    # one mask broadcast over the batch; a boolean mask; an empty mask
    item1 = ((m[0] * x[1].double() ** 2).sum() / (3 * m[0].sum())).sqrt()
    close(region_rms(x, m[:1].float()).double(), torch.stack([want[0], item1]))
    b = m[:1] > 0.5
    close(region_rms(x, b), ((b * x**2).sum((1, 2, 3)) / (3 * b.sum())).sqrt())
    assert torch.equal(region_rms(x, torch.zeros(1, 1, 4, 5)), torch.zeros(2))


# -- regional guidance in Engine.guidance ------------------------------------------------------

_W = torch.randn((3, 4, 3, 3), generator=torch.Generator().manual_seed(7))


def _features(z, t, context, levels, scale, *net):  # (engine's optional `net` argument)
    # a differentiable, spatially mixing stand-in for the UNet decoder features
    f = torch.nn.functional.conv2d(z, _W.to(z), padding=1)
    return {1: torch.tanh(f), 2: f * f}


def _engine() -> Engine:
    eng = Engine.__new__(Engine)
    eng.counters = Counters()
    eng.features = _features
    eng.batched_region_grads = False  # one backward per region; the batched path is compared below
    return eng


def _energy_a(cur, refs):  # (B,)
    return ((cur[1] - refs["source"][1]) ** 2).flatten(1).mean(1)


def _energy_b(cur, refs):
    return (cur[2] * refs["source"][2]).flatten(1).mean(1) + cur[1].flatten(1).sum(1)


def _spec(region="regional", energy_scale=500.0):
    return types.SimpleNamespace(
        energy_scale=energy_scale, feature_levels=(1, 2), feature_scale=2, guidance_region=region
    )


def _plan(m, terms):
    return EditPlan(
        images={}, prompts={}, regions={"edit": m, "content": 1 - m}, energies=terms,
        sde_mask=None, attention=AttentionPolicy(mode="off"),
    )


@settings(max_examples=25, deadline=None)
@given(seed=seeds, kind=mask_kinds, w_edit=st.floats(0.1, 10.0), w_content=st.floats(0.1, 10.0),
       energy_scale=st.floats(1.0, 1000.0))
def test_guidance_correction_is_regional(seed, kind, w_edit, w_content, energy_scale):
    eng = _engine()
    z = randn(seed)
    t = torch.tensor(500)
    ref = {"source": _features(randn(seed + 1), t, None, None, None)}
    m = make_mask(seed, kind)
    edit = EnergyTerm("edit", _energy_a, w_edit, "edit")
    content = EnergyTerm("content", _energy_b, w_content, "content")
    spec = _spec(energy_scale=energy_scale)

    c_edit = eng.guidance(z, t, None, ref, _plan(m, [edit]), spec)
    c_content = eng.guidance(z, t, None, ref, _plan(m, [content]), spec)
    c_both = eng.guidance(z, t, None, ref, _plan(m, [edit, content]), spec)
    outside_edit = (m == 0).expand(SHAPE)
    assert torch.equal(c_edit[outside_edit], torch.zeros_like(c_edit[outside_edit]))
    assert torch.equal(c_content[~outside_edit], torch.zeros_like(c_content[~outside_edit]))
    close(c_both, c_edit + c_content, atol=1e-6, rtol=1e-6)
    assert not c_both.requires_grad

    # the values inside the region are λ·w·∇E of the term (the gradient, not something else)
    zg = z.clone().requires_grad_(True)
    cur = _features(zg, t, None, None, None)
    (g_edit,) = torch.autograd.grad(energy_scale * w_edit * _energy_a(cur, ref).sum(), zg)
    close(c_edit, m * g_edit, atol=1e-5 * float(g_edit.abs().max()) + 1e-6, rtol=1e-5)
    # the gradient is nonzero everywhere, so the zeros above are the mask's doing
    assert bool((g_edit != 0).all())

    # terms sharing a region are summed before differentiation; zero weights are skipped
    edit2 = EnergyTerm("edit2", _energy_b, w_content, "edit")
    c_shared = eng.guidance(z, t, None, ref, _plan(m, [edit, edit2]), spec)
    c_edit2 = eng.guidance(z, t, None, ref, _plan(m, [edit2]), spec)
    tol = 1e-5 * float(c_shared.abs().max()) + 1e-6  # summed before vs after autograd
    close(c_shared, c_edit + c_edit2, atol=tol, rtol=1e-5)
    zero = EnergyTerm("zero", _energy_b, 0.0, "content")
    assert torch.equal(eng.guidance(z, t, None, ref, _plan(m, [edit, zero]), spec), c_edit)
    assert torch.equal(
        eng.guidance(z, t, None, ref, _plan(m, [zero]), spec), torch.zeros_like(z)
    )


@settings(max_examples=20, deadline=None)
@given(seed=seeds, kind=mask_kinds, w_edit=st.floats(0.1, 10.0), w_content=st.floats(0.1, 10.0))
def test_global_guidance_is_one_gradient_everywhere(seed, kind, w_edit, w_content):
    eng = _engine()
    z = randn(seed)
    t = torch.tensor(500)
    ref = {"source": _features(randn(seed + 1), t, None, None, None)}
    m = make_mask(seed, kind)
    terms = [EnergyTerm("edit", _energy_a, w_edit, "edit"),
             EnergyTerm("content", _energy_b, w_content, "content")]
    before = eng.counters.unet_backward
    got = eng.guidance(z, t, None, ref, _plan(m, terms), _spec("global", 300.0))
    assert eng.counters.unet_backward - before == 1
    zg = z.clone().requires_grad_(True)
    cur = _features(zg, t, None, None, None)
    energy = w_edit * _energy_a(cur, ref) + w_content * _energy_b(cur, ref)
    (g,) = torch.autograd.grad(300.0 * energy.sum(), zg)
    close(got, g, atol=1e-5 * float(g.abs().max()) + 1e-6, rtol=1e-5)
    # regional and global differ unless the mask is trivial
    regional = eng.guidance(z, t, None, ref, _plan(m, terms), _spec("regional", 300.0))
    assert eng.counters.unet_backward - before == 3  # one backward per region
    eng.batched_region_grads = True
    batched = eng.guidance(z, t, None, ref, _plan(m, terms), _spec("regional", 300.0))
    assert eng.counters.unet_backward - before == 4  # both regions from one batched backward
    close(batched, regional, atol=1e-6 * float(regional.abs().max()) + 1e-7, rtol=1e-6)
    if kind not in ("zeros", "ones"):
        assert not torch.allclose(regional, got)
