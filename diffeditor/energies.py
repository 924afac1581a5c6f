"""Energy building blocks of DiffEditor / DragonDiffusion (method reference §4), public API for
task plugins (the built-in tasks build their energies from these).

Energies have the form ``w / (1 + 4*S)`` with ``S`` a mean similarity (minimising raises the
similarity); "contrast" terms are ``w * S`` (minimising lowers it). All reductions are float32.
Masks here are on the feature grid, ``(1, 1, Hf, Wf)`` float {0, 1}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
class EnergyContext:
    """What a spec-named energy's ``from_spec`` receives: the edit's regions on the feature grid
    (``(1, 1, Hf, Wf)`` float {0, 1}, ``Hf, Wf = geom.feature_hw``) and the names of the images
    whose features reach the energy in ``references``.

    Attributes:
        regions: ``edit`` (the region being edited: the task's ``edit`` region, or the union of
            its ``edit:*`` regions; the whole image for a task with none, such as face),
            ``content`` (the region to keep: ``1 - edit``) and ``global`` (everywhere), plus
            every other region of the task's plan by its own name.
        images: the inverted images' names (``"source"``, and e.g. ``"reference"``).
        geom: the edit's sizes (:class:`~diffeditor.interfaces.Geometry`).
    """

    regions: dict[str, Tensor]
    images: tuple[str, ...]
    geom: Any = None

    @property
    def edit(self) -> Tensor:
        return self.regions["edit"]

    @property
    def content(self) -> Tensor:
        return self.regions["content"]

    def region(self, name: str) -> Tensor:
        """A region by name; ``ValueError`` naming the known ones for any other."""
        if name not in self.regions:
            raise ValueError(f"no region {str(name)[:60]!r}; regions: {', '.join(sorted(self.regions))}")
        return self.regions[name]

    def image(self, name: str) -> str:
        """An image name, checked; ``ValueError`` naming the edit's images for any other."""
        if name not in self.images:
            raise ValueError(f"no image {str(name)[:60]!r}; this edit's images: {', '.join(self.images)}")
        return name


@dataclass(frozen=True)
class Energy:
    """A registered energy (hook ``register_energies``).

    Attributes:
        name: unique across plugins; what a spec's ``energies: [{name: ...}]`` says.
        build: ``build(**params) -> fn`` for task code: ``fn(current, references) -> (B,)``, the
            ``fn`` of an :class:`~diffeditor.interfaces.EnergyTerm` (params: tensors, names).
        description: one line for ``diffeditor plugins`` and error messages.
        from_spec: ``from_spec(ctx, **params) -> fn``: the same energy built from a spec file,
            ``ctx`` an :class:`EnergyContext` (the edit's regions on the feature grid), ``params``
            the spec's JSON values (region and image names, numbers). ``None``: the energy
            cannot be named in a spec (it needs tensors only a task has).
        region: where its gradient applies when a spec names it without a ``region``
            (``edit``, ``content`` or ``global``).
    """

    name: str
    build: Callable[..., Callable]
    description: str = ""
    from_spec: Callable[..., Callable] | None = None
    region: str = "edit"


def _mean_feature_from_spec(ctx: EnergyContext, mask: str = "edit", reference: str = "source",
                            reference_mask: str = "content"):
    """Spec form of :func:`mean_feature_energy`: regions and the image by name."""
    return mean_feature_energy(ctx.region(mask), ctx.image(reference), ctx.region(reference_mask))


def _content_from_spec(ctx: EnergyContext, reference: str = "source"):
    """Spec form of :func:`content_energy`: keep everything outside the edit region."""
    return content_energy(ctx.edit, ctx.image(reference))


BUILTIN_ENERGIES: dict[str, Energy] = {
    "mean_feature": Energy("mean_feature", mean_feature_energy,
                           "mean feature in a mask -> an image's mean feature in its mask "
                           "(params: mask, reference, reference_mask)",
                           _mean_feature_from_spec, "edit"),
    "content": Energy("content", content_energy,
                      "features outside a mask stay like an image's (params: mask, reference)",
                      _content_from_spec, "content"),
}


