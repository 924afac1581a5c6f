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

After :func:`attach_image_prompt` the UNet is called as::

    unet(z, t, encoder_hidden_states=text_tokens,
         added_cond_kwargs={"image_embeds": [clip_hidden_states]})

with ``clip_hidden_states`` of shape (B, N, D) = (B, 257, 1280) for ViT-H (what
:meth:`ImagePromptEncoder.encode` returns). diffusers itself wants (B, num_images, N, D); the
projection installed here accepts both and inserts the ``num_images = 1`` axis for 3-D input.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.models.attention_processor import (
    AttnProcessor2_0,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterXFormersAttnProcessor,
)
from diffusers.models.embeddings import IPAdapterPlusImageProjection, MultiIPAdapterImageProjection
from PIL import Image

from .errors import DiffEditorError

__all__ = [
    "DEFAULT_NUM_TOKENS",
    "IMAGE_PROMPT_SIZE",
    "IPStateDict",
    "ImagePromptEncoder",
    "ImagePromptError",
    "attach_image_prompt",
    "detach_image_prompt",
    "has_image_prompt",
    "image_prompt_attached",
    "image_prompt_kwargs",
    "load_ip_state_dict",
    "set_image_prompt_scale",
    "validate_ip_state_dict",
]

IPStateDict = dict[str, dict[str, torch.Tensor]]
"""``{"image_proj": {...resampler...}, "ip_adapter": {"1.to_k_ip.weight": ..., ...}}``."""

IMAGE_PROJ = "image_proj"
IP_ADAPTER = "ip_adapter"

DEFAULT_NUM_TOKENS = 64
"""Number of resampler queries, i.e. image tokens, of the released DiffEditor model."""

IMAGE_PROMPT_SIZE = 256
"""The reference resizes the image prompt to 256x256 before CLIP's own resize/centre-crop."""

RESAMPLER_DEPTH = 4
"""diffusers always builds ``IPAdapterPlusImageProjection`` with its default depth of 4."""

RESAMPLER_DIM_HEAD = 64
"""diffusers infers the resampler's head count as ``to_q rows // 64``."""

RESAMPLER_FF_MULT = 4

_WEIGHTS_HINT = (
    "run `diffeditor download` to fetch ip_sd15_64.bin (Hugging Face repo Adapter/DragonDiffusion, "
    "file model/ip_sd15_64.bin), or pass the path of a local copy"
)
_ENCODER_HINT = (
    "run `diffeditor download` to fetch the CLIP image encoder (Hugging Face repo h94/IP-Adapter, "
    "folder models/image_encoder), or pass a local folder holding its config.json and weights"
)
_TORCH_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt"})
_IP_PROCESSOR_TYPES = (
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterXFormersAttnProcessor,
)
_STATE_ATTR = "_diffeditor_image_prompt_saved"
_LAYERS_ATTR = "_diffeditor_image_prompt_layers"  # attn2 modules, for a cheap scale setter
# Submodules whose attention layers are not UNet layers (the attached resampler lives there).
_PROJECTION_PREFIXES = ("encoder_hid_proj.", "text_encoder_hid_proj.")

ImageInput = Image.Image | Sequence[Image.Image] | torch.Tensor


class ImagePromptError(DiffEditorError, ValueError):
    """A problem with the image-prompt weights, encoder or UNet.

    The message names the offending file, key or shape and says what to do about it.
    """


# --------------------------------------------------------------------------------------------
# Loading and validating the weights file
# --------------------------------------------------------------------------------------------


def load_ip_state_dict(path: str | os.PathLike[str]) -> IPStateDict:
    """Read image-prompt weights (``ip_sd15_64.bin`` layout) from disk, safely.

    ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` files are read with
    ``torch.load(..., map_location="cpu", weights_only=True)`` only, so a pickle that tries to
    build arbitrary objects (code execution) is refused, never run. ``.safetensors`` files must
    hold flat keys ``image_proj.<key>`` and ``ip_adapter.<key>``.

    Args:
        path: the weights file.

    Returns:
        ``{"image_proj": {...}, "ip_adapter": {...}}`` with CPU tensors. The content is not
        checked against a UNet here; call :func:`validate_ip_state_dict` for that.

    Raises:
        ImagePromptError: the file is missing, has an unknown suffix, cannot be read safely, or is
            not a dict of the two groups.
    """
    file = Path(path).expanduser()
    if file.is_dir():
        raise ImagePromptError(
            f"image-prompt weights path {file} is a folder; pass the weights file itself "
            f"(for example {file / 'ip_sd15_64.bin'}), or {_WEIGHTS_HINT}"
        )
    if not file.is_file():
        raise ImagePromptError(f"image-prompt weights not found at {file}: {_WEIGHTS_HINT}")

    suffix = file.suffix.lower()
    if suffix == ".safetensors":
        return _load_safetensors(file)
    if suffix not in _TORCH_SUFFIXES:
        raise ImagePromptError(
            f"image-prompt weights {file}: unknown file type {suffix!r}; expected one of "
            f"{', '.join(sorted(_TORCH_SUFFIXES | {'.safetensors'}))}"
        )
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure of the restricted unpickler or the archive reader
        raise ImagePromptError(
            f"could not load image-prompt weights {file} safely: torch.load(weights_only=True) "
            f"refused it ({type(exc).__name__}: {_first_line(exc)}). The file must be a plain "
            f"dict of tensors; never load weights from an untrusted source. To get a good copy, "
            f"{_WEIGHTS_HINT}"
        ) from exc
    return _as_ip_state_dict(loaded, str(file))


