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
_BROKEN_COMMANDS: dict[str, bool] = {}  # plugins whose register_commands raised (reported once)
_ARGV: list[str] | None = None  # the arguments main() was called with (recorded in sidecars)


def progress_factory(quiet: bool, label: str | None = None):
    """Progress bars on stderr, each named ``label: phase`` (``[2/7] drag: editing``): the
    ``progress`` argument of ``Editor.edit``; ``None`` when ``quiet``."""
    if quiet:
        return None
    from tqdm.auto import tqdm

    def make(total: int, desc: str):
        return tqdm(total=total, desc=f"{label}: {desc}" if label else desc, unit="step",
                    leave=False, file=sys.stderr)

    return make


# -- model / device options ---------------------------------------------------------------------

def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="NAME|ID|PATH",
                   help="registered model name (e.g. shapes; see diffeditor models), hub id, "
                   "local diffusers folder, or a single checkpoint file (.safetensors, or .ckpt "
                   "read with weights_only) whose family (SD 1.x, SD 2.x, SDXL) is detected from "
                   "its tensor names (default: $DIFFEDITOR_MODEL, else 'diffeditor config set "
                   "model', else stable-diffusion-v1-5/stable-diffusion-v1-5)")
    p.add_argument("--config", default=None, metavar="DIR",
                   help="with a checkpoint file: a diffusers folder of the same family whose "
                   "configs, tokenizer and scheduler it is built with (weights not needed; "
                   "default: the family's reference model in the local Hugging Face cache; "
                   "the hub is never asked)")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]",
                   help="a LoRA (diffusers or kohya format, .safetensors) fused into the model "
                   "at SCALE (default 1.0); repeat for several. Recorded in the sidecar with "
                   "its hash (default: none; a sidecar replay uses the sidecar's)")
    p.add_argument("--vae", default=None, metavar="DIR|FILE",
                   help="a replacement VAE: a diffusers AutoencoderKL folder (or a model folder "
                   "with vae/) or a single file such as vae-ft-mse-840000-ema-pruned.safetensors "
                   "(default: the model's own; a sidecar replay uses the sidecar's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float32 on CPU, float16 on GPU)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars (default: bars on stderr)")
    p.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                   help="keep inversions on disk here and reuse them across runs (default: $DIFFEDITOR_CACHE_DIR)")
    p.add_argument("--vae-tiling", action="store_true",
                   help="encode/decode in tiles and slices (less GPU memory for large images; default: off)")
    p.add_argument("--vae-slicing", action="store_true", help="VAE one image of a batch at a time (less memory; default: off)")
    p.add_argument("--attention-slice", type=int, default=None, metavar="N",
                   help="self-attention N queries at a time (less memory on small GPUs; same result; default: all at once)")
    p.add_argument("--compile", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile the UNet (reduce-overhead = CUDA graphs); pays off over a batch of specs (default: off)")
    p.add_argument("--image-prompt-weights", metavar="FILE", default=None,
                   help="image-prompt weights (ip_sd15_64.bin layout) to attach (default: the model's own, if any)")
    p.add_argument("--image-prompt-encoder", metavar="DIR", default=None,
                   help="CLIP vision encoder folder for the image prompt (h94/IP-Adapter models/image_encoder; default: the model's own, if any)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch CPU threads per worker (default: $OMP_NUM_THREADS if set, else "
                   "the cores divided among the workers of one machine)")


def whole_number(minimum: int):
    """An argparse ``type``: a whole number of at least ``minimum``, else argparse's one line
    (for plugins' commands too: ``diffeditor shapes scene --seed``)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


_positive_int = whole_number(1)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _add_output_options(p: argparse.ArgumentParser, default_name: str,
                        dir_help: str | None = None) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--out", type=Path, metavar="PATH",
                   help="output image (one spec); a .json sidecar is written beside it "
                   f"(default: {default_name} in the current folder)")
    g.add_argument("--out-dir", type=Path, metavar="DIR",
                   help=dir_help or f"output folder (default: the current folder): {default_name}")
    p.add_argument("--force", action="store_true",
                   help="overwrite existing outputs (default: an existing file is never overwritten)")


# -- commands ----------------------------------------------------------------------------------

def cmd_tasks(args) -> int:
    reg = args.registry
    rows = [(name, reg.tasks[name].version, reg.task_origin[name].distribution,
             reg.tasks[name].description) for name in sorted(reg.tasks)]
    if args.json:
        print(json.dumps([dict(zip(("task", "version", "distribution", "description"), r)) for r in rows], indent=2))
    else:
        width = max([len(r[0]) for r in rows] + [4])
        for name, version, dist, desc in rows:
            print(f"{name:<{width}}  {version:<8}  {dist:<20}  {desc}")
    _plugin_env_note()
    return 0


def cmd_plugins(args) -> int:
    reg = args.registry
    infos = reg.plugins()
    if args.json:
        print(json.dumps([{"name": i.name, "distribution": i.distribution, "version": i.version,
                           "hooks": i.hooks} for i in infos]
                         + [{"name": f.name, "distribution": f.distribution, "error": f.error}
                            for f in reg.failures], indent=2))
        return 0
    for i in infos:
        print(f"{i.name:<12}  {i.distribution:<20}  {i.version:<8}  hooks: {', '.join(i.hooks)}")
    for f in reg.failures:  # (the warning on stderr said why, once)
        print(f"{f.name:<12}  {f.distribution:<20}  {'skipped':<8}  {f.error}")
    for kind in ("samplers", "schedules", "energies"):  # what specs and tasks select by name
        print(f"{kind + ':':<12}  {', '.join(sorted(getattr(reg, kind))) or 'none'}")
    _plugin_env_note()
    return 0


def cmd_models(args) -> int:
    from .models import DEFAULT_MODEL, default_model

    reg = args.registry
    for name, entry in sorted(reg.models.items()):
        print(f"{name:<12}  {entry.location}  {entry.description}")
        for key, value in sorted(entry.defaults.items()):
            print(f"{'':<14}default {key} = {json.dumps(value)}")
    model, source = default_model()
    if model == DEFAULT_MODEL and source == "built in":
        print(f"{'(default)':<12}  {DEFAULT_MODEL}  SD 1.5 from the Hugging Face hub or its cache "
              "(the tasks' own defaults); change it with 'diffeditor config set model NAME|PATH'")
    else:
        print(f"{'(default)':<12}  {model}  (set by {source})")
    return 0


def cmd_config(args) -> int:
    """``diffeditor config``: user settings (the default model) in the platform's config
    folder (``$XDG_CONFIG_HOME/diffeditor/config.json`` when that is set)."""
    from .models import (
        CONFIG_KEYS,
        MODEL_ENV,
        read_user_config,
        resolve_model,
        user_config_path,
        write_user_config,
    )

    data = read_user_config()
    if args.action == "path":
        print(user_config_path())
        return 0
    if args.action == "list":
        for key in CONFIG_KEYS:
            if key in data:
                print(f"{key} = {data[key]}")
        return 0
    if args.key not in CONFIG_KEYS:
        raise DiffEditorError(f"unknown setting {show(args.key, 40)!r}; settings: "
                              f"{', '.join(CONFIG_KEYS)}")
    if args.action == "get":
        if args.key not in data:
            print(f"(not set: {CONFIG_KEYS[args.key]})", file=sys.stderr)
            return 1
        print(data[args.key])
        return 0
    if args.action == "unset":
        data.pop(args.key, None)
        write_user_config(data)
        return 0
    if args.value is None:
        raise DiffEditorError(f"config set {args.key} needs a value")
    value = args.value
    resolve_model(value, args.registry)  # a name, an existing folder or file, or a hub id
    if value not in args.registry.models and Path(value).expanduser().exists():
        value = str(Path(value).expanduser().absolute())
    data[args.key] = value
    path = write_user_config(data)
    print(f"{args.key} = {value}  ({path})")
    if os.environ.get(MODEL_ENV, "").strip():
        print(f"note: ${MODEL_ENV} is set and wins over this setting", file=sys.stderr)
    return 0


def _plugin_env_note() -> None:
    """Say on stderr when the environment narrowed which plugins load."""
    from .plugins import DISABLE_ENV, ONLY_ENV

    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes"):
        print(f"note: {DISABLE_ENV} is set: third-party plugins are off; diffeditor's own tasks "
              "are listed", file=sys.stderr)
    elif os.environ.get(ONLY_ENV, "").strip():
        print(f"note: {ONLY_ENV}={os.environ[ONLY_ENV]}: only those third-party plugins load "
              "(with diffeditor's own tasks)", file=sys.stderr)


def cmd_schema(args) -> int:
    from .specs import json_schema

    reg = args.registry
    if args.task:
        if args.task not in reg.tasks:
            raise SpecError(f"unknown task {args.task!r}; registered tasks: {', '.join(sorted(reg.tasks))}")
        schema = reg.tasks[args.task].spec_model.model_json_schema()
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    else:
        schema = json_schema(reg)
    text = json.dumps(schema, indent=2)
    if args.out:
        from .imageio import atomic_write

        atomic_write(args.out, lambda fh: fh.write(text.encode() + b"\n"), force=True)
    else:
        print(text)
    return 0


def _sidecar_model(paths: list[Path]) -> str | None:
    """The model named by the sidecars among ``paths``, when every spec is a sidecar of one model
    (``diffeditor edit OUT.json`` replays on the model that made OUT.png)."""
    from .specs import is_sidecar, read_spec_file

    models = set()
    for p in paths:
        data = read_spec_file(p)
        if not is_sidecar(data):
            return None
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            raise SpecError(f"{show(p, 200)}: model: must be the model's name or folder (a "
                            f"string), not {type(model).__name__}; fix the sidecar or give "
                            f"--model")
        models.add(model)
    return models.pop() if len(models) == 1 else None


def _sidecar_extras(paths: list[Path], args) -> None:
    """A replay of sidecars (``diffeditor edit OUT.json``) uses the checkpoint config, LoRAs
    and VAE they record, unless the command line names its own; a recorded file whose bytes
    changed (or that is gone) is an error that says so."""
    from .models import file_hash
    from .specs import is_sidecar, read_spec_file

    if not paths:
        return
    records = []
    for p in paths:
        try:
            data = read_spec_file(p)
        except DiffEditorError:  # a manifest or a broken file: the batch's checks report it
            return
        if not is_sidecar(data):
            return
        records.append((p, {k: data.get(k) for k in ("config", "lora", "vae")}))
    first = records[0][1]
    for p, rec in records[1:]:
        if rec != first and (args.lora is None or args.vae is None or args.config is None):
            raise DiffEditorError(f"{show(p, 200)} was made with another config, LoRA or VAE "
                                  f"than {show(records[0][0], 200)}; replay them separately")
    source = show(records[0][0], 200)

    def check(what: str, rec: dict) -> str:
        path = rec.get("path") if isinstance(rec, dict) else None
        if not isinstance(path, str):
            raise DiffEditorError(f"{source}: damaged {what} record in the sidecar")
        if not Path(path).exists():
            raise DiffEditorError(f"{source} was made with the {what} {path}, which no longer "
                                  f"exists; pass --{what} FILE to replay with another")
        now = file_hash(path)
        if now != rec.get("sha256"):
            raise DiffEditorError(
                f"{source} was made with the {what} {path}, which has changed since (recorded "
                f"{str(rec.get('sha256'))[:19]}..., now {now[:19]}...); pass --{what} "
                f"{path} to replay with it as it is now")
        return path

    if args.config is None and isinstance(first.get("config"), str):
        args.config = first["config"]
    if args.lora is None and first.get("lora"):
        if not isinstance(first["lora"], list):
            raise DiffEditorError(f"{source}: damaged lora record in the sidecar")
        args.lora = [f"{check('lora', r)}:{float(r.get('scale', 1.0))!r}" for r in first["lora"]]
    if args.vae is None and first.get("vae"):
        args.vae = check("vae", first["vae"])


def cmd_edit(args) -> int:
    """``diffeditor edit``: one spec or a batch (see :mod:`diffeditor.batch`)."""
    from . import batch
    from .imageio import reserve_outputs
    from .models import resolve_model
    from .preflight import _warn_slow

    if args.ray is not None and getattr(args, "ray_runner", None) is None:
        raise DiffEditorError("--ray needs the diffeditor-ray plugin: pip install "
                              "./plugins/diffeditor-ray (and ray)")
    if args.ray is None and (args.workers is not None or args.gpus_per_worker is not None):
        raise DiffEditorError("--workers and --gpus-per-worker go with --ray")
    jobs = batch.collect(args.specs)
    if args.out is not None and len(jobs) > 1:
        raise OutputError("--out names one file; use --out-dir DIR for several specs")
    if args.model is None:
        args.model = _sidecar_model([j.source for j in jobs if isinstance(j.source, Path)]
                                    if all(isinstance(j.source, Path) for j in jobs) else [])
    if all(isinstance(j.source, Path) for j in jobs) and not args.check:
        _sidecar_extras([j.source for j in jobs], args)
    _, entry = resolve_model(args.model, args.registry)
    defaults = dict(entry.defaults) if entry else {}
    if args.check:
        from .preflight import check_edits

        paths = [j.spec_path for j in jobs]
        if any(p is None for p in paths) or any(j.error for j in jobs):
            raise DiffEditorError("--check takes spec files (not manifests or ids)")
        specs = check_edits([(show(p, 200), p) for p in paths], [], args, defaults,
                            registry=args.registry)
        return _print_checked(paths, specs, args.model, defaults)
    out_dir = args.out_dir or Path(".")
    todo, known = batch.prepare(jobs, out_dir, args, defaults, single_out=args.out,
                                registry=args.registry)
    _warn_slow([j.spec for j in todo], [(j.label, None) for j in todo], args)
    failures = out_dir / batch.FAILURES_FILE if len(jobs) > 1 else None
    for o in known:
        if o.status == "failed":
            batch.report(o)
    t0 = __import__("time").perf_counter()
    runner = args.ray_runner if args.ray is not None else _run_local
    with reserve_outputs([failures or args.out or out_dir / f"{jobs[0].name}.png"]):
        outcomes, workers = runner(todo, known, args, len(jobs))
    return batch.finish(known + outcomes, failures, __import__("time").perf_counter() - t0,
                        workers)


def load_editor(args):
    """The :class:`Editor` a parsed command line's model options name (``--model``,
    ``--device``, ``--dtype``, the image-prompt and memory options; a namespace with those
    attributes works too, as the Ray workers build one), with the libraries' chatter off."""
    from .editor import Editor
    from .models import quiet_libraries

    quiet_libraries()

    ip = None
    if args.image_prompt_weights or args.image_prompt_encoder:
        if not (args.image_prompt_weights and args.image_prompt_encoder):
            raise DiffEditorError("give both --image-prompt-weights and --image-prompt-encoder")
        ip = {"weights": args.image_prompt_weights, "encoder": args.image_prompt_encoder}
    return Editor.from_pretrained(args.model, device=args.device, dtype=args.dtype, image_prompt=ip,
                                  cache_dir=args.cache_dir, vae_tiling=args.vae_tiling,
                                  vae_slicing=args.vae_slicing, attention_slice=args.attention_slice,
                                  compile=args.compile, registry=getattr(args, "registry", None),
                                  config=getattr(args, "config", None),
                                  lora=getattr(args, "lora", None), vae=getattr(args, "vae", None))


