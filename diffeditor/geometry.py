"""Geometric helpers shared by tasks: similarity warps of grids (masks, features, latents) in
pixel units, so that one transform is applied consistently at every resolution.

A grid of shape ``(B, C, h, w)`` covers a working image of ``H x W`` pixels; cell ``(r, c)`` has
its centre at pixel ``((c + 0.5) * W / w, (r + 0.5) * H / h)``. Coordinates are ``(x, y)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def similarity_warp(
    x: Tensor,
    image_hw: tuple[int, int],
    center: tuple[float, float],
    scale: float = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
    mode: str = "nearest",
) -> Tensor:
    """Warp a grid so that the content at pixel ``p`` moves to ``center + scale*(p - center) + offset``.

    Content that leaves the frame is cropped; cells with no source are filled with zeros.
    ``x`` is ``(B, C, h, w)``; ``image_hw`` the working image size in pixels.
    """
    b, _, h, w = x.shape
    H, W = image_hw
    dev = x.device
    # pixel coordinates of destination cell centres
    ys = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) * (H / h)
    xs = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) * (W / w)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    cx, cy = center
    # inverse map: source pixel of each destination pixel
    sx = cx + (gx - cx - offset[0]) / scale
    sy = cy + (gy - cy - offset[1]) / scale
    grid = torch.stack([2 * sx / W - 1, 2 * sy / H - 1], dim=-1)[None].expand(b, -1, -1, -1)
    return F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode="zeros", align_corners=False)


def mask_centroid(mask: Tensor, image_hw: tuple[int, int]) -> tuple[float, float]:
    """Centroid ``(x, y)`` in working-image pixels of a ``(1, 1, h, w)`` mask on any grid."""
    h, w = mask.shape[-2:]
    H, W = image_hw
    m = mask.float()[0, 0]
    total = m.sum().clamp(min=1e-8)
    ys = (torch.arange(h, dtype=torch.float32, device=m.device) + 0.5) * (H / h)
    xs = (torch.arange(w, dtype=torch.float32, device=m.device) + 0.5) * (W / w)
    return (float((m.sum(0) * xs).sum() / total), float((m.sum(1) * ys).sum() / total))


def dilate(mask: Tensor, cells: int) -> Tensor:
    """Binary dilation of a ``(1, 1, h, w)`` mask by a square of half-width ``cells``."""
    if cells <= 0:
        return mask
    k = 2 * cells + 1
    return (F.max_pool2d(mask.float(), k, stride=1, padding=cells) > 0).float()


def fill_hole(image: Tensor, hole: Tensor) -> Tensor:
    """``image`` with the pixels under ``hole`` (``(1, 1, h, w)``, 1 = unknown) filled from the
    known pixels around them: each hole pixel takes the mean of the known pixels in the smallest
    square window (half-width 1, 2, 4, ...) that holds any, so a flat or smoothly varying
    background continues into the hole. Known pixels are returned unchanged."""
    known = (hole <= 0.5).to(image)
    out, todo = image * known, 1 - known
    r = 1
    while todo.sum() > 0 and known.sum() > 0:
        k = 2 * r + 1
        num = F.avg_pool2d(image * known, k, stride=1, padding=r, count_include_pad=False)
        den = F.avg_pool2d(known, k, stride=1, padding=r, count_include_pad=False)
        got = todo * (den > 0).to(image)
        out = out + got * num / den.clamp_min(1e-12)
        todo = todo - got
        if r > max(image.shape[-2:]):
            break
        r *= 2
    return out


def feather(mask: Tensor, width: int) -> Tensor:
    """A ``(1, 1, h, w)`` binary mask with a linear ramp outside it: 1 inside, ``(width - d) /
    width`` at chessboard distance ``d`` px outside (``d < width``), 0 beyond."""
    m = (mask > 0).float()
    if width <= 0:
        return m
    total, ring = m.clone(), m
    for _ in range(width - 1):  # one cell at a time: a 3x3 pool per step, whatever the width
        ring = dilate(ring, 1)
        total += ring
    return total / width


def paste_back_weights(region: Tensor, geom, width: int) -> Tensor:
    """``(H, W)`` weights of the decoded edit at the input's size for ``paste_back``: 1 on
    ``region`` widened by one cell, a ``width``-pixel linear ramp (working pixels) around it, 0
    beyond. ``region`` is a latent-grid mask, or a working-size one (then used as it is, on
    its own outline, not widened)."""
    ch, cw = geom.content
    m = (region > 0.5).float().cpu()
    if tuple(m.shape[-2:]) != tuple(geom.work_hw):
        m = resample_mask(dilate(m, 1), tuple(geom.work_hw), "nearest")
    m = m[..., :ch, :cw]
    w = feather(m, width)
    if (ch, cw) != tuple(geom.input_hw):
        w = F.interpolate(w, size=tuple(geom.input_hw), mode="bilinear", align_corners=False)
    return w[0, 0].clamp(0, 1)


def resample_mask(mask: Tensor, hw: tuple[int, int], rule: str = "coverage") -> Tensor:
    """The one mask resampler: a mask ``(B, 1, H, W)`` on another grid ``hw``, float {0, 1}.

    ``rule="coverage"``: cells at least half covered (area average >= 0.5); if that leaves
    nothing (a tiny mask), any covered cell: masks on the latent and feature grids
    (:func:`diffeditor.masks.grid_mask`). ``rule="nearest"``: nearest neighbour: a user's mask
    at the working size, the memory bank's masks on each attention layer's token grid.
    A mask already on ``hw`` is only thresholded (coverage) or returned as float (nearest).
    """
    mask = mask.float()
    if rule == "nearest":
        if tuple(mask.shape[-2:]) == tuple(hw):
            return mask
        return F.interpolate(mask, size=tuple(hw), mode="nearest")
    if rule != "coverage":
        raise ValueError(f"rule must be 'coverage' or 'nearest', not {rule!r}")
    if tuple(mask.shape[-2:]) == tuple(hw):
        return (mask > 0.5).float()
    frac = F.interpolate(mask, size=tuple(hw), mode="area")
    out = (frac >= 0.5).float()
    if out.sum() == 0:
        out = (frac > 0).float()
    return out