def _load_safetensors(file: Path) -> IPStateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        flat = load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ImagePromptError(
            f"could not read safetensors file {file} ({_first_line(exc)}); {_WEIGHTS_HINT}"
        ) from exc
    grouped: IPStateDict = {IMAGE_PROJ: {}, IP_ADAPTER: {}}
    for key, value in flat.items():
        group, _, rest = key.partition(".")
        if group not in grouped or not rest:
            raise ImagePromptError(
                f"safetensors file {file}: key {key!r} does not start with 'image_proj.' or "
                f"'ip_adapter.'; expected the flattened ip_sd15_64 layout"
            )
        grouped[group][rest] = value
    return grouped


def _as_ip_state_dict(obj: object, source: str) -> IPStateDict:
    if not isinstance(obj, Mapping):
        raise ImagePromptError(
            f"image-prompt weights {source}: expected a dict with keys 'image_proj' and "
            f"'ip_adapter', found {type(obj).__name__}"
        )
    out: IPStateDict = {}
    for key, value in obj.items():
        out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def validate_ip_state_dict(
    sd: Mapping[str, Any],
    unet: torch.nn.Module,
    num_tokens: int | None = DEFAULT_NUM_TOKENS,
    image_embed_dim: int | None = None,
) -> None:
    """Check that ``sd`` is an IP-Adapter-Plus state dict that fits ``unet`` exactly.

    Checks:

    * both groups ``image_proj`` and ``ip_adapter`` exist and hold floating-point tensors;
    * ``ip_adapter`` has exactly ``"{i}.to_k_ip.weight"`` and ``"{i}.to_v_ip.weight"`` for every
      cross-attention processor index ``i`` of ``unet`` (1, 3, 5, ... for SD 1.5), each of shape
      (layer width, ``unet.config.cross_attention_dim``);
    * ``image_proj`` has exactly the keys and shapes of an IP-Adapter-Plus resampler of depth 4
      with ``num_tokens`` queries, 64-dim heads and output dim
      ``unet.config.cross_attention_dim``. Its CLIP input width, query width and head count are
      read from ``proj_in.weight``, ``latents`` and ``layers.0.0.to_q.weight``.

    Args:
        sd: the state dict, as returned by :func:`load_ip_state_dict`.
        unet: the ``UNet2DConditionModel`` it is meant for (meta-device models are fine).
        num_tokens: required number of resampler queries; ``None`` accepts any.
        image_embed_dim: required CLIP hidden width (1280 for ViT-H); ``None`` accepts any.

    Raises:
        ImagePromptError: naming each missing, unexpected or wrongly shaped key with the
            expected and found shapes, or saying why ``unet`` cannot take an image prompt.
    """
    if not isinstance(sd, Mapping):
        raise ImagePromptError(
            f"image-prompt state dict must be a dict with keys 'image_proj' and 'ip_adapter', "
            f"found {type(sd).__name__}"
        )
    for group in (IMAGE_PROJ, IP_ADAPTER):
        if group not in sd:
            raise ImagePromptError(
                f"image-prompt state dict has no {group!r} entry (found keys "
                f"{sorted(map(str, sd))[:8]}); expected the ip_sd15_64.bin layout with "
                f"'image_proj' and 'ip_adapter'; {_WEIGHTS_HINT}"
            )
        if not isinstance(sd[group], Mapping):
            raise ImagePromptError(
                f"image-prompt state dict entry {group!r} must be a dict of tensors, found "
                f"{type(sd[group]).__name__}"
            )

    cross_dim = _cross_attention_dim(unet)
    proj = sd[IMAGE_PROJ]
    expected_proj = _expected_resampler_shapes(proj, cross_dim, num_tokens, image_embed_dim)
    _check_group(
        proj,
        expected_proj,
        IMAGE_PROJ,
        note=f"an IP-Adapter-Plus resampler of depth {RESAMPLER_DEPTH} as diffusers builds it",
    )

    expected_ip = {}
    for layer in _cross_attention_layers(unet):
        shape = (layer.hidden_size, cross_dim)
        expected_ip[f"{layer.index}.to_k_ip.weight"] = shape
        expected_ip[f"{layer.index}.to_v_ip.weight"] = shape
    _check_group(
        sd[IP_ADAPTER],
        expected_ip,
        IP_ADAPTER,
        note="one to_k_ip/to_v_ip pair per cross-attention layer of this UNet",
    )


