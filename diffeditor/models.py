"""Model loading: SD 1.x, 2.x and SDXL diffusers pipelines from a hub id, a local folder or a name."""

from __future__ import annotations

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


def resolve_model(model: str | None, registry=None) -> tuple[str, ModelEntry | None]:
    """A model name, local folder or hub id -> (location, entry or None).

    The entry is the registered one for a name, the folder's ``diffeditor.json`` for a folder
    that has one (so a registered model's folder, or a copy of it, behaves as its name)."""
    from .plugins import default_registry

    model = model or DEFAULT_MODEL
    reg = default_registry(registry)
    if model in reg.models:
        entry = reg.models[model]
        return entry.location, entry
    if Path(model).expanduser().exists():
        folder = Path(model).expanduser()
        return str(folder), with_family_defaults(read_model_card(folder, reg), folder)
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


def load_pipeline(location: str, device=None, dtype=None, local_files_only: bool | None = None):
    """Load an SD 1.x-layout diffusers pipeline from a folder or a hub id.

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
                f"{location} is not a loadable {'SDXL' if xl else 'SD 1.x/2.x'} diffusers pipeline "
                f"folder ({_first_line(exc)}); it needs model_index.json, unet/, vae/, "
                f"text_encoder/, tokenizer/, {need}scheduler/"
            ) from None
        raise ModelError(
            f"cannot load model {location!r}: weights are not in the local cache and the hub is "
            f"unreachable ({_first_line(exc)}). Fetch them where a network exists with "
            f"'diffeditor download {location}' (set HF_HOME to choose the cache), or pass a local "
            "folder with --model PATH"
        ) from None
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dev)
    return pipe


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
