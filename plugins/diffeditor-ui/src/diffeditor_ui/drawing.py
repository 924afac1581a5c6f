"""Server-side drawing of the clickable views: mask overlays, numbered handle -> target arrows,
the move arrow and outline, the paste preview and landmarks.

Views are the image enlarged by an integer factor (:func:`view_scale`) so that small images
(the 128-px ``shapes`` world) stay clickable; a click at view pixel ``(X, Y)`` is image pixel
``(X / f, Y / f)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

VIEW_TARGET = 512
GROUP_COLOURS = [(230, 40, 40), (40, 90, 240), (20, 170, 60), (230, 150, 0)]
MASK_COLOURS = [(255, 0, 255), (0, 200, 255), (255, 200, 0)]


def view_scale(size: tuple[int, int]) -> int:
    """The integer enlargement of an image of ``(width, height)`` for its view."""
    return max(1, VIEW_TARGET // max(size))


def to_view(image: Image.Image) -> tuple[Image.Image, int]:
    f = view_scale(image.size)
    return image.convert("RGB").resize((image.width * f, image.height * f), Image.NEAREST), f


def overlay_mask(view: Image.Image, mask: np.ndarray, f: int, colour=(255, 0, 255), alpha=0.4) -> Image.Image:
    m = Image.fromarray(mask.astype(np.uint8) * int(255 * alpha)).resize(view.size, Image.NEAREST)
    tint = Image.new("RGB", view.size, colour)
    return Image.composite(tint, view, m)


def _dot(draw: ImageDraw.ImageDraw, xy, colour, r=6):
    x, y = xy
    draw.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=(255, 255, 255), width=2)


def arrow(draw: ImageDraw.ImageDraw, a, b, colour, width=3):
    draw.line([a, b], fill=colour, width=width)
    ang = math.atan2(b[1] - a[1], b[0] - a[0])
    head = 12
    for d in (2.6, -2.6):
        draw.line([b, (b[0] + head * math.cos(ang + d), b[1] + head * math.sin(ang + d))],
                  fill=colour, width=width)


def draw_points(view: Image.Image, groups: Sequence[Sequence[Sequence[float]]], f: int) -> Image.Image:
    """Numbered points, group ``g`` in colour ``g``; with two or more groups, point ``j`` of the
    first group gets an arrow to point ``j`` of each other group (handle -> target)."""
    out = view.copy()
    draw = ImageDraw.Draw(out)
    scaled = [[(p[0] * f, p[1] * f) for p in g] for g in groups]
    for j, start in enumerate(scaled[0] if scaled else []):
        for g in scaled[1:]:
            if j < len(g):
                arrow(draw, start, g[j], (255, 255, 255), width=5)
                arrow(draw, start, g[j], (250, 200, 0), width=2)
    for gi, g in enumerate(scaled):
        for j, p in enumerate(g):
            _dot(draw, p, GROUP_COLOURS[gi % len(GROUP_COLOURS)])
            draw.text((p[0] + 8, p[1] - 14), str(j + 1), fill=(255, 255, 255), stroke_width=2,
                      stroke_fill=(0, 0, 0))
    return out


def centroid(mask: np.ndarray) -> tuple[float, float] | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


def transform_mask(mask: np.ndarray, centre, scale: float, offset) -> np.ndarray:
    """The mask scaled by ``scale`` about ``centre`` and shifted by ``offset`` (nearest)."""
    h, w = mask.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    sx = (xs - centre[0] - offset[0]) / scale + centre[0]
    sy = (ys - centre[1] - offset[1]) / scale + centre[1]
    ix, iy = np.floor(sx).astype(int), np.floor(sy).astype(int)
    ok = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    out = np.zeros_like(mask, dtype=bool)
    out[ok] = mask[iy[ok], ix[ok]]
    return out


def outline(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def draw_move(view: Image.Image, mask: np.ndarray | None, offset, scale: float, f: int) -> Image.Image:
    """The move/resize preview: the destination's outline and an arrow centroid -> target."""
    if mask is None or not mask.any():
        return view
    c = centroid(mask)
    dst = transform_mask(mask, c, scale or 1.0, offset)
    out = view.copy()
    edge = Image.fromarray(outline(dst).astype(np.uint8) * 255).resize(view.size, Image.NEAREST)
    out.paste(Image.new("RGB", view.size, (255, 255, 0)), mask=edge)
    draw = ImageDraw.Draw(out)
    a = (c[0] * f, c[1] * f)
    b = ((c[0] + offset[0]) * f, (c[1] + offset[1]) * f)
    arrow(draw, a, b, (0, 0, 0), width=5)
    arrow(draw, a, b, (255, 255, 0), width=2)
    return out


def paste_preview(view: Image.Image, reference: Image.Image, ref_mask: np.ndarray | None,
                  offset, scale: float, f: int, alpha: float = 0.6) -> Image.Image:
    """The reference object, scaled about its centroid and shifted, semi-transparent on the view."""
    if ref_mask is None or not ref_mask.any():
        return view
    ref = np.asarray(reference.convert("RGB").resize((ref_mask.shape[1], ref_mask.shape[0])))
    c = centroid(ref_mask)
    h, w = ref_mask.shape
    H, W = view.height // f, view.width // f
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64) + 0.5
    # view pixel -> reference pixel (the reference is resized to the image's size by the task)
    kx, ky = w / W, h / H
    sx = ((xs * kx - c[0] - offset[0] * kx) / (scale or 1.0) + c[0])
    sy = ((ys * ky - c[1] - offset[1] * ky) / (scale or 1.0) + c[1])
    ix, iy = np.floor(sx).astype(int), np.floor(sy).astype(int)
    ok = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    sel = np.zeros((H, W), bool)
    sel[ok] = ref_mask[iy[ok], ix[ok]]
    colours = np.zeros((H, W, 3), np.uint8)
    colours[ok] = ref[iy[ok], ix[ok]]
    layer = Image.fromarray(colours).resize(view.size, Image.NEAREST)
    m = Image.fromarray(sel.astype(np.uint8) * int(255 * alpha)).resize(view.size, Image.NEAREST)
    out = Image.composite(layer, view, m)
    edge = Image.fromarray(outline(sel).astype(np.uint8) * 255).resize(view.size, Image.NEAREST)
    out.paste(Image.new("RGB", view.size, (255, 255, 0)), mask=edge)
    return out


def draw_landmarks(view: Image.Image, points, f: int, colour=(0, 255, 0)) -> Image.Image:
    out = view.copy()
    draw = ImageDraw.Draw(out)
    for x, y in points:
        _dot(draw, (x * f, y * f), colour, r=3)
    return out
