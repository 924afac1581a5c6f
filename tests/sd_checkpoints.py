"""Tiny random Stable Diffusion 1.x models written as the files users download: one
checkpoint in the original (CompVis/LDM) key layout, LoRAs in the diffusers and kohya formats,
and a VAE file. The key mapping below is written from the LDM module layout (written for
these tests); loading the file back through diffusers' ``from_single_file`` and comparing every
tensor with the source pipeline checks it."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "plugins" / "diffeditor-shapes" / "src" / "diffeditor_shapes" / "model" / "tokenizer"


def tiny_sd1_folder(folder: Path, seed: int = 0) -> Path:
    """A random SD 1.x-layout pipeline (four UNet levels as SD's, a two-level VAE, a two-layer CLIP text
    encoder, the shapes model's tokenizer) saved as a diffusers folder."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                        norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=64)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77,
                                        vocab_size=49408, hidden_act="quick_gelu"))
    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def config_only(folder: Path, dest: Path) -> Path:
    """``folder`` without its weights: what ``--config`` needs."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dest


# -- diffusers -> original key names ------------------------------------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _unet_key(key: str, cfg) -> str:
    parts = key.split(".")
    top = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
           "time_embedding": None}
    if parts[0] in top:
        if parts[0] == "time_embedding":
            return f"time_embed.{ {'linear_1': 0, 'linear_2': 2}[parts[1]] }.{'.'.join(parts[2:])}"
        return f"{top[parts[0]]}.{'.'.join(parts[1:])}"
    per = cfg.layers_per_block
    if parts[0] == "down_blocks":
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":
            return f"input_blocks.{1 + i * (per + 1) + per}.0.op.{'.'.join(rest[1:])}"
        block = f"input_blocks.{1 + i * (per + 1) + j}"
    elif parts[0] == "up_blocks":
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "upsamplers":
            has_attn = "CrossAttn" in cfg.up_block_types[i]
            return f"output_blocks.{i * (per + 1) + per}.{2 if has_attn else 1}.conv.{'.'.join(rest[1:])}"
        block = f"output_blocks.{i * (per + 1) + j}"
    elif parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        block = "middle_block"
        return f"{block}.{ {('resnets', 0): 0, ('attentions', 0): 1, ('resnets', 1): 2}[(kind, j)] }." + (
            _resnet_rest(rest) if kind == "resnets" else ".".join(rest))
    else:
        raise KeyError(key)
    if kind == "resnets":
        return f"{block}.0.{_resnet_rest(rest)}"
    return f"{block}.1.{'.'.join(rest)}"  # a transformer: the same names in both layouts


def _resnet_rest(rest: list[str]) -> str:
    return f"{_RESNET[rest[0]]}.{'.'.join(rest[1:])}"


def _vae_key(key: str, value: torch.Tensor, n_levels: int) -> tuple[str, torch.Tensor]:
    parts = key.split(".")
    side = parts[0]  # encoder / decoder / quant_conv / post_quant_conv
    if side in ("quant_conv", "post_quant_conv"):
        return key, value
    rest = parts[1:]
    if rest[0] == "conv_norm_out":
        return f"{side}.norm_out.{rest[1]}", value
    if rest[0] in ("conv_in", "conv_out"):
        return key, value
    if rest[0] == "mid_block":
        kind, j, tail = rest[1], int(rest[2]), rest[3:]
        if kind == "resnets":
            return f"{side}.mid.block_{j + 1}.{_vae_resnet(tail)}", value
        names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
        name = names[tail[0]]
        leaf = tail[-1]
        if leaf == "weight" and value.ndim == 2:
            value = value[:, :, None, None]  # a linear layer here is a 1x1 convolution there
        return f"{side}.mid.attn_1.{name}.{leaf}", value
    i, kind = int(rest[1]), rest[2]
    level = i if side == "encoder" else n_levels - 1 - i
    where = "down" if side == "encoder" else "up"
    if kind in ("downsamplers", "upsamplers"):
        return f"{side}.{where}.{level}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{rest[-1]}", value
    return f"{side}.{where}.{level}.block.{rest[3]}.{_vae_resnet(rest[4:])}", value


def _vae_resnet(tail: list[str]) -> str:
    return f"{'nin_shortcut' if tail[0] == 'conv_shortcut' else tail[0]}.{'.'.join(tail[1:])}"


def _text_model(name: str) -> str:
    """CLIP's names as released (``text_model.encoder...``; transformers 5 flattened them)."""
    return name if name.startswith("text_model.") else "text_model." + name


def original_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's weights under the original Stable Diffusion 1.x checkpoint names."""
    out = {}
    for k, v in pipe.unet.state_dict().items():
        out["model.diffusion_model." + _unet_key(k, pipe.unet.config)] = v
    n = len(pipe.vae.config.block_out_channels)
    for k, v in pipe.vae.state_dict().items():
        name, value = _vae_key(k, v, n)
        out["first_stage_model." + name] = value
    for k, v in pipe.text_encoder.state_dict().items():
        out["cond_stage_model.transformer." + _text_model(k)] = v
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def vae_state_dict(vae) -> dict[str, torch.Tensor]:
    """A VAE alone in the original layout (as vae-ft-mse-840000-ema-pruned.safetensors)."""
    n = len(vae.config.block_out_channels)
    return dict(_vae_key(k, v.detach().contiguous().clone(), n) for k, v in vae.state_dict().items())


def write_checkpoint(pipe, path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(original_state_dict(pipe), str(path))
    else:
        torch.save({"state_dict": original_state_dict(pipe)}, str(path))
    return path


# -- LoRA files ---------------------------------------------------------------------------------

def _lora_targets(pipe) -> list[tuple[str, torch.nn.Linear]]:
    return [(name, m) for name, m in pipe.unet.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")
            or name.endswith("to_out.0") and isinstance(m, torch.nn.Linear)]


def write_lora(pipe, path: Path, fmt: str, rank: int = 4, strength: float = 0.5,
               seed: int = 1, text_encoder: bool = True) -> Path:
    """A random LoRA over the UNet's attention projections and the text encoder's (as kohya
    trains them) in ``fmt`` ``"diffusers"`` (``unet.<module>.lora_A/B.weight``, peft names)
    or ``"kohya"`` (``lora_unet_<module_with_underscores>.lora_down/up.weight``, ``.alpha``)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    targets = [("unet", n, m) for n, m in _lora_targets(pipe)]
    if text_encoder:
        targets += [("text_encoder", n, m) for n, m in pipe.text_encoder.named_modules()
                    if isinstance(m, torch.nn.Linear)
                    and n.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))]
    state = {}
    for part, name, m in targets:
        if part == "text_encoder":
            name = _text_model(name)
        down = torch.randn(rank, m.in_features, generator=g) * strength
        up = torch.randn(m.out_features, rank, generator=g) * strength
        if fmt == "diffusers":
            state[f"{part}.{name}.lora_A.weight"] = down
            state[f"{part}.{name}.lora_B.weight"] = up
        else:
            prefix = "lora_unet_" if part == "unet" else "lora_te_"
            key = prefix + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = down
            state[f"{key}.lora_up.weight"] = up
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))
    return path
