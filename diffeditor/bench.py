"""``diffeditor bench``: time a full edit against a plain CFG generation with the same
components, in one process, and print one JSON line.

The command registers itself through the ``diffeditor`` entry-point group (entry point
``bench``, hook ``register_commands``); nothing in the kernel imports this module. The scenes it
times come from the plugins (hook ``register_bench_scenes``: diffeditor's own tasks register a
disc scene each), so it knows no task names and no model names."""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

from .hookspecs import hookimpl


def _registered_tokenizer(registry) -> str | None:
    """The tokenizer folder of the first registered model (by name) that has one on disk."""
    for _, entry in sorted(registry.models.items()):
        folder = Path(entry.location) / "tokenizer"
        if folder.is_dir():
            return str(folder)
    return None


def random_sd15(device: str, dtype: str, tokenizer_folder: str | None = None, registry=None):
    """SD 1.5's exact architecture with random weights (same compute, no download); the
    tokenizer comes from ``tokenizer_folder`` or a model of ``registry`` that has one."""
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
        tokenizer_folder = _registered_tokenizer(registry) if registry is not None else None
        if tokenizer_folder is None:
            from .errors import DiffEditorError

            raise DiffEditorError("--random-sd15 needs SD's tokenizer: pass --tokenizer DIR, or "
                                  "install a model plugin whose folder has one")
    tok = CLIPTokenizer.from_pretrained(tokenizer_folder)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(dev, dt)
    return pipe


def _tokenizer(tokenizer_folder, registry, flag: str):
    from transformers import CLIPTokenizer

    if tokenizer_folder is None:
        tokenizer_folder = _registered_tokenizer(registry) if registry is not None else None
        if tokenizer_folder is None:
            from .errors import DiffEditorError

            raise DiffEditorError(f"{flag} needs SD's tokenizer: pass --tokenizer DIR, or "
                                  "install a model plugin whose folder has one")
    return CLIPTokenizer.from_pretrained(tokenizer_folder)


def _sd_vae(scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512, scaling_factor=scaling_factor)


def _ddim(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type=prediction_type)


def sd2_unet_config() -> dict:
    """SD 2.x 768-v's UNet (stabilityai/stable-diffusion-2's config)."""
    return dict(sample_size=96, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def sdxl_unet_config() -> dict:
    """SDXL base 1.0's UNet."""
    return dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                use_linear_projection=True, cross_attention_dim=2048,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)


def _clip_config(hidden: int, layers: int, heads: int, act: str, projection: int = 768):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=77, vocab_size=49408,
                          hidden_act=act, projection_dim=projection)


def random_sd2(device: str, dtype: str, tokenizer_folder: str | None = None, registry=None):
    """SD 2.x 768-v's exact architecture with random weights: OpenCLIP ViT-H text tower as
    diffusers converts it (23 layers, GELU), v-prediction."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from .models import resolve_device, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    tok = _tokenizer(tokenizer_folder, registry, "--random-sd2")
    pipe = StableDiffusionPipeline(
        vae=_sd_vae(), text_encoder=CLIPTextModel(_clip_config(1024, 23, 16, "gelu", 512)),
        tokenizer=tok, unet=UNet2DConditionModel(**sd2_unet_config()),
        scheduler=_ddim("v_prediction"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.to(dev, dt)
    return pipe


def random_sdxl(device: str, dtype: str, tokenizer_folder: str | None = None, registry=None):
    """SDXL base's exact architecture with random weights: CLIP ViT-L and OpenCLIP bigG text
    encoders (the second with projection: the pooled embedding), added time conditions."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .models import resolve_device, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    tok = _tokenizer(tokenizer_folder, registry, "--random-sdxl")
    pipe = StableDiffusionXLPipeline(
        vae=_sd_vae(0.13025), text_encoder=CLIPTextModel(_clip_config(768, 12, 12, "quick_gelu")),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(1280, 32, 20, "gelu", 1280)),
        tokenizer=tok, tokenizer_2=tok, unet=UNet2DConditionModel(**sdxl_unet_config()),
        scheduler=_ddim(), force_zeros_for_empty_prompt=True)
    pipe.to(dev, dt)
    return pipe


RANDOM_MODELS = {"random-sd15": random_sd15, "random-sd2": random_sd2, "random-sdxl": random_sdxl}
"""The benchmark's random-weight models by name (flags ``--random-sd15`` ...)."""


def _random_name(args) -> str | None:
    for name in RANDOM_MODELS:
        if getattr(args, name.replace("-", "_"), False):
            return name
    return None


def _peak_rss_gib() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round((kib if platform.system() != "Darwin" else kib / 1024) / 2**20, 3)


