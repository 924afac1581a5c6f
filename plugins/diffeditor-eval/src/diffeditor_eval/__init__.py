"""diffeditor-eval: benchmark loaders and metrics for judging diffeditor's edits.

Modules:
    :mod:`diffeditor_eval.dragbench` -- the DragBench loader (restricted unpickler), spec export
        and the ``diffeditor eval dragbench`` evaluation loop.
    :mod:`diffeditor_eval.metrics` -- MD with DIFT features, IF (1 - LPIPS), face landmark MSE,
        Drag100's DAI.
    :mod:`diffeditor_eval.plugin` -- the ``diffeditor eval ...`` command line (pluggy hookimpl).

This package's ``__init__`` stays import-light (no torch) because the plugin module is imported
whenever ``diffeditor`` discovers its plugins; the names below are loaded on first access.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "DragCase": "dragbench",
    "DragBenchFormatError": "dragbench",
    "UnsafePickleError": "dragbench",
    "load_case": "dragbench",
    "iter_dragbench": "dragbench",
    "case_to_spec": "dragbench",
    "MetricWeightsMissing": "metrics",
    "DIFTFeatures": "metrics",
    "mean_distance": "metrics",
    "image_fidelity": "metrics",
    "landmark_mse": "metrics",
    "drag100_dai": "metrics",
}

__all__ = [
    "DIFTFeatures",
    "DragBenchFormatError",
    "DragCase",
    "MetricWeightsMissing",
    "UnsafePickleError",
    "case_to_spec",
    "drag100_dai",
    "image_fidelity",
    "iter_dragbench",
    "landmark_mse",
    "load_case",
    "mean_distance",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffeditor_eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
