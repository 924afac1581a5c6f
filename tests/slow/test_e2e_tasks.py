"""End to end on the trained shapes model, through the public CLI and API: each task's example
spec runs, and the edits happen (with scenes whose right answer is known)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffeditor.cli import main

REPO = Path(__file__).resolve().parents[2]
SPECS = REPO / "specs"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shapes_registered():
    from diffeditor.plugins import get_registry

    if "shapes" not in get_registry().models:
        pytest.skip("diffeditor-shapes is not installed")
    return "shapes"


@pytest.mark.parametrize("task", ["move", "resize", "drag", "appearance", "paste", "compose"])
def test_example_spec_runs_through_the_cli(task, tmp_path, shapes_registered, capsys):
    import yaml

    # 12 steps, as tests/data/spec_hashes.json: every window of the schedule is non-empty, and
    # nothing checked here depends on the count; the specs as written (the model's 50 steps)
    # run in tests/slow/test_readme_commands_run.py (`diffeditor edit specs/*.yaml`)
    data = yaml.safe_load((SPECS / f"{task}.yaml").read_text())
    data["steps"] = 12
    shutil.copytree(SPECS / "assets", tmp_path / "specs" / "assets")
    spec = tmp_path / "specs" / f"{task}.json"
    spec.write_text(json.dumps(data))
    out = tmp_path / f"{task}.png"
    code = main(["edit", str(spec), "--model", "shapes", "--device", "cpu",
                 "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert out.is_file() and out.with_suffix(".json").is_file()
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["spec"]["task"] == task and meta["seed"] == 42 and meta["model"] == "shapes"
    assert {"diffeditor", "torch", "diffusers"} <= set(meta["versions"])
    assert meta["timings_s"]["wall"] > 0
    src = Image.open(SPECS / "assets" / (task if task != "compose" else "compose") / "source.png")
    assert Image.open(out).size == src.size


def test_face_spec_runs_on_real_photographs(tmp_path, shapes_registered, capsys):
    pytest.importorskip("dlib")
    import yaml

    # 12 steps (the landmarks are found before any step); face.yaml as written runs in
    # tests/slow/test_readme_commands_run.py
    data = yaml.safe_load((SPECS / "face.yaml").read_text())
    data["steps"] = 12
    shutil.copytree(SPECS / "assets", tmp_path / "specs" / "assets")
    spec = tmp_path / "specs" / "face.json"
    spec.write_text(json.dumps(data))
    out = tmp_path / "face.png"
    code = main(["edit", str(spec), "--model", "shapes", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    meta = json.loads(out.with_suffix(".json").read_text())
    assert len(meta["plan"]["handles_work_px"]) == 68


def test_face_without_a_face_is_one_clear_line(tmp_path, shapes_registered, capsys):
    pytest.importorskip("dlib")
    Image.new("RGB", (256, 256), (120, 130, 140)).save(tmp_path / "blank.png")
    shutil.copy(SPECS / "assets/face/grace_hopper.png", tmp_path / "ref.png")
    (tmp_path / "s.yaml").write_text("task: face\nimage: blank.png\nreference: ref.png\n")
    code = main(["edit", str(tmp_path / "s.yaml"), "--model", "shapes", "--out", str(tmp_path / "o.png"), "-q"])
    err = capsys.readouterr().err
    assert code != 0 and "no face found" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()


def _case(task: str, seed: int, tmp: Path):
    from diffeditor_shapes.scenes import make_case, save_case

    case = make_case(task, seed)
    return case, save_case(case, tmp)


def _subject(img: np.ndarray, rgb) -> np.ndarray:
    from diffeditor_shapes.scenes import subject_mask_by_colour

    return subject_mask_by_colour(img, rgb, 70.0)


def test_move_moves_the_subject_and_keeps_the_rest(editor_shapes, tmp_path):
    from diffeditor_shapes.scenes import centroid, dilate, psnr

    case, spec = _case("move", 1, tmp_path)
    out = np.asarray(editor_shapes.edit(spec).image)
    found = _subject(out, case.subject_rgb)
    c = centroid(found)
    src, dst = centroid(case.mask), centroid(case.result_mask)
    assert c is not None
    assert math.dist(c, dst) < math.dist(c, src), (c, src, dst)
    outside = ~dilate(case.mask | case.result_mask, 4)
    # the area outside the edit stays as close to the original as the VAE round trip allows
    import torch

    eng = editor_shapes.engine
    x = torch.from_numpy(case.source.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    vae = ((eng.decode(eng.encode_image(x))[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255)
    ceiling = psnr(vae.astype(np.uint8), case.source, outside)
    assert psnr(out, case.source, outside) > ceiling - 2.0


def test_appearance_moves_colour_toward_the_reference(editor_shapes, tmp_path):
    from diffeditor_shapes.scenes import PALETTE

    case, spec = _case("appearance", 2, tmp_path)
    out = np.asarray(editor_shapes.edit(spec).image).astype(float)
    src = np.asarray(case.source).astype(float)
    inside = case.mask
    target = np.asarray(PALETTE[case.result_colour], float)
    before = np.linalg.norm(src[inside].mean(0) - target)
    after = np.linalg.norm(out[inside].mean(0) - target)
    assert after < before, (before, after)


def test_paste_brings_the_object_colour_to_the_target(editor_shapes, tmp_path):
    """The destination's colour moves toward the pasted object's (on this small model pastes
    rarely land exactly: see docs/quality.md)."""
    from diffeditor_shapes.scenes import PALETTE

    case, spec = _case("paste", 3, tmp_path)
    out = np.asarray(editor_shapes.edit(spec).image).astype(float)
    src = np.asarray(case.source).astype(float)
    dst = case.result_mask
    target = np.asarray(PALETTE[case.result_colour], float)
    before = np.linalg.norm(src[dst].mean(0) - target)
    after = np.linalg.norm(out[dst].mean(0) - target)
    assert after < before - 10, (before, after)


def _dilated(mask, r):
    from diffeditor_shapes.scenes import dilate

    return dilate(mask, r)


def test_batch_reuses_one_inversion(tmp_path, shapes_registered, capsys):
    spec = json.loads(json.dumps({"task": "move", "image": str(SPECS / "assets/move/source.png"),
                                  "mask": str(SPECS / "assets/move/mask.png"),
                                  "prompt": "a small purple circle and a small green circle on a gradient background",
                                  "steps": 10}))
    paths = []
    for k, dx in enumerate((10, 20)):
        p = tmp_path / f"s{k}.json"
        p.write_text(json.dumps({**spec, "offset": [dx, 0]}))
        paths.append(str(p))
    code = main(["edit", *paths, "--model", "shapes", "--out-dir", str(tmp_path / "out"), "-q"])
    assert code == 0, capsys.readouterr().err
    metas = [json.loads((tmp_path / "out" / f"s{k}.json").read_text()) for k in range(2)]
    assert [m["inversion_cached"] for m in metas] == [False, True]
    assert metas[1]["timings_s"]["inversion"] == 0.0


def test_readme_python_example_runs(tmp_path, shapes_registered, monkeypatch):
    """The README's Python block, executed as written (from the repo root)."""
    text = (REPO / "README.md").read_text()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(REPO)
    block = block.replace('"moved.png"', repr(str(tmp_path / "moved.png")))
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "moved.png").is_file()
    assert namespace["again"].metadata["inversion_cached"] is True


