"""``shift``: slide the object under ``mask`` by ``distance`` pixels to the left, right, top or
bottom. A complete task plugin written only against diffeditor's public API:

* the spec: a subclass of :class:`diffeditor.specs.EditSpec` (its fields are validated, appear in
  ``diffeditor schema shift`` and become the options of ``diffeditor shift``);
* the task: a :class:`diffeditor.interfaces.Task` whose :meth:`plan` builds masks with
  :mod:`diffeditor.masks`, energies with :mod:`diffeditor.energies` and the initial latent's
  surgery with :mod:`diffeditor.geometry`; the kernel does the sampling;
* the hook: ``register_tasks``, found through the ``diffeditor`` entry-point group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from diffeditor.energies import cosine_map, inverse_energy, level_mean, masked_mean
from diffeditor.geometry import mask_centroid, similarity_warp
from diffeditor.hookspecs import hookimpl
from diffeditor.interfaces import AttentionPolicy, EditPlan, EnergyTerm, Geometry, Task
from diffeditor.masks import check_mask_file, grid_mask, scale_offset, work_mask
from diffeditor.schedule import Window
from diffeditor.specs import EditSpec, path_validators

from . import __version__

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


class ShiftSpec(EditSpec):
    """Slide the object under mask by distance pixels in one direction."""

    task: Literal["shift"] = "shift"
    mask: Path = Field(description="the object to slide: white = object, same size as the image")
    direction: Literal["left", "right", "up", "down"] = Field(
        "left", description="where the object goes")
    distance: float = Field(16.0, gt=0.0, le=4096.0, description="how far, in input-image pixels")
    energy_scale: float = Field(500.0, ge=0.0, le=1e5, description="lambda of the guidance")
    guidance_k: float = Field(0.08, ge=0.0, le=10.0, description="k of the guidance")

    resolve_paths, check_paths = path_validators("mask")

    def offset(self) -> tuple[float, float]:
        dx, dy = DIRECTIONS[self.direction]
        return (dx * self.distance, dy * self.distance)


class ShiftTask(Task):
    name = "shift"
    version = __version__
    description = "slide an object left, right, up or down (example plugin)"
    spec_model = ShiftSpec

    def check(self, spec: ShiftSpec, input_hw) -> None:
        check_mask_file(spec.mask, "mask", input_hw)

    def plan(self, spec: ShiftSpec, images, geom: Geometry) -> EditPlan:
        m_obj = work_mask(spec.mask, "mask", geom)            # (1, 1, H, W) working pixels
        center = mask_centroid(m_obj, geom.work_hw)
        offset = scale_offset(spec.offset(), geom)            # input pixels -> working pixels

        def slide(x):                                         # any grid, same pixel transform
            return similarity_warp(x, geom.work_hw, center, 1.0, offset)

        m_obj_f = grid_mask(m_obj, geom.feature_hw)
        m_dst_f = (slide(m_obj_f) > 0.5).float()
        m_keep_f = 1 - torch.clamp(m_obj_f + m_dst_f, max=1)
        m_obj_l = grid_mask(m_obj, geom.latent_hw)
        m_dst_l = (slide(m_obj_l) > 0.5).float()

        def e_edit(cur, refs):  # the destination should look like the slid source object
            src = refs["source"]
            return level_mean([inverse_energy(1.0, masked_mean(cosine_map(f, slide(src[lv])), m_dst_f))
                               for lv, f in cur.items()])

        def e_content(cur, refs):  # everything else stays as it was
            src = refs["source"]
            return level_mean([inverse_energy(1.0, masked_mean(cosine_map(f, src[lv]), m_keep_f))
                               for lv, f in cur.items()])

        def surgery(zt):  # start from the source's latent with the object already slid
            z = zt["source"]
            return m_dst_l * slide(z) + (1 - m_dst_l) * z

        return EditPlan(
            images={"source": images["source"]},
            prompts={"source": spec.prompt},
            regions={"edit": m_dst_l, "content": 1 - m_dst_l},
            energies=[EnergyTerm("edit", e_edit, spec.w_edit, "edit"),
                      EnergyTerm("content", e_content, spec.w_content, "content")],
            sde_mask=torch.clamp(m_dst_l + m_obj_l, max=1),
            attention=AttentionPolicy(mode="replace", window=Window(start=0.1, stop=1.0)),
            surgery=surgery,
            masks={"object": m_obj, "destination": (slide(m_obj) > 0.5).float()},
            info={"centroid": center, "offset_work_px": offset, "direction": spec.direction},
        )


@hookimpl
def register_tasks(register):
    register(ShiftTask())
