"""The example plugin's own tests: diffeditor's conformance kit, plus what is special to it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffeditor.errors import SpecError
from diffeditor.specs import parse_spec
from diffeditor.testing import TaskConformance


def write_scene(folder):
    img = np.full((96, 128, 3), 128, np.uint8)
    img[30:60, 60:90] = (220, 40, 40)
    Image.fromarray(img).save(folder / "image.png")
    m = np.zeros((96, 128), np.uint8)
    m[30:60, 60:90] = 255
    Image.fromarray(m).save(folder / "mask.png")


class TestShiftConformance(TaskConformance):
    """The kit's checks (spec round trip, masks, energies with gradient, surgery)."""

    task_name = "shift"

    def example_spec(self, folder):
        write_scene(folder)
        return {"task": "shift", "image": "image.png", "mask": "mask.png",
                "direction": "left", "distance": 24}


@pytest.mark.parametrize("direction, unit", [("left", (-1, 0)), ("right", (1, 0)),
                                             ("up", (0, -1)), ("down", (0, 1))])
def test_the_starting_point_is_the_object_slid_and_its_old_place_filled(tmp_path, direction, unit):
    """diffeditor.surgery.pixel_surgery: the composite the kernel inverts holds the red square
    at its destination and gray (the background around it) where it was; the initial latent is
    the composite's over the old and new place and the source's elsewhere."""
    def square_scene(folder):  # 128 x 128 at resolution 128: working pixels = input pixels
        img = np.full((128, 128, 3), 128, np.uint8)
        img[40:70, 50:80] = (220, 40, 40)
        Image.fromarray(img).save(folder / "image.png")
        Image.fromarray(np.where(img[..., 1] == 40, 255, 0).astype(np.uint8)).save(folder / "mask.png")
        return {"task": "shift", "image": "image.png", "mask": "mask.png", "resolution": 128,
                "direction": direction, "distance": 24}

    kit = TestShiftConformance()
    kit.example_spec = square_scene
    _, spec, plan, geom = kit._build(tmp_path)
    assert geom.work_hw == geom.input_hw == (128, 128)  # whole pixels: exact expectations
    dx, dy = int(unit[0] * spec.distance), int(unit[1] * spec.distance)
    obj = plan.masks["object"][0, 0] > 0.5
    dst = plan.masks["destination"][0, 0] > 0.5
    assert torch.equal(dst, torch.roll(obj, shifts=(dy, dx), dims=(0, 1)))
    src, comp = plan.images["source"], plan.images["composite"]
    red = torch.tensor([220, 40, 40]) / 127.5 - 1
    gray = torch.full((3,), 128 / 127.5 - 1)
    torch.testing.assert_close(comp[0][:, dst], red[:, None].expand(3, int(dst.sum())))
    vacated = obj & ~dst
    assert vacated.sum() >= 24 * 30  # no copy left behind: the old place is background
    torch.testing.assert_close(comp[0][:, vacated], gray[:, None].expand(3, int(vacated.sum())))
    far = ~obj & ~dst
    assert torch.equal(comp[0][:, far], src[0][:, far])
    assert plan.prompts["composite"] == spec.prompt
    gen = torch.Generator().manual_seed(0)
    zt = {k: torch.randn(1, 4, *geom.latent_hw, generator=gen) for k in plan.images}
    z = plan.surgery(zt)
    region = plan.sde_mask.bool().expand_as(z)
    assert region.any() and not region.all()
    assert torch.equal(z[region], zt["composite"][region])
    assert torch.equal(z[~region], zt["source"][~region])


def _shapes_scene(first_seed: int, distance: int):
    """A one-object scene of the shapes world whose object, slid right by ``distance``, stays
    inside the frame and leaves at least half its old place: the source, and the true result."""
    scenes = pytest.importorskip("diffeditor_shapes.scenes")
    for seed in range(first_seed, first_seed + 500):
        scene = scenes.random_scene(np.random.default_rng(seed), n_objects=1)
        obj = scene.objects[0]
        old, new = scenes.object_mask(obj), scenes.object_mask(obj.shifted(distance, 0))
        if (obj.shifted(distance, 0).inside(scenes.SIZE, scenes.FRAME_MARGIN)
                and scenes.background_distance(scene, obj.colour) >= scenes.MIN_CONTRAST
                and (old & ~scenes.dilate(new, 2)).sum() >= 0.5 * old.sum()):
            return seed, scene, scenes.moved(scene, 0, distance, 0)
    raise AssertionError("no scene found")


@pytest.mark.slow
def test_shift_moves_the_object_and_leaves_no_copy_behind(tmp_path):
    """On the bundled shapes model, against the shapes world's true result: the object's colour
    covers its destination and not the place it left. The latent-only surgery this example had
    before left the object's colour on 59% of its old place (a smeared copy); 0% now."""
    scenes = pytest.importorskip("diffeditor_shapes.scenes")
    from diffeditor import Editor

    seed, scene, truth_scene = _shapes_scene(100, 28)
    source = scenes.render(scene, noise=seed)
    truth = scenes.render(truth_scene).masks[0]
    Image.fromarray(source.image).save(tmp_path / "source.png")
    Image.fromarray(source.masks[0].astype(np.uint8) * 255).save(tmp_path / "mask.png")
    editor = Editor.from_pretrained("shapes", device="cpu", dtype="float32")
    result = editor.edit({"task": "shift", "image": "source.png", "mask": "mask.png",
                          "direction": "right", "distance": 28, "prompt": scene.caption,
                          "steps": 20}, base_dir=tmp_path)
    found = scenes.subject_mask_by_colour(np.asarray(result.image), scene.objects[0].colour, 70.0)
    left = source.masks[0] & ~scenes.dilate(truth, 2)  # the old place, clear of the new one
    assert left.sum() > 300
    assert found[left].mean() < 0.1, "a copy of the object is left where it was"
    assert found[truth].mean() > 0.6, "the object is not at its destination"
    assert scenes.iou(found, truth) > 0.6


def test_bad_direction_is_one_clear_error(diffeditor_scene):
    # diffeditor_scene: a fixture of diffeditor's pytest plugin (image.png, mask.png, ...)
    with pytest.raises(SpecError) as info:
        parse_spec({"task": "shift", "image": "image.png", "mask": "mask.png",
                    "direction": "sideways"}, base_dir=diffeditor_scene)
    assert "direction" in str(info.value)


def test_shift_is_registered_from_its_distribution(diffeditor_registry):
    assert diffeditor_registry.task_origin["shift"].distribution == "diffeditor-example"
