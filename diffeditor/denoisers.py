"""The denoiser a sampler calls, built from composable wrappers (as k-diffusion wraps its model).

A *denoiser* is a callable ``model(z, step) -> Prediction``: the noise prediction ``eps`` (the
DDIM direction) and the guided one ``eps_hat`` (which enters x̂0 only) of the latent ``z`` at
denoising step ``step.index``. The innermost one, :class:`CFGDenoiser`, runs the UNet with
classifier-free guidance; each wrapper adds one mechanism of the method around it:

* :class:`MemoryBankSwitch`: injects the inversion's self-attention K/V on its steps;
* :class:`ImagePromptSwitch`: adds the image prompt with weight γ on its steps;
* :class:`RegionalGuidance`: ``eps_hat = eps + k·Σ_r m_r ⊙ ∇E_r`` on the guided steps;
* :class:`Pins`: after each step, holds parts of the latent to the inverted trajectory
  (:meth:`Denoiser.constrain`).

Besides ``__call__`` a denoiser offers ``rollback(z_prev, step)`` (one DDIM-inversion step
back to ``t``: time travel) and ``constrain(z, i)`` (applied by the sampler after each step).
Wrappers delegate both inward. A :class:`Step` lives for all passes of one denoising step, so
a wrapper may keep per-step state in it (the reference features, reused by time travel).
Nothing here reads a spec: the engine builds the stack from resolved :class:`Settings`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .sampling import ddim_invert_step

if TYPE_CHECKING:  # pragma: no cover
    from .schedule import Schedule


@dataclass(frozen=True)
class Settings:
    """Everything a sampler and the denoiser stack read, resolved from a spec: plain values
    and step-index sets (no pydantic inside the loop). Field names are the spec's."""

    steps: int
    seed: int
    schedule: Schedule
    guidance_scale: float = 4.0
    energy_scale: float = 500.0
    guidance_k: float = 0.04
    guidance_clip: float | None = None
    guidance_region: str = "regional"
    sde_strength: float = 0.4
    sde_strength_outside: float = 0.0
    sde_region: str = "regional"
    image_prompt_scale: float = 0.1
    image_prompt_inversion: bool = False
    guidance_precision: str = "model"
    memory_bank: str = "task"
    background_blend: float = 0.0
    feature_levels: tuple[int, ...] = (1, 2)
    feature_scale: int = 2
    #: the regional SDE's mask at latent resolution (None: global, eta inside everywhere)
    sde_mask: Tensor | None = None

    @classmethod
    def from_spec(cls, spec, schedule: Schedule, sde_mask: Tensor | None = None) -> Settings:
        names = [f for f in cls.__dataclass_fields__ if f not in ("schedule", "sde_mask")]
        return cls(schedule=schedule, sde_mask=sde_mask, **{n: getattr(spec, n) for n in names})

    def replace(self, **changes) -> Settings:
        import dataclasses

        return dataclasses.replace(self, **changes)


@dataclass
class Step:
    """One denoising step ``index`` at timestep ``t`` (ᾱ ``a_t`` -> ``a_prev``), shared by its
    time-travel passes. ``guided``: whether regional guidance applies; ``pass_index``: which
    pass this is; ``cache``: per-step state of the wrappers."""

    index: int
    t: Tensor
    a_t: Tensor
    a_prev: Tensor
    t_prev: Tensor
    guided: bool = False
    pass_index: int = 0
    cache: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prediction:
    """What a denoiser returns: ``eps`` (DDIM direction) and ``eps_hat`` (for x̂0)."""

    eps: Tensor
    eps_hat: Tensor


class Denoiser:
    """Base of the wrappers: delegates everything to ``inner``."""

    def __init__(self, inner: Denoiser):
        self.inner = inner

    def __call__(self, z: Tensor, step: Step) -> Prediction:
        return self.inner(z, step)

    def rollback(self, z_prev: Tensor, step: Step) -> Tensor:
        return self.inner.rollback(z_prev, step)

    def constrain(self, z: Tensor, i: int) -> Tensor:
        return self.inner.constrain(z, i)


class CFGDenoiser(Denoiser):
    """The UNet with classifier-free guidance: ``ε = ε_u + s·(ε_c − ε_u)`` (the conditional
    branch alone at ``s = 1``). A wrapper may ask, through ``step.cache["ride_along"] =
    (latents, contexts, names)``, for the features of other latents computed in the same UNet
    call (exact: rows are independent); they come back in ``step.cache["ride_along_features"]``."""

    def __init__(self, engine, cond: Tensor, context: Tensor, scale: float, bank=None,
                 levels: tuple[int, ...] = (1, 2), feature_scale: int = 2):
        self.engine, self.cond, self.context, self.scale = engine, cond, context, scale
        self.bank, self.levels, self.feature_scale = bank, tuple(levels), feature_scale

    def __call__(self, z: Tensor, step: Step) -> Prediction:
        eng = self.engine
        ride = step.cache.pop("ride_along", None)
        if ride is None:
            eps = eng.cfg_eps(z, step.t, self.cond, self.context, self.scale)
        else:
            zz, ctx, rows = eng._cfg_rows(z, self.cond, self.context, self.scale)
            out, feats = eng._eps_with_references(zz, ctx, rows, *ride, self.levels,
                                                  self.feature_scale, self.bank)
            step.cache["ride_along_features"] = feats
            eps = eng._cfg_combine(out, self.scale)
        return Prediction(eps, eps)

    def rollback(self, z_prev: Tensor, step: Step) -> Tensor:
        """One deterministic DDIM-inversion step from t_prev back to t (conditional prompt, no
        CFG, memory bank and image prompt off). As the method (reference §5), ε is evaluated
        where z_prev sits: ε_θ(z_{t-Δ}, t-Δ), the lower timestep. (Not decorated, so mutation
        testing reaches it.)"""
        with torch.no_grad():
            eps = self.engine.eps(z_prev, step.t_prev, self.cond, [True], a=step.a_prev)
            return ddim_invert_step(z_prev, eps, step.a_prev, step.a_t)

    def constrain(self, z: Tensor, i: int) -> Tensor:
        return z


