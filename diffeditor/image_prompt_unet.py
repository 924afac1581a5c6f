"""Attaching the image prompt to a UNet and detaching it exactly, through diffusers'
IP-Adapter machinery (``IPAdapterPlusImageProjection``, ``IPAdapterAttnProcessor2_0``). Part of
:mod:`diffeditor.image_prompt` (which re-exports the public names)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.embeddings import IPAdapterPlusImageProjection, MultiIPAdapterImageProjection

from .image_prompt_weights import (
    _IP_PROCESSOR_TYPES,
    _LAYERS_ATTR,
    _PROJECTION_PREFIXES,
    _STATE_ATTR,
    DEFAULT_NUM_TOKENS,
    IMAGE_PROJ,
    IP_ADAPTER,
    ImagePromptError,
    _first_line,
    cross_attention_layers,
    validate_ip_state_dict,
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
    cross_names = {layer.name for layer in cross_attention_layers(unet)}
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
