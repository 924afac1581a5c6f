"""Kept for compatibility: the helpers now live in the kernel, :mod:`diffeditor.masks`."""

from diffeditor.masks import (  # noqa: F401
    check_mask_file,
    check_offset,
    check_points,
    grid_mask,
    reference_work_mask,
    scale_offset,
    scale_point,
    work_mask,
)
