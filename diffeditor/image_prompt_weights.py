"""Image-prompt weights: reading ``ip_sd15_64.bin`` (or its safetensors form) safely and
validating it against a UNet. Part of :mod:`diffeditor.image_prompt` (which re-exports the public
names); the UNet side is :mod:`diffeditor.image_prompt_unet`, the CLIP side
:mod:`diffeditor.image_prompt_clip`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models.attention_processor import (
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterXFormersAttnProcessor,
)
from PIL import Image

from .errors import DiffEditorError

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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__



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
    for layer in cross_attention_layers(unet):
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
class CrossAttentionLayer:
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


def cross_attention_layers(unet: torch.nn.Module) -> list[CrossAttentionLayer]:
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
    layers: list[CrossAttentionLayer] = []
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
        layers.append(CrossAttentionLayer(name=name, index=index, hidden_size=hidden))
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