PROMPT = "a big red circle on a gray background"

SPREAD_WARNING = 1.5
"""Repeats whose slowest and fastest differ by more than this factor get a warning: the medians
then describe a busy machine as much as the code."""


def _say(text: str) -> None:
    """Progress on stderr (stdout carries only the JSON lines)."""
    import sys

    print(text, file=sys.stderr, flush=True)


def _spread_warning(named: dict[str, list[float]]) -> str | None:
    """A warning when any series of repeated timings varies more than :data:`SPREAD_WARNING`."""
    wide = {k: max(v) / min(v) for k, v in named.items() if len(v) > 1 and min(v) > 0}
    wide = {k: r for k, r in wide.items() if r > SPREAD_WARNING}
    if not wide:
        return None
    return ("repeats varied " + ", ".join(f"{r:.1f}x in {k}" for k, r in wide.items())
            + "; the machine was busy: compare only inside one run, or run again")


def load_bench_editor(args):
    """The editor the benchmark times, with the fast-path switches of ``args`` applied."""
    from .editor import Editor
    from .engine import Engine

    name = _random_name(args)
    if name:
        pipe = RANDOM_MODELS[name](args.device, args.dtype, args.tokenizer, args.registry)
        editor = Editor(Engine(pipe, model_id=name), None, name, registry=args.registry)
    else:
        editor = Editor.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                        registry=args.registry)
    eng = editor.engine
    eng.set_memory_options(args.attention_slice, args.vae_slicing)
    if args.no_merge:
        eng.merge_reference_pass = False
    if args.compile:
        eng.compile(args.compile)  # (sets its own region-gradient mode: asked-for ones go after)
    if args.region_grads != "auto":
        eng.batched_region_grads = args.region_grads == "batched"
    return editor


class _Clock:
    """Wall time of a call on the engine's device (waits for the GPU), and its peak memory."""

    def __init__(self, device):
        import torch

        self.cuda = torch.cuda if device.type == "cuda" else None
        self.device = device

    def reset_peak(self) -> None:
        if self.cuda:
            self.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return round(self.cuda.max_memory_allocated(self.device) / 2**30, 3) if self.cuda else None

    def time(self, fn):
        """``(seconds, fn())``."""
        if self.cuda:
            self.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        out = fn()
        if self.cuda:
            self.cuda.synchronize(self.device)
        return time.perf_counter() - t0, out


def _bench_spec(args, editor, res: int, folder: Path):
    """The benchmark's scene written to ``folder`` and the spec of ``args.task`` on it."""
    from .specs import parse_spec

    scene = editor.registry.bench_scenes[args.task]
    data = dict(scene.build(res, folder), steps=args.steps, resolution=res, prompt=PROMPT)
    defaults = {} if args.reference_settings else editor.defaults()
    return parse_spec(data, base_dir=folder, defaults=defaults, registry=editor.registry)


def _header(args, editor, res: int) -> dict:
    """What every benchmark line starts with: the machine and the work timed."""
    import torch

    eng = editor.engine
    dev = eng.device
    where = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    return {
        "device": f"{dev} ({where})",
        "dtype": str(eng.dtype).replace("torch.", ""),
        "model": _random_name(args) or editor.model,
        "resolution": res,
        "task": args.task,
        "steps": args.steps,
        "settings": "reference" if args.reference_settings else "model defaults",
    }


