"""The ui plugin without a browser: forms generated from spec models, form values -> specs, the
segmenters (flood fill; SAM on a tiny randomly initialised model saved and loaded back) and the
server-side drawing. Fast and model-free."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from PIL import Image
from pydantic import Field

pytest.importorskip("diffeditor_ui", reason="the ui plugin is not installed (pip install ./plugins/diffeditor-ui)")

from diffeditor_ui import drawing  # noqa: E402
from diffeditor_ui.form import spec_data, task_form  # noqa: E402
from diffeditor_ui.segment import (  # noqa: E402
    FloodFillSegmenter,
    SamSegmenter,
    SegmenterError,
    load_segmenters,
)

from diffeditor.errors import SpecError  # noqa: E402
from diffeditor.interfaces import AttentionPolicy, EditPlan, Task  # noqa: E402
from diffeditor.plugins import get_registry  # noqa: E402
from diffeditor.specs import EditSpec, parse_spec, path_validators  # noqa: E402

SHAPES_DEFAULTS = {"guidance_scale": 1.0, "move.energy_scale": 1000.0, "resolution": 128,
                   "drag.object_blend": 0.5}


def kinds(form) -> dict[str, str]:
    return {f.name: f.kind for f in form.fields}


def test_drag_form_from_its_spec():
    form = task_form(get_registry().task("drag"), SHAPES_DEFAULTS)
    k = kinds(form)
    assert k["image"] == "image" and k["mask"] == "mask"
    assert k["handles"] == k["targets"] == "points"
    assert form.point_groups() == {"image": ["handles", "targets"]}  # clicks alternate
    assert form.masks_on("image") == ["mask"]
    f = form.by_name()
    assert f["w_handle_contrast"].kind == "slider" and (
        f["w_handle_contrast"].minimum, f["w_handle_contrast"].maximum) == (0, 100)
    assert f["steps"].kind == "slider" and f["steps"].integer and f["steps"].step == 1
    assert f["seed"].kind == "number"  # 0..2**32-1: too wide for a slider
    assert f["resolution"].kind == "number" and f["resolution"].default == 128  # the model's
    assert f["guidance_scale"].default == 1.0 and f["energy_scale"].default == 2000.0
    assert f["schedule"].kind == "json" and f["feature_levels"].kind == "json"
    assert f["sde_region"].kind == "choice" and f["sde_region"].choices == ["regional", "global"]
    shown = {x.name for x in form.fields if not x.advanced}
    assert shown == {"image", "mask", "handles", "targets", "prompt", "seed", "steps",
                     "w_handle_contrast", "object_blend", "patch_radius", "object_blend_radius"}
    assert f["object_blend"].kind == "slider" and f["object_blend"].default == 0.5  # the model's


def test_move_paste_and_face_forms():
    reg = get_registry()
    move = task_form(reg.task("move"), SHAPES_DEFAULTS)
    f = move.by_name()
    assert f["offset"].kind == "pair" and f["scale"].kind == "slider"
    assert f["inpaint_mask"].kind == "mask" and f["inpaint_mask"].optional
    assert f["energy_scale"].default == 1000.0  # the task-specific model default wins
    assert move.hints["preview"]["kind"] == "move"
    paste = task_form(reg.task("paste"), SHAPES_DEFAULTS)
    p = paste.by_name()
    assert p["reference"].kind == "image" and p["reference_mask"].on == "reference"
    assert paste.masks_on("image") == [] and paste.masks_on("reference") == ["reference_mask"]
    assert not p["reference_prompt"].advanced
    if "face" in reg.tasks:
        face = task_form(reg.task("face"))
        assert [x.name for x in face.images()] == ["image", "reference"]
        assert face.hints["preview"]["kind"] == "landmarks"


class ThirdSpec(EditSpec):
    task: Literal["third"] = "third"
    area_mask: Path = Field(description="where")
    anchors: list[tuple[float, float]] = Field(default_factory=list, description="clicks")
    shift: tuple[float, float] = Field((1.0, 2.0), description="dx dy")
    mode: Literal["a", "b"] = Field("b", description="which")
    flag: bool = Field(True, description="on")
    strength: float = Field(0.25, ge=0.0, le=1.0, description="how much")
    gain: float = Field(3.0, description="unbounded")
    note: str = Field("hi", description="text")

    resolve_paths, check_paths = path_validators("area_mask")


class ThirdTask(Task):
    name, version, spec_model = "third", "1", ThirdSpec

    def plan(self, spec, images, geom):  # pragma: no cover - not run here
        return EditPlan(images=images, prompts={}, regions={}, energies=[], sde_mask=None,
                        attention=AttentionPolicy(mode="off"))


def test_a_third_party_spec_gets_a_form_without_ui_code():
    form = task_form(ThirdTask())
    k = kinds(form)
    assert (k["area_mask"], k["anchors"], k["shift"], k["mode"], k["flag"], k["strength"], k["gain"],
            k["note"]) == ("mask", "points", "pair", "choice", "bool", "slider", "number", "text")
    f = form.by_name()
    assert f["area_mask"].on == "image" and f["anchors"].on == "image"
    assert f["shift"].default == [1.0, 2.0] and f["strength"].default == 0.25
    assert f["strength"].description == "how much"
    assert not any(f[n].advanced for n in ("area_mask", "anchors", "shift", "mode", "flag", "strength"))
    assert f["energy_scale"].advanced and f["schedule"].advanced


def test_ui_hints_place_masks_and_points():
    class Hinted(ThirdTask):
        ui_hints = {"images": {"area_mask": "other", "anchors": "other"}, "main": ["energy_scale"]}

    form = task_form(Hinted())
    f = form.by_name()
    assert f["area_mask"].on == "other" and form.point_groups() == {"other": ["anchors"]}
    assert not f["energy_scale"].advanced


def _files(tmp_path):
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "image.png")
    m = np.zeros((64, 64), np.uint8)
    m[10:30, 10:30] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")


def test_form_defaults_make_a_valid_spec(tmp_path):
    _files(tmp_path)
    form = task_form(get_registry().task("move"), SHAPES_DEFAULTS)
    values = {f.name: f.default for f in form.fields}
    values.update(image="image.png", mask="mask.png", inpaint_mask=None, offset=[5, -3])
    data = spec_data(form, values)
    assert "inpaint_mask" not in data  # empty optional: the spec's default
    spec = parse_spec(data, base_dir=tmp_path)
    assert spec.offset == (5.0, -3.0) and spec.energy_scale == 1000.0 and spec.guidance_scale == 1.0
    assert spec.schedule == type(spec.schedule)()  # the JSON default round-trips
    values["schedule"] = "{not json"
    with pytest.raises(SpecError, match=r"^schedule: not valid JSON"):
        spec_data(form, values)


def test_drag_points_come_from_clicks(tmp_path):
    _files(tmp_path)
    form = task_form(get_registry().task("drag"))
    values = {f.name: f.default for f in form.fields}
    values.update(image="image.png", mask="mask.png", handles=[[12.5, 20.0]], targets=[[30.0, 22.0]])
    spec = parse_spec(spec_data(form, values), base_dir=tmp_path)
    assert spec.handles == [(12.5, 20.0)] and spec.targets == [(30.0, 22.0)]
    values["targets"] = []
    with pytest.raises(SpecError, match="targets"):
        parse_spec(spec_data(form, values), base_dir=tmp_path)


# -- segmenters ----------------------------------------------------------------------------------

def _scene():
    rng = np.random.default_rng(0)
    img = np.full((80, 96, 3), (200, 200, 210), np.float32) + rng.normal(0, 4, (80, 96, 3))
    yy, xx = np.mgrid[:80, :96]
    disc = (yy - 40) ** 2 + (xx - 30) ** 2 < 15**2
    square = (abs(yy - 40) < 12) & (abs(xx - 72) < 12)
    img[disc] = (220, 40, 40)
    img[square] = (225, 45, 45)  # same colour, not connected: must not be selected
    return img.clip(0, 255).astype(np.uint8), disc, square


def test_flood_fill_selects_the_clicked_object_only():
    img, disc, square = _scene()
    seg = FloodFillSegmenter()
    assert seg.unavailable() is None
    mask = seg.segment(img, (30, 40))
    assert mask.dtype == bool and mask.shape == disc.shape
    assert np.array_equal(mask, disc)
    background = seg.segment(img, (2, 2))
    assert np.array_equal(background, ~disc & ~square)
    with pytest.raises(SegmenterError, match="outside the 96x80 image"):
        seg.segment(img, (96, 3))


def test_the_installed_segmenters_are_found_through_entry_points():
    segs = load_segmenters()
    assert isinstance(segs["flood"], FloodFillSegmenter) and isinstance(segs["sam"], SamSegmenter)


def test_sam_without_weights_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFEDITOR_SAM_MODEL", raising=False)
    msg = SamSegmenter().unavailable()
    assert "no SAM weights" in msg and "--sam DIR" in msg and "DIFFEDITOR_SAM_MODEL" in msg
    msg = SamSegmenter(tmp_path).unavailable()
    assert str(tmp_path) in msg and "config.json missing" in msg
    with pytest.raises(SegmenterError, match="no SAM weights"):
        SamSegmenter(tmp_path).segment(np.zeros((8, 8, 3), np.uint8), (1, 1))


def test_sam_on_a_tiny_random_model_saved_and_loaded(tmp_path):
    import torch
    from transformers import SamConfig, SamModel, SamProcessor

    try:
        from transformers import SamImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import SamImageProcessor as ImageProcessor
    from transformers.models.sam.configuration_sam import (
        SamMaskDecoderConfig,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    torch.manual_seed(0)
    cfg = SamConfig(
        vision_config=SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=2,
                                      num_attention_heads=2, image_size=128, patch_size=16,
                                      window_size=4, global_attn_indexes=[1], num_pos_feats=16,
                                      mlp_dim=64),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=32, image_size=128, patch_size=16),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_hidden_layers=2,
                                                 num_attention_heads=2, iou_head_hidden_dim=32))
    folder = tmp_path / "sam"
    SamModel(cfg).save_pretrained(folder)
    SamProcessor(image_processor=ImageProcessor(
        size={"longest_edge": 128}, pad_size={"height": 128, "width": 128},
        mask_size={"longest_edge": 32}, mask_pad_size={"height": 32, "width": 32})).save_pretrained(folder)
    seg = SamSegmenter(folder)
    assert seg.unavailable() is None
    img, _, _ = _scene()
    mask = seg.segment(img, (30, 40))
    assert mask.dtype == bool and mask.shape == img.shape[:2]  # back at the image's size
    assert seg._model is not None and seg._model.config.vision_config.hidden_size == 32


def test_editor_mask_is_the_painted_layer_and_the_shown_selection():
    from diffeditor_ui.app import editor_mask, editor_value

    img = Image.new("RGB", (32, 24), (90, 90, 90))
    sel = np.zeros((24, 32), bool)
    sel[2:6, 3:9] = True
    value = editor_value(img, sel)  # what the page sets (examples, click-to-mask)
    assert np.array_equal(editor_mask(value, (24, 32)), sel)
    stroke = np.zeros((24, 32, 4), np.uint8)
    stroke[20, 10:20, 3] = 255  # a brush stroke in the layer
    painted = {"background": value["background"], "layers": [stroke], "composite": value["composite"]}
    both = sel.copy()
    both[20, 10:20] = True
    assert np.array_equal(editor_mask(painted, (24, 32)), both)
    assert editor_mask(editor_value(img), (24, 32)) is None  # nothing painted: no mask
    small = editor_mask({"layers": [np.dstack([np.zeros((12, 16, 3), np.uint8), np.full((12, 16), 255, np.uint8)])],
                         "composite": None}, (24, 32))
    assert small.shape == (24, 32) and small.all()


# -- drawing ---------------------------------------------------------------------------------------

def test_points_are_drawn_where_clicked_on_the_enlarged_view():
    img = Image.new("RGB", (128, 96), (128, 128, 128))
    view, f = drawing.to_view(img)
    assert f == 4 and view.size == (512, 384)
    out = np.asarray(drawing.draw_points(view, [[(10, 20)], [(100, 50)]], f))
    assert tuple(out[20 * 4, 10 * 4]) == drawing.GROUP_COLOURS[0]
    assert tuple(out[50 * 4, 100 * 4]) == drawing.GROUP_COLOURS[1]
    mid = out[35 * 4 - 2: 35 * 4 + 3, 55 * 4 - 2: 55 * 4 + 3].reshape(-1, 3)  # on the arrow
    assert (mid != 128).any()


def test_move_preview_outlines_the_destination():
    m = np.zeros((64, 64), bool)
    m[10:20, 10:20] = True
    dst = drawing.transform_mask(m, drawing.centroid(m), 1.0, (30, 5))
    assert np.array_equal(np.nonzero(dst.any(0))[0], np.arange(40, 50))
    assert np.array_equal(np.nonzero(dst.any(1))[0], np.arange(15, 25))
    big = drawing.transform_mask(m, drawing.centroid(m), 2.0, (0, 0))
    assert big.sum() == 4 * m.sum()


def test_a_view_returned_again_is_the_same_file_never_rewritten():
    """gradio rewrites the cache file of a PIL image in place each time the same image is returned,
    so a browser fetching it then got a truncated PNG (a CI failure in the points test). Views go
    out as content-named files written once; gradio copies a file path atomically."""
    import gradio as gr
    from diffeditor_ui.app import TaskTab

    form = task_form(get_registry().task("drag"), SHAPES_DEFAULTS)
    tab = TaskTab(form, None, {}, [])
    img = Image.fromarray((np.arange(32 * 32 * 3) % 251).astype(np.uint8).reshape(32, 32, 3))
    vals = {"image": img, "mask": None, "handles": [[4.0, 5.0]], "targets": []}
    (first,) = tab.render_views(vals)
    assert isinstance(first, str) and Path(first).is_file()
    import os

    os.utime(first, ns=(10**18, 10**18))  # a stamp no rewrite can reproduce
    (again,) = tab.render_views(dict(vals))
    assert again == first
    assert Path(first).stat().st_mtime_ns == 10**18  # the file was left alone
    shown = np.asarray(Image.open(first).convert("RGB"))
    k = drawing.view_scale(img.size)
    expected = np.asarray(drawing.draw_points(drawing.to_view(img)[0], [[[4.0, 5.0]], []], k))
    assert np.array_equal(shown, expected)
    (other,) = tab.render_views({**vals, "handles": [[9.0, 9.0]]})
    assert other != first
    # gradio serves the path as given (no re-encode through its rewrite-in-place PIL cache)
    assert gr.Image(format="png").postprocess(first).path == first
