"""``paste_back``: outside the edit region the output keeps the input's own pixels (full size),
blended over a ramp; inside it the decoded edit is untouched. Exact oracles throughout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_disc_scene
from PIL import Image

from diffeditor.editor import paste_back
from diffeditor.geometry import feather
from diffeditor.interfaces import Geometry


def test_feather_is_a_linear_ramp_in_chessboard_distance():
    m = torch.zeros(1, 1, 9, 9)
    m[0, 0, 4, 4] = 1
    w = feather(m, 4)[0, 0]
    dy, dx = torch.meshgrid((torch.arange(9) - 4).abs(), (torch.arange(9) - 4).abs(), indexing="ij")
    d = torch.maximum(dy, dx)
    assert torch.allclose(w, ((4 - d) / 4).clamp(min=0).float())
    assert torch.equal(feather(m, 0), m)


def _pasted_back(geom, region, seed, width=4):
    """Random source and edit at the input's size, pasted back: ``(out, source, edit)`` as ints."""
    h, w = geom.input_hw
    rng = np.random.default_rng(seed)
    src = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    edit = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    out = np.asarray(paste_back(edit, src, region, geom, width)).astype(int)
    return out, np.asarray(src).astype(int), np.asarray(edit).astype(int)


def test_paste_back_keeps_the_source_outside_and_the_edit_inside():
    # input 200x300 (h, w) edited at 128x192: latent 16x24, region = latent cells 4..7 x 4..7
    geom = Geometry((200, 300), (128, 192), 8)
    region = torch.zeros(1, 1, 16, 24)
    region[..., 4:8, 4:8] = 1
    out, s, e = _pasted_back(geom, region, 0)
    k = 200 / 128  # input px per working px
    # the region widened by one cell is working px 24..72; the ramp ends 4 px further out
    far = np.ones((200, 300), bool)
    far[int(19 * k) - 2:int(77 * k) + 3, int(19 * k) - 2:int(77 * k) + 3] = False
    assert np.array_equal(out[far], s[far])
    core = np.zeros((200, 300), bool)
    core[int(26 * k):int(70 * k), int(26 * k):int(70 * k)] = True
    assert np.array_equal(out[core], e[core])
    between = ~far & ~core  # the ramp: a mixture of both, never outside their range
    assert (out[between] >= np.minimum(s, e)[between] - 1).all()
    assert (out[between] <= np.maximum(s, e)[between] + 1).all()
    assert not np.array_equal(out[between], s[between])


@pytest.mark.parametrize("task", ["move", "drag"])
def test_an_edit_with_paste_back_changes_no_pixel_outside_its_region(editor, tmp_path, task):
    write_disc_scene(tmp_path, editable=True)
    spec = {"task": task, "image": "i.png", "steps": 6, "seed": 3, "prompt": "a red square"}
    if task == "move":
        spec.update(mask="m.png", offset=[24, 0])
    else:
        spec.update(mask="e.png", handles=[[40, 60]], targets=[[56, 60]])
    plain = editor.edit(spec, base_dir=tmp_path)
    kept = editor.edit({**spec, "paste_back": 3}, base_dir=tmp_path)
    src = np.asarray(Image.open(tmp_path / "i.png").convert("RGB"))
    a, b = np.asarray(plain.image), np.asarray(kept.image)
    # the region: regional-SDE cells (the task's plan), widened by one cell (8 px) and the ramp
    task_, plan, geom = editor.prepare(editor.parse(spec, tmp_path))
    cells = torch.nn.functional.max_pool2d(plan.sde_mask.float(), 3, 1, 1)
    near = torch.nn.functional.max_pool2d(
        torch.nn.functional.interpolate(cells, size=geom.work_hw, mode="nearest"), 7, 1, 3)[0, 0] > 0
    inside = torch.nn.functional.interpolate(cells, size=geom.work_hw, mode="nearest")[0, 0] > 0
    assert task_.name == task and near.any() and not near.all()
    far = ~near.numpy()
    assert np.array_equal(b[far], src[far])  # the input's own pixels, bit for bit
    assert not np.array_equal(a[far], src[far])  # which the decoder alone does not give
    assert np.array_equal(b[inside.numpy()], a[inside.numpy()])  # the edit itself untouched


