"""The procedural "shapes" world of the ``shapes-ldm`` model, and edit cases with known answers.

The generator follows the training recipe of ``model/README.md`` exactly:

* Background, uniform in ``white`` (240,240,240), ``black`` (20,20,20), ``gray`` (128,128,128)
  and ``gradient``: two palette colours *a*, *b*; every pixel of a row has, per channel,
  ``0.6*a*(1-y) + 0.6*b*y + 50`` with ``y = row / (H - 1)``.
* Palette: red, green, blue, yellow, purple, orange, white, black (:data:`PALETTE`).
* 1 to 3 objects drawn in order (later ones on top). Each has a shape uniform in
  circle/square/triangle, a colour uniform in the palette except the background's own name,
  ``r ~ U(0.12, 0.25) * size`` and a centre uniform in ``[r, size - r]`` on both axes.
* circle: distance to the centre ``<= r``; square: ``|dx| <= 0.85r`` and ``|dy| <= 0.85r``;
  triangle (apex up): rows from ``cy - r`` to ``cy + 0.8r``, half-width growing linearly from 0
  at the apex to ``r`` at the base.
* Gaussian noise of sigma 3 (0..255 scale), clipped to 0..255.
* Caption: ``"a {size} {colour} {shape}"`` per object, joined with ``" and "``, then
  ``" on a {background} background"``; size is ``small`` when ``r < 0.17*size`` else ``big``.

Choices where the recipe is silent (documented here, tested in ``tests/unit/test_shapes_scenes.py``):

* **Gradient background.** Its caption name is ``gradient`` ("... on a gradient background").
  Its two end colours *a* (top row) and *b* (bottom row) are two *distinct* palette colours.
  Since the background's own name is ``gradient``, which is no palette name, the rule "never
  the background's own name" excludes **no** object colour on a gradient (an object may share a
  colour with *a* or *b*; the gradient is at most 0.6*c + 50, so it never equals a palette
  colour exactly). Likewise a ``gray`` background excludes nothing (gray is not in the palette).
* **Pixel grid.** Pixel ``(row i, column j)`` sits at ``x = j, y = i``; shapes are tested at
  those integer coordinates. Inclusion tests allow ``1e-6`` of floating-point slack so that
  boundaries that are exact in real arithmetic (``|dx| == 0.85r``, a triangle's base row) are
  inside.
* **Quantisation.** The image is computed in float (background, then flat palette colours,
  then optional noise), clipped to 0..255 and rounded to the nearest integer.

Coordinates, offsets and points are in pixels, ``(x, y)`` with ``x`` to the right and ``y``
down. Images are ``(H, W, 3)`` ``uint8`` arrays; masks are ``(H, W)`` ``bool`` arrays.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_RGB",
    "CASE_KINDS",
    "MAX_PAIRS",
    "NOISE_SIGMA",
    "PALETTE",
    "SHAPES",
    "SIZE",
    "TASKS",
    "EditCase",
    "RenderedScene",
    "Scene",
    "ShapeObject",
    "background_distance",
    "background_image",
    "case_spec",
    "centroid",
    "dilate",
    "dragged",
    "erode",
    "iou",
    "make_case",
    "moved",
    "object_mask",
    "pasted",
    "psnr",
    "random_scene",
    "recoloured",
    "render",
    "save_case",
    "spread_points",
    "strict_scores",
    "subject_mask_by_colour",
]

# --------------------------------------------------------------------------------------------
# The recipe's constants
# --------------------------------------------------------------------------------------------

SIZE = 128
"""Training resolution (square)."""

NOISE_SIGMA = 3.0
"""Standard deviation of the Gaussian pixel noise, on the 0..255 scale."""

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
"""Object colours, in the recipe's order."""

BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
"""The flat backgrounds' colours."""

BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray", "gradient")
"""Background names (also their caption words)."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

TASKS: tuple[str, ...] = ("move", "resize", "drag", "appearance", "paste")
"""The tasks :func:`make_case` can build."""

CASE_KINDS: tuple[str, ...] = (*TASKS, "compose")
"""Every case kind :func:`make_case` can build: the tasks, and ``compose`` (two edits in one)."""

MAX_PAIRS = 4
"""Most handle/target pairs of a drag case."""

R_RANGE = (0.12, 0.25)
"""Radius range, as fractions of the image size."""

SMALL_BELOW = 0.17
"""An object is "small" when ``r < SMALL_BELOW * size``."""

SQUARE_HALF = 0.85
TRIANGLE_BASE = 0.8
_EPS = 1e-6


def excluded_colours(background: str) -> frozenset[str]:
    """Object colours a background rules out: its own name if that is a palette colour."""
    return frozenset({background}) if background in PALETTE else frozenset()


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene.

    Attributes:
        shape: ``"circle"``, ``"square"`` or ``"triangle"``.
        colour: a :data:`PALETTE` name.
        cx, cy: the shape's centre in pixels (for a triangle, the point the recipe measures
            from: the apex is at ``cy - r`` and the base at ``cy + 0.8r``).
        r: the radius in pixels.
    """

    shape: str
    colour: str
    cx: float
    cy: float
    r: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour not in PALETTE:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {tuple(PALETTE)}")
        if not self.r > 0:
            raise ValueError(f"radius must be positive, got {self.r}")

    @property
    def rgb(self) -> tuple[int, int, int]:
        """The object's colour as RGB."""
        return PALETTE[self.colour]

    def size_word(self, size: int = SIZE) -> str:
        """``"small"`` when ``r < 0.17 * size``, else ``"big"``."""
        return "small" if self.r < SMALL_BELOW * size else "big"

    def phrase(self, size: int = SIZE) -> str:
        """The object's caption phrase, ``"a {size} {colour} {shape}"``."""
        return f"a {self.size_word(size)} {self.colour} {self.shape}"

    def bbox(self) -> tuple[float, float, float, float]:
        """The shape's extent ``(x0, y0, x1, y1)`` in pixel coordinates (inclusive, real)."""
        cx, cy, r = self.cx, self.cy, self.r
        if self.shape == "square":
            h = SQUARE_HALF * r
            return (cx - h, cy - h, cx + h, cy + h)
        if self.shape == "triangle":
            return (cx - r, cy - r, cx + r, cy + TRIANGLE_BASE * r)
        return (cx - r, cy - r, cx + r, cy + r)

    def inside(self, size: int = SIZE, margin: float = 0.0) -> bool:
        """Whether the whole shape lies within the frame, ``margin`` pixels from its edges."""
        x0, y0, x1, y1 = self.bbox()
        lo, hi = margin, size - 1 - margin
        return x0 >= lo and y0 >= lo and x1 <= hi and y1 <= hi

    def shifted(self, dx: float, dy: float, scale: float = 1.0) -> ShapeObject:
        """This object with its centre moved by ``(dx, dy)`` and its radius times ``scale``."""
        return replace(self, cx=self.cx + dx, cy=self.cy + dy, r=self.r * scale)


