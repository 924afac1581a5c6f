"""The shapes world of the ``diffeditor-shapes`` plugin: recipe, edit cases, saving, scoring."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# An installed diffeditor-shapes (or PYTHONPATH) wins; otherwise use the source tree.
sys.path.append(str(Path(__file__).resolve().parents[2] / "plugins/diffeditor-shapes/src"))

from diffeditor_shapes import MODEL_DIR
from diffeditor_shapes.scenes import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    MIN_CONTRAST,
    MOVE_RANGE,
    NOISE_SIGMA,
    PALETTE,
    SHAPES,
    TASKS,
    Scene,
    ShapeObject,
    background_distance,
    background_image,
    case_spec,
    centroid,
    dilate,
    dragged,
    iou,
    make_case,
    moved,
    object_mask,
    pasted,
    psnr,
    random_scene,
    recoloured,
    render,
    save_case,
    subject_mask_by_colour,
)

CAPTION_RE = re.compile(
    r"^a (small|big) (\w+) (circle|square|triangle)"
    r"( and a (small|big) (\w+) (circle|square|triangle))*"
    r" on a (white|black|gray|gradient) background$"
)


def check_scene(scene: Scene) -> None:
    """Everything the recipe promises about a drawn scene."""
    n = scene.size
    assert scene.background in BACKGROUNDS
    assert 1 <= len(scene.objects) <= 3
    if scene.background == "gradient":
        a, b = scene.gradient
        assert a in PALETTE and b in PALETTE and a != b
    else:
        assert scene.gradient is None
    for o in scene.objects:
        assert o.shape in SHAPES
        assert o.colour in PALETTE
        assert o.colour != scene.background
        assert 0.12 * n <= o.r <= 0.25 * n
        assert o.r <= o.cx <= n - o.r and o.r <= o.cy <= n - o.r


def check_render(scene: Scene) -> None:
    """The noise-free render: exact palette colours at visible object pixels, background
    elsewhere, and consistent masks."""
    out = render(scene)
    n = scene.size
    assert out.image.shape == (n, n, 3) and out.image.dtype == np.uint8
    assert len(out.masks) == len(out.full_masks) == len(scene.objects)
    bg = np.rint(background_image(scene)).astype(np.uint8)
    anything = np.zeros((n, n), dtype=bool)
    for i, (o, vis, full) in enumerate(zip(scene.objects, out.masks, out.full_masks)):
        assert vis.dtype == bool and vis.shape == (n, n)
        assert not (vis & ~full).any()
        later = np.zeros((n, n), dtype=bool)
        for m in out.full_masks[i + 1 :]:
            later |= m
        assert np.array_equal(vis, full & ~later)
        assert (out.image[vis] == np.array(o.rgb, np.uint8)).all()
        anything |= full
    assert np.array_equal(out.image[~anything], bg[~anything])
    # visible masks are disjoint
    total = sum(m.astype(int) for m in out.masks) if out.masks else np.zeros((n, n), int)
    assert total.max(initial=0) <= 1
    assert out.caption == scene.caption


# -- the recipe ---------------------------------------------------------------------------------


def test_palette_and_backgrounds_match_recipe():
    assert PALETTE == {
        "red": (220, 40, 40),
        "green": (40, 180, 60),
        "blue": (40, 70, 220),
        "yellow": (235, 210, 40),
        "purple": (150, 60, 190),
        "orange": (240, 140, 30),
        "white": (240, 240, 240),
        "black": (20, 20, 20),
    }
    assert BACKGROUND_RGB == {"white": (240,) * 3, "black": (20,) * 3, "gray": (128,) * 3}
    assert set(BACKGROUNDS) == {"white", "black", "gray", "gradient"}


def test_gradient_formula():
    scene = Scene("gradient", [], gradient=("red", "blue"))
    img = render(scene).image
    a, b = np.array(PALETTE["red"], float), np.array(PALETTE["blue"], float)
    for row in (0, 1, 50, 127):
        y = row / 127
        want = np.rint(0.6 * a * (1 - y) + 0.6 * b * y + 50).astype(np.uint8)
        assert (img[row] == want).all()  # every pixel of the row
    assert tuple(img[0, 0]) == (182, 74, 74)
    assert tuple(img[127, 0]) == (74, 92, 182)


def test_flat_backgrounds():
    for name, rgb in BACKGROUND_RGB.items():
        img = render(Scene(name, [])).image
        assert (img == np.array(rgb, np.uint8)).all()


def test_circle_pixels():
    m = object_mask(ShapeObject("circle", "red", 64, 64, 20))
    assert m[64, 64] and m[64, 84] and m[64, 44] and m[84, 64] and m[44, 64]
    assert not m[64, 85] and not m[85, 64]
    assert m[64 + 14, 64 + 14]  # distance 19.80
    assert not m[64 + 14, 64 + 15]  # distance 20.52
    assert m.sum() == sum(
        1 for y in range(128) for x in range(128) if (x - 64) ** 2 + (y - 64) ** 2 <= 400
    )


def test_square_pixels():
    m = object_mask(ShapeObject("square", "red", 64, 64, 20))  # half side 17
    assert m[64 - 17, 64 - 17] and m[64 + 17, 64 + 17] and m[64 + 17, 64 - 17]
    assert not m[64, 64 + 18] and not m[64 - 18, 64] and not m[64 + 18, 64 + 18]
    assert m.sum() == 35 * 35
    # the corner lies outside the inscribed circle: a square is not a circle
    assert (
        m[64 + 17, 64 + 17]
        and not object_mask(ShapeObject("circle", "red", 64, 64, 20))[64 + 17, 64 + 17]
    )


def test_triangle_pixels():
    # apex row 64 - 30 = 34, base row 64 + 24 = 88, half-width 30 * (row - 34) / 54
    m = object_mask(ShapeObject("triangle", "red", 64, 64, 30))
    rows = np.nonzero(m.any(axis=1))[0]
    assert rows.min() == 34 and rows.max() == 88
    assert np.nonzero(m[34])[0].tolist() == [64]  # the apex: one pixel
    base = np.nonzero(m[88])[0]
    assert base.min() == 34 and base.max() == 94  # half-width r at the base
    mid = np.nonzero(m[61])[0]  # half-width 15
    assert mid.min() == 49 and mid.max() == 79
    # widths grow with the row (apex up)
    widths = m.sum(axis=1)[34:89]
    assert (np.diff(widths) >= 0).all()
    # the triangle's centroid is below its (cx, cy): 2/3 of the way from apex to base
    cx, cy = centroid(m)
    assert abs(cx - 64) < 1e-9 and abs(cy - (34 + 2 / 3 * 54)) < 1.0


def test_caption_and_size_rule():
    n = 128
    objs = [
        ShapeObject("circle", "red", 40, 40, 0.17 * n - 0.01),
        ShapeObject("square", "blue", 80, 80, 0.17 * n),
    ]
    scene = Scene("gray", objs)
    assert scene.caption == "a small red circle and a big blue square on a gray background"
    grad = Scene("gradient", objs[:1], gradient=("green", "yellow"))
    assert grad.caption == "a small red circle on a gradient background"


def test_draw_order_and_occlusion():
    a = ShapeObject("square", "red", 60, 60, 25)
    b = ShapeObject("circle", "blue", 75, 60, 20)
    out = render(Scene("white", [a, b]))
    assert out.full_masks[0][60, 70] and out.full_masks[1][60, 70]
    assert tuple(out.image[60, 70]) == PALETTE["blue"]  # later is on top
    assert not out.masks[0][60, 70] and out.masks[1][60, 70]
    assert out.masks[0].sum() < out.full_masks[0].sum()
    assert np.array_equal(out.masks[1], out.full_masks[1])
    check_render(Scene("white", [a, b]))


def test_noise():
    scene = Scene("gray", [ShapeObject("circle", "red", 64, 64, 20)])
    clean = render(scene).image
    assert np.array_equal(render(scene, noise=False).image, clean)
    n1, n2 = render(scene, noise=7).image, render(scene, noise=7).image
    assert np.array_equal(n1, n2)  # seeded noise is reproducible
    assert not np.array_equal(n1, render(scene, noise=8).image)
    diff = n1.astype(float) - clean.astype(float)
    assert abs(diff.std() - NOISE_SIGMA) < 0.2 and abs(diff.mean()) < 0.2
    white = render(Scene("white", []), noise=np.random.default_rng(0)).image
    assert white.max() <= 255 and white.min() >= 0


def test_random_scene_is_deterministic():
    a = random_scene(np.random.default_rng(123))
    b = random_scene(np.random.default_rng(123))
    assert a == b
    assert np.array_equal(render(a, noise=1).image, render(b, noise=1).image)


def test_distribution_covers_the_recipe():
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(600)]
    backgrounds = {s.background for s in scenes}
    assert backgrounds == set(BACKGROUNDS)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    objs = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objs} == set(SHAPES)
    assert {o.colour for o in objs} == set(PALETTE)
    # a gradient excludes no colour (documented choice): objects may share a gradient end's name
    grad = [s for s in scenes if s.background == "gradient"]
    assert any(o.colour in s.gradient for s in grad for o in s.objects)
    # roughly uniform backgrounds
    counts = [sum(s.background == b for s in scenes) for b in BACKGROUNDS]
    assert min(counts) > 100


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=2**32 - 1), st.sampled_from([None, 1, 2, 3]))
def test_any_seed_gives_a_valid_scene(seed, n):
    scene = random_scene(np.random.default_rng(seed), n_objects=n)
    check_scene(scene)
    if n is not None:
        assert len(scene.objects) == n
    check_render(scene)
    assert CAPTION_RE.match(scene.caption)
    for o in scene.objects:
        word = "small" if o.r < 0.17 * 128 else "big"
        assert f"a {word} {o.colour} {o.shape}" in scene.caption


def test_scene_roundtrip_and_validation():
    scene = random_scene(np.random.default_rng(5), n_objects=3)
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    with pytest.raises(ValueError):
        Scene("gradient", [])
    with pytest.raises(ValueError):
        Scene("white", [], gradient=("red", "blue"))
    with pytest.raises(ValueError):
        ShapeObject("hexagon", "red", 1, 1, 1)
    with pytest.raises(ValueError):
        ShapeObject("circle", "gray", 1, 1, 1)


# -- edit helpers -------------------------------------------------------------------------------


def test_edit_helpers():
    a = ShapeObject("square", "red", 40, 40, 20)
    b = ShapeObject("circle", "blue", 90, 90, 20)
    scene = Scene("white", [a, b])
    m = moved(scene, 0, 10, -5, 1.5)
    assert m.objects[0] == ShapeObject("square", "red", 50, 35, 30) and m.objects[1] == b
    assert scene.objects[0] == a  # the input is unchanged
    assert dragged(scene, 1, (90, 90), (80, 100)) == moved(scene, 1, -10, 10)
    r = recoloured(scene, 1, "green")
    assert r.objects[1].colour == "green" and r.objects[0] == a
    p = pasted(scene, ShapeObject("triangle", "yellow", 20, 100, 15), dx=5, dy=-3, scale=2)
    assert len(p.objects) == 3 and p.objects[-1] == ShapeObject("triangle", "yellow", 25, 97, 30)
    assert p.caption.endswith("and a big yellow triangle on a white background")


# -- edit cases ---------------------------------------------------------------------------------


def check_case(case) -> None:
    n = case.source_scene.size
    src, res = case.source_scene, case.result_scene
    check_render(src)
    check_render(res)
    assert case.source.shape == case.result.shape == (n, n, 3)
    assert case.source.dtype == case.result.dtype == np.uint8
    assert np.array_equal(case.source_clean, render(src).image)
    assert np.array_equal(case.result, render(res).image)
    assert case.prompt == src.caption and case.target_caption == res.caption
    subj_res = res.objects[case.subject_index]
    assert case.result_colour == subj_res.colour
    assert np.array_equal(case.result_mask, object_mask(subj_res, n))  # unoccluded
    assert subj_res.inside(n, 1.0)
    # the subject's colour is unique and far from the background: findable by colour
    assert sum(o.colour == subj_res.colour for o in res.objects) == 1
    assert background_distance(res, subj_res.colour) >= MIN_CONTRAST
    found = subject_mask_by_colour(case.result, case.subject_rgb)
    assert np.array_equal(found, case.result_mask)
    # other objects untouched, in order
    others_src = [
        o for i, o in enumerate(src.objects) if case.task == "paste" or i != case.subject_index
    ]
    others_res = [o for i, o in enumerate(res.objects) if i != case.subject_index]
    assert others_src == others_res
    # no overlaps with the subject in the result (nor in the source)
    for i, o in enumerate(res.objects):
        if i != case.subject_index:
            assert not (object_mask(o, n) & case.result_mask).any()
    if case.mask is not None:
        subj_src = src.objects[case.subject_index]
        assert case.subject_colour == subj_src.colour
        assert np.array_equal(case.mask, object_mask(subj_src, n))
        assert case.mask.dtype == bool and case.mask.any()
        # the noisy source is within a few sigma of the clean one
        diff = case.source.astype(int) - case.source_clean.astype(int)
        assert np.abs(diff).max() <= 8 * NOISE_SIGMA


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("seed", range(8))
def test_make_case_is_consistent(task, seed):
    case = make_case(task, seed)
    assert case.task == task and case.seed == seed
    check_case(case)
    src, res = case.source_scene, case.result_scene
    dx, dy = case.offset
    if task in ("move", "drag"):
        assert isinstance(dx, int) and isinstance(dy, int)
        assert MOVE_RANGE[0] <= np.hypot(dx, dy) <= MOVE_RANGE[1]
        assert case.scale == 1.0
        assert res == moved(src, case.subject_index, dx, dy)
        c0, c1 = centroid(case.mask), centroid(case.result_mask)
        assert abs(c1[0] - (c0[0] + dx)) <= 1 and abs(c1[1] - (c0[1] + dy)) <= 1
        assert case.result_mask.sum() == case.mask.sum()
    if task == "drag":
        (hx, hy), (tx, ty) = case.handles[0], case.targets[0]
        assert (tx - hx, ty - hy) == (dx, dy)
        assert case.mask[hy, hx]  # the handle is on the subject
        assert case.result_mask[ty, tx]  # and the target on its new place
        assert res == dragged(src, case.subject_index, (hx, hy), (tx, ty))
        em = case.editable_mask
        assert em.dtype == bool and (em >= case.mask).all() and (em >= case.result_mask).all()
        assert em.sum() > (case.mask | case.result_mask).sum()
    else:
        assert case.handles is None and case.editable_mask is None
    if task == "resize":
        assert case.offset == (0, 0) and case.scale != 1.0
        assert 0.65 <= case.scale <= 0.85 or 1.2 <= case.scale <= 1.45
        subj = src.objects[case.subject_index]
        assert subj.shape in ("circle", "square")
        assert res == moved(src, case.subject_index, 0, 0, case.scale)
        c0, c1 = centroid(case.mask), centroid(case.result_mask)
        assert np.hypot(c1[0] - c0[0], c1[1] - c0[1]) <= 1
        ratio = case.result_mask.sum() / case.mask.sum()
        assert abs(ratio - case.scale**2) < 0.15 * case.scale**2
    if task in ("appearance", "paste"):
        ref = case.reference_scene
        assert len(ref.objects) == 1
        check_scene(ref)
        assert case.reference_prompt == ref.caption
        assert np.array_equal(case.reference_mask, object_mask(ref.objects[0], n := ref.size))
        assert case.reference.shape == (n, n, 3)
        assert np.array_equal(case.reference_clean, render(ref).image)
    else:
        assert case.reference is None
    if task == "appearance":
        ref_obj = ref.objects[0]
        subj = src.objects[case.subject_index]
        assert ref_obj.shape == subj.shape and ref_obj.colour != subj.colour
        assert case.result_colour == ref_obj.colour != case.subject_colour
        assert res == recoloured(src, case.subject_index, ref_obj.colour)
        assert np.array_equal(case.result_mask, case.mask)
    if task == "paste":
        assert case.mask is None
        assert case.subject_index == len(res.objects) - 1 == len(src.objects)
        ref_obj = ref.objects[0]
        assert res == pasted(src, ref_obj, dx, dy, case.scale)
        c0, c1 = centroid(case.reference_mask), centroid(case.result_mask)
        assert abs(c1[0] - (c0[0] + dx)) <= 1 and abs(c1[1] - (c0[1] + dy)) <= 1
        assert case.subject_colour == case.result_colour == ref_obj.colour


def test_make_case_is_deterministic():
    for task in TASKS:
        a, b = make_case(task, 11), make_case(task, 11)
        assert a.source_scene == b.source_scene and a.result_scene == b.result_scene
        assert np.array_equal(a.source, b.source)
    assert make_case("move", 1).source_scene != make_case("move", 2).source_scene
    clean = make_case("move", 3, noise=False)
    assert np.array_equal(clean.source, clean.source_clean)
    with pytest.raises(ValueError):
        make_case("rotate", 0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(TASKS), st.integers(min_value=0, max_value=10**9))
def test_any_seed_gives_a_consistent_case(task, seed):
    check_case(make_case(task, seed))


# -- saving -------------------------------------------------------------------------------------

SPEC_KEYS = {
    "move": {"task", "image", "mask", "offset", "scale", "prompt"},
    "resize": {"task", "image", "mask", "offset", "scale", "prompt"},
    "drag": {"task", "image", "mask", "handles", "targets", "prompt"},
    "appearance": {"task", "image", "mask", "reference", "reference_mask", "prompt",
                   "reference_prompt"},
    "paste": {"task", "image", "reference", "reference_mask", "offset", "scale", "prompt",
              "reference_prompt"},
}  # fmt: skip


def _load(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


@pytest.mark.parametrize("task", TASKS)
def test_save_case(task, tmp_path):
    case = make_case(task, 4)
    spec_path = save_case(case, tmp_path / task)
    assert spec_path == tmp_path / task / "spec.json"
    spec = json.loads(spec_path.read_text())
    assert set(spec) == SPEC_KEYS[task]
    # appearance and paste prompts describe the wanted result (measured: docs/quality.md)
    want_prompt = case.target_caption if task in ("appearance", "paste") else case.prompt
    assert spec["task"] == task and spec["prompt"] == want_prompt
    for key in ("image", "mask", "reference", "reference_mask"):
        if key in spec:
            f = spec_path.parent / spec[key]
            assert f.is_file(), key
    assert np.array_equal(_load(spec_path.parent / spec["image"]), case.source)
    if "mask" in spec:
        m = _load(spec_path.parent / spec["mask"])
        want = case.editable_mask if task == "drag" else case.mask
        assert m.ndim == 2 and set(np.unique(m)) <= {0, 255}
        assert np.array_equal(m == 255, want)
    if "reference" in spec:
        assert np.array_equal(_load(spec_path.parent / spec["reference"]), case.reference)
        assert np.array_equal(
            _load(spec_path.parent / spec["reference_mask"]) == 255, case.reference_mask
        )
        assert spec["reference_prompt"] == case.reference_prompt
    if "offset" in spec:
        assert spec["offset"] == list(case.offset)
        assert spec["scale"] == case.scale
    if task == "drag":
        assert spec["handles"] == [list(p) for p in case.handles]
        assert spec["targets"] == [list(p) for p in case.targets]
    assert np.array_equal(_load(spec_path.parent / "truth.png"), case.result)
    assert np.array_equal(_load(spec_path.parent / "truth_mask.png") == 255, case.result_mask)
    meta = json.loads((spec_path.parent / "case.json").read_text())
    assert Scene.from_dict(meta["result_scene"]) == case.result_scene
    assert not list(spec_path.parent.glob(".*tmp"))  # no temporary files left behind
    # saving again over the same folder works (atomic replace)
    assert save_case(case, tmp_path / task) == spec_path


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_save_case_files_follow_the_umask(umask, tmp_path):
    """The README promises outputs with the usual permissions (the umask), not a temporary
    file's 0600: every file of a case (and of a case saved again over it) gets 0666 & ~umask."""
    import os
    import stat

    case = make_case("move", 4)
    old = os.umask(umask)
    try:
        for _ in range(2):  # a fresh folder, then the same folder again
            save_case(case, tmp_path / "case")
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "case").iterdir()}
            assert modes and set(modes.values()) == {0o666 & ~umask}, modes
    finally:
        os.umask(old)


