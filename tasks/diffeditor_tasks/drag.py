"""Content dragging (DiffEditor §4.2 "Content dragging"): drag content from handle points to
target points inside an editable mask.

Points are in input-image pixels and scaled to the working image per axis; the 3x3 feature
patches are clipped to the grid on the right axes (the reference clipped x with the height).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from diffeditor.energies import cosine_map, inverse_energy, masked_mean, sim01
from diffeditor.hookspecs import hookimpl
from diffeditor.interfaces import (
    AttentionPolicy,
    BenchScene,
    EditPlan,
    EnergyTerm,
    Geometry,
    Pin,
    Task,
)
from diffeditor.masks import check_mask_file, check_points, grid_mask, scale_point, work_mask
from diffeditor.schedule import Window
from diffeditor.specs import EditSpec, path_validators, renamed_field

from . import __version__, scenes

Point = tuple[float, float]


def patch_mask(point_px: Point, hw: tuple[int, int], px_per_cell: float, half: int = 1):
    """A ``(1, 1, h, w)`` mask of the ``(2*half+1)^2`` patch around a pixel, on a grid of
    ``hw`` cells of ``px_per_cell`` pixels; the patch is shifted to stay inside the grid."""
    h, w = hw
    col = int(point_px[0] // px_per_cell)
    row = int(point_px[1] // px_per_cell)
    col = min(max(col, half), w - 1 - half)  # x is clipped with the width
    row = min(max(row, half), h - 1 - half)  # y with the height
    m = torch.zeros(1, 1, h, w)
    m[..., row - half : row + half + 1, col - half : col + half + 1] = 1
    return m


def patch_pairs(handles, targets, hw: tuple[int, int], px_per_cell: float, half: int = 1):
    """The ``(2*half+1)^2`` patches of point pairs on a grid of ``hw`` cells: a list of
    ``(handle mask, target mask, handle cells, target cells)``, the cells as a pair of slices
    (rows, columns). ``half`` is capped so that a patch fits the grid."""
    half = min(half, (min(hw) - 1) // 2)
    k = 2 * half + 1
    out = []
    for h, t in zip(handles, targets):
        ph, pt = patch_mask(h, hw, px_per_cell, half), patch_mask(t, hw, px_per_cell, half)
        hr, hc = (int(x) for x in ph[0, 0].nonzero()[0])  # top-left cells
        tr, tc = (int(x) for x in pt[0, 0].nonzero()[0])
        out.append((ph, pt, (slice(hr, hr + k), slice(hc, hc + k)), (slice(tr, tr + k), slice(tc, tc + k))))
    return out


def move_patches(dst: torch.Tensor, src: torch.Tensor, pairs) -> torch.Tensor:
    """``dst`` (changed in place and returned) with each pair's handle patch of ``src`` copied
    onto its target patch, cell for cell in the same order."""
    for _, _, hs, ts in pairs:
        dst[(..., *ts)] = src[(..., *hs)]
    return dst


def drag_energies(handles, targets, geom: Geometry, source: str = "source", half: int = 1):
    """The drag edit energy and the handle-contrast energy for point pairs (working pixels),
    on ``(2*half+1)^2`` feature patches (the reference: ``half`` 1, 3x3)."""
    pairs = patch_pairs(handles, targets, geom.feature_hw, geom.pixels_per_cell("feature"), half)

    def e_edit(cur, refs):
        ref = refs[source]
        vals = []
        for lv, f in cur.items():
            for pair in pairs:
                # features at the handle patch, moved onto the target patch
                moved = move_patches(torch.zeros_like(ref[lv]), ref[lv], [pair])
                s = masked_mean(sim01(cosine_map(f, moved)), pair[1])
                vals.append(inverse_energy(1.0, s))
        return torch.stack(vals).mean(0)

    def e_handle(cur, refs):
        ref = refs[source]
        vals = []
        for lv, f in cur.items():
            for ph, pt, _, _ in pairs:
                only_h = ph * (1 - pt)
                vals.append(masked_mean(sim01(cosine_map(f, ref[lv])), only_h))
        return torch.stack(vals).mean(0)

    return e_edit, e_handle


class DragSpec(EditSpec):
    """Drag content from ``handles`` to ``targets`` inside the editable ``mask``."""

    task: Literal["drag"] = "drag"
    mask: Path = Field(description="the editable region: white = may change")
    handles: list[Point] = Field(min_length=1, max_length=64, description="[[x, y], ...] points to drag")
    targets: list[Point] = Field(min_length=1, max_length=64, description="[[x, y], ...] where they go")
    task_defaults: ClassVar[dict[str, Any]] = {
        "guidance_scale": 4.0,
        "energy_scale": 2000.0,
        "guidance_k": 0.04,
        "w_edit": 4.0,
        "w_content": 6.0,
    }
    field_notes: ClassVar[dict[str, str]] = {
        "energy_scale": "lambda (reference 2 x 1e3)",
        "guidance_k": "k (reference 4e-2)",
        "w_edit": "weight of the drag energy",
    }
    w_handle_contrast: float = Field(
        0.2, ge=0.0, le=100.0, description="push the handle patch away from its old content (old name: w_inpaint)"
    )
    rename_w_inpaint = renamed_field("w_inpaint", "w_handle_contrast")
    object_blend: float = Field(
        0.0, ge=0.0, le=1.0,
        description="fraction of the run (from the start) during which each target patch is held "
        "to its handle patch's inversion trajectory; 0 = off (the reference)",
    )

    patch_radius: int = Field(
        1, ge=1, le=8,
        description="half size, in feature cells, of the square patch each point pair drags: "
        "1 = 3x3 (the reference); larger drags more of the object around each handle",
    )
    object_blend_radius: int = Field(
        1, ge=1, le=8,
        description="half size, in latent cells, of the square patch object_blend holds at each "
        "target: 1 = 3x3",
    )

    resolve_paths, check_paths = path_validators("mask")

    @model_validator(mode="after")
    def _pairs(self) -> "DragSpec":
        if len(self.handles) != len(self.targets):
            raise ValueError(
                f"handles has {len(self.handles)} points but targets has {len(self.targets)}; "
                "give one target per handle"
            )
        return self


class DragTask(Task):
    name = "drag"
    version = __version__
    description = "drag content by handle -> target point pairs inside an editable mask"
    spec_model = DragSpec
    ui_hints = {"images": {"handles": "image", "targets": "image"}}

    def check(self, spec: DragSpec, input_hw) -> None:
        check_points(spec.handles, "handles", input_hw)
        check_points(spec.targets, "targets", input_hw)
        check_mask_file(spec.mask, "mask", input_hw)

    def plan(self, spec: DragSpec, images, geom: Geometry) -> EditPlan:
        m_user = work_mask(spec.mask, "mask", geom)
        handles = [scale_point(p, geom) for p in spec.handles]
        targets = [scale_point(p, geom) for p in spec.targets]
        m_user_f = grid_mask(m_user, geom.feature_hw)
        m_user_l = grid_mask(m_user, geom.latent_hw)
        e_edit, e_handle = drag_energies(handles, targets, geom, half=spec.patch_radius)

        def e_content(cur, refs):
            src = refs["source"]
            outside = 1 - m_user_f
            return torch.stack([
                inverse_energy(1.0, masked_mean(sim01(cosine_map(src[lv], f)), outside))
                for lv, f in cur.items()
            ]).mean(0)

        patches = patch_pairs(handles, targets, geom.latent_hw, geom.pixels_per_cell("latent"),
                              spec.object_blend_radius)

        def surgery(zt):
            return move_patches(zt["source"].clone(), zt["source"], patches)

        m_targets_l = torch.clamp(sum(pt for _, pt, _, _ in patches), max=1)

        return EditPlan(
            images={"source": images["source"]},
            prompts={"source": spec.prompt},
            regions={"edit": m_user_l, "content": 1 - m_user_l},
            energies=[
                EnergyTerm("edit", e_edit, spec.w_edit, "edit"),
                EnergyTerm("handle_contrast", e_handle, spec.w_handle_contrast, "edit"),
                EnergyTerm("content", e_content, spec.w_content, "content"),
            ],
            sde_mask=m_user_l,
            attention=AttentionPolicy(mode="concat", window=Window(start=0.1, stop=1.0)),
            surgery=surgery,
            pins=[Pin(m_targets_l, surgery, spec.object_blend)],
            masks={"editable": m_user},
            pixel_region=m_user,
            info={"handles_work_px": handles, "targets_work_px": targets},
        )


@hookimpl
def register_tasks(register):
    register(DragTask())


@hookimpl
def register_bench_scenes(register):
    register(BenchScene("drag", scenes.drag_scene, default=True))  # bench's default
