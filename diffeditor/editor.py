"""The Python API: ``Editor.from_pretrained(model).edit(spec)``."""

from __future__ import annotations

import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import __version__
from .engine import Engine
from .errors import DiffEditorError, SpecError, UsageError, show
from .imageio import load_image, save_image_and_sidecar, to_pil, to_tensor
from .interfaces import EditPlan, Geometry
from .models import ModelEntry, load_pipeline, resolve_model
from .specs import EditSpec, parse_spec

log = logging.getLogger(__name__)


#: the aspect-ratio change an edit may make without padding (1%)
ASPECT_TOLERANCE = 0.01


def working_geometry(input_hw: tuple[int, int], resolution: int, multiple: int = 64
                     ) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(content_hw, work_hw)``: the image scaled to an area of about ``resolution**2`` keeping
    its aspect ratio (``content_hw``), inside a working image padded at the bottom and right to
    sides that are multiples of ``multiple`` (``work_hw``; what the model needs). Where sides
    rounded to multiples keep the aspect ratio within :data:`ASPECT_TOLERANCE` (a square image;
    512x768 at 768 -> 640x960) the image fills the working image, unpadded, as it always did."""
    h, w = input_hw
    fit = working_size(input_hw, resolution, multiple)
    if abs((fit[1] / fit[0]) / (w / h) - 1) <= ASPECT_TOLERANCE:
        return fit, fit
    k = resolution / math.sqrt(h * w)
    content = (max(1, int(round(h * k))), max(1, int(round(w * k))))
    work = tuple(max(multiple, -(-c // multiple) * multiple) for c in content)
    return content, work  # type: ignore[return-value]


def working_size(input_hw: tuple[int, int], resolution: int, multiple: int = 64) -> tuple[int, int]:
    """Scale to an area of about ``resolution**2`` with sides a multiple of ``multiple``
    (the reference's ``resize_numpy_image``)."""
    h, w = input_hw
    k = resolution / math.sqrt(h * w)
    return (
        max(multiple, int(round(h * k / multiple)) * multiple),
        max(multiple, int(round(w * k / multiple)) * multiple),
    )


def check_load_options(model=None, device=None, dtype=None, cache_size: int = 4,
                       attention_slice=None, compile=None) -> None:
    """Argument checks of :meth:`Editor.from_pretrained` that need no model: types, ranges,
    whether the device exists. Raises :class:`UsageError` or ``ModelError`` (one line)."""
    from .engine import COMPILE_MODES
    from .models import resolve_device, resolve_dtype

    if model is not None and (not isinstance(model, (str, os.PathLike)) or isinstance(model, bytes)):
        raise UsageError(f"model must be a registered name, a hub id or a folder path, not "
                         f"{type(model).__name__}")
    for name, value in (("device", device), ("dtype", dtype)):
        if value is not None and not isinstance(value, (str, torch.device, torch.dtype)):
            raise UsageError(f"{name} must be a string such as 'cpu' / 'float32', not "
                             f"{type(value).__name__}")
    if type(cache_size) is not int or cache_size < 0:
        raise UsageError(f"cache_size must be an int >= 0, not {show(cache_size, 40)}")
    if attention_slice is not None and (type(attention_slice) is not int or attention_slice < 1):
        raise UsageError(f"attention_slice must be a positive number of queries, not "
                         f"{show(attention_slice, 40)}")
    if compile is not None and compile not in (*COMPILE_MODES, "off", "none"):
        raise UsageError(f"compile must be one of {', '.join(COMPILE_MODES)}, not {show(compile, 40)}")
    resolve_dtype(dtype, resolve_device(device))


def check_spec(spec: EditSpec, registry=None) -> tuple[int, int]:
    """Validate a spec's inputs without any model: images decode, masks match, points lie
    inside the image (``registry``: default the installed plugins'). Returns the input image's
    ``(height, width)``."""
    from .plugins import default_registry

    reg = default_registry(registry)
    task = reg.task(spec.task)
    paths = task.images(spec)
    hw = None
    for name, path in paths.items():
        im = load_image(path, "image" if name == "source" else name)
        if name == "source":
            hw = (im.height, im.width)
    task.check(spec, hw)
    sampler_and_schedules(spec, reg)
    return hw


def paste_back(image: Image.Image, source: Image.Image, region: torch.Tensor, geom: Geometry,
               width: int) -> Image.Image:
    """The decoded ``image`` inside ``region`` (a latent-grid mask, widened by one cell, or a
    working-size one on its own outline), the input ``source``'s own pixels outside it, blended
    over ``width`` working-size pixels; both at the input's size. Outside the ramp the source's
    values are returned unchanged."""
    import numpy as np

    from .geometry import paste_back_weights

    w = paste_back_weights(region, geom, width).numpy()[..., None]
    src = np.asarray(source.convert("RGB"), dtype=np.float32)
    out = np.asarray(image.convert("RGB"), dtype=np.float32)
    mixed = w * out + (1 - w) * src  # exactly src where w = 0, exactly out where w = 1
    return Image.fromarray(np.rint(mixed).clip(0, 255).astype(np.uint8))


def with_spec_energies(plan: EditPlan, spec: EditSpec, registry, geom: Geometry) -> EditPlan:
    """``plan`` with the named energy terms of ``spec.energies`` added after the task's own
    (:func:`diffeditor.energies.add_spec_energies`); :class:`SpecError` (one line) for an
    unknown name, wrong params or a region the edit lacks."""
    from .energies import BUILTIN_ENERGIES, add_spec_energies

    uses = getattr(spec, "energies", None)
    if not uses:
        return plan
    try:
        return add_spec_energies(plan, uses, registry.energies or BUILTIN_ENERGIES, geom)
    except ValueError as exc:
        raise SpecError(str(exc)) from None


def sampler_and_schedules(spec: EditSpec, registry) -> tuple[Any, dict]:
    """The registered sampler a spec names and the named schedules; :class:`SpecError` (one
    line, listing the installed names) for an unknown sampler or schedule preset. A registry
    built without diffeditor's own entry point (``registry_from``) gets the built-in ones."""
    from .samplers import BUILTIN_SAMPLERS
    from .schedule import BUILTIN_SCHEDULES

    samplers = registry.samplers or BUILTIN_SAMPLERS
    schedules = registry.schedules or BUILTIN_SCHEDULES
    if spec.sampler not in samplers:
        raise SpecError(f"unknown sampler {spec.sampler!r}; installed samplers: "
                        f"{', '.join(sorted(samplers))}", "sampler")
    try:
        spec.schedule.with_preset(schedules)
    except KeyError as exc:
        raise SpecError(exc.args[0], "schedule.preset") from None
    return samplers[spec.sampler], schedules


@dataclass
class EditResult:
    """What an edit returns: the image, the masks the task used, and the metadata."""

    image: Image.Image
    spec: EditSpec
    masks: dict[str, Image.Image] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    latent: torch.Tensor | None = None

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write the image and its JSON sidecar (``.json`` beside it) as one unit: both or
        neither, atomically, the sidecar strict JSON."""
        if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
            raise UsageError(f"save() takes a file path, not {type(path).__name__}")
        return save_image_and_sidecar(self.image, self.metadata, Path(path), force=force)


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"diffeditor": __version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _plugin_versions(registry) -> dict[str, str]:
    """Every loaded plugin's distribution and version (``{"diffeditor-shapes": "0.1.0", ...}``)."""
    out = {}
    for info in registry.plugins():
        if info.version:
            out[info.distribution] = info.version
    return dict(sorted(out.items()))


def _jsonable(value: Any) -> Any:
    """Plan info as JSON: tensors become lists, tuples lists, paths strings."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _guidance_summary(log: list[dict], spec: EditSpec) -> dict[str, Any]:
    """Per region, the size of the guidance term against the noise prediction over the guided
    passes (RMS(k·∇E) / RMS(ε) inside the region, before any bound), and the bound."""
    regions: dict[str, list[float]] = {}
    for entry in log:
        for region, ratio in entry["ratio"].items():
            regions.setdefault(region, []).append(ratio)
    return {"clip": spec.guidance_clip, "passes": len(log),
            "ratio": {r: {"max": round(max(v), 4), "mean": round(sum(v) / len(v), 4)}
                      for r, v in regions.items()}}


class Editor:
    """Edits images with one loaded model; keeps an inversion cache across edits.

    >>> editor = Editor.from_pretrained("shapes", device="cpu")       # doctest: +SKIP
    >>> result = editor.edit("specs/move.yaml")                       # doctest: +SKIP
    >>> result.save("moved.png")            # image + JSON sidecar      # doctest: +SKIP
    """

    def __init__(self, engine: Engine, entry: ModelEntry | None = None, model: str = "",
                 registry=None):
        from .plugins import default_registry

        self.engine = engine
        self.entry = entry
        self.model = model
        #: the tasks, prompt encoders and plugins this editor uses (default: the installed ones)
        self.registry = default_registry(registry)
        #: recorded in every sidecar: the command line that asked for the edits (the CLI sets it)
        self.command_line: str | None = None
        self._model_hash: str | None | bool = False  # computed on the first edit
        #: recorded in every sidecar when set: ``config`` (a single file's config folder),
        #: ``lora`` (``[{"path", "scale", "sha256"}]``) and ``vae`` (``{"path", "sha256"}``)
        self.extras: dict[str, Any] = {}

    @classmethod
    def from_pretrained(
        cls, model: str | None = None, device: str | None = None, dtype: str | None = None,
        cache_size: int = 4, image_prompt: dict[str, str] | None = None,
        cache_dir: str | Path | None = None, vae_tiling: bool = False,
        attention_slice: int | None = None, vae_slicing: bool = False, compile: str | None = None,
        verbose: bool = False, registry=None, config: str | Path | None = None,
        lora: list | None = None, vae: str | Path | None = None,
    ) -> "Editor":
        """Load a registered model name (``shapes``), a local folder or a hub id.

        ``image_prompt`` = ``{"weights": "ip_sd15_64.bin", "encoder": "image_encoder/"}``
        attaches the paper's image prompt (a registered model may name its own).
        ``cache_dir`` keeps inversions on disk too (default: ``$DIFFEDITOR_CACHE_DIR`` if set).
        ``vae_tiling`` encodes and decodes in tiles and slices (large images on small GPUs);
        ``vae_slicing`` one image of a batch at a time; ``attention_slice`` = N computes
        self-attention N queries at a time. ``compile`` (``"default"``, ``"reduce-overhead"``
        for CUDA graphs, ``"max-autotune"``) compiles the UNet with ``torch.compile``
        (see :meth:`Engine.compile`). diffusers' and transformers' warnings and loading bars
        are silenced unless ``verbose``. ``registry`` (default: the installed plugins') names
        the models, tasks and prompt encoders.

        ``model`` may be a single checkpoint file (``.safetensors``/``.ckpt``, original SD
        layout); ``config`` then names its local diffusers config folder (default: the
        family's reference model in the local Hugging Face cache). ``lora`` lists LoRA files,
        each ``"file"``, ``"file:scale"`` or ``(file, scale)``, fused in that order; ``vae``
        swaps the VAE (a diffusers folder or a single file). Files and their hashes are
        recorded in every sidecar (``lora``, ``vae``).
        """
        check_load_options(model, device, dtype, cache_size, attention_slice, compile)
        import os

        if not verbose:
            from .models import quiet_libraries

            quiet_libraries()

        cache_dir = cache_dir or os.environ.get("DIFFEDITOR_CACHE_DIR") or None
        from .plugins import default_registry

        registry = default_registry(registry)
        from .models import default_model, file_hash, parse_lora

        model = model or default_model()[0]  # recorded as chosen: a name stays a name
        location, entry = resolve_model(model, registry)

        loras = [parse_lora(item) for item in (lora or [])]
        pipe = load_pipeline(location, device, dtype, config=None if config is None else str(config),
                             lora=loras, vae=None if vae is None else str(vae), registry=registry)
        name = str(model or location)
        if name not in registry.models and Path(name).expanduser().exists():
            # a folder is named absolutely in sidecars, so they replay from anywhere
            name = str(Path(name).expanduser().absolute())
        editor = cls(Engine(pipe, model_id=str(model or location), cache_size=cache_size,
                            cache_dir=cache_dir), entry, name, registry=registry)
        editor.extras = {}
        if config is not None:
            editor.extras["config"] = str(Path(config).expanduser().absolute())
        if loras:
            editor.extras["lora"] = [
                {"path": str(Path(f).expanduser().absolute()), "scale": s,
                 "sha256": file_hash(f)} for f, s in loras]
        if vae is not None:
            editor.extras["vae"] = {"path": str(Path(vae).expanduser().absolute()),
                                    "sha256": file_hash(vae)}
        editor._attach_image_prompt(image_prompt)
        editor.engine.set_memory_options(attention_slice, vae_slicing, vae_tiling)
        if compile:
            editor.engine.compile(compile)
        return editor

    def _attach_image_prompt(self, info: dict[str, str] | None = None,
                             adapter: str | None = None) -> None:
        """Attach the image prompt ``info`` names (``{"weights": ..., "encoder": ...}``; default
        the model's own) with the registered image prompt ``adapter`` (default: ``info``'s
        ``"adapter"``, else ``ip-adapter``)."""
        info = info or (self.entry.image_prompt if self.entry else None)
        if not info:
            return
        self._image_prompt_info = dict(info)
        name = adapter or info.get("adapter") or "ip-adapter"
        current = self.engine.image_prompt
        if current is not None and getattr(self, "_image_prompt_name", None) == name:
            return
        if current is not None and hasattr(current, "detach"):
            current.detach()
        self.engine.image_prompt = self.registry.prompt_encoder(name, "image").load(
            self.engine, info["weights"], info["encoder"])
        self._image_prompt_name = name

    def _select_encoders(self, spec: EditSpec) -> None:
        """Put the spec's prompt encoders (``text_encoder``, ``image_encoder``) on the engine."""
        try:
            self.engine.text_prompt_encoder = self.registry.prompt_encoder(spec.text_encoder, "text")
            info = self.__dict__.get("_image_prompt_info")  # None: an Editor built on an engine
            if self.engine.image_prompt is not None and info:
                self._attach_image_prompt(info, spec.image_encoder)
        except KeyError as exc:
            raise SpecError(exc.args[0]) from None

    # -- specs --------------------------------------------------------------------------------
    def family(self) -> str:
        """The model family (:func:`~diffeditor.models.model_family`): ``sd1``, ``sd2``,
        ``sd2-v`` or ``sdxl``."""
        from .models import model_family

        eng = self.engine
        return model_family(eng.unet.config, eng.prediction_type,
                            getattr(eng.text_encoder, "config", None))

    def defaults(self) -> dict[str, Any]:
        """Spec-field defaults: the model family's, under the model's own."""
        from .models import FAMILY_DEFAULTS

        own = dict(self.entry.defaults) if self.entry else {}
        return {**FAMILY_DEFAULTS.get(self.family(), {}), **own}

    def parse(self, spec: EditSpec | dict | str | Path, base_dir: str | Path | None = None) -> EditSpec:
        """Validate a spec (object, dict or file path) with this model's defaults."""
        if isinstance(spec, EditSpec):
            return spec
        return parse_spec(spec, base_dir=base_dir, defaults=self.defaults(), registry=self.registry)

    def default_resolution(self) -> int:
        """The model's (or its family's) ``resolution`` default; else 768 for a 512 px-native
        model (the reference's), the native size below that."""
        own = self.defaults().get("resolution")
        if own:
            return int(own)
        cfg = self.engine.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        native = size * self.engine.vae_scale
        return 768 if native >= 512 else native  # the reference edits SD 1.5 at 768

    # -- editing ------------------------------------------------------------------------------
    def prepare(self, spec: EditSpec):
        """Load the inputs and build the task's plan (no network calls)."""
        return self._prepare(spec)[:3]

    def _prepare(self, spec: EditSpec):
        """:meth:`prepare`, and the input images as loaded (PIL, by the task's image names)."""
        task = self.registry.task(spec.task)
        paths = task.images(spec)
        pil = {name: load_image(p, "image" if name == "source" else name) for name, p in paths.items()}
        input_hw = (pil["source"].height, pil["source"].width)
        task.check(spec, input_hw)
        resolution = spec.resolution or self.default_resolution()
        content_hw, work_hw = working_geometry(input_hw, resolution, self.size_multiple())
        geom = Geometry(input_hw, work_hw, self.engine.vae_scale, spec.feature_scale, content_hw)
        tensors = {name: to_tensor(im, content_hw, pad=work_hw) for name, im in pil.items()}
        plan = with_spec_energies(task.plan(spec, tensors, geom), spec, self.registry, geom)
        return task, plan, geom, pil

    def size_multiple(self) -> int:
        """What the working image's sides must be multiples of: the VAE's factor times the
        UNet's downsampling (64 for SD 1.5 and for the shapes model)."""
        blocks = len(getattr(self.engine.unet.config, "down_block_types", ()) or ()) or 4
        return int(self.engine.vae_scale * 2 ** (blocks - 1))

    def model_hash(self) -> str | None:
        """SHA-256 of the model folder's contents (computed once; ``None`` for an uncached hub id)."""
        if self._model_hash is False:
            from .models import content_hash

            self._model_hash = content_hash(self.engine_location())
        return self._model_hash  # type: ignore[return-value]

    def engine_location(self) -> str:
        return self.entry.location if self.entry else str(self.model)

    def edit(
        self, spec: EditSpec | dict | str | Path, base_dir: str | Path | None = None,
        progress: Callable | None = None, spec_path: str | Path | None = None,
        callback: Callable | None = None,
    ) -> EditResult:
        """Run one edit. ``spec`` is a spec object, a dict (paths relative to ``base_dir``), a
        YAML/JSON spec file or an earlier output's JSON sidecar (which replays that edit).
        ``spec_path`` names the file a spec object came from, for the sidecar. ``callback(i, z,
        x0)`` is called after each denoising step (see :meth:`Engine.edit`)."""
        import datetime

        t0 = time.perf_counter()
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        if isinstance(spec, (str, Path)) and spec_path is None:
            spec_path = spec
        if progress is not None and not callable(progress):
            raise UsageError("progress must be None or a callable (total, desc) -> bar, not "
                             f"{type(progress).__name__}")
        spec = self.parse(spec, base_dir)
        task, plan, geom, inputs = self._prepare(spec)
        self._select_encoders(spec)
        sampler, schedules = sampler_and_schedules(spec, self.registry)
        out = self.engine.edit(plan, spec, progress, callback, sampler=sampler, schedules=schedules)
        if not bool(torch.isfinite(out.image).all()):
            raise DiffEditorError(
                "the edit produced non-finite values (NaN or infinity), so there is no image to "
                "write; lower energy_scale or guidance_k, or try --dtype float32")
        ch, cw = geom.content  # crop the padding away, then back to the input's size
        image = to_pil(out.image[..., :ch, :cw])
        if (image.height, image.width) != geom.input_hw:
            image = image.resize((geom.input_hw[1], geom.input_hw[0]), Image.BICUBIC)
        if spec.paste_back > 0 and plan.sde_mask is not None:
            region = plan.sde_mask
            if spec.paste_back_region == "pixel" and plan.pixel_region is not None:
                region = plan.pixel_region
            image = paste_back(image, inputs["source"], region, geom, spec.paste_back)
        masks = {k: to_pil(v[..., :ch, :cw].expand(-1, 3, -1, -1) * 2 - 1)
                 for k, v in plan.masks.items()}
        timings = dict(out.timings)
        timings["wall"] = time.perf_counter() - t0
        meta = {
            "spec": spec.model_dump(mode="json"),
            "task": {"name": task.name, "version": task.version},
            "seed": spec.seed,
            "model": self.model,
            "device": str(self.engine.device),
            "dtype": str(self.engine.dtype).replace("torch.", ""),
            "working_size": list(geom.work_hw),
            "content_size": list(geom.content),
            "versions": _versions(),
            "timings_s": {k: round(v, 4) for k, v in timings.items()},
            "inversion_cached": out.inversion_cached,
            "memory_bank_bytes": out.bank_bytes,
            "guidance": _guidance_summary(out.guidance, spec),
            "network_evaluations": out.counters,
            "options": dict(self.engine.options),
            "plan": _jsonable(plan.info),
            "command_line": self.command_line,
            "timestamp": stamp,
            "spec_path": str(Path(spec_path).absolute()) if spec_path is not None else None,
            "model_hash": self.model_hash(),
            "plugins": _plugin_versions(self.registry),
            **self.extras,
        }
        turned = {name: im.info.get("exif_orientation", 1) for name, im in inputs.items()}
        if any(v != 1 for v in turned.values()):
            # the inputs were edited as viewers show them (EXIF Orientation applied)
            meta["exif_orientation"] = {k: v for k, v in turned.items() if v != 1}
        return EditResult(image=image, spec=spec, masks=masks, metadata=meta, latent=out.latent)

    # -- per-task helpers ---------------------------------------------------------------------
    def _quick(self, task: str, images: dict[str, Any], **fields) -> EditResult:
        with tempfile.TemporaryDirectory(prefix="diffeditor-") as tmp:
            spec: dict[str, Any] = {"task": task, **fields}
            for key, value in images.items():
                if value is None:
                    continue
                if isinstance(value, Image.Image):
                    path = Path(tmp) / f"{key}.png"
                    value.save(path)
                    spec[key] = str(path)
                elif isinstance(value, (str, os.PathLike)) and not isinstance(value, bytes):
                    spec[key] = os.fspath(value)
                else:
                    raise UsageError(f"{key} must be a file path or a PIL image, not "
                                     f"{type(value).__name__}")
            return self.edit(spec)

    def __getattr__(self, name: str):
        """``editor.TASK(...)`` for every registered task (built-in or a plugin's): see
        :func:`task_helper`."""
        if name.startswith("_"):
            raise AttributeError(name)
        registry = self.__dict__.get("registry")
        if registry is not None and name in registry.tasks:
            return task_helper(self, registry.tasks[name])
        raise AttributeError(f"'Editor' object has no attribute {name!r}"
                             + (f"; registered tasks: {', '.join(sorted(registry.tasks))}"
                                if registry is not None else ""))

    def __dir__(self):
        registry = self.__dict__.get("registry")
        return sorted(set(super().__dir__()) | set(registry.tasks if registry is not None else ()))


def _is_file_field(field) -> bool:
    return "Path" in str(field.annotation)


def task_helper(editor: Editor, task) -> Callable[..., EditResult]:
    """The helper ``editor.<task.name>(...)``, generated from the task's spec model: the spec's
    required fields are its positional parameters (in declaration order), every other field a
    keyword with the spec's default. File fields (``image``, ``mask``, ...) take a path or a PIL
    image; ``prompt``, ``seed`` and the rest are keywords too."""
    import inspect

    model = task.spec_model
    fields = {k: f for k, f in model.model_fields.items() if k != "task"}
    required = [k for k, f in fields.items() if f.is_required()]
    optional = [k for k in fields if k not in required]
    P = inspect.Parameter
    params = ([P(k, P.POSITIONAL_OR_KEYWORD) for k in required]
              + [P(k, P.KEYWORD_ONLY, default=fields[k].get_default(call_default_factory=True))
                 for k in optional])
    sig = inspect.Signature(params, return_annotation=EditResult)

    def helper(*args, **kwargs) -> EditResult:
        try:
            bound = sig.bind_partial(*args, **kwargs)
        except TypeError as exc:
            raise UsageError(f"{task.name}(): {exc}; parameters: {sig}") from None
        given = dict(bound.arguments)
        missing = [k for k in required if k not in given]
        if missing:
            raise UsageError(f"{task.name}(): missing {', '.join(missing)}; parameters: {sig}")
        images = {k: given.pop(k) for k in list(given) if _is_file_field(fields[k])}
        return editor._quick(task.name, images, **given)

    helper.__name__ = helper.__qualname__ = task.name
    helper.__signature__ = sig  # type: ignore[attr-defined]
    helper.__doc__ = (f"{task.description or task.name} (task {task.name!r}, generated from its "
                      f"spec model {model.__name__}).\n\nRequired: {', '.join(required)}; every other "
                      "spec field is a keyword argument.")
    return helper