def test_paste_back_on_a_pixel_region_keeps_its_own_outline():
    """A working-size region (``paste_back_region: pixel``) is used on its own outline, not
    widened by a latent cell: the edit exactly on it, the ramp beyond, the source further out."""
    geom = Geometry((128, 128), (128, 128), 8)
    region = torch.zeros(1, 1, 128, 128)
    region[..., 30:50, 40:70] = 1
    out, s, e = _pasted_back(geom, region, 1)
    inside = np.zeros((128, 128), bool)
    inside[30:50, 40:70] = True
    assert np.array_equal(out[inside], e[inside])
    far = np.ones((128, 128), bool)
    far[27:53, 37:73] = False  # 3 px of ramp (weights 3/4, 2/4, 1/4), then the source
    assert np.array_equal(out[far], s[far])
    ring = ~far & ~inside
    assert not np.array_equal(out[ring], s[ring]) and not np.array_equal(out[ring], e[ring])


def _plan_of(editor, tmp_path, task):
    import json

    from diffeditor_shapes import scenes

    case = scenes.make_case(task, 4)
    path = scenes.save_case(case, tmp_path)
    spec = editor.parse(json.loads(path.read_text()), base_dir=tmp_path)
    return editor.prepare(spec)[1]


@pytest.mark.parametrize("task", ["move", "resize", "drag", "appearance", "paste"])
def test_each_task_gives_its_own_pixel_outline(editor, tmp_path, task):
    pytest.importorskip("diffeditor_shapes")
    plan = _plan_of(editor, tmp_path, task)
    m = {k: (v > 0.5) for k, v in plan.masks.items()}
    want = {
        "move": lambda: m["object"] | m["destination"],
        "resize": lambda: m["object"] | m["destination"],
        "drag": lambda: m["editable"],
        "appearance": lambda: m["object"],
        "paste": lambda: m["destination"],
    }[task]()
    assert plan.pixel_region is not None and plan.pixel_region.shape == want.shape
    assert torch.equal(plan.pixel_region > 0.5, want) and want.any()


def test_an_edit_with_a_pixel_region_keeps_every_pixel_beyond_its_outline(editor, tmp_path):
    write_disc_scene(tmp_path, editable=True)
    spec = {"task": "move", "image": "i.png", "steps": 6, "seed": 3, "prompt": "a red square",
            "mask": "m.png", "offset": [24, 0], "paste_back": 3}
    latent = np.asarray(editor.edit(spec, base_dir=tmp_path).image)
    pixel = np.asarray(editor.edit({**spec, "paste_back_region": "pixel"}, base_dir=tmp_path).image)
    src = np.asarray(Image.open(tmp_path / "i.png").convert("RGB"))
    _, plan, geom = editor.prepare(editor.parse({**spec, "paste_back_region": "pixel"}, tmp_path))
    assert tuple(geom.work_hw) == src.shape[:2]
    near = torch.nn.functional.max_pool2d(plan.pixel_region.float(), 5, 1, 2)[0, 0] > 0
    far = ~near.numpy()
    assert np.array_equal(pixel[far], src[far])
    inside = (plan.pixel_region[0, 0] > 0.5).numpy()
    assert np.array_equal(pixel[inside], latent[inside])  # the same edit, kept on its outline
    # the latent region reaches further: some pixels beyond the outline are still decoded there
    assert not np.array_equal(latent[far], src[far])


def test_a_compose_pixel_region_is_the_union_of_its_edits(editor):
    from pathlib import Path

    import yaml

    specs = Path(__file__).resolve().parents[2] / "specs"
    data = yaml.safe_load((specs / "compose.yaml").read_text())
    _, plan, _ = editor.prepare(editor.parse(data, base_dir=specs))
    subs = [editor.prepare(editor.parse({"image": data["image"], "prompt": data["prompt"], **e},
                                        base_dir=specs))[1] for e in data["edits"]]
    want = torch.clamp(sum(p.pixel_region for p in subs), max=1)
    assert torch.equal(plan.pixel_region, want)
    assert all((want >= p.pixel_region).all() and not torch.equal(want, p.pixel_region) for p in subs)