def command_line() -> str:
    import shlex

    return shlex.join(["diffeditor", *(sys.argv[1:] if _ARGV is None else _ARGV)])


def _run_local(todo, known, args, total: int):
    """The batch in this process: one model load, edits grouped by source image."""
    from . import batch

    if not todo:
        return [], 1
    with batch.torch_threads(args.threads or batch.default_threads(1)):
        return _run_local_threads(todo, known, args, total)


def _run_local_threads(todo, known, args, total: int):
    from . import batch

    editor = load_editor(args)
    editor.command_line = command_line()
    bar = batch.batch_bar(total, args.quiet, initial=len(known))
    outcomes = []
    try:
        for group in batch.groups(todo):
            for job in group:
                label = f"[{job.index + 1}/{total}] {job.name}" if total > 1 else job.spec.task
                outcome = batch.run_one(editor, job.payload(args),
                                        progress=progress_factory(args.quiet, label))
                if outcome.status == "failed" and total == 1:
                    raise DiffEditorError(outcome.error.split(" failed: ", 1)[1])
                if outcome.status == "failed":
                    outcome.error = f"[{job.index + 1}/{total}] {outcome.error}"
                outcomes.append(outcome)
                batch.report(outcome, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    return outcomes, 1


def _print_checked(paths, specs, model, defaults) -> int:
    """``edit --check``: each spec resolved, every field with where its value came from."""
    from .specs import read_spec_file, spec_section

    name = model or "(default model)"
    for path, spec in zip(paths, specs):
        given = set(spec_section(read_spec_file(path)))
        data = spec.model_dump(mode="json")
        print(f"{path}: valid {spec.task} spec")
        width = max(len(k) for k in data)
        for key, value in data.items():
            if key in given:
                source = "spec"
            elif key in defaults or f"{spec.task}.{key}" in defaults:
                source = f"model {name}"
            else:
                source = f"default of task {spec.task}"
            print(f"  {key:<{width}}  {json.dumps(value)}  [{source}]")
    return 0


def _run(specs, outputs, args, sources=None) -> int:
    """Edit each spec on one loaded model. A spec that fails during its edit is reported in one
    line and the batch goes on; a summary ends a batch, and any failure makes the exit status 1."""
    from .batch import default_threads, torch_threads

    with torch_threads(getattr(args, "threads", None) or default_threads(1)):
        return _run_edits(specs, outputs, args, sources)


def _run_edits(specs, outputs, args, sources=None) -> int:
    editor = load_editor(args)
    editor.command_line = command_line()
    n = len(specs)
    failed: list[str] = []
    for k, (spec, out) in enumerate(zip(specs, outputs)):
        label = f"[{k + 1}/{n}] {Path(sources[k]).stem if sources else spec.task}"
        progress = progress_factory(args.quiet, label if n > 1 else spec.task)
        try:
            result = editor.edit(spec, progress=progress,
                                 spec_path=sources[k] if sources else None)
            result.save(out, force=args.force)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one failing spec must not stop the batch
            if n == 1:
                raise
            log.info("edit %s failed", label, exc_info=True)
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"diffeditor: {label} failed: {msg}", file=sys.stderr)
            failed.append(label)
            continue
        t = result.metadata["timings_s"]
        print(f"{out}  ({t['wall']:.1f} s{', cached inversion' if result.metadata['inversion_cached'] else ''})")
    if n > 1:
        print(f"{n - len(failed)} of {n} edits written"
              + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def cmd_download(args) -> int:
    from .models import DEFAULT_MODEL, resolve_model

    location, _ = resolve_model(args.model or DEFAULT_MODEL, args.registry)
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

_SKIP_FIELDS = {"task", "image", "schedule", "feature_levels", "energies"}


def plain_text(text: str | None) -> str:
    """A docstring or field description without reST markup (``x`` -> x, :class:`a.B` -> B)."""
    import re

    text = re.sub(r":[a-z]+:`~?([^`]*)`", lambda m: m.group(1).rsplit(".", 1)[-1], text or "")
    return re.sub(r"``([^`]*)``", r"\1", text).strip()


def _required(field) -> bool:
    return field.is_required()


def _default_text(name: str, field, task: str, registry) -> str:
    """The effective default of a task option: the task's, and each registered model's own."""
    if _required(field):
        return "required"
    default = field.get_default(call_default_factory=True)
    parts = [f"default: {_show(default)}"]
    for mname, entry in sorted(registry.models.items()):
        for key in (f"{task}.{name}", name):
            if key in entry.defaults:
                parts.append(f"with --model {mname}: {_show(entry.defaults[key])}")
                break
    return "; ".join(parts)


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if value == "":
        return '""'
    if isinstance(value, (tuple, list)):
        return " ".join(_show(v) for v in value)
    if hasattr(value, "model_dump"):
        return json.dumps(value.model_dump(mode="json"))
    return str(value)


def _field_arg(parser, name: str, field, task: str, registry) -> None:
    ann = field.annotation
    origin = typing.get_origin(ann)
    args_ = typing.get_args(ann)
    if origin is typing.Union or (origin is not None and type(None) in args_):
        inner = [a for a in args_ if a is not type(None)]
        ann = inner[0] if len(inner) == 1 else ann
        origin, args_ = typing.get_origin(ann), typing.get_args(ann)
    flag = "--" + name.replace("_", "-")
    help_ = f"{plain_text(field.description)} ({_default_text(name, field, task, registry)})"
    kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_}
    if _required(field):
        kw["required"] = True
    if origin is list and args_ and typing.get_origin(args_[0]) is dict:
        # compose's edits: one --edit per edit, a spec file or inline JSON
        flag = "--" + name.rstrip("s").replace("_", "-")
        kw.update(action="append", metavar="FILE|JSON", help=(
            f"{plain_text(field.description)}: repeat once per edit; each is a YAML/JSON spec "
            "file of one edit (paths relative to that file) or inline JSON such as "
            "'{\"task\": \"move\", \"mask\": \"m.png\", \"offset\": [20, 0]}' (paths "
            "relative to the current folder); required"))
    elif origin is typing.Literal:
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
        doc = plain_text(task.spec_model.__doc__) or task.description
        p = subparsers.add_parser(
            name, help=f"{task.description} (no spec file needed)",
            description=f"{doc} Options are the fields of a {name} spec (diffeditor schema "
            f"{name}); 'default' is the task's own, overridden by a registered model's where "
            "shown; the spec's own values (here: the options given) win.")
        p.add_argument("image", type=Path, help="the image to edit (required)")
        for fname, field in task.spec_model.model_fields.items():
            if fname not in _SKIP_FIELDS:
                _field_arg(p, fname, field, name, registry)
        _add_model_options(p)
        _add_output_options(p, default_name=f"IMAGE.{name}.png")
        p.set_defaults(func=_make_task_command(name, task))


