"""``diffeditor train vae-decoder --from MODEL --out DIR``: fine-tune a VAE's decoder, encoder frozen.

What Stability did for SD's ft-MSE decoder: the encoder (and ``quant_conv``) stay exactly as
they are, so the latent space, and every UNet trained on it, stays valid; only the decoder (and
``post_quant_conv``) learn to turn those latents into better pictures.

- **Data**: scenes of the shapes world (``--shapes N``), encoded once by the frozen encoder; a
  step decodes a posterior sample ``mean + std * eps`` (the noise from the loop's generator).
  The target is the scene drawn **without** the world's pixel noise (the generator knows it), so
  the decoder is not asked to reproduce noise it cannot know; against the noisy source the best
  possible round trip is then about 38.6 dB (sigma 3).
- **Whole images** by default. **Crops** (``--crop C`` latent cells) are offered: a random C x C latent window, snapped
  to an image side with probability 1/2 per axis so that the borders (where the old decoder drew
  its frame) are trained often. Pixels within ``--crop-margin`` of a window edge that is not an
  image border are left out of the loss: the decoder cannot know what lies beyond such an edge.
- **Loss**: L1 + MSE on pixels, plus an edge-aware term: L1 between the horizontal and vertical
  finite differences of output and target (a gradient loss: keeps edges sharp and puts no blur
  or halo next to them). No pretrained perceptual network is used (none is available offline).
- Checkpoints every ``--checkpoint-every`` steps and bit-exact ``--resume`` (the shared loop);
  the output is an ``AutoencoderKL`` folder (config.json + fp16 safetensors) whose encoder is
  byte-identical to the input's.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .components import model_folder, to_model_images
from .loop import TrainError, autocast, commit_folder, sample_indices, train_loop

ENCODER_PREFIXES = ("encoder.", "quant_conv.")
DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


def shapes_clean_noisy(n: int, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` scenes of the shapes world: (noisy images, the same without noise), uint8 NHWC."""
    from diffeditor_shapes.scenes import random_scene, render

    rng = np.random.default_rng(seed)
    noisy = np.empty((n, size, size, 3), np.uint8)
    clean = np.empty_like(noisy)
    for i in range(n):
        scene = random_scene(rng, size=size)
        clean[i] = render(scene).image
        noisy[i] = render(scene, noise=rng).image
    return noisy, clean


