"""diffeditor's pytest plugin, for task-plugin authors: fixtures beside the conformance kit.

It is registered through the ``pytest11`` entry point, so any test suite run where diffeditor is
installed has it (``-p no:diffeditor`` turns it off). It imports nothing heavy until a fixture
is used.

Fixtures:

* ``diffeditor_registry``: the registry of the installed plugins (tasks, models, failures);
* ``diffeditor_scene``: a folder holding a small synthetic scene for example specs:
  ``image.png`` (128x96, a red square on gray), ``mask.png`` (the square), ``editable.png`` (a
  wide region around it), ``reference.png`` (120x120, a blue square on black) and
  ``reference_mask.png``.

With the conformance kit (:class:`diffeditor.testing.TaskConformance`)::

    from diffeditor.testing import TaskConformance

    class TestMine(TaskConformance):
        task_name = "mine"

        def example_spec(self, folder):
            write_my_inputs(folder)           # or copy files into folder
            return {"task": "mine", "image": "image.png", "mask": "mask.png"}

    def test_my_task_lists(diffeditor_registry):
        assert "mine" in diffeditor_registry.tasks
"""

from __future__ import annotations

from pathlib import Path

import pytest


def write_scene(folder: Path) -> Path:
    """Write the ``diffeditor_scene`` files into ``folder`` and return it."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    img = np.full((96, 128, 3), 128, np.uint8)
    img[30:60, 20:50] = (220, 40, 40)
    Image.fromarray(img).save(folder / "image.png")
    m = np.zeros((96, 128), np.uint8)
    m[30:60, 20:50] = 255
    Image.fromarray(m).save(folder / "mask.png")
    e = np.zeros((96, 128), np.uint8)
    e[20:80, 10:110] = 255
    Image.fromarray(e).save(folder / "editable.png")
    ref = np.full((120, 120, 3), 20, np.uint8)
    ref[50:90, 60:100] = (40, 70, 220)
    Image.fromarray(ref).save(folder / "reference.png")
    rm = np.zeros((120, 120), np.uint8)
    rm[50:90, 60:100] = 255
    Image.fromarray(rm).save(folder / "reference_mask.png")
    return folder


@pytest.fixture()
def diffeditor_scene(tmp_path: Path) -> Path:
    """A folder with a small synthetic scene (see the module's docstring)."""
    return write_scene(tmp_path)


@pytest.fixture()
def diffeditor_registry():
    """The registry of the installed diffeditor plugins."""
    from diffeditor.plugins import get_registry

    return get_registry()
