"""Issue 31, the last classes of bad input: big integers, duplicate keys, YAML 1.1 forms,
booleans as numbers, schedule steps past the end, empty manifests, sidecar fields of the wrong
type, plugins with broken spec models or validators. Each: one line, exit 2, no traceback,
before any model loads (the ``--model`` is a folder with no model in it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_reliability_inputs import MOVE, assert_one_error, edit, run, scene  # noqa: F401

from diffeditor.errors import UsageError
from diffeditor.models import resolve_model
from diffeditor.specs import parse_spec

BIG = "9" * 4301  # one digit past Python's int-from-text limit

YAML_CASES = [
    # 5: big integers in known and unknown fields
    ("big-int-known", MOVE + f"seed: {BIG}\n", "an integer of 4301 digits", "line 4 column 7"),
    ("big-int-unknown", MOVE + f"junk: {BIG}\n", "an integer of 4301 digits"),
    ("big-int-nested", MOVE + f"offset: [{BIG}, 0]\n", "an integer of 4301 digits"),
    # 11: explicit schedule steps past the end
    ("steps-past-end", MOVE + "schedule: {guidance: [{steps: [1000000000000]}]}\n",
     "schedule.guidance.0.steps: step 1000000000000 is past the last step of this run (49"),
    ("steps-past-end-sde", MOVE + "steps: 10\nschedule: {sde: {steps: [3, 10]}}\n",
     "schedule.sde.steps: step 10 is past the last step of this run (9"),
    # 12: duplicate keys, the task's included
    ("dup-task", "task: drag\n" + MOVE, "key 'task' appears twice", "line 2"),
    ("dup-nested", MOVE + "schedule: {sde: {start: 0.1, start: 0.2}}\n", "key 'start' appears twice"),
    # 13: YAML 1.1 base-60 numbers are not numbers
    ("sexagesimal", MOVE + "offset: [1:30, 0]\n", "offset.0", "valid number"),
    # 14: booleans where numbers go
    ("bool-offset", MOVE + "offset: [true, false]\n", "offset.0: must be a number, not true/false"),
    ("bool-scale", MOVE + "scale: true\n", "scale: must be a number"),
    ("bool-steps", MOVE + "steps: true\n", "steps: must be a number"),
    ("bool-window", MOVE + "schedule: {sde: {steps: [1, false]}}\n",
     "schedule.sde.steps.1: must be a number"),
]


@pytest.mark.parametrize("text, words", [(c[1], c[2:]) for c in YAML_CASES],
                         ids=[c[0] for c in YAML_CASES])
def test_bad_yaml_one_line(scene, capsys, text, words):  # noqa: F811
    code, lines = edit(capsys, scene, text)
    assert_one_error(code, lines, *words)
    assert not (scene / "out").exists()


JSON_CASES = [
    ("big-int", '{"task": "move", "image": "image.png", "mask": "mask.png", "seed": ' + BIG + "}",
     "an integer of 4301 digits"),
    ("big-int-unknown", '{"task": "move", "x": {"y": [' + BIG + "]}}", "an integer of 4301 digits"),
    ("dup-task", '{"task": "drag", "task": "move", "image": "image.png", "mask": "mask.png"}',
     "key 'task' appears twice"),
    ("bool-offset", '{"task": "move", "image": "image.png", "mask": "mask.png", '
     '"offset": [true, 0]}', "offset.0: must be a number"),
]


@pytest.mark.parametrize("text, words", [(c[1], c[2:]) for c in JSON_CASES],
                         ids=[c[0] for c in JSON_CASES])
def test_bad_json_one_line(scene, capsys, text, words):  # noqa: F811
    code, lines = edit(capsys, scene, text, "spec.json")
    assert_one_error(code, lines, *words)


def test_manifest_line_with_a_big_integer_or_duplicate_key(scene, capsys):  # noqa: F811
    good = {"task": "move", "image": "image.png", "mask": "mask.png"}
    (scene / "m.jsonl").write_text(json.dumps(good)[:-1] + f', "seed": {BIG}}}\n'
                                   + '{"task": "move", "task": "drag"}\n')
    code, lines = run(capsys, "edit", scene / "m.jsonl", "--model", scene, "--out-dir",
                      scene / "out")
    assert code == 2 and len(lines) == 2, lines
    assert "m.jsonl:1" in lines[0] and "an integer of 4301 digits" in lines[0]
    assert "m.jsonl:2" in lines[1] and "key 'task' appears twice" in lines[1]


def test_yaml_1_2_scalars():
    from diffeditor.specs import load_yaml, loads_json

    data = load_yaml("a: [1:30, yes, on, no, 017, 0o17, 0x1f, 2001-12-14, .inf, -.5e1, ~, TRUE]\n")
    assert data == {"a": ["1:30", "yes", "on", "no", 17, 15, 31, "2001-12-14", float("inf"),
                          -5.0, None, True]}
    # a key merged in with << may be overridden (that is what merging is for)
    assert load_yaml("x: &x {a: 1, b: 2}\ny: {<<: *x, a: 3}\n")["y"] == {"a": 3, "b": 2}
    assert loads_json('{"a": [1, {"b": 2}]}') == {"a": [1, {"b": 2}]}


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank-lines"])
@pytest.mark.parametrize("option", ["--out-dir", "--out", "--check"])
def test_empty_manifest_one_line(scene, capsys, content, option):  # noqa: F811
    """6 and 24: an empty manifest is one line saying so (was an IndexError with --out-dir, exit
    0 with --check, and 'for several specs' with --out)."""
    (scene / "m.jsonl").write_text(content)
    target = [] if option == "--check" else [scene / ("out.png" if option == "--out" else "out")]
    code, lines = run(capsys, "edit", scene / "m.jsonl", "--model", scene, option, *target)
    assert_one_error(code, lines, "m.jsonl: no specs in this manifest (it is empty or holds "
                     "blank lines only)")


@pytest.mark.parametrize("model", [7, [1, 2], {"a": 1}, True], ids=["number", "list", "dict", "bool"])
def test_sidecar_model_of_the_wrong_type(scene, capsys, model):  # noqa: F811
    """7: a sidecar whose model is not a string (was a TypeError in resolve_model)."""
    spec = parse_spec({"task": "move", "image": "image.png", "mask": "mask.png"}, base_dir=scene)
    side = {"versions": {"diffeditor": "0"}, "model": model,
            "spec": json.loads(spec.model_dump_json())}
    (scene / "side.json").write_text(json.dumps(side))
    code, lines = run(capsys, "edit", scene / "side.json", "--out", scene / "o.png")
    assert_one_error(code, lines, "side.json: model: must be the model's name or folder (a "
                     f"string), not {type(model).__name__}")


@pytest.mark.parametrize("model", [7, [1], {"a": 1}])
def test_resolve_model_argument_type(model):
    with pytest.raises(UsageError, match=f"^model must be .* not {type(model).__name__}$"):
        resolve_model(model)


PLUGIN_MODULE = """
from typing import Literal
from pydantic import field_validator
from diffeditor.hookspecs import hookimpl
from diffeditor.interfaces import Task
from diffeditor.specs import EditSpec