def test_dragbench_sample_runs_through_the_cli(tmp_path, shapes_registered, capsys):
    """Every DragBench sample case (real photos, odd sizes, zero-length and long drags)."""
    from conftest import SHARED

    root = SHARED / "data" / "dragbench-sample"
    if not root.is_dir():
        pytest.skip(f"DragBench sample not found at {root}")
    from diffeditor_eval.dragbench import case_to_spec, iter_dragbench

    specs = []
    for case in iter_dragbench(root):
        folder = tmp_path / "cases" / f"{case.category}-{case.name}"
        spec = case_to_spec(case, folder)
        spec["steps"] = 8  # the path, not the quality, is under test here
        path = folder / "spec.json"
        path.write_text(json.dumps(spec))
        specs.append(str(path))
    assert len(specs) == 10
    outs = tmp_path / "out"
    code = main(["edit", *specs, "--model", "shapes", "--out-dir", str(outs), "-q"])
    assert code == 0, capsys.readouterr().err
    pngs = sorted(outs.glob("*/spec.png"))  # named by the spec's path below the common folder
    assert len(pngs) == 10
    for spec_path, png in zip(sorted(specs), pngs):
        src = json.loads(Path(spec_path).read_text())
        img = Image.open(Path(spec_path).parent / src["image"])
        assert Image.open(png).size == img.size


def test_demo_writes_its_outputs(tmp_path, shapes_registered, capsys):
    code = main(["demo", "--out-dir", str(tmp_path), "--steps", "10", "--quiet"])
    assert code == 0, capsys.readouterr().err
    for name in ("source", "moved", "dragged", "vae_only", "side_by_side"):
        assert (tmp_path / f"{name}.png").is_file()
    out, err = capsys.readouterr()
    assert "VAE alone" in err
    assert "side_by_side" in out
    # the strict scores of its own edits, written and printed, on the stated scenes
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["seed"] == 100 and "make_case" in scores["rule"]
    for name in ("move", "drag"):
        assert scores["edits"][name]["looks_right"] in (0.0, 1.0)
        assert f"strict: {name} (seed 100, " in out


