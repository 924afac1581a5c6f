"""The strict criteria of ``diffeditor eval shapes`` and the wider cases (backgrounds,
drag pairs, compose), with exact synthetic oracles: no model is needed.

Each criterion is checked on the true result (all hold) and on a picture built to break it and
only it, where the measure is known in closed form."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
from diffeditor_eval import shapes_eval
from diffeditor_eval.shapes_eval import (
    CASE_KINDS,
    CRITERIA,
    GROUPS,
    format_strict,
    score_case,
    summarise,
    work_items,
)
from diffeditor_shapes import scenes
from diffeditor_shapes.scenes import (
    BACKGROUNDS,
    PALETTE,
    STRICT_SEAM_DILATION,
    TASKS,
    dilate,
    erode,
    make_case,
    moved,
    render,
    save_case,
    spread_points,
    strict_scores,
)


def test_eval_and_world_agree_on_names():
    assert shapes_eval.CRITERIA == scenes.CRITERIA
    assert shapes_eval.BACKGROUNDS == scenes.BACKGROUNDS
    assert shapes_eval.CASE_KINDS == scenes.CASE_KINDS
    case = make_case("move", 100)
    assert shapes_eval.strict_scores(case, case.source) == strict_scores(case, case.source)


def _verdicts(s: dict) -> dict[str, float]:
    return {c: s[f"ok_{c}"] for c in CRITERIA}


ALL_HOLD = dict.fromkeys(CRITERIA, 1.0)


@pytest.mark.parametrize("kind", CASE_KINDS)
def test_the_truth_looks_right(kind):
    case = make_case(kind, 100)
    s = strict_scores(case, case.result)
    assert _verdicts(s) == ALL_HOLD and s["looks_right"] == 1.0
    assert s["strict_iou"] == 1.0 and s["strict_purity"] == 1.0 and s["strict_clean"] == 1.0
    assert s["psnr_full_db"] == math.inf
    # the truth against the noisy input outside the masks: only the recipe's noise (sigma 3)
    assert 37.5 < s["strict_seam_db"] < 39.5


def test_the_unedited_input_has_a_ghost_and_misses_the_shape():
    case = make_case("move", 100)
    s = strict_scores(case, case.source)
    assert s["ok_no_ghost"] == 0.0 and s["ok_shape"] == 0.0 and s["looks_right"] == 0.0
    assert s["strict_clean"] == 0.0  # every vacated pixel still holds the object


@pytest.mark.parametrize("n_extra, holds", [(-1, True), (+1, False)])
def test_purity_a_dot_in_the_object(n_extra, holds):
    """A dot of background colour in the object: purity = 1 - dot / eroded subject, exactly;
    the other three criteria still hold."""
    case = make_case("move", 100)
    true = case.result_mask
    core = erode(true, 2)
    limit = int(0.05 * core.sum())  # the most pixels that may be off at 95%
    n = limit + n_extra
    ys, xs = np.nonzero(core)
    order = np.argsort((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2, kind="stable")[:n]
    edited = case.result.copy()
    edited[ys[order], xs[order]] = case.result[~dilate(true, 6) & ~dilate(case.mask, 6)][0]
    s = strict_scores(case, edited)
    assert s["strict_purity"] == pytest.approx(1 - n / core.sum(), abs=1e-12)
    assert s["ok_purity"] == float(holds)
    assert s["ok_shape"] == s["ok_no_ghost"] == s["ok_no_seam"] == 1.0
    assert s["looks_right"] == float(holds)


@pytest.mark.parametrize("n_extra, holds", [(-1, True), (+1, False)])
def test_no_ghost_the_object_left_behind_in_part(n_extra, holds):
    """Pixels of the vacated area (source minus true mask, eroded by 2) left in the object's
    colour: clean = 1 - left / vacated, exactly."""
    case = make_case("move", 100)
    vacated = erode(case.mask & ~case.result_mask, 2)
    n = int(0.05 * vacated.sum()) + n_extra
    ys, xs = np.nonzero(vacated)
    edited = case.result.copy()
    edited[ys[:n], xs[:n]] = PALETTE[case.result_colour]
    s = strict_scores(case, edited)
    assert s["strict_vacated_px"] == vacated.sum()
    assert s["strict_clean"] == pytest.approx(1 - n / vacated.sum(), abs=1e-12)
    assert s["ok_no_ghost"] == float(holds)
    assert s["ok_shape"] == s["ok_purity"] == s["ok_no_seam"] == 1.0


def test_no_ghost_looks_at_the_true_result_with_a_40_rgb_tolerance():
    case = make_case("move", 100)
    vacated = erode(case.mask & ~case.result_mask, 2)
    for shift, holds in ((39, True), (41, False)):
        edited = case.result.astype(np.int16)
        edited[vacated, 0] += shift if case.result[vacated, 0].max() < 200 else -shift
        s = strict_scores(case, edited.clip(0, 255).astype(np.uint8))
        assert s["ok_no_ghost"] == float(holds), shift


@pytest.mark.parametrize("d, holds", [(6, True), (7, False)])
def test_no_seam_a_uniform_tint_outside_the_masks(d, holds):
    """The input tinted by d on every channel outside the source and true masks dilated by 4:
    MSE = d^2, so PSNR = 20 log10(255 / d) exactly (6: 32.6 dB holds, 7: 31.2 dB does not)."""
    case = make_case("drag", 100)  # a gray background: nothing clips
    assert case.source_scene.background == "gray"
    outside = ~dilate(case.mask | case.result_mask, STRICT_SEAM_DILATION)
    edited = case.result.copy()
    edited[outside] = case.source[outside] + d
    s = strict_scores(case, edited)
    assert s["strict_seam_db"] == pytest.approx(20 * math.log10(255 / d), abs=1e-9)
    assert s["ok_no_seam"] == float(holds)
    assert s["ok_shape"] == s["ok_purity"] == s["ok_no_ghost"] == 1.0


def test_no_seam_sees_a_pale_box_around_a_drag_that_psnr_outside_misses():
    """A pale box (+40) filling the drag's editable mask beyond the dilated object masks: the
    old PSNR outside (which leaves the editable mask out) does not move, the seam fails."""
    case = make_case("drag", 100)
    region = dilate(case.mask | case.result_mask, STRICT_SEAM_DILATION)
    box = case.editable_mask & ~region
    assert box.sum() > 0
    edited = case.result.copy()
    edited[box] = case.result[box] + 40
    old_truth, old_box = score_case(case, case.result), score_case(case, edited)
    assert old_box["psnr_outside_db"] == old_truth["psnr_outside_db"]
    s = strict_scores(case, edited)
    outside = ~region
    err = (edited[outside].astype(float) - case.source[outside]) ** 2
    assert s["strict_seam_db"] == pytest.approx(10 * math.log10(255**2 / err.mean()), abs=1e-9)
    assert s["ok_no_seam"] == 0.0 and s["looks_right"] == 0.0


def test_shape_a_halo_of_the_objects_colour():
    """A 4-px halo of the subject's colour around a recoloured object: IoU = T / (T + halo)
    exactly, under 0.8; purity, ghost (nothing vacated) and seam (the halo is inside the
    4-px margin) hold."""
    case = make_case("appearance", 100)
    true = case.result_mask
    halo = dilate(true, 4) & ~true
    edited = case.result.copy()
    edited[halo] = PALETTE[case.result_colour]
    s = strict_scores(case, edited)
    assert s["strict_iou"] == pytest.approx(true.sum() / (true.sum() + halo.sum()), abs=1e-12)
    assert s["strict_iou"] < 0.8
    assert _verdicts(s) == {**ALL_HOLD, "shape": 0.0}


def test_shape_uses_a_colour_distance_under_60():
    case = make_case("appearance", 100)
    true = case.result_mask
    rgb = np.array(PALETTE[case.result_colour], dtype=float)
    step = np.array([1.0, 0, 0]) if rgb[0] < 128 else np.array([-1.0, 0, 0])
    for dist, found in ((59, True), (60, False)):
        edited = case.result.copy()
        edited[true] = (rgb + dist * step).astype(np.uint8)
        s = strict_scores(case, edited)
        assert s["strict_iou"] == (1.0 if found else 0.0), dist


def test_compose_every_edit_must_hold():
    """A compose case whose move is done but whose resize is not: the resized object's shape
    and its vacated ring fail, although the moved one is right."""
    case = make_case("compose", 100)
    move, resize = case.parts
    assert (move.task, resize.task) == ("move", "resize")
    only_moved = moved(case.source_scene, move.subject_index, *move.offset)
    edited = render(only_moved).image
    s = strict_scores(case, edited)
    assert s["ok_shape"] == 0.0 and s["looks_right"] == 0.0
    assert strict_scores(move, edited)["ok_shape"] == 1.0
    if resize.scale < 1:
        assert s["ok_no_ghost"] == 0.0


def test_compose_case_is_a_valid_spec(tmp_path):
    from diffeditor.specs import parse_spec

    case = make_case("compose", 101)
    path = save_case(case, tmp_path)
    spec = parse_spec(json.loads(path.read_text()), base_dir=tmp_path)
    assert [e["task"] for e in spec.edits] == ["move", "resize"]
    assert (tmp_path / "mask_2.png").exists()
    assert case.parts[1].scale == spec.edits[1]["scale"]
    # the truth: the first object moved, the second resized, nothing else
    src, res = case.source_scene.objects, case.result_scene.objects
    a, b = case.parts[0].subject_index, case.parts[1].subject_index
    assert res[a] == src[a].shifted(*case.parts[0].offset)
    assert res[b] == src[b].shifted(0, 0, case.parts[1].scale)


# -- wider cases -----------------------------------------------------------------------------

#: make_case's default cases, hashed before backgrounds, pairs and compose were added
DEFAULT_CASES_SHA = "eb32e891f3a48f46d79b6b446b7d6aa7f873573f39443cd8230f3e880de9bde4"


def test_default_cases_are_unchanged():
    h = hashlib.sha256()
    for t in TASKS:
        for s in (100, 101, 137, 149):
            c = make_case(t, s)
            for a in (c.source, c.result, c.result_mask, c.mask, c.editable_mask, c.reference):
                if a is not None:
                    h.update(a.tobytes())
            h.update(repr((c.handles, c.targets, c.offset, c.scale, c.prompt,
                           c.target_caption)).encode())
    assert h.hexdigest() == DEFAULT_CASES_SHA


@pytest.mark.parametrize("kind", CASE_KINDS)
def test_a_chosen_background_is_drawn(kind):
    for bg in BACKGROUNDS:
        case = make_case(kind, 7, background=bg)
        assert case.source_scene.background == bg == case.result_scene.background
    with pytest.raises(ValueError):
        make_case(kind, 7, background="plaid")


@pytest.mark.parametrize("seed", [100, 101, 149])
def test_drag_pairs_are_the_same_case_with_more_handles(seed):
    one = make_case("drag", seed)
    for k in (2, 3, 4):
        c = make_case("drag", seed, pairs=k)
        for name in ("source", "result", "result_mask", "mask", "editable_mask"):
            assert np.array_equal(getattr(c, name), getattr(one, name)), name
        assert c.offset == one.offset
        assert len(c.handles) == len(set(c.handles)) == k
        assert c.handles[0] == one.handles[0]
        inner = erode(one.mask, 2)
        dx, dy = c.offset
        for (hx, hy), (tx, ty) in zip(c.handles, c.targets):
            assert (tx - hx, ty - hy) == (dx, dy)  # every pair moved alike: rigid
            assert one.mask[hy, hx] and c.result_mask[ty, tx]
        assert all(inner[y, x] for x, y in c.handles[1:])
    assert make_case("drag", seed, pairs=1).handles == one.handles
    with pytest.raises(ValueError):
        make_case("move", seed, pairs=2)
    with pytest.raises(ValueError):
        make_case("drag", seed, pairs=5)


def test_spread_points_farthest_first():
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:16, 4:25] = True  # x 4..24, y 5..15; eroded by 2: x 6..22, y 7..13
    pts = spread_points(mask, 3, (14, 10))
    # then the farthest pixel of the eroded box from (14, 10): the first of the tied corners in
    # row order; then the farthest from both: (22, 7) and (22, 13) tie at sqrt(73) from
    # (14, 10), the first in row order wins
    assert pts == [(14, 10), (6, 7), (22, 7)]


def test_erode_by_a_disk():
    mask = np.zeros((21, 21), dtype=bool)
    yy, xx = np.mgrid[0:21, 0:21]
    mask[(xx - 10) ** 2 + (yy - 10) ** 2 <= 64] = True
    assert np.array_equal(erode(mask, 2), (xx - 10) ** 2 + (yy - 10) ** 2 <= 36)


def test_work_items_pairs_only_for_drag_and_backgrounds_for_all():
    assert work_items(["move"], 2, ["full"], 5) == [("full", "move", 5, None, 1),
                                                     ("full", "move", 6, None, 1)]
    work = work_items(["move", "drag"], 1, ["full"], 0, ("white", "gradient"), (1, 3))
    assert work == [("full", "move", 0, "white", 1), ("full", "move", 0, "gradient", 1),
                    ("full", "drag", 0, "white", 1), ("full", "drag", 0, "white", 3),
                    ("full", "drag", 0, "gradient", 1), ("full", "drag", 0, "gradient", 3)]


def _row(task, bg, pairs, right):
    base = {"task": task, "background": bg, "pairs": pairs, "land": 1.0, "iou": 1.0,
            "centroid_error_px": 0.0, "colour_error": 0.0, "psnr_outside_db": 30.0,
            "vae_psnr_outside_db": 30.0, "psnr_margin_db": 0.0, "seconds": 1.0,
            "strict_iou": 0.9, "strict_purity": 1.0, "strict_clean": 1.0,
            "strict_seam_db": 35.0, "psnr_full_db": 30.0}
    oks = {f"ok_{c}": float(right) for c in CRITERIA}
    return {**base, **oks, "looks_right": float(right)}


def test_summaries_per_background_and_pairs():
    rows = [_row("drag", "white", 1, True), _row("drag", "white", 2, False),
            _row("drag", "gradient", 1, False), _row("move", "gradient", 0, True)]
    assert set(GROUPS) == {"background", "pairs"}
    by_bg = summarise(rows, by="background")
    assert {k: (v["cases"], v["looks_right_rate"]) for k, v in by_bg.items()} == {
        "drag / background gradient": (1, 0.0), "drag / background white": (2, 0.5),
        "move / background gradient": (1, 1.0)}
    by_pairs = summarise(rows, by="pairs")
    assert {k: v["cases"] for k, v in by_pairs.items()} == {"drag / pairs 1": 2, "drag / pairs 2": 1}
    assert summarise(rows)["drag"]["looks_right_rate"] == pytest.approx(1 / 3)
    table = format_strict({"full": by_bg})
    assert "| full | drag / background white | 2 | 1/2 | 1/2 | 1/2 | 1/2 | 1/2 |" in table


# -- the demo's pieces (no model) --------------------------------------------------------------


def test_demo_sheet_shows_every_panel_at_the_inputs_displayed_size():
    from diffeditor_shapes.demo import _side_by_side
    from PIL import Image

    src = Image.new("RGB", (128, 96), (255, 0, 0))
    other = Image.new("RGB", (64, 48), (0, 0, 255))  # a result at another size
    sheet = _side_by_side([("before", src), ("after", other)], scale=2)
    assert sheet.size == (2 * 256, 192 + 18)
    arr = np.asarray(sheet)
    assert (arr[18:, 256:] == (0, 0, 255)).all() and (arr[18:, :256] == (255, 0, 0)).all()


def test_demo_verdict_line_and_rule():
    from diffeditor_shapes import demo

    case = make_case("move", 100)
    s = strict_scores(case, case.source)
    line = demo.verdict_line("move", case, s)
    assert line.startswith(f"move (seed 100, {case.source_scene.background} background): not right: ")
    assert "no ghost FAIL (0%)" in line and "shape FAIL" in line
    assert demo.DEFAULT_SEED == 100 and "100" in demo.SCENE_RULE
    assert demo._short(strict_scores(case, case.result)) == "looks right"
    assert demo.__doc__ and "How the scenes are chosen" in demo.__doc__


def test_demo_scores_a_perfect_editor_as_right_and_passes_its_steps(tmp_path, monkeypatch):
    """run_demo with a stand-in editor that returns each case's true result: scores.json says
    both edits look right (exact oracle), the printed lines say so, the sheet is 7 panels at the
    input's displayed size, and --steps reaches the specs (it used to be ignored)."""
    from pathlib import Path

    from diffeditor_shapes import demo
    from PIL import Image

    import diffeditor
    from diffeditor.imageio import save_image

    seen = []

    class Result:
        def __init__(self, image):
            self.image = image

        def save(self, path, force=False):
            return save_image(self.image, path, force)

    class Engine:
        def encode_image(self, x):
            return x

        def decode(self, z):
            return z

    class FakeEditor:
        engine = Engine()

        def edit(self, spec_path, progress=None):
            spec = json.loads(Path(spec_path).read_text())
            seen.append((spec["task"], spec["steps"]))
            return Result(Image.fromarray(make_case(spec["task"], demo.DEFAULT_SEED).result))

    monkeypatch.setattr(diffeditor.Editor, "from_pretrained", classmethod(lambda cls, *a, **k: FakeEditor()))
    out = demo.run_demo(tmp_path, steps=7, quiet=True)
    assert seen == [("move", 7), ("drag", 7)]
    report = json.loads((tmp_path / "scores.json").read_text())
    assert report["seed"] == 100 and report["steps"] == 7 and report["rule"] == demo.SCENE_RULE
    assert {k: v["looks_right"] for k, v in report["edits"].items()} == {"move": 1.0, "drag": 1.0}
    assert all(": looks right: " in line for line in out["verdicts"])
    assert Image.open(tmp_path / "side_by_side.png").size == (7 * 256, 256 + 18)