class KeySpec(EditSpec):
    task: Literal["keyerr"] = "keyerr"

    @field_validator("prompt")
    @classmethod
    def _check(cls, v):
        return {}["missing"]

class KeyTask(Task):
    name = "keyerr"
    version = "1.0"
    description = "a validator that raises KeyError"
    spec_model = KeySpec

    def plan(self, spec, images, geom):
        raise RuntimeError("never")

class NotAModel(KeyTask):
    name = "notamodel"
    spec_model = dict

@hookimpl
def register_tasks(register):
    register(KeyTask())
"""


def test_broken_plugin_spec_models_one_line(scene, tmp_path):  # noqa: F811
    """8: a task whose spec_model is not a pydantic model is skipped with one line (it broke
    every command); 9: a validator raising KeyError is one line at edit."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "dfe_keyerr_plugin.py").write_text(PLUGIN_MODULE)
    (site / "dfe_notamodel_plugin.py").write_text(
        "from diffeditor.hookspecs import hookimpl\nfrom dfe_keyerr_plugin import NotAModel\n\n"
        "@hookimpl\ndef register_tasks(register):\n    register(NotAModel())\n")
    dist = site / "dfe_badspec-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dfe-badspec\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[diffeditor]\nkeyerr = dfe_keyerr_plugin\nnotamodel = dfe_notamodel_plugin\n")
    import os

    env = {**os.environ, "PYTHONPATH": str(site), "DIFFEDITOR_DISABLE_PLUGINS": "",
           "DIFFEDITOR_PLUGINS": ""}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "diffeditor.cli", *map(str, args)],
                              capture_output=True, text=True, env=env, timeout=120, cwd=scene)

    res = cli("tasks")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "keyerr" in res.stdout and "notamodel" not in res.stdout
    bad = [ln for ln in res.stderr.splitlines() if "notamodel" in ln]
    assert len(bad) == 1 and "spec_model is <class 'dict'>, not a subclass of" in bad[0], res.stderr
    (scene / "k.yaml").write_text("task: keyerr\nimage: image.png\n")
    res = cli("edit", "k.yaml", "--model", scene, "--out", "o.png")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    err = [ln for ln in res.stderr.splitlines() if "notamodel" not in ln]
    assert len(err) == 1, res.stderr
    assert ("k.yaml: the keyerr task's spec check failed (plugin 'keyerr', dfe-badspec): "
            "KeyError: 'missing'; a bug in that plugin") in err[0]