@dataclass
class Scene:
    """A shapes scene: a background and objects drawn in order (later ones on top).

    Attributes:
        background: one of :data:`BACKGROUNDS`.
        objects: the objects, in draw order.
        size: the image side in pixels.
        gradient: the ``(a, b)`` palette names of a gradient background (``a`` at the top row,
            ``b`` at the bottom row); ``None`` for a flat background.
    """

    background: str
    objects: list[ShapeObject] = field(default_factory=list)
    size: int = SIZE
    gradient: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(
                f"unknown background {self.background!r}; expected one of {BACKGROUNDS}"
            )
        if (self.background == "gradient") != (self.gradient is not None):
            raise ValueError("gradient=(a, b) is given exactly when background == 'gradient'")
        if self.gradient is not None:
            self.gradient = tuple(self.gradient)  # type: ignore[assignment]
            for name in self.gradient:
                if name not in PALETTE:
                    raise ValueError(f"gradient colour {name!r} is not a palette colour")
        self.objects = list(self.objects)

    @property
    def caption(self) -> str:
        """The recipe's caption of this scene."""
        body = " and ".join(o.phrase(self.size) for o in self.objects)
        return f"{body} on a {self.background} background"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description."""
        return {
            "background": self.background,
            "gradient": list(self.gradient) if self.gradient else None,
            "size": self.size,
            "objects": [asdict(o) for o in self.objects],
            "caption": self.caption,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        """The inverse of :meth:`to_dict`."""
        return cls(
            background=d["background"],
            objects=[ShapeObject(**o) for o in d["objects"]],
            size=int(d.get("size", SIZE)),
            gradient=tuple(d["gradient"]) if d.get("gradient") else None,
        )


@dataclass
class RenderedScene:
    """The image of a scene with per-object masks.

    Attributes:
        image: ``(H, W, 3)`` ``uint8``.
        masks: per object, the *visible* pixels (the shape minus what later objects cover).
        full_masks: per object, the whole shape, as if nothing covered it.
        caption: the scene's caption.
    """

    image: np.ndarray
    masks: list[np.ndarray]
    full_masks: list[np.ndarray]
    caption: str


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size]
    return xs.astype(np.float64), ys.astype(np.float64)


def object_mask(obj: ShapeObject, size: int = SIZE) -> np.ndarray:
    """The ``(size, size)`` bool mask of a shape by the recipe's inclusion rules."""
    xs, ys = _grid(size)
    dx, dy = xs - obj.cx, ys - obj.cy
    r = obj.r
    if obj.shape == "circle":
        return np.sqrt(dx * dx + dy * dy) <= r + _EPS
    if obj.shape == "square":
        h = SQUARE_HALF * r
        return (np.abs(dx) <= h + _EPS) & (np.abs(dy) <= h + _EPS)
    # triangle, apex up: apex row cy - r, base row cy + 0.8r, half-width 0 -> r.
    top = obj.cy - r
    height = (1.0 + TRIANGLE_BASE) * r
    t = (ys - top) / height
    rows = (t >= -_EPS) & (t <= 1.0 + _EPS)
    return rows & (np.abs(dx) <= r * t + _EPS)


def background_image(scene: Scene) -> np.ndarray:
    """The background as a float ``(H, W, 3)`` array (not rounded)."""
    n = scene.size
    if scene.background == "gradient":
        assert scene.gradient is not None
        a = np.asarray(PALETTE[scene.gradient[0]], dtype=np.float64)
        b = np.asarray(PALETTE[scene.gradient[1]], dtype=np.float64)
        y = (np.arange(n, dtype=np.float64) / (n - 1))[:, None]
        rows = 0.6 * a[None, :] * (1.0 - y) + 0.6 * b[None, :] * y + 50.0  # (H, 3)
        return np.broadcast_to(rows[:, None, :], (n, n, 3)).copy()
    rgb = np.asarray(BACKGROUND_RGB[scene.background], dtype=np.float64)
    return np.broadcast_to(rgb, (n, n, 3)).copy()


