"""Samplers: short functions of a denoiser (:mod:`diffeditor.denoisers`), a DDIM grid and
resolved :class:`~diffeditor.denoisers.Settings`, as in k-diffusion.

``fn(model, z, grid, settings, callback=None) -> z0``: ``model(z, step)`` gives the step's
noise predictions (``eps`` for the DDIM direction, ``eps_hat`` with guidance for x̂0),
``model.rollback(z_prev, step)`` goes back one step (time travel), ``model.constrain(z, i)``
applies the pins; ``callback(i, z, x0)`` is called after each step ``i``.

A :class:`Sampler` is what plugins register (hook ``register_samplers``); a spec selects one
by name (field ``sampler``). Its ``configure`` may adjust the settings before the engine
builds the denoiser from them (the DragonDiffusion sampler turns the SDE, time travel and the
image prompt off and guides every early step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .denoisers import Settings, Step
from .sampling import DDIMTimesteps, regional_step

SampleFn = Callable[..., Tensor]
StepCallback = Callable[[int, Tensor, Tensor], object]


@dataclass(frozen=True)
class Sampler:
    """A registered sampler.

    Attributes:
        name: what a spec's ``sampler`` field says (unique across plugins).
        fn: ``fn(model, z, grid, settings, callback=None) -> latent`` (module docstring).
        description: one line for ``diffeditor plugins`` and error messages.
        configure: ``configure(settings, schedules) -> settings``, called before the denoiser
            is built; ``schedules`` are the registered named schedules (by name). Default: as is.
    """

    name: str
    fn: SampleFn
    description: str = ""
    configure: Callable[[Settings, dict], Settings] | None = None

    def settings(self, settings: Settings, schedules: dict | None = None) -> Settings:
        return self.configure(settings, schedules or {}) if self.configure else settings


def make_step(grid: DDIMTimesteps, i: int, device, guided: bool = False) -> Step:
    """The :class:`Step` of denoising step ``i`` of ``grid``."""
    return Step(i, grid.timesteps[i].to(device), grid.alphas[i], grid.alphas_prev[i],
                grid.timesteps_prev[i].to(device), guided)


def sample_ddim(model, z: Tensor, grid: DDIMTimesteps, settings: Settings | None = None,
                callback: StepCallback | None = None) -> Tensor:
    """Plain deterministic DDIM (η = 0) over the denoiser: no guidance, no SDE, no time
    travel (the memory bank, image prompt and pins still act, on their steps)."""
    for i in range(grid.num_steps):
        step = make_step(grid, i, z.device)
        out = model(z, step)
        z, x0 = regional_step(z, out.eps, step.a_t, step.a_prev)
        z = model.constrain(z, i)
        if callback is not None:
            callback(i, z, x0)
    return z


def sample_diffeditor(model, z: Tensor, grid: DDIMTimesteps, s: Settings,
                      callback: StepCallback | None = None) -> Tensor:
    """DiffEditor (Mou et al. 2024, Alg. 1): DDIM with regional score-based guidance on the
    guided steps, a regional SDE (η inside the edit region, η_out outside) on the SDE steps,
    and time travel (U guided passes, each but the last rolled back to t) on its steps."""
    sched = s.schedule
    gen = torch.Generator("cpu").manual_seed(s.seed)
    for i in range(grid.num_steps):
        step = make_step(grid, i, z.device, guided=i in sched.guidance)
        sde = i in sched.sde and (s.sde_strength > 0 or s.sde_strength_outside > 0)
        eta_in = s.sde_strength if sde else 0.0
        eta_out = (s.sde_strength_outside if s.sde_mask is not None else eta_in) if sde else 0.0
        passes = sched.passes(i) if step.guided else 1
        for u in range(passes):
            step.pass_index = u
            out = model(z, step)
            noise = torch.randn(z.shape, generator=gen).to(z.device) if sde else None
            z_prev, x0 = regional_step(z, out.eps, step.a_t, step.a_prev, eps_hat=out.eps_hat,
                                       mask=s.sde_mask, eta_in=eta_in, eta_out=eta_out, noise=noise)
            if u < passes - 1:  # time travel: back to t for another guided pass
                z = model.rollback(z_prev, step)
        z = model.constrain(z_prev, i)
        if callback is not None:
            callback(i, z, x0)
    return z


def sample_dragondiffusion(model, z: Tensor, grid: DDIMTimesteps, s: Settings,
                           callback: StepCallback | None = None) -> Tensor:
    """DragonDiffusion (Mou et al. 2023): deterministic DDIM with score-based guidance on
    every step of its guidance window; no SDE, no time travel."""
    for i in range(grid.num_steps):
        step = make_step(grid, i, z.device, guided=i in s.schedule.guidance)
        out = model(z, step)
        z, x0 = regional_step(z, out.eps, step.a_t, step.a_prev, eps_hat=out.eps_hat)
        z = model.constrain(z, i)
        if callback is not None:
            callback(i, z, x0)
    return z


def _dragondiffusion_settings(s: Settings, schedules: dict) -> Settings:
    """Guidance on every step of the ``dragondiffusion`` schedule's guidance windows; SDE, time
    travel and the image prompt off (DragonDiffusion has none of them)."""
    import dataclasses

    from .schedule import BUILTIN_SCHEDULES, union_indices

    preset = schedules.get("dragondiffusion", BUILTIN_SCHEDULES["dragondiffusion"]).spec
    sched = dataclasses.replace(
        s.schedule, guidance=frozenset(union_indices(preset.guidance, s.steps)), sde=frozenset(),
        time_travel=frozenset(), time_travel_repeats=1, image_prompt=frozenset())
    return s.replace(schedule=sched, image_prompt_scale=0.0, sde_strength=0.0,
                     sde_strength_outside=0.0, image_prompt_inversion=False)


DIFFEDITOR = Sampler(
    "diffeditor", sample_diffeditor,
    "DiffEditor: regional score-based guidance, regional SDE/ODE, time travel (the default)")
DRAGONDIFFUSION = Sampler(
    "dragondiffusion", sample_dragondiffusion,
    "DragonDiffusion: guidance at every early step, deterministic DDIM, no SDE, no time travel",
    _dragondiffusion_settings)
DDIM = Sampler("ddim", sample_ddim, "plain DDIM over the edit's denoiser: no guidance, SDE or time travel")
BUILTIN_SAMPLERS = {x.name: x for x in (DIFFEDITOR, DRAGONDIFFUSION, DDIM)}
