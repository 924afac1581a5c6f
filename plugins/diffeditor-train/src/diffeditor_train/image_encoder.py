"""``diffeditor train image-encoder``: a small CLIP image tower for a model without one.

A ``transformers.CLIPVisionModelWithProjection`` is trained with CLIP's symmetric contrastive
loss against the model's FROZEN text encoder (locked-text tuning, "LiT"): the image tower's
projected embedding of a scene is pulled towards the pooled text embedding of its caption and
away from the other captions of the batch. The text side never changes, so the image tower
learns to speak the text encoder's language. Its penultimate hidden states are then what the
image prompt's resampler reads (``ImagePromptEncoder.encode``), with the same preprocessing.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .components import encode_text, load_frozen
from .data import load_pairs
from .loop import TrainError, autocast, commit_folder, sample_indices, train_loop

PRESETS = {
    # 128-px scenes: 8x8 patches of 16 px, 3 layers of width 128 (~0.65 M parameters, 1.3 MB fp16)
    "shapes": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                   num_attention_heads=4, patch_size=16),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, patch_size=32),
}


class LogitScale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.value = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self) -> torch.Tensor:
        return self.value.clamp(max=math.log(100.0)).exp()


def build_tower(preset: str, image_size: int, projection_dim: int, seed: int):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if preset not in PRESETS:
        raise TrainError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    config = CLIPVisionConfig(image_size=image_size, projection_dim=projection_dim,
                              **PRESETS[preset])
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(config)


def processor_for(image_size: int):
    from diffeditor.image_prompt_clip import clip_processor_class

    return clip_processor_class()(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})


def pixel_values(model, processor, images) -> torch.Tensor:
    """The exact preprocessing of :class:`diffeditor.image_prompt.ImagePromptEncoder`."""
    from diffeditor.image_prompt import ImagePromptEncoder

    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    enc = ImagePromptEncoder(model, processor)  # (it freezes the model: undone below)
    from PIL import Image

    out = enc.preprocess([Image.fromarray(a) for a in images])
    model.train(was_training)
    for p, f in zip(model.parameters(), flags):
        p.requires_grad_(f)
    return out


def contrastive_loss(image_embeds, text_embeds, scale) -> torch.Tensor:
    img = F.normalize(image_embeds, dim=-1)
    txt = F.normalize(text_embeds, dim=-1)
    logits = scale * img @ txt.t()
    labels = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


@torch.no_grad()
def retrieval_accuracy(model, pix: torch.Tensor, text: torch.Tensor) -> float:
    """Top-1 image->caption accuracy among the given pairs (distinct captions only count once)."""
    model.eval()
    emb = F.normalize(model(pixel_values=pix).image_embeds, dim=-1)
    txt = F.normalize(text, dim=-1)
    sims = emb @ txt.t()
    best = sims.argmax(dim=1)
    # a caption shared by two scenes is right for both
    right = (txt[best] - txt).abs().amax(dim=1) < 1e-6
    model.train()
    return float(right.float().mean())


def train_image_encoder(args) -> dict:
    device = torch.device(args.device)
    parts = load_frozen(args.model, device)
    text_dim = int(parts.text_encoder.config.hidden_size)
    pairs = load_pairs(args.data, args.shapes, args.image_size, seed=args.data_seed)
    model = build_tower(args.preset, args.image_size, text_dim, args.seed).to(device)
    processor = processor_for(args.image_size)
    pix = pixel_values(model, processor, pairs.images).to(torch.float16).cpu()  # cached
    _, pooled = encode_text(parts, pairs.captions)
    head = LogitScale().to(device)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=args.lr,
                            weight_decay=0.05)
    config = {"cmd": "image-encoder", "model": str(parts.location), "data": args.data,
              "shapes": args.shapes, "data_seed": args.data_seed, "seed": args.seed,
              "preset": args.preset, "image_size": args.image_size, "lr": args.lr,
              "batch_size": args.batch_size}

    def step(gen: torch.Generator) -> torch.Tensor:
        idx = sample_indices(len(pairs), args.batch_size, gen)
        x = pix[idx].to(device, torch.float32)
        with autocast(device, args.mixed_precision):
            emb = model(pixel_values=x).image_embeds
        return contrastive_loss(emb.float(), pooled[idx].to(device), head())

    result = train_loop(modules={"tower": model, "logit_scale": head}, optimizer=opt,
                        step_fn=step, steps=args.steps, seed=args.seed, config=config,
                        checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                        resume=args.resume, progress=not args.no_progress,
                        desc="image-encoder")
    k = min(len(pairs), 256)
    acc = retrieval_accuracy(model, pix[:k].to(device, torch.float32), pooled[:k].to(device))
    save_tower(model, processor, args.out, fp16=not args.fp32,
               replace=bool(args.force or args.resume))
    return {"steps": result.step, "final_loss": result.losses[-1] if result.losses else None,
            "first_loss": result.losses[0] if result.losses else None,
            "retrieval_top1": acc, "seconds": result.seconds, "cpu_seconds": result.cpu_seconds,
            "out": str(args.out)}


def save_tower(model, processor, out: str | Path, fp16: bool = True, *,
               replace: bool = True) -> None:
    """Write the tower as a transformers folder (safetensors) with its preprocessor config."""
    import shutil
    import tempfile

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        import copy

        m = copy.deepcopy(model).to("cpu")
        if fp16:
            m = m.half()
        m.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        mask = os.umask(0)
        os.umask(mask)
        tmp.chmod(0o777 & ~mask)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~mask)
        commit_folder(tmp, out, replace=replace)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

