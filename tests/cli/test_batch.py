"""Batches fit for real jobs (issue 16): inputs (folders, globs, JSONL manifests), output names
that are the same in every run and chunk, resume by spec hash, --force, --skip-invalid, the
failures file, the summary, and the thread default."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from diffeditor import batch
from diffeditor.cli import main
from diffeditor.errors import CheckErrors

REPO = Path(__file__).resolve().parents[2]
SPECS = REPO / "specs"


def _tree(root: Path, steps: int = 2) -> Path:
    """specs/move.json, specs/cases/a/spec.json, specs/cases/b/spec.json (the layout
    case_to_spec writes: every file is named spec.json), all moves of one scene."""
    shutil.copytree(SPECS / "assets", root / "assets")
    base = yaml.safe_load((SPECS / "move.yaml").read_text())
    base["steps"] = steps
    (root / "move.json").write_text(json.dumps(base))
    for name, dx in (("a", 8), ("b", -8)):
        folder = root / "cases" / name
        folder.mkdir(parents=True)
        spec = {**base, "offset": [dx, 0], "image": "../../assets/move/source.png",
                "mask": "../../assets/move/mask.png"}
        (folder / "spec.json").write_text(json.dumps(spec))
    return root


def test_names_come_from_paths_below_the_common_folder_and_are_stable(tmp_path):
    root = _tree(tmp_path / "specs")
    names = [j.name for j in batch.collect([root])]
    assert names == ["cases/a/spec", "cases/b/spec", "move"]
    # a chunk of the same job: the same names (not numbered by position)
    assert [j.name for j in batch.collect([root / "cases" / "b", root / "cases" / "a"])] == ["b/spec", "a/spec"]
    assert [j.name for j in batch.collect([root / "cases"])] == ["a/spec", "b/spec"]
    pattern = str(root / "**" / "spec.json")  # a quoted glob (too many files for a shell)
    assert [j.name for j in batch.collect([Path(pattern)])] == ["a/spec", "b/spec"]
    with pytest.raises(CheckErrors, match="no file matches"):
        batch.collect([Path(str(root / "*.nothing"))])


def test_a_manifest_names_by_id_or_line(tmp_path):
    root = _tree(tmp_path / "specs")
    spec = json.loads((root / "move.json").read_text())
    lines = [json.dumps({**spec, "id": "animals/cat-01"}), "", json.dumps(spec), "{not json",
             json.dumps({**spec, "id": "../escape"})]
    (root / "jobs.jsonl").write_text("\n".join(lines) + "\n")
    jobs = batch.collect([root / "jobs.jsonl"])
    assert [j.name for j in jobs] == ["animals/cat-01", "jobs/000003", "jobs/000004", "jobs/000005"]
    assert [j.error is None for j in jobs] == [True, True, False, False]
    assert "jobs.jsonl:4: not valid JSON" in jobs[2].error and "id" in jobs[3].error
    assert all(j.base_dir == root.resolve() and "id" not in j.source for j in jobs[:2])


def test_thread_default_shares_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(batch, "cpu_count", lambda: 16)
    assert [batch.default_threads(w) for w in (1, 2, 3, 16, 32)] == [16, 8, 5, 1, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert batch.default_threads(2) == 3


@pytest.fixture
def shapes(tmp_path):
    from diffeditor.plugins import get_registry

    if "shapes" not in get_registry().models:
        pytest.skip("diffeditor-shapes is not installed")
    return "shapes"


def _stamps(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*.png")}


def test_resume_force_and_skip_invalid(shapes, tmp_path, capsys):
    root = _tree(tmp_path / "specs")
    out = tmp_path / "out"
    argv = ["edit", str(root), "--model", "shapes", "--out-dir", str(out), "-q", "--threads", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    first, err = capsys.readouterr()
    assert sorted(_stamps(out)) == ["cases/a/spec.png", "cases/b/spec.png", "move.png"]
    assert "3 of 3 edits done (3 written, 0 already done); 0 failed" in err
    table = err.splitlines()[-3:]
    assert table[0].split() == ["move", "3", "0", "0", table[0].split()[-1]]
    metas = {p.parent.name: json.loads(p.read_text()) for p in out.rglob("*.json")}
    assert sum(m["inversion_cached"] for m in metas.values()) == 2  # one scene, one inversion

    stamps = _stamps(out)
    assert main(argv) == 0
    again, err = capsys.readouterr()
    assert again == "" and "(0 written, 3 already done)" in err and _stamps(out) == stamps

    # a changed spec no longer matches its output's sidecar: refused, --force redoes it only
    spec = root / "cases" / "a" / "spec.json"
    spec.write_text(spec.read_text().replace('"steps": 2', '"steps": 3'))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "spec.png" in err and "--force redoes it" in err
    assert main([*argv, "--force"]) == 0
    capsys.readouterr()
    assert _stamps(out)["cases/a/spec.png"] != stamps["cases/a/spec.png"]

    # a broken spec: every problem listed and nothing edited, or (--skip-invalid) reported
    (root / "broken.json").write_text(json.dumps({"task": "move", "image": "assets/move/source.png",
                                                  "mask": "nope.png", "offset": [1, 1]}))
    assert main(argv) == 2
    assert "broken.json" in capsys.readouterr().err
    assert main([*argv, "--skip-invalid"]) == 1
    err = capsys.readouterr().err
    failures = [json.loads(ln) for ln in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["name"] for f in failures] == ["broken"] and "mask" in failures[0]["error"]
    assert "3 of 4 edits done (0 written, 3 already done); 1 failed: see" in err
    (root / "broken.json").unlink()
    assert main(argv) == 0  # all done: the old failures file goes
    assert not (out / "failures.jsonl").exists()


# -- the batch block of docs/cli.md ("Batches and scale-out") ------------------------------------

def readme_batch_commands() -> list[str]:
    text = (REPO / "docs" / "cli.md").read_text()
    section = text.split("\n## Batches and scale-out\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.strip()]


def test_readme_batch_commands_parse():
    import shlex

    from diffeditor.cli import build_parser

    lines = readme_batch_commands()
    assert len(lines) == 5
    for line in lines:
        words = shlex.split(line.replace('"$DRAGBENCH"', "bench"))
        if words[1] == "eval":
            pytest.importorskip("diffeditor_eval")
        args = build_parser().parse_args(words[1:])
        assert args.func is not None


@pytest.mark.slow
def test_readme_batch_commands_run_as_written(tmp_path):
    """Convert the DragBench sample, edit it all, score it, resume, and the same on Ray: each
    line as written, in a shell; the Ray outputs are the one-process outputs, byte for byte."""
    import os
    import subprocess

    from conftest import SHARED

    bench = SHARED / "data" / "dragbench-sample"
    if not bench.is_dir():
        pytest.skip(f"DragBench sample not found at {bench}")
    pytest.importorskip("diffeditor_eval")
    pytest.importorskip("diffeditor_ray")
    env = {**os.environ, "DRAGBENCH": str(bench), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    errs, outs = [], []
    for line in readme_batch_commands():
        res = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=1200, executable="/bin/bash")
        assert res.returncode == 0, f"{line}\n{res.stderr[-3000:]}"
        assert "Traceback" not in res.stderr
        errs.append(res.stderr)
        outs.append(res.stdout)
    assert "10 specs written" in outs[0] and "10 of 10 cases scored" in outs[2]
    assert "(0 written, 10 already done)" in errs[3]
    one = {p.relative_to(tmp_path / "edits"): p.read_bytes() for p in (tmp_path / "edits").rglob("*.png")}
    ray_ = {p.relative_to(tmp_path / "edits-ray"): p.read_bytes()
            for p in (tmp_path / "edits-ray").rglob("*.png")}
    assert len(one) == 10 and ray_ == one
    assert all(p.name == "spec.png" and len(p.parts) == 3 for p in one)


def _checked(capsys, folder: Path, *more: str) -> tuple[int, list[str], str]:
    code = main(["edit", str(folder), "--check", *more])
    out, err = capsys.readouterr()
    return code, [line.split(": valid ")[0] for line in out.splitlines() if ": valid " in line], err


def test_a_folder_means_the_edit_specs_in_it_the_repository_specs(capsys):
    """`diffeditor edit specs/` stopped on specs/schema.json and on compose's one-edit file
    specs/edits/square-look.yaml: a folder now means the files with 'task' and 'image' keys,
    and one note says what was skipped and why."""
    code, checked, err = _checked(capsys, SPECS, "--model", "shapes")
    assert code == 0, err
    want = sorted(p for p in SPECS.glob("*.yaml"))  # one example per task, all of them
    assert checked == [str(p) for p in want] and len(want) == 7
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "skipped 2 of 9" in notes[0], err
    assert "schema.json" in notes[0] and "edits/square-look.yaml" in notes[0]


def test_a_folder_means_the_edit_specs_in_it_the_demo_cases(capsys, tmp_path):
    """`diffeditor edit diffeditor-demo/cases/ --model shapes --check` exited 2 on case.json
    (the case's description beside its spec.json); the demo writes its cases with save_case."""
    scenes = pytest.importorskip("diffeditor_shapes.scenes")
    cases = tmp_path / "diffeditor-demo" / "cases"
    specs = [scenes.save_case(scenes.make_case("move", 3), cases / "move"),
             scenes.save_case(scenes.make_case("drag", 4), cases / "drag")]
    # the folder above holds the demo's outputs' sidecars: also left out, and said so
    sidecar = {"spec": json.loads(specs[0].read_text()), "versions": {"diffeditor": "0"}}
    (cases.parent / "moved.json").write_text(json.dumps(sidecar))
    for folder, skipped in ((cases, "skipped 2 of 4"), (cases.parent, "skipped 3 of 5")):
        code, checked, err = _checked(capsys, folder, "--model", "shapes")
        assert code == 0, err
        assert checked == [str(specs[1]), str(specs[0])]  # drag/, then move/
        assert "2 without 'task' and 'image' keys" in err and skipped in err, err
    assert "1 sidecars of earlier outputs: moved.json" in err


def test_a_folder_of_no_specs_is_one_clear_line(capsys, tmp_path):
    (tmp_path / "schema.json").write_text(json.dumps({"$schema": "x", "oneOf": []}))
    assert main(["edit", str(tmp_path), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("diffeditor: error: ") and "no spec files" in err[-1]
    assert "'task' and 'image' keys" in err[-1]
