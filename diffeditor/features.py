"""Decoder features for guidance, from the same UNet weights (no second UNet copy).

The features are the outputs of ``unet.up_blocks[level]`` for the requested levels, nearest-
upsampled to ``scale`` x the latent grid. The forward pass stops right after the deepest
requested block, so the rest of the decoder is never computed.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .interfaces import Features


class _StopForward(Exception):
    pass


def _run(unet, z, t, context, levels, unet_kwargs, rows: slice | None):
    """One UNet call with hooks on ``up_blocks[levels]``: with ``rows=None`` it stops after the
    deepest level and returns ``(None, captured)``; otherwise it runs to the end, keeps the
    features of ``rows`` only, and returns ``(output, captured)``."""
    captured: dict[int, Tensor] = {}
    last = max(levels)
    handles = []

    def make_hook(level: int):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            captured[level] = out if rows is None else out[rows]
            if rows is None and level == last:
                raise _StopForward

        return hook

    for level in levels:
        handles.append(unet.up_blocks[level].register_forward_hook(make_hook(level)))
    result = None
    try:
        result = unet(z.to(next(unet.parameters()).dtype), t, encoder_hidden_states=context, return_dict=False,
                      **(unet_kwargs or {}))[0]
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if getattr(unet, "clone_features", False):  # CUDA-graph buffers are reused by the next replay
        captured = {lv: f.clone() for lv, f in captured.items()}
    if len(captured) != len(levels):
        missing = sorted(set(levels) - set(captured))
        raise RuntimeError(f"decoder levels {missing} produced no output")
    return result, captured


def _resize(captured: dict[int, Tensor], levels, hw: tuple[int, int], scale: int) -> Features:
    size = (hw[0] * scale, hw[1] * scale)
    out: Features = {}
    for level in levels:
        f = captured[level].float()
        if tuple(f.shape[-2:]) != size:
            f = F.interpolate(f, size=size, mode="nearest")
        out[level] = f
    return out


def decoder_features(
    unet,
    z: Tensor,
    t: Tensor | int,
    context: Tensor,
    levels: tuple[int, ...] = (1, 2),
    scale: int = 2,
    unet_kwargs: dict | None = None,
) -> Features:
    """Run the UNet up to ``up_blocks[max(levels)]`` and return the features by level.

    Gradients flow to ``z`` when it requires grad. Features are returned in float32.
    """
    _, captured = _run(unet, z, t, context, levels, unet_kwargs, None)
    return _resize(captured, levels, tuple(z.shape[-2:]), scale)


def output_and_features(
    unet,
    z: Tensor,
    t: Tensor | int,
    context: Tensor,
    rows: slice,
    levels: tuple[int, ...] = (1, 2),
    scale: int = 2,
    unet_kwargs: dict | None = None,
) -> tuple[Tensor, Features]:
    """One full UNet call that also returns the decoder features of the batch rows ``rows``:
    a feature pass batched with other rows (as :func:`decoder_features` for those rows, since
    rows never interact in the UNet)."""
    out, captured = _run(unet, z, t, context, levels, unet_kwargs, rows)
    return out, _resize(captured, levels, tuple(z.shape[-2:]), scale)
