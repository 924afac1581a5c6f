"""A newcomer's first hour (issue 19): replayable sidecars, the compose command, batch failure
isolation, `edit --check`, `schema TASK`, help texts, a quiet Python API."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffeditor.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]
SPECS = REPO / "specs"
EXAMPLE_TASKS = ["move", "resize", "drag", "appearance", "paste", "compose", "face"]


@pytest.fixture(scope="module")
def shapes_registered():
    from diffeditor.plugins import get_registry

    if "shapes" not in get_registry().models:
        pytest.skip("diffeditor-shapes is not installed")
    from conftest import shapes_model_or_skip

    shapes_model_or_skip()
    return "shapes"


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _paths_in(value, key=""):
    """Every string value of a spec that names a file (keys of the path fields)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths_in(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _paths_in(v, key)
    elif isinstance(value, str) and key in {"image", "mask", "reference", "reference_mask",
                                            "inpaint_mask"}:
        yield value


def _edit_then_replay(spec_path: Path, tmp_path: Path, monkeypatch, capsys, *extra: str):
    """Edit ``spec_path`` from the repository root, then replay its sidecar from another
    folder with ``diffeditor edit OUT.json`` (no --model: the sidecar names it)."""
    out = tmp_path / "first" / "out.png"
    monkeypatch.chdir(REPO)
    code = main(["edit", str(spec_path.relative_to(REPO)) if spec_path.is_relative_to(REPO)
                 else str(spec_path), "--model", "shapes", "--out", str(out), "-q", *extra])
    assert code == 0, capsys.readouterr().err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code = main(["edit", str(out.with_suffix(".json")), "--out", "again.png", "-q"])
    assert code == 0, capsys.readouterr().err
    return out, elsewhere / "again.png"


def _short_spec(task: str, folder: Path, steps: int) -> Path:
    """The example spec of ``task`` with fewer steps, in a copy of specs/ under ``folder``
    (paths still relative to the spec file)."""
    import yaml

    copy = folder / "specs"
    if not copy.is_dir():
        shutil.copytree(SPECS / "assets", copy / "assets")
    data = yaml.safe_load((SPECS / f"{task}.yaml").read_text())
    data["steps"] = steps
    path = copy / f"{task}-{steps}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture()
def short_spec(tmp_path):
    def make(task, steps=3):
        return _short_spec(task, tmp_path, steps)

    return make


# -- replayable sidecars ------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["move", "compose"])
def test_sidecar_replays_bit_identically_from_another_folder(task, shapes_registered, short_spec,
                                                             tmp_path, monkeypatch, capsys):
    out, again = _edit_then_replay(short_spec(task, 2), tmp_path, monkeypatch, capsys)
    assert np.array_equal(_pixels(out), _pixels(again))
    meta = json.loads(out.with_suffix(".json").read_text())
    replay = json.loads(again.with_suffix(".json").read_text())
    assert replay["spec"] == meta["spec"]
    # the sidecar's spec is a valid spec by itself, every path absolute
    from diffeditor.specs import parse_spec

    spec = parse_spec(meta["spec"])
    assert spec.model_dump(mode="json") == meta["spec"]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in _paths_in(meta["spec"]))


