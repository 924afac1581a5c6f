"""The edit happens: one cheap check per task on the trained shapes model (10 steps, 128 px).

Each case comes from :func:`diffeditor_shapes.scenes.make_case`, whose true result is known, and
is edited with the ``shapes`` model's tuned defaults (the ``editor_shapes`` fixture). The checks
are deliberately weak (this small model lands only part of its edits, see docs/quality.md) but
each is shown to fail when the edit's mechanisms are switched off: guidance (``energy_scale``
0), the plan's initial-latent surgery and its pins (``plan.surgery = None``, ``plan.pins = []``).

Measured on the 2-core CPU, 1 thread (progress: how far the subject's colour mass went along
the requested shift, 1 = all the way; ``None``: under a quarter of the subject's area has its
colour):

==========  ======  ==============  =============  =================  =========  ===========
task        case    edit            guidance off   surgery+pins off   bank off   all off
==========  ======  ==============  =============  =================  =========  ===========
move        seed 1  1.01            0.98           0.26               1.00       -0.01
drag        seed 1  0.62            0.63           0.04               0.62       0.03
paste       seed 6  1.19            1.17           None               1.19       None
appearance  seeds 0, 3: the reference colour's cover of the object instead (see below)
==========  ======  ==============  =============  =================  =========  ===========

("all off" = guidance, surgery and pins off, the memory bank on, as the tests run it; with
the memory bank off too the numbers are the same.) At 10 steps on this model the edits are
carried by the initial latent and the pins: guidance alone moves little, so these checks guard
the surgery and pins first. The edits at 12 and 15 steps gave the same verdicts (drag 0.66,
0.71; move and paste within 0.02).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

scenes = pytest.importorskip("diffeditor_shapes.scenes")
shapes_eval = pytest.importorskip("diffeditor_eval.shapes_eval")

STEPS = 10
MIN_PROGRESS = 1 / 3
"""The subject's colour mass must cover at least this fraction of the requested shift."""
MIN_MASS = 0.25
"""... and hold at least this fraction of the subject's true area (stray pixels do not count)."""

CASES = {"move": 1, "drag": 1, "paste": 6}


def _case(task: str, seed: int, folder):
    case = scenes.make_case(task, seed)
    return case, scenes.save_case(case, folder)


def _edit(editor, spec_path, switched_off: bool = False) -> np.ndarray:
    """Edit a saved case in STEPS steps; ``switched_off``: no guidance, surgery or pins."""
    from diffeditor.imageio import to_pil

    data = json.loads(spec_path.read_text())
    data["steps"] = STEPS
    if switched_off:
        data["energy_scale"] = 0.0
    spec = editor.parse(data, base_dir=spec_path.parent)
    _, plan, _ = editor.prepare(spec)
    if switched_off:
        plan.surgery = None
        plan.pins = []
    out = editor.engine.edit(plan, spec)
    return np.asarray(to_pil(out.image).convert("RGB"))


def progress_toward_target(case, image: np.ndarray) -> float | None:
    """How far the subject's colour mass went from where the subject was (the source mask, or
    for paste the reference mask) toward where it should be (the true result mask): the
    projection of the centroid's shift on the requested shift, 1 = arrived, 0 = stayed.
    ``None`` when too few pixels of the subject's colour are left (under ``MIN_MASS`` of its
    area). Pixels are matched by colour as ``diffeditor eval shapes`` does."""
    found = scenes.subject_mask_by_colour(image, case.result_colour, shapes_eval.COLOUR_THRESHOLD)
    if found.sum() < MIN_MASS * case.result_mask.sum():
        return None
    origin = np.asarray(scenes.centroid(case.mask if case.mask is not None else case.reference_mask))
    target = np.asarray(scenes.centroid(case.result_mask))
    shift = target - origin
    return float(np.dot(np.asarray(scenes.centroid(found)) - origin, shift) / np.dot(shift, shift))


def moved_toward_target(case, image: np.ndarray) -> bool:
    p = progress_toward_target(case, image)
    return p is not None and p >= MIN_PROGRESS


def _report(case, image) -> str:
    s = shapes_eval.score_case(case, image)
    return (f"{case.task} case {case.seed}: progress {progress_toward_target(case, image)}, "
            f"centroid error {s['centroid_error_px']:.1f} px, IoU {s['iou']:.2f}")


@pytest.mark.parametrize("task", sorted(CASES))
def test_the_edit_happens(editor_shapes, tmp_path, task):
    case, spec_path = _case(task, CASES[task], tmp_path)
    image = _edit(editor_shapes, spec_path)
    assert moved_toward_target(case, image), _report(case, image)


@pytest.mark.parametrize("task", sorted(CASES))
def test_the_check_fails_without_guidance_surgery_and_pins(editor_shapes, tmp_path, task):
    case, spec_path = _case(task, CASES[task], tmp_path)
    assert not moved_toward_target(case, case.source)  # the unedited image does not pass
    image = _edit(editor_shapes, spec_path, switched_off=True)
    assert not moved_toward_target(case, image), _report(case, image)


APPEARANCE_CASES = (0, 3)


def reference_colour_cover(case, image: np.ndarray) -> float:
    """The fraction of the object (the source mask) showing the reference object's colour."""
    found = scenes.subject_mask_by_colour(image, case.result_colour, shapes_eval.COLOUR_THRESHOLD)
    return float(found[case.mask].mean())


@pytest.mark.parametrize("seed", APPEARANCE_CASES)
def test_appearance_takes_the_reference_colour(editor_shapes, tmp_path, seed):
    """The edited object shows the reference object's colour on most of its area.

    Before ``surgery_space: pixel`` and ``object_blend`` (the shapes model's defaults) no pixel
    of the object came within the colour threshold in any of cases 0-5 at 10 steps; the method
    alone moved the colour as little as inversion drift did (docs/quality.md).
    """
    case, spec_path = _case("appearance", seed, tmp_path)
    assert reference_colour_cover(case, case.source) == 0.0
    image = _edit(editor_shapes, spec_path)
    cover = reference_colour_cover(case, image)
    assert cover >= 0.5, f"reference colour on {cover:.0%} of the object"


@pytest.mark.parametrize("seed", APPEARANCE_CASES)
def test_appearance_check_fails_without_surgery_and_pins(editor_shapes, tmp_path, seed):
    case, spec_path = _case("appearance", seed, tmp_path)
    image = _edit(editor_shapes, spec_path, switched_off=True)
    cover = reference_colour_cover(case, image)
    assert cover < 0.5, f"reference colour on {cover:.0%} of the object with everything off"
