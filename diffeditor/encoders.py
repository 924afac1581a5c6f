"""The built-in prompt encoders, registered through the ``diffeditor`` entry-point group like
any plugin's (entry point ``prompt-encoders``):

* ``clip`` (text): the model's own tokenizer and CLIP text model, the UNet's usual conditioning;
* ``ip-adapter`` (image): the paper's IP-Adapter-style image prompt
  (:mod:`diffeditor.image_prompt`): a CLIP image encoder, a projection to tokens and decoupled
  cross-attention in the UNet.

A third party registers its own with the same hook
(:func:`diffeditor.hookspecs.register_prompt_encoders`); a spec selects one by name
(``text_encoder: NAME``, ``image_encoder: NAME``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .hookspecs import hookimpl
from .interfaces import ImagePromptAdapter, TextPromptEncoder


class ClipTextEncoder(TextPromptEncoder):
    """The model's tokenizer and CLIP text model (padded to the tokenizer's 77 tokens)."""

    name = "clip"
    description = "the model's CLIP text encoder (Stable Diffusion's own conditioning)"

    @torch.no_grad()
    def encode(self, engine: Any, prompts: list[str]) -> Tensor:
        tok = engine.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids.to(engine.text_encoder.device)
        return engine.text_encoder(ids)[0]


class IPAdapterImagePrompt(ImagePromptAdapter):
    """The IP-Adapter-style image prompt of the paper (``ip_sd15_64.bin`` layout)."""

    name = "ip-adapter"
    description = "IP-Adapter-style image prompt: CLIP image tokens in decoupled cross-attention"

    def load(self, engine: Any, weights: str, encoder: str) -> Any:
        from .image_prompt import ImagePromptRuntime

        return ImagePromptRuntime.load(engine, weights, encoder)


CLIP = ClipTextEncoder()
IP_ADAPTER = IPAdapterImagePrompt()


@hookimpl
def register_prompt_encoders(register):
    register(CLIP)
    register(IP_ADAPTER)