def random_scene(rng: np.random.Generator, n_objects: int | None = None, size: int = SIZE) -> Scene:
    """Draw a scene from the training distribution.

    Args:
        rng: the random source (the result is a function of its state).
        n_objects: how many objects; ``None`` draws 1 to 3 uniformly, as in training.
        size: the image side (the recipe's ``128``; radii and ranges scale with it).
    """
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    gradient: tuple[str, str] | None = None
    names = list(PALETTE)
    if background == "gradient":
        i, j = rng.choice(len(names), size=2, replace=False)
        gradient = (names[int(i)], names[int(j)])
    if n_objects is None:
        n_objects = int(rng.integers(1, 4))
    if n_objects < 0:
        raise ValueError("n_objects must be >= 0")
    allowed = [c for c in names if c not in excluded_colours(background)]
    objects = []
    for _ in range(n_objects):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = allowed[int(rng.integers(len(allowed)))]
        r = float(rng.uniform(*R_RANGE)) * size
        cx = float(rng.uniform(r, size - r))
        cy = float(rng.uniform(r, size - r))
        objects.append(ShapeObject(shape, colour, cx, cy, r))
    return Scene(background, objects, size=size, gradient=gradient)


def _noise_rng(noise: bool | int | np.random.Generator | None) -> np.random.Generator | None:
    if noise is None or noise is False:
        return None
    if noise is True:
        return np.random.default_rng()
    if isinstance(noise, np.random.Generator):
        return noise
    if isinstance(noise, (int, np.integer)):
        return np.random.default_rng(int(noise))
    raise TypeError(f"noise must be a bool, an int seed or a numpy Generator, not {noise!r}")


def render(scene: Scene, noise: bool | int | np.random.Generator | None = False) -> RenderedScene:
    """Draw a scene.

    Args:
        scene: what to draw.
        noise: ``False``/``None``: no noise (the exact, ground-truth image); an ``int`` seed or
            a :class:`numpy.random.Generator`: the recipe's Gaussian noise (sigma 3) from it;
            ``True``: noise from a fresh, unseeded generator.
    """
    n = scene.size
    img = background_image(scene)
    full = [object_mask(o, n) for o in scene.objects]
    for o, m in zip(scene.objects, full):
        img[m] = np.asarray(o.rgb, dtype=np.float64)
    visible = []
    covered = np.zeros((n, n), dtype=bool)
    for m in reversed(full):
        visible.append(m & ~covered)
        covered |= m
    visible.reverse()
    gen = _noise_rng(noise)
    if gen is not None:
        img = img + gen.normal(0.0, NOISE_SIGMA, size=img.shape)
    image = np.rint(np.clip(img, 0.0, 255.0)).astype(np.uint8)
    return RenderedScene(image=image, masks=visible, full_masks=full, caption=scene.caption)


# --------------------------------------------------------------------------------------------
# Edits with known results
# --------------------------------------------------------------------------------------------


def _with_objects(scene: Scene, objects: Sequence[ShapeObject]) -> Scene:
    return Scene(scene.background, list(objects), size=scene.size, gradient=scene.gradient)


def moved(scene: Scene, index: int, dx: float, dy: float, scale: float = 1.0) -> Scene:
    """The true result of moving object ``index`` by ``(dx, dy)`` and scaling its radius.

    The object keeps its place in the draw order; scaling is about its centre ``(cx, cy)``.
    """
    objs = list(scene.objects)
    objs[index] = objs[index].shifted(dx, dy, scale)
    return _with_objects(scene, objs)


def dragged(scene: Scene, index: int, handle: Sequence[float], target: Sequence[float]) -> Scene:
    """The true result of dragging object ``index`` rigidly from ``handle`` to ``target``."""
    return moved(scene, index, target[0] - handle[0], target[1] - handle[1])


def recoloured(scene: Scene, index: int, colour: str) -> Scene:
    """The true result of giving object ``index`` the palette colour ``colour``."""
    objs = list(scene.objects)
    objs[index] = replace(objs[index], colour=colour)
    return _with_objects(scene, objs)


def pasted(
    scene: Scene, obj: ShapeObject, dx: float = 0.0, dy: float = 0.0, scale: float = 1.0
) -> Scene:
    """The true result of pasting ``obj`` (shifted by ``(dx, dy)``, radius times ``scale``)
    on top of everything in ``scene``."""
    return _with_objects(scene, [*scene.objects, obj.shifted(dx, dy, scale)])


# --------------------------------------------------------------------------------------------
# Edit cases
# --------------------------------------------------------------------------------------------


@dataclass
class EditCase:
    """A well-posed edit with its right answer.

    Attributes:
        task: one of :data:`TASKS`.
        seed: the seed :func:`make_case` was given.
        source: the image to edit (with the recipe's noise unless asked otherwise).
        source_clean: the same without noise.
        source_scene: what ``source`` shows.
        mask: the subject's (visible) mask in ``source``; ``None`` for ``paste`` (the subject
            comes from the reference).
        subject_index: the subject's index in ``result_scene.objects``.
        subject_colour: the subject's colour name in the source (in the reference for paste).
        result_colour: the subject's colour name in the true result.
        result: the true result image, without noise.
        result_mask: the subject's visible mask in ``result``.
        result_scene: what ``result`` shows.
        prompt: the source scene's caption (the prompt for inversion and editing).
        target_caption: the result scene's caption.
        offset: the subject's shift ``(dx, dy)`` in pixels (for paste: from its place in the
            reference to its place in the result).
        scale: the subject's radius scale about its centre.
        handles, targets: drag points ``[(x, y)]`` (drag only).
        editable_mask: the region a drag may change (drag only).
        reference, reference_clean, reference_scene, reference_mask, reference_prompt: the
            reference image, its noise-free version, scene, the reference object's mask and the
            reference caption (appearance and paste only).
        parts: ``compose`` only: one case per edit (its ``task``, subject, ``mask``,
            ``result_mask``, colours, ``offset`` and ``scale``; the same images), in the order
            of the compose spec's ``edits``.
    """

    task: str
    seed: int
    source: np.ndarray
    source_clean: np.ndarray
    source_scene: Scene
    mask: np.ndarray | None
    subject_index: int
    subject_colour: str
    result_colour: str
    result: np.ndarray
    result_mask: np.ndarray
    result_scene: Scene
    prompt: str
    target_caption: str
    offset: tuple[int, int] = (0, 0)
    scale: float = 1.0
    handles: list[tuple[int, int]] | None = None
    targets: list[tuple[int, int]] | None = None
    editable_mask: np.ndarray | None = None
    reference: np.ndarray | None = None
    reference_clean: np.ndarray | None = None
    reference_scene: Scene | None = None
    reference_mask: np.ndarray | None = None
    reference_prompt: str | None = None
    parts: list[EditCase] | None = None

    @property
    def subject_rgb(self) -> tuple[int, int, int]:
        """RGB of :attr:`result_colour` (what to look for in an edited image)."""
        return PALETTE[self.result_colour]


