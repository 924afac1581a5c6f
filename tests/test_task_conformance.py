"""Every first-party task through the shared conformance kit (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffeditor.testing import TaskConformance


def _write_scene(folder, size=(128, 96)):
    w, h = size
    img = np.full((h, w, 3), 128, np.uint8)
    img[30:60, 20:50] = (220, 40, 40)
    Image.fromarray(img).save(folder / "image.png")
    m = np.zeros((h, w), np.uint8)
    m[30:60, 20:50] = 255
    Image.fromarray(m).save(folder / "mask.png")
    e = np.zeros((h, w), np.uint8)
    e[20:80, 10:110] = 255
    Image.fromarray(e).save(folder / "editable.png")
    # a reference of another size: masks and images are resized per image
    ref = np.full((120, 120, 3), 20, np.uint8)
    ref[50:90, 60:100] = (40, 70, 220)
    Image.fromarray(ref).save(folder / "reference.png")
    rm = np.zeros((120, 120), np.uint8)
    rm[50:90, 60:100] = 255
    Image.fromarray(rm).save(folder / "reference_mask.png")


class TestMove(TaskConformance):
    task_name = "move"

    def example_spec(self, folder):
        _write_scene(folder)
        return {"task": "move", "image": "image.png", "mask": "mask.png", "offset": [100, -10]}


class TestResize(TaskConformance):
    task_name = "resize"

    def example_spec(self, folder):
        _write_scene(folder)
        return {"task": "resize", "image": "image.png", "mask": "mask.png", "scale": 1.7}


class TestDrag(TaskConformance):
    task_name = "drag"

    def example_spec(self, folder):
        _write_scene(folder)
        return {"task": "drag", "image": "image.png", "mask": "editable.png",
                "handles": [[30, 40], [127, 95], [5, 5]], "targets": [[60, 40], [127, 95], [0, 0]]}


class TestAppearance(TaskConformance):
    task_name = "appearance"

    def example_spec(self, folder):
        _write_scene(folder)
        return {"task": "appearance", "image": "image.png", "mask": "mask.png",
                "reference": "reference.png", "reference_mask": "reference_mask.png"}


class TestPaste(TaskConformance):
    task_name = "paste"

    def example_spec(self, folder):
        _write_scene(folder)
        return {"task": "paste", "image": "image.png", "reference": "reference.png",
                "reference_mask": "reference_mask.png", "offset": [-30, -20], "scale": 0.8}


class TestFace(TaskConformance):
    task_name = "face"

    def example_spec(self, folder):
        pytest.importorskip("dlib")
        from skimage import data

        Image.fromarray(data.astronaut()).resize((256, 256)).save(folder / "a.png")
        Image.fromarray(data.astronaut()[:, ::-1]).resize((256, 256)).save(folder / "b.png")
        return {"task": "face", "image": "a.png", "reference": "b.png"}
