"""The CLIP side of the image prompt: the vision tower and image processor that turn an image
into the tokens the resampler reads. Part of :mod:`diffeditor.image_prompt` (which re-exports
the public names)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .image_prompt_weights import (
    _ENCODER_HINT,
    IMAGE_PROMPT_SIZE,
    ImageInput,
    ImagePromptError,
    _first_line,
)

# --------------------------------------------------------------------------------------------
# CLIP image encoder
# --------------------------------------------------------------------------------------------


def clip_processor_class() -> type:
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
                processor = clip_processor_class().from_pretrained(
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
        return clip_processor_class()(
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