MOVE_RANGE = (15.0, 40.0)
"""Length range of move and drag offsets, in pixels."""

RESIZE_SCALES = ((0.65, 0.85), (1.2, 1.45))
"""Resize factors are drawn from one of these ranges (shrink or grow)."""

CLEARANCE = 3
"""Pixels kept free between the subject (before and after the edit) and other objects."""

FRAME_MARGIN = 1.0
"""Pixels kept between an edited subject and the frame edges."""

DRAG_DILATION = 6
"""Dilation radius of the drag editable mask, in pixels."""

MIN_CONTRAST = 60.0
"""Least RGB distance between a case's subject colour and every background pixel. (A gradient
can come within 38 of a palette colour: purple on a red-to-purple gradient.)"""

_MAX_TRIES = 500


def background_distance(scene: Scene, colour: str | Sequence[float]) -> float:
    """The least Euclidean RGB distance between ``colour`` and any (noise-free) background
    pixel of ``scene``."""
    rgb = np.asarray(PALETTE[colour] if isinstance(colour, str) else colour, dtype=np.float64)
    rows = background_image(scene)[:, 0, :]  # every row is flat
    return float(np.sqrt(((rows - rgb) ** 2).sum(axis=-1)).min())


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of ``mask`` by a disk of ``radius`` pixels."""
    if radius <= 0:
        return mask.copy()
    h, w = mask.shape
    p = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for oy in range(-radius, radius + 1):
        for ox in range(-radius, radius + 1):
            if ox * ox + oy * oy <= radius * radius:
                out |= p[radius + oy : radius + oy + h, radius + ox : radius + ox + w]
    return out


def _others_union(scene: Scene, skip: int | None) -> np.ndarray:
    n = scene.size
    out = np.zeros((n, n), dtype=bool)
    for i, o in enumerate(scene.objects):
        if i != skip:
            out |= object_mask(o, n)
    return out


def _clear_of(obj: ShapeObject, others_grown: np.ndarray, size: int) -> bool:
    return not (object_mask(obj, size) & others_grown).any()


def _random_offset(rng: np.random.Generator) -> tuple[int, int]:
    while True:
        length = rng.uniform(*MOVE_RANGE)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        dx, dy = round(length * math.cos(angle)), round(length * math.sin(angle))
        if MOVE_RANGE[0] <= math.hypot(dx, dy) <= MOVE_RANGE[1]:
            return dx, dy


def _unique_colour(scene: Scene, index: int) -> bool:
    c = scene.objects[index].colour
    return sum(o.colour == c for o in scene.objects) == 1


def _pick_subject(rng: np.random.Generator, size: int, shapes: Sequence[str] = SHAPES):
    """A 1-2 object scene and a subject index: subject in frame, unoccluded, uniquely coloured,
    of one of ``shapes``, and clear of the other objects."""
    for _ in range(_MAX_TRIES):
        scene = random_scene(rng, n_objects=int(rng.integers(1, 3)), size=size)
        index = int(rng.integers(len(scene.objects)))
        subj = scene.objects[index]
        if subj.shape not in shapes or not _unique_colour(scene, index):
            continue
        if background_distance(scene, subj.colour) < MIN_CONTRAST:
            continue
        if not subj.inside(size, FRAME_MARGIN):
            continue
        grown = dilate(_others_union(scene, index), CLEARANCE)
        if not _clear_of(subj, grown, size):
            continue
        return scene, index, grown
    raise RuntimeError("could not draw a usable source scene")


def _noise_arg(rng: np.random.Generator, noise: bool) -> np.random.Generator | None:
    return np.random.default_rng(int(rng.integers(2**63))) if noise else None


def _reference_scene(rng: np.random.Generator, size: int, ok) -> tuple[Scene, ShapeObject]:
    """A one-object reference scene drawn from the recipe, whose object satisfies ``ok``."""
    for _ in range(_MAX_TRIES * 10):
        ref = random_scene(rng, n_objects=1, size=size)
        obj = ref.objects[0]
        if ok(obj) and obj.inside(size, FRAME_MARGIN):
            return ref, obj
    raise RuntimeError("could not draw a usable reference scene")


def make_case(task: str, seed: int, *, noise: bool = True, size: int = SIZE,
              background: str | None = None, pairs: int = 1) -> EditCase:
    """Build a well-posed edit case for ``task`` with its true result.

    Every case keeps the subject fully inside the frame (before and after), never touching or
    covering another object (``CLEARANCE`` pixels apart), of a colour no other object in the
    result has and at least ``MIN_CONTRAST`` from every background pixel, so it can be found
    again by colour (:func:`subject_mask_by_colour`). Offsets are whole pixels.

    * ``move``: a 1-2 object scene, the subject moved by 15-40 px (``scale`` 1).
    * ``resize``: a circle or square subject (its centre, centroid and box centre coincide, so
      the answer does not depend on the editor's scaling anchor) scaled by 0.65-0.85 or
      1.2-1.45 about its centre, ``offset`` (0, 0).
    * ``drag``: as ``move``; handle = the subject's centre rounded to pixels, target = handle
      + offset, editable mask = the union of the subject's source and target shapes dilated by
      ``DRAG_DILATION`` px.
    * ``appearance``: a one-object reference scene holding the same shape in another palette
      colour (one that neither the source background nor the other objects use); the true
      result is the subject recoloured.
    * ``paste``: a one-object reference scene; its object is pasted on top of the source at
      its reference position plus ``offset`` (``scale`` 1), in a free spot.

    * ``compose`` (a case kind, not one of :data:`TASKS`): a 2-object scene; one object is
      moved by 15-40 px and the other (a circle or square) resized about its centre, in one
      ``compose`` spec of a ``move`` and a ``resize`` edit. :attr:`EditCase.parts` holds each
      edit's subject (source mask, true mask, colour); the case's own subject fields are the
      moved object's.

    Args:
        task: one of :data:`CASE_KINDS`.
        seed: the case is a function of ``(task, seed, noise, size, background, pairs)``.
        noise: add the recipe's noise to the source and reference images (the result is
            always noise-free).
        size: image side.
        background: ``None`` (default): the background is drawn as in training, and the case
            is exactly what it always was for this seed. A name of :data:`BACKGROUNDS`: the
            case is drawn from the same distribution conditioned on that background (seeded
            ``[task, seed, 1 + background's index]``, scenes drawn until one has it), so
            ``--background gradient`` gives gradient cases without hunting for seeds.
        pairs: drag only, 1 to :data:`MAX_PAIRS` handle/target pairs. ``1`` is the historical
            case (one handle at the subject's rounded centre). ``k > 1`` is the *same* case
            (scene, offset, noise, truth) with ``k`` handles spread over the subject
            (:func:`spread_points`: that centre handle first, then farthest-point picks in the
            subject eroded by 2 px), every target its handle plus the same offset: the truth is
            the rigid move.
    """
    if task not in CASE_KINDS:
        raise ValueError(f"unknown task {task!r}; expected one of {CASE_KINDS}")
    if background is not None and background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {BACKGROUNDS}")
    if not 1 <= int(pairs) <= MAX_PAIRS:
        raise ValueError(f"pairs must be 1 to {MAX_PAIRS}, got {pairs}")
    if pairs != 1 and task != "drag":
        raise ValueError("pairs applies to drag cases only")
    key = [CASE_KINDS.index(task), int(seed)]
    if background is not None:
        key.append(1 + BACKGROUNDS.index(background))
    rng = np.random.default_rng(key)
    builder = {
        "move": _case_move,
        "resize": _case_resize,
        "drag": _case_move,
        "appearance": _case_appearance,
        "paste": _case_paste,
        "compose": _case_compose,
    }[task]
    tries = _MAX_TRIES * (20 if background is not None else 1)
    for _ in range(tries):
        case = builder(task, seed, rng, noise, size)
        if case is None:
            continue
        if background is not None and case.source_scene.background != background:
            continue
        if pairs > 1:
            handles = spread_points(case.mask, pairs, case.handles[0])
            dx, dy = case.offset
            case.handles = handles
            case.targets = [(x + dx, y + dy) for x, y in handles]
        return case
    raise RuntimeError(f"could not build a {task} case for seed {seed}")


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion of ``mask`` by a disk of ``radius`` pixels (the frame counts as inside:
    a mask touching the border is not eaten from there)."""
    return ~dilate(~np.asarray(mask, dtype=bool), radius)


def spread_points(mask: np.ndarray, k: int, first: Sequence[int]) -> list[tuple[int, int]]:
    """``k`` integer points ``(x, y)`` spread over ``mask``: ``first`` (kept as given), then
    each next point the pixel of ``mask`` eroded by 2 px (the mask itself if that is empty)
    farthest from the points so far (ties: the first in row-major order)."""
    inner = erode(mask, 2)
    if not inner.any():
        inner = np.asarray(mask, dtype=bool)
    ys, xs = np.nonzero(inner)
    pts = np.stack([xs, ys], axis=1).astype(np.float64)
    chosen = [(int(first[0]), int(first[1]))]
    d = np.hypot(pts[:, 0] - chosen[0][0], pts[:, 1] - chosen[0][1])
    for _ in range(k - 1):
        i = int(np.argmax(d))
        chosen.append((int(xs[i]), int(ys[i])))
        d = np.minimum(d, np.hypot(pts[:, 0] - xs[i], pts[:, 1] - ys[i]))
    return chosen


def _finish(
    task: str,
    seed: int,
    rng: np.random.Generator,
    noise: bool,
    src: Scene,
    res: Scene,
    subject_index: int,
    source_index: int | None,
    **extra: Any,
) -> EditCase:
    src_r = render(src, noise=_noise_arg(rng, noise))
    src_clean = render(src).image if noise else src_r.image
    res_r = render(res)
    return EditCase(
        task=task,
        seed=int(seed),
        source=src_r.image,
        source_clean=src_clean,
        source_scene=src,
        mask=None if source_index is None else src_r.masks[source_index],
        subject_index=subject_index,
        subject_colour=extra.pop(
            "subject_colour", src.objects[source_index].colour if source_index is not None else ""
        ),
        result_colour=res.objects[subject_index].colour,
        result=res_r.image,
        result_mask=res_r.masks[subject_index],
        result_scene=res,
        prompt=src.caption,
        target_caption=res.caption,
        **extra,
    )


def _case_move(task, seed, rng, noise, size) -> EditCase | None:
    scene, index, grown = _pick_subject(rng, size)
    subj = scene.objects[index]
    for _ in range(50):
        dx, dy = _random_offset(rng)
        new = subj.shifted(dx, dy)
        if new.inside(size, FRAME_MARGIN) and _clear_of(new, grown, size):
            break
    else:
        return None
    res = moved(scene, index, dx, dy)
    extra: dict[str, Any] = {"offset": (dx, dy), "scale": 1.0}
    if task == "drag":
        handle = (round(subj.cx), round(subj.cy))
        target = (handle[0] + dx, handle[1] + dy)
        union = object_mask(subj, size) | object_mask(new, size)
        extra.update(handles=[handle], targets=[target], editable_mask=dilate(union, DRAG_DILATION))
    return _finish(task, seed, rng, noise, scene, res, index, index, **extra)


def _case_resize(task, seed, rng, noise, size) -> EditCase | None:
    scene, index, grown = _pick_subject(rng, size, shapes=("circle", "square"))
    subj = scene.objects[index]
    for _ in range(50):
        lo, hi = RESIZE_SCALES[int(rng.integers(len(RESIZE_SCALES)))]
        scale = round(float(rng.uniform(lo, hi)), 2)
        new = subj.shifted(0, 0, scale)
        if new.inside(size, FRAME_MARGIN) and _clear_of(new, grown, size):
            break
    else:
        return None
    res = moved(scene, index, 0, 0, scale)
    return _finish(task, seed, rng, noise, scene, res, index, index, offset=(0, 0), scale=scale)


def _case_appearance(task, seed, rng, noise, size) -> EditCase | None:
    scene, index, _ = _pick_subject(rng, size)
    subj = scene.objects[index]
    taken = {o.colour for o in scene.objects} | excluded_colours(scene.background)
    ref, ref_obj = _reference_scene(
        rng,
        size,
        lambda o: (
            o.shape == subj.shape
            and o.colour not in taken
            and background_distance(scene, o.colour) >= MIN_CONTRAST
        ),
    )
    res = recoloured(scene, index, ref_obj.colour)
    ref_r = render(ref, noise=_noise_arg(rng, noise))
    return _finish(
        task, seed, rng, noise, scene, res, index, index,
        reference=ref_r.image,
        reference_clean=render(ref).image if noise else ref_r.image,
        reference_scene=ref,
        reference_mask=ref_r.masks[0],
        reference_prompt=ref.caption,
    )  # fmt: skip


def _case_paste(task, seed, rng, noise, size) -> EditCase | None:
    scene = random_scene(rng, n_objects=int(rng.integers(1, 3)), size=size)
    taken = {o.colour for o in scene.objects} | excluded_colours(scene.background)
    ref, ref_obj = _reference_scene(
        rng,
        size,
        lambda o: o.colour not in taken and background_distance(scene, o.colour) >= MIN_CONTRAST,
    )
    grown = dilate(_others_union(scene, None), CLEARANCE)
    for _ in range(50):
        tx = rng.uniform(ref_obj.r, size - ref_obj.r)
        ty = rng.uniform(ref_obj.r, size - ref_obj.r)
        dx, dy = round(tx - ref_obj.cx), round(ty - ref_obj.cy)
        new = ref_obj.shifted(dx, dy)
        if new.inside(size, FRAME_MARGIN) and _clear_of(new, grown, size):
            break
    else:
        return None
    res = pasted(scene, ref_obj, dx, dy)
    ref_r = render(ref, noise=_noise_arg(rng, noise))
    return _finish(
        task, seed, rng, noise, scene, res, len(res.objects) - 1, None,
        subject_colour=ref_obj.colour,
        offset=(dx, dy),
        scale=1.0,
        reference=ref_r.image,
        reference_clean=render(ref).image if noise else ref_r.image,
        reference_scene=ref,
        reference_mask=ref_r.masks[0],
        reference_prompt=ref.caption,
    )  # fmt: skip


def _case_compose(task, seed, rng, noise, size) -> EditCase | None:
    """Two edits in one: move one object of a 2-object scene, resize the other."""
    scene = random_scene(rng, n_objects=2, size=size)
    objs = scene.objects
    if objs[0].colour == objs[1].colour:
        return None
    if any(background_distance(scene, o.colour) < MIN_CONTRAST for o in objs):
        return None
    if not all(o.inside(size, FRAME_MARGIN) for o in objs):
        return None
    resizable = [i for i, o in enumerate(objs) if o.shape in ("circle", "square")]
    if not resizable:
        return None
    b = resizable[int(rng.integers(len(resizable)))]
    a = 1 - b
    mask_a, mask_b = object_mask(objs[a], size), object_mask(objs[b], size)
    if (mask_a & dilate(mask_b, CLEARANCE)).any():
        return None
    lo, hi = RESIZE_SCALES[int(rng.integers(len(RESIZE_SCALES)))]
    scale = round(float(rng.uniform(lo, hi)), 2)
    new_b = objs[b].shifted(0, 0, scale)
    if not (new_b.inside(size, FRAME_MARGIN) and _clear_of(new_b, dilate(mask_a, CLEARANCE), size)):
        return None
    grown = dilate(mask_b | object_mask(new_b, size), CLEARANCE)
    for _ in range(50):
        dx, dy = _random_offset(rng)
        new_a = objs[a].shifted(dx, dy)
        if new_a.inside(size, FRAME_MARGIN) and _clear_of(new_a, grown, size):
            break
    else:
        return None
    res = moved(moved(scene, a, dx, dy), b, 0, 0, scale)
    case = _finish(task, seed, rng, noise, scene, res, a, a, offset=(dx, dy), scale=1.0)
    src_masks, res_masks = render(scene).masks, render(res).masks
    case.parts = [
        replace(case, task="move", subject_index=a, mask=src_masks[a], result_mask=res_masks[a],
                subject_colour=objs[a].colour, result_colour=objs[a].colour,
                offset=(dx, dy), scale=1.0),
        replace(case, task="resize", subject_index=b, mask=src_masks[b], result_mask=res_masks[b],
                subject_colour=objs[b].colour, result_colour=objs[b].colour,
                offset=(0, 0), scale=scale),
    ]
    return case


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def _png_bytes(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    if array.dtype == bool:
        img = Image.fromarray(np.where(array, 255, 0).astype(np.uint8), mode="L")
    else:
        img = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _pair(p: Sequence[float]) -> list[int | float]:
    return [int(v) if float(v).is_integer() else float(v) for v in p]


def _part_mask_name(j: int) -> str:
    return "mask.png" if j == 0 else f"mask_{j + 1}.png"


def case_spec(case: EditCase) -> dict[str, Any]:
    """The diffeditor CLI spec of a case, with the file names :func:`save_case` writes."""
    t = case.task
    if t in ("move", "resize"):
        spec: dict[str, Any] = {"task": t, "image": "source.png", "mask": "mask.png"}
        spec.update(offset=_pair(case.offset), scale=float(case.scale), prompt=case.prompt)
        return spec
    if t == "compose":
        edits = []
        for j, part in enumerate(case.parts or []):
            edits.append({"task": part.task, "mask": _part_mask_name(j),
                          "offset": _pair(part.offset), "scale": float(part.scale)})
        return {"task": "compose", "image": "source.png", "prompt": case.prompt, "edits": edits}
    if t == "drag":
        return {
            "task": "drag",
            "image": "source.png",
            "mask": "editable.png",
            "handles": [_pair(p) for p in case.handles or []],
            "targets": [_pair(p) for p in case.targets or []],
            "prompt": case.prompt,
        }
    if t == "appearance":
        return {
            "task": "appearance",
            "image": "source.png",
            "mask": "mask.png",
            "reference": "reference.png",
            "reference_mask": "reference_mask.png",
            "prompt": case.target_caption,  # describe the wanted result (README)
            "reference_prompt": case.reference_prompt,
        }
    if t == "paste":
        return {
            "task": "paste",
            "image": "source.png",
            "reference": "reference.png",
            "reference_mask": "reference_mask.png",
            "offset": _pair(case.offset),
            "scale": float(case.scale),
            "prompt": case.target_caption,  # describe the wanted result (README)
            "reference_prompt": case.reference_prompt,
        }
    raise ValueError(f"unknown task {t!r}")


def save_case(case: EditCase, folder: str | os.PathLike[str], force: bool = True) -> Path:
    """Write a case into ``folder`` and return the path of its ``spec.json``.

    Files: ``source.png``; ``mask.png`` (move/resize/appearance: the subject);
    ``editable.png`` (drag); ``reference.png`` and ``reference_mask.png`` (appearance/paste);
    the truth, ``truth.png`` and ``truth_mask.png`` (the subject in the true result); the CLI
    spec ``spec.json`` (paths relative to it, points and offsets in pixels); and ``case.json``
    (the scenes, captions, colours and parameters, for scoring). Masks are white where
    selected. The files are written as one unit (temporary files, then renamed into place:
    :func:`diffeditor.imageio.atomic_write_many`), with the permissions a plain ``open()``
    gives (0666 less the umask), replacing the files of an earlier case in ``folder``; with
    ``force=False`` an existing file is an :class:`~diffeditor.errors.OutputError` instead and
    nothing is written.
    """
    from diffeditor.imageio import atomic_write_many

    out = Path(folder)
    arrays = {"source.png": case.source, "mask.png": case.mask, "editable.png": case.editable_mask,
              "reference.png": case.reference, "reference_mask.png": case.reference_mask,
              "truth.png": case.result, "truth_mask.png": case.result_mask}
    arrays.update({_part_mask_name(j): part.mask for j, part in enumerate((case.parts or [])[1:], start=1)})
    files = {name: _png_bytes(a) for name, a in arrays.items() if a is not None}
    meta = {
        "task": case.task,
        "seed": case.seed,
        "spec": "spec.json",
        "truth": "truth.png",
        "truth_mask": "truth_mask.png",
        "subject_index": case.subject_index,
        "subject_colour": case.subject_colour,
        "result_colour": case.result_colour,
        "result_rgb": list(case.subject_rgb),
        "prompt": case.prompt,
        "target_caption": case.target_caption,
        "offset": _pair(case.offset),
        "scale": float(case.scale),
        "source_scene": case.source_scene.to_dict(),
        "result_scene": case.result_scene.to_dict(),
        "reference_scene": case.reference_scene.to_dict() if case.reference_scene else None,
    }
    files["case.json"] = (json.dumps(meta, indent=2) + "\n").encode()
    files["spec.json"] = (json.dumps(case_spec(case), indent=2) + "\n").encode()
    # one unit, with the mode a plain open() gives (the umask), replacing an earlier case
    atomic_write_many([(out / name, lambda fh, b=data: fh.write(b)) for name, data in files.items()],
                      force=force)
    return out / "spec.json"


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def subject_mask_by_colour(
    image: np.ndarray, colour_rgb: str | Sequence[float], threshold: float = 30.0
) -> np.ndarray:
    """Pixels within Euclidean RGB distance ``threshold`` of ``colour_rgb`` (a palette name or
    an RGB triple).

    The default suits this world: the closest two palette colours (yellow, orange) are 70.9
    apart, so with a threshold under 35 no pixel counts for two colours; and :func:`make_case`
    only picks subject colours at least :data:`MIN_CONTRAST` (60) from every background pixel.
    """
    rgb = PALETTE[colour_rgb] if isinstance(colour_rgb, str) else colour_rgb
    diff = np.asarray(image, dtype=np.float64)[..., :3] - np.asarray(rgb, dtype=np.float64)
    return np.sqrt((diff * diff).sum(axis=-1)) <= threshold


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two masks; 1.0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def centroid(mask: np.ndarray) -> tuple[float, float] | None:
    """The mean ``(x, y)`` of a mask's pixels; ``None`` for an empty mask."""
    ys, xs = np.nonzero(np.asarray(mask, dtype=bool))
    if xs.size == 0:
        return None
    return float(xs.mean()), float(ys.mean())


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB (peak 255) between two images, over ``mask`` pixels if given; ``inf`` when
    they agree exactly, ``nan`` for an empty mask."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    err = (a - b) ** 2
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if not m.any():
            return float("nan")
        err = err[m]
    mse = float(err.mean())
    if mse == 0.0:
        return float("inf")
    return 10.0 * math.log10(255.0**2 / mse)


# --------------------------------------------------------------------------------------------
# Strict criteria (issue 27): does an edit *look right*?
# --------------------------------------------------------------------------------------------

#: the strict criteria's thresholds
STRICT_COLOUR = 60.0       # subject colour region / purity: RGB distance below this
STRICT_IOU = 0.8           # shape
STRICT_PURE = 0.95         # purity: fraction of the eroded true subject
STRICT_ERODE = 2           # px eroded from the true subject and from the vacated area
STRICT_GHOST_RGB = 40.0    # vacated pixel within this RGB distance of the true result
STRICT_CLEAN = 0.95        # no ghost: fraction of the eroded vacated area
STRICT_SEAM_DB = 32.0      # no seam: PSNR against the input outside the masks
STRICT_SEAM_DILATION = 4   # px the source and true masks are dilated by for the seam
#: the four criteria, in table order
CRITERIA = ("shape", "purity", "no_ghost", "no_seam")


def _rgb_distance(image: np.ndarray, rgb) -> np.ndarray:
    diff = np.asarray(image, dtype=np.float64)[..., :3] - np.asarray(rgb, dtype=np.float64)
    return np.sqrt((diff * diff).sum(-1))


def _subjects(case) -> list:
    """The cases whose subjects the strict criteria look at: a compose case's parts, else it."""
    return list(case.parts) if getattr(case, "parts", None) else [case]


def strict_scores(case, edited: np.ndarray) -> dict[str, float]:
    """The strict criteria of one edited image (H, W, 3 uint8) against the case's truth.

    Returns each criterion's measure (``strict_iou``, ``strict_purity``, ``strict_clean``,
    ``strict_seam_db``; for a compose case the worst of its subjects), ``strict_vacated_px``
    (pixels of the eroded vacated area), the verdicts ``ok_shape``, ``ok_purity``,
    ``ok_no_ghost``, ``ok_no_seam`` and ``looks_right`` (all four; 1.0 or 0.0) and
    ``psnr_full_db``, the whole image against the true result."""
    ious, purities, cleans, vacated_px = [], [], [], 0
    touched = np.zeros(case.result_mask.shape, dtype=bool)
    for part in _subjects(case):
        true = part.result_mask
        rgb = part.subject_rgb
        near = _rgb_distance(edited, rgb) < STRICT_COLOUR
        ious.append(iou(near, true))
        core = erode(true, STRICT_ERODE)
        if not core.any():
            core = true
        purities.append(float(near[core].mean()) if core.any() else 0.0)
        src = part.mask if part.mask is not None else np.zeros_like(true)
        vacated = erode(src & ~true, STRICT_ERODE)
        vacated_px += int(vacated.sum())
        if vacated.any():
            close = _rgb_distance(edited, case.result) < STRICT_GHOST_RGB
            cleans.append(float(close[vacated].mean()))
        else:
            cleans.append(1.0)  # nothing vacated
        touched |= src | true
    outside = ~dilate(touched, STRICT_SEAM_DILATION)
    seam = psnr(edited, case.source, outside)
    out = {
        "strict_iou": min(ious),
        "strict_purity": min(purities),
        "strict_clean": min(cleans),
        "strict_vacated_px": float(vacated_px),
        "strict_seam_db": seam,
        "psnr_full_db": psnr(edited, case.result),
    }
    out["ok_shape"] = float(out["strict_iou"] >= STRICT_IOU)
    out["ok_purity"] = float(out["strict_purity"] >= STRICT_PURE)
    out["ok_no_ghost"] = float(out["strict_clean"] >= STRICT_CLEAN)
    # nan (nothing outside) cannot show a seam; inf (identical) is no seam
    out["ok_no_seam"] = float(not seam < STRICT_SEAM_DB)
    out["looks_right"] = float(all(out["ok_" + c] for c in CRITERIA))
    return out
