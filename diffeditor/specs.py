"""Edit specs: pydantic models, the run-time discriminated union, loading YAML/JSON files.

Every tunable number of the reference implementation is a named, bounded, documented field whose
default is the reference's value (per task: each task's spec model overrides the defaults).
Paths inside a spec file are relative to that file.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import operator
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import DiffEditorError, SpecError, UsageError, is_file, not_a_file, show
from .schedule import ScheduleSpec

log = logging.getLogger(__name__)


def _resolve(value: Any, info: ValidationInfo) -> Any:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or isinstance(value, bytes):
        raise ValueError(f"must be a file path (a string), not {type(value).__name__}")
    if not str(value).strip():
        raise ValueError("must be a file path, not an empty string")
    if "\x00" in str(value):
        raise ValueError(f"file path {show(value)} holds a NUL character")
    p = Path(value).expanduser()
    base = (info.context or {}).get("base_dir") if info.context else None
    if not p.is_absolute() and base is not None:
        p = Path(base) / p
    return p.absolute()  # sidecars record absolute paths: replayable from any folder


def _must_exist(p: Path | None, info: ValidationInfo) -> Path | None:
    if p is not None and not is_file(p):
        raise ValueError(not_a_file(p))
    return p


class EnergyUse(BaseModel):
    """One named energy term a spec adds to its task's own (field ``energies``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=100,
                      description="a registered energy (`diffeditor plugins` lists them): "
                      "content, mean_feature or a plugin's")
    weight: float = Field(1.0, ge=0.0, le=100.0,
                          description="the term's weight (0: the term is skipped)")
    region: Literal["edit", "content", "global"] | None = Field(
        None, description="where its gradient applies: edit (the edited region), content (the "
        "rest) or global (everywhere); default: the energy's own")
    params: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="the energy's own parameters (region and image names, numbers), e.g. "
        "{reference: source} for content")


