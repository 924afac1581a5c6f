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
    captured: dict[int, Tensor] = {}
    last = max(levels)
    handles = []

    def make_hook(level: int):
        def hook(_module, _inputs, output):
            captured[level] = output[0] if isinstance(output, tuple) else output
            if level == last:
                raise _StopForward

        return hook

    for level in levels:
        handles.append(unet.up_blocks[level].register_forward_hook(make_hook(level)))
    try:
        unet(z.to(unet.dtype), t, encoder_hidden_states=context, return_dict=False,
             **(unet_kwargs or {}))
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if len(captured) != len(levels):
        missing = sorted(set(levels) - set(captured))
        raise RuntimeError(f"decoder levels {missing} produced no output")
    size = (z.shape[-2] * scale, z.shape[-1] * scale)
    out: Features = {}
    for level in levels:
        f = captured[level].float()
        if tuple(f.shape[-2:]) != size:
            f = F.interpolate(f, size=size, mode="nearest")
        out[level] = f
    return out