def gradient_l1(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """L1 between the finite differences (x and y) of ``a`` and ``b`` (weights ``w``: B1HW)."""
    dxa, dxb = a[..., :, 1:] - a[..., :, :-1], b[..., :, 1:] - b[..., :, :-1]
    dya, dyb = a[..., 1:, :] - a[..., :-1, :], b[..., 1:, :] - b[..., :-1, :]
    if w is None:
        return (dxa - dxb).abs().mean() + (dya - dyb).abs().mean()
    wx = w[..., :, 1:] * w[..., :, :-1]
    wy = w[..., 1:, :] * w[..., :-1, :]
    return ((dxa - dxb).abs() * wx).sum() / (wx.sum() * a.shape[1]).clamp(min=1) + \
        ((dya - dyb).abs() * wy).sum() / (wy.sum() * a.shape[1]).clamp(min=1)


def decoder_loss(rec: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None,
                 grad_weight: float) -> torch.Tensor:
    if w is None:
        pix = F.l1_loss(rec, target) + 0.5 * F.mse_loss(rec, target)
    else:
        d = rec - target
        denom = (w.sum() * rec.shape[1]).clamp(min=1)
        pix = (d.abs() * w).sum() / denom + 0.5 * (d.square() * w).sum() / denom
    return pix + grad_weight * gradient_l1(rec, target, w)


def crop_windows(n: int, grid: int, crop: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 2) top-left latent cells (y, x) of ``crop`` x ``crop`` windows in a ``grid`` grid.

    Per axis: with probability 1/2 the window touches an image side (either one, evenly), else
    it starts anywhere.
    """
    span = grid - crop
    anywhere = torch.randint(0, span + 1, (n, 2), generator=gen)
    side = torch.randint(0, 2, (n, 2), generator=gen) * span
    snap = torch.rand((n, 2), generator=gen) < 0.5
    return torch.where(snap, side, anywhere)


def loss_weights(corners: torch.Tensor, grid: int, crop: int, factor: int, margin: int) -> torch.Tensor:
    """(n, 1, P, P) 0/1 weights of a window's pixels: 0 within ``margin`` px of an inner edge."""
    p = crop * factor
    w = torch.ones((len(corners), 1, p, p))
    if margin <= 0:
        return w
    for i, (y, x) in enumerate(corners.tolist()):
        if y > 0:
            w[i, :, :margin, :] = 0
        if y + crop < grid:
            w[i, :, p - margin:, :] = 0
        if x > 0:
            w[i, :, :, :margin] = 0
        if x + crop < grid:
            w[i, :, :, p - margin:] = 0
    return w


@torch.no_grad()
def encode_all(vae, images: np.ndarray, device: torch.device, batch: int = 64):
    """Posterior (mean, std) of every image under the frozen encoder."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(to_model_images(images[i:i + batch], device)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    return torch.cat(means), torch.cat(stds)


def psnr_table(rec: torch.Tensor, src: torch.Tensor, band: int = 8) -> dict:
    """Per-image PSNR (0..255 scale) of ``rec`` against ``src`` ([-1, 1] NCHW): mean, worst,
    and the ``band``-px border band's mean."""
    a = ((rec.clamp(-1, 1) + 1) * 127.5).double()
    b = ((src.clamp(-1, 1) + 1) * 127.5).double()
    mse = (a - b).square().mean(dim=(1, 2, 3))
    ps = 10 * torch.log10(255.0 ** 2 / mse.clamp(min=1e-10))
    m = torch.ones(a.shape[-2:], dtype=torch.bool)
    m[band:-band, band:-band] = False
    mse_b = (a - b).square()[..., m].mean(dim=(1, 2))
    pb = 10 * torch.log10(255.0 ** 2 / mse_b.clamp(min=1e-10))
    return {"mean_db": float(ps.mean()), "worst_db": float(ps.min()),
            "border_db": float(pb.mean()), "n": len(ps)}


@torch.no_grad()
def roundtrip_psnr(vae, images: np.ndarray, device: torch.device, batch: int = 32) -> dict:
    """Encode (posterior mean) and decode each image; PSNR against the image itself."""
    outs = []
    for i in range(0, len(images), batch):
        x = to_model_images(images[i:i + batch], device)
        outs.append(vae.decode(vae.encode(x).latent_dist.mean).sample.float().cpu())
    return psnr_table(torch.cat(outs), to_model_images(images, "cpu"))


def train_vae_decoder(args) -> dict:
    from diffusers import AutoencoderKL

    if args.crop < 0 or args.crop_margin < 0:
        raise TrainError("--crop and --crop-margin must be at least 0")
    if not args.grad_weight >= 0:
        raise TrainError("--grad-weight must be at least 0")
    out = Path(args.out)  # checked before training by the plugin's _prepare
    folder, _ = model_folder(args.model_from)
    device = torch.device(args.device)
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32,
                                        local_files_only=True).to(device)
    size = int(vae.config.sample_size)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    grid = size // factor
    if args.crop > grid:
        raise TrainError(f"--crop {args.crop} is larger than the latent grid ({grid} cells)")
    crop = args.crop or grid
    before = {k: v.detach().clone() for k, v in vae.state_dict().items()
              if k.startswith(ENCODER_PREFIXES)}
    vae.requires_grad_(False)
    trainable = [p for n, p in vae.named_parameters() if n.startswith(DECODER_PREFIXES)]
    for p in trainable:
        p.requires_grad_(True)
    vae.eval()  # no dropout / batch statistics anywhere in AutoencoderKL; the encoder is frozen

    noisy, clean = shapes_clean_noisy(args.shapes, args.data_seed, size)
    mean, std = encode_all(vae, noisy, device)
    target = clean if not args.noisy_target else noisy
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)

    class Decoder(torch.nn.Module):  # the checkpointed part: decoder + post_quant_conv
        def __init__(self) -> None:
            super().__init__()
            self.decoder, self.post_quant_conv = vae.decoder, vae.post_quant_conv

    dec = Decoder()

    def step(gen: torch.Generator) -> torch.Tensor:
        idx = sample_indices(len(mean), args.batch_size, gen)
        eps = torch.randn(mean[idx].shape, generator=gen)
        z = mean[idx] + std[idx] * eps
        x = to_model_images(target[idx.numpy()], "cpu")
        w = None
        if crop < grid:
            corners = crop_windows(len(idx), grid, crop, gen)
            z = torch.stack([z[i, :, y:y + crop, x0:x0 + crop]
                             for i, (y, x0) in enumerate(corners.tolist())])
            x = torch.stack([x[i, :, y * factor:(y + crop) * factor, x0 * factor:(x0 + crop) * factor]
                             for i, (y, x0) in enumerate(corners.tolist())])
            w = loss_weights(corners, grid, crop, factor, args.crop_margin).to(device)
        z, x = z.to(device), x.to(device)
        with autocast(device, args.mixed_precision):
            rec = vae.decode(z).sample.float()
        return decoder_loss(rec, x, w, args.grad_weight)

    config = {"model": "vae-decoder", "from": str(folder), "shapes": args.shapes,
              "data_seed": args.data_seed, "seed": args.seed, "lr": args.lr,
              "batch_size": args.batch_size, "crop": args.crop, "crop_margin": args.crop_margin,
              "grad_weight": args.grad_weight, "noisy_target": bool(args.noisy_target)}
    eval_images = None
    if args.eval_shapes:
        eval_images, _ = shapes_clean_noisy(args.eval_shapes, args.eval_seed, size)
        vae.eval()
    first = roundtrip_psnr(vae, eval_images, device) if eval_images is not None else None
    result = train_loop(modules={"decoder": dec}, optimizer=opt, step_fn=step, steps=args.steps,
                        seed=args.seed, config=config, checkpoint=args.checkpoint,
                        checkpoint_every=args.checkpoint_every, resume=args.resume,
                        progress=not args.no_progress, desc="vae decoder")
    vae.eval().requires_grad_(False)
    last = roundtrip_psnr(vae, eval_images, device) if eval_images is not None else None
    after = vae.state_dict()
    moved = [k for k, v in before.items() if not torch.equal(v, after[k])]
    if moved:  # the loop must never touch the encoder: its latents are what the UNet knows
        raise TrainError(f"internal error: the frozen encoder changed ({moved[0]})")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save = vae.to("cpu", torch.float32 if args.fp32 else torch.float16)
        save.save_pretrained(tmp, safe_serialization=True)
        commit_folder(tmp, out, replace=bool(args.force or args.resume))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {"steps": result.step, "first_loss": result.losses[0] if result.losses else None,
            "final_loss": result.losses[-1] if result.losses else None,
            "seconds": result.seconds, "cpu_seconds": result.cpu_seconds,
            "eval_before": first, "eval_after": last, "out": str(out)}
