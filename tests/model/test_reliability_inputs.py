"""Bad input never gives a traceback or a silently wrong image (issue 14): every spec, image,
mask, output and option of ``diffeditor edit`` is checked before any model loads, one line
per problem naming the spec file and the field, exit 2. The ``--model`` here is a folder with
no model in it: reaching the model loader would print a different error."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffeditor.cli import main
from diffeditor.errors import DiffEditorError, SpecError
from diffeditor.imageio import load_image, load_mask


@pytest.fixture()
def scene(tmp_path: Path) -> Path:
    img = np.full((128, 128, 3), 128, np.uint8)
    img[40:80, 20:60] = (220, 40, 40)
    Image.fromarray(img).save(tmp_path / "image.png")
    mask = np.zeros((128, 128), np.uint8)
    mask[40:80, 20:60] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path


def run(capsys, *argv) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return code, [ln for ln in err.splitlines() if ln.strip()]


def edit(capsys, scene: Path, spec_text: str | bytes, name: str = "spec.yaml", *extra):
    path = scene / name
    path.write_bytes(spec_text.encode() if isinstance(spec_text, str) else spec_text)
    return run(capsys, "edit", path, "--model", scene, "--out", scene / "out" / "o.png", *extra)


def assert_one_error(code, lines, *words):
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("diffeditor: error: "), lines
    for w in words:
        assert w in lines[0], (w, lines[0])


MOVE = "task: move\nimage: image.png\nmask: mask.png\n"

# -- spec documents ------------------------------------------------------------------------------

BAD_SPECS = [
    ("non-utf8", b"task: move\nprompt: caf\xe9\n", "not UTF-8"),
    ("task-list", "task: [move]\nimage: image.png\n", "task: must be a task name"),
    ("task-dict", "task: {a: 1}\nimage: image.png\n", "task: must be a task name"),
    ("task-number", "task: 7\n", "task: must be a task name"),
    ("compose-task-list", "task: compose\nimage: image.png\nedits: [{task: [move]}]\n",
     "edits[0].task: must be a task name"),
    ("image-int", "task: move\nimage: 5\nmask: mask.png\n", "image: must be a file path"),
    ("image-list", "task: move\nimage: [a.png, b.png]\nmask: mask.png\n", "image: must be a file path"),
    ("mask-int", "task: move\nimage: image.png\nmask: 7\n", "mask: must be a file path"),
    ("image-empty", "task: move\nimage: ''\nmask: mask.png\n", "image: must be a file path"),
    ("offset-nan-yaml", MOVE + "offset: [.nan, 0]\n", "offset.0", "finite"),
    ("offset-inf", MOVE + "offset: [0, .inf]\n", "offset.1", "finite"),
    ("offset-huge", MOVE + "offset: [1e300, 0]\n", "offset", "out of the 128x128 image"),
    ("offset-large", MOVE + "offset: [0, -129]\n", "offset", "out of the 128x128 image"),
    ("scale-tiny", MOVE + "scale: 1e-300\n", "scale", "greater than or equal to 0.01"),
    ("scale-inf", MOVE + "scale: .inf\n", "scale", "finite"),
    ("weight-nan", MOVE + "w_edit: .nan\n", "w_edit", "finite"),
    ("window-nan", MOVE + "schedule: {sde: {start: .nan, stop: 0.5}}\n", "schedule.sde.start"),
    ("yaml-error", "task: move\nimage: [image.png\n", "not valid YAML", "line"),
    ("yaml-tab", "task: move\n\timage: image.png\n", "not valid YAML"),
    ("empty", "", "a spec must be a mapping", "empty file"),
    ("top-list", "- task: move\n", "a spec must be a mapping", "list"),
    ("deep-yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n", "spec.yaml"),
    ("many-errors", "task: move\nimage: 5\nmask: 6\nscale: x\nseed: -1\nsteps: 0\nw_edit: -1\n"
     "w_content: -1\n", "image:", "and 2 more"),
    ("anchor-bomb", "task: drag\nimage: image.png\nmask: mask.png\na: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
     + "".join(f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefg", "bcdefgh"))
     + "handles: [*h, *h, *h, *h, *h, *h, *h, *h, *h]\ntargets: *h\n", "spec.yaml", "more"),
    ("too-many-handles", "task: drag\nimage: image.png\nmask: mask.png\nhandles: "
     + json.dumps([[1, 1]] * 65) + "\ntargets: " + json.dumps([[2, 2]] * 65) + "\n",
     "handles", "at most 64"),
    ("newline-in-path", "task: move\nimage: \"a\\nb.png\"\nmask: mask.png\n", "a\\nb.png"),
    ("nul-in-path", "task: move\nimage: \"a\\0b.png\"\nmask: mask.png\n", "NUL"),
    # found by the fuzzer: a name longer than the OS allows raised OSError inside validation
    ("path-too-long", "task: move\nimage: image.png\nmask: " + "a" * 5000 + "\n", "mask",
     "file not found"),
]


@pytest.mark.parametrize("text, words", [(c[1], c[2:]) for c in BAD_SPECS],
                         ids=[c[0] for c in BAD_SPECS])
def test_bad_yaml_spec_one_line(scene, capsys, text, words):
    code, lines = edit(capsys, scene, text)
    assert_one_error(code, lines, *words)
    assert not (scene / "out").exists()


BAD_JSON = [
    ("offset-NaN", {"offset": "NaN"}, "offset.0"),
    ("offset-Infinity", {"offset": "Infinity"}, "offset.0"),
    ("deep", None, "nested too deeply"),
    ("syntax", "", "not valid JSON", "line 1"),
]


@pytest.mark.parametrize("case, fields, words", [(c[0], c[1], c[2:]) for c in BAD_JSON],
                         ids=[c[0] for c in BAD_JSON])
def test_bad_json_spec_one_line(scene, capsys, case, fields, words):
    if case == "deep":
        text = '{"task": "move", "x": ' + "[" * 100000 + "]" * 100000 + "}"
    elif case == "syntax":
        text = '{"task": "move",'
    else:  # json.loads reads NaN / Infinity literals: they must not get through
        text = json.dumps({"task": "move", "image": "image.png", "mask": "mask.png"})[:-1] + \
            f', "offset": [{fields["offset"]}, 0]}}'
    code, lines = edit(capsys, scene, text, "spec.json")
    assert_one_error(code, lines, *words)


def test_batch_names_every_bad_spec_and_field(scene, capsys):
    (scene / "a.yaml").write_text(MOVE + "offset: [.nan, 0]\n")
    (scene / "b.yaml").write_text("task: move\nimage: image.png\nmask: nope.png\n")
    (scene / "c.yaml").write_text(MOVE + "offset: [3, 0]\n")  # fine
    (scene / "small.png").write_bytes(b"")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(scene / "m64.png")
    (scene / "d.yaml").write_text("task: move\nimage: image.png\nmask: m64.png\n")
    code, lines = run(capsys, "edit", scene / "a.yaml", scene / "b.yaml", scene / "c.yaml",
                      scene / "d.yaml", "--model", scene, "--out-dir", scene / "out")
    assert code == 2 and len(lines) == 3, lines
    assert "a.yaml" in lines[0] and "offset" in lines[0]
    assert "b.yaml" in lines[1] and "mask" in lines[1] and "file not found" in lines[1]
    assert "d.yaml" in lines[2] and "mask" in lines[2] and "image's size" in lines[2]
    assert not (scene / "out").exists()


def test_quick_command_refuses_nan_offset(scene, capsys):
    code, lines = run(capsys, "move", scene / "image.png", "--mask", scene / "mask.png",
                      "--offset", "nan", "0", "--model", scene, "--out", scene / "o.png")
    assert_one_error(code, lines, "arguments", "offset.0", "finite")


# -- images and masks ----------------------------------------------------------------------------


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` (the data is a few bytes): what a
    decompression bomb looks like before it is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _image_case(scene: Path, case: str) -> Path:
    p = scene / f"{case}.png"
    if case == "bomb":
        _png_claiming(p, 14000, 14000)
    elif case == "over-limit":
        _png_claiming(p, 9000, 9000)
    elif case == "truncated":
        p.write_bytes((scene / "image.png").read_bytes()[:150])
    elif case == "zero-bytes":
        p.write_bytes(b"")
    elif case == "random":
        p.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif case == "text":
        p.write_text("not an image\n")
    elif case == "tiny":
        Image.new("RGB", (4, 4)).save(p)
    elif case == "strip":
        Image.new("RGB", (2000, 20)).save(p)
    elif case == "folder":
        p.mkdir()
    return p


IMAGE_CASES = [("bomb", "megapixels"), ("over-limit", "megapixel limit"),
               ("truncated", "cannot read image"), ("zero-bytes", "cannot read image"),
               ("random", "cannot read image"), ("text", "cannot read image"),
               ("tiny", "at least 8 pixels"), ("strip", "at most 16 times"),
               ("folder", "is a folder, not a file")]


@pytest.mark.parametrize("case, words", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_bad_image_one_line_naming_the_spec(scene, capsys, recwarn, case, words):
    img = _image_case(scene, case)
    code, lines = edit(capsys, scene, f"task: move\nimage: {img.name}\nmask: mask.png\n")
    assert_one_error(code, lines, "spec.yaml", "image", words)
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]


@pytest.mark.parametrize("case, words", IMAGE_CASES[:6], ids=[c[0] for c in IMAGE_CASES[:6]])
def test_bad_mask_one_line(scene, capsys, case, words):
    m = _image_case(scene, case)
    code, lines = edit(capsys, scene, f"task: move\nimage: image.png\nmask: {m.name}\n")
    assert_one_error(code, lines, "spec.yaml", "mask", words.replace("image", "mask"))


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_gray_png_keeps_its_levels(tmp_path, mode):
    """A 16-bit grayscale PNG was read as all white (Pillow clips at 255): scaled by 1/257."""
    levels = (np.arange(128 * 128).reshape(128, 128) * 4).astype(np.uint16)
    im = Image.fromarray(levels.astype(np.int32), "I").convert(mode) if mode != "I;16" \
        else Image.fromarray(levels)
    im.save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode.startswith("I")
    rgb = np.asarray(load_image(tmp_path / "g.png"))
    want = np.rint(levels / 257.0).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], want) and np.array_equal(rgb[..., 2], want)


def test_16_bit_mask_selects_its_bright_region(tmp_path):
    m = np.full((64, 64), 1000, np.uint16)
    m[10:30, 10:30] = 60000
    Image.fromarray(m).save(tmp_path / "m.png")
    got = load_mask(tmp_path / "m.png", "mask", (64, 64))
    assert got.sum() == 400 and got[10:30, 10:30].all()


def test_float_image_is_read_as_0_to_1(tmp_path):
    arr = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(arr, "F").save(tmp_path / "f.tiff")
    got = np.asarray(load_image(tmp_path / "f.tiff"))[..., 0]
    assert got[0, 0] == 0 and got[-1, -1] == 255


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA", "1", "CMYK", "L"])
def test_other_modes_decode(tmp_path, mode):
    Image.new("RGB", (32, 32), (200, 50, 50)).convert(mode).save(
        tmp_path / ("x.jpg" if mode == "CMYK" else "x.png"))
    im = load_image(tmp_path / ("x.jpg" if mode == "CMYK" else "x.png"))
    assert im.mode == "RGB" and im.size == (32, 32)


# -- options and outputs, before the model ------------------------------------------------------

OPTION_CASES = [
    (["--attention-slice", "-5"], "--attention-slice must be a positive"),
    (["--attention-slice", "0"], "--attention-slice must be a positive"),
    (["--device", "tpu"], "unknown device"),
    (["--device", "cuda:x"], "unknown device"),
    (["--dtype", "float8"], "unknown dtype"),
    (["--image-prompt-weights", "w.bin"], "give both"),
]


@pytest.mark.parametrize("extra, words", OPTION_CASES, ids=[" ".join(c[0]) for c in OPTION_CASES])
def test_bad_options_one_line(scene, capsys, extra, words):
    code, lines = edit(capsys, scene, MOVE, "spec.yaml", *extra)
    assert_one_error(code, lines, words)


def test_cuda_on_a_cpu_only_torch(scene, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, lines = edit(capsys, scene, MOVE, "spec.yaml", "--device", "cuda")
    assert_one_error(code, lines, "no CUDA GPU", "--device cpu")


OUTPUT_CASES = ["x.xyz", "x.json", "dir", "dir-force", "the-input", "the-spec-sidecar",
                "name-too-long"]


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_bad_output_refused_before_the_model(scene, capsys, case):
    (scene / "spec.json").write_text(json.dumps({"task": "move", "image": "image.png",
                                                 "mask": "mask.png"}))
    (scene / "dir").mkdir()
    before = {p.name: p.read_bytes() for p in scene.iterdir() if p.is_file()}
    out, extra, words = {
        "x.xyz": (scene / "x.xyz", [], "unknown image type"),
        "x.json": (scene / "x.json", [], "unknown image type"),
        "dir": (scene / "dir", [], "is a folder"),
        "dir-force": (scene / "dir", ["--force"], "is a folder"),
        "the-input": (scene / "image.png", ["--force"], "inputs are never overwritten"),
        "the-spec-sidecar": (scene / "spec.png", ["--force"], "inputs are never overwritten"),
        "name-too-long": (scene / ("o" * 5000 + ".png"), [], "File name too long"),
    }[case]
    code, lines = run(capsys, "edit", scene / "spec.json", "--model", scene, "--out", out, *extra)
    assert_one_error(code, lines, words)
    after = {p.name: p.read_bytes() for p in scene.iterdir() if p.is_file()}
    assert after == before


def test_cpu_resolution_warning(scene, capsys):
    code, lines = edit(capsys, scene, MOVE + "resolution: 2048\n", "spec.yaml", "--device", "cpu")
    assert code == 2  # the folder holds no model: the load fails after the warning
    assert "warning" in lines[0] and "resolution 2048 on a CPU" in lines[0]


# -- the Python API ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [123, None, b"task: move", ["move"], 1.5, object()],
                         ids=["int", "none", "bytes", "list", "float", "object"])
def test_edit_argument_types(editor, bad):
    with pytest.raises(DiffEditorError) as info:
        editor.edit(bad)
    assert isinstance(info.value, TypeError) and len(str(info.value)) < 150


def test_edit_spec_errors_are_short(editor, scene):
    with pytest.raises(SpecError, match="task: must be a task name"):
        editor.edit({"task": ["move"], "image": "image.png"}, base_dir=scene)
    with pytest.raises(TypeError, match="progress must be None or a callable"):
        editor.edit({"task": "move", "image": "image.png", "mask": "mask.png"}, base_dir=scene,
                    progress="x")


@pytest.mark.parametrize("kwargs", [{"base_dir": 123}, {"base_dir": b"/tmp"}])
def test_edit_base_dir_type(editor, scene, kwargs):
    with pytest.raises(TypeError, match="base_dir must be a folder path"):
        editor.edit({"task": "move", "image": "image.png", "mask": "mask.png"}, **kwargs)


def test_numpy_array_as_an_image_path(editor, scene):
    arr = np.zeros((512, 512, 3), np.uint8)
    with pytest.raises(TypeError) as info:
        editor.move(arr, scene / "mask.png", offset=(3, 0))
    assert "image must be a file path or a PIL image, not ndarray" in str(info.value)
    assert len(str(info.value)) < 150


@pytest.mark.parametrize("kwargs, words", [
    ({"model": 123}, "model must be"),
    ({"model": "shapes", "attention_slice": -5}, "attention_slice must be a positive"),
    ({"model": "shapes", "cache_size": "many"}, "cache_size"),
    ({"model": "shapes", "compile": "fast"}, "compile must be one of"),
    ({"model": "shapes", "device": 3.5}, "device must be"),
    ({"model": "shapes", "dtype": "int7"}, "unknown dtype"),
])
def test_from_pretrained_argument_errors(kwargs, words):
    from diffeditor import Editor

    with pytest.raises(DiffEditorError, match=words) as info:
        Editor.from_pretrained(**kwargs)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("extra, words", [
    (["--attention-slice", "-5"], "--attention-slice must be a positive"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--resolution", "100000"], "--resolution 100000"),
    (["--device", "tpu"], "unknown device"),
])
def test_bench_options_checked_before_loading(capsys, extra, words):
    code, lines = run(capsys, "bench", "--model", "shapes", *extra)
    assert_one_error(code, lines, words)


def test_two_edits_of_a_batch_never_write_one_file(scene, capsys):
    line = json.dumps({"id": "same", "task": "move", "image": "image.png", "mask": "mask.png"})
    (scene / "jobs.jsonl").write_text(line + "\n" + line + "\n")
    before = {p.name: p.read_bytes() for p in scene.iterdir() if p.is_file()}
    code, lines = run(capsys, "edit", scene / "jobs.jsonl", "--model", scene, "--out-dir", scene / "out")
    assert code == 2, lines
    twice = [ln for ln in lines if "would be written twice in this batch" in ln]
    assert [Path(ln.split()[2]).name for ln in twice] == ["same.png"], lines  # sidecar: one line
    assert all("different names or ids" in ln for ln in twice)
    assert not (scene / "out").exists()
    assert {p.name: p.read_bytes() for p in scene.iterdir() if p.is_file()} == before
