"""``diffeditor train image-prompt``: DiffEditor's image prompt against a frozen UNet.

The trained modules are diffusers' own: the weights are put on the UNet with the project's loader
(:func:`diffeditor.image_prompt.attach_image_prompt`, i.e. diffusers' ``_load_ip_adapter_weights``),
which builds :class:`~diffusers.models.embeddings.IPAdapterPlusImageProjection` (the resampler, as
``unet.encoder_hid_proj``) and ``IPAdapterAttnProcessor2_0`` with ``to_k_ip`` / ``to_v_ip`` in
every cross-attention layer; exactly those parameters are trained, everything else is frozen.
Training therefore runs the same code path as editing.

Initialisation as IP-Adapter: a fresh ``IPAdapterPlusImageProjection`` (diffusers' init) and
``to_k_ip`` / ``to_v_ip`` copied from each layer's text ``to_k`` / ``to_v``. Loss: the standard
denoising loss of the noise schedule (epsilon or v) at uniform timesteps. Conditioning dropout as
IP-Adapter: with probability ``drop_text`` the caption is replaced by the empty prompt, with
``drop_image`` the image tokens by the unconditional ones (CLIP of all-zero pixel values, what
the sampler uses as the image prompt's negative), with ``drop_both`` both.

The output is the release's ``ip_sd15_64.bin`` layout (groups ``image_proj`` with the original
resampler key names and ``ip_adapter`` with ``"{i}.to_k_ip.weight"``), which
:func:`diffeditor.image_prompt.load_ip_state_dict` reads unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .components import diffusion_target, encode_text, load_frozen, to_model_images
from .data import load_pairs
from .loop import TrainError, atomic_write, autocast, sample_indices, train_loop

DIM_HEAD = 64


# -- the layout of the weights file ------------------------------------------------------------


def resampler_to_file(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' ``IPAdapterPlusImageProjection`` state dict -> the release's key names.

    The inverse of diffusers' ``_convert_ip_adapter_image_proj_to_diffusers`` for the Plus
    resampler (``ln0``/``ln1`` -> ``0.norm1``/``0.norm2``, ``attn.to_k`` + ``attn.to_v`` ->
    ``0.to_kv``, ``ff.0`` / ``ff.1.net.0.proj`` / ``ff.1.net.2`` -> ``1.0`` / ``1.1`` / ``1.3``).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] != "layers":
            out[key] = value
            continue
        i, rest = parts[1], ".".join(parts[2:])
        if rest.startswith("ln0."):
            out[f"layers.{i}.0.norm1.{rest[4:]}"] = value
        elif rest.startswith("ln1."):
            out[f"layers.{i}.0.norm2.{rest[4:]}"] = value
        elif rest == "attn.to_q.weight":
            out[f"layers.{i}.0.to_q.weight"] = value
        elif rest == "attn.to_k.weight":
            out[f"layers.{i}.0.to_kv.weight"] = torch.cat([value, sd[f"layers.{i}.attn.to_v.weight"]])
        elif rest == "attn.to_v.weight":
            continue
        elif rest == "attn.to_out.0.weight":
            out[f"layers.{i}.0.to_out.weight"] = value
        elif rest.startswith("ff.0."):
            out[f"layers.{i}.1.0.{rest[5:]}"] = value
        elif rest == "ff.1.net.0.proj.weight":
            out[f"layers.{i}.1.1.weight"] = value
        elif rest == "ff.1.net.2.weight":
            out[f"layers.{i}.1.3.weight"] = value
        else:
            raise TrainError(f"unexpected resampler key {key!r}: this diffusers version builds "
                             f"IPAdapterPlusImageProjection differently")
    return out


def initial_state_dict(unet, clip_dim: int, num_tokens: int, width: int, heads: int,
                       seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """A fresh image prompt for ``unet`` in the file layout (see the module docstring)."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    from diffeditor.image_prompt_weights import cross_attention_layers

    torch.manual_seed(seed)
    proj = IPAdapterPlusImageProjection(
        embed_dims=clip_dim, output_dims=int(unet.config.cross_attention_dim), hidden_dims=width,
        depth=4, dim_head=DIM_HEAD, heads=heads, num_queries=num_tokens, ffn_ratio=4)
    ip = {}
    for layer in cross_attention_layers(unet):
        attn = unet.get_submodule(layer.name.removesuffix(".processor"))
        ip[f"{layer.index}.to_k_ip.weight"] = attn.to_k.weight.detach().clone()
        ip[f"{layer.index}.to_v_ip.weight"] = attn.to_v.weight.detach().clone()
    return {"image_proj": resampler_to_file(proj.state_dict()), "ip_adapter": ip}


