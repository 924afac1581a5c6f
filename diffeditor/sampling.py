"""The shared sampler's math as small pure functions (DDIM, regional SDE/ODE, time travel).

Notation (DDIM, Song et al. 2021; DiffEditor, Mou et al. 2024):

==========  =====================================================================
``a_t``     ᾱ_t, the cumulative product of alphas at timestep t
``a_prev``  ᾱ_{t-Δ} for the next-less-noisy timestep (``final_alpha_cumprod`` past 0)
``eps``     ε_θ(z_t, t), the (CFG) noise prediction: the DDIM *direction* term
``eps_hat`` ε̂ = ε + guidance, used only for the x̂0 prediction (as the reference does)
``x0``      x̂0 = (z_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t
``sigma``   σ_t(η) = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev))
``m``       the SDE region mask (1 inside, 0 outside), latent resolution
==========  =====================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

NoiseFn = Callable[[Tensor, int], Tensor]
"""``eps_fn(z, timestep) -> eps``: the noise prediction used by inversion."""


@dataclass(frozen=True)
class DDIMTimesteps:
    """The discrete DDIM grid of one run: timesteps (most noisy first) and their ᾱ values.

    ``alphas[i]`` is ᾱ at ``timesteps[i]``; ``alphas_prev[i]`` is ᾱ at the timestep that step
    ``i`` denoises to, ``timesteps_prev[i]`` (``final_alpha_cumprod`` after the last step, whose
    ``timesteps_prev`` is clamped to 0).
    """

    timesteps: Tensor  # (N,) long, descending
    alphas: Tensor  # (N,) float64
    alphas_prev: Tensor  # (N,) float64
    timesteps_prev: Tensor  # (N,) long: t - Δ, the timestep step i denoises to (>= 0)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int) -> "DDIMTimesteps":
        """Read the grid from a diffusers ``DDIMScheduler`` (its spacing, offset and ᾱ table)."""
        scheduler.set_timesteps(num_steps)
        ts = scheduler.timesteps.clone().long()
        ac = scheduler.alphas_cumprod.double()
        final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
        ratio = scheduler.config.num_train_timesteps // num_steps
        prev = ts - ratio
        a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)
        return cls(ts, ac[ts], a_prev, prev.clamp(min=0))


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
"""What a UNet may predict (diffusers' scheduler ``prediction_type``): the noise ε, the velocity
v = √ᾱ·ε − √(1−ᾱ)·x0 (SD 2.x 768-v), or the clean sample x0."""


def eps_from_prediction(out: Tensor, z: Tensor, a: Tensor | float, prediction_type: str) -> Tensor:
    """The noise ε implied by a model's output ``out`` for the latent ``z`` at noise level
    ``a`` = ᾱ (the one place a prediction type is read; every ε consumer gets this):

    * ``epsilon``: ``out`` itself (returned as is: ε-models stay bit-identical);
    * ``v_prediction``: ε = √ᾱ·v + √(1−ᾱ)·z;
    * ``sample``: ε = (z − √ᾱ·x0)/√(1−ᾱ).

    ``a`` is the level of ``z`` (as diffusers' ``DDIMScheduler`` and ``DDIMInverseScheduler``
    read it): in a denoising step the step's own ᾱ_t, in an inversion step (the model called at
    the next timestep on the less noisy latent) the latent's ᾱ_prev."""
    if prediction_type == "epsilon":
        return out
    a = torch.as_tensor(a, dtype=torch.float64)
    if prediction_type == "v_prediction":
        return float(a.sqrt()) * out + float((1 - a).sqrt()) * z.to(out.dtype)
    if prediction_type == "sample":
        return (z.to(out.dtype) - float(a.sqrt()) * out) / float((1 - a).clamp(min=1e-12).sqrt())
    raise ValueError(f"prediction_type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")


def sde_sigma(eta: float | Tensor, a_t: Tensor, a_prev: Tensor) -> Tensor:
    """σ_t(η) = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev)), DDIM's stochasticity (diffusers'
    ``DDIMScheduler._get_variance`` times η)."""
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    return eta * var.clamp(min=0).sqrt()


