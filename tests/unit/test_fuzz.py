"""Fuzzing the input side (issue 14): generated spec documents (valid and broken: wrong types,
non-finite numbers, odd unicode, deep nesting, bytes that are not text) and image/mask files
(modes, bit depths, sizes, formats, truncation) go through the CLI's parse-and-check path and
the Python API. The property everywhere: a valid spec, or exit 2 with one line per problem and
no traceback (no exception other than the package's own errors).

The fast suite runs a bounded number of examples per property (``DIFFEDITOR_FUZZ_EXAMPLES``,
default 25); ``nox -s fuzz`` runs the long profile (2000 each, no deadline).
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffeditor.cli import main
from diffeditor.errors import DiffEditorError
from diffeditor.specs import parse_spec

EXAMPLES = int(os.environ.get("DIFFEDITOR_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

TASKS = ["move", "resize", "drag", "appearance", "paste", "compose"]
FIELDS = ["task", "image", "mask", "reference", "reference_mask", "inpaint_mask", "offset",
          "scale", "handles", "targets", "prompt", "seed", "steps", "resolution",
          "guidance_scale", "energy_scale", "guidance_k", "w_edit", "w_content", "sde_strength",
          "schedule", "feature_levels", "memory_bank", "edits", "guidance_clip", "colour"]
FILES = ["image.png", "mask.png", "missing.png", "", "mask.png\n", "../image.png", "ß/ü.png"]

odd_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=30) | st.sampled_from(
    ["", " ", "\n", "\x00", "\u202e", "\ud7ff", "🙂" * 5, "a" * 5000, "NaN", "inf", "1e400"])
numbers = (st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=True)
           | st.sampled_from([0, 1, -1, 0.5, 1e-300, 1e300, math.inf, -math.inf, math.nan]))
scalars = st.none() | st.booleans() | numbers | odd_text | st.sampled_from(FILES + TASKS)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(FIELDS) | odd_text, inner, max_size=4),
                      max_leaves=12)
good = {  # plausible values per field, so that the fuzzer also reaches the deeper checks
    "task": st.sampled_from(TASKS), "image": st.sampled_from(FILES), "mask": st.sampled_from(FILES),
    "offset": st.tuples(numbers, numbers).map(list), "scale": numbers,
    "handles": st.lists(st.tuples(numbers, numbers).map(list), max_size=3),
    "targets": st.lists(st.tuples(numbers, numbers).map(list), max_size=3),
    "steps": numbers, "resolution": numbers, "seed": numbers,
}


@st.composite
def spec_documents(draw) -> dict:
    doc = {"task": draw(st.sampled_from(TASKS)), "image": "image.png", "mask": "mask.png"}
    if doc["task"] == "drag":
        doc.update(handles=[[10, 10]], targets=[[20, 20]])
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=5, unique=True)):
        strategy = good.get(name, values)
        doc[name] = draw(strategy | values if name in good else strategy)
    if draw(st.booleans()) and doc.get("task") == "compose":
        doc["edits"] = [draw(spec_documents()) for _ in range(draw(st.integers(0, 2)))]
    return doc


def _deep(depth: int, kind: str):
    node: object = 1
    for _ in range(depth):
        node = [node] if kind == "list" else {"a": node}
    return node


@st.composite
def spec_files(draw) -> tuple[str, bytes]:
    """(suffix, bytes) of a spec file: YAML or JSON of a generated document, deep nesting, or
    broken bytes."""
    kind = draw(st.sampled_from(["yaml", "json", "json-nan", "deep", "bytes", "truncated",
                                 "big-int", "dup-key", "yaml-1.1"]))
    doc = draw(spec_documents())
    if kind == "big-int":  # issue 31: Python refuses int() of more than 4300 digits
        digits = draw(st.sampled_from([101, 4300, 4301, 20000]))
        key = draw(st.sampled_from(["seed", "offset", "junk", "schedule"]))
        big = "-" * draw(st.integers(0, 1)) + "9" * digits
        inner = {"offset": f"[{big}, 0]", "schedule": f"{{sde: {{steps: [{big}]}}}}"}.get(key, big)
        if draw(st.booleans()):
            inner = inner.replace("{sde: {steps: ", '{"sde": {"steps": ')
            return ".json", (json.dumps(doc, default=str)[:-1] + f', "{key}": {inner}}}').encode() \
                if _finite(doc) else f'{{"task": "move", "{key}": {inner}}}'.encode()
        return ".yaml", (yaml.safe_dump(doc) + f"{key}: {inner}\n").encode()
    if kind == "dup-key":  # issue 31: the last key must not silently win
        key = draw(st.sampled_from(sorted(doc)))
        if draw(st.booleans()) and _finite(doc):
            text = json.dumps(doc, default=str)
            return ".json", (text[:-1] + f", {json.dumps(key)}: {json.dumps(doc[key], default=str)}}}").encode()
        return ".yaml", (yaml.safe_dump(doc) + yaml.safe_dump({key: doc[key]})).encode()
    if kind == "yaml-1.1":  # issue 31: base-60, yes/on, 0-prefixed octal, dates
        form = draw(st.sampled_from(["1:30", "-1:30:00", "190:20:30.15", "yes", "on", "off", "Y",
                                     "017", "0b101", "2001-12-14", "1_000"]))
        field = draw(st.sampled_from(["offset", "scale", "seed", "steps", "guidance_k"]))
        value = f"[{form}, 0]" if field == "offset" else form
        return ".yaml", (yaml.safe_dump({k: v for k, v in doc.items() if k != field})
                         + f"{field}: {value}\n").encode()
    if kind == "yaml":
        return ".yaml", yaml.safe_dump(doc, allow_unicode=draw(st.booleans())).encode()
    if kind in ("json", "json-nan"):
        return ".json", json.dumps(doc, allow_nan=kind == "json-nan", default=str).encode() \
            if kind == "json-nan" or _finite(doc) else json.dumps({"task": "move"}).encode()
    if kind == "deep":
        depth = draw(st.sampled_from([50, 500, 5000, 50000]))
        doc["offset"] = _deep(depth, draw(st.sampled_from(["list", "dict"])))
        return draw(st.sampled_from([".json", ".yaml"])), (
            json.dumps(doc) if depth <= 500 else
            '{"task": "move", "offset": ' + "[" * depth + "]" * depth + "}").encode()
    if kind == "bytes":
        return draw(st.sampled_from([".yaml", ".json"])), draw(st.binary(max_size=200))
    text = yaml.safe_dump(doc).encode()
    return ".yaml", text[: draw(st.integers(0, len(text)))]


def _finite(x) -> bool:
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    return True


@pytest.fixture(scope="module")
def scene():
    folder = Path(tempfile.mkdtemp(prefix="diffeditor-fuzz-"))
    img = np.full((64, 64, 3), 128, np.uint8)
    img[20:40, 10:30] = (220, 40, 40)
    Image.fromarray(img).save(folder / "image.png")
    m = np.zeros((64, 64), np.uint8)
    m[20:40, 10:30] = 255
    Image.fromarray(m).save(folder / "mask.png")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])  # anything but the package's own errors escapes here
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    return code, [ln for ln in err.splitlines() if ln.strip()]


def _assert_clean_refusal(code: int, lines: list[str], n_specs: int = 1) -> None:
    assert code == 2, (code, lines)
    errors = [ln for ln in lines if ln.startswith("diffeditor: error: ")]
    assert errors and len(errors) == len(lines) - sum("diffeditor: warning:" in ln for ln in lines)
    assert len(errors) <= max(n_specs, 1) + 4, lines  # one per problem, not a dump
    assert all(len(ln) < 2000 for ln in errors), [len(ln) for ln in errors]


@FUZZ
@given(spec=spec_files())
def test_fuzz_spec_files_through_the_cli(scene, capsys, spec):
    suffix, data = spec
    path = scene / f"fuzz{suffix}"
    path.write_bytes(data)
    out = scene / "out" / "o.png"
    code, lines = _cli(capsys, "edit", path, "--model", scene, "--out", out)
    # the folder holds no model: a spec that passes every check ends at the model load
    _assert_clean_refusal(code, lines)
    assert not out.parent.exists()


@FUZZ
@given(doc=spec_documents())
def test_fuzz_spec_dicts_through_the_api(scene, doc):
    try:
        spec = parse_spec(doc, base_dir=scene)
    except DiffEditorError as exc:
        assert "\n" not in str(exc) or True  # the API may carry several; the CLI prints one each
        assert len(str(exc)) < 4000
        return
    # valid: every number in it is finite and the round trip holds
    dumped = spec.model_dump(mode="json")
    assert _finite(dumped)
    assert parse_spec(dumped, base_dir=scene) == spec


anything = st.recursive(scalars | st.binary(max_size=20) | st.builds(object),
                        lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner),
                        max_leaves=6)


@FUZZ
@given(obj=anything)
def test_fuzz_api_spec_argument_types(obj):
    assume(not isinstance(obj, (str, dict)))
    with pytest.raises(DiffEditorError) as info:
        parse_spec(obj)
    assert isinstance(info.value, TypeError) and len(str(info.value)) < 200


# -- image and mask files -------------------------------------------------------------------------

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK"]
FORMATS = {"png": "PNG", "jpg": "JPEG", "tif": "TIFF", "bmp": "BMP", "gif": "GIF", "webp": "WEBP"}


@st.composite
def image_files(draw) -> tuple[str, bytes]:
    w = draw(st.sampled_from([1, 7, 8, 9, 64, 65, 200]))
    h = draw(st.sampled_from([1, 8, 64, 130]))
    mode = draw(st.sampled_from(MODES))
    ext = draw(st.sampled_from(list(FORMATS)))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    if mode in ("I;16", "I"):
        im = Image.fromarray((rng.integers(0, 65536, (h, w))).astype(np.uint16))
        if mode == "I":
            im = im.convert("I")
    elif mode == "F":
        im = Image.fromarray(rng.random((h, w)).astype(np.float32), "F")
    else:
        im = im.convert(mode)
    buf = io.BytesIO()
    try:
        im.save(buf, format=FORMATS[ext])
    except (OSError, ValueError, KeyError):  # this format cannot hold this mode
        im.convert("RGB").save(buf, format=FORMATS[ext])
    extra = draw(st.sampled_from(["none", "none", "exif", "frames", "non-finite"]))
    if extra == "exif" and FORMATS[ext] in ("PNG", "JPEG", "TIFF", "WEBP"):  # issue 31
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(0, 9))
        buf = io.BytesIO()
        try:
            im.save(buf, format=FORMATS[ext], exif=exif)
        except (OSError, ValueError, KeyError):
            im.convert("RGB").save(buf, format=FORMATS[ext], exif=exif)
    elif extra == "frames" and FORMATS[ext] in ("GIF", "TIFF"):
        buf = io.BytesIO()
        rgb = im.convert("RGB")
        rgb.save(buf, format=FORMATS[ext], save_all=True,
                 append_images=[rgb.transpose(Image.Transpose.ROTATE_180)] * draw(st.integers(1, 3)))
    elif extra == "non-finite":
        arr = rng.random((h, w)).astype(np.float32)
        arr.flat[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        buf = io.BytesIO()
        Image.fromarray(arr, "F").save(buf, format="TIFF")
        ext = "tif"
    data = buf.getvalue()
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip", "garbage-tail"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    elif damage == "flip" and data:
        pos = draw(st.integers(0, len(data) - 1))
        data = data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:]
    elif damage == "garbage-tail":
        data += draw(st.binary(min_size=1, max_size=50))
    return ext, data


@FUZZ
@given(image=image_files(), role=st.sampled_from(["image", "mask"]))
def test_fuzz_image_and_mask_files(scene, capsys, image, role):
    ext, data = image
    (scene / f"fz.{ext}").write_bytes(data)
    fields = {"image": "image.png", "mask": "mask.png", role: f"fz.{ext}"}
    path = scene / "fz.json"
    path.write_text(json.dumps({"task": "move", **fields, "offset": [3, 0]}))
    code, lines = _cli(capsys, "edit", path, "--model", scene, "--out", scene / "out" / "o.png")
    _assert_clean_refusal(code, lines)


@FUZZ
@given(image=image_files())
def test_fuzz_loaded_images_are_rgb_of_their_size(tmp_path_factory, image):
    from diffeditor.imageio import load_image

    ext, data = image
    path = tmp_path_factory.mktemp("img") / f"x.{ext}"
    path.write_bytes(data)
    try:
        im = load_image(path)
    except DiffEditorError as exc:
        assert "\n" not in str(exc)
        return
    with Image.open(path) as raw:
        from diffeditor.imageio import exif_orientation

        w, h = raw.size  # as viewers show it: EXIF orientations 5-8 swap the sides
        assert im.mode == "RGB" and im.size == ((h, w) if exif_orientation(raw) >= 5 else (w, h))
        assert getattr(raw, "n_frames", 1) == 1  # several frames are refused
    assert im.info["exif_orientation"] in range(1, 9)


# -- DragBench pickles ---------------------------------------------------------------------------

plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    | st.tuples(inner, inner),
    max_leaves=10)


@FUZZ
@given(obj=plain, protocol=st.integers(2, pickle.HIGHEST_PROTOCOL))
def test_fuzz_restricted_unpickler_round_trips_plain_data(obj, protocol):
    DB = pytest.importorskip("diffeditor_eval.dragbench")
    assert DB.restricted_load(pickle.dumps(obj, protocol=protocol)) == obj


@FUZZ
@given(data=st.binary(max_size=300), arr=st.booleans(), cut=st.integers(0, 400))
def test_fuzz_restricted_unpickler_on_broken_bytes(data, arr, cut):
    """Random or cut pickles: a value or a DragBench error, nothing else."""
    DB = pytest.importorskip("diffeditor_eval.dragbench")
    if arr:
        data = pickle.dumps({"mask": np.ones((3, 4), np.uint8), "p": data}, protocol=4)[:cut]
    try:
        DB.restricted_load(data)
    except DB.DragBenchFormatError:
        pass


# -- sidecars and plugins (issue 31) -------------------------------------------------------------


@FUZZ
@given(versions=values, task=values, spec=values, model=values,
       drop=st.sampled_from([None, "versions", "spec", "model", "task"]))
def test_fuzz_sidecar_fields_of_every_type(scene, capsys, versions, task, spec, model, drop):
    """A sidecar (an output's JSON, replayed with ``edit OUT.json``) with any field of any type:
    a replay that gets as far as the (absent) model, or one clean line per problem."""
    good = {"task": "move", "image": str(scene / "image.png"), "mask": str(scene / "mask.png")}
    side = {"versions": versions, "task": task, "spec": spec if not isinstance(spec, str) else good,
            "model": model}
    if drop:
        side.pop(drop)
    if not _finite(side):
        return
    path = scene / "side.json"
    path.write_text(json.dumps(side, default=str))
    code, lines = _cli(capsys, "edit", path, "--model", scene, "--out", scene / "out" / "o.png")
    _assert_clean_refusal(code, lines)
    code, lines = _cli(capsys, "edit", path, "--out", scene / "out" / "o.png", "--check")
    assert code in (0, 2) and all(ln.startswith("diffeditor: ") for ln in lines), lines


@FUZZ
@given(name=st.sampled_from(["move", "drag", "compose", "fz_task"]) | odd_text,
       model=st.sampled_from(["dict", "int", "none", "str", "basemodel", "editspec"]))
def test_fuzz_plugin_tasks_with_broken_spec_models_or_taken_names(name, model):
    """A plugin task with any name (a built-in's included) and any ``spec_model``: the built-in
    tasks stay diffeditor's, a broken plugin is skipped with a failure line, never an error."""
    from pydantic import BaseModel

    from diffeditor.hookspecs import hookimpl
    from diffeditor.interfaces import Task
    from diffeditor.plugins import registry_from
    from diffeditor.specs import EditSpec

    spec_model = {"dict": dict, "int": 3, "none": None, "str": "x",
                  "basemodel": type("M", (BaseModel,), {}), "editspec": EditSpec}[model]

    class FuzzTask(Task):
        version = "9"
        description = "fuzz"

        def plan(self, spec, images, geom):
            raise AssertionError("never planned")

    FuzzTask.name = name
    FuzzTask.spec_model = spec_model

    class FuzzPlugin:
        @staticmethod
        @hookimpl(trylast=True)
        def register_tasks(register):
            register(FuzzTask())

    reg = registry_from([FuzzPlugin], autoload=True)
    for builtin in ("move", "drag", "compose", "appearance", "paste", "resize"):
        assert reg.task_origin[builtin].distribution == "diffeditor"
    own = {n for n, info in reg.task_origin.items() if info.distribution == "diffeditor"}
    if model != "editspec" or not name or name in own:
        assert not any(isinstance(t, FuzzTask) for t in reg.tasks.values())
        assert [f.name for f in reg.failures if f.name == "FuzzPlugin"] == ["FuzzPlugin"]
        assert all("\n" not in f.error for f in reg.failures)
    else:
        assert isinstance(reg.tasks[name], FuzzTask)
