"""Every first-party task through the shared conformance kit (no model needed), and the kit
itself: it fails for a task whose energy ignores the current features and for a task whose
surgery moves nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffeditor.hookspecs import hookimpl
from diffeditor.interfaces import AttentionPolicy, EditPlan, EnergyTerm, Task
from diffeditor.plugins import registry_from
from diffeditor.specs import EditSpec, path_validators
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


class TestCompose(TaskConformance):
    task_name = "compose"

    def example_spec(self, folder):
        _write_scene(folder)
        return {"task": "compose", "image": "image.png", "edits": [
            {"task": "move", "mask": "mask.png", "offset": [40, 10]},
            {"task": "appearance", "mask": "mask.png", "reference": "reference.png",
             "reference_mask": "reference_mask.png"},
            {"task": "paste", "reference": "reference.png", "reference_mask": "reference_mask.png",
             "offset": [-30, -20]},
        ]}


# -- the kit can fail ---------------------------------------------------------------------------
# A task registered in code only (registry_from, no entry point), so nothing leaks into the
# process-wide registry the other tests use. Its behaviour is switched by module-level flags
# that each test sets through monkeypatch.

class BrokenSpec(EditSpec):
    task: Literal["broken"] = "broken"
    mask: Path
    resolve_paths, check_paths = path_validators("mask")


BROKEN = {"energy": "good", "surgery": "good"}


class BrokenTask(Task):
    name, version, spec_model = "broken", "0.1", BrokenSpec

    def plan(self, spec, images, geom):
        from diffeditor_tasks.base import grid_mask, work_mask

        from diffeditor.geometry import similarity_warp

        m = work_mask(spec.mask, "mask", geom)
        m_f, m_l = grid_mask(m, geom.feature_hw), grid_mask(m, geom.latent_hw)
        mode = BROKEN["energy"]

        def e_edit(cur, refs):
            if mode == "references_only":  # reads the reference features only
                return torch.stack([refs["source"][lv].float().mean().expand(next(iter(cur.values())).shape[0])
                                    for lv in cur]).mean(0)
            if mode == "times_zero":  # touches the current features with zero weight
                return sum(0.0 * f.float().mean((1, 2, 3)) + refs["source"][lv].float().mean() for lv, f in cur.items())
            if mode == "outside_region":  # only the cells outside its own region
                outside = 1 - F.interpolate(m_l, size=geom.feature_hw, mode="nearest")
                return sum((f.float() * outside).mean((1, 2, 3)) for f in cur.values())
            if mode == "first_item":  # every item's value from batch item 0's features
                return sum((f[:1].float() * m_f).mean().expand(f.shape[0]) for f in cur.values())
            return sum(((f.float() - refs["source"][lv].float()) ** 2 * m_f).mean((1, 2, 3))
                       for lv, f in cur.items())

        def surgery(zt):
            if BROKEN["surgery"] == "identity":
                return zt["source"]
            if BROKEN["surgery"] == "clone":
                return zt["source"].clone()
            if BROKEN["surgery"] == "in_place":
                zt["source"][..., :2, :2] = 0
                return zt["source"]
            return similarity_warp(zt["source"], geom.work_hw, (64.0, 48.0), 1.0, (16.0, 0.0))

        return EditPlan(
            images={"source": images["source"]}, prompts={"source": ""},
            regions={"edit": m_l}, energies=[EnergyTerm("edit", e_edit, 1.0, "edit")],
            sde_mask=m_l, attention=AttentionPolicy(mode="off"),
            surgery=None if BROKEN["surgery"] == "none" else surgery,
        )


class BrokenPlugin:
    @hookimpl
    def register_tasks(register):
        register(BrokenTask())


class BrokenConformance(TaskConformance):  # not collected: no Test prefix
    task_name = "broken"

    def registry(self):
        return registry_from([BrokenPlugin])

    def example_spec(self, folder):
        _write_scene(folder)
        return {"task": "broken", "image": "image.png", "mask": "mask.png"}


def test_the_broken_task_is_not_in_the_process_registry():
    from diffeditor.plugins import get_registry

    assert "broken" not in get_registry().tasks


def test_the_well_behaved_variant_passes_the_kit(tmp_path):
    kit = BrokenConformance()
    kit.test_energy_terms_one_value_per_item_and_finite_gradients(tmp_path)
    kit.test_energy_terms_depend_on_the_current_features_in_their_region(tmp_path)
    kit.test_surgery_changes_the_initial_latent(tmp_path)
    kit.test_surgery_keeps_the_latent_shape(tmp_path)


@pytest.mark.parametrize("mode, message", [
    ("references_only", "does not depend on the current features at all"),
    ("times_zero", "zero on every feature cell of the region"),
    ("outside_region", "zero on every feature cell of the region"),
    ("first_item", "batch item 1"),
])
def test_the_kit_fails_an_energy_that_ignores_the_current_features(tmp_path, monkeypatch, mode, message):
    monkeypatch.setitem(BROKEN, "energy", mode)
    with pytest.raises(AssertionError, match=message):
        BrokenConformance().test_energy_terms_depend_on_the_current_features_in_their_region(tmp_path)


@pytest.mark.parametrize("mode, message", [
    ("identity", "returned z_T\\['source'\\] unchanged"),
    ("clone", "returned z_T\\['source'\\] unchanged"),
    ("in_place", "modified its input"),
])
def test_the_kit_fails_a_surgery_that_moves_nothing_or_writes_its_input(tmp_path, monkeypatch, mode, message):
    monkeypatch.setitem(BROKEN, "surgery", mode)
    with pytest.raises(AssertionError, match=message):
        BrokenConformance().test_surgery_changes_the_initial_latent(tmp_path)


def test_a_task_without_surgery_passes_the_surgery_check(tmp_path, monkeypatch):
    monkeypatch.setitem(BROKEN, "surgery", "none")
    BrokenConformance().test_surgery_changes_the_initial_latent(tmp_path)
