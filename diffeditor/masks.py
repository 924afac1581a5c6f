"""Mask and point helpers for tasks (public API; the built-in tasks use them).

Masks: :func:`work_mask` loads a user's mask (checked against the image size) at the working
size; :func:`reference_work_mask` does the same for a reference image's mask; :func:`grid_mask`
puts a working-size mask on the latent or feature grid (``geom.latent_hw``,
``geom.feature_hw``). Points: :func:`scale_point` / :func:`scale_offset` map input-image pixels to
working pixels; :func:`check_points`, :func:`check_offset` and :func:`check_mask_file` are for
:meth:`Task.check`
(run before any model loads; they raise :class:`~diffeditor.errors.SpecError` naming the field).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor

from .errors import SpecError
from .geometry import resample_mask
from .imageio import load_mask, mask_tensor
from .interfaces import Geometry


def work_mask(path: Path, field: str, geom: Geometry) -> Tensor:
    """Load a mask at the input size (checked) and resample it to the working size."""
    m = load_mask(path, field, geom.input_hw)
    return mask_tensor(m, geom.content, pad=geom.work_hw)


def reference_work_mask(spec, geom: Geometry) -> Tensor:
    """``spec.reference_mask`` (checked against ``spec.reference``'s own size) at the working
    size: the reference image is resized to the edited image's working size."""
    from .imageio import image_size

    ref_geom = Geometry(image_size(spec.reference, "reference"), geom.work_hw, geom.vae_scale,
                        geom.feature_scale, geom.content_hw)
    return work_mask(spec.reference_mask, "reference_mask", ref_geom)


def grid_mask(mask: Tensor, hw: tuple[int, int]) -> Tensor:
    """A working-resolution mask on a coarser grid: cells at least half covered; if that
    leaves nothing (a tiny mask), any covered cell (:func:`diffeditor.geometry.resample_mask`)."""
    return resample_mask(mask, hw, "coverage")


def scale_point(p, geom: Geometry) -> tuple[float, float]:
    """An input-image pixel ``(x, y)`` -> working-image pixels."""
    sx, sy = geom.scale_xy
    return (float(p[0]) * sx, float(p[1]) * sy)


def scale_offset(o, geom: Geometry) -> tuple[float, float]:
    """An input-image pixel offset ``(dx, dy)`` -> working pixels (x and y scaled separately)."""
    return scale_point(o, geom)


def check_points(points, field: str, hw: tuple[int, int]) -> None:
    """Every ``[x, y]`` lies inside an image of ``hw`` = (height, width)."""
    h, w = hw
    for k, (x, y) in enumerate(points):
        if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
            raise SpecError(
                f"point {k} = [{x:g}, {y:g}] lies outside the {w}x{h} image "
                f"(x must be in 0..{w - 1}, y in 0..{h - 1})",
                field,
            )


def check_offset(offset, field: str, hw: tuple[int, int]) -> None:
    """An offset ``(dx, dy)`` no larger than the image (``hw`` = (height, width)) along each
    axis: a larger one moves the object wholly out of the frame."""
    h, w = hw
    dx, dy = offset
    if abs(dx) > w or abs(dy) > h:
        raise SpecError(
            f"[{dx:g}, {dy:g}] would move the object out of the {w}x{h} image; "
            f"dx must be within -{w}..{w} and dy within -{h}..{h} pixels",
            field,
        )


def check_mask_file(path: Path | None, field: str, hw: tuple[int, int]) -> np.ndarray | None:
    """Validate a mask file against the image size (non-empty, same size)."""
    if path is None:
        return None
    return load_mask(path, field, hw)
