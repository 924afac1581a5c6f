"""Model loading: SD 1.x, 2.x and SDXL diffusers pipelines from a hub id, a local folder or a name."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class ModelEntry:
    """A named model registered by a plugin through ``register_models``.

    Attributes:
        name: what users pass to ``--model`` (for example ``"shapes"``).
        location: a local folder holding a diffusers pipeline, or a hub id.
        description: one line for ``diffeditor models``.
        defaults: spec-field defaults for this model, applied under the user's values
            (for example ``{"resolution": 128}``); keys are spec field names, and a key
            ``"<task>.<field>"`` applies to that task only.
        image_prompt: optional path of the image-prompt weights (``ip_sd15_64.bin`` layout)
            and the CLIP image-encoder folder, as a dict with keys ``weights`` and ``encoder``.
    """

    name: str
    location: str
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    image_prompt: dict[str, str] | None = None


FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd1": {},  # the spec's own defaults (resolution: the reference's 768)
    "sd2": {},  # SD 2.x base (512 px, epsilon): as SD 1.x
    "sd2-v": {"resolution": 768},  # SD 2.x 768-v: its native size
    # SDXL: its native size; guidance features from up_blocks 0 and 1 (docs/backbones.md: the
    # same resolutions, 1/2 and 1/1 of the latent, as SD 1.x's levels 1 and 2)
    "sdxl": {"resolution": 1024, "feature_levels": [0, 1]},
}
"""Spec-field defaults per model family, applied under a model's own (registered entry or
``diffeditor.json`` card) and the user's values; :func:`model_family` names the family."""


