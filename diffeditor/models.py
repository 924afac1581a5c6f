"""Model loading: SD 1.x-layout diffusers pipelines from a hub id, a local folder or a name."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    try:
        return torch.device(device)
    except RuntimeError as exc:
        from .errors import ModelError

        raise ModelError(f"unknown device {device!r} ({exc}); use cpu, cuda, cuda:N or mps") from None


def resolve_dtype(dtype: str | None, device: "torch.device") -> "torch.dtype":
    """``None`` -> float32 on CPU, float16 on GPUs."""
    import torch

    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    name = _DTYPES.get(str(dtype).replace("torch.", ""))
    if name is None:
        from .errors import ModelError

        raise ModelError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return getattr(torch, name)


def resolve_model(model: str | None, registry=None) -> tuple[str, ModelEntry | None]:
    """A model name, local folder or hub id -> (location, registered entry or None)."""
    from pathlib import Path

    from .plugins import get_registry

    model = model or DEFAULT_MODEL
    reg = registry or get_registry()
    if model in reg.models:
        entry = reg.models[model]
        return entry.location, entry
    if Path(model).expanduser().exists():
        return str(Path(model).expanduser()), None
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") != 1
    if looks_like_path:
        from .errors import ModelError

        names = ", ".join(sorted(reg.models)) or "none installed"
        raise ModelError(
            f"model {model!r} is neither a registered model name ({names}), an existing folder, "
            "nor a hub id of the form owner/name"
        )
    return model, None


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
    if local_files_only is None:
        local_files_only = is_dir or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            location, dtype=dt, local_files_only=local_files_only,
            safety_checker=None, requires_safety_checker=False, feature_extractor=None,
        )
    except (OSError, ValueError) as exc:
        if is_dir:
            raise ModelError(
                f"{location} is not a loadable SD 1.x diffusers pipeline folder ({_first_line(exc)}); "
                "it needs model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/"
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
