"""``diffeditor train ldm --shapes N``: the recipe that trained the bundled ``shapes-ldm``.

As the model folder's README documents it:

1. VAE (``AutoencoderKL``, the bundled architecture) on generated scenes: L1 + 0.5 * MSE + a
   tiny KL term (1e-6), ``--vae-steps`` steps of ``--vae-batch-size``;
   ``scaling_factor`` = 1 / std of the training latents.
2. Text encoder (``CLIPTextModel``) and UNet (``UNet2DConditionModel``) from scratch, together,
   on the cached latents of ``--shapes`` scenes (posterior means): the standard epsilon loss at
   uniform timesteps of SD 1.5's schedule, AdamW, ``--caption-dropout`` empty captions, an EMA
   (``--ema``) of both networks that is what gets saved, bf16 autocast on GPUs.

The output is a ``StableDiffusionPipeline`` folder (fp16 safetensors, the SD 1.5 tokenizer and a
DDIM scheduler with SD 1.5's settings, copied from ``--tokenizer``'s model) that ``--model DIR``
uses as is; copy the bundled ``diffeditor.json`` into it to keep the shapes defaults. ``--preset
tiny`` shrinks every network for tests. Each phase checkpoints and resumes bit-exactly.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from .components import model_folder, to_model_images, tokenize
from .data import shapes_pairs
from .loop import TrainError, autocast, commit_folder, sample_indices, train_loop

KL_WEIGHT = 1e-6

TINY = {
    "vae": dict(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8,
                latent_channels=4, sample_size=128),
    "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, projection_dim=32),
    "unet": dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, norm_num_groups=8,
                 attention_head_dim=4, cross_attention_dim=32),
}


def _configs(preset: str, reference: Path) -> dict[str, dict]:
    """Architectures: the bundled model's config.json files, shrunk by ``tiny``."""
    cfgs = {}
    for part in ("vae", "text_encoder", "unet"):
        cfg = json.loads((reference / part / "config.json").read_text())
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in (
            "architectures", "dtype", "transformers_version", "torch_dtype")}
        if preset == "tiny":
            cfg.update(TINY[part])
        cfgs[part] = cfg
    return cfgs


