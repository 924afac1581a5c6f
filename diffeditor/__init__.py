"""diffeditor: DiffEditor (Mou et al., CVPR 2024) image editing on diffusers.

>>> from diffeditor import Editor                                   # doctest: +SKIP
>>> editor = Editor.from_pretrained("shapes", device="cpu")         # doctest: +SKIP
>>> editor.move("scene.png", "mask.png", offset=(20, 0)).image      # doctest: +SKIP
"""

__version__ = "0.1.0"

__all__ = ["Editor", "EditResult", "__version__"]


def __getattr__(name):  # lazy: importing diffeditor must not import torch/diffusers
    if name in ("Editor", "EditResult"):
        from . import editor

        return getattr(editor, name)
    raise AttributeError(name)
