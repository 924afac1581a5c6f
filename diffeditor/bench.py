"""``diffeditor bench``: time a full edit against a plain CFG generation with the same
components, in one process, and print one JSON line."""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw


def _scene(size: int, folder: Path) -> dict:
    """A disc on a gray background with its mask: a small case every task can use."""
    im = Image.new("RGB", (size, size), (128, 128, 128))
    m = Image.new("L", (size, size), 0)
    r = size // 6
    box = (size // 3 - r, size // 2 - r, size // 3 + r, size // 2 + r)
    ImageDraw.Draw(im).ellipse(box, fill=(220, 40, 40))
    ImageDraw.Draw(m).ellipse(box, fill=255)
    im.save(folder / "image.png")
    m.save(folder / "mask.png")
    ed = Image.new("L", (size, size), 0)
    ImageDraw.Draw(ed).rectangle((size // 6, size // 4, size - size // 6, 3 * size // 4), fill=255)
    ed.save(folder / "editable.png")
    cx, cy, d = size // 3, size // 2, size // 4
    return {
        "move": {"task": "move", "image": "image.png", "mask": "mask.png", "offset": [d, 0]},
        "resize": {"task": "resize", "image": "image.png", "mask": "mask.png", "scale": 1.3},
        "drag": {"task": "drag", "image": "image.png", "mask": "editable.png",
                 "handles": [[cx, cy]], "targets": [[cx + d, cy]]},
        "appearance": {"task": "appearance", "image": "image.png", "mask": "mask.png",
                       "reference": "image.png", "reference_mask": "mask.png"},
        "paste": {"task": "paste", "image": "image.png", "reference": "image.png",
                  "reference_mask": "mask.png", "offset": [d, 0]},
    }


def random_sd15(device: str, dtype: str, tokenizer_folder: str | None = None):
    """SD 1.5's exact architecture with random weights (same compute, no download)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .models import resolve_device, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    unet = UNet2DConditionModel(
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512,
    )
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77,
                                        vocab_size=49408, hidden_act="quick_gelu"))
    if tokenizer_folder is None:
        from .plugins import get_registry

        models = get_registry().models
        if "shapes" not in models:
            raise RuntimeError("--random-sd15 needs SD's tokenizer: install diffeditor-shapes or pass --tokenizer")
        tokenizer_folder = str(Path(models["shapes"].location) / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(tokenizer_folder)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(dev, dt)
    return pipe


def run_bench(args) -> dict:
    import torch

    from .editor import Editor
    from .engine import Engine
    from .specs import parse_spec

    if args.random_sd15:
        pipe = random_sd15(args.device, args.dtype, args.tokenizer)
        editor = Editor(Engine(pipe, model_id="random-sd15"), None, "random-sd15")
    else:
        editor = Editor.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    eng = editor.engine
    res = args.resolution or editor.default_resolution()
    dev = eng.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with tempfile.TemporaryDirectory() as tmp:
        cases = _scene(res, Path(tmp))
        data = dict(cases[args.task], steps=args.steps, resolution=res, prompt="a big red circle on a gray background")
        defaults = {} if args.reference_settings else editor.defaults()
        spec = parse_spec(data, base_dir=tmp, defaults=defaults)
        eng.cache = type(eng.cache)(eng.cache.max_items)
        # warm-up (one short edit) so one-time costs are not counted
        editor.edit(spec.model_copy(update={"steps": 2}))
        sync()
        c0 = eng.counters.as_dict()
        t0 = time.perf_counter()
        r1 = editor.edit(spec)
        sync()
        first = time.perf_counter() - t0
        c1 = eng.counters.as_dict()
        t0 = time.perf_counter()
        r2 = editor.edit(spec)
        sync()
        again = time.perf_counter() - t0
        t0 = time.perf_counter()
        eng.generate("a big red circle on a gray background", steps=args.steps, guidance_scale=7.5,
                     hw=(res, res))
        sync()
        plain = time.perf_counter() - t0
    counts = {k: c1[k] - c0[k] for k in c1}
    return {
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
        "dtype": str(eng.dtype).replace("torch.", ""),
        "model": "random-sd15" if args.random_sd15 else editor.model,
        "resolution": res,
        "task": args.task,
        "steps": args.steps,
        "settings": "reference" if args.reference_settings else "model defaults",
        "guidance_scale": spec.guidance_scale,
        "seconds_per_edit": round(first, 3),
        "seconds_per_reedit": round(again, 3),
        "plain_generation_seconds": round(plain, 3),
        "ratio": round(first / plain, 3),
        "ratio_reedit": round(again / plain, 3),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 3) if dev.type == "cuda" else None,
        "memory_bank_mib": round(r1.metadata["memory_bank_bytes"] / 2**20, 2),
        "unet_forward": counts["unet_forward"],
        "unet_partial_forward": counts["unet_partial"],
        "unet_backward": counts["unet_backward"],
        "reedit_inversion_cached": r2.metadata["inversion_cached"],
    }


def add_bench_command(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time an edit against a plain generation (one JSON line)")
    p.add_argument("--model", default=None, metavar="NAME|ID|PATH")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--task", default="drag", choices=["move", "resize", "drag", "appearance", "paste"])
    p.add_argument("--resolution", type=int, default=None, help="square working size (default: the model's)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--random-sd15", action="store_true", help="SD 1.5's architecture with random weights")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for --random-sd15")
    p.add_argument("--reference-settings", action="store_true",
                   help="the reference's task defaults (CFG 4, ...) instead of the model's registered ones")

    def handler(args) -> int:
        from .cli import _quiet_libraries

        _quiet_libraries()
        print(json.dumps(run_bench(args)))
        return 0

    p.set_defaults(func=handler)