class EMA(torch.nn.Module):
    """Exponential moving average of a module's parameters (buffers copied)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(module).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for s, p in zip(self.shadow.parameters(), module.parameters()):
            s.lerp_(p.detach(), 1 - self.decay)
        for s, b in zip(self.shadow.buffers(), module.buffers()):
            s.copy_(b)


def train_ldm(args) -> dict:
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    for name in ("vae_steps", "vae_batch_size"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.caption_dropout < 1 or not 0 <= args.ema < 1:
        raise TrainError("--caption-dropout and --ema must lie in [0, 1)")
    device = torch.device(args.device)
    reference, _ = model_folder(args.tokenizer)
    cfgs = _configs(args.preset, reference)
    tokenizer = CLIPTokenizer.from_pretrained(reference / "tokenizer", local_files_only=True)
    pairs = shapes_pairs(args.shapes, seed=args.data_seed, size=cfgs["vae"]["sample_size"])
    images = to_model_images(pairs.images, "cpu")
    base = {"model": "ldm", "preset": args.preset, "shapes": args.shapes,
            "data_seed": args.data_seed, "seed": args.seed}

    # 1. the VAE ---------------------------------------------------------------------------
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**cfgs["vae"]).to(device)
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr)

    def vae_step(gen: torch.Generator) -> torch.Tensor:
        x = images[sample_indices(len(images), args.vae_batch_size, gen)].to(device)
        eps = torch.randn((x.shape[0], cfgs["vae"]["latent_channels"],
                           x.shape[2] // 8, x.shape[3] // 8), generator=gen).to(device)
        with autocast(device, args.mixed_precision):
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * eps  # the reparameterised sample, from the loop's generator
            rec = vae.decode(z).sample.float()
        kl = post.kl().mean() / (z[0].numel())
        return F.l1_loss(rec, x) + 0.5 * F.mse_loss(rec, x) + KL_WEIGHT * kl

    vae_ckpt = Path(str(args.checkpoint) + ".vae")
    r1 = train_loop(modules={"vae": vae}, optimizer=vae_opt, step_fn=vae_step,
                    steps=args.vae_steps, seed=args.seed,
                    config={**base, "phase": "vae", "lr": args.vae_lr,
                            "batch_size": args.vae_batch_size},
                    checkpoint=vae_ckpt, checkpoint_every=args.checkpoint_every,
                    resume=args.resume and vae_ckpt.is_file(), progress=not args.no_progress,
                    desc="vae")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        lat = torch.cat([vae.encode(images[i:i + 64].to(device)).latent_dist.mean.cpu()
                         for i in range(0, len(images), 64)])
    scale = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scale)
    lat = lat * scale
    ids = tokenize(tokenizer, pairs.captions)
    empty = tokenize(tokenizer, [""])[0]

    # 2. text encoder + UNet from scratch ---------------------------------------------------
    torch.manual_seed(args.seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfgs["text_encoder"])).to(device)
    unet = UNet2DConditionModel(**cfgs["unet"]).to(device)
    noise_sched = DDPMScheduler.from_pretrained(reference / "scheduler", local_files_only=True)
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise TrainError("the UNet's cross_attention_dim must equal the text encoder's width")
    ema_text, ema_unet = EMA(text_encoder, args.ema), EMA(unet, args.ema)
    opt = torch.optim.AdamW([*text_encoder.parameters(), *unet.parameters()], lr=args.lr)
    T = int(noise_sched.config.num_train_timesteps)

    def ldm_step(gen: torch.Generator) -> torch.Tensor:
        idx = sample_indices(len(lat), args.batch_size, gen)
        z0 = lat[idx]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, T, (len(idx),), generator=gen)
        drop = torch.rand(len(idx), generator=gen) < args.caption_dropout
        tok = torch.where(drop[:, None], empty, ids[idx]).to(device)
        z0, noise, t = z0.to(device), noise.to(device), t.to(device)
        with autocast(device, args.mixed_precision):
            ctx = text_encoder(tok).last_hidden_state
            pred = unet(noise_sched.add_noise(z0, noise, t), t, encoder_hidden_states=ctx).sample
        return F.mse_loss(pred.float(), noise)

    def ema_update(_step: int) -> None:
        ema_text.update(text_encoder)
        ema_unet.update(unet)

    r2 = train_loop(modules={"text_encoder": text_encoder, "unet": unet, "ema_text": ema_text,
                             "ema_unet": ema_unet},
                    optimizer=opt, step_fn=ldm_step, steps=args.steps, seed=args.seed + 1,
                    config={**base, "phase": "ldm", "lr": args.lr, "batch_size": args.batch_size,
                            "caption_dropout": args.caption_dropout, "ema": args.ema,
                            "vae": {"lr": args.vae_lr, "steps": args.vae_steps}},
                    checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                    resume=args.resume and Path(args.checkpoint).is_file(),
                    progress=not args.no_progress, desc="text encoder + unet",
                    on_step=ema_update)

    # 3. the pipeline folder (EMA weights, fp16) --------------------------------------------
    pipe = StableDiffusionPipeline(
        vae=vae.to("cpu", torch.float16), text_encoder=ema_text.shadow.to("cpu", torch.float16),
        tokenizer=tokenizer, unet=ema_unet.shadow.to("cpu", torch.float16),
        scheduler=DDIMScheduler.from_pretrained(reference / "scheduler", local_files_only=True),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        commit_folder(tmp, out, replace=bool(args.force or args.resume))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {"vae_steps": r1.step, "vae_final_loss": r1.losses[-1] if r1.losses else None,
            "steps": r2.step, "first_loss": r2.losses[0] if r2.losses else None,
            "final_loss": r2.losses[-1] if r2.losses else None, "scaling_factor": scale,
            "seconds": r1.seconds + r2.seconds, "cpu_seconds": r1.cpu_seconds + r2.cpu_seconds,
            "out": str(out)}