def _edit_arg(text: str, field: str, registry) -> dict:
    """One ``--edit``: inline JSON (paths relative to the current folder) or a spec file (paths
    relative to that file); the paths are made absolute here."""
    from .specs import SpecTextError, loads_json, read_spec_file

    text = text.strip()
    if text.startswith("{"):
        try:
            data = loads_json(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"not valid JSON ({exc.msg} at column {exc.colno}): {text}", field) from None
        except SpecTextError as exc:
            raise SpecError(str(exc), field) from None
        base = Path.cwd()
    else:
        data = read_spec_file(text)
        base = Path(text).resolve().parent
    if not isinstance(data, dict):
        raise SpecError("each --edit must be a mapping with a 'task' field", field)
    task = registry.tasks.get(data.get("task"))
    if task is not None:
        for key, value in list(data.items()):
            f = task.spec_model.model_fields.get(key)
            if f is not None and "Path" in str(f.annotation) and isinstance(value, str):
                data[key] = str((base / Path(value).expanduser()).absolute())
    return data


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
            ann = field.annotation
            if typing.get_origin(ann) is list and typing.get_origin(typing.get_args(ann)[0]) is dict:
                value = [_edit_arg(v, f"{fname}[{j}]", args.registry) for j, v in enumerate(value)]
            elif typing.get_origin(ann) is list and isinstance(value, list):
                if len(value) % 2:
                    raise SpecError(f"give x y pairs (got {len(value)} numbers)", fname)
                value = [value[i : i + 2] for i in range(0, len(value), 2)]
            data[fname] = value
        _, entry = resolve_model(args.model, args.registry)
        out = args.out or (args.out_dir or Path(".")) / f"{args.image.stem}.{name}.png"
        specs = check_edits([("arguments", data)], [out], args,
                            dict(entry.defaults) if entry else {}, base_dir=Path.cwd(),
                            registry=args.registry)
        with reserve_outputs([out]):
            return _run(specs, [out], args, sources=None)

    return run


