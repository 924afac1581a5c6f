"""The DragBench loader on hostile files (issue 14): every allowed unpickling constructor is
bounded before it allocates, nesting is materialised without recursion, image and folder
problems are one clean error, and ``eval --json`` never overwrites without ``--force``."""

from __future__ import annotations

import json
import pickle
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.append(str(Path(__file__).resolve().parents[2] / "plugins/diffeditor-eval/src"))

from diffeditor_eval import dragbench as DB  # noqa: E402

from diffeditor.cli import main  # noqa: E402


def _case(folder: Path, meta: bytes | None = None, size=(16, 12)) -> Path:
    folder.mkdir(parents=True)
    Image.new("RGB", size, (10, 20, 30)).save(folder / DB.IMAGE_FILE)
    if meta is None:
        meta = pickle.dumps({"prompt": "p", "points": [[1, 1], [2, 2]],
                             "mask": np.ones((size[1], size[0]), np.uint8)}, protocol=4)
    (folder / DB.META_FILE).write_bytes(meta)
    return folder


def _call(func: str, *args) -> bytes:
    """A protocol-2 pickle calling ``builtins.<func>(*args)`` (args: ints only)."""
    body = b"".join(b"J" + a.to_bytes(4, "little", signed=True) for a in args)
    return b"\x80\x02cbuiltins\n" + func.encode() + b"\n(" + body + b"tR."


@pytest.mark.parametrize("func, n", [("bytearray", 1_500_000_000), ("bytes", 1_500_000_000),
                                     ("bytearray", -1)])
def test_allocation_bombs_are_refused_before_allocating(func, n):
    data = _call(func, n)
    assert len(data) < 40
    tracemalloc.start()
    try:
        with pytest.raises(DB.DragBenchFormatError, match=func):
            DB.restricted_load(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, peak


def test_small_constructor_calls_still_work():
    assert DB.restricted_load(_call("bytearray", 3)) == bytearray(3)
    assert DB.restricted_load(pickle.dumps({"s": {1, 2}, "b": b"x", "c": 1j}, protocol=3)) == \
        {"s": {1, 2}, "b": b"x", "c": 1j}


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_old_protocols_with_python2_names_load(protocol):
    """Found by the fuzzer: protocol 0-2 pickles name builtins ``__builtin__``."""
    obj = {"prompt": "p", "b": b"\x00\xff", "s": {1}, "points": [[1, 2], [3, 4]]}
    assert DB.restricted_load(pickle.dumps(obj, protocol=protocol)) == obj


def _nested(depth: int) -> bytes:
    """``[[[...]]]`` ``depth`` deep, in a few bytes per level."""
    return b"\x80\x04" + b"]" * depth + b"a" * (depth - 1) + b"."


def test_deep_nesting_is_refused_without_recursion():
    with pytest.raises(DB.DragBenchFormatError, match="nested more than"):
        DB.restricted_load(_nested(200_000))


def test_shallow_nesting_and_cycles_load():
    got = DB.restricted_load(_nested(DB.MAX_DEPTH))
    depth = 0
    while got:
        got, depth = got[0], depth + 1
    assert depth == DB.MAX_DEPTH - 1
    cyc: list = [1]
    cyc.append(cyc)
    loaded = DB.restricted_load(pickle.dumps({"a": cyc, "b": cyc, "arr": np.arange(3)}, protocol=4))
    assert loaded["a"] is loaded["b"] and loaded["a"][1] is loaded["a"]
    assert isinstance(loaded["arr"], np.ndarray)


@pytest.mark.parametrize("case", ["deep", "huge-file", "garbage", "empty", "bomb"])
def test_bad_meta_file_names_the_file(tmp_path, case):
    folder = _case(tmp_path / "c", b"")
    meta = folder / DB.META_FILE
    if case == "deep":
        meta.write_bytes(_nested(100_000))
    elif case == "huge-file":
        with open(meta, "wb") as fh:
            fh.truncate(DB.MAX_PICKLE_BYTES + 1)  # sparse: no disk used
    elif case == "garbage":
        meta.write_bytes(b"\x80\x04\x95garbage")
    elif case == "bomb":
        meta.write_bytes(_call("bytearray", 1_500_000_000))
    with pytest.raises(DB.DragBenchFormatError) as info:
        DB.load_case(folder)
    msg = str(info.value)
    assert str(meta) in msg and "\n" not in msg and len(msg) < 400


@pytest.mark.parametrize("case", ["truncated", "garbage", "empty", "folder", "missing", "bomb"])
def test_bad_image_is_a_clean_error(tmp_path, case):
    folder = _case(tmp_path / "c")
    img = folder / DB.IMAGE_FILE
    raw = img.read_bytes()
    img.unlink()
    if case == "truncated":
        img.write_bytes(raw[: len(raw) // 2])
    elif case == "garbage":
        img.write_bytes(b"\x00" * 100)
    elif case == "empty":
        img.write_bytes(b"")
    elif case == "folder":
        img.mkdir()
    elif case == "bomb":
        from test_reliability_inputs import _png_claiming

        _png_claiming(img, 14000, 14000)
    with pytest.raises(DB.DragBenchFormatError) as info:
        DB.load_case(folder)
    assert DB.IMAGE_FILE in str(info.value)


@pytest.mark.parametrize("what", ["missing", "a-file"])
def test_bench_folder_problems_are_one_line(tmp_path, capsys, what):
    bench = tmp_path / "bench"
    if what == "a-file":
        bench.write_text("x")
    code = main(["eval", "dragbench", str(bench), "--edited", str(tmp_path), "--metrics", "dai"])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1


def _scored_bench(tmp_path: Path) -> tuple[Path, Path]:
    bench = tmp_path / "bench"
    _case(bench / "cat" / "c1")
    edited = tmp_path / "edited"
    edited.mkdir()
    Image.new("RGB", (16, 12), (10, 20, 30)).save(edited / "c1.png")
    return bench, edited


def test_eval_json_existing_needs_force_and_is_written_atomically(tmp_path, capsys):
    bench, edited = _scored_bench(tmp_path)
    out = tmp_path / "res.json"
    out.write_text("precious")
    argv = ["eval", "dragbench", str(bench), "--edited", str(edited), "--metrics", "dai",
            "--json", str(out)]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "--force" in err and out.read_text() == "precious"
    assert main(argv + ["--force"]) == 0
    res = json.loads(out.read_text(), parse_constant=lambda c: 1 / 0)
    assert res["summary"]["cases"] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_eval_shapes_json_existing_is_refused_before_any_edit(tmp_path, capsys):
    out = tmp_path / "r.json"
    out.write_text("precious")
    code = main(["eval", "shapes", "--task", "move", "--cases", "1", "--json", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--force" in err and out.read_text() == "precious"


@pytest.mark.parametrize("flag", ["--cases", "--steps", "--jobs"])
def test_eval_shapes_counts_checked_before_any_edit(capsys, flag):
    code = main(["eval", "shapes", "--task", "move", flag, "0"])
    err = capsys.readouterr().err
    assert code == 2 and f"{flag} must be at least 1" in err and len(err.strip().splitlines()) == 1


def test_corrupt_edited_image_is_one_line(tmp_path, capsys):
    bench, edited = _scored_bench(tmp_path)
    (edited / "c1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code = main(["eval", "dragbench", str(bench), "--edited", str(edited), "--metrics", "dai"])
    err = capsys.readouterr().err
    assert code == 2 and "c1.png" in err and len(err.strip().splitlines()) == 1
