"""diffeditor: DiffEditor (Mou et al., CVPR 2024) image editing on diffusers.

>>> from diffeditor import Editor                                   # doctest: +SKIP
>>> editor = Editor.from_pretrained("shapes", device="cpu")         # doctest: +SKIP
>>> editor.move("scene.png", "mask.png", offset=(20, 0)).save("moved.png")  # doctest: +SKIP

The names below are importable from ``diffeditor`` directly (lazily: importing the package does
not import torch or diffusers). Modules for plugin authors: :mod:`diffeditor.interfaces` (Task,
EditPlan, EnergyTerm), :mod:`diffeditor.specs` (EditSpec), :mod:`diffeditor.masks` and
:mod:`diffeditor.energies` (the helpers the built-in tasks use), :mod:`diffeditor.hookspecs`
(hookimpl) and :mod:`diffeditor.testing` (the conformance kit).
"""

__version__ = "0.1.0"

_LAZY = {
    "Editor": "editor",
    "EditResult": "editor",
    "check_spec": "editor",
    "parse_spec": "specs",
    "EditSpec": "specs",
    "Task": "interfaces",
    "EditPlan": "interfaces",
    "EnergyTerm": "interfaces",
    "Geometry": "interfaces",
    "hookimpl": "hookspecs",
    "get_registry": "plugins",
    "DiffEditorError": "errors",
    "SpecError": "errors",
    "ModelError": "errors",
    "OutputError": "errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):  # lazy: importing diffeditor must not import torch/diffusers
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'diffeditor' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