def test_sidecar_records_how_to_reproduce(shapes_registered, short_spec, tmp_path,
                                          monkeypatch, capsys):
    from diffeditor.models import content_hash
    from diffeditor.plugins import get_registry

    spec = short_spec("drag", steps=2)
    out = tmp_path / "d.png"
    monkeypatch.chdir(REPO)
    assert main(["edit", str(spec), "--model", "shapes", "--out", str(out), "-q"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["command_line"] == f"diffeditor edit {spec} --model shapes --out {out} -q"
    assert meta["spec_path"] == str(spec)
    assert meta["timestamp"].endswith("+00:00") and meta["timestamp"][:4].isdigit()
    assert meta["model_hash"] == content_hash(get_registry().models["shapes"].location)
    assert meta["model_hash"].startswith("sha256:") and len(meta["model_hash"]) == 71
    assert meta["plugins"]["diffeditor"] and meta["plugins"]["diffeditor-shapes"]
    assert len(meta["plan"]["handles_work_px"]) == 1


def test_model_hash_sees_content(tmp_path):
    from diffeditor.models import content_hash

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "w.bin").write_bytes(b"abc")
    first = content_hash(tmp_path)
    assert content_hash(tmp_path) == first
    (tmp_path / "unet" / "w.bin").write_bytes(b"abd")
    assert content_hash(tmp_path) != first


def test_compose_from_the_command_line_and_its_replay(shapes_registered, tmp_path, monkeypatch,
                                                      capsys):
    """`diffeditor compose IMAGE --edit JSON --edit FILE`: inline paths relative to the current
    folder, a file's relative to that file; the sidecar replays from another folder."""
    work = tmp_path / "work"
    shutil.copytree(SPECS / "assets" / "compose", work / "assets")
    (work / "edits").mkdir()
    (work / "edits" / "look.yaml").write_text(
        "task: appearance\nmask: ../assets/square_mask.png\nreference: ../assets/reference.png\n"
        "reference_mask: ../assets/reference_mask.png\n")
    monkeypatch.chdir(work)
    code = main(["compose", "assets/source.png", "--edit",
                 '{"task": "move", "mask": "assets/circle_mask.png", "offset": [20, 0]}',
                 "--edit", "edits/look.yaml", "--steps", "3", "--model", "shapes",
                 "--out", "composed.png", "-q"])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((work / "composed.json").read_text())
    assert [e["task"] for e in meta["spec"]["edits"]] == ["move", "appearance"]
    paths = list(_paths_in(meta["spec"]))
    assert len(paths) == 5 and all(Path(p).is_absolute() and Path(p).is_file() for p in paths)
    assert set(meta["plan"]) == {"edit:0", "edit:1"} and meta["plan"]["edit:1"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["edit", str(work / "composed.json"), "--out", "again.png", "-q"]) == 0
    assert np.array_equal(_pixels(work / "composed.png"), _pixels(elsewhere / "again.png"))


@pytest.mark.parametrize("bad, words", [
    ('{"task": "move", "mask": ', "not valid JSON"),
    ("nowhere.yaml", "spec file not found"),
    ('{"task": "move", "mask": "nope.png"}', "file not found"),
])
def test_compose_edit_errors_are_one_line(bad, words, tmp_path, monkeypatch, capsys):
    shutil.copy(SPECS / "assets/compose/source.png", tmp_path / "s.png")
    monkeypatch.chdir(tmp_path)
    code = main(["compose", "s.png", "--edit", bad, "--model", "shapes", "--out", "o.png"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("task", EXAMPLE_TASKS)
def test_every_example_spec_replays_bit_identically(task, shapes_registered, tmp_path,
                                                    monkeypatch, capsys):
    """Acceptance: `diffeditor edit OUT.json` reproduces OUT.png bit for bit, on CPU, for every
    task's example spec, from another working directory."""
    if task == "face":
        pytest.importorskip("dlib")
    # the example spec at 12 steps (as tests/data/spec_hashes.json: every window of the schedule
    # non-empty); bit-identical replay does not depend on the count, and the README's
    # `edit specs/move.yaml` + `edit moved.json` replays one at its full 50
    spec = _short_spec(task, tmp_path / "spec", 12)
    out, again = _edit_then_replay(spec, tmp_path, monkeypatch, capsys)
    assert np.array_equal(_pixels(out), _pixels(again)), task
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["plan"], f"{task}: the sidecar's plan is empty"
    assert meta["spec_path"] == str(spec)


# -- batches ------------------------------------------------------------------------------------

def test_a_spec_failing_while_editing_does_not_stop_the_batch(shapes_registered, short_spec,
                                                              tmp_path, capsys):
    pytest.importorskip("dlib")
    Image.new("RGB", (128, 128), (120, 130, 140)).save(tmp_path / "blank.png")
    face = tmp_path / "face.json"  # valid before the model loads; no face found while editing
    face.write_text(json.dumps({"task": "face", "image": "blank.png", "steps": 2,
                                "reference": str(SPECS / "assets/face/grace_hopper.png")}))
    specs = [short_spec("move", 2), face, short_spec("drag", 2)]
    code = main(["edit", *map(str, specs), "--model", "shapes", "--out-dir",
                 str(tmp_path / "out")])  # with progress bars: each names its spec
    out, err = capsys.readouterr()
    assert code == 1, err
    # named by their paths below the specs' common folder (tmp_path)
    assert f"[1/3] specs/{specs[0].stem}: inversion" in err
    assert f"[3/3] specs/{specs[2].stem}: editing" in err
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert written == sorted([f"specs/{specs[0].stem}.png", f"specs/{specs[2].stem}.png"])
    lines = [ln.split("\r")[-1].strip() for ln in err.strip().splitlines()]  # past the bars
    failure = [ln for ln in lines if "[2/3] face failed" in ln]
    assert len(failure) == 1 and "face" in failure[0], err
    assert "Traceback" not in err
    assert lines[-1] == (f"2 of 3 edits done (2 written, 0 already done); 1 failed: see "
                         f"{tmp_path / 'out' / 'failures.jsonl'}")
    failures = [json.loads(ln) for ln in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert [f["name"] for f in failures] == ["face"] and "[2/3] face" in failures[0]["error"]


# -- edit --check, schema TASK ------------------------------------------------------------------

def test_edit_check_prints_every_field_and_its_source_without_loading(monkeypatch, capsys,
                                                                     tmp_path):
    import diffeditor.editor
    import diffeditor.models

    def no_loading(*a, **k):
        raise AssertionError("--check must not load a model")

    monkeypatch.setattr(diffeditor.models, "load_pipeline", no_loading)
    monkeypatch.setattr(diffeditor.editor, "load_pipeline", no_loading)
    spec = tmp_path / "move.yaml"  # the example, plus a field the model has a default for
    spec.write_text((SPECS / "move.yaml").read_text().replace("assets/", f"{SPECS}/assets/")
                    + "guidance_scale: 2.5\n")
    code = main(["edit", "--check", str(spec), "--model", "shapes"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = {ln.split()[0]: ln for ln in out.splitlines()[1:]}
    from diffeditor.plugins import get_registry

    fields = get_registry().tasks["move"].spec_model.model_fields
    assert set(rows) == set(fields)
    assert rows["offset"].endswith("[spec]") and "[16.0, -13.0]" in rows["offset"]
    assert rows["guidance_scale"].endswith("[spec]") and " 2.5 " in rows["guidance_scale"]
    assert rows["energy_scale"].endswith("[model shapes]") and " 1000.0 " in rows["energy_scale"]
    assert rows["seed"].endswith("[default of task move]") and " 42 " in rows["seed"]


def test_edit_check_reports_a_bad_spec_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: move\nimage: nope.png\nmask: nope.png\n")
    code = main(["edit", "--check", str(bad), "--model", "shapes"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "image" in err


def test_schema_of_one_task(capsys):
    from diffeditor.plugins import get_registry

    assert main(["schema", "drag"]) == 0
    schema = json.loads(capsys.readouterr().out)
    expected = get_registry().tasks["drag"].spec_model.model_json_schema()
    assert schema["properties"] == expected["properties"] and "handles" in schema["required"]
    assert main(["schema", "teleport"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'teleport'" in err and len(err.strip().splitlines()) == 1


# -- help texts ---------------------------------------------------------------------------------

def _subparsers(parser: argparse.ArgumentParser, prefix=""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix}{name}", sub
                yield from _subparsers(sub, f"{prefix}{name} ")


def test_every_command_and_option_is_described_in_plain_text():
    parser = build_parser()
    commands = dict(_subparsers(parser))
    assert {"edit", "schema", "bench", "download", "demo", "move", "compose", "eval shapes"} <= set(commands)
    problems = []
    for name, sub in commands.items():
        if not (sub.description or "").strip():
            problems.append(f"{name}: no description")
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                problems.append(f"{name} {action.option_strings or action.dest}: no help")
        text = sub.format_help()
        for markup in ("``", ":class:", ":func:", ":meth:"):
            if markup in text:
                problems.append(f"{name}: reST markup {markup!r} in the help")
    assert not problems, "\n".join(problems)


def test_task_options_show_effective_defaults_and_required_ones():
    commands = dict(_subparsers(build_parser()))
    move = {a.dest: a for a in commands["move"]._actions}
    assert move["mask"].required and "required" in move["mask"].help
    assert not move["offset"].required
    assert "default: 4.0" in move["guidance_scale"].help
    assert "with --model shapes: 1.0" in move["guidance_scale"].help  # the model's card
    drag = {a.dest: a for a in commands["drag"]._actions}
    assert drag["handles"].required and drag["targets"].required
    compose = {a.dest: a for a in commands["compose"]._actions}
    assert compose["edits"].required and compose["edits"].option_strings == ["--edit"]


def test_models_lists_each_models_defaults(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "default guidance_scale = 1.0" in out


# -- the Python API -----------------------------------------------------------------------------

def test_python_api_is_quiet_by_default(shapes_registered):
    code = ("from diffeditor import Editor\n"
            "Editor.from_pretrained('shapes', device='cpu')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", res.stderr


def test_dir_of_the_package_names_the_api():
    import diffeditor

    names = dir(diffeditor)
    assert {"Editor", "EditResult", "parse_spec", "SpecError", "Task", "__version__"} <= set(names)
    for name in diffeditor.__all__:
        assert getattr(diffeditor, name) is not None


# -- bench and eval -----------------------------------------------------------------------------

def test_bench_warns_when_repeats_vary_widely():
    from diffeditor.bench import SPREAD_WARNING, _spread_warning

    assert _spread_warning({"edit": [10.0, 11.0, 12.0], "plain generation": [3.0, 3.1]}) is None
    assert _spread_warning({"edit": [10.0]}) is None
    text = _spread_warning({"edit": [12.47, 431.6, 13.0], "plain generation": [3.0, 3.1]})
    assert text is not None and "34.6x in edit" in text and "plain" not in text
    edge = 10.0 * SPREAD_WARNING
    assert _spread_warning({"edit": [10.0, edge]}) is None
    assert _spread_warning({"edit": [10.0, edge * 1.01]}) is not None


@pytest.mark.slow
def test_eval_shapes_saves_images_and_shows_progress_from_the_start(shapes_registered, tmp_path,
                                                                    capsys):
    pytest.importorskip("diffeditor_eval")
    out = tmp_path / "imgs"
    code = main(["eval", "shapes", "--task", "move", "--cases", "1", "--steps", "3",
                 "--save-images", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    lines = err.strip().splitlines()
    assert lines[0].startswith("eval shapes: 1 edits (move x 1 cases x 1 ablation(s)) on shapes")
    assert lines[1].startswith("[1/1] full")
    names = sorted(p.name for p in (out / "full").iterdir())
    assert names == ["move-0000-source.png", "move-0000-truth.png", "move-0000-vae.png",
                     "move-0000.png"]
    # a folder that already holds pictures is refused before any work
    code = main(["eval", "shapes", "--task", "move", "--cases", "1", "--save-images", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "not an empty folder" in err and len(err.strip().splitlines()) == 1


def test_outputs_get_the_usual_file_mode(tmp_path):
    from diffeditor.imageio import save_image, save_json

    old = os.umask(0o022)
    try:
        save_json({"a": 1}, tmp_path / "a.json")
        save_image(Image.new("RGB", (4, 4)), tmp_path / "a.png")
        os.umask(0o077)
        save_json({"a": 1}, tmp_path / "b.json")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600


def test_a_sidecar_like_mapping_with_a_bad_task_is_one_clear_error():
    from diffeditor.errors import SpecError
    from diffeditor.specs import parse_spec

    with pytest.raises(SpecError, match="task: must be a task name"):
        parse_spec({"task": {"name": "move"}, "image": "x.png"})


def test_a_model_folder_is_named_absolutely_in_the_sidecar(shapes_model, tmp_path, monkeypatch):
    from diffeditor import Editor

    monkeypatch.chdir(shapes_model.parent)
    editor = Editor.from_pretrained(shapes_model.name, device="cpu")
    assert editor.model == str(shapes_model.absolute())
