"""The ``diffeditor`` command line.

Every failure meant for the user ends with one line on stderr and a non-zero exit status, and
no partial output file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import CheckErrors, DiffEditorError, OutputError, SpecError, one_line, show

log = logging.getLogger("diffeditor")

EXIT_USER_ERROR = 2


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - logging setup must never fail a command
        pass


def _progress_factory(quiet: bool):
    if quiet:
        return None
    from tqdm.auto import tqdm

    def make(total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="step", leave=False, file=sys.stderr)

    return make


# -- model / device options ---------------------------------------------------------------------

def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="NAME|ID|PATH",
                   help="registered model name (e.g. shapes), hub id or local folder "
                   "(default: stable-diffusion-v1-5/stable-diffusion-v1-5)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float32 on CPU, float16 on GPU)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                   help="keep inversions on disk here and reuse them across runs (default: $DIFFEDITOR_CACHE_DIR)")
    p.add_argument("--vae-tiling", action="store_true",
                   help="encode/decode in tiles and slices (less GPU memory for large images)")
    p.add_argument("--vae-slicing", action="store_true", help="VAE one image of a batch at a time (less memory)")
    p.add_argument("--attention-slice", type=int, default=None, metavar="N",
                   help="self-attention N queries at a time (less memory on small GPUs; same result)")
    p.add_argument("--compile", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile the UNet (reduce-overhead = CUDA graphs); pays off over a batch of specs")
    p.add_argument("--image-prompt-weights", metavar="FILE", default=None,
                   help="image-prompt weights (ip_sd15_64.bin layout) to attach")
    p.add_argument("--image-prompt-encoder", metavar="DIR", default=None,
                   help="CLIP vision encoder folder for the image prompt (h94/IP-Adapter models/image_encoder)")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--out", type=Path, metavar="PATH", help="output image (one spec); a .json sidecar is written beside it")
    g.add_argument("--out-dir", type=Path, metavar="DIR", help="output folder: one <spec name>.png (+ .json) per spec")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")


# -- commands ----------------------------------------------------------------------------------

def cmd_tasks(args) -> int:
    from .plugins import get_registry

    reg = get_registry()
    rows = [(name, reg.tasks[name].version, reg.task_origin[name].distribution,
             reg.tasks[name].description) for name in sorted(reg.tasks)]
    if args.json:
        print(json.dumps([dict(zip(("task", "version", "distribution", "description"), r)) for r in rows], indent=2))
    else:
        width = max([len(r[0]) for r in rows] + [4])
        for name, version, dist, desc in rows:
            print(f"{name:<{width}}  {version:<8}  {dist:<20}  {desc}")
    _report_failures(reg)
    return 0


def cmd_plugins(args) -> int:
    from .plugins import get_registry

    reg = get_registry()
    infos = reg.plugins()
    if args.json:
        print(json.dumps([{"name": i.name, "distribution": i.distribution, "version": i.version,
                           "hooks": i.hooks} for i in infos]
                         + [{"name": f.name, "distribution": f.distribution, "error": f.error}
                            for f in reg.failures], indent=2))
        return 0
    for i in infos:
        print(f"{i.name:<12}  {i.distribution:<20}  {i.version:<8}  hooks: {', '.join(i.hooks)}")
    _report_failures(reg)
    return 0


def cmd_models(args) -> int:
    from .models import DEFAULT_MODEL
    from .plugins import get_registry

    reg = get_registry()
    for name, entry in sorted(reg.models.items()):
        print(f"{name:<12}  {entry.location}  {entry.description}")
    print(f"{'(default)':<12}  {DEFAULT_MODEL}  SD 1.5 from the Hugging Face hub or its cache")
    return 0


def _report_failures(reg) -> None:
    for f in reg.failures:
        print(f"warning: plugin {f.name!r} ({f.distribution}) failed to load: {f.error}", file=sys.stderr)


def cmd_schema(args) -> int:
    from .specs import json_schema

    text = json.dumps(json_schema(), indent=2)
    if args.out:
        from .imageio import atomic_write

        atomic_write(args.out, lambda fh: fh.write(text.encode() + b"\n"), force=True)
    else:
        print(text)
    return 0


def _outputs_for(specs: list[Path], args) -> list[Path]:
    if args.out is not None:
        if len(specs) != 1:
            raise OutputError("--out names one file; use --out-dir DIR for several specs")
        return [args.out]
    folder = args.out_dir or Path(".")
    names = [p.stem for p in specs]
    if len(set(names)) != len(names):
        names = [f"{i:03d}-{n}" for i, n in enumerate(names)]
    return [folder / f"{n}.png" for n in names]


def cmd_edit(args) -> int:
    from .imageio import reserve_outputs
    from .models import resolve_model
    from .preflight import check_edits

    _, entry = resolve_model(args.model)
    defaults = dict(entry.defaults) if entry else {}
    outputs = _outputs_for(args.specs, args)
    # every spec, image, mask, output and option, before any model loads (all errors at once)
    specs = check_edits([(show(p, 200), p) for p in args.specs], outputs, args, defaults)
    with reserve_outputs(outputs):
        return _run(specs, outputs, args)


def _run(specs, outputs, args) -> int:
    from .editor import Editor

    _quiet_libraries()
    ip = None
    if args.image_prompt_weights or args.image_prompt_encoder:
        if not (args.image_prompt_weights and args.image_prompt_encoder):
            raise DiffEditorError("give both --image-prompt-weights and --image-prompt-encoder")
        ip = {"weights": args.image_prompt_weights, "encoder": args.image_prompt_encoder}
    editor = Editor.from_pretrained(args.model, device=args.device, dtype=args.dtype, image_prompt=ip,
                                    cache_dir=args.cache_dir, vae_tiling=args.vae_tiling,
                                    vae_slicing=args.vae_slicing, attention_slice=args.attention_slice,
                                    compile=args.compile)
    progress = _progress_factory(args.quiet)
    for spec, out in zip(specs, outputs):
        result = editor.edit(spec, progress=progress)
        result.save(out, force=args.force)
        t = result.metadata["timings_s"]
        print(f"{out}  ({t['wall']:.1f} s{', cached inversion' if result.metadata['inversion_cached'] else ''})")
    return 0


def cmd_download(args) -> int:
    from .models import DEFAULT_MODEL, resolve_model

    location, _ = resolve_model(args.model or DEFAULT_MODEL)
    if Path(location).is_dir():
        print(f"{location} is a local folder; nothing to download")
        return 0
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(location, allow_patterns=[
            "model_index.json", "scheduler/*", "tokenizer/*", "text_encoder/*.json",
            "text_encoder/*.safetensors", "unet/*.json", "unet/diffusion_pytorch_model.safetensors",
            "vae/*.json", "vae/diffusion_pytorch_model.safetensors"])
    except Exception as exc:
        raise DiffEditorError(
            f"cannot download {location}: {str(exc).splitlines()[0][:200]}; check the network, "
            "or copy the model folder here and pass --model PATH") from None
    print(path)
    if args.image_prompt:
        try:
            from huggingface_hub import hf_hub_download, snapshot_download

            print(hf_hub_download("Adapter/DragonDiffusion", "model/ip_sd15_64.bin"))
            print(snapshot_download("h94/IP-Adapter", allow_patterns=["models/image_encoder/*"]))
        except Exception as exc:
            raise DiffEditorError(f"cannot download the image-prompt weights: {str(exc).splitlines()[0][:200]}") from None
    return 0


# -- per-task quick commands, generated from each task's spec model ------------------------------

_SKIP_FIELDS = {"task", "image", "schedule", "feature_levels"}


def _field_arg(parser: argparse.ArgumentParser, name: str, field) -> None:
    ann = field.annotation
    origin = typing.get_origin(ann)
    args_ = typing.get_args(ann)
    if origin is typing.Union or (origin is not None and type(None) in args_):
        inner = [a for a in args_ if a is not type(None)]
        ann = inner[0] if len(inner) == 1 else ann
        origin, args_ = typing.get_origin(ann), typing.get_args(ann)
    flag = "--" + name.replace("_", "-")
    kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": field.description}
    if origin is typing.Literal:
        kw["choices"] = list(args_)
    elif origin is tuple and args_ and all(a in (int, float) for a in args_):
        kw.update(nargs=len(args_), type=float, metavar=("X", "Y") if len(args_) == 2 else None)
    elif origin is list:
        kw.update(nargs="+", type=float, metavar="X Y")
    elif ann in (int, float):
        kw["type"] = ann
    elif ann is bool:
        kw["action"] = argparse.BooleanOptionalAction
    else:
        kw["type"] = str
    parser.add_argument(flag, **kw)


def _add_task_commands(subparsers, registry) -> None:
    for name in sorted(registry.tasks):
        task = registry.tasks[name]
        p = subparsers.add_parser(name, help=f"{task.description} (no spec file needed)",
                                  description=(task.spec_model.__doc__ or "").strip())
        p.add_argument("image", type=Path, help="the image to edit")
        for fname, field in task.spec_model.model_fields.items():
            if fname not in _SKIP_FIELDS:
                _field_arg(p, fname, field)
        _add_model_options(p)
        _add_output_options(p)
        p.set_defaults(func=_make_task_command(name, task))


def _make_task_command(name: str, task):
    def run(args) -> int:
        from .imageio import reserve_outputs
        from .models import resolve_model
        from .preflight import check_edits

        data: dict[str, Any] = {"task": name, "image": str(args.image)}
        for fname, field in task.spec_model.model_fields.items():
            if fname in _SKIP_FIELDS or fname not in vars(args):
                continue
            value = getattr(args, fname)
            if typing.get_origin(field.annotation) is list and isinstance(value, list):
                if len(value) % 2:
                    raise SpecError(f"give x y pairs (got {len(value)} numbers)", fname)
                value = [value[i : i + 2] for i in range(0, len(value), 2)]
            data[fname] = value
        _, entry = resolve_model(args.model)
        out = args.out or (args.out_dir or Path(".")) / f"{args.image.stem}.{name}.png"
        specs = check_edits([("arguments", data)], [out], args,
                            dict(entry.defaults) if entry else {}, base_dir=Path.cwd())
        with reserve_outputs([out]):
            return _run(specs, [out], args)

    return run


# -- entry point --------------------------------------------------------------------------------

def build_parser(registry=None) -> argparse.ArgumentParser:
    from .plugins import get_registry

    reg = registry or get_registry()
    parser = argparse.ArgumentParser(
        prog="diffeditor",
        description="DiffEditor image editing: move, resize, drag, appearance, paste and face edits.",
    )
    parser.add_argument("--version", action="version", version=f"diffeditor {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="log details (and show tracebacks)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("edit", help="run edit specs (YAML or JSON); several specs = a batch")
    p.add_argument("specs", nargs="+", type=Path, metavar="SPEC")
    _add_model_options(p)
    _add_output_options(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("tasks", help="list the registered editing tasks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tasks)
    p = sub.add_parser("plugins", help="list the installed plugins")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("models", help="list the registered model names")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("schema", help="print the JSON Schema of edit specs")
    p.add_argument("--out", type=Path, help="write it to a file instead")
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser("download", help="pre-fetch a model's weights (needs a network)")
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--image-prompt", action="store_true", help="also fetch the image-prompt weights")
    p.set_defaults(func=cmd_download)
    from .bench import add_bench_command

    add_bench_command(sub)
    _add_task_commands(sub, reg)
    reg.pm.hook.register_commands(subparsers=sub)
    return parser


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C (temporary files removed, no partial output)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # pragma: no cover - not settable here
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _exit_cleanly_on_sigterm()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help()
            return EXIT_USER_ERROR
        return int(args.func(args) or 0)
    except DiffEditorError as exc:
        if verbose:
            raise
        for line in exc.lines if isinstance(exc, CheckErrors) else [str(exc)]:
            print(f"diffeditor: error: {one_line(line)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("diffeditor: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a file the checks could not foresee (removed meanwhile, a full disk)
        if verbose:
            raise
        where = f": {show(exc.filename, 200)}" if getattr(exc, "filename", None) else ""
        print(f"diffeditor: error: {one_line(exc.strerror or str(exc))}{where}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
