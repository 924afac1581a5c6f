"""``diffeditor edit --ray`` (plugins/diffeditor-ray, issue 16) on a local Ray cluster started
here (2 CPUs, 2 worker actors, the shapes model, 2 steps): the same bytes as one process, the
broken spec reported once, a resumed run that does nothing, and a worker process killed mid-batch
whose edits are retried by Ray and finish."""

from __future__ import annotations

import functools
import json
import os
import signal
from pathlib import Path

import pytest
import yaml
from PIL import Image

from diffeditor.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]
SPECS = REPO / "specs"

ray = pytest.importorskip("ray")
runner = pytest.importorskip("diffeditor_ray.runner")


@pytest.fixture(scope="module")
def cluster():
    from diffeditor.plugins import get_registry

    if "shapes" not in get_registry().models:
        pytest.skip("diffeditor-shapes is not installed")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _batch(folder: Path, broken: bool) -> Path:
    """Eight short edits of the example scenes (three share the move scene's image, two the
    drag scene's) in ``folder/specs`` and sub-folders, and with ``broken`` a face spec that
    passes the checks and fails while editing (no face in a blank image)."""
    import shutil

    root = folder / "specs"
    shutil.copytree(SPECS / "assets", root / "assets")
    (root / "more").mkdir()
    edits = {"move": {}, "more/move-left": {"offset": [-12, 4]}, "more/move-up": {"offset": [0, -16]},
             "drag": {}, "more/drag-short": {"targets": [[70, 47]]}, "resize": {}, "paste": {},
             "appearance": {}}
    for name, change in edits.items():
        task = Path(name).name.split("-")[0]
        data = yaml.safe_load((SPECS / f"{task}.yaml").read_text())
        data.update(change, steps=2)
        if "/" in name:
            for key in ("image", "mask", "reference", "reference_mask", "inpaint_mask"):
                if isinstance(data.get(key), str):
                    data[key] = f"../{data[key]}"
        (root / f"{name}.json").write_text(json.dumps(data))
    if broken:
        Image.new("RGB", (128, 128), (120, 130, 140)).save(root / "assets" / "blank.png")
        (root / "no-face.json").write_text(json.dumps({
            "task": "face", "image": "assets/blank.png", "steps": 2,
            "reference": "assets/face/grace_hopper.png"}))
    return root


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


@pytest.fixture(scope="module")
def single(cluster, tmp_path_factory):
    """The batch in one process (the reference bytes)."""
    pytest.importorskip("dlib")
    folder = tmp_path_factory.mktemp("ray")
    specs = _batch(folder, broken=True)
    out = folder / "single"
    code = main(["edit", str(specs), "--model", "shapes", "--out-dir", str(out), "--threads", "1",
                 "-q"])
    assert code == 1
    return specs, out


def test_ray_batch_matches_one_process_reports_the_failure_and_resumes(single, capsys):
    specs, one = single
    capsys.readouterr()
    out = one.parent / "ray"
    argv = ["edit", str(specs), "--model", "shapes", "--out-dir", str(out), "--ray",
            "--workers", "2", "--threads", "1", "-q"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    expected = _pngs(one)
    assert len(expected) == 8 and "no-face.png" not in expected
    assert _pngs(out) == expected  # bit for bit
    failures = [json.loads(ln) for ln in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["name"] for f in failures] == ["no-face"], failures
    assert "8 of 9 edits done (8 written, 0 already done); 1 failed" in err
    assert sum("no-face" in ln and "face" in ln for ln in err.splitlines()) >= 1
    sidecars = [json.loads(p.read_text()) for p in out.rglob("*.json")]
    assert {s["threads"] for s in sidecars} == {1} and all(len(s["spec_hash"]) == 64 for s in sidecars)
    # grouped by source image: one worker inverts the move scene once for its three edits
    cached = sorted(str(p.relative_to(out)) for p in out.rglob("*.json")
                    if json.loads(p.read_text()).get("inversion_cached"))
    assert len(cached) == 3 and all("move" in c or "drag" in c for c in cached), cached

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert main(argv) == 1  # resumed: the broken spec fails again; nothing is edited
    out_text, err = capsys.readouterr()
    assert out_text == ""  # no "written" line
    assert "8 of 9 edits done (0 written, 8 already done); 1 failed" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamps


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_its_edits_finish(single, capsys):
    specs, one = single
    (specs / "no-face.json").unlink()
    out = one.parent / "ray-killed"
    killed: list[int] = []
    seen: list = []

    def kill_once(outcomes, actors, infos):
        seen[:] = outcomes
        if not killed:  # both workers are busy now (six groups still wait): kill one process
            killed.append(infos[0]["pid"])
            os.kill(infos[0]["pid"], signal.SIGKILL)

    args = build_parser().parse_args(["edit", str(specs), "--model", "shapes", "--out-dir",
                                      str(out), "--ray", "--workers", "2", "--threads", "1", "-q"])
    args.ray_runner = functools.partial(runner.run, on_result=kill_once)
    assert args.func(args) == 0, capsys.readouterr().err
    assert killed
    assert _pngs(out) == _pngs(one)
    assert not (out / "failures.jsonl").exists()
    assert len(seen) == 8 and all(o.status in ("written", "skipped") for o in seen)
    pids = {int(o.worker.split()[1]) for o in seen}
    assert len(pids - {killed[0]}) >= 2  # the other worker, and the restarted one (a new process)


def test_ray_option_without_the_plugin_says_what_to_install(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "DIFFEDITOR_DISABLE_PLUGINS": "1"}
    res = subprocess.run([sys.executable, "-m", "diffeditor.cli", "edit", str(SPECS / "move.yaml"),
                          "--ray", "--out-dir", str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "diffeditor: error: --ray needs the diffeditor-ray plugin: pip install "
        "./plugins/diffeditor-ray (and ray)"]