def predict_x0(z: Tensor, eps_hat: Tensor, a_t: Tensor) -> Tensor:
    """x̂0 = (z_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t."""
    return (z - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()


def regional_step(
    z: Tensor,
    eps: Tensor,
    a_t: Tensor,
    a_prev: Tensor,
    *,
    eps_hat: Tensor | None = None,
    mask: Tensor | None = None,
    eta_in: float = 0.0,
    eta_out: float = 0.0,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One regional SDE/ODE DDIM step from ``t`` to ``t_prev``.

    ``z_prev = m·[√ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ_in²)·ε + σ_in·n]
             + (1−m)·[√ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ_out²)·ε + σ_out·n]``

    with one noise draw ``n`` shared by both regions (``mask=None`` means inside everywhere). ``eps_hat`` (guided noise, defaults to
    ``eps``) enters only through x̂0. With ``eta_in = eta_out = 0`` this is deterministic DDIM.

    Returns ``(z_prev, x0)``.
    """
    a_t = torch.as_tensor(a_t, dtype=torch.float64)
    a_prev = torch.as_tensor(a_prev, dtype=torch.float64)
    x0 = predict_x0(z, eps if eps_hat is None else eps_hat, a_t.to(z.dtype))
    s_in = float(sde_sigma(eta_in, a_t, a_prev))
    s_out = float(sde_sigma(eta_out, a_t, a_prev))
    base = float(a_prev.sqrt()) * x0

    def branch(s: float) -> Tensor:
        out = base + float((1 - a_prev - s * s).clamp(min=0).sqrt()) * eps
        if s > 0:
            if noise is None:
                raise ValueError("a noise tensor is required when eta > 0")
            out = out + s * noise
        return out

    if mask is None:  # no region given: the whole latent is "inside"
        return branch(s_in), x0
    m = mask.to(z.dtype)
    return m * branch(s_in) + (1 - m) * branch(s_out), x0


def ddim_invert_step(z_prev: Tensor, eps: Tensor, a_prev: Tensor, a_t: Tensor) -> Tensor:
    """One deterministic DDIM inversion step from ``t_prev`` (less noisy) to ``t``:
    ``z_t = √ᾱ_t·(z_prev − √(1−ᾱ_prev)·ε)/√ᾱ_prev + √(1−ᾱ_t)·ε`` with ``ε = ε_θ(z_prev, t)``."""
    a_t = torch.as_tensor(a_t, dtype=torch.float64)
    a_prev = torch.as_tensor(a_prev, dtype=torch.float64)
    x0 = (z_prev - float((1 - a_prev).sqrt()) * eps) / float(a_prev.sqrt())
    return float(a_t.sqrt()) * x0 + float((1 - a_t).sqrt()) * eps


def ddim_invert(
    z0: Tensor,
    eps_fn: NoiseFn,
    grid: DDIMTimesteps,
    callback: Callable[[int, Tensor], None] | None = None,
) -> list[Tensor]:
    """Deterministic DDIM inversion.

    Returns all ``N + 1`` latents ``[z_0, z_1, ..., z_N]`` where ``z_k`` sits at the noise level
    of denoising step ``N − k`` (so ``z_N`` is the initial latent of editing and
    ``latents[N − i]`` is the reference latent for denoising step ``i``).
    ``eps_fn(z, timestep_index)`` receives the *denoising* step index whose timestep the new
    latent will sit at (``i = N−1 … 0``) so hooks can key their state by it.
    """
    latents = [z0]
    z = z0
    n = grid.num_steps
    for k in range(n):
        i = n - 1 - k  # denoising index of the timestep we invert *to*
        eps = eps_fn(z, i)
        z = ddim_invert_step(z, eps, grid.alphas_prev[i], grid.alphas[i])
        latents.append(z)
        if callback is not None:
            callback(i, z)
    return latents


def region_rms(x: Tensor, mask: Tensor) -> Tensor:
    """Root mean square of ``x`` ``(B, C, h, w)`` over the cells of ``mask`` ``(1|B, 1, h, w)``
    (weighted by the mask), per batch item: ``(B,)``; 0 for an empty mask."""
    m = mask.to(x.dtype)
    total = (m.sum(dim=(1, 2, 3)) * x.shape[1]).clamp(min=1e-12)
    return ((m * x.square()).sum(dim=(1, 2, 3)) / total).sqrt()


def bound_guidance(term: Tensor, eps: Tensor, mask: Tensor, max_ratio: float) -> tuple[Tensor, Tensor]:
    """Scale a region's guidance term ``k·∇E`` so that its RMS inside ``mask`` is at most
    ``max_ratio`` times the RMS of the noise prediction ``eps`` there; a term already inside the
    bound is returned unchanged. Direction is kept. Returns ``(term, ratio before bounding)``."""
    g, e = region_rms(term, mask), region_rms(eps, mask)
    ratio = g / e.clamp(min=1e-12)
    factor = torch.where(ratio > max_ratio, max_ratio / ratio.clamp(min=1e-12), torch.ones_like(ratio))
    return term * factor.view(-1, 1, 1, 1), ratio


def combine_cfg(eps_uncond: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: ε = ε_u + s·(ε_c − ε_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)
