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


def _ids(tok, prompts: list[str], device) -> Tensor:
    return tok(prompts, padding="max_length", max_length=tok.model_max_length,
               truncation=True, return_tensors="pt").input_ids.to(device)


class ClipTextEncoder(TextPromptEncoder):
    """The model's tokenizer and CLIP text model (padded to the tokenizer's 77 tokens).

    * SD 1.x and 2.x: the text model's last hidden state (SD 2.x's OpenCLIP ViT-H as diffusers
      converts it: a ``CLIPTextModel`` whose config already drops the last layer);
    * SDXL (the engine has ``text_encoder_2``): both encoders' penultimate hidden states side
      by side (768 + 1280 = 2048 wide), and the second one's pooled, projected embedding
      carried as one more token (zero-padded to the width) at the end: ``(B, 78, 2048)``; the
      engine splits it off into ``added_cond_kwargs["text_embeds"]`` for every UNet call.
    """

    name = "clip"
    description = "the model's CLIP text encoder (Stable Diffusion's own conditioning)"

    @torch.no_grad()
    def encode(self, engine: Any, prompts: list[str]) -> Tensor:
        enc2 = getattr(engine, "text_encoder_2", None)
        if enc2 is None:
            ids = _ids(engine.tokenizer, prompts, engine.text_encoder.device)
            return engine.text_encoder(ids)[0]
        states = []
        for tok, enc in ((engine.tokenizer, engine.text_encoder), (engine.tokenizer_2, enc2)):
            out = enc(_ids(tok, prompts, enc.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
        pooled = out[0]  # CLIPTextModelWithProjection: text_embeds (B, projection_dim)
        hidden = torch.cat([s.to(pooled.dtype) for s in states], dim=-1)
        if pooled.shape[-1] > hidden.shape[-1]:
            raise ValueError(f"pooled embedding of width {pooled.shape[-1]} is wider than the "
                             f"context ({hidden.shape[-1]})")
        last = torch.zeros_like(hidden[:, :1])
        last[:, 0, : pooled.shape[-1]] = pooled
        return torch.cat([hidden, last], dim=1)


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