@dataclass(frozen=True)
class _CrossAttnLayer:
    name: str  # processor name, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"
    index: int  # position in unet.attn_processors == the weights file's key index
    hidden_size: int


def _cross_attention_dim(unet: torch.nn.Module) -> int:
    config = getattr(unet, "config", None)
    dim = getattr(config, "cross_attention_dim", None)
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise ImagePromptError(
            f"{type(unet).__name__} has cross_attention_dim={dim!r}; the image prompt needs a "
            f"UNet2DConditionModel with one integer cross_attention_dim"
        )
    return dim


def _cross_attention_layers(unet: torch.nn.Module) -> list[_CrossAttnLayer]:
    """The cross-attention layers exactly as diffusers' IP-Adapter loader numbers them.

    diffusers numbers cross-attention processors 1, 3, 5, ... (assuming attn1/attn2 alternate)
    and derives each layer's width from ``block_out_channels``; the weights file numbers them by
    their position in ``unet.attn_processors``. Both must agree with the real modules, or the
    loader would put weights in the wrong layers, so anything else is refused here.
    """
    processors = getattr(unet, "attn_processors", None)
    config = getattr(unet, "config", None)
    channels = list(getattr(config, "block_out_channels", ()) or ())
    if not isinstance(processors, Mapping) or not channels:
        raise ImagePromptError(
            f"{type(unet).__name__} is not a UNet2DConditionModel-like model (no attn_processors "
            f"or block_out_channels); the image prompt cannot be attached to it"
        )
    cross_dim = _cross_attention_dim(unet)
    layers: list[_CrossAttnLayer] = []
    key_id = 1
    names = [n for n in processors if not n.startswith(_PROJECTION_PREFIXES)]
    for index, name in enumerate(names):
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        hidden = _diffusers_hidden_size(name, channels)
        module = unet.get_submodule(name.removesuffix(".processor"))
        to_k = getattr(module, "to_k", None)
        actual = (getattr(to_k, "out_features", None), getattr(to_k, "in_features", None))
        if hidden is None or key_id != index or actual != (hidden, cross_dim):
            raise ImagePromptError(
                f"UNet attention layer {name!r} (processor index {index}) does not fit diffusers' "
                f"IP-Adapter loader, which expects index {key_id}, width {hidden} and "
                f"cross-attention input {cross_dim} but the layer has to_k "
                f"{actual[1]} -> {actual[0]}; only SD-1.x-layout UNets (attn1/attn2 pairs in "
                f"transformer blocks) can take the image prompt"
            )
        layers.append(_CrossAttnLayer(name=name, index=index, hidden_size=hidden))
        key_id += 2
    if not layers:
        raise ImagePromptError(
            f"{type(unet).__name__} has no cross-attention (attn2) layers; the image prompt needs "
            f"a text-conditioned UNet2DConditionModel"
        )
    return layers


def _diffusers_hidden_size(name: str, channels: list[int]) -> int | None:
    # Mirrors UNet2DConditionLoadersMixin._convert_ip_adapter_attn_to_diffusers.
    if name.startswith("mid_block"):
        return int(channels[-1])
    for prefix, widths in (("up_blocks.", channels[::-1]), ("down_blocks.", channels)):
        if name.startswith(prefix):
            block = name[len(prefix) : len(prefix) + 1]
            if block.isdigit() and int(block) < len(widths):
                return int(widths[int(block)])
    return None


