"""The segmenter extension point: click an object, get its mask.

A segmenter is a class registered in the ``diffeditor_ui.segmenters`` entry-point group
(``name = "module:Class"``), built with keyword options (``sam_path``, ignored by those that
need none) and exposing:

* ``name``: a short label;
* ``unavailable() -> str | None``: why it cannot run here (missing weights...), or ``None``;
* ``segment(image, point) -> mask``: ``image`` an ``(H, W, 3)`` uint8 array, ``point`` the
  clicked ``(x, y)`` in its pixels; returns an ``(H, W)`` bool mask.

Shipped: ``flood`` (no weights: the connected region of colours near the clicked one; right
for the flat-coloured ``shapes`` world and flat regions of photos) and ``sam`` (Segment
Anything through ``transformers``' ``SamModel``, from a local folder).
"""

from __future__ import annotations

import importlib.metadata
import os
from collections import deque
from pathlib import Path

import numpy as np

from diffeditor.errors import DiffEditorError

GROUP = "diffeditor_ui.segmenters"
SAM_ENV = "DIFFEDITOR_SAM_MODEL"


class SegmenterError(DiffEditorError):
    """A segmenter cannot run (no weights) or failed; the message says what to do."""


class FloodFillSegmenter:
    """The 4-connected region around the click whose colours lie within ``tolerance`` (RGB
    Euclidean distance) of the clicked pixel's colour; needs no weights."""

    name = "flood"

    def __init__(self, tolerance: float = 40.0, **_options):
        self.tolerance = float(tolerance)

    def unavailable(self) -> str | None:
        return None

    def segment(self, image: np.ndarray, point) -> np.ndarray:
        img = np.asarray(image)[..., :3].astype(np.float32)
        h, w = img.shape[:2]
        x, y = int(point[0]), int(point[1])
        if not (0 <= x < w and 0 <= y < h):
            raise SegmenterError(f"the click ({x}, {y}) is outside the {w}x{h} image")
        close = np.linalg.norm(img - img[y, x], axis=-1) <= self.tolerance
        out = np.zeros((h, w), bool)
        out[y, x] = True
        todo = deque([(y, x)])
        while todo:
            cy, cx = todo.popleft()
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and close[ny, nx] and not out[ny, nx]:
                    out[ny, nx] = True
                    todo.append((ny, nx))
        return out


class SamSegmenter:
    """Segment Anything (``transformers.SamModel`` + ``SamProcessor``) from a local folder:
    ``sam_path`` or ``$DIFFEDITOR_SAM_MODEL``. One positive point; the best-scoring mask."""

    name = "sam"

    def __init__(self, sam_path: str | os.PathLike | None = None, device: str = "cpu", **_options):
        path = sam_path or os.environ.get(SAM_ENV)
        self.path = Path(path).expanduser() if path else None
        self.device = device
        self._model = None
        self._processor = None

    def unavailable(self) -> str | None:
        if self.path is None:
            return (f"no SAM weights: download a SAM model folder (e.g. facebook/sam-vit-base) "
                    f"where a network exists and pass --sam DIR or set {SAM_ENV}")
        if not (self.path / "config.json").is_file():
            return (f"no SAM weights at {self.path} (config.json missing): pass --sam a folder "
                    f"saved by SamModel.save_pretrained and SamProcessor.save_pretrained")
        return None

    def _load(self):
        if self._model is None:
            reason = self.unavailable()
            if reason:
                raise SegmenterError(reason)
            from transformers import SamModel, SamProcessor

            try:
                self._processor = SamProcessor.from_pretrained(self.path)
                self._model = SamModel.from_pretrained(self.path).to(self.device).eval()
            except (OSError, ValueError) as exc:
                raise SegmenterError(f"cannot load SAM from {self.path}: {str(exc).splitlines()[0]}") from None
        return self._model, self._processor

    def segment(self, image: np.ndarray, point) -> np.ndarray:
        import torch

        model, processor = self._load()
        img = np.asarray(image)[..., :3].astype(np.uint8)
        inputs = processor(images=img, input_points=[[[float(point[0]), float(point[1])]]],
                           return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = model(**inputs, multimask_output=True)
        masks = processor.image_processor.post_process_masks(
            out.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu())
        scores = out.iou_scores[0, 0].cpu()
        best = int(scores.argmax())
        return masks[0][0, best].numpy().astype(bool)


def load_segmenters(**options) -> dict[str, object]:
    """Every segmenter of the entry-point group, built with ``options``; one that fails to
    import or build is left out (logged)."""
    import logging

    out: dict[str, object] = {}
    for ep in importlib.metadata.entry_points(group=GROUP):
        try:
            out[ep.name] = ep.load()(**options)
        except Exception as exc:  # a broken segmenter plugin must not take the page down
            logging.getLogger(__name__).warning("segmenter %s could not be loaded: %s", ep.name, exc)
    if "flood" not in out:  # running from a source tree without the entry points installed
        out["flood"] = FloodFillSegmenter(**options)
    return out
