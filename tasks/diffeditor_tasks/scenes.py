"""The scenes ``diffeditor bench`` times for diffeditor's own tasks (a disc on a gray
background with its mask), registered through the ``register_bench_scenes`` hook by each task's
module."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


def disc_scene(size: int, folder: Path) -> dict:
    """Write ``image.png`` (a red disc on gray), ``mask.png`` (the disc) and ``editable.png``
    (a band around it) into ``folder``; return the disc's centre and a distance to move it."""
    folder = Path(folder)
    im = Image.new("RGB", (size, size), (128, 128, 128))
    m = Image.new("L", (size, size), 0)
    r = size // 6
    box = (size // 3 - r, size // 2 - r, size // 3 + r, size // 2 + r)
    ImageDraw.Draw(im).ellipse(box, fill=(220, 40, 40))
    ImageDraw.Draw(m).ellipse(box, fill=255)
    im.save(folder / "image.png")
    m.save(folder / "mask.png")
    ed = Image.new("L", (size, size), 0)
    ImageDraw.Draw(ed).rectangle((size // 6, size // 4, size - size // 6, 3 * size // 4), fill=255)
    ed.save(folder / "editable.png")
    return {"cx": size // 3, "cy": size // 2, "d": size // 4}


def move_scene(size: int, folder: Path) -> dict:
    d = disc_scene(size, folder)["d"]
    return {"task": "move", "image": "image.png", "mask": "mask.png", "offset": [d, 0]}


def resize_scene(size: int, folder: Path) -> dict:
    disc_scene(size, folder)
    return {"task": "resize", "image": "image.png", "mask": "mask.png", "scale": 1.3}


def drag_scene(size: int, folder: Path) -> dict:
    s = disc_scene(size, folder)
    return {"task": "drag", "image": "image.png", "mask": "editable.png",
            "handles": [[s["cx"], s["cy"]]], "targets": [[s["cx"] + s["d"], s["cy"]]]}


def appearance_scene(size: int, folder: Path) -> dict:
    disc_scene(size, folder)
    return {"task": "appearance", "image": "image.png", "mask": "mask.png",
            "reference": "image.png", "reference_mask": "mask.png"}


def paste_scene(size: int, folder: Path) -> dict:
    d = disc_scene(size, folder)["d"]
    return {"task": "paste", "image": "image.png", "reference": "image.png",
            "reference_mask": "mask.png", "offset": [d, 0]}
