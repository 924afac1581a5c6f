"""Outputs as one unit (issue 14): the image and its sidecar are committed together (both or
neither), temp files never stay behind, files get the umask's mode (not 0600), sidecars are
strict JSON, a full disk is one line, an output is never overwritten without --force even by a
racing process, and two processes cannot aim at the same output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffeditor.cli import main
from diffeditor.errors import OutputError
from diffeditor.imageio import (
    atomic_write_many,
    json_bytes,
    reserve_outputs,
    save_image_and_sidecar,
)

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_get_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_image_and_sidecar(IMAGE, {"a": 1}, tmp_path / "o.png")
    finally:
        os.umask(old)
    for name in ("o.png", "o.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), np.float32("nan")])
def test_sidecar_is_strict_json(tmp_path, value):
    save_image_and_sidecar(IMAGE, {"ratio": {"max": value}, "ok": [1.5, value]}, tmp_path / "o.png")

    def no_constants(name):
        raise AssertionError(f"non-JSON constant {name}")

    data = json.loads((tmp_path / "o.json").read_text(), parse_constant=no_constants)
    assert data == {"ratio": {"max": None}, "ok": [1.5, None]}


def test_json_bytes_round_trip():
    assert json.loads(json_bytes({"x": [1, 2.5, "s", None, True]})) == {"x": [1, 2.5, "s", None, True]}


# a real full disk, as far as the process can tell: RLIMIT_FSIZE makes writes past the limit
# fail with EFBIG (SIGXFSZ ignored), in a child process
FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    import numpy as np
    from PIL import Image
    from diffeditor.errors import OutputError
    from diffeditor.imageio import save_image_and_sidecar
    folder, case = Path(sys.argv[1]), sys.argv[2]
    if case == "image":   # noise: a big PNG, over the limit
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
        meta = {"a": 1}
    else:                 # a small PNG, a sidecar over the limit
        image, meta = Image.new("RGB", (16, 16)), {"pad": "x" * 50000}
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
    try:
        save_image_and_sidecar(image, meta, folder / "o.png")
    except OutputError as exc:
        print("ERR", exc)
        sys.exit(2)
""")