class MemoryBankSwitch(Denoiser):
    """Injects the memory bank during the inner call on the steps ``steps`` (off otherwise,
    and always off again after the call)."""

    def __init__(self, inner: Denoiser, bank, steps: frozenset[int]):
        super().__init__(inner)
        self.bank, self.steps = bank, steps

    def __call__(self, z: Tensor, step: Step) -> Prediction:
        self.bank.step = step.index
        self.bank.mode = "inject" if step.index in self.steps else "off"
        try:
            return self.inner(z, step)
        finally:
            self.bank.mode = "off"


class ImagePromptSwitch(Denoiser):
    """Adds the image prompt with weight ``gamma`` during the inner call on ``steps``. While it
    is on, no other latent may ride along in the same UNet call (its rows would see it)."""

    def __init__(self, inner: Denoiser, image_prompt, gamma: float, steps: frozenset[int]):
        super().__init__(inner)
        self.image_prompt, self.gamma, self.steps = image_prompt, gamma, steps

    def __call__(self, z: Tensor, step: Step) -> Prediction:
        gamma = self.gamma if step.index in self.steps else 0.0
        if self.image_prompt is None:
            return self.inner(z, step)
        if gamma != 0:
            step.cache.pop("ride_along", None)
        self.image_prompt.set_scale(gamma)
        try:
            return self.inner(z, step)
        finally:
            self.image_prompt.set_scale(0.0)


class RegionalGuidance(Denoiser):
    """Regional score-based guidance on the guided steps: ``eps_hat = eps + k·Σ_r m_r ⊙
    ∇_z(λ·Σ w·E)``, with the reference features of the step (the inverted latents' decoder
    features) computed once per step: riding along in the noise-prediction call when
    ``merge`` (exact), else in a call of their own. ``log`` gets one entry per guided pass."""

    def __init__(self, inner: Denoiser, engine, plan, settings: Settings, inv, names,
                 contexts: Tensor, cond: Tensor, net=None, merge: bool = True,
                 log: list | None = None):
        super().__init__(inner)
        self.engine, self.plan, self.settings, self.inv = engine, plan, settings, inv
        self.names, self.contexts, self.cond, self.net = list(names), contexts, cond, net
        self.merge, self.log = merge, log

    def __call__(self, z: Tensor, step: Step) -> Prediction:
        if not step.guided:
            return self.inner(z, step)
        refs = step.cache.get("references")
        if refs is None and self.merge:
            step.cache["ride_along"] = (self.inv, self.names, self.contexts, step.index, step.t)
        out = self.inner(z, step)
        step.cache.pop("ride_along", None)
        if refs is None:
            refs = step.cache.pop("ride_along_features", None)
            if refs is None:
                refs = self.engine._reference_features(
                    self.inv, self.names, self.contexts, step.index, step.t, self.settings)
            step.cache["references"] = refs
        ratios: list = []
        s = self.settings
        correction = self.engine.guidance(z, step.t, self.cond, refs, self.plan, s, self.net,
                                          out.eps, ratios)
        if self.log is not None:
            self.log.append({"step": step.index, "pass": step.pass_index, "ratio": dict(ratios)})
        return Prediction(out.eps, out.eps + s.guidance_k * correction)


class Pins(Denoiser):
    """After each step ``i``, ``z = m·target(z_ref) + (1−m)·z`` for every pin active at ``i``
    (``pins``: ``(mask, target, until)``; ``target`` maps the inverted latents of the step,
    by image name, to a latent)."""

    def __init__(self, inner: Denoiser, pins: list[tuple[Tensor, Callable, int]],
                 latents: dict[str, list[Tensor]]):
        super().__init__(inner)
        self.pins, self.latents = pins, latents

    def constrain(self, z: Tensor, i: int) -> Tensor:
        z = self.inner.constrain(z, i)
        active = [(mask, target) for mask, target, until in self.pins if i < until]
        if active:
            n = len(next(iter(self.latents.values()))) - 1
            zs = {k: v[n - i - 1].to(z) for k, v in self.latents.items()}
            for mask, target in active:
                z = mask * target(zs) + (1 - mask) * z
        return z
