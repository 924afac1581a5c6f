"""Specs and the command line: validation messages, schema drift, listing commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffeditor.cli import main
from diffeditor.errors import SpecError
from diffeditor.specs import json_schema, parse_spec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def scene(tmp_path: Path) -> Path:
    img = np.full((128, 128, 3), 128, np.uint8)
    img[40:80, 20:60] = (220, 40, 40)
    Image.fromarray(img).save(tmp_path / "image.png")
    mask = np.zeros((128, 128), np.uint8)
    mask[40:80, 20:60] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(np.zeros((64, 64), np.uint8) + 255).save(tmp_path / "small_mask.png")
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(tmp_path / "empty.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "image.png").read_bytes()[:200])
    return tmp_path


def _spec(folder: Path, **fields) -> Path:
    data = {"task": "move", "image": "image.png", "mask": "mask.png", "offset": [20, 0]}
    data.update(fields)
    data = {k: v for k, v in data.items() if v is not None}
    path = folder / "spec.json"
    path.write_text(json.dumps(data))
    return path


def _run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "fields, field_name, words",
    [
        ({"colour": "red"}, "colour", "Extra inputs are not permitted"),
        ({"offset": "left"}, "offset", "valid"),
        ({"scale": -1}, "scale", "greater than or equal to 0.01"),
        ({"guidance_scale": 100}, "guidance_scale", "less than or equal"),
        ({"mask": "nope.png"}, "mask", "file not found"),
        ({"steps": 1.5}, "steps", "integer"),
        ({"task": "teleport"}, "task", "unknown task"),
        ({"schedule": {"sde": {"start": 0.5, "stop": 0.1}}}, "schedule.sde", "must not exceed"),
        ({"memory_bank": "masked"}, "memory_bank", "task 'move' names none"),
    ],
)
def test_malformed_spec_one_clear_line(scene, capsys, tmp_path, fields, field_name, words):
    spec = _spec(scene, **fields)
    code, out, err = _run_cli(capsys, "edit", str(spec), "--model", str(scene), "--out", str(tmp_path / "o.png"))
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1, err
    assert field_name in lines[0] and words in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize(
    "fields, field_name, words",
    [
        ({"mask": "small_mask.png"}, "mask", "must have the image's size"),
        ({"mask": "empty.png"}, "mask", "empty"),
        ({"image": "truncated.png"}, "image", "cannot read image"),
    ],
)
def test_bad_inputs_are_caught_before_model_loading(scene, capsys, tmp_path, fields, field_name, words):
    spec = _spec(scene, **fields)
    # the model folder holds no model: the input check must fail before loading it
    code, _, err = _run_cli(capsys, "edit", str(spec), "--model", str(scene),
                            "--out", str(tmp_path / "o.png"))
    assert code != 0 and "Traceback" not in err
    assert field_name in err and words in err, err


def test_drag_points_checked(scene, capsys, tmp_path):
    data = {"task": "drag", "image": "image.png", "mask": "mask.png",
            "handles": [[10, 10], [500, 10]], "targets": [[20, 20], [30, 30]]}
    (scene / "d.json").write_text(json.dumps(data))
    code, _, err = _run_cli(capsys, "edit", str(scene / "d.json"), "--model", str(scene), "--out", str(tmp_path / "o.png"))
    assert code != 0 and "handles" in err and "outside" in err and "point 1" in err
    data["targets"] = [[20, 20]]
    (scene / "d.json").write_text(json.dumps(data))
    code, _, err = _run_cli(capsys, "edit", str(scene / "d.json"), "--model", str(scene), "--out", str(tmp_path / "o.png"))
    assert code != 0 and "handles has 2 points but targets has 1" in err


def test_reference_without_mask(scene):
    with pytest.raises(SpecError, match="reference_mask"):
        parse_spec({"task": "paste", "image": "image.png", "reference": "image.png"}, base_dir=scene)


def test_compose_names_the_failing_edit(scene):
    edits = [{"task": "move", "mask": "mask.png", "offset": [1, 0]},
             {"task": "move", "mask": "mask.png", "offset": [1, 2, 3]}]
    with pytest.raises(SpecError, match=r"edits\[1\]\.offset: .*at most 2 items"):
        parse_spec({"task": "compose", "image": "image.png", "prompt": "x", "edits": edits}, base_dir=scene)


def test_masked_memory_bank_only_where_a_task_names_parts(scene):
    """``memory_bank: masked`` on a task that names no parts would inject nothing: refused at
    parse time (before any model loads), per task and inside compose."""
    ref = {"reference": "image.png", "reference_mask": "mask.png", "memory_bank": "masked"}
    for task in ("paste", "appearance"):
        extra = {"mask": "mask.png"} if task == "appearance" else {}
        assert parse_spec({"task": task, "image": "image.png", **ref, **extra}, base_dir=scene)
    move = {"task": "move", "mask": "mask.png", "offset": [1, 0]}
    for bad, where in [({"task": "drag", "image": "image.png", "mask": "mask.png", "handles": [[1, 1]],
                         "targets": [[2, 2]], "memory_bank": "masked"}, "memory_bank"),
                       ({"task": "compose", "image": "image.png", "memory_bank": "masked",
                         "edits": [move]}, "memory_bank"),
                       ({"task": "compose", "image": "image.png",
                         "edits": [{**move, "memory_bank": "masked"}]}, r"edits\[0\]\.memory_bank")]:
        with pytest.raises(SpecError, match=rf"{where}: 'masked' mixes the parts"):
            parse_spec(bad, base_dir=scene)
    paste = {"task": "paste", **ref}
    paste.pop("memory_bank")
    assert parse_spec({"task": "compose", "image": "image.png", "memory_bank": "masked",
                       "edits": [move, paste]}, base_dir=scene).memory_bank == "masked"


def test_paths_are_relative_to_the_spec_file(scene, tmp_path, monkeypatch):
    spec = _spec(scene)
    monkeypatch.chdir(tmp_path)
    parsed = parse_spec(spec)
    assert parsed.image == scene / "image.png" and parsed.mask == scene / "mask.png"


def test_yaml_spec_and_model_defaults(scene):
    (scene / "s.yaml").write_text("task: resize\nimage: image.png\nmask: mask.png\nscale: 1.5\n")
    spec = parse_spec(scene / "s.yaml", defaults={"resolution": 128, "resize.energy_scale": 7.0, "move.w_edit": 1.0})
    assert spec.resolution == 128 and spec.energy_scale == 7.0 and spec.w_edit == 4.0
    # a user's value beats a model default
    spec = parse_spec({"task": "resize", "image": "image.png", "mask": "mask.png", "scale": 2, "resolution": 256},
                      base_dir=scene, defaults={"resolution": 128})
    assert spec.resolution == 256


def test_spec_round_trip(scene):
    spec = parse_spec(_spec(scene))
    again = parse_spec(spec.model_dump(mode="json"), base_dir=scene)
    assert again == spec


def test_reference_defaults_per_task(scene):
    move = parse_spec(_spec(scene))
    assert (move.guidance_scale, move.energy_scale, move.guidance_k, move.w_edit, move.w_content,
            move.w_contrast, move.w_inpaint, move.sde_strength, move.image_prompt_scale) == (
        4, 500, 0.08, 4, 6, 0.2, 0.8, 0.4, 0.1)
    drag = parse_spec({"task": "drag", "image": "image.png", "mask": "mask.png", "handles": [[1, 1]],
                       "targets": [[2, 2]]}, base_dir=scene)
    assert (drag.energy_scale, drag.guidance_k, drag.w_handle_contrast) == (2000, 0.04, 0.2)


def test_schema_file_matches_registry(monkeypatch):
    """specs/schema.json is generated from diffeditor's own tasks (third-party plugins off):
    regenerate with `DIFFEDITOR_DISABLE_PLUGINS=1 diffeditor schema --out specs/schema.json`."""
    from diffeditor.plugins import DISABLE_ENV, Registry, make_plugin_manager

    monkeypatch.setenv(DISABLE_ENV, "1")
    builtin = Registry(*make_plugin_manager())
    assert "move" in builtin.tasks and "shift" not in builtin.tasks
    on_disk = json.loads((REPO / "specs" / "schema.json").read_text())
    assert on_disk == json.loads(json.dumps(json_schema(builtin)))


def test_schema_lists_every_task():
    schema = json_schema()
    tags = set(schema["discriminator"]["mapping"]) if "discriminator" in schema else set()
    assert {"move", "resize", "drag", "appearance", "paste", "face"} <= tags


def test_tasks_and_plugins_commands(capsys):
    code, out, _ = _run_cli(capsys, "tasks")
    assert code == 0
    for name in ("move", "resize", "drag", "appearance", "paste", "face"):
        assert any(line.split()[0] == name and "0.1.0" in line and "diffeditor" in line
                   for line in out.splitlines())
    code, out, _ = _run_cli(capsys, "plugins", "--json")
    assert code == 0
    names = {p["name"] for p in json.loads(out)}
    assert {"move", "drag", "appearance", "paste", "face"} <= names


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "diffeditor.cli", "tasks"], capture_output=True, text=True)
    assert out.returncode == 0 and "drag" in out.stdout


def test_unknown_model_name(scene, capsys, tmp_path):
    code, _, err = _run_cli(capsys, "edit", str(_spec(scene)), "--model", "no-such-model", "--out", str(tmp_path / "o.png"))
    assert code != 0 and "no-such-model" in err and len(err.strip().splitlines()) == 1


def test_existing_output_not_overwritten(scene, capsys, tmp_path):
    out = tmp_path / "o.png"
    out.write_bytes(b"precious")
    code, _, err = _run_cli(capsys, "edit", str(_spec(scene)), "--model", str(scene), "--out", str(out))
    assert code != 0 and "--force" in err and out.read_bytes() == b"precious"


def test_unwritable_output_folder(scene, capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        import os

        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write anywhere (root)")
        code, _, err = _run_cli(capsys, "edit", str(_spec(scene)), "--model", str(scene), "--out", str(ro / "o.png"))
        assert code != 0 and "not writable" in err
    finally:
        ro.chmod(0o700)


def test_missing_spec_file(capsys, tmp_path):
    code, _, err = _run_cli(capsys, "edit", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o.png"))
    assert code != 0 and "spec file not found" in err


def test_output_folder_under_a_file(scene, capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "o.png"
    code, _, err = _run_cli(capsys, "edit", str(_spec(scene)), "--model", str(scene), "--out", str(out))
    assert code != 0 and "is a file" in err and len(err.strip().splitlines()) == 1


def test_a_mapping_model_default_fills_only_what_the_spec_leaves_out(scene):
    """A model's ``schedule`` default (the shapes model's ``paste.schedule``) fills the keys a
    spec's own ``schedule`` leaves out, and never a key the spec sets; a spec that names a
    preset takes the rest from the preset, not from the model."""
    base = {"task": "resize", "image": "image.png", "mask": "mask.png", "scale": 1.5}
    defaults = {"resize.schedule": {"time_travel_repeats": 1}, "move.schedule": {"time_travel_repeats": 7}}
    assert parse_spec(base, base_dir=scene, defaults=defaults).schedule.time_travel_repeats == 1
    assert parse_spec({**base, "task": "move", "offset": [4, 0]}, base_dir=scene,
                      defaults=defaults).schedule.time_travel_repeats == 7
    partial = {**base, "schedule": {"guidance": [{"start": 0.0, "stop": 0.3}]}}
    got = parse_spec(partial, base_dir=scene, defaults=defaults)
    assert got.schedule.time_travel_repeats == 1 and got.schedule.guidance[0].stop == 0.3
    assert partial["schedule"] == {"guidance": [{"start": 0.0, "stop": 0.3}]}  # not mutated
    own = {**base, "schedule": {"time_travel_repeats": 4}}
    assert parse_spec(own, base_dir=scene, defaults=defaults).schedule.time_travel_repeats == 4
    preset = {**base, "schedule": {"preset": "dragondiffusion"}}
    assert parse_spec(preset, base_dir=scene, defaults=defaults).schedule.time_travel_repeats == \
        parse_spec(preset, base_dir=scene).schedule.time_travel_repeats


@pytest.mark.parametrize("argv, status", [
    (["move", "--help"], 0),   # argparse's help (argparse ignores the failed write), then exit 0
    (["schema"], 141),         # a command's own output: 128 + SIGPIPE, as a shell shows `yes | head`
    (["tasks"], 141),          # a short output, left for the final flush
    (["demo", "--help"], 0),   # a plugin's command (register_commands)
    ([], 2),                   # no command: the overview, exit status 2 as ever
])
def test_a_closed_pipe_ends_quietly(argv, status):
    """`diffeditor ... | head` printed 'diffeditor: error: Broken pipe' (or Python's 'Exception
    ignored ... BrokenPipeError'): the reader closing stdout now ends the command with no
    message. The read end is closed before the command writes, so every write fails."""
    import os

    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "diffeditor.cli", *argv], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert proc.stderr == ""
    assert proc.returncode == status
