"""Tiny random pipelines in the real diffusers layouts of SD 2.x (768-v) and SDXL, saved with
``save_pretrained`` the way a converted checkpoint folder is: what ``test_backbones.py`` loads
through the public CLI. Only the widths are small; the structure (block types, attention
layout, text encoders, added conditions, scheduler) is the family's."""

from __future__ import annotations

from pathlib import Path

import torch


def _scheduler(prediction_type: str):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type=prediction_type)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)


def _text(hidden: int, act: str, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=77, vocab_size=49408,
                         hidden_act=act, projection_dim=projection or hidden)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def tiny_sd2v(folder: Path, tokenizer: Path, prediction_type: str = "v_prediction",
              seed: int = 0) -> Path:
    """SD 2.x (768-v) layout: OpenCLIP-style text encoder (GELU, as diffusers converts it),
    linear-projection transformers with per-block head counts, v-prediction DDIM."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=12, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
        cross_attention_dim=32, attention_head_dim=(2, 4, 4, 4), use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_text(32, "gelu"),
                                   tokenizer=CLIPTokenizer.from_pretrained(tokenizer), unet=unet,
                                   scheduler=_scheduler(prediction_type), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def tiny_sdxl(folder: Path, tokenizer: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """SDXL layout: two text encoders (CLIP-L-style and an OpenCLIP-bigG-style one with
    projection: the pooled embedding), a UNet with added text/time conditions
    (``addition_embed_type: text_time``), three up blocks (two with attention, several
    transformer layers per block), ``force_zeros_for_empty_prompt``."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 4),
        use_linear_projection=True, cross_attention_dim=64, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    tok = CLIPTokenizer.from_pretrained(tokenizer)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=_text(32, "quick_gelu"), text_encoder_2=_text(32, "gelu", 32),
        tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=_scheduler(prediction_type),
        force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder)
    return folder