# -- entry point --------------------------------------------------------------------------------

def build_parser(registry=None) -> argparse.ArgumentParser:
    """The command line of the tasks, models and commands ``registry`` has (default: the
    installed plugins'); every command finds the registry in ``args.registry``."""
    from .plugins import default_registry

    reg = default_registry(registry)
    parser = argparse.ArgumentParser(
        prog="diffeditor",
        description="DiffEditor image editing: move, resize, drag, appearance, paste and face "
        "edits. Every output X.png gets a sidecar X.json (spec, seed, model, versions, "
        "timings), which 'diffeditor edit X.json' replays. Bad input ends with one line and "
        "exit status 2, before any model loads.",
    )
    parser.add_argument("--version", action="version", version=f"diffeditor {__version__}",
                        help="print the version and exit")
    parser.add_argument("--verbose", "-v", action="store_true", help="log details (and show tracebacks)")
    parser.set_defaults(registry=reg)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "edit", help="run edit specs (YAML or JSON); several specs = a batch",
        description="Run edit specs (YAML or JSON files; paths inside are relative to the file) "
        "on one loaded model. An output's JSON sidecar is a spec too: 'diffeditor edit OUT.json "
        "--out again.png' replays that edit (on the sidecar's model unless --model is given). "
        "In a batch, a spec that fails while editing is reported in one line and the others go "
        "on; the exit status is then 1.")
    p.add_argument("specs", nargs="+", type=Path, metavar="SPEC",
                   help="spec files (YAML or JSON), sidecars of earlier outputs, folders, glob "
                   "patterns ('cases/**/*.json') or JSONL manifests (one spec per line, paths "
                   "relative to the manifest; an 'id' field names the output) (required). A "
                   "folder means the edit specs below it: the *.yaml, *.yml and *.json files "
                   "holding a mapping with 'task' and 'image' keys; the others (JSON Schemas, "
                   "the shapes world's case.json, compose's one-edit files) and sidecars are "
                   "skipped, with one note on stderr saying how many and why")
    p.add_argument("--check", action="store_true",
                   help="only validate: print each resolved spec, every field with where its "
                   "value came from (spec, model default, task default); no model is loaded")
    _add_model_options(p)
    _add_output_options(p, default_name="SPEC.png, from the spec file's name", dir_help=(
        "output folder (default: the current folder): each spec's path below the specs' "
        "common folder, with .png (a/b.yaml -> DIR/a/b.png), or its 'id' field + .png; a "
        "second run skips edits already done (same spec hash in the sidecar), failures are "
        "listed in DIR/failures.jsonl"))
    p.add_argument("--skip-invalid", action="store_true",
                   help="in a batch, report a spec that fails the checks (in the summary and "
                   "DIR/failures.jsonl) and edit the others (default: list every problem and "
                   "edit nothing, exit status 2)")
    g = p.add_argument_group("scale-out (with the diffeditor-ray plugin)")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS|auto",
                   help="edit on a Ray cluster: auto = the running cluster, ADDRESS = "
                   "ray://host:10001 or host:port; alone: a local Ray instance on this "
                   "machine (default: no Ray, one process)")
    g.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="worker actors, each loading the model once (default: the cluster's "
                   "GPUs / --gpus-per-worker, else its CPUs / --threads)")
    g.add_argument("--gpus-per-worker", type=_positive_float, default=None, metavar="F",
                   help="GPUs per worker actor, fractions allowed (default: 0, CPU workers)")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("tasks", help="list the registered editing tasks",
                       description="List the registered editing tasks: name, version, the "
                       "distribution that registered it, and what it does.")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=cmd_tasks)
    p = sub.add_parser("plugins", help="list the installed plugins",
                       description="List the loaded plugins and their hooks, and any plugin "
                       "that was skipped (failed to import, or a hook that matches no hook "
                       "specification) with the reason.")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("models", help="list the registered model names and their defaults",
                       description="List the registered model names, where their weights are, "
                       "and the spec defaults each model sets over the tasks' own.")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser(
        "config", help="user settings: the default model",
        description="Read or change the user settings, kept in the platform's config folder "
        "($XDG_CONFIG_HOME/diffeditor/config.json when XDG_CONFIG_HOME is set, else "
        "~/.config/diffeditor, ~/Library/Application Support/diffeditor on macOS, "
        "%APPDATA%\\diffeditor on Windows). 'model' is used when --model is not given; "
        "$DIFFEDITOR_MODEL wins over it.")
    p.add_argument("action", choices=["set", "get", "unset", "list", "path"],
                   help="set KEY VALUE, get KEY, unset KEY, list, or path (of the file)")
    p.add_argument("key", nargs="?", default="model", metavar="KEY",
                   help="the setting (default: model; the only one)")
    p.add_argument("value", nargs="?", default=None, metavar="VALUE",
                   help="for set: a registered model name, a folder, a checkpoint file or a hub id")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("schema", help="print the JSON Schema of edit specs",
                       description="Print the JSON Schema of every spec the installed tasks "
                       "accept, or of one task's spec.")
    p.add_argument("task", nargs="?", default=None, metavar="TASK",
                   help="only this task's spec (default: all tasks, one discriminated union)")
    p.add_argument("--out", type=Path, metavar="FILE", help="write it to FILE instead of stdout")
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser("download", help="pre-fetch a model's weights (needs a network)",
                       description="Download a hub model's weights into the Hugging Face cache "
                       "(HF_HOME), so that later edits run offline.")
    p.add_argument("model", nargs="?", default=None, metavar="ID",
                   help="hub id (default: stable-diffusion-v1-5/stable-diffusion-v1-5)")
    p.add_argument("--image-prompt", action="store_true", help="also fetch the image-prompt weights")
    p.set_defaults(func=cmd_download)
    _add_task_commands(sub, reg)
    for impl in reg.pm.hook.register_commands.get_hookimpls():
        try:  # a plugin whose commands fail to build is reported; the others still work
            given = {"subparsers": sub, "registry": reg}
            impl.function(**{name: given[name] for name in impl.argnames})
        except Exception as exc:
            if not _BROKEN_COMMANDS.get(impl.plugin_name):
                _BROKEN_COMMANDS[impl.plugin_name] = True
                log.warning("plugin %r skipped: its register_commands failed: %s: %s",
                            impl.plugin_name, type(exc).__name__, exc)
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


EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a command killed by SIGPIPE


def _flush_stdout() -> None:
    if sys.stdout is not None:
        sys.stdout.flush()


def _stop_on_broken_pipe() -> int:
    """The reader of stdout closed it: no message, and nothing more written there (Python's
    final flush at exit would fail again and print a traceback-like warning)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real stdout (an embedding caller)
        pass
    return EXIT_BROKEN_PIPE


def main(argv: Sequence[str] | None = None, registry=None) -> int:
    """The ``diffeditor`` command; ``registry`` (default: the installed plugins') is the one
    place the command line's registry comes from."""
    global _ARGV
    argv = list(sys.argv[1:] if argv is None else argv)
    _ARGV = argv
    verbose = "-v" in argv or "--verbose" in argv
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _exit_cleanly_on_sigterm()
    try:
        parser = build_parser(registry)
        try:
            args = parser.parse_args(argv)
        except SystemExit:  # --help, --version, a usage error: their text goes out here
            _flush_stdout()
            raise
        if getattr(args, "func", None) is None:
            parser.print_help()
            _flush_stdout()
            return EXIT_USER_ERROR
        status = int(args.func(args) or 0)
        _flush_stdout()  # a closed pipe shows here, not in the interpreter's final flush
        return status
    except DiffEditorError as exc:
        if verbose:
            raise
        for line in exc.lines if isinstance(exc, CheckErrors) else [str(exc)]:
            print(f"diffeditor: error: {one_line(line)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("diffeditor: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`diffeditor ... | head`): stop quietly
        return _stop_on_broken_pipe()
    except OSError as exc:  # a file the checks could not foresee (removed meanwhile, a full disk)
        if verbose:
            raise
        where = f": {show(exc.filename, 200)}" if getattr(exc, "filename", None) else ""
        print(f"diffeditor: error: {one_line(exc.strerror or str(exc))}{where}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
