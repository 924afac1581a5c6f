"""Energy building blocks of DiffEditor / DragonDiffusion (method reference §4), public API for
task plugins (the built-in tasks build their energies from these).

Energies have the form ``w / (1 + 4*S)`` with ``S`` a mean similarity (minimising raises the
similarity); "contrast" terms are ``w * S`` (minimising lowers it). All reductions are float32.
Masks here are on the feature grid, ``(1, 1, Hf, Wf)`` float {0, 1}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ALPHA, BETA = 1.0, 4.0  # DragonDiffusion's 1/(alpha + beta*sim)


def cosine_map(a: Tensor, b: Tensor) -> Tensor:
    """Channel-wise cosine similarity per cell: ``(B, C, H, W) x (B, C, H, W) -> (B, H, W)``."""
    return F.cosine_similarity(a.float(), b.float(), dim=1, eps=1e-8)


def sim01(c: Tensor) -> Tensor:
    """Cosine mapped to [0, 1]."""
    return (c + 1) / 2


def inverse_energy(w: float, s: Tensor) -> Tensor:
    """``w / (alpha + beta*s)``."""
    return w / (ALPHA + BETA * s)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` ``(B, H, W)`` over the cells of ``mask`` ``(1, 1, H, W)``: ``(B,)``.

    An empty mask gives 0 (and so a constant energy with zero gradient), never NaN.
    """
    m = mask[:, 0].to(x.dtype)
    return (x * m).sum(dim=(-2, -1)) / m.sum(dim=(-2, -1)).clamp(min=1.0)


def mean_feature(f: Tensor, mask: Tensor) -> Tensor:
    """Mean feature vector over a mask: ``(B, C, H, W) -> (B, C)``."""
    m = mask.to(f.dtype)
    return (f * m).sum(dim=(-2, -1)) / m.sum(dim=(-2, -1)).clamp(min=1.0)


def level_mean(values: list[Tensor]) -> Tensor:
    """Average of per-level energies (the reference weights each of its two levels by 0.5)."""
    return torch.stack(values).mean(0)


# -- named, reusable energy terms (hook ``register_energies``) ---------------------------------

def mean_feature_energy(mask: Tensor, reference: str, reference_mask: Tensor):
    """Make the mean feature inside ``mask`` match the mean feature of image ``reference``
    inside ``reference_mask``: ``Σ_levels 1/(1 + 4·sim01(cos(mean_f, mean_ref)))``. The one
    mean-feature energy (appearance's edit term, move's inpainting term)."""

    def energy(cur, refs):
        ref = refs[reference]
        return sum(
            inverse_energy(1.0, sim01(F.cosine_similarity(
                mean_feature(f, mask), mean_feature(ref[lv], reference_mask), dim=1)))
            for lv, f in cur.items()
        )

    return energy


def content_energy(mask: Tensor, reference: str = "source"):
    """Keep everything outside ``mask`` like image ``reference``:
    ``Σ_levels 1/(1 + 4·mean_{outside} sim01(cos(f, f_ref)))``."""

    def energy(cur, refs):
        src = refs[reference]
        outside = 1 - mask
        return sum(
            inverse_energy(1.0, masked_mean(sim01(cosine_map(f, src[lv])), outside))
            for lv, f in cur.items()
        )

    return energy


@dataclass(frozen=True)
class Energy:
    """A registered energy: ``build(**params)`` returns an ``EnergyFn`` (``fn(current,
    references) -> (B,)``) for an :class:`~diffeditor.interfaces.EnergyTerm`."""

    name: str
    build: Callable[..., Callable]
    description: str = ""


BUILTIN_ENERGIES: dict[str, Energy] = {
    "mean_feature": Energy("mean_feature", mean_feature_energy,
                           "mean feature in a mask -> an image's mean feature in its mask "
                           "(params: mask, reference, reference_mask)"),
    "content": Energy("content", content_energy,
                      "features outside a mask stay like an image's (params: mask, reference)"),
}