@pytest.mark.parametrize("case", ["image", "sidecar"])
def test_full_disk_leaves_neither_file_and_no_temp(tmp_path, case):
    r = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path), case],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stdout.startswith("ERR cannot write") and "File too large" in r.stdout
    assert len(r.stdout.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither file, no temp


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, RuntimeError])
def test_interrupt_while_writing_leaves_nothing(tmp_path, exc):
    def second(fh):
        fh.write(b"partial")
        raise exc()

    with pytest.raises(exc):
        atomic_write_many([(tmp_path / "a.png", lambda fh: fh.write(b"one")),
                           (tmp_path / "a.json", second)], force=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_appearing_meanwhile_is_not_overwritten(tmp_path):
    """Another process creates the output while ours is writing: without --force ours fails
    and theirs stays (the commit is a hard link, which never replaces a file)."""
    target = tmp_path / "o.png"

    def racing(fh):
        target.write_bytes(b"theirs")
        fh.write(b"ours")

    with pytest.raises(OutputError, match="created by someone else meanwhile"):
        atomic_write_many([(target, racing)], force=False)
    assert target.read_bytes() == b"theirs" and _leftovers(tmp_path) == []


def test_second_file_racing_rolls_back_the_first(tmp_path):
    side = tmp_path / "o.json"

    def racing(fh):
        side.write_bytes(b"theirs")
        fh.write(b"{}")

    with pytest.raises(OutputError):
        atomic_write_many([(tmp_path / "o.png", lambda fh: fh.write(b"png")), (side, racing)],
                          force=False)
    assert not (tmp_path / "o.png").exists() and side.read_bytes() == b"theirs"
    assert _leftovers(tmp_path) == []


def test_stale_temp_of_a_killed_process_is_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".o.png.{dead.pid}.abc123.tmp"
    stale.write_bytes(b"")
    live = tmp_path / f".o.png.{os.getppid()}.def456.tmp"  # a running process's: kept
    live.write_bytes(b"")
    save_image_and_sidecar(IMAGE, {}, tmp_path / "o.png")
    assert not stale.exists() and live.exists()


def test_output_that_is_a_folder_even_with_force(tmp_path):
    (tmp_path / "o.png").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        save_image_and_sidecar(IMAGE, {}, tmp_path / "o.png", force=True)


def test_second_process_for_the_same_output_fails_at_once(tmp_path, capsys):
    img = np.full((64, 64, 3), 100, np.uint8)
    Image.fromarray(img).save(tmp_path / "i.png")
    m = np.zeros((64, 64), np.uint8)
    m[10:30, 10:30] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    (tmp_path / "s.yaml").write_text("task: move\nimage: i.png\nmask: m.png\noffset: [5, 0]\n")
    out = tmp_path / "out" / "o.png"
    with reserve_outputs([out]):  # the first process, busy editing
        code = main(["edit", str(tmp_path / "s.yaml"), "--model", str(tmp_path), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "another diffeditor process is writing" in err
    assert len(err.strip().splitlines()) == 1
    # the lock file is gone once released, and the folder made for it too (nothing was written)
    assert not out.parent.exists()


@pytest.mark.slow
def test_cli_edit_writes_both_files_with_standard_modes(shapes_model, tmp_path, capsys, caplog):
    """End to end on the small model: image and sidecar, 0644-ish, strict JSON, nothing left."""
    from conftest import write_disc_scene

    write_disc_scene(tmp_path)
    (tmp_path / "s.yaml").write_text("task: move\nimage: i.png\nmask: m.png\noffset: [10, 0]\n"
                                     "steps: 4\nprompt: a red square\n")
    out = tmp_path / "out" / "o.png"
    old = os.umask(0o022)
    try:
        code = main(["edit", str(tmp_path / "s.yaml"), "--model", str(shapes_model), "--device",
                     "cpu", "--out", str(out), "-q", "--cache-dir", str(tmp_path / "s.yaml")])
    finally:
        os.umask(old)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "cannot write the inversion cache" in caplog.text  # a file as cache: a warning only
    for p in (out, out.with_suffix(".json")):
        assert p.stat().st_mode & 0o777 == 0o644
    json.loads(out.with_suffix(".json").read_text(), parse_constant=lambda c: 1 / 0)
    assert _leftovers(out.parent) == []


SIGTERM_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from diffeditor.cli import _exit_cleanly_on_sigterm
    from diffeditor.imageio import atomic_write_many
    _exit_cleanly_on_sigterm()
    folder = Path(sys.argv[1])
    def slow(fh):
        fh.write(b"partial")
        fh.flush()
        print("writing", flush=True)
        time.sleep(60)
    try:
        atomic_write_many([(folder / "o.png", slow), (folder / "o.json", slow)], force=False)
    except KeyboardInterrupt:
        sys.exit(130)
""")


def test_sigterm_while_writing_leaves_no_temp_file(tmp_path):
    import signal

    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_WRITER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert [p.name for p in tmp_path.iterdir()]  # the temp file exists now
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    assert list(tmp_path.iterdir()) == []


def test_forced_write_failing_on_the_second_file_restores_the_first(tmp_path):
    """With --force, if the sidecar cannot be committed, the image it replaced comes back."""
    (tmp_path / "o.png").write_bytes(b"old image")
    side = tmp_path / "o.json"
    side.write_bytes(b"old sidecar")

    def sidecar(fh):  # meanwhile the sidecar's name becomes a folder: its commit fails
        side.unlink()
        side.mkdir()
        fh.write(b"{}")

    with pytest.raises(OutputError):
        atomic_write_many([(tmp_path / "o.png", lambda fh: fh.write(b"new image")),
                           (side, sidecar)], force=True)
    assert (tmp_path / "o.png").read_bytes() == b"old image"
    assert _leftovers(tmp_path) == []


def test_forced_write_replaces_both(tmp_path):
    (tmp_path / "o.png").write_bytes(b"old")
    (tmp_path / "o.json").write_bytes(b"old")
    save_image_and_sidecar(IMAGE, {"n": 1}, tmp_path / "o.png", force=True)
    assert json.loads((tmp_path / "o.json").read_text()) == {"n": 1}
    assert Image.open(tmp_path / "o.png").size == (64, 64)
    assert _leftovers(tmp_path) == []