def test_eval_shapes_scores_and_reproduces(tmp_path, shapes_registered, capsys):
    """`diffeditor eval shapes` prints its table, writes JSON, and reruns give the same numbers."""
    args = ["eval", "shapes", "--task", "move", "--task", "appearance", "--cases", "1", "--steps", "6",
            "--ablation", "full", "--ablation", "no_time_travel"]
    assert main([*args, "--json", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "| full | move |" in out and "| no_time_travel | appearance |" in out
    assert main([*args, "--json", str(tmp_path / "b.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    keys = ("iou", "centroid_error_px", "colour_error", "psnr_outside_db", "land", "vae_psnr_outside_db")
    for ra, rb in zip(a["cases"], b["cases"]):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}
    assert set(a["summary"]) == {"full", "no_time_travel"}
    assert 0 <= a["summary"]["full"]["move"]["iou"] <= 1


def test_score_case_on_the_true_result_is_perfect():
    from diffeditor_eval.shapes_eval import score_case
    from diffeditor_shapes.scenes import make_case

    for task in ("move", "drag", "paste", "appearance", "resize"):
        case = make_case(task, 5)
        s = score_case(case, case.result)
        assert s["land"] == 1.0 and s["iou"] > 0.95 and s["centroid_error_px"] < 1.0, (task, s)


def test_bench_prints_one_json_line(shapes_registered, capsys):
    code = main(["bench", "--model", "shapes", "--device", "cpu", "--task", "drag", "--steps", "6",
                 "--reference-settings", "--repeats", "1"])
    assert code == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 1
    row = json.loads(lines[0])
    for key in ("device", "dtype", "resolution", "task", "seconds_per_edit", "seconds_per_reedit",
                "plain_generation_seconds", "ratio", "peak_memory_gib", "unet_forward",
                "unet_partial_forward", "unet_backward"):
        assert key in row, key
    assert row["task"] == "drag" and row["resolution"] == 128 and row["reedit_inversion_cached"]
    assert row["guidance_scale"] == 4.0 and row["unet_forward"] > 6
    assert row["repeats"] == 1 and row["merged_reference_passes"] > 0 and row["peak_rss_gib"] > 0
    assert row["fast_path"]["merge_reference_pass"] and row["fast_path"]["compile"] is None


def test_bench_switches_and_several_resolutions(shapes_registered, capsys):
    code = main(["bench", "--model", "shapes", "--device", "cpu", "--task", "move", "--steps", "4",
                 "--repeats", "1", "--resolution", "128", "64", "--no-merge", "--attention-slice", "16",
                 "--region-grads", "batched"])
    assert code == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert [r["resolution"] for r in rows] == [128, 64]
    for r in rows:
        assert r["merged_reference_passes"] == 0 and r["unet_partial_forward"] > 0
        assert r["fast_path"]["attention_slice"] == 16 and r["fast_path"]["batched_region_grads"]


def test_bench_ablation_alternates_a_switch(shapes_registered, capsys):
    code = main(["bench", "--model", "shapes", "--device", "cpu", "--task", "drag", "--steps", "3",
                 "--repeats", "1", "--ablate", "merge", "region-grads"])
    assert code == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert [r["switch"] for r in rows] == ["merge", "region-grads"]
    for r in rows:
        assert r["seconds_per_reedit_on"] > 0 and r["seconds_per_reedit_off"] > 0 and r["speedup"] > 0


def test_compose_of_one_edit_is_that_edit(editor_shapes, tmp_path):
    """A compose spec holding one move gives the move alone, pins included (the shapes
    model's defaults hold the moved object to the warped inversion early in the run)."""
    from conftest import write_disc_scene

    write_disc_scene(tmp_path)
    # the sampler's own fields (guidance_region...) are the compose spec's: the shapes model's
    # move-only default (global guidance) does not reach a compose, so both name the same one
    base = {"image": "i.png", "steps": 8, "prompt": "compose-one", "guidance_region": "regional"}
    move = {"task": "move", "mask": "m.png", "offset": [30, 0]}
    alone = editor_shapes.edit({**base, **move}, base_dir=tmp_path)
    assert alone.metadata["spec"]["object_blend"] > 0  # a pinned edit
    composed = editor_shapes.edit({**base, "task": "compose", "edits": [move]}, base_dir=tmp_path)
    torch.testing.assert_close(composed.latent, alone.latent, atol=1e-6, rtol=1e-6)
