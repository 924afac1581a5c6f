"""The command-line reference (docs/cli.md, "Commands") is a contract: every line parses with
the real parser and names files that exist (fast), and every line runs as written (slow). The
README's command lines are lines of that block, so they are checked too. The README's test
command is the one CI runs."""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CLI_DOC = REPO / "docs" / "cli.md"


def _bash_block(path: Path, heading: str) -> list[str]:
    """The lines of the first ```bash block under ``heading`` in ``path``, comments dropped."""
    text = path.read_text()
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            lines.append(shlex.join(words) if "*" not in line else line.split("#")[0].strip())
    return lines


def cli_commands() -> list[str]:
    """The lines of the command-line reference's block (docs/cli.md, '## Commands')."""
    return _bash_block(CLI_DOC, "## Commands")


def readme_commands() -> list[str]:
    """The lines of the README's block under '## Command line'."""
    return _bash_block(README, "## Command line")


def _argv(line: str, cwd: Path) -> list[str]:
    words = []
    for w in shlex.split(line, comments=True):
        words.extend(sorted(glob.glob(w, root_dir=cwd)) or [w] if "*" in w else [w])
    return words


def test_the_cli_page_names_the_commands():
    commands = cli_commands()
    assert len(commands) >= 14
    names = [shlex.split(c)[1] for c in commands]
    assert {"tasks", "plugins", "models", "schema", "edit", "move", "drag", "compose", "bench",
            "eval", "download"} <= set(names)


def test_the_readme_commands_are_lines_of_the_cli_page():
    """The README shows a few command lines; each is a line of docs/cli.md's block, so the
    tests below parse and run it as written."""
    readme = readme_commands()
    assert len(readme) >= 3
    missing = [line for line in readme if line not in cli_commands()]
    assert not missing, f"README command lines not in docs/cli.md's block: {missing}"


@pytest.mark.parametrize("line", cli_commands())
def test_each_cli_command_parses_and_its_files_exist(line):
    from diffeditor.cli import build_parser

    argv = _argv(line, REPO)
    assert argv[0] == "diffeditor"
    if argv[1] == "eval":
        pytest.importorskip("diffeditor_eval")
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse's way of saying the README drifted
        raise AssertionError(f"docs/cli.md's command does not parse: {line}") from exc
    assert getattr(args, "func", None) is not None, line
    for word in argv:
        if word.startswith("specs/"):
            assert (REPO / word).exists(), f"{line}: {word} does not exist"
    if "--model" in argv:
        assert argv[argv.index("--model") + 1] == "shapes", line


def test_the_readme_test_command_is_what_ci_runs():
    text = README.read_text()
    block = text.split("**Tests**", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()
    ci = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.startswith(("#", "set ", "cd ", "export "))]
    assert ci == [block]
    for plugin in ("diffeditor-shapes", "diffeditor-eval", "diffeditor-example", "diffeditor-ui",
                   "diffeditor-ray"):
        assert f"./plugins/{plugin}" in block, f"{plugin} is not installed by CI"


@pytest.mark.slow
def test_every_cli_command_runs_as_written(tmp_path):
    """Acceptance: in a copy of specs/, each line of docs/cli.md's command block (which holds
    the README's command lines), run by the shell as written, succeeds (download: succeeds or says in one line why it cannot)."""
    from diffeditor.plugins import get_registry

    if "shapes" not in get_registry().models:
        pytest.skip("diffeditor-shapes is not installed")
    pytest.importorskip("diffeditor_eval")
    pytest.importorskip("dlib")  # the batch includes the face spec
    shutil.copytree(REPO / "specs", tmp_path / "specs")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for line in cli_commands():
        res = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=900, executable="/bin/bash")
        if shlex.split(line)[1] == "download":
            lines = res.stderr.strip().splitlines()
            assert res.returncode == 0 or (res.returncode == 2 and len(lines) == 1), res.stderr
            continue
        assert res.returncode == 0, f"{line}\n{res.stderr[-3000:]}"
        assert "Traceback" not in res.stderr, f"{line}\n{res.stderr[-3000:]}"
    pixels = {n: np.asarray(Image.open(tmp_path / n)) for n in ("moved.png", "moved-again.png")}
    assert np.array_equal(pixels["moved.png"], pixels["moved-again.png"])
    batch = sorted(p.name for p in (tmp_path / "edits").glob("*.png"))
    assert batch == sorted(f"{Path(p).stem}.png" for p in glob.glob(str(REPO / "specs/*.yaml")))
    for name in ("moved-right.png", "dragged.png", "composed.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).with_suffix(".json").is_file()
    assert len(list((tmp_path / "eval-images" / "full").glob("move-*.png"))) == 8
