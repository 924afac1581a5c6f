"""(image, caption) datasets: the ``shapes`` generator, or a folder with ``captions.jsonl``.

A folder dataset is ``DIR/captions.jsonl`` with one JSON object per line,
``{"file": "relative/path.png", "caption": "a red circle on a white background"}``; images are
converted to RGB and resized (bicubic) to the model's resolution.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .loop import TrainError

CAPTIONS_FILE = "captions.jsonl"


@dataclass
class Pairs:
    images: list[np.ndarray]  # (H, W, 3) uint8
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def shapes_pairs(n: int, seed: int = 0, size: int = 128) -> Pairs:
    """``n`` scenes of the shapes world (training distribution, with its noise) and captions."""
    from diffeditor_shapes.scenes import random_scene, render

    if n < 1:
        raise TrainError(f"--shapes must be at least 1, found {n}")
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in range(n):
        scene = random_scene(rng, size=size)
        out = render(scene, noise=rng)
        images.append(out.image)
        captions.append(out.caption)
    return Pairs(images, captions)


def folder_pairs(folder: str | Path, size: int) -> Pairs:
    """Read ``folder/captions.jsonl`` and its images (resized to ``size`` x ``size``)."""
    root = Path(folder).expanduser()
    index = root / CAPTIONS_FILE
    if not index.is_file():
        raise TrainError(f"--data {root}: no {CAPTIONS_FILE} there; write one line "
                         f'{{"file": "img.png", "caption": "..."}} per image')
    images, captions = [], []
    for lineno, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            file, caption = row["file"], row["caption"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise TrainError(f"{index}:{lineno}: expected {{\"file\": ..., \"caption\": ...}}") from None
        if not isinstance(caption, str) or not isinstance(file, str):
            raise TrainError(f"{index}:{lineno}: file and caption must be strings")
        path = root / file
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
                images.append(np.asarray(im, dtype=np.uint8).copy())
        except (OSError, ValueError) as exc:
            raise TrainError(f"{index}:{lineno}: cannot read image {path} ({exc})") from None
        captions.append(caption)
    if not captions:
        raise TrainError(f"{index} lists no images")
    return Pairs(images, captions)


def load_pairs(data: str | None, shapes: int | None, size: int, seed: int = 0) -> Pairs:
    if (data is None) == (shapes is None):
        raise TrainError("give exactly one of --data DIR and --shapes N")
    if shapes is not None:
        return shapes_pairs(shapes, seed=seed, size=size)
    return folder_pairs(data, size)