class EditSpec(BaseModel):
    """Fields common to every task. Task spec models subclass this and set ``task``."""

    # NaN and infinities are refused in every float field (offsets, scales, weights): they
    # would give a black image and a sidecar that is not JSON
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    task: str = Field(description="the editing task")
    image: Path = Field(description="the image to edit (path relative to the spec file)")
    prompt: str = Field(
        "", description="text prompt: describe the wanted result (for appearance and paste: the "
        "scene with the new colour or the pasted object; measured better on the shapes model, "
        "docs/quality.md)")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="random seed (SDE noise)")
    steps: int = Field(50, ge=2, le=1000, description="DDIM steps (inversion and editing)")
    resolution: int | None = Field(
        None,
        ge=64,
        le=2048,
        description="working size: the image is scaled to about resolution^2 pixels with each "
        "side a multiple of 64 (reference: 768); default: the model's own",
    )
    guidance_scale: float = Field(4.0, ge=1.0, le=30.0, description="classifier-free guidance scale")
    energy_scale: float = Field(
        500.0, ge=0.0, le=1e5, description="lambda: energy multiplier (reference UI value x 1e3)"
    )
    guidance_k: float = Field(
        0.04, ge=0.0, le=10.0, description="k: factor on the energy gradient added to the noise"
    )
    w_edit: float = Field(4.0, ge=0.0, le=100.0, description="weight of the edit energy")
    w_content: float = Field(6.0, ge=0.0, le=100.0, description="weight of the content energy")
    sde_strength: float = Field(
        0.4, ge=0.0, le=1.0, description="eta inside the edit region during the SDE window"
    )
    sde_strength_outside: float = Field(
        0.0, ge=0.0, le=1.0, description="eta outside the edit region during the SDE window"
    )
    sde_region: Literal["regional", "global"] = Field(
        "regional", description="regional: eta_in inside the mask only; global: eta_in everywhere"
    )
    guidance_region: Literal["regional", "global"] = Field(
        "regional",
        description="regional: each energy's gradient inside its own region (the paper); "
        "global: one gradient of the summed energies applied everywhere (ablation)",
    )
    text_encoder: str = Field(
        "clip", min_length=1, max_length=100,
        description="the text prompt encoder, by registered name (diffeditor plugins lists them)")
    image_encoder: str = Field(
        "ip-adapter", min_length=1, max_length=100,
        description="the image prompt, by registered name (models with image-prompt weights only)")
    image_prompt_scale: float = Field(
        0.1, ge=0.0, le=1.0, description="gamma: weight of the image-prompt cross-attention"
    )
    guidance_clip: float | None = Field(
        None,
        gt=0.0,
        le=100.0,
        description="bound each region's guidance term k*grad to this many times the RMS of "
        "the noise prediction inside the region (direction kept); none = unbounded (the release)",
    )
    image_prompt_inversion: bool = Field(
        False,
        description="add the image prompt (gamma, in its window) while inverting too, as the "
        "paper describes; the release inverts without it (models with an image prompt only)",
    )
    guidance_precision: Literal["model", "float32"] = Field(
        "model",
        description="precision of the guidance pass with gradient: the model's (the release: "
        "fp16 on GPUs) or float32 through a float32 copy of the UNet (more memory)",
    )
    memory_bank: Literal["task", "replace", "concat", "masked", "off"] = Field(
        "task",
        description="memory-bank attention policy; 'task' = the task's own; 'masked' only for "
        "tasks that name the parts to mix (appearance, paste)",
    )
    background_blend: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="fraction of the run (from the start) during which the latent outside the "
        "edit region is replaced by the inverted source latent of the same step; 0 = off (the "
        "reference); not part of DiffEditor, an extra for weak models",
    )
    paste_back: int = Field(
        0,
        ge=0,
        le=64,
        description="not in the reference: outside the edit region (the regional-SDE mask, "
        "widened by one latent cell) the output keeps the input image's own pixels, at the "
        "input's full size, blended in over this many working-size pixels; 0 = off (the "
        "reference: every pixel is decoded). For decoders that are not local (the shapes model's "
        "VAE tints the whole image when an object changes) and for photos larger than the "
        "working size; tasks with no edit region (face) ignore it",
    )
    paste_back_region: Literal["latent", "pixel"] = Field(
        "latent",
        description="the region paste_back keeps the edit in: 'latent' (the regional-SDE mask "
        "widened by one latent cell) or 'pixel' (the task's own pixel outline of what may change: "
        "the object for appearance, the pasted object for paste, source and destination for move "
        "and resize, the editable mask for drag; 'latent' where a task gives none)",
    )
    feature_levels: tuple[int, ...] = Field(
        (1, 2), min_length=1, description="decoder up_blocks whose outputs are guidance features"
    )
    feature_scale: int = Field(
        2, ge=1, le=8, description="feature grid = this x the latent grid (reference up_scale)"
    )
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="step windows")
    sampler: str = Field(
        "diffeditor", min_length=1, max_length=100,
        description="the sampler, by registered name (`diffeditor plugins` lists them): "
        "diffeditor (the paper's), dragondiffusion (guidance at every early step, no SDE, no "
        "time travel, no image prompt) or ddim (no guidance); plugins may add more")
    energies: list[EnergyUse] = Field(
        default_factory=list, max_length=16,
        description="named energy terms added to the task's own, e.g. [{name: content, weight: "
        "2.0}]: each a registered energy with its weight, region and params")

    #: a task's own defaults of the shared fields above, e.g. ``{"energy_scale": 2000.0}``: each
    #: shared field is declared once, here, with its bounds and description, and a task spec
    #: only says where its default differs (``field_notes`` replaces a description)
    task_defaults: ClassVar[dict[str, Any]] = {}
    field_notes: ClassVar[dict[str, str]] = {}

    #: whether the task's plan names memory-bank parts (the images and masks that
    #: ``memory_bank: masked`` mixes); a task spec that does sets this to True
    bank_parts: ClassVar[bool] = False

    #: shared fields above that a task does not have, e.g. ``("w_content",)`` for a task with
    #: no content energy (face); a spec that still gives one is accepted with a warning
    omit_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """Apply the subclass's ``omit_fields`` / ``task_defaults`` / ``field_notes`` to the
        inherited fields."""
        super().__pydantic_init_subclass__(**kwargs)
        defaults = cls.__dict__.get("task_defaults") or {}
        notes = cls.__dict__.get("field_notes") or {}
        omit = cls.__dict__.get("omit_fields") or ()
        if not defaults and not notes and not omit:
            return
        fields = cls.__pydantic_fields__
        for name in omit:
            if name not in fields or name == "task":
                raise TypeError(f"{cls.__name__}.omit_fields: no shared field {name!r}")
            del fields[name]
        for name in (*defaults, *notes):
            if name not in fields:
                raise TypeError(f"{cls.__name__}.task_defaults/field_notes: no field {name!r}")
        for name in {*defaults, *notes}:
            f = copy.copy(fields[name])
            f._attributes_set = dict(f._attributes_set)
            if name in defaults:
                f.default = f._attributes_set["default"] = defaults[name]
            if name in notes:
                f.description = f._attributes_set["description"] = notes[name]
            fields[name] = f
        cls.model_rebuild(force=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_omitted(cls, data: Any) -> Any:
        """A field the task omits (``omit_fields``) is dropped with a deprecation warning: it
        meant nothing for this task, and older specs may still give it."""
        if isinstance(data, dict) and any(name in data for name in cls.omit_fields):
            data = dict(data)
            for name in cls.omit_fields:
                if name in data:
                    data.pop(name)
                    task = cls.model_fields["task"].default
                    log.warning("spec field %r is deprecated for task %r (it had no effect "
                                "there): remove it from the spec", name, task)
        return data

    resolve_image_path = field_validator("image", mode="before")(_resolve)
    check_image_path = field_validator("image", mode="after")(_must_exist)

    @field_validator("feature_levels")
    @classmethod
    def _levels(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(lv < 0 or lv > 3 for lv in v):
            raise ValueError("feature levels are up_blocks indices 0..3")
        return tuple(sorted(set(v)))

    @field_validator("text_encoder", "image_encoder")
    @classmethod
    def _known_encoder(cls, v: str, info: ValidationInfo) -> str:
        reg = (info.context or {}).get("registry")
        kind = "text" if info.field_name == "text_encoder" else "image"
        if reg is not None and v not in reg.prompt_encoders[kind]:
            known = ", ".join(sorted(reg.prompt_encoders[kind])) or "none"
            raise ValueError(f"unknown {kind} prompt encoder {show(v, 60)!r}; installed: {known}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _strict_numbers(cls, data: Any) -> Any:
        """``true``/``false`` where a field takes numbers is refused (pydantic would read them as
        1 and 0: ``offset: [true, false]`` would move by one pixel), in every field, nested
        ones and a plugin task's own included."""
        if isinstance(data, dict):
            where = bool_in_numbers(cls, data)
            if where:
                raise ValueError(f"{where}: must be a number, not true/false")
        return data

    @model_validator(mode="after")
    def _explicit_steps_in_range(self) -> "EditSpec":
        """Explicit schedule ``steps`` must be steps of this run (0 to ``steps - 1``): a step
        past the end would silently switch its mechanism off."""
        sched = self.schedule
        for name in type(sched).model_fields:
            value = getattr(sched, name)
            windows = value if isinstance(value, tuple) else (value,)
            for i, w in enumerate(windows):
                past = [s for s in (getattr(w, "steps", None) or ()) if s >= self.steps]
                if past:
                    loc = f"schedule.{name}" + (f".{i}" if isinstance(value, tuple) else "")
                    raise ValueError(f"{loc}.steps: step {show(past[0], 30)} is past the last "
                                     f"step of this run ({self.steps - 1}: steps is "
                                     f"{self.steps}, counted from 0)")
        return self

    @model_validator(mode="after")
    def _known_energies(self, info: ValidationInfo) -> "EditSpec":
        """Each named energy is registered and takes the params given (before any model
        loads; a spec validated without a registry is checked when the edit runs)."""
        reg = (info.context or {}).get("registry")
        v = self.energies
        if reg is None or not v:
            return self
        from .energies import BUILTIN_ENERGIES, check_spec_energy, unknown_energy

        known = reg.energies or BUILTIN_ENERGIES
        for i, use in enumerate(v):
            if use.name not in known:
                raise ValueError(f"energies[{i}]: {unknown_energy(use.name, known)}")
            try:
                check_spec_energy(known[use.name], use.params)
            except ValueError as exc:
                raise ValueError(f"energies[{i}]: {exc}") from None
        return self

    @field_validator("memory_bank")
    @classmethod
    def _masked_needs_parts(cls, v: str) -> str:
        if v == "masked" and not cls.bank_parts:
            task = cls.model_fields["task"].default
            raise ValueError(
                f"'masked' mixes the parts a task names (the source outside the object, the "
                f"reference object) and task {task!r} names none: use 'task', 'replace', "
                f"'concat' or 'off'")
        return v


def _numeric_types(annotation: Any) -> tuple[bool, bool, list[type]]:
    """(takes int/float, takes bool, nested models) of a field's annotation, at any depth."""
    import typing

    number = boolean = False
    models: list[type] = []
    stack = [annotation]
    while stack:
        ann = stack.pop()
        if ann is bool:
            boolean = True
        elif ann in (int, float):
            number = True
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            models.append(ann)
        elif typing.get_origin(ann) is not Literal:
            stack.extend(a for a in typing.get_args(ann) if a is not Ellipsis)
    return number, boolean, models


#: values :func:`bool_in_numbers` looks at, at most (a spec has a few hundred; the fields' own
#: length limits refuse anything near this, and a YAML anchor bomb must not be walked)
MAX_WALK = 10_000


def bool_in_numbers(model: type[BaseModel], data: dict, prefix: str = "",
                    _seen: set | None = None, _budget: list | None = None) -> str | None:
    """The location (``offset.0``, ``schedule.guidance.0.steps.1``) of the first boolean given
    for a field of ``model`` that takes numbers and not booleans, else None. Shared containers
    are looked at once, and at most :data:`MAX_WALK` values in all."""
    seen = set() if _seen is None else _seen
    budget = [MAX_WALK] if _budget is None else _budget

    def walk(value: Any, ann: Any, loc: str) -> str | None:
        budget[0] -= 1
        if budget[0] < 0:
            return None
        number, boolean, models = _numeric_types(ann)
        if isinstance(value, bool):
            return loc if number and not boolean else None
        if isinstance(value, (list, tuple, dict)):
            if id(value) in seen:
                return None
            seen.add(id(value))
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                found = walk(item, ann, f"{loc}.{i}")
                if found or budget[0] < 0:
                    return found
        elif isinstance(value, dict) and len(models) == 1:
            return bool_in_numbers(models[0], value, f"{loc}.", seen, budget)
        return None

    for name, f in model.model_fields.items():
        key = f.alias or name
        if key in data:
            found = walk(data[key], f.annotation, f"{prefix}{name}")
            if found:
                return found
    return None


def path_validators(*names: str):
    """Validators that resolve the named path fields against the spec file and check they exist.

    Use as ``resolve_paths, check_paths = path_validators("mask", "reference")`` in a subclass
    body (two public names: pydantic ignores validators bound to private names)."""
    return (
        field_validator(*names, mode="before")(_resolve),
        field_validator(*names, mode="after")(_must_exist),
    )




def renamed_field(old: str, new: str):
    """A validator that accepts a field's old name ``old`` for ``new`` with a deprecation
    message (a logged warning); both at once is an error. Use as ``rename_OLD =
    renamed_field("OLD", "NEW")`` in a spec class body (a public name: pydantic ignores
    validators bound to private names)."""

    def rename(cls, data: Any) -> Any:
        if isinstance(data, dict) and old in data:
            if new in data:
                raise ValueError(f"{old} is the old name of {new}: give only {new}")
            data = dict(data)
            data[new] = data.pop(old)
            log.warning("spec field %r is deprecated: it is now called %r (same meaning); "
                        "rename it in the spec", old, new)
        return data

    return model_validator(mode="before")(classmethod(rename))


# -- the union ---------------------------------------------------------------------------------

def spec_union(registry=None):
    """A ``TypeAdapter`` for the discriminated union (on ``task``) of all registered tasks
    (``registry``: default the installed plugins')."""
    from .plugins import default_registry

    reg = default_registry(registry)
    models = [t.spec_model for t in reg.tasks.values()]
    if not models:
        raise SpecError("no tasks are registered; is diffeditor installed with its tasks?")
    if len(models) == 1:
        return TypeAdapter(models[0])
    union = functools.reduce(operator.or_, models)  # Model1 | Model2 | ...
    return TypeAdapter(Annotated[union, Field(discriminator="task")])


def json_schema(registry=None) -> dict:
    """The JSON Schema of every spec the installed plugins accept."""
    schema = spec_union(registry).json_schema()
    schema.setdefault("title", "diffeditor edit spec")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


#: field errors listed per spec (the rest are counted)
MAX_ERRORS_SHOWN = 5


def format_validation_error(err: ValidationError, source: str = "spec") -> str:
    """One readable message naming the field(s)."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith("function-after"))
        msg = show(e["msg"], 300)
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        loc = show(loc, 80)
        # a whole-spec check (a model validator) names its own fields in its message
        lines.append(f"{loc}: {msg}" if loc else msg)
    if len(lines) > MAX_ERRORS_SHOWN:  # a line, not a dump
        lines = lines[:MAX_ERRORS_SHOWN] + [f"and {len(lines) - MAX_ERRORS_SHOWN} more"]
    return f"{source}: " + "; ".join(lines)



def apply_model_defaults(
    data: dict, task: str, model: type[EditSpec], defaults: dict | None, skip=()
) -> None:
    """Fill fields ``data`` leaves out from a model's registered defaults (in place).

    A key ``"<task>.<field>"`` applies to that task only; keys naming fields the task's spec
    model does not have, or listed in ``skip``, are ignored. A default that is a mapping (a
    ``schedule``) fills the keys the spec's own mapping leaves out, at every depth: a spec that
    sets ``schedule.guidance`` still gets the model's ``schedule.time_travel_repeats``. A mapping
    that names a ``preset`` is left as it is: the preset serves the fields it leaves out.
    """
    for key, value in (defaults or {}).items():
        field = key.split(".", 1)[1] if key.startswith(f"{task}.") else key
        if "." in field or field in skip or field not in model.model_fields:
            continue
        if isinstance(value, dict) and isinstance(data.get(field), dict):
            if data[field].get("preset") is None:
                data[field] = deep_update(value, data[field])
        else:
            data.setdefault(field, value)


def deep_update(base: dict, extra: dict) -> dict:
    """``base`` with ``extra``'s keys on top, mappings merged at every depth (a new dict; neither
    argument is changed): ``deep_update({"schedule": {"a": 1, "b": 2}}, {"schedule": {"b": 3}})``
    is ``{"schedule": {"a": 1, "b": 3}}``."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def is_sidecar(data: Any) -> bool:
    """Whether ``data`` is an output's JSON sidecar (it holds the validated spec under ``spec``)."""
    return isinstance(data, dict) and isinstance(data.get("spec"), dict) and "versions" in data


def spec_section(data: dict) -> dict:
    """The spec of a spec mapping or of a sidecar (whose ``spec`` section is a complete spec with
    absolute paths, so ``diffeditor edit OUT.json`` replays the edit from any folder)."""
    return dict(data["spec"]) if is_sidecar(data) else data


#: spec files larger than this are refused unread (a spec is a few hundred bytes)
MAX_SPEC_BYTES = 1 << 20


def read_spec_file(path: str | Path) -> dict:
    """Parse a YAML or JSON spec file into a dict (with clear, one-line errors)."""
    p = Path(path)
    name = show(p, 200)
    if not is_file(p):
        raise SpecError(not_a_file(p, "spec file"))
    try:
        size = p.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(f"{name}: {size} bytes is too large for a spec file "
                            f"(at most {MAX_SPEC_BYTES}); is this the right file?")
        raw = p.read_bytes()
    except OSError as exc:
        raise SpecError(f"{name}: cannot read the spec file ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{name}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                        f"{exc.start}); save the spec as UTF-8") from None
    is_json = p.suffix.lower() == ".json"
    if _bracket_depth(text) > MAX_SPEC_DEPTH:  # before the (recursive, slow) parsers see it
        raise SpecError(f"{name}: nested too deeply to be a spec (more than {MAX_SPEC_DEPTH} "
                        "levels of brackets)")
    try:
        data = loads_json(text) if is_json else load_yaml(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{name}: not valid JSON: {exc.msg} at line {exc.lineno} "
                        f"column {exc.colno}") from None
    except SpecTextError as exc:
        raise SpecError(f"{name}: {exc}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{name}: not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise SpecError(f"{name}: nested too deeply to be a spec") from None
    if not isinstance(data, dict):
        raise SpecError(f"{name}: a spec must be a mapping with a 'task' field, "
                        f"not {'an empty file' if data is None else type(data).__name__}")
    return data


#: the most digits an integer in a spec document may have (a seed has at most 10; Python
#: itself refuses to convert more than 4300 and would raise from inside the parser)
MAX_INT_DIGITS = 100


class SpecTextError(ValueError):
    """A problem of a spec document's text the parsers accept but a spec must not have (a
    duplicate key, an integer of thousands of digits); the message is one line."""


def _bounded_int(text: str, base: int = 10) -> int:
    digits = text.lstrip("+-")
    if len(digits) > MAX_INT_DIGITS:
        raise SpecTextError(f"an integer of {len(digits)} digits ({show(text, 20)}) is too long "
                            f"for a spec (at most {MAX_INT_DIGITS} digits)")
    return int(text, base)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise SpecTextError(f"key {show(key, 60)!r} appears twice in one mapping; keep one")
        out[key] = value
    return out


def loads_json(text: str) -> Any:
    """``json.loads`` for spec documents (spec files, manifest lines, ``--edit``): a key given
    twice in one object and integers of more than :data:`MAX_INT_DIGITS` digits are refused
    (:class:`SpecTextError`) instead of the last key winning or a traceback."""
    return json.loads(text, object_pairs_hook=_unique_pairs, parse_int=_bounded_int)


class SpecLoader(yaml.SafeLoader):
    """YAML for spec files with the YAML 1.2 core schema's plain scalars (what JSON and every
    YAML 1.2 reader mean): ``true``/``false`` only are booleans (``yes``, ``on`` are strings), no
    base-60 numbers (``1:30`` is a string, not 90), no ``0``-prefixed octal (``0o17`` is), no
    timestamps; a key given twice in one mapping is an error naming the key, and integers of
    more than :data:`MAX_INT_DIGITS` digits are refused."""

    yaml_implicit_resolvers: dict = {}

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # keys merged in with << may be overridden: that is their point
                key = self.construct_object(key_node, deep=True)
                try:
                    dup = key in seen
                    seen.add(key)
                except TypeError:
                    continue  # unhashable: the base constructor reports it
                if dup:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"key {show(str(key), 60)!r} appears twice in one mapping; keep one",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        text = str(self.construct_scalar(node))
        try:
            if text.lstrip("+-").startswith("0o"):
                return _bounded_int(text.replace("0o", "", 1), 8)
            if text.lstrip("+-").startswith("0x"):
                return _bounded_int(text.replace("0x", "", 1), 16)
            return _bounded_int(text)
        except SpecTextError as exc:
            raise yaml.constructor.ConstructorError(None, None, str(exc), node.start_mark) from None
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, f"{show(text, 40)!r} is not an integer", node.start_mark) from None


SpecLoader.add_constructor("tag:yaml.org,2002:int", SpecLoader.construct_yaml_int)
for _tag, _regex, _first in (  # the YAML 1.2 core schema (yaml.org/spec/1.2.2, 10.3.2)
        ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
        ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
        ("float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                  r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+0123456789."),
        ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
        ("merge", r"^(?:<<)$", "<"),
):
    SpecLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_regex), list(_first))


