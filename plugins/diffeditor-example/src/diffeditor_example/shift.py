"""``shift``: slide the object under ``mask`` by ``distance`` pixels to the left, right, top or
bottom. A complete task plugin written only against diffeditor's public API:

* the spec: a subclass of :class:`diffeditor.specs.EditSpec` (its fields are validated, appear in
  ``diffeditor schema shift`` and become the options of ``diffeditor shift``);
* the task: a :class:`diffeditor.interfaces.Task` whose :meth:`plan` builds masks with
  :mod:`diffeditor.masks`, energies with :mod:`diffeditor.energies` and its starting point with
  :func:`diffeditor.surgery.pixel_surgery` (the object slid in the image itself, the place it
  left filled from its surroundings, and that composite inverted beside the source: what the
  built-in move does with ``surgery_space: pixel``); the kernel does the sampling;
* the hook: ``register_tasks``, found through the ``diffeditor`` entry-point group.

``docs/plugins.md`` walks through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from diffeditor.energies import cosine_map, inverse_energy, level_mean, masked_mean
from diffeditor.geometry import mask_centroid, similarity_warp
from diffeditor.hookspecs import hookimpl
from diffeditor.interfaces import AttentionPolicy, EditPlan, EnergyTerm, Geometry, Task
from diffeditor.masks import check_mask_file, grid_mask, scale_offset, work_mask
from diffeditor.schedule import Window
from diffeditor.specs import EditSpec, path_validators
from diffeditor.surgery import pixel_surgery

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
    object_blend: float = Field(
        0.5, ge=0.0, le=1.0,
        description="fraction of the run (from the start) during which the destination is held "
        "to the slid object's inversion trajectory (0 = off)")

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

        def slide(x, mode="nearest"):                         # any grid, same pixel transform
            return similarity_warp(x, geom.work_hw, center, 1.0, offset, mode)

        # the starting point, in pixels: the object slid, the place it left filled from its
        # surroundings; the kernel inverts this "composite" beside the source
        moved = pixel_surgery(images["source"], m_obj, geom, slide)

        m_dst_f = (slide(grid_mask(m_obj, geom.feature_hw)) > 0.5).float()
        m_rest_f = 1 - m_dst_f

        def e_edit(cur, refs):  # the destination looks like the slid object
            comp = refs[moved.name]
            return level_mean([inverse_energy(1.0, masked_mean(cosine_map(f, comp[lv]), m_dst_f))
                               for lv, f in cur.items()])

        def e_content(cur, refs):  # everything else, the vacated place included, like the composite
            comp = refs[moved.name]
            return level_mean([inverse_energy(1.0, masked_mean(cosine_map(f, comp[lv]), m_rest_f))
                               for lv, f in cur.items()])

        plan_images, prompts = {"source": images["source"]}, {"source": spec.prompt}
        moved.add_to(plan_images, prompts, spec.prompt)
        m_dst_l = moved.destination_latent
        return EditPlan(
            images=plan_images,
            prompts=prompts,
            regions={"edit": m_dst_l, "content": 1 - m_dst_l},
            energies=[EnergyTerm("edit", e_edit, spec.w_edit, "edit"),
                      EnergyTerm("content", e_content, spec.w_content, "content")],
            sde_mask=moved.edit_latent,                      # old and new place
            attention=AttentionPolicy(mode="replace", window=Window(start=0.1, stop=1.0)),
            surgery=moved.surgery,
            pins=[moved.pin(spec.object_blend)],
            masks={"object": m_obj, "destination": moved.destination},
            pixel_region=moved.pixel_region,
            info={"centroid": center, "offset_work_px": offset, "direction": spec.direction},
        )


@hookimpl
def register_tasks(register):
    register(ShiftTask())