def run_bench(args, editor, resolution: int | None = None) -> dict:
    """Time one task's edit (fresh inversion), a re-edit (cached inversion) and a plain CFG
    generation, ``args.repeats`` times each, interleaved; report the medians."""
    import statistics

    eng = editor.engine
    res = resolution or editor.default_resolution()
    clock = _Clock(eng.device)
    with tempfile.TemporaryDirectory() as tmp:
        spec = _bench_spec(args, editor, res, Path(tmp))

        def plain():
            return eng.generate(PROMPT, steps=args.steps, guidance_scale=7.5, hw=(res, res))

        # warm-up: one-time costs (allocator, kernels; with --compile every shape it meets)
        # are not counted
        eng.cache = type(eng.cache)(eng.cache.max_items)
        if args.compile:
            editor.edit(spec)
            editor.edit(spec)
            plain()
        else:
            editor.edit(spec.model_copy(update={"steps": 2}))
        clock.reset_peak()
        firsts, agains, plains, phases = [], [], [], []
        n = max(1, args.repeats)
        for k in range(n):
            _say(f"bench: {res} px, repeat {k + 1}/{n}: edit, re-edit, plain generation")
            eng.cache = type(eng.cache)(eng.cache.max_items)  # a new image: invert again
            c0 = eng.counters.as_dict()
            t, r1 = clock.time(lambda: editor.edit(spec))
            firsts.append(t)
            phases.append(r1.metadata["timings_s"])
            c1 = eng.counters.as_dict()
            t, r2 = clock.time(lambda: editor.edit(spec))
            agains.append(t)
            t, _ = clock.time(plain)
            plains.append(t)
    first, again, base = (statistics.median(x) for x in (firsts, agains, plains))
    # the phases of the repeat whose edit time is the median, so they add up to seconds_per_edit
    median_repeat = sorted(range(len(firsts)), key=firsts.__getitem__)[(len(firsts) - 1) // 2]
    warning = _spread_warning({"edit": firsts, "re-edit": agains, "plain generation": plains})
    counts = {k: c1[k] - c0[k] for k in c1}
    return {
        **_header(args, editor, res),
        "guidance_scale": spec.guidance_scale,
        "repeats": len(firsts),
        "seconds_per_edit": round(first, 3),
        "seconds_per_reedit": round(again, 3),
        "plain_generation_seconds": round(base, 3),
        "ratio": round(first / base, 3),
        "ratio_reedit": round(again / base, 3),
        # each repeat's edit over its own plain generation: the run-to-run noise of the machine
        "ratio_range": [round(min(f / b for f, b in zip(firsts, plains)), 3),
                        round(max(f / b for f, b in zip(firsts, plains)), 3)],
        "seconds_per_edit_all": [round(x, 3) for x in firsts],
        "plain_generation_seconds_all": [round(x, 3) for x in plains],
        "phases_s": {k: round(v, 3) for k, v in phases[median_repeat].items() if k != "wall"},
        "phases_repeat": median_repeat + 1,
        "peak_memory_gib": clock.peak_gib(),
        "peak_rss_gib": _peak_rss_gib(),
        "memory_bank_mib": round(r1.metadata["memory_bank_bytes"] / 2**20, 2),
        "unet_forward": counts["unet_forward"],
        "unet_partial_forward": counts["unet_partial"],
        "unet_backward": counts["unet_backward"],
        "merged_reference_passes": counts["merged_reference"],
        "reedit_inversion_cached": r2.metadata["inversion_cached"],
        **({"warning": warning} if warning else {}),
        "fast_path": {
            **eng.options,
            "merge_reference_pass": eng.merge_reference_pass,
            "batched_region_grads": eng.batched_region_grads,
        },
    }


SWITCHES = {
    # name: (what "on" sets, what "off" sets), applied to the engine
    "merge": (lambda e: setattr(e, "merge_reference_pass", True),
              lambda e: setattr(e, "merge_reference_pass", False)),
    "region-grads": (lambda e: setattr(e, "batched_region_grads", True),
                     lambda e: setattr(e, "batched_region_grads", False)),
    "attention-slice": (lambda e: e.set_memory_options(attention_slice=256),
                        lambda e: e.set_memory_options()),
}


def run_ablation(args, editor, switch: str, resolution: int | None = None) -> dict:
    """One fast-path switch on and off in the same process: re-edits (cached inversion)
    alternated ``args.repeats`` times, so slow drifts of the machine hit both sides alike."""
    import statistics

    eng = editor.engine
    on, off = SWITCHES[switch]
    res = resolution or editor.default_resolution()
    clock = _Clock(eng.device)
    keep = (eng.merge_reference_pass, eng.batched_region_grads, dict(eng.options))
    times: dict[str, list[float]] = {"on": [], "off": []}
    peak: dict[str, float | None] = {"on": None, "off": None}
    with tempfile.TemporaryDirectory() as tmp:
        spec = _bench_spec(args, editor, res, Path(tmp))
        try:
            editor.edit(spec)  # inversion (cached from here on) and warm-up
            for _ in range(max(1, args.repeats)):
                for side, apply in (("on", on), ("off", off)):
                    apply(eng)
                    clock.reset_peak()
                    t, _ = clock.time(lambda: editor.edit(spec))
                    times[side].append(t)
                    peak[side] = clock.peak_gib()
        finally:
            eng.merge_reference_pass, eng.batched_region_grads = keep[0], keep[1]
            eng.set_memory_options(keep[2]["attention_slice"], keep[2]["vae_slicing"], keep[2]["vae_tiling"])
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "switch": switch,
        **_header(args, editor, res),
        "repeats": len(times["on"]),
        "seconds_per_reedit_on": round(med["on"], 3), "seconds_per_reedit_off": round(med["off"], 3),
        "speedup": round(med["off"] / med["on"], 3),
        "on_all": [round(x, 3) for x in times["on"]], "off_all": [round(x, 3) for x in times["off"]],
        "peak_memory_gib_on": peak["on"], "peak_memory_gib_off": peak["off"],
    }