def load_yaml(text: str) -> Any:
    """A spec document's YAML (see :class:`SpecLoader`)."""
    return yaml.load(text, Loader=SpecLoader)  # noqa: S506 (a SafeLoader subclass)


#: the deepest bracket nesting a spec file may have (a real spec has 3 or 4)
MAX_SPEC_DEPTH = 64
_BRACKETS = re.compile(r"[\[\]{}]")


def _bracket_depth(text: str) -> int:
    """The deepest nesting of ``[ ]`` / ``{ }`` in ``text`` (quotes ignored: an upper bound)."""
    depth = deepest = 0
    for m in _BRACKETS.finditer(text):
        depth = depth + 1 if m.group() in "[{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    return deepest


def _yaml_problem(exc: Exception) -> str:
    """A YAML error in one line: what is wrong and where."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    text = problem or str(exc).strip().splitlines()[0]
    return show(f"{text}{where}", 200)


def parse_spec(
    data: dict | str | Path | EditSpec,
    base_dir: str | Path | None = None,
    defaults: dict[str, Any] | None = None,
    registry=None,
    source: str | None = None,
) -> EditSpec:
    """Validate a spec given as a dict, a file path or a model.

    ``defaults`` (a model's registered defaults) fill fields the spec leaves out;
    ``"<task>.<field>"`` keys apply to that task only. ``registry`` names the tasks and prompt
    encoders (default: the installed plugins'). Raises :class:`SpecError`.
    """
    from .plugins import default_registry

    reg = default_registry(registry)
    if isinstance(data, EditSpec):
        data, base_dir = data.model_dump(), base_dir
    if isinstance(data, os.PathLike) and not isinstance(data, Path):
        data = Path(data)
    if base_dir is not None and (not isinstance(base_dir, (str, os.PathLike))
                                 or isinstance(base_dir, bytes)):
        raise UsageError(f"base_dir must be a folder path, not {type(base_dir).__name__}")
    if defaults is not None and not isinstance(defaults, dict):
        raise UsageError(f"defaults must be a dict of spec fields, not {type(defaults).__name__}")
    if not isinstance(data, (str, Path, dict)):
        raise UsageError(f"a spec is a YAML/JSON file path, a dict or an EditSpec, "
                         f"not {type(data).__name__}")
    if isinstance(data, (str, Path)):
        source = source or show(data, 200)
        path, data = data, read_spec_file(data)
        base_dir = Path(path).resolve().parent if base_dir is None else base_dir
    source = source or "spec"
    sidecar_parts = [k for k in ("spec", "versions") if k in data]
    if isinstance(data.get("task"), dict) and sidecar_parts and not is_sidecar(data):
        # an output's sidecar (its 'task' is {name, version}) with a part missing or broken
        missing = [k for k in ("spec", "versions") if k not in data] or ["spec (a mapping)"]
        raise SpecError(f"{source}: a sidecar with no {' or '.join(missing)}; replay an intact "
                        f"sidecar, or give a spec file")
    data = dict(spec_section(data))
    task = data.get("task")
    if task is not None and not isinstance(task, str):
        raise SpecError(f"{source}: task: must be a task name such as 'move', not {type(task).__name__}")
    if task is None:
        raise SpecError(f"{source}: task: missing; one of {', '.join(sorted(reg.tasks))}")
    if not isinstance(task, str):
        raise SpecError(f"{source}: task: must be a task name (a string), not "
                        f"{type(task).__name__}; one of {', '.join(sorted(reg.tasks))}")
    if task not in reg.tasks:
        raise SpecError(
            f"{source}: task: unknown task {show(task, 60)!r}; registered tasks: {', '.join(sorted(reg.tasks))}"
        )
    model = reg.tasks[task].spec_model
    apply_model_defaults(data, task, model, defaults)
    ctx = {"base_dir": Path(base_dir) if base_dir is not None else Path.cwd(),
           "defaults": dict(defaults or {}), "registry": reg}
    try:
        return model.model_validate(data, context=ctx)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, source)) from None
    except RecursionError:
        raise SpecError(f"{source}: nested too deeply to be a spec") from None
    except DiffEditorError:
        raise
    except Exception as exc:  # a plugin's validator raised something pydantic does not collect
        origin = reg.task_origin.get(task)
        where = f" (plugin {origin.name!r}, {origin.distribution})" if origin else ""
        raise SpecError(f"{source}: the {show(task, 60)} task's spec check failed{where}: "
                        f"{type(exc).__name__}: {show(str(exc), 120)}; a bug in that plugin, "
                        f"report it there") from None