def trainable_modules(unet) -> dict[str, torch.nn.Module]:
    """The attached image prompt's modules: the resampler and every layer's K/V maps."""
    from diffeditor.image_prompt_weights import cross_attention_layers

    mods: dict[str, torch.nn.Module] = {
        "image_proj": unet.encoder_hid_proj.image_projection_layers[0]}
    for layer in cross_attention_layers(unet):
        proc = unet.get_submodule(layer.name.removesuffix(".processor")).processor
        mods[f"ip.{layer.index}"] = torch.nn.ModuleDict(
            {"to_k_ip": proc.to_k_ip[0], "to_v_ip": proc.to_v_ip[0]})
    return mods


def export_state_dict(unet, dtype: torch.dtype = torch.float16) -> dict[str, dict[str, torch.Tensor]]:
    """The attached (trained) image prompt of ``unet`` in the ``ip_sd15_64.bin`` layout."""
    mods = trainable_modules(unet)
    proj = {k: v.detach().to("cpu", dtype).clone()
            for k, v in resampler_to_file(mods.pop("image_proj").state_dict()).items()}
    ip = {}
    for name, m in mods.items():
        index = name.split(".", 1)[1]
        ip[f"{index}.to_k_ip.weight"] = m["to_k_ip"].weight.detach().to("cpu", dtype).clone()
        ip[f"{index}.to_v_ip.weight"] = m["to_v_ip"].weight.detach().to("cpu", dtype).clone()
    return {"image_proj": proj, "ip_adapter": ip}