@hookimpl
def register_commands(subparsers, registry):
    add_bench_command(subparsers, registry)


def add_bench_command(subparsers, registry=None) -> None:
    """Add ``bench``; its ``--task`` choices are the tasks with a registered scene (of
    ``registry``, default the installed plugins')."""
    from .plugins import default_registry

    table = default_registry(registry).bench_scenes
    scenes = sorted(table)
    default = next((n for n in scenes if table[n].default), scenes[0] if scenes else None)
    p = subparsers.add_parser(
        "bench", help="time an edit against a plain generation (one JSON line)",
        description="Time a full edit (inversion, guided sampling, decode), the same edit again "
        "with the cached inversion, and a plain 50-step CFG generation with the same components, "
        "each --repeats times interleaved, and print one JSON line of medians per resolution. "
        "Progress goes to stderr; when the repeats differ by more than 1.5x (a busy machine), "
        "the line carries a 'warning' and stderr says so.")
    p.add_argument("--model", default=None, metavar="NAME|ID|PATH",
                   help="registered model name, hub id or local folder "
                   "(default: stable-diffusion-v1-5/stable-diffusion-v1-5)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--dtype", default=None,
                   help="float32, float16 or bfloat16 (default: float32 on CPU, float16 on GPU)")
    p.add_argument("--task", default=default, choices=scenes,
                   help=f"the edit timed, on the scene its task plugin registers (default: {default})")
    p.add_argument("--resolution", type=int, nargs="+", default=None, metavar="PX",
                   help="square working size (default: the model's); several give one line each")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of every timed run (default: 50)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of each; medians are reported (default: 3)")
    rand = p.add_mutually_exclusive_group()
    rand.add_argument("--random-sd15", action="store_true",
                      help="SD 1.5's architecture with random weights (no download; default: off)")
    rand.add_argument("--random-sd2", action="store_true",
                      help="SD 2.x 768-v's architecture with random weights (v-prediction, 768 px; default: off)")
    rand.add_argument("--random-sdxl", action="store_true",
                      help="SDXL base's architecture with random weights (two text encoders, 1024 px; default: off)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer folder for --random-* (default: the shapes model's)")
    p.add_argument("--reference-settings", action="store_true",
                   help="the reference's task defaults (CFG 4, ...) instead of the model's registered ones (default: the model's)")
    fast = p.add_argument_group("fast path (defaults: all on where measured faster)")
    fast.add_argument("--compile", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                      help="torch.compile the UNet (reduce-overhead = CUDA graphs); warm-up compiles every shape (default: off)")
    fast.add_argument("--attention-slice", type=int, default=None, metavar="N",
                      help="self-attention N queries at a time (memory; default: all at once)")
    fast.add_argument("--vae-slicing", action="store_true", help="VAE one image at a time (memory; default: off)")
    fast.add_argument("--no-merge", action="store_true",
                      help="run the reference-feature pass on its own instead of inside the CFG call (default: inside)")
    fast.add_argument("--ablate", nargs="+", choices=sorted(SWITCHES), default=None, metavar="SWITCH",
                      help="instead: time re-edits with each switch on and off, alternated "
                      f"(one JSON line per switch; {', '.join(sorted(SWITCHES))})")
    fast.add_argument("--region-grads", choices=["auto", "batched", "per-region"], default="auto",
                      help="one batched backward for all regions, or one per region (auto: batched on GPU)")

    def handler(args) -> int:
        from .errors import CheckErrors
        from .models import quiet_libraries
        from .preflight import check_options

        errors = check_options(args)  # before any model loads, as for edits
        for name in ("steps", "repeats"):
            if getattr(args, name) < 1:
                errors.append(f"--{name} must be at least 1")
        if args.steps > 1000:
            errors.append("--steps must be at most 1000")
        for res in args.resolution or []:
            if not 64 <= res <= 2048:
                errors.append(f"--resolution {res}: must be within 64..2048")
        if errors:
            raise CheckErrors(errors)
        quiet_libraries()
        _say(f"bench: loading {_random_name(args) or args.model or 'the default model'}")
        editor = load_bench_editor(args)
        for res in args.resolution or [None]:
            if args.ablate:
                for switch in args.ablate:
                    print(json.dumps(run_ablation(args, editor, switch, res)), flush=True)
            else:
                line = run_bench(args, editor, res)
                if "warning" in line:
                    _say(f"bench: warning: {line['warning']}")
                print(json.dumps(line), flush=True)
        return 0

    p.set_defaults(func=handler)