def model_family(unet_config, prediction_type: str = "epsilon", text_config=None) -> str:
    """``sdxl`` (added text/time conditions), ``sd2-v`` / ``sd2`` (an OpenCLIP text encoder as
    diffusers converts it: GELU activations, 1024 wide; v or ε prediction) or ``sd1``, read from
    the UNet's and text encoder's configs and the scheduler's prediction type."""
    if getattr(unet_config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    open_clip = (getattr(unet_config, "cross_attention_dim", None) == 1024
                 or getattr(text_config, "hidden_act", None) == "gelu")
    if open_clip:
        return "sd2-v" if prediction_type == "v_prediction" else "sd2"
    return "sd1"


def folder_family(folder: str | Path) -> str | None:
    """:func:`model_family` of a diffusers pipeline folder, read from its config files (nothing
    is loaded); ``None`` when they cannot be read."""
    import json
    from types import SimpleNamespace

    def config(*parts: str):
        try:
            data = json.loads(Path(folder, *parts).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        return SimpleNamespace(**data) if isinstance(data, dict) else None

    unet = config("unet", "config.json")
    if unet is None:
        return None
    sched = config("scheduler", "scheduler_config.json")
    return model_family(unet, getattr(sched, "prediction_type", "epsilon"),
                        config("text_encoder", "config.json"))


def with_family_defaults(entry: ModelEntry | None, folder: str | Path) -> ModelEntry | None:
    """``entry`` (a folder's card, or ``None``) with its family's defaults under its own; a
    folder without a card whose family has defaults gets an entry holding just those."""
    family = FAMILY_DEFAULTS.get(folder_family(folder) or "", {})
    if not family:
        return entry
    if entry is None:
        return ModelEntry(name=str(folder), location=str(folder), defaults=dict(family))
    entry.defaults = {**family, **entry.defaults}
    return entry


DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def resolve_device(device: str | None) -> "torch.device":
    """``None``/``"auto"`` -> CUDA if available, else MPS, else CPU."""
    import torch

    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    from .errors import ModelError

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ModelError(f"unknown device {str(device)[:40]!r} ({_first_line(exc)}); use cpu, cuda, "
                         "cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {str(device)[:40]!r}: this PyTorch sees no CUDA GPU (a CPU-only "
                             "build, or no driver); use --device cpu, or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"device {str(device)[:40]!r}: there are only {torch.cuda.device_count()} "
                             "CUDA device(s), numbered from 0")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ModelError(f"device {str(device)[:40]!r}: MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise ModelError(f"device {str(device)[:40]!r} is not supported; use cpu, cuda, cuda:N or mps")
    return dev


def resolve_dtype(dtype: str | None, device: "torch.device") -> "torch.dtype":
    """``None`` -> float32 on CPU, float16 on GPUs."""
    import torch

    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    name = _DTYPES.get(str(dtype).replace("torch.", "")[:40])
    if name is None:
        from .errors import ModelError

        raise ModelError(f"unknown dtype {str(dtype)[:40]!r}; use float32, float16 or bfloat16")
    return getattr(torch, name)


MODEL_CARD = "diffeditor.json"
"""A model folder's own settings for diffeditor, beside ``model_index.json``::

    {"description": "...", "defaults": {"guidance_scale": 1.0, "move.energy_scale": 1000.0},
     "image_prompt": {"weights": "ip.bin", "encoder": "image_encoder"}}

``defaults`` are spec-field defaults as in :class:`ModelEntry` (``"<task>.<field>"`` for one
task; a mapping such as ``"paste.schedule": {"time_travel_repeats": 1}`` fills only the keys a
spec's own mapping leaves out); ``image_prompt`` paths are relative to the folder. Every key is
optional."""


def read_model_card(folder: str | Path, registry=None, check_fields: bool = True) -> ModelEntry | None:
    """The :class:`ModelEntry` described by ``folder/diffeditor.json``, or ``None`` without one.

    Raises :class:`~diffeditor.errors.ModelError` (one line naming the file and key) for a file
    that is not a JSON mapping, or (``check_fields``) a default naming no field of any
    registered task; a plugin reading its own card while registering passes ``False``."""
    import json

    from .errors import ModelError

    folder = Path(folder).expanduser()
    path = folder / MODEL_CARD
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a readable JSON file ({exc}); fix or remove it") from None
    allowed = {"description", "defaults", "image_prompt"}
    if not isinstance(card, dict) or set(card) - allowed:
        extra = sorted(set(card) - allowed) if isinstance(card, dict) else []
        raise ModelError(f"{path}: expected a mapping with keys {', '.join(sorted(allowed))}"
                         + (f"; unknown: {', '.join(extra)}" if extra else ""))
    defaults = card.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ModelError(f"{path}: defaults must be a mapping of spec fields to values")
    if check_fields:
        _check_default_keys(defaults, path, registry)
    ip = card.get("image_prompt")
    if ip is not None:
        if not isinstance(ip, dict) or set(ip) != {"weights", "encoder"}:
            raise ModelError(f"{path}: image_prompt must be {{'weights': FILE, 'encoder': FOLDER}}")
        ip = {k: str(folder / v) for k, v in ip.items()}
    return ModelEntry(name=str(folder), location=str(folder),
                      description=str(card.get("description", "")), defaults=dict(defaults),
                      image_prompt=ip)


def _check_default_keys(defaults: dict, path: Path, registry=None) -> None:
    from .errors import ModelError
    from .plugins import default_registry

    reg = default_registry(registry)
    specs = {name: task.spec_model for name, task in reg.tasks.items()}
    for key in defaults:
        task, _, name = key.rpartition(".")
        models = [specs[task]] if task in specs else ([] if task else list(specs.values()))
        if not any(name in m.model_fields for m in models):
            raise ModelError(f"{path}: defaults.{key}: no such spec field"
                             + (f" of task {task!r}" if task in specs else "")
                             + (f" (unknown task {task!r})" if task and task not in specs else ""))


# -- the default model: --model, else $DIFFEDITOR_MODEL, else the user config, else built in ---

MODEL_ENV = "DIFFEDITOR_MODEL"
CONFIG_KEYS = {"model": "the model used when --model is not given (a name, folder, file or hub id)"}


def config_dir() -> Path:
    """The platform's folder for diffeditor's user settings: ``$XDG_CONFIG_HOME/diffeditor``
    when that variable is set (on any platform), else ``%APPDATA%\\diffeditor`` on Windows,
    ``~/Library/Application Support/diffeditor`` on macOS, ``~/.config/diffeditor`` elsewhere."""
    import os
    import sys

    if os.environ.get("XDG_CONFIG_HOME"):
        return Path(os.environ["XDG_CONFIG_HOME"]).expanduser() / "diffeditor"
    if sys.platform == "win32" and os.environ.get("APPDATA"):
        return Path(os.environ["APPDATA"]) / "diffeditor"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "diffeditor"
    return Path.home() / ".config" / "diffeditor"


def user_config_path() -> Path:
    return config_dir() / "config.json"


def read_user_config() -> dict[str, Any]:
    """The user settings (``{}`` without a file); a damaged file is one :class:`ModelError`."""
    path = user_config_path()
    if not path.is_file():
        return {}
    data = _read_json(path)
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown or not all(isinstance(v, str) for v in data.values()):
        from .errors import ModelError

        raise ModelError(f"{path}: expected a mapping of {', '.join(CONFIG_KEYS)} to strings"
                         + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                         + "; fix it or remove it ('diffeditor config unset KEY')")
    return data


def write_user_config(data: dict[str, Any]) -> Path:
    import json

    from .imageio import atomic_write

    path = user_config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode()), force=True)
    return path


def default_model() -> tuple[str, str]:
    """The model used when none is named, and where that choice comes from:
    ``$DIFFEDITOR_MODEL``, else ``model`` in the user config file, else the built-in
    :data:`DEFAULT_MODEL`."""
    import os

    env = os.environ.get(MODEL_ENV, "").strip()
    if env:
        return env, MODEL_ENV
    configured = read_user_config().get("model")
    if configured:
        return configured, str(user_config_path())
    return DEFAULT_MODEL, "built in"


def resolve_model(model: str | None, registry=None) -> tuple[str, ModelEntry | None]:
    """A model name, local folder, single checkpoint file or hub id -> (location, entry or None).

    ``None`` is the default model (:func:`default_model`). The entry is the registered one for
    a name, the folder's ``diffeditor.json`` for a folder that has one (so a registered model's
    folder, or a copy of it, behaves as its name)."""
    from .plugins import default_registry

    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if model is not None and not isinstance(model, str):
        from .errors import UsageError

        raise UsageError(f"model must be a model name, folder or hub id (a string), not "
                         f"{type(model).__name__}")
    model = model or default_model()[0]
    reg = default_registry(registry)
    if model in reg.models:
        entry = reg.models[model]
        return entry.location, entry
    if Path(model).expanduser().exists():
        folder = Path(model).expanduser()
        if folder.is_file():
            if not is_single_file(folder):
                from .errors import ModelError

                raise ModelError(f"model {model!r} is a file but not a single-file checkpoint "
                                 f"({' or '.join(SINGLE_FILE_SUFFIXES)}); a diffusers model is a "
                                 "folder: pass the folder")
            return str(folder), None
        return str(folder), with_family_defaults(read_model_card(folder, reg), folder)
    if is_single_file(model):
        from .errors import ModelError

        raise ModelError(f"model file not found: {model}")
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") != 1
    if looks_like_path:
        from .errors import ModelError

        names = ", ".join(sorted(reg.models)) or "none installed"
        raise ModelError(
            f"model {model!r} is neither a registered model name ({names}), an existing folder, "
            "nor a hub id of the form owner/name"
        )
    return model, None


def quiet_libraries() -> None:
    """Silence diffusers' and transformers' info messages, deprecation warnings and loading
    bars (the Python API and the command line call it; ``Editor.from_pretrained(...,
    verbose=True)`` does not). Errors are still reported."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
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


def content_hash(folder: str | Path) -> str | None:
    """SHA-256 over a model folder's files (relative names and contents, sorted by name):
    two folders with the same hash hold the same weights and settings. ``None`` for a hub id
    that is not in the local cache."""
    import hashlib

    path = Path(folder).expanduser()
    if path.is_file():
        return file_hash(path)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(folder), local_files_only=True))
        except Exception:
            return None
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts):
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


def load_pipeline(location: str, device=None, dtype=None, local_files_only: bool | None = None,
                  config: str | None = None, lora: list | None = None, vae: str | None = None,
                  registry=None):
    """Load a Stable Diffusion pipeline from a folder, a hub id or a single checkpoint file
    (``.safetensors``/``.ckpt``, see :func:`load_single_file`; ``config`` names its local
    config folder), swap in the VAE ``vae`` names (:func:`load_vae`) and fuse the LoRAs
    ``lora`` lists (``[(file, scale), ...]``, :func:`apply_loras`). ``registry`` (default: the
    installed plugins') names the installed models an error message offers.

    The scheduler is replaced by a ``DDIMScheduler`` built from the pipeline's own scheduler
    config. Missing weights without network give a :class:`ModelError` that says how to get
    them instead of a traceback.
    """
    import os
    from pathlib import Path

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from .errors import ModelError

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    is_dir = Path(location).is_dir()
    if config is not None and not is_single_file(location):
        raise ModelError("--config names the configuration of a single-file checkpoint; "
                         f"{location} is not one (.safetensors or .ckpt)")
    if is_single_file(location):
        pipe = load_single_file(location, config, dt)
    else:
        if is_dir:
            check_model_folder(location)
        if local_files_only is None:
            local_files_only = is_dir or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true")
        xl = is_dir and is_sdxl_folder(location)
        try:
            if xl:
                from diffusers import StableDiffusionXLPipeline

                pipe = StableDiffusionXLPipeline.from_pretrained(
                    location, dtype=dt, local_files_only=local_files_only,
                    image_encoder=None, feature_extractor=None)
            else:
                pipe = StableDiffusionPipeline.from_pretrained(
                    location, dtype=dt, local_files_only=local_files_only,
                    safety_checker=None, requires_safety_checker=False, feature_extractor=None,
                )
        except Exception as exc:  # a library's error for a bad folder: one line, never a traceback
            if is_dir:
                need = "text_encoder_2/, tokenizer_2/, " if xl else ""
                raise ModelError(
                    f"{location} is not a loadable {'SDXL' if xl else 'SD 1.x/2.x'} diffusers "
                    f"pipeline folder ({_first_line(exc)}); it needs model_index.json, unet/, "
                    f"vae/, text_encoder/, tokenizer/, {need}scheduler/"
                ) from None
            raise ModelError(_missing_model_message(location, exc, registry)) from None
    if vae is not None:
        pipe.vae = load_vae(vae, pipe, dt)
    if lora:
        apply_loras(pipe, lora)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dev)
    return pipe


def _missing_model_message(location: str, exc: BaseException, registry=None) -> str:
    """One clean line for a hub id that could not be loaded (offline, not cached); for the
    built-in default, the installed models of ``registry`` are offered."""
    import logging

    logging.getLogger("diffeditor").info("loading %s failed: %s", location, exc)
    offline = "outgoing traffic has been disabled" in str(exc) or type(exc).__name__ in (
        "LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError")
    why = ("it is not in the local Hugging Face cache and the hub is unreachable" if offline
           else _reason(exc, 120))
    fetch = (f"fetch it where a network exists with 'diffeditor download {location}' (HF_HOME "
             "chooses the cache)")
    if location == DEFAULT_MODEL:
        try:
            from .plugins import default_registry

            names = sorted(default_registry(registry).models)
        except Exception:  # pragma: no cover - the message must not fail
            names = []
        installed = (f"--model {names[0]} (installed) or --model PATH" if names
                     else "--model PATH")
        return (f"the built-in default model {location} is not available: {why}; choose a model "
                f"with {installed}, 'diffeditor config set model NAME|PATH' or ${MODEL_ENV}, "
                f"or {fetch}")
    return (f"cannot load model {location!r}: {why}; {fetch}, or pass a local folder or "
            "checkpoint file with --model PATH")


# -- single-file checkpoints (the original Stable Diffusion key layout) ------------------------

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

#: family -> (what users read, diffusers pipeline class, hub repo whose cached configs serve
#: when no --config is given)
FAMILIES = {
    "sd1": ("SD 1.x", "StableDiffusionPipeline", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "sd2": ("SD 2.x", "StableDiffusionPipeline", "stabilityai/stable-diffusion-2-1"),
    "sdxl": ("SDXL", "StableDiffusionXLPipeline", "stabilityai/stable-diffusion-xl-base-1.0"),
}


def is_single_file(location: str | Path) -> bool:
    return Path(str(location)).suffix.lower() in SINGLE_FILE_SUFFIXES


def checkpoint_shapes(path: str | Path) -> dict[str, list[int]]:
    """Tensor name -> shape of a checkpoint file, without loading the weights: a safetensors
    header (checked: a truncated file is one :class:`ModelError`), or a ``.ckpt`` read with
    PyTorch's weights-only unpickler (memory-mapped; one that asks to run code is refused)."""
    import json

    import torch

    from .errors import ModelError

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"file not found: {path}")
    if path.suffix.lower() == ".safetensors":
        _safetensors_elements(path)  # header complete, every tensor inside the file
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # a file of PyTorch's legacy (non-zip) format: the same safe loader, not mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"{path}: refused: PyTorch's safe loader (weights_only=True) cannot read it "
            f"({_reason(exc, 100)}); a .ckpt that needs more than plain tensors may run "
            "code when loaded: use a .safetensors file instead") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path}: not a checkpoint (no state dict inside)")
    return {k: list(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def detect_family(shapes: dict[str, list[int]], path: str | Path = "checkpoint") -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` from a checkpoint's tensor names (and shapes):

    * SDXL: a ``conditioner.embedders.*`` text encoder (base and refiner);
    * SD 2.x: an OpenCLIP text encoder (``cond_stage_model.model.*``) or cross-attention
      keys of width 1024;
    * SD 1.x: a CLIP text encoder (``cond_stage_model.transformer.*``) and cross-attention of
      width 768 (or any other, for small models).

    A file without a UNet (``model.diffusion_model.*``) or an inpainting UNet (9 input
    channels) is a :class:`ModelError`."""
    from .errors import ModelError

    unet = [k for k in shapes if k.startswith("model.diffusion_model.")]
    if not unet:
        raise ModelError(f"{path}: not a Stable Diffusion checkpoint (no model.diffusion_model.* "
                         "tensors; a VAE or LoRA file goes to --vae or --lora)")
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight", [0, 4])
    if len(conv_in) > 1 and conv_in[1] != 4:
        raise ModelError(f"{path}: the UNet takes {conv_in[1]} input channels (an inpainting or "
                         "other special model); DiffEditor needs a 4-channel text-to-image UNet")
    if any(k.startswith("conditioner.embedders.") for k in shapes):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        return "sd2"
    cross = [v[-1] for k, v in shapes.items() if k.endswith("attn2.to_k.weight")]
    if cross and cross[0] == 1024:
        return "sd2"
    return "sd1"


def family_config(family: str, config: str | None, path: str | Path) -> Path:
    """The local diffusers folder whose configs (and tokenizer, scheduler) a single-file
    checkpoint is built with: ``config`` when given, else the family's reference repository
    in the local Hugging Face cache. The hub is never asked."""
    from .errors import ModelError

    label, class_name, repo = FAMILIES[family]
    if config is None:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(repo, local_files_only=True, allow_patterns=[
                "model_index.json", "*/*.json", "*/*.txt"]))
        except Exception:
            raise ModelError(
                f"{path} is an {label} checkpoint and needs its configuration: pass --config DIR "
                f"(a diffusers folder of an {label} model: model_index.json with unet/, vae/, "
                f"text_encoder/, tokenizer/, scheduler/ configs; weights are not needed), or run "
                f"'diffeditor download {repo}' once where a network exists") from None
    else:
        folder = Path(config).expanduser()
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelError(f"--config {folder}: not a diffusers model folder (no model_index.json)")
    given = _read_json(index).get("_class_name")
    if family == "sdxl" and given != class_name or family != "sdxl" and "XL" in str(given):
        raise ModelError(f"--config {folder} describes a {given}, but {path} is an {label} "
                         f"checkpoint (a {class_name}); pass a config of the same family")
    for comp in ("unet", "vae", "text_encoder"):
        cfg = folder / comp / "config.json"
        if cfg.is_file():
            _check_config_ints(_read_json(cfg), cfg)
    return folder


def load_single_file(path: str | Path, config: str | None = None, dtype=None):
    """A pipeline from one checkpoint file in the original Stable Diffusion key layout, through
    diffusers' ``from_single_file`` with a local config folder (:func:`family_config`)."""
    import diffusers

    from .errors import ModelError

    path = Path(path).expanduser()
    family = detect_family(checkpoint_shapes(path), path)
    folder = family_config(family, config, path)
    label, class_name, _ = FAMILIES[family]
    cls = getattr(diffusers, class_name)
    extra = {"safety_checker": None, "requires_safety_checker": False,
             "feature_extractor": None} if family != "sdxl" else {}
    try:
        pipe = cls.from_single_file(str(path), config=str(folder), local_files_only=True,
                                    torch_dtype=dtype, **extra)
    except Exception as exc:
        raise ModelError(f"{path}: cannot build an {label} pipeline from it with the config "
                         f"{folder} ({_reason(exc)}); the config "
                         "must describe this checkpoint's architecture") from None
    pipe._diffeditor_family = family
    return pipe


# -- a swapped VAE and LoRAs -------------------------------------------------------------------

def load_vae(vae: str | Path, pipe, dtype=None):
    """An ``AutoencoderKL`` from a diffusers folder (``config.json`` and weights, or a model
    folder's ``vae/``) or a single file (original layout, such as ``vae-ft-mse-840000``;
    built with the pipeline's own VAE config). Its latent channels must match the UNet's."""
    import tempfile

    from diffusers import AutoencoderKL

    from .errors import ModelError

    path = Path(vae).expanduser()
    try:
        if path.is_dir():
            sub = "vae" if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file() else None
            folder = path / sub if sub else path
            if not (folder / "config.json").is_file():
                raise ModelError(f"--vae {path}: no config.json (a diffusers AutoencoderKL folder, "
                                 "or a model folder with vae/)")
            _check_config_ints(_read_json(folder / "config.json"), folder / "config.json")
            for w in folder.glob("*.safetensors"):
                _safetensors_elements(w)
            model = AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype,
                                                  local_files_only=True)
        elif path.is_file():
            if not is_single_file(path):
                raise ModelError(f"--vae {path}: expected a folder, .safetensors or .ckpt file")
            shapes = checkpoint_shapes(path)
            if not any(k.split(".", 1)[0] in ("encoder", "decoder", "first_stage_model", "vae")
                       for k in shapes):
                raise ModelError(f"--vae {path}: no VAE tensors in it (encoder.*, decoder.*)")
            with tempfile.TemporaryDirectory() as tmp:
                pipe.vae.save_config(tmp)
                model = AutoencoderKL.from_single_file(str(path), config=tmp,
                                                       local_files_only=True, torch_dtype=dtype)
        else:
            raise ModelError(f"--vae: not found: {path}")
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"--vae {path}: cannot load it as this model's VAE "
                         f"({_reason(exc)})") from None
    if model.config.latent_channels != pipe.vae.config.latent_channels:
        raise ModelError(f"--vae {path}: {model.config.latent_channels} latent channels, the "
                         f"model's UNet needs {pipe.vae.config.latent_channels}")
    scale = 2 ** (len(model.config.block_out_channels) - 1)
    wanted = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if scale != wanted:
        raise ModelError(f"--vae {path}: it shrinks images {scale}x, the model's own VAE "
                         f"{wanted}x; the UNet was trained on latents of the latter")
    return model


def parse_lora(text: str | tuple | list) -> tuple[str, float]:
    """``FILE`` or ``FILE:SCALE`` (scale default 1.0) -> ``(file, scale)``."""
    import math

    from .errors import ModelError, show

    if isinstance(text, (tuple, list)):
        file, scale = text
    else:
        file, scale = str(text), 1.0
        head, sep, tail = file.rpartition(":")
        if sep and head:
            try:
                scale = float(tail)
                file = head
            except ValueError:
                pass
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ModelError(f"--lora {show(str(text), 200)}: the scale must be a number") from None
    if not math.isfinite(scale):
        raise ModelError(f"--lora {show(str(text), 200)}: the scale must be a finite number")
    return str(file), scale


def apply_loras(pipe, loras: list) -> None:
    """Load each ``(file, scale)`` through diffusers' ``load_lora_weights`` (peft; the
    diffusers and kohya formats), weight them by their scales, fuse them into the UNet and
    text encoder, and drop the LoRA layers: the model then computes as a plain one."""
    from .errors import ModelError

    names, scales = [], []
    for i, item in enumerate(loras):
        file, scale = parse_lora(item)
        path = Path(file).expanduser()
        if not path.is_file():
            raise ModelError(f"--lora: file not found: {path}")
        if path.suffix.lower() != ".safetensors":
            checkpoint_shapes(path)  # weights-only check of a pickle before diffusers reads it
        else:
            _safetensors_elements(path)
        name = f"lora{i}"
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ModelError("--lora needs the peft package: pip install peft (or "
                             "pip install 'diffeditor[lora]')") from None
        before = _adapter_count(pipe)
        from diffusers.utils import logging as dlogging

        level = dlogging.get_verbosity()
        dlogging.set_verbosity(dlogging.CRITICAL)  # its own error report: ours is the one line
        try:
            pipe.load_lora_weights(str(path), adapter_name=name)
        except Exception as exc:
            raise ModelError(f"--lora {path}: not a LoRA for this model ({_reason(exc)})") from None
        finally:
            dlogging.set_verbosity(level)
        if _adapter_count(pipe) == before:
            raise ModelError(f"--lora {path}: none of its weights matches a layer of this "
                             "model (a LoRA of another model family?)")
        names.append(name)
        scales.append(scale)
    pipe.set_adapters(names, adapter_weights=scales)
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()


def _adapter_count(pipe) -> int:
    try:
        return sum(len(v) for v in pipe.get_list_adapters().values())
    except Exception:
        return 0


def file_hash(path: str | Path) -> str:
    """``sha256:`` of a file's bytes, or of a folder's files (:func:`content_hash`)."""
    import hashlib

    path = Path(path).expanduser()
    if path.is_dir():
        return content_hash(path)  # type: ignore[return-value]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def is_sdxl_folder(folder: str | Path) -> bool:
    """Whether a diffusers pipeline folder holds an SDXL pipeline (its ``model_index.json``
    names a second text encoder, or an SDXL pipeline class)."""
    import json

    try:
        index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(index, dict):
        return False
    return "text_encoder_2" in index or str(index.get("_class_name", "")).startswith("StableDiffusionXL")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _reason(exc: BaseException, limit: int = 160) -> str:
    """A library's error as one short clause: its type and first sentence, cut at a word
    with '...' when longer than ``limit`` (never mid-word, never a dangling bracket)."""
    text = _first_line(exc)
    head, sep, _ = text.partition(". ")
    text = head if sep and len(head) >= 20 else text
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:(") + "..."
    return f"{type(exc).__name__}: {text.rstrip('.')}"


# -- model folder checks before anything is allocated -------------------------------------------

#: a config integer above this is not a real model's (the largest in SD 1.5 is 49408, the
#: tokenizer's vocabulary); layer counts are bounded separately
MAX_CONFIG_INT = 1_000_000
MAX_CONFIG_LAYERS = 1000
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def check_model_folder(folder: str | Path) -> None:
    """Check a local diffusers pipeline folder before loading it, so that a damaged or hostile
    folder is one :class:`ModelError` line instead of a traceback or a huge allocation:

    * ``model_index.json`` and every weighted component's ``config.json`` are JSON mappings;
    * every ``.safetensors`` file's header is complete and every tensor lies inside the file
      (a truncated download is caught here);
    * a ``.bin`` (pickle) weights file is read with PyTorch's weights-only unpickler: one that
      asks to run code is refused;
    * config integers are bounded, and the parameter count the config implies (built on the
      ``meta`` device: no memory) must not exceed what the weights hold.
    """
    from .errors import ModelError

    root = Path(folder)
    index_path = root / "model_index.json"
    if not index_path.is_file():
        return  # from_pretrained says what is missing
    index = _read_json(index_path)
    for name, spec in sorted(index.items()):
        if name.startswith("_") or not (isinstance(spec, list) and len(spec) == 2):
            continue
        comp = root / name
        weights = sorted(comp.glob("*.safetensors")) or sorted(comp.glob("*.bin"))
        if not comp.is_dir() or not weights:
            continue
        cfg_path = comp / "config.json"
        cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
        _check_config_ints(cfg, cfg_path)
        held = sum(_safetensors_elements(w) if w.suffix == ".safetensors" else _bin_elements(w)
                   for w in weights)
        wanted = _config_parameters(spec, comp, cfg)
        if wanted is not None and wanted > 1.5 * held + 1_000_000:
            raise ModelError(
                f"{cfg_path}: the config asks for {wanted:,} parameters ({wanted * 4 / 2**30:.1f} GiB "
                f"in float32) but the weights hold {held:,}; the config does not match the weights")


def _read_json(path: Path) -> dict:
    import json

    from .errors import ModelError

    try:
        if path.stat().st_size > 16 * 2**20:
            raise ModelError(f"{path}: too large for a config file")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelError(f"{path}: not a readable JSON file ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON mapping")
    return data


def _check_config_ints(cfg: dict, path: Path) -> None:
    from .errors import ModelError

    for key, value in cfg.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if type(v) is not int:
                continue
            limit = MAX_CONFIG_LAYERS if "layers" in key else MAX_CONFIG_INT
            if not -limit <= v <= limit:
                raise ModelError(f"{path}: {key} = {v} is not a real model's (at most {limit}); "
                                 "the file is damaged")


def _safetensors_elements(path: Path) -> int:
    """Element count of a safetensors file, after checking its header and that every tensor
    lies inside the file."""
    import json
    import math

    from .errors import ModelError

    def bad(why: str) -> ModelError:
        return ModelError(f"{path}: {why}; the file is truncated or damaged: download it again")

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than a safetensors header")
            n = int.from_bytes(head, "little")
            if n > min(100 * 2**20, size - 8):
                raise bad(f"header of {n} bytes in a file of {size}")
            header = json.loads(fh.read(n))
    except OSError as exc:
        raise ModelError(f"{path}: cannot read it ({exc.strerror})") from None
    except (ValueError, UnicodeDecodeError):
        raise bad("unreadable header") from None
    if not isinstance(header, dict):
        raise bad("unreadable header")
    data_len = size - 8 - n
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            count = math.prod(info["shape"])
            itemsize = _ITEMSIZE[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name[:60]!r} is described wrongly") from None
        if not (0 <= start <= end <= data_len) or end - start != count * itemsize:
            raise bad(f"tensor {name[:60]!r} lies beyond the end of the file")
        total += count
    return total


def _bin_elements(path: Path) -> int:
    """Element count of a PyTorch pickle weights file, read with the weights-only unpickler
    (memory-mapped: nothing is loaded); a file asking to run code is refused."""
    import torch

    from .errors import ModelError

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ModelError(f"{path}: refused: not a plain weights file ({_first_line(exc)[:150]}); "
                         "use .safetensors weights from a source you trust") from None
    if not isinstance(state, dict):
        raise ModelError(f"{path}: refused: not a state dict")
    return sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))


def _config_parameters(spec: list, comp: Path, cfg: dict) -> int | None:
    """Parameters of the component the config describes, built on the meta device (no memory);
    ``None`` for a class this check does not know."""
    import importlib

    import torch

    from .errors import ModelError

    library, class_name = spec
    if library not in ("diffusers", "transformers") or not isinstance(class_name, str):
        return None
    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        return None
    try:
        with torch.device("meta"):
            if library == "diffusers":
                if not hasattr(cls, "from_config"):
                    return None
                model = cls.from_config(cfg)
            else:
                config_class = getattr(cls, "config_class", None)
                if config_class is None:
                    return None
                model = cls(config_class.from_pretrained(comp))
    except Exception as exc:
        raise ModelError(f"{comp / 'config.json'}: not a valid {class_name} config "
                         f"({_first_line(exc)[:150]})") from None
    return sum(p.numel() for p in model.parameters())
