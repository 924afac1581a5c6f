"""diffeditor-shapes: the small trained ``shapes-ldm`` model and its procedural world.

* :mod:`diffeditor_shapes.plugin` registers the model as ``--model shapes`` (entry point
  ``shapes`` in the ``diffeditor`` group).
* :mod:`diffeditor_shapes.scenes` draws scenes exactly as the model's training data was drawn,
  and builds edit cases (move, resize, drag, appearance, paste) whose right answer is known.

Importing this package does not import :mod:`diffeditor`; only the plugin module does.
"""

from __future__ import annotations

from pathlib import Path

MODEL_DIR: Path = Path(__file__).resolve().parent / "model"
"""The packaged diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ...)."""

__version__ = "0.1.0"

__all__ = ["MODEL_DIR", "__version__"]