def _expected_resampler_shapes(
    proj: Mapping[str, Any],
    out_dim: int,
    num_tokens: int | None,
    image_embed_dim: int | None,
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an IP-Adapter-Plus resampler (original, non-diffusers key names)."""
    for anchor, ndim in (("latents", 3), ("proj_in.weight", 2), ("layers.0.0.to_q.weight", 2)):
        value = proj.get(anchor)
        if not isinstance(value, torch.Tensor) or value.ndim != ndim:
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else "missing"
            raise ImagePromptError(
                f"image_proj.{anchor}: expected a {ndim}-D tensor, found {found}; the image "
                f"projection must be a 64-query IP-Adapter-Plus resampler (keys latents, proj_in, "
                f"layers.N.0.to_q/to_kv/to_out, layers.N.1.*, proj_out, norm_out). Plain, Full "
                f"or FaceID IP-Adapter files are not DiffEditor's image prompt"
            )
    latents = proj["latents"]
    queries, width = int(latents.shape[1]), int(latents.shape[2])
    clip_dim = int(proj["proj_in.weight"].shape[1])
    inner = int(proj["layers.0.0.to_q.weight"].shape[0])

    if latents.shape[0] != 1 or (num_tokens is not None and queries != num_tokens):
        expected_q = num_tokens if num_tokens is not None else queries
        raise ImagePromptError(
            f"image_proj.latents: expected shape (1, {expected_q}, {width}), found "
            f"{tuple(latents.shape)} ({queries} queries instead of {expected_q} image tokens)"
        )
    if image_embed_dim is not None and clip_dim != image_embed_dim:
        raise ImagePromptError(
            f"image_proj.proj_in.weight: expected shape ({width}, {image_embed_dim}) for a CLIP "
            f"encoder of width {image_embed_dim}, found {tuple(proj['proj_in.weight'].shape)}"
        )
    if inner == 0 or inner % RESAMPLER_DIM_HEAD:
        raise ImagePromptError(
            f"image_proj.layers.0.0.to_q.weight: found shape "
            f"{tuple(proj['layers.0.0.to_q.weight'].shape)}; its first dim must be a multiple of "
            f"{RESAMPLER_DIM_HEAD} because diffusers builds the resampler with "
            f"{RESAMPLER_DIM_HEAD}-dim heads"
        )

    ff = width * RESAMPLER_FF_MULT
    shapes: dict[str, tuple[int, ...]] = {
        "latents": (1, queries, width),
        "proj_in.weight": (width, clip_dim),
        "proj_in.bias": (width,),
        "proj_out.weight": (out_dim, width),
        "proj_out.bias": (out_dim,),
        "norm_out.weight": (out_dim,),
        "norm_out.bias": (out_dim,),
    }
    for i in range(RESAMPLER_DEPTH):
        attn, ffn = f"layers.{i}.0", f"layers.{i}.1"
        shapes.update(
            {
                f"{attn}.norm1.weight": (width,),
                f"{attn}.norm1.bias": (width,),
                f"{attn}.norm2.weight": (width,),
                f"{attn}.norm2.bias": (width,),
                f"{attn}.to_q.weight": (inner, width),
                f"{attn}.to_kv.weight": (2 * inner, width),
                f"{attn}.to_out.weight": (width, inner),
                f"{ffn}.0.weight": (width,),
                f"{ffn}.0.bias": (width,),
                f"{ffn}.1.weight": (ff, width),
                f"{ffn}.3.weight": (width, ff),
            }
        )
    return shapes


def _check_group(
    found: Mapping[str, Any],
    expected: Mapping[str, tuple[int, ...]],
    group: str,
    note: str,
) -> None:
    problems: list[str] = []
    for key, value in found.items():
        if key not in expected:
            problems.append(f"{group}.{key}: unexpected key (not part of {note})")
        elif not isinstance(value, torch.Tensor) or not value.is_floating_point():
            kind = (
                f"{value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
            )
            problems.append(f"{group}.{key}: expected a floating-point tensor, found {kind}")
        elif tuple(value.shape) != tuple(expected[key]):
            problems.append(
                f"{group}.{key}: expected shape {tuple(expected[key])}, found {tuple(value.shape)}"
            )
    for key, shape in expected.items():
        if key not in found:
            problems.append(f"{group}.{key}: missing (expected shape {tuple(shape)})")
    if problems:
        shown = "\n  ".join(problems[:12])
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise ImagePromptError(
            f"image-prompt weights do not fit this UNet ({note}):\n  {shown}{more}\n"
            f"Use the ip_sd15_64.bin that matches the base model; {_WEIGHTS_HINT}"
        )


# --------------------------------------------------------------------------------------------
# Attaching to / detaching from a UNet
# --------------------------------------------------------------------------------------------


class _TokenImageProjection(MultiIPAdapterImageProjection):
    """diffusers' multi-adapter projection that also takes (B, N, D) CLIP token tensors.

    diffusers reads ``image_embeds[k]`` as (B, num_images, N, D) and flattens the first two axes;
    a (B, N, D) tensor would be misread as N images of pooled embeddings. Here a 3-D tensor gets
    the ``num_images = 1`` axis inserted, so callers can pass the encoder output directly. The
    wrapped layers (and hence state-dict keys) are diffusers' own.
    """

    def forward(self, image_embeds: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        embeds = [image_embeds] if isinstance(image_embeds, torch.Tensor) else list(image_embeds)
        fixed: list[torch.Tensor] = []
        for embed, layer in zip(embeds, self.image_projection_layers):
            expected_dim = getattr(getattr(layer, "proj_in", None), "in_features", None)
            if not isinstance(embed, torch.Tensor) or embed.ndim not in (3, 4):
                shape = tuple(embed.shape) if isinstance(embed, torch.Tensor) else type(embed)
                raise ImagePromptError(
                    f"image_embeds must be CLIP penultimate hidden states of shape (B, N, D) or "
                    f"(B, 1, N, D), found {shape}; pass ImagePromptEncoder.encode(...) output "
                    f"(hidden_states[-2]), not pooled image_embeds"
                )
            if expected_dim is not None and embed.shape[-1] != expected_dim:
                raise ImagePromptError(
                    f"image_embeds last dim is {embed.shape[-1]} but the image-prompt resampler "
                    f"expects CLIP width {expected_dim}; use the CLIP encoder that matches the "
                    f"weights"
                )
            fixed.append(embed.unsqueeze(1) if embed.ndim == 3 else embed)
        fixed.extend(embeds[len(fixed) :])  # let diffusers report a count mismatch
        return super().forward(fixed)


@dataclass(frozen=True)
class _SavedUNetState:
    """Everything ``_load_ip_adapter_weights`` changes, as it was before attaching."""

    processors: dict[str, Any]
    encoder_hid_proj: torch.nn.Module | None
    encoder_hid_proj_registered: bool  # held in unet._modules (vs a plain attribute)
    encoder_hid_dim_type: Any
    had_text_encoder_hid_proj: bool
    text_encoder_hid_proj: Any


def attach_image_prompt(
    unet: torch.nn.Module,
    state_dict: Mapping[str, Any],
    scale: float = 0.0,
    *,
    num_tokens: int | None = DEFAULT_NUM_TOKENS,
) -> None:
    """Install the image prompt in ``unet`` with diffusers' IP-Adapter machinery.

    Validates ``state_dict`` (see :func:`validate_ip_state_dict`), then calls
    ``unet._load_ip_adapter_weights`` which sets ``unet.encoder_hid_proj`` to an
    ``IPAdapterPlusImageProjection`` (64 queries, depth 4), sets
    ``unet.config.encoder_hid_dim_type = "ip_image_proj"`` and puts ``IPAdapterAttnProcessor2_0``
    (or the xformers variant) in every ``attn2`` layer. The self-attention (``attn1``)
    processors are kept as they were (the same objects), and the projection is wrapped so that
    (B, N, D) CLIP tokens are accepted (see :func:`image_prompt_kwargs`).

    The UNet's state before attaching is remembered on the UNet; :func:`detach_image_prompt`
    restores it exactly. Attaching new weights to a UNet that already carries an image prompt from
    this function replaces the old one (after the new weights have been validated).

    Args:
        unet: a ``UNet2DConditionModel`` with one device and one floating dtype.
        state_dict: ``{"image_proj": ..., "ip_adapter": ...}`` (see :func:`load_ip_state_dict`);
            it is copied into new modules with the UNet's device and dtype.
        scale: the initial image-prompt weight gamma (0 disables the image branch).
        num_tokens: required number of image tokens (resampler queries); ``None`` accepts any.

    Raises:
        ImagePromptError: the weights do not fit the UNet, the UNet already has an IP-Adapter
            from another loader, or its parameters are spread over several devices/dtypes.
    """
    gamma = _check_gamma(scale)
    ours = getattr(unet, _STATE_ATTR, None) is not None
    if not ours and (has_image_prompt(unet) or _ip_processors(unet)):
        raise ImagePromptError(
            "this UNet already has IP-Adapter processors that attach_image_prompt did not install "
            "(for example from pipe.load_ip_adapter); call pipe.unload_ip_adapter() first"
        )
    validate_ip_state_dict(state_dict, unet, num_tokens=num_tokens)
    _check_uniform_placement(unet)
    if ours:
        detach_image_prompt(unet)

    saved = _snapshot(unet)
    cross_names = {layer.name for layer in _cross_attention_layers(unet)}
    try:
        # diffusers re-creates every non-cross processor as ``type(old)()``; give it plain
        # processors there so custom ones (e.g. with constructor arguments) survive untouched.
        _set_processors(
            unet,
            {name: AttnProcessor2_0() for name in saved.processors if name not in cross_names},
        )
        groups = {
            IMAGE_PROJ: dict(state_dict[IMAGE_PROJ]),
            IP_ADAPTER: dict(state_dict[IP_ADAPTER]),
        }
        unet._load_ip_adapter_weights([groups], low_cpu_mem_usage=False)
        _set_processors(
            unet,
            {name: proc for name, proc in saved.processors.items() if name not in cross_names},
        )
        unet.encoder_hid_proj = _TokenImageProjection(unet.encoder_hid_proj.image_projection_layers)
        if not isinstance(
            unet.encoder_hid_proj.image_projection_layers[0], IPAdapterPlusImageProjection
        ):
            raise ImagePromptError("diffusers did not build an IP-Adapter-Plus projection")
    except Exception as exc:
        _restore(unet, saved)
        if isinstance(exc, ImagePromptError):
            raise
        raise ImagePromptError(
            f"diffusers' IP-Adapter loader failed on weights that passed validation "
            f"({type(exc).__name__}: {_first_line(exc)}); the UNet was left unchanged"
        ) from exc
    setattr(unet, _STATE_ATTR, saved)
    setattr(
        unet,
        _LAYERS_ATTR,
        tuple(unet.get_submodule(name.removesuffix(".processor")) for name in sorted(cross_names)),
    )
    set_image_prompt_scale(unet, gamma)


def detach_image_prompt(unet: torch.nn.Module) -> None:
    """Remove the image prompt installed by :func:`attach_image_prompt`.

    Restores the UNet's original attention-processor objects, ``encoder_hid_proj``,
    ``config.encoder_hid_dim_type`` and ``text_encoder_hid_proj`` exactly, so the UNet computes
    bit-identical outputs to before attaching. Processors installed *after* attaching are
    discarded along with the image prompt.

    Raises:
        ImagePromptError: nothing was attached by :func:`attach_image_prompt`.
    """
    saved = getattr(unet, _STATE_ATTR, None)
    if saved is None:
        raise ImagePromptError(
            "detach_image_prompt: this UNet has no image prompt attached by attach_image_prompt"
        )
    _restore(unet, saved)
    delattr(unet, _STATE_ATTR)
    if hasattr(unet, _LAYERS_ATTR):
        delattr(unet, _LAYERS_ATTR)


@contextlib.contextmanager
def image_prompt_attached(
    unet: torch.nn.Module,
    state_dict: Mapping[str, Any],
    scale: float = 0.0,
    *,
    num_tokens: int | None = DEFAULT_NUM_TOKENS,
) -> Iterator[torch.nn.Module]:
    """Context manager: :func:`attach_image_prompt` on entry, :func:`detach_image_prompt` on exit.

    Yields the UNet. The UNet is restored even when the body raises.
    """
    attach_image_prompt(unet, state_dict, scale, num_tokens=num_tokens)
    try:
        yield unet
    finally:
        detach_image_prompt(unet)


def set_image_prompt_scale(unet: torch.nn.Module, gamma: float) -> None:
    """Set the image-prompt weight gamma on every IP-Adapter attention processor of ``unet``.

    Cheap (no reloading; microseconds when the image prompt came from
    :func:`attach_image_prompt`, whose cross-attention layers are remembered): meant to be called
    at every sampling step to implement the image prompt's step window. With ``gamma == 0``
    diffusers skips the image branch of the attention entirely (the resampler still runs inside
    the UNet's forward, since ``image_embeds`` must still be passed).

    Raises:
        ImagePromptError: ``gamma`` is not a finite number, or no image prompt is attached.
    """
    value = _check_gamma(gamma)
    layers = getattr(unet, _LAYERS_ATTR, ())
    processors = [layer.processor for layer in layers]
    if not processors or not all(isinstance(p, _IP_PROCESSOR_TYPES) for p in processors):
        processors = _ip_processors(unet)  # changed since attaching, or another loader's adapter
    if not processors:
        raise ImagePromptError(
            "set_image_prompt_scale: the UNet has no image prompt; call attach_image_prompt first"
        )
    for proc in processors:
        proc.scale = [value] * len(proc.scale)


def has_image_prompt(unet: torch.nn.Module) -> bool:
    """Whether ``unet`` currently has an IP-Adapter image prompt installed (by any loader)."""
    config = getattr(unet, "config", None)
    return (
        isinstance(getattr(unet, "encoder_hid_proj", None), MultiIPAdapterImageProjection)
        and getattr(config, "encoder_hid_dim_type", None) == "ip_image_proj"
        and bool(_ip_processors(unet))
    )


def image_prompt_kwargs(clip_hidden_states: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """``added_cond_kwargs`` for a UNet with the image prompt: ``{"image_embeds": [x]}``.

    Args:
        clip_hidden_states: (B, N, D) penultimate CLIP hidden states (the batch must match the
            latent batch, e.g. ``[uncond; cond]`` for classifier-free guidance).
    """
    if clip_hidden_states.ndim != 3:
        raise ImagePromptError(
            f"clip_hidden_states must be (B, N, D), found {tuple(clip_hidden_states.shape)}"
        )
    return {"image_embeds": [clip_hidden_states]}


def _ip_processors(unet: torch.nn.Module) -> list[Any]:
    processors = getattr(unet, "attn_processors", None)
    if not isinstance(processors, Mapping):
        return []
    return [p for p in processors.values() if isinstance(p, _IP_PROCESSOR_TYPES)]


def _check_gamma(gamma: float) -> float:
    try:
        value = float(gamma)
    except (TypeError, ValueError) as exc:
        raise ImagePromptError(f"image-prompt scale must be a number, found {gamma!r}") from exc
    if not math.isfinite(value):
        raise ImagePromptError(f"image-prompt scale must be finite, found {gamma!r}")
    return value


def _check_uniform_placement(unet: torch.nn.Module) -> None:
    # The loader ends with ``unet.to(dtype=unet.dtype, device=unet.device)``, which would silently
    # cast a mixed-precision or spread-out UNet; refuse instead of changing it.
    placements = {
        (t.device, t.dtype) for t in [*unet.parameters(), *unet.buffers()] if t.is_floating_point()
    }
    if len(placements) > 1:
        found = ", ".join(sorted(f"{d}/{t}" for d, t in placements))
        raise ImagePromptError(
            f"the UNet's floating-point tensors are on several devices/dtypes ({found}); move it "
            f"to one device and dtype (unet.to(device, dtype)) before attaching the image prompt"
        )


def _snapshot(unet: torch.nn.Module) -> _SavedUNetState:
    text_proj = "text_encoder_hid_proj"
    had_text_proj = text_proj in unet._modules or text_proj in vars(unet)
    return _SavedUNetState(
        processors={
            name: proc
            for name, proc in unet.attn_processors.items()
            if not name.startswith(_PROJECTION_PREFIXES)
        },
        encoder_hid_proj=unet.encoder_hid_proj,
        encoder_hid_proj_registered="encoder_hid_proj" in unet._modules,
        encoder_hid_dim_type=unet.config.encoder_hid_dim_type,
        had_text_encoder_hid_proj=had_text_proj,
        text_encoder_hid_proj=getattr(unet, text_proj) if had_text_proj else None,
    )


def _restore(unet: torch.nn.Module, saved: _SavedUNetState) -> None:
    # The projection goes first: while attached, its resampler's own Attention layers show up in
    # ``unet.attn_processors`` (which is why ``set_attn_processor(dict)`` cannot be used here).
    _put_attribute(
        unet, "encoder_hid_proj", saved.encoder_hid_proj, saved.encoder_hid_proj_registered
    )
    # diffusers' FrozenDict accepts attribute assignment (its frozen flag is name-mangled and
    # never seen), and the loader sets this attribute only; the dict entry is never touched.
    unet.config.encoder_hid_dim_type = saved.encoder_hid_dim_type
    _set_processors(unet, saved.processors)
    if saved.had_text_encoder_hid_proj:
        unet.text_encoder_hid_proj = saved.text_encoder_hid_proj
    elif "text_encoder_hid_proj" in unet._modules or "text_encoder_hid_proj" in vars(unet):
        delattr(unet, "text_encoder_hid_proj")


def _set_processors(unet: torch.nn.Module, processors: Mapping[str, Any]) -> None:
    """Set attention processors by name, layer by layer.

    ``unet.set_attn_processor(dict)`` insists on a processor for *every* attention layer, which
    after attaching includes the resampler's own layers inside ``encoder_hid_proj``.
    """
    for name, proc in processors.items():
        unet.get_submodule(name.removesuffix(".processor")).set_processor(proc)


def _put_attribute(module: torch.nn.Module, name: str, value: Any, registered: bool) -> None:
    """Set ``module.name`` in the same slot (submodule registry or plain attribute) as before."""
    module._modules.pop(name, None)
    vars(module).pop(name, None)
    if registered or isinstance(value, torch.nn.Module):
        module._modules[name] = value
    else:
        vars(module)[name] = value


# --------------------------------------------------------------------------------------------
# CLIP image encoder
# --------------------------------------------------------------------------------------------


def _clip_processor_class() -> type:
    """The PIL-based CLIP image processor (the classic implementation the reference used).

    transformers >= 5 defaults ``CLIPImageProcessor`` to a torchvision backend and falls back to
    ``CLIPImageProcessorPil`` with a warning when torchvision is missing; asking for the PIL one
    directly gives the same numbers either way and no warning.
    """
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:  # transformers < 5: CLIPImageProcessor is the PIL implementation
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


class ImagePromptEncoder:
    """CLIP vision tower + image processor producing the image prompt's input tokens.

    :meth:`encode` returns the *penultimate* hidden state ``hidden_states[-2]`` of a
    ``CLIPVisionModelWithProjection``, shape (B, N, D) = (B, 257, 1280) for ViT-H/14. Preprocessing
    follows the reference: resize the image prompt to ``prompt_size`` x ``prompt_size`` (256,
    bicubic), then CLIP's processor resizes the short side and centre-crops to the model's input
    size (224) and normalises.

    Args:
        model: the CLIP vision model (its device and dtype are used for inputs); it is put in
            eval mode with gradients off.
        processor: a CLIP image processor; default: one sized for ``model.config.image_size``.
        prompt_size: the square size the image is resized to first; ``None`` skips that step.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any | None = None,
        *,
        prompt_size: int | None = IMAGE_PROMPT_SIZE,
    ) -> None:
        if prompt_size is not None and prompt_size <= 0:
            raise ImagePromptError(f"prompt_size must be positive or None, found {prompt_size}")
        self.model = model.eval().requires_grad_(False)
        self.processor = processor if processor is not None else self._default_processor()
        self.prompt_size = prompt_size

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike[str],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        prompt_size: int | None = IMAGE_PROMPT_SIZE,
    ) -> ImagePromptEncoder:
        """Load a ``CLIPVisionModelWithProjection`` from a local folder (never downloads).

        Uses the folder's ``preprocessor_config.json`` when present, else the default CLIP
        processor sized for the model (224 for ViT-H, as the reference's ``CLIPImageProcessor()``).

        Raises:
            ImagePromptError: the folder or its ``config.json`` is missing or cannot be loaded.
        """
        from transformers import CLIPVisionModelWithProjection

        root = Path(folder).expanduser()
        if not root.is_dir():
            raise ImagePromptError(f"CLIP image encoder folder not found: {root}; {_ENCODER_HINT}")
        if not (root / "config.json").is_file():
            raise ImagePromptError(
                f"CLIP image encoder folder {root} has no config.json; {_ENCODER_HINT}"
            )
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(
                str(root), dtype=dtype, local_files_only=True
            )
            processor = None
            if (root / "preprocessor_config.json").is_file():
                processor = _clip_processor_class().from_pretrained(
                    str(root), local_files_only=True
                )
        except (OSError, ValueError, RuntimeError) as exc:
            raise ImagePromptError(
                f"could not load the CLIP image encoder from {root} ({_first_line(exc)}); "
                f"{_ENCODER_HINT}"
            ) from exc
        return cls(model.to(device), processor, prompt_size=prompt_size)

    @property
    def device(self) -> torch.device:
        """Device of the CLIP model."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the CLIP model."""
        return next(self.model.parameters()).dtype

    @property
    def image_size(self) -> int:
        """The CLIP model's input resolution (224 for ViT-H/14)."""
        return int(self.model.config.image_size)

    @property
    def hidden_size(self) -> int:
        """Width D of the returned tokens (1280 for ViT-H/14)."""
        return int(self.model.config.hidden_size)

    def _default_processor(self) -> Any:
        size = self.image_size
        return _clip_processor_class()(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """Images -> CLIP ``pixel_values`` (B, 3, S, S) on the model's device and dtype.

        Args:
            images: a PIL image, a list of them, or a tensor (B, 3, H, W) / (3, H, W) of RGB
                values in [0, 1] (float) or 0..255 (uint8). Tensors are turned into 8-bit PIL
                images so they take exactly the same path as files.
        """
        pil_images = _to_pil_list(images)
        if self.prompt_size is not None:
            size = (self.prompt_size, self.prompt_size)
            pil_images = [im.resize(size, Image.Resampling.BICUBIC) for im in pil_images]
        pixel_values = self.processor(images=pil_images, return_tensors="pt").pixel_values
        return pixel_values.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def encode_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Run CLIP on ready ``pixel_values`` and return ``hidden_states[-2]`` (B, N, D)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ImagePromptError(
                f"pixel_values must be (B, 3, H, W), found {tuple(pixel_values.shape)}"
            )
        out = self.model(
            pixel_values=pixel_values.to(device=self.device, dtype=self.dtype),
            output_hidden_states=True,
        )
        return out.hidden_states[-2]

    def encode(self, images: ImageInput) -> torch.Tensor:
        """Image prompt(s) -> penultimate CLIP hidden states (B, N, D) (see :meth:`preprocess`)."""
        return self.encode_pixel_values(self.preprocess(images))

    def encode_unconditional(self, batch: int = 1) -> torch.Tensor:
        """The unconditional image prompt: CLIP of all-zero ``pixel_values`` (B, N, D).

        As in the reference (``torch.zeros_like(clip_image)``), the zeros are the *normalised*
        pixel values, i.e. the mean colour image, not a black image.
        """
        if batch < 1:
            raise ImagePromptError(f"batch must be >= 1, found {batch}")
        size = self.image_size
        zeros = torch.zeros(batch, 3, size, size, device=self.device, dtype=self.dtype)
        return self.encode_pixel_values(zeros)


def _to_pil_list(images: ImageInput) -> list[Image.Image]:
    if isinstance(images, Image.Image):
        return [images.convert("RGB")]
    if isinstance(images, torch.Tensor):
        return _tensor_to_pil(images)
    items = list(images)
    if not items or not all(isinstance(im, Image.Image) for im in items):
        raise ImagePromptError(
            "images must be a PIL image, a non-empty list of PIL images, or a (B, 3, H, W) tensor"
        )
    return [im.convert("RGB") for im in items]


def _tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    batch = images.unsqueeze(0) if images.ndim == 3 else images
    if batch.ndim != 4 or batch.shape[1] != 3 or batch.shape[0] == 0:
        raise ImagePromptError(
            f"image tensor must be (B, 3, H, W) or (3, H, W) RGB, found {tuple(images.shape)}"
        )
    batch = batch.detach().cpu()
    if batch.dtype == torch.uint8:
        data = batch
    elif batch.is_floating_point():
        lo, hi = float(batch.min()), float(batch.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ImagePromptError(
                f"float image tensor values must lie in [0, 1], found [{lo:.3f}, {hi:.3f}]; "
                f"map [-1, 1] images with (x + 1) / 2 first"
            )
        data = (batch.float().clamp(0, 1) * 255).round().to(torch.uint8)
    else:
        raise ImagePromptError(
            f"image tensor must be float in [0, 1] or uint8, found {batch.dtype}"
        )
    arrays = data.permute(0, 2, 3, 1).contiguous().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
        image encoder from ``encoder_folder``."""
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