# -- energies named in a spec file (field ``energies``) ----------------------------------------

#: the regions a spec-named energy's gradient may apply in
SPEC_REGIONS = ("edit", "content", "global")


def spec_context(plan, geom) -> EnergyContext:
    """The :class:`EnergyContext` of ``plan``: its latent-grid regions on the feature grid, with
    ``edit``, ``content`` and ``global`` always there."""
    from .masks import grid_mask

    lh = tuple(geom.latent_hw)
    latent = standard_regions(plan.regions, lh)
    feats = {name: grid_mask(m.float(), tuple(geom.feature_hw)) for name, m in latent.items()}
    return EnergyContext(feats, tuple(plan.images), geom)


def standard_regions(regions: dict[str, Tensor], hw: tuple[int, int]) -> dict[str, Tensor]:
    """``regions`` plus ``edit`` (the union of ``edit`` / ``edit:*``; everywhere when there is
    none), ``content`` (``1 - edit``) and ``global`` (ones) where a plan lacks them."""
    out = dict(regions)
    edits = [m for name, m in regions.items() if name == "edit" or name.startswith("edit:")]
    if "edit" not in out:
        edit = torch.ones(1, 1, *hw)
        if edits:
            edit = torch.clamp(torch.stack([m.float() for m in edits]).sum(0), max=1)
        out["edit"] = edit
    out.setdefault("content", 1 - out["edit"])
    out.setdefault("global", torch.ones(1, 1, *hw))
    return out


def check_spec_energy(energy: Energy, params: dict) -> None:
    """Whether ``params`` fit ``energy.from_spec`` (names only, no tensors): ``ValueError``."""
    import inspect

    if energy.from_spec is None:
        raise ValueError(f"energy {energy.name!r} cannot be named in a spec (it needs a task's "
                         f"tensors)")
    sig = inspect.signature(energy.from_spec)
    try:
        sig.bind(None, **params)
    except TypeError as exc:
        takes = [p for p in list(sig.parameters)[1:]]
        raise ValueError(f"energy {energy.name!r}: {exc}; it takes "
                         f"{', '.join(takes) or 'no params'}") from None


def add_spec_energies(plan, uses, energies: dict[str, Energy], geom):
    """``plan`` with the terms of a spec's ``energies`` (:class:`~diffeditor.specs.EnergyUse`
    list) appended after the task's own (which are unchanged); ``plan`` itself when ``uses``
    is empty. ``energies``: the registered ones by name. Raises ``ValueError`` naming the entry
    (``energies[i]``) for an unknown name or wrong params."""
    import dataclasses

    from .interfaces import EnergyTerm

    if not uses:
        return plan
    ctx = spec_context(plan, geom)
    terms = list(plan.energies)
    regions = dict(plan.regions)
    extra = standard_regions(plan.regions, tuple(geom.latent_hw))
    for i, use in enumerate(uses):
        where = f"energies[{i}]"
        if use.name not in energies:
            raise ValueError(f"{where}: {unknown_energy(use.name, energies)}")
        energy = energies[use.name]
        try:
            check_spec_energy(energy, use.params)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        try:
            fn = energy.from_spec(ctx, **use.params)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: energy {use.name!r}: {exc}") from None
        region = use.region or energy.region
        if region not in extra:
            raise ValueError(f"{where}: no region {region!r}; regions: {', '.join(sorted(extra))}")
        regions.setdefault(region, extra[region])
        terms.append(EnergyTerm(f"{use.name}[{i}]", fn, use.weight, region))
    return dataclasses.replace(plan, energies=terms, regions=regions)


def unknown_energy(name: str, energies: dict) -> str:
    """The one line for an energy name nobody registered."""
    return (f"unknown energy {str(name)[:60]!r}; installed energies: "
            f"{', '.join(sorted(energies)) or 'none'}")