# -- images: EXIF orientation, frames, non-finite pixels, what a path is (10, 15, 18, 21) -------


def _oriented(path: Path, orientation: int, size=(96, 128), fmt="PNG") -> np.ndarray:
    """A non-symmetric test image saved with the given EXIF orientation; returns the raw pixels."""
    rng = np.random.default_rng(orientation)
    raw = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(raw).save(path, fmt, exif=exif)
    return raw


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied_as_viewers_do(tmp_path, orientation):
    """10: every orientation gives what Pillow's exif_transpose (what viewers show) gives."""
    from PIL import ImageOps

    from diffeditor.imageio import load_image

    _oriented(tmp_path / "o.png", orientation)
    with Image.open(tmp_path / "o.png") as im:
        want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    got = load_image(tmp_path / "o.png")
    assert np.array_equal(np.asarray(got), want)
    assert got.info["exif_orientation"] == orientation
    assert got.size == ((128, 96) if orientation >= 5 else (96, 128))


def test_sideways_jpeg_takes_a_mask_of_its_upright_size(scene, capsys):  # noqa: F811
    """10: a 96x128 JPEG with Orientation 6 shows as 128x96: a 128x96 mask fits it (was refused
    with "mask is 128x96 but the image is 96x128")."""
    _oriented(scene / "side.jpg", 6, fmt="JPEG")
    m = np.zeros((96, 128), np.uint8)
    m[20:60, 30:70] = 255
    Image.fromarray(m).save(scene / "m2.png")
    (scene / "s.yaml").write_text("task: move\nimage: side.jpg\nmask: m2.png\noffset: [5, 0]\n")
    code, lines = run(capsys, "edit", scene / "s.yaml", "--check")
    assert code == 0 and lines == [], lines


def test_sidecar_records_the_orientation(editor, scene):  # noqa: F811
    _oriented(scene / "side.png", 6, size=(128, 128))
    res = editor.edit({"task": "move", "image": "side.png", "mask": "mask.png",
                       "offset": [4, 0], "steps": 2}, base_dir=scene)
    assert res.metadata["exif_orientation"] == {"source": 6}
    plain = editor.edit({"task": "move", "image": "image.png", "mask": "mask.png",
                         "offset": [4, 0], "steps": 2}, base_dir=scene)
    assert "exif_orientation" not in plain.metadata


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_multi_frame_image_refused(scene, capsys, fmt):  # noqa: F811
    """18: an animated GIF or a multi-page TIFF (was: frame 1, silently)."""
    frames = [Image.fromarray(np.full((128, 128, 3), v, np.uint8)) for v in (0, 128, 255)]
    frames[0].save(scene / f"anim.{fmt.lower()}", fmt, save_all=True, append_images=frames[1:])
    code, lines = edit(capsys, scene, f"task: move\nimage: anim.{fmt.lower()}\nmask: mask.png\n")
    assert_one_error(code, lines, f"image: image {scene}/anim.{fmt.lower()} has 3 frames (an "
                     "animation or a multi-page file); save the one frame to edit as a PNG")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("share", ["all", "one"])
