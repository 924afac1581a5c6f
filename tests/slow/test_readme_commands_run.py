"""The command-line reference's block (docs/cli.md, "Commands", which holds the README's
command lines), run (slow): every line, by the shell, as written. Its
fast half (every line parses, its files exist) is ``tests/unit/test_readme_commands.py``."""

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
from readme_lines import REPO, cli_commands


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path):
    """Acceptance: in a copy of specs/, each line of docs/cli.md's command block, run by
    the shell as written, succeeds (download: succeeds or says in one line why it cannot)."""
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
