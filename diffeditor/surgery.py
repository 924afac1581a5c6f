"""Pixel-space surgery: a geometric task's starting point built in the image itself.

A task that moves, resizes or otherwise warps an object must start sampling from a latent in
which the object already sits at its destination **and its old place is background**. Warping
the inverted latent alone (an :attr:`~diffeditor.interfaces.EditPlan.surgery` on latents) puts
the object's latent at the destination but leaves its old latent where it was, and on small
models guidance rarely removes it: the edit shows two objects. The built-in ``move`` and
``resize`` therefore offer ``surgery_space: pixel``, and :func:`pixel_surgery` is the same
mechanism for any task:

1. the object (the pixels under its mask) is warped with the task's transform, bilinear, on its
   own pixel outline;
2. the area it vacated is filled from the pixels around it
   (:func:`diffeditor.geometry.fill_hole`: a flat or smoothly varying background continues);
3. the result, the *composite*, becomes one more image of the plan
   (:meth:`PixelSurgery.add_to`): the kernel inverts it with the prompt, like the source;
4. :meth:`PixelSurgery.surgery` starts the edit from the composite's inverted latent over the
   object's old and new place and from the source's elsewhere; :meth:`PixelSurgery.pin`
   optionally holds the destination to the composite's inversion trajectory early in the run.

The composite's inverted features are also in the energies' ``references`` under the
composite's name, so an energy can ask the edit to look like the composite (the example
plugin ``diffeditor-example`` does). See ``docs/plugins.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .geometry import dilate, fill_hole
from .interfaces import Geometry, Pin
from .masks import grid_mask

Warp = Callable[..., Tensor]
"""``warp(x, mode="nearest") -> x`` warped: the task's transform of a grid ``(B, C, h, w)``
covering the working image, in pixel units, so one call serves masks, images and latents (e.g.
``lambda x, mode="nearest": similarity_warp(x, geom.work_hw, center, scale, offset, mode)``).
It is called with ``mode="bilinear"`` for the image."""


@dataclass
class PixelSurgery:
    """What :func:`pixel_surgery` builds, ready to go into an :class:`~diffeditor.interfaces.EditPlan`.

    Attributes:
        composite: ``(1, 3, H, W)`` the working image with the object warped and its old place
            filled, in [-1, 1].
        object_mask: ``(1, 1, H, W)`` where the object was (the task's mask, working size).
        destination: ``(1, 1, H, W)`` where it is in the composite, {0, 1}.
        object_latent: the object's old place on the latent grid ``(1, 1, h, w)``.
        destination_latent: its new place on the latent grid (the warped ``object_latent``).
        name: the composite's name among the plan's images (and in ``references``).
    """

    composite: Tensor
    object_mask: Tensor
    destination: Tensor
    object_latent: Tensor
    destination_latent: Tensor
    name: str = "composite"

    @property
    def edit_latent(self) -> Tensor:
        """The object's old and new place on the latent grid: where :meth:`surgery` takes the
        composite's latent (a natural ``sde_mask``)."""
        return torch.clamp(self.destination_latent + self.object_latent, max=1)

    @property
    def pixel_region(self) -> Tensor:
        """The object's old and new place in working pixels (a natural ``pixel_region``)."""
        return torch.clamp(self.object_mask + self.destination, max=1)

    def add_to(self, images: dict[str, Tensor], prompts: dict[str, str], prompt: str) -> None:
        """Add the composite to a plan's ``images`` and ``prompts`` (inverted with ``prompt``)."""
        images[self.name] = self.composite
        prompts[self.name] = prompt

    def surgery(self, zt: dict[str, Tensor]) -> Tensor:
        """The initial latent: the composite's inverted z_T over :attr:`edit_latent`, the
        source's elsewhere (an :data:`~diffeditor.interfaces.Surgery`; its inputs are not
        written)."""
        m = self.edit_latent.to(zt["source"])
        return m * zt[self.name] + (1 - m) * zt["source"]

    def target(self, zs: dict[str, Tensor]) -> Tensor:
        """The composite's inverted latent at a step (a :class:`Pin` target)."""
        return zs[self.name]

    def pin(self, until: float) -> Pin:
        """Hold the destination to the composite's inversion trajectory for the first
        ``until`` fraction of the run (0 = off; the built-in tasks' ``object_blend``)."""
        return Pin(self.destination_latent, self.target, until)


def pixel_surgery(image: Tensor, mask: Tensor, geom: Geometry, warp: Warp, *,
                  fill: bool = True, name: str = "composite") -> PixelSurgery:
    """Move the object under ``mask`` in ``image`` with ``warp`` and fill the area it left.

    Args:
        image: the working image, ``(1, 3, H, W)`` in [-1, 1] (``images["source"]`` in
            :meth:`Task.plan <diffeditor.interfaces.Task.plan>`).
        mask: the object at the working size, ``(1, 1, H, W)`` in {0, 1}
            (:func:`diffeditor.masks.work_mask`).
        geom: the edit's geometry (for the latent grid).
        warp: the task's transform, see :data:`Warp`.
        fill: fill the vacated area from its surroundings (the object's mask widened by one
            pixel, so its anti-aliased edge goes too); ``False`` keeps the image's own pixels
            there (for a copy, not a move).
        name: the composite's name in the plan.

    The destination is ``warp(mask) > 0.5`` (nearest), the object's pixels there come from
    ``warp(image, mode="bilinear")``; every other pixel is the filled image. ``move`` and
    ``resize`` with ``surgery_space: pixel`` are built on it.
    """
    destination = (warp(mask) > 0.5).float()
    filled = fill_hole(image, dilate(mask.to(image), 1)) if fill else image
    dst = destination.to(image)
    composite = dst * warp(image, "bilinear") + (1 - dst) * filled
    object_latent = grid_mask(mask, geom.latent_hw)
    destination_latent = (warp(object_latent) > 0.5).float()
    return PixelSurgery(composite, mask, destination, object_latent, destination_latent, name)


def composite_surgery(composite: Tensor, mask: Tensor, geom: Geometry, *,
                      name: str = "composite") -> PixelSurgery:
    """The same starting point for an edit that changes the object where it is (a recolour, a
    texture): ``composite`` is the working image with the object already changed, in pixels
    (``(1, 3, H, W)`` in [-1, 1]), ``mask`` the object at the working size; the object's old
    and new place are both ``mask``."""
    m = (mask > 0.5).float()
    latent = grid_mask(m, geom.latent_hw)
    return PixelSurgery(composite, m, m, latent, latent, name)