def test_non_finite_float_image_refused(scene, capsys, value, share):  # noqa: F811
    """15: a float TIFF with NaN or infinite pixels (an all-NaN one was edited as black)."""
    arr = np.full((128, 128), 0.5, np.float32)
    if share == "all":
        arr[:] = value
    else:
        arr[3, 4] = value
    Image.fromarray(arr, "F").save(scene / "f.tif")
    code, lines = edit(capsys, scene, "task: move\nimage: f.tif\nmask: mask.png\n")
    n = 128 * 128 if share == "all" else 1
    assert_one_error(code, lines, f"has {n} of 16384 pixels that are NaN or infinite")


@pytest.mark.parametrize("where", ["image", "spec"])
@pytest.mark.parametrize("kind", ["char-device", "folder", "fifo"])
def test_not_a_regular_file_says_what_it_is(scene, capsys, where, kind):  # noqa: F811
    """21: /dev/zero, a folder or a FIFO as the image or the spec (was "file not found")."""
    import os

    path = {"char-device": Path("/dev/zero"), "folder": scene / "d", "fifo": scene / "p"}[kind]
    if kind == "folder":
        path.mkdir()
        (path / "x.txt").write_text("")
    elif kind == "fifo":
        os.mkfifo(path)
    what = {"char-device": "a character device", "folder": "a folder",
            "fifo": "a FIFO (named pipe)"}[kind]
    if where == "image":
        code, lines = edit(capsys, scene, f"task: move\nimage: {path}\nmask: mask.png\n")
        assert_one_error(code, lines, f"image: {path} is {what}, not a file; give a regular file")
    elif kind == "folder":  # a folder of specs with none in it
        code, lines = run(capsys, "edit", path, "--check")
        assert_one_error(code, lines, f"{path}: no spec files")
    else:
        code, lines = run(capsys, "edit", path, "--check")
        assert_one_error(code, lines, f"{path} is {what}, not a spec file; give a regular file")


@pytest.mark.parametrize("drop, spec_value", [("versions", None), ("spec", None), (None, [1])],
                         ids=["no-versions", "no-spec", "spec-a-list"])
def test_broken_sidecar_says_so(scene, capsys, drop, spec_value):  # noqa: F811
    """22: a sidecar missing versions or spec (was "task: must be a task name ..., not dict")."""
    spec = parse_spec({"task": "move", "image": "image.png", "mask": "mask.png"}, base_dir=scene)
    side = {"versions": {"diffeditor": "0"}, "task": {"name": "move", "version": "0.1.0"},
            "spec": json.loads(spec.model_dump_json())}
    if drop:
        del side[drop]
    else:
        side["spec"] = spec_value
    (scene / "side.json").write_text(json.dumps(side))
    code, lines = run(capsys, "edit", scene / "side.json", "--model", scene, "--out",
                      scene / "o.png")
    want = {"versions": "no versions", "spec": "no spec", None: "no spec (a mapping)"}[drop]
    assert_one_error(code, lines, f"side.json: a sidecar with {want}; replay an intact sidecar")


def test_one_problem_one_line(scene, capsys):  # noqa: F811
    """25: a spec folder plus a spec file inside it, and --out-dir naming a file, each gave the
    same error line twice."""
    (scene / "sp").mkdir()
    (scene / "sp" / "a.yaml").write_text("task: move\nimage: ../image.png\nmask: ../mask.png\n")
    (scene / "sp" / "b.yaml").write_text("task: move\nimage: ../image.png\nmask: ../mask.png\n")
    code, lines = run(capsys, "edit", scene / "sp", scene / "sp" / "a.yaml", "--model", scene,
                      "--out-dir", scene / "o")
    assert_one_error(code, lines, f"{scene}/o/a.png would be written twice in this batch")
    (scene / "ofile").write_text("PRECIOUS")
    code, lines = run(capsys, "edit", scene / "sp" / "a.yaml", scene / "sp" / "b.yaml",
                      "--model", scene, "--out-dir", scene / "ofile")
    assert_one_error(code, lines, f"output folder {scene}/ofile cannot be created")
    assert (scene / "ofile").read_text() == "PRECIOUS"
