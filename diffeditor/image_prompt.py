"""DiffEditor's image prompt: CLIP image tokens -> 64-query resampler -> decoupled cross-attention.

The released image prompt (``ip_sd15_64.bin`` from ``Adapter/DragonDiffusion``, folder ``model``)
is an IP-Adapter-Plus model:

* a CLIP ViT-H/14 vision tower (``h94/IP-Adapter``, ``models/image_encoder``) whose
  *penultimate* hidden state ``hidden_states[-2]`` (B, 257, 1280) is the input;
* a Perceiver resampler with 64 learnable queries (depth 4, 12 heads of 64, 1280 -> 768) that
  turns it into 64 image tokens (state-dict group ``image_proj``);
* new bias-free K/V maps ``to_k_ip`` / ``to_v_ip`` (768 -> layer width) in every cross-attention
  (``attn2``) layer of the UNet, giving ``Attn(Q, K_txt, V_txt) + gamma * Attn(Q, K_ip, V_ip)``
  (state-dict group ``ip_adapter``, keys ``"{i}.to_k_ip.weight"`` where ``i`` is the layer's
  index in ``unet.attn_processors``).

This module does not re-implement any of that: it validates the file against the UNet and hands
it to diffusers' own UNet-side loader (``UNet2DConditionModel._load_ip_adapter_weights``), which
builds :class:`~diffusers.models.embeddings.IPAdapterPlusImageProjection` as
``unet.encoder_hid_proj`` and installs ``IPAdapterAttnProcessor2_0`` in the ``attn2`` layers.
On top of that it provides a cheap per-step scale setter (the sampler's step window), exact
detaching, and :class:`ImagePromptEncoder` for the CLIP side.

The code is split by responsibility: :mod:`diffeditor.image_prompt_weights` (weights I/O and
validation), :mod:`diffeditor.image_prompt_unet` (UNet attach/detach) and
:mod:`diffeditor.image_prompt_clip` (CLIP encoding); this module re-exports their public names
and holds :class:`ImagePromptRuntime`, what the sampler drives.

After :func:`attach_image_prompt` the UNet is called as::

    unet(z, t, encoder_hidden_states=text_tokens,
         added_cond_kwargs={"image_embeds": [clip_hidden_states]})

with ``clip_hidden_states`` of shape (B, N, D) = (B, 257, 1280) for ViT-H (what
:meth:`ImagePromptEncoder.encode` returns). diffusers itself wants (B, num_images, N, D); the
projection installed here accepts both and inserts the ``num_images = 1`` axis for 3-D input.
"""

from __future__ import annotations

import os

import torch
from PIL import Image

from .image_prompt_clip import ImagePromptEncoder
from .image_prompt_unet import (
    attach_image_prompt,
    detach_image_prompt,
    has_image_prompt,
    image_prompt_attached,
    image_prompt_kwargs,
    set_image_prompt_scale,
)
from .image_prompt_weights import (
    DEFAULT_NUM_TOKENS,
    IMAGE_PROMPT_SIZE,
    ImagePromptError,
    IPStateDict,
    load_ip_state_dict,
    validate_ip_state_dict,
)

__all__ = [
    "DEFAULT_NUM_TOKENS",
    "IMAGE_PROMPT_SIZE",
    "IPStateDict",
    "ImagePromptEncoder",
    "ImagePromptError",
    "ImagePromptRuntime",
    "attach_image_prompt",
    "detach_image_prompt",
    "has_image_prompt",
    "image_prompt_attached",
    "image_prompt_kwargs",
    "load_ip_state_dict",
    "set_image_prompt_scale",
    "validate_ip_state_dict",
]


class ImagePromptRuntime:
    """The image prompt as the sampler uses it: the attached UNet, the CLIP encoder, the
    current edit's conditional tokens and the unconditional (zero-image) tokens."""

    def __init__(self, unet: torch.nn.Module, encoder: ImagePromptEncoder):
        self.unet = unet
        self.encoder = encoder
        self.uncond = encoder.encode_unconditional(1)
        self.cond = self.uncond

    @classmethod
    def load(cls, engine, weights: str | os.PathLike[str], encoder_folder: str | os.PathLike[str]):
        """Attach ``weights`` (``ip_sd15_64.bin`` layout) to the engine's UNet and load the CLIP
        image encoder from ``encoder_folder``. An SDXL UNet is refused (its
        ``ip-adapter-plus_sdxl`` layout is not supported yet)."""
        if getattr(engine, "pooled_dim", 0):
            raise ImagePromptError("the image prompt supports SD 1.x UNets (ip_sd15_64.bin layout); "
                                   "SDXL's ip-adapter-plus_sdxl layout is not supported yet: edit "
                                   "without --image-prompt")
        attach_image_prompt(engine.unet, load_ip_state_dict(weights), 0.0)
        enc = ImagePromptEncoder.from_pretrained(encoder_folder, engine.device, engine.dtype)
        return cls(engine.unet, enc)

    def set_image(self, image: "torch.Tensor | Image.Image") -> None:
        """Encode the image prompt of the current edit (a [-1, 1] tensor or a PIL image)."""
        if isinstance(image, torch.Tensor):
            image = ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2)
        self.cond = self.encoder.encode(image)

    def added_cond_kwargs(self, batch: int, cond_rows: list[bool] | None = None) -> dict:
        """``added_cond_kwargs`` for a batch: conditional tokens where ``cond_rows`` is true."""
        rows = cond_rows if cond_rows is not None else [True] * batch
        embeds = torch.cat([self.cond if c else self.uncond for c in rows])
        weight = next(self.unet.parameters())  # (diffusers' .device/.dtype walk every module)
        return {"image_embeds": [embeds.to(weight.device, weight.dtype)]}

    def set_scale(self, gamma: float) -> None:
        set_image_prompt_scale(self.unet, gamma)

    def detach(self) -> None:
        """Take the image prompt off the UNet again (its own processors and projection back)."""
        detach_image_prompt(self.unet)
