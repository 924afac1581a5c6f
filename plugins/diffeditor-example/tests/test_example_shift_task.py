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
def test_the_surgery_slides_the_object_in_its_direction(tmp_path, direction, unit):
    kit = TestShiftConformance()
    kit.example_spec = lambda folder: {**TestShiftConformance.example_spec(kit, folder),
                                       "direction": direction}
    _, spec, plan, geom = kit._build(tmp_path)
    dx, dy = unit[0] * spec.distance, unit[1] * spec.distance  # input px -> whole latent cells
    sx, sy = geom.scale_xy
    cells = (round(dy * sy / geom.vae_scale), round(dx * sx / geom.vae_scale))
    assert cells != (0, 0)
    z = torch.randn(1, 4, *geom.latent_hw, generator=torch.Generator().manual_seed(0))
    moved = plan.surgery({"source": z})
    dst = plan.regions["edit"].bool().expand_as(z)
    assert dst.any()
    # every destination cell holds the source latent from `cells` back; the rest is untouched
    assert torch.equal(moved[dst], torch.roll(z, shifts=cells, dims=(-2, -1))[dst])
    assert torch.equal(moved[~dst], z[~dst])


def test_bad_direction_is_one_clear_error(diffeditor_scene):
    # diffeditor_scene: a fixture of diffeditor's pytest plugin (image.png, mask.png, ...)
    with pytest.raises(SpecError) as info:
        parse_spec({"task": "shift", "image": "image.png", "mask": "mask.png",
                    "direction": "sideways"}, base_dir=diffeditor_scene)
    assert "direction" in str(info.value)


def test_shift_is_registered_from_its_distribution(diffeditor_registry):
    assert diffeditor_registry.task_origin["shift"].distribution == "diffeditor-example"