# -- scoring ------------------------------------------------------------------------------------


def test_scoring_helpers():
    a = np.zeros((10, 10), bool)
    a[2:6, 2:6] = True
    b = np.zeros((10, 10), bool)
    b[4:8, 2:6] = True
    assert iou(a, a) == 1.0 and iou(a, np.zeros_like(a)) == 0.0
    assert iou(a, b) == pytest.approx(8 / 24)
    assert iou(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert centroid(a) == (3.5, 3.5) and centroid(np.zeros_like(a)) is None
    img = np.full((10, 10, 3), 100, np.uint8)
    assert psnr(img, img) == float("inf")
    other = img.copy()
    other[0, 0] = 110  # squared error 100 on 3 of 300 values
    assert psnr(img, other) == pytest.approx(10 * np.log10(255**2 / 1.0))
    assert psnr(img, other, mask=a) == float("inf")
    assert np.isnan(psnr(img, other, mask=np.zeros_like(a)))
    scene = Scene("gray", [ShapeObject("circle", "yellow", 40, 40, 20),
                           ShapeObject("square", "orange", 90, 90, 20)])  # fmt: skip
    out = render(scene, noise=0)
    for name, m in zip(("yellow", "orange"), out.masks):
        assert np.array_equal(subject_mask_by_colour(out.image, name), m)
        assert np.array_equal(subject_mask_by_colour(out.image, PALETTE[name]), m)
    assert (dilate(a, 1) >= a).all() and dilate(a, 1).sum() == 4 * 4 + 4 * 4
    assert np.array_equal(dilate(a, 0), a)


# -- the plugin ---------------------------------------------------------------------------------


def test_plugin_registers_the_shapes_model():
    pytest.importorskip("diffeditor.models")
    from diffeditor_shapes import plugin

    from diffeditor.models import ModelEntry

    entries: list = []
    plugin.register_models(entries.append)
    assert len(entries) == 1
    entry = entries[0]
    assert isinstance(entry, ModelEntry)
    assert entry.name == "shapes"
    assert entry.defaults["resolution"] == 128
    assert entry.defaults["guidance_scale"] < 4  # measured defaults for this model (README)
    loc = Path(entry.location)
    assert loc == MODEL_DIR and (loc / "model_index.json").is_file()
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (loc / part).is_dir()
    assert (loc / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size > 1_000_000


def test_plugin_loads_through_pluggy():
    plugins = pytest.importorskip("diffeditor.plugins")
    from diffeditor_shapes import plugin

    registry = plugins.registry_from([plugin])
    assert "shapes" in registry.models
    assert Path(registry.models["shapes"].location, "model_index.json").is_file()


# -- diffeditor shapes scene ------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_shapes_scene_command_writes_a_case_edit_runs_as_it_is(task, tmp_path, capsys):
    """`diffeditor shapes scene --task T --seed N --out DIR` (registered by the shapes plugin
    through register_commands) writes the generator's case: its spec passes `edit --check` as
    it is, and its truth is the generator's true result, pixel for pixel."""
    from diffeditor.cli import main

    out = tmp_path / "scene"
    assert main(["shapes", "scene", "--task", task, "--seed", "7", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert (out / "spec.json").is_file() and str(out / "spec.json") in printed
    case = make_case(task, 7)
    assert np.array_equal(_load(out / "truth.png"), case.result)
    assert np.array_equal(_load(out / "truth_mask.png") == 255, case.result_mask)
    assert np.array_equal(_load(out / "source.png"), case.source)
    assert json.loads((out / "spec.json").read_text()) == case_spec(case)
    # run as it is, from another folder (paths inside are relative to the spec)
    assert main(["edit", str(out / "spec.json"), "--model", "shapes", "--check"]) == 0
    assert f"{out / 'spec.json'}: valid {task} spec" in capsys.readouterr().out
    # the folder is a batch of one: case.json is not taken for a spec
    assert main(["edit", str(out), "--model", "shapes", "--check"]) == 0


def test_shapes_scene_command_options(tmp_path, capsys):
    from diffeditor.cli import main

    out = tmp_path / "scene"
    assert main(["shapes", "scene", "--task", "move", "--seed", "2", "--no-noise", "--out", str(out)]) == 0
    assert np.array_equal(_load(out / "source.png"), make_case("move", 2, noise=False).source)
    assert "edit it: diffeditor edit" in capsys.readouterr().err  # what to do next
    before = (out / "spec.json").read_bytes()
    # an existing case is never overwritten without --force: one line, exit status 2
    assert main(["shapes", "scene", "--task", "drag", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists; pass --force" in err[0]
    assert (out / "spec.json").read_bytes() == before and not (out / "editable.png").exists()
    assert main(["shapes", "scene", "--task", "drag", "--out", str(out), "--force"]) == 0
    assert json.loads((out / "spec.json").read_text())["task"] == "drag"
    with pytest.raises(SystemExit) as info:  # argparse: usage and one line, exit status 2
        main(["shapes", "scene", "--task", "move", "--seed", "-1", "--out", str(out)])
    assert info.value.code == 2 and "must be at least 0" in capsys.readouterr().err