def save_ip_file(sd: dict[str, dict[str, torch.Tensor]], out: str | Path, *,
                 replace: bool = True) -> None:
    """Write ``.bin`` (torch dict of the two groups) or ``.safetensors`` (flat ``group.key``)."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        flat = {f"{g}.{k}": v.contiguous() for g, group in sd.items() for k, v in group.items()}
        atomic_write(out, lambda tmp: save_file(flat, tmp), replace=replace)
    elif suffix in (".bin", ".pt", ".pth"):
        atomic_write(out, lambda tmp: torch.save(sd, tmp), replace=replace)
    else:
        raise TrainError(f"--out {out}: use a .bin or .safetensors file name")


# -- training ------------------------------------------------------------------------------------


def _encoder_folder(args, parts) -> str:
    if args.image_encoder:
        return args.image_encoder
    ip = getattr(parts.entry, "image_prompt", None) if parts.entry is not None else None
    if ip and ip.get("encoder"):
        return ip["encoder"]
    raise TrainError(f"--model {args.model} has no image encoder in its model card; train one "
                     f"with `diffeditor train image-encoder` and pass --image-encoder DIR")


@torch.no_grad()
def build_cache(parts, encoder, pairs, device, batch: int = 32) -> dict[str, torch.Tensor]:
    """The frozen encodings of every pair: VAE latents (posterior mean x scaling factor), text
    hidden states, CLIP penultimate hidden states; plus the two unconditional encodings."""
    from PIL import Image

    lat, clip = [], []
    scale = parts.vae.config.scaling_factor
    for i in range(0, len(pairs), batch):
        imgs = pairs.images[i:i + batch]
        x = to_model_images(imgs, device)
        lat.append((parts.vae.encode(x).latent_dist.mean * scale).cpu())
        clip.append(encoder.encode([Image.fromarray(a) for a in imgs]).float().cpu())
    text, _ = encode_text(parts, pairs.captions)
    empty, _ = encode_text(parts, [""])
    return {"latents": torch.cat(lat), "text": text, "clip": torch.cat(clip),
            "empty_text": empty, "uncond_clip": encoder.encode_unconditional(1).float().cpu()}


def make_step(unet, noise_sched, cache, args, device):
    """``loss = step(generator)``: one batch of the denoising loss with conditioning dropout."""
    n = len(cache["latents"])
    T = int(noise_sched.config.num_train_timesteps)
    p_text, p_img, p_both = args.drop_text, args.drop_image, args.drop_both

    def step(gen: torch.Generator) -> torch.Tensor:
        idx = sample_indices(n, args.batch_size, gen)
        z0 = cache["latents"][idx]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, T, (len(idx),), generator=gen)
        r = torch.rand(len(idx), generator=gen)
        drop_text = (r < p_text) | ((r >= p_text + p_img) & (r < p_text + p_img + p_both))
        drop_img = (r >= p_text) & (r < p_text + p_img + p_both)
        text = torch.where(drop_text[:, None, None], cache["empty_text"], cache["text"][idx])
        clip = torch.where(drop_img[:, None, None], cache["uncond_clip"], cache["clip"][idx])
        z0, noise, t = z0.to(device), noise.to(device), t.to(device)
        zt = noise_sched.add_noise(z0, noise, t)
        with autocast(device, args.mixed_precision):
            pred = unet(zt, t, encoder_hidden_states=text.to(device),
                        added_cond_kwargs={"image_embeds": [clip.to(device)]}).sample
        return F.mse_loss(pred.float(), diffusion_target(noise_sched, z0, noise, t).float())

    return step


def train_image_prompt(args) -> dict:
    from diffeditor.image_prompt import (
        ImagePromptEncoder,
        attach_image_prompt,
        load_ip_state_dict,
        validate_ip_state_dict,
    )

    device = torch.device(args.device)
    parts = load_frozen(args.model, device, vae=True, unet=True)
    unet = parts.unet
    encoder = ImagePromptEncoder.from_pretrained(_encoder_folder(args, parts), device)
    width = args.resampler_width or (64 if unet.config.cross_attention_dim <= 256 else 768)
    heads = args.resampler_heads or max(1, width // DIM_HEAD)
    if args.num_tokens < 1 or width < 1 or heads < 1:
        raise TrainError("--num-tokens, --resampler-width and --resampler-heads must be positive")
    if not 0 <= args.drop_text + args.drop_image + args.drop_both <= 1:
        raise TrainError("--drop-text + --drop-image + --drop-both must lie in [0, 1]")
    init = initial_state_dict(unet, encoder.hidden_size, args.num_tokens, width, heads, args.seed)
    attach_image_prompt(unet, init, 1.0, num_tokens=args.num_tokens)
    mods = trainable_modules(unet)
    if getattr(args, "export_only", False):
        return _export_checkpoint(args, unet, mods)
    size = int(unet.config.sample_size) * 2 ** (len(parts.vae.config.block_out_channels) - 1)
    pairs = load_pairs(args.data, args.shapes, size, seed=args.data_seed)
    cache = build_cache(parts, encoder, pairs, device)
    for m in mods.values():
        m.requires_grad_(True)
    params = [p for m in mods.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    config = {"cmd": "image-prompt", "model": str(parts.location), "data": args.data,
              "shapes": args.shapes, "data_seed": args.data_seed, "seed": args.seed,
              "encoder": str(_encoder_folder(args, parts)), "num_tokens": args.num_tokens,
              "width": width, "heads": heads, "lr": args.lr, "batch_size": args.batch_size,
              "drop": [args.drop_text, args.drop_image, args.drop_both]}
    step = make_step(unet, parts.noise, cache, args, device)
    result = train_loop(modules=mods, optimizer=opt, step_fn=step, steps=args.steps,
                        seed=args.seed, config=config, checkpoint=args.checkpoint,
                        checkpoint_every=args.checkpoint_every, resume=args.resume,
                        progress=not args.no_progress, desc="image-prompt")
    sd = export_state_dict(unet, torch.float32 if args.fp32 else torch.float16)
    validate_ip_state_dict(sd, unet, num_tokens=args.num_tokens)
    save_ip_file(sd, args.out, replace=_may_replace(args))
    validate_ip_state_dict(load_ip_state_dict(args.out), unet, num_tokens=args.num_tokens)
    return {"steps": result.step, "first_loss": result.losses[0] if result.losses else None,
            "final_loss": result.losses[-1] if result.losses else None,
            "seconds": result.seconds, "cpu_seconds": result.cpu_seconds, "out": str(args.out),
            "bytes": Path(args.out).stat().st_size}


def _may_replace(args) -> bool:
    """An existing OUT is replaced only with --force, or by the run --resume continues."""
    return bool(getattr(args, "force", False) or getattr(args, "resume", False))


def _export_checkpoint(args, unet, mods) -> dict:
    """``--export-only``: write the weights file from ``--checkpoint`` (no data, no training)."""
    from diffeditor.image_prompt import load_ip_state_dict, validate_ip_state_dict

    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        raise TrainError(f"--export-only: no checkpoint at {ckpt}")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    if set(state.get("modules", {})) != set(mods):
        raise TrainError(f"--export-only: {ckpt} is not an image-prompt checkpoint of this model")
    for name, module in mods.items():
        module.load_state_dict(state["modules"][name])
    sd = export_state_dict(unet, torch.float32 if args.fp32 else torch.float16)
    save_ip_file(sd, args.out, replace=_may_replace(args))
    validate_ip_state_dict(load_ip_state_dict(args.out), unet, num_tokens=args.num_tokens)
    losses = state.get("losses", [])
    return {"steps": state["step"], "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None, "out": str(args.out),
            "bytes": Path(args.out).stat().st_size}
