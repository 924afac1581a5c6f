"""Every task keeps landing: a small fixed-seed set per task, edited as ``diffeditor eval shapes``
does (50 steps, the ``shapes`` model's defaults, each case's own spec), scored against the
scene generator's true result.

For each task, at least ``MIN_LANDED`` of its ``SEEDS`` must land (the eval's rule: centroid
within a quarter of the requested shift, or 4 px), and no case may end more than 3 dB below its
own VAE round trip outside the edit region (issue 12's bar). Before ``surgery_space: pixel``
none of the appearance and paste cases here landed (docs/quality.md), so this test fails
when that mechanism, or the model card that selects it, is lost.
"""

from __future__ import annotations

import pytest

shapes_eval = pytest.importorskip("diffeditor_eval.shapes_eval")
pytest.importorskip("diffeditor_shapes.scenes")

#: seeds per task, and how many of them must land (measured: docs/quality.md)
SEEDS = {
    "move": (0, 1, 2),
    "resize": (0, 1, 2),
    # 0 of 3 land without drag's object_blend (the model's default 0.5): 80.5, 128 (object
    # lost) and 8.3 px off; 3 of 3 with it (docs/quality.md)
    "drag": (101, 111, 112),
    "appearance": (0, 3, 5),
    "paste": (2, 3, 6),
}
MIN_LANDED = 2
WORST_MARGIN_DB = -3.0


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(SEEDS))
def test_the_task_lands_on_its_fixed_seeds(editor_shapes, task, monkeypatch):
    monkeypatch.setattr(shapes_eval, "_EDITOR", editor_shapes)
    rows = [shapes_eval._run_case(task, seed, {}, 50) for seed in SEEDS[task]]
    report = "; ".join(
        f"seed {r['seed']}: land {r['land']:.0f}, IoU {r['iou']:.2f}, "
        f"centroid err {r['centroid_error_px']:.1f} px, vs VAE {r['psnr_margin_db']:+.1f} dB"
        for r in rows)
    assert sum(r["land"] for r in rows) >= MIN_LANDED, report
    assert min(r["psnr_margin_db"] for r in rows) >= WORST_MARGIN_DB, report
