"""The diffeditor plugin: ``diffeditor train image-encoder | image-prompt | ldm``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from diffeditor.hookspecs import hookimpl


def _common(p: argparse.ArgumentParser, *, steps: int, batch: int, lr: float) -> None:
    p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    p.add_argument("--batch-size", type=int, default=batch, help=f"batch size (default {batch})")
    p.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of every "
                   "random draw of the loop (default 0)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--no-mixed-precision", dest="mixed_precision", action="store_false",
                   help="train in float32 on a GPU too (default: bf16 autocast on GPUs; CPUs "
                   "always train in float32)")
    p.add_argument("--checkpoint", type=Path, default=None, metavar="FILE",
                   help="checkpoint file (default: OUT + '.ckpt')")
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                   help="write the checkpoint every N steps (default 100) and at the end")
    p.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint (same options; --steps may grow); the run "
                   "then replaces its own OUT and checkpoint")
    p.add_argument("--force", action="store_true",
                   help="replace an existing OUT or checkpoint (default: refuse before training)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _data(p: argparse.ArgumentParser, default_shapes: int | None = None) -> None:
    g = p.add_mutually_exclusive_group(required=default_shapes is None)
    g.add_argument("--data", default=None, metavar="DIR",
                   help="folder with images and captions.jsonl ({\"file\": ..., \"caption\": ...})")
    g.add_argument("--shapes", type=int, default=None, metavar="N",
                   help="N scenes of the shapes world (diffeditor_shapes' generator)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated scenes")


# What each sub-command writes: "file" with the suffixes it can write, or "folder". A sub-command
# that sets no ``out_kind`` default gets the checks of a file of any suffix.
OUT_FILE, OUT_FOLDER = "file", "folder"
IP_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")  # what image_prompt.save_ip_file writes


def _prepare(args) -> None:
    """Check every option and every output before any model loads or any step runs."""
    import torch

    from .loop import TrainError

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1")
    if not args.lr > 0:
        raise TrainError("--lr must be positive")
    if args.checkpoint is None:
        args.checkpoint = Path(str(args.out) + ".ckpt")
    if getattr(args, "data", None) is not None:
        from .data import CAPTIONS_FILE

        if not (Path(args.data).expanduser() / CAPTIONS_FILE).is_file():
            raise TrainError(f"--data {args.data}: no {CAPTIONS_FILE} there; write one line "
                             f'{{"file": "img.png", "caption": "..."}} per image')
    if getattr(args, "shapes", None) is not None and args.shapes < 1:
        raise TrainError(f"--shapes must be at least 1, found {args.shapes}")
    if args.resume and not Path(args.checkpoint).is_file() \
            and not Path(str(args.checkpoint) + ".vae").is_file():
        raise TrainError(f"--resume: no checkpoint at {args.checkpoint}; run without --resume "
                         f"first (or name it with --checkpoint)")
    check_outputs(args)


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def check_outputs(args) -> None:
    """The outputs of a train command, checked before training (so a run never trains for hours
    and then refuses its file name, and never replaces a file it did not write):

    * OUT has a suffix the sub-command can write (``out_suffixes``), or is a folder name;
    * OUT and the checkpoint are different paths, and neither is an existing folder where a file
      goes (nor a file where a folder goes);
    * an existing OUT is replaced only with ``--force`` or ``--resume`` (the run continued is the
      one that wrote it); an existing folder OUT that is empty counts as free;
    * an existing checkpoint (or its ``.vae`` companion) is replaced only with ``--force`` or
      ``--resume``; ``--export-only`` reads it and writes nothing there.
    """
    from diffeditor.errors import show

    from .loop import TrainError

    out, ckpt = Path(args.out), Path(args.checkpoint)
    kind = getattr(args, "out_kind", OUT_FILE)
    suffixes = getattr(args, "out_suffixes", None)
    force, resume = getattr(args, "force", False), getattr(args, "resume", False)
    if kind == OUT_FILE and suffixes and out.suffix.lower() not in suffixes:
        raise TrainError(f"--out {show(out)}: use a file name ending in "
                         f"{' or '.join(suffixes)}")
    try:
        same = out.resolve() == ckpt.resolve()
    except (OSError, RuntimeError):
        same = str(out) == str(ckpt)
    if same:
        raise TrainError(f"--checkpoint {show(ckpt)} is --out too; name another checkpoint file")
    if _exists(out):
        if kind == OUT_FILE and out.is_dir():
            raise TrainError(f"--out {show(out)} is a folder; name a file")
        if kind == OUT_FOLDER and not out.is_dir():
            raise TrainError(f"--out {show(out)} exists and is not a folder; name a new folder")
        empty = kind == OUT_FOLDER and not any(out.iterdir())
        if not (empty or force or resume):
            raise TrainError(f"--out {show(out)} exists; add --force to replace it (or choose "
                             f"another name)")
    if getattr(args, "export_only", False):
        return
    for path in (ckpt, Path(str(ckpt) + ".vae")):
        if _exists(path):
            if path.is_dir():
                raise TrainError(f"--checkpoint {show(path)} is a folder; name a file")
            if not (force or resume):
                raise TrainError(f"checkpoint {show(path)} exists; add --resume to continue that "
                                 f"run or --force to start afresh over it")
    for path in (out, ckpt):
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise TrainError(f"{show(path)}: {show(parent)} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise TrainError(f"{show(path)}: the folder {show(parent)} is not writable")


def _report(result: dict) -> int:
    print(json.dumps(result, indent=1, default=str))
    return 0


def _cmd_image_encoder(args) -> int:
    _prepare(args)
    from .image_encoder import train_image_encoder

    return _report(train_image_encoder(args))


def _cmd_image_prompt(args) -> int:
    _prepare(args)
    from .image_prompt import train_image_prompt

    return _report(train_image_prompt(args))


def _cmd_vae_decoder(args) -> int:
    _prepare(args)
    from .vae_decoder import train_vae_decoder

    return _report(train_vae_decoder(args))


def _cmd_ldm(args) -> int:
    _prepare(args)
    from .ldm import train_ldm

    return _report(train_ldm(args))


@hookimpl
def register_commands(subparsers):
    """Add ``diffeditor train`` and its three sub-commands."""
    parser = subparsers.add_parser(
        "train", help="train the image prompt, a small CLIP image tower, or the shapes LDM",
        description="Training commands (plugin diffeditor-train). Checkpoints are written "
        "atomically and resume bit-exactly (--resume).")
    sub = parser.add_subparsers(dest="train_what", metavar="WHAT", required=True)

    p = sub.add_parser(
        "image-encoder", description="Train a small CLIP image tower against the frozen text encoder of a model (locked-text contrastive tuning).", help="a small CLIPVisionModelWithProjection, contrastive against the "
        "model's frozen text encoder (locked-text tuning)")
    p.add_argument("--model", default="shapes", help="model whose text encoder is the target "
                   "(name or folder; default shapes)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--preset", default="shapes", choices=["shapes", "tiny"],
                   help="tower size (default shapes: width 128, 3 layers, 16-px patches)")
    p.add_argument("--image-size", type=int, default=128, help="input size (default 128)")
    p.add_argument("--fp32", action="store_true", help="store float32 weights (default fp16)")
    _data(p)
    _common(p, steps=2000, batch=64, lr=5e-4)
    p.set_defaults(func=_cmd_image_encoder, out_kind=OUT_FOLDER)

    p = sub.add_parser(
        "image-prompt", description="Train the image prompt (resampler and per-layer image K/V) against the frozen UNet; writes the ip_sd15_64.bin layout.", help="the image prompt (IP-Adapter-Plus resampler + to_k_ip/to_v_ip) "
        "against the frozen UNet; writes the ip_sd15_64.bin layout")
    p.add_argument("--model", default="shapes", help="base model (name or folder; default shapes)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE",
                   help="weights file (.bin: torch dict of the two groups; .safetensors: flat)")
    p.add_argument("--image-encoder", default=None, metavar="DIR",
                   help="CLIP vision folder (default: the model card's image_prompt encoder)")
    p.add_argument("--num-tokens", type=int, default=64, help="image tokens (default 64)")
    p.add_argument("--resampler-width", type=int, default=None,
                   help="resampler query width (default: 64 for small models, else 768)")
    p.add_argument("--resampler-heads", type=int, default=None,
                   help="64-dim heads in the resampler (default: width // 64)")
    p.add_argument("--drop-text", type=float, default=0.05, help="P(text only dropped)")
    p.add_argument("--drop-image", type=float, default=0.05, help="P(image only dropped)")
    p.add_argument("--drop-both", type=float, default=0.05, help="P(both dropped)")
    p.add_argument("--fp32", action="store_true", help="store float32 weights (default fp16)")
    p.add_argument("--export-only", action="store_true",
                   help="write --out from --checkpoint (its latest step) without training")
    _data(p)
    _common(p, steps=1000, batch=16, lr=1e-4)
    p.set_defaults(func=_cmd_image_prompt, out_kind=OUT_FILE, out_suffixes=IP_SUFFIXES)

    p = sub.add_parser(
        "vae-decoder", description="Fine-tune a model's VAE decoder (and post_quant_conv) with "
        "the encoder frozen, so the latent space and the UNet stay valid (as SD's ft-MSE decoder "
        "was made). Loss: L1 + MSE + an L1 on image gradients, against the shapes world's "
        "noise-free scenes. Writes an AutoencoderKL folder; copy it over the model's vae/ or "
        "pass it as the model's VAE.",
        help="fine-tune the VAE decoder with the encoder frozen (writes an AutoencoderKL folder)")
    p.add_argument("--from", dest="model_from", default="shapes", metavar="MODEL",
                   help="model whose vae/ is fine-tuned (name or folder; default shapes)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output VAE folder")
    p.add_argument("--shapes", type=int, default=3000, metavar="N",
                   help="training scenes of the shapes world (default 3000)")
    p.add_argument("--data-seed", type=int, default=10, help="seed of the training scenes")
    p.add_argument("--crop", type=int, default=0, metavar="CELLS",
                   help="latent crop side (default 0 = whole images; 8 = 64 px at 128). Whole "
                   "images are the default: the decoder's GroupNorm and mid-block attention see "
                   "the whole latent at inference, and crops measured worse there")
    p.add_argument("--crop-margin", type=int, default=8, metavar="PX",
                   help="pixels along a crop's inner edges left out of the loss (default 8)")
    p.add_argument("--grad-weight", type=float, default=1.0,
                   help="weight of the image-gradient L1 term (default 1.0)")
    p.add_argument("--noisy-target", action="store_true",
                   help="train against the noisy scenes instead of the noise-free ones")
    p.add_argument("--eval-shapes", type=int, default=64, metavar="N",
                   help="held-out scenes for the before/after PSNR report (default 64; 0: none)")
    p.add_argument("--eval-seed", type=int, default=9000, help="seed of the held-out scenes")
    p.add_argument("--fp32", action="store_true", help="store float32 weights (default fp16)")
    _common(p, steps=4000, batch=8, lr=3e-4)
    p.set_defaults(func=_cmd_vae_decoder, out_kind=OUT_FOLDER)

    p = sub.add_parser(
        "ldm", description="Train a shapes-ldm model with the bundled model's recipe: VAE, then text encoder and UNet from scratch.", help="the recipe of the bundled shapes-ldm: VAE, then text encoder + UNet from "
        "scratch, on the shapes world")
    p.add_argument("--shapes", type=int, default=40000, metavar="N",
                   help="scenes to cache latents of (default 40000, the recipe)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated scenes")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="pipeline folder")
    p.add_argument("--preset", default="shapes", choices=["shapes", "tiny"],
                   help="architecture (shapes: the bundled model's; tiny: for tests)")
    p.add_argument("--vae-steps", type=int, default=1503, help="VAE steps (default 1503)")
    p.add_argument("--vae-batch-size", type=int, default=64, help="VAE batch (default 64)")
    p.add_argument("--vae-lr", type=float, default=1e-3, help="VAE learning rate (default 1e-3)")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="default 0.1")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (default 0.999)")
    p.add_argument("--tokenizer", default="shapes", metavar="MODEL",
                   help="model folder or name whose tokenizer/ is copied (default shapes)")
    _common(p, steps=1292, batch=256, lr=3e-4)
    p.set_defaults(func=_cmd_ldm, out_kind=OUT_FOLDER)

