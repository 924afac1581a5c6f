"""Shared fixtures: where the trained small model lives, and one loaded editor per session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if REPO.name == "mutants":  # mutation testing runs a copy of the tests, from <repo>/mutants/tests
    REPO = REPO.parent
# The model tests run on the shapes model's bare weights (version 1, no model card: reference
# defaults, no image prompt), which is what their expected values were written for. The shipped
# model (diffeditor_shapes.MODEL_DIR, version 2, with its card) is what the spec hashes, the demo
# and `--model shapes` use; moving these tests onto it means re-deriving their expectations.
SHAPES_MODEL = Path(
    os.environ.get("DIFFEDITOR_SHAPES_MODEL", REPO.parent / "shared" / "models" / "shapes-ldm")
)
SHARED = Path(os.environ.get("DIFFEDITOR_SHARED", REPO.parent / "shared"))

# The tests mutation testing runs (`nox -s mutate`, docs/testing.md): fast and model-free. A
# file name (in whichever folder under tests/ it is) takes the whole file, ``file::function``
# one test; files that do not exist (yet) are simply not there. They get the ``mutation`` marker, which pyproject's [tool.mutmut] selects.
MUTATION_SUITE = frozenset({
    "test_sampling_properties.py",
    "test_prediction_types.py",
    "test_schedule.py",
    "test_guidance_bound.py",
    "test_attention_bank.py",
    "test_loop_oracle.py",
    "test_engine.py::test_memory_bank_policies",
})


# Tests are sorted by what they need (docs/testing.md): each folder under tests/ is a marker
# given to every test in it, so `pytest -m unit` and `pytest tests/unit` select the same tests.
# tests/slow/ also gets ``slow``; a slow test elsewhere keeps its own ``@pytest.mark.slow``.
FOLDERS = ("unit", "model", "cli", "ui", "slow")
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        if name in MUTATION_SUITE or f"{name}::{item.originalname}" in MUTATION_SUITE:
            item.add_marker(pytest.mark.mutation)
        try:
            folder = item.path.resolve().relative_to(TESTS).parts[0]
        except ValueError:  # a plugin's own tests (plugins/*/tests)
            continue
        if folder in FOLDERS:
            item.add_marker(getattr(pytest.mark, folder))
            if folder == "slow":
                item.add_marker(pytest.mark.slow)


def write_disc_scene(folder: Path, editable: bool = False) -> Path:
    """A red square on gray (``i.png``) and its mask (``m.png``), 128x128; with ``editable``
    also a wide editable region around it (``e.png``, for drags). Returns ``folder``."""
    img = np.full((128, 128, 3), 128, np.uint8)
    img[40:80, 20:60] = (220, 40, 40)
    Image.fromarray(img).save(folder / "i.png")
    m = np.zeros((128, 128), np.uint8)
    m[40:80, 20:60] = 255
    Image.fromarray(m).save(folder / "m.png")
    if editable:
        e = np.zeros((128, 128), np.uint8)
        e[20:100, 10:120] = 255
        Image.fromarray(e).save(folder / "e.png")
    return folder


def shapes_model_or_skip() -> Path:
    if not (SHAPES_MODEL / "model_index.json").is_file():
        pytest.skip(f"shapes model not found at {SHAPES_MODEL} (set DIFFEDITOR_SHAPES_MODEL)")
    return SHAPES_MODEL


@pytest.fixture(scope="session")
def shapes_model() -> Path:
    return shapes_model_or_skip()


@pytest.fixture(scope="session")
def editor(shapes_model):
    """One Editor on the shapes model (CPU, float32) shared by the end-to-end tests."""
    from diffeditor import Editor
    from diffeditor.models import quiet_libraries

    quiet_libraries()
    return Editor.from_pretrained(str(shapes_model), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def editor_shapes():
    """The installed ``shapes`` model with its registered defaults (skips if not installed)."""
    from diffeditor.plugins import get_registry

    if "shapes" not in get_registry().models:
        pytest.skip("diffeditor-shapes is not installed")
    from diffeditor import Editor
    from diffeditor.models import quiet_libraries

    quiet_libraries()
    return Editor.from_pretrained("shapes", device="cpu", dtype="float32")


def install_distribution(monkeypatch, site: Path, dist: str, module: str, source: str,
                         entry: str, package: bool = False) -> None:
    """Install a real minimal distribution ``dist`` 0.1 into ``site`` and put it on
    ``sys.path``: module ``module`` (a package when ``package``) holding ``source``, and a
    dist-info whose entry point ``entry`` in the ``diffeditor`` group names that module."""
    import importlib

    site.mkdir(parents=True, exist_ok=True)
    if package:
        (site / module).mkdir()
        (site / module / "__init__.py").write_text(source)
    else:
        (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[diffeditor]\n{entry} = {module}\n")
    (info / "RECORD").write_text("")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
