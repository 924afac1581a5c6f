"""Loading a model folder's frozen parts (text encoder, tokenizer, VAE, UNet, noise schedule)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .loop import TrainError


@dataclass
class Frozen:
    location: Path
    entry: object | None
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module | None = None
    unet: torch.nn.Module | None = None
    noise: object | None = None


def model_folder(model: str) -> tuple[Path, object | None]:
    """A registered model name or a local diffusers folder -> (folder, model entry or None)."""
    from diffeditor.errors import DiffEditorError
    from diffeditor.models import resolve_model

    try:
        location, entry = resolve_model(model)
    except DiffEditorError as exc:
        raise TrainError(str(exc).splitlines()[0]) from None
    folder = Path(location)
    if not (folder / "model_index.json").is_file():
        raise TrainError(f"--model {model}: {folder} is not a local diffusers folder (no "
                         f"model_index.json); training needs the weights on disk")
    return folder, entry


def load_frozen(model: str, device: torch.device, *, vae: bool = False, unet: bool = False) -> Frozen:
    """The model's parts, frozen (eval mode, no gradients), in float32 on ``device``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder, entry = model_folder(model)

    def frozen(m):
        return m.to(device).eval().requires_grad_(False)

    parts = Frozen(
        location=folder, entry=entry,
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True),
        text_encoder=frozen(CLIPTextModel.from_pretrained(
            folder / "text_encoder", dtype=torch.float32, local_files_only=True)),
    )
    if vae:
        parts.vae = frozen(AutoencoderKL.from_pretrained(
            folder / "vae", torch_dtype=torch.float32, local_files_only=True))
    if unet:
        parts.unet = frozen(UNet2DConditionModel.from_pretrained(
            folder / "unet", torch_dtype=torch.float32, local_files_only=True))
        parts.noise = DDPMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    return parts


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def encode_text(parts: Frozen, captions: list[str], batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden states (N, 77, D), pooled (N, D)) of the frozen text encoder."""
    device = next(parts.text_encoder.parameters()).device
    hidden, pooled = [], []
    for i in range(0, len(captions), batch):
        ids = tokenize(parts.tokenizer, captions[i:i + batch]).to(device)
        out = parts.text_encoder(ids)
        hidden.append(out.last_hidden_state.cpu())
        pooled.append(out.pooler_output.cpu())
    return torch.cat(hidden), torch.cat(pooled)


def to_model_images(images, device) -> torch.Tensor:
    """uint8 (H, W, 3) arrays -> (B, 3, H, W) float in [-1, 1]."""
    import numpy as np

    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return (x / 127.5 - 1.0).to(device)


def diffusion_target(noise_sched, latents, noise, t):
    kind = noise_sched.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_sched.get_velocity(latents, noise, t)
    raise TrainError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")
