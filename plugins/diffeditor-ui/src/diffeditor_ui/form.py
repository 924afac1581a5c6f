"""A task's form, generated from its pydantic spec model (no per-task UI code).

Each spec field becomes one :class:`FieldUI`:

* ``Path`` fields: image inputs; a field named ``*mask`` (or listed in the task's
  ``ui_hints["masks"]``) is a brush-painted mask drawn on an image (``reference_mask`` on
  ``reference``, otherwise on ``image``, or as ``ui_hints["images"]`` says);
* ``list[tuple[float, float]]`` fields: points placed by clicking on an image; the point fields
  of one image take clicks in turn (drag: handle, target, handle, ...), drawn as numbered arrows;
* ``tuple[float, float]``: two numbers (x, y); ``Literal``: a choice; ``bool``: a checkbox;
* bounded numbers: sliders; other numbers: number boxes; ``str``: text; anything else (nested
  models, lists of mappings): JSON text.

The image, mask and point fields, the prompts, ``steps``, ``seed``, the task's own fields (those
it adds to :class:`~diffeditor.specs.EditSpec`) and ``ui_hints["main"]`` are shown; the rest go in
the "advanced" fold. Displayed defaults are the model's registered defaults where it has some.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import annotated_types as at

from diffeditor.specs import EditSpec

MAIN_COMMON = ("prompt", "steps", "seed")
SLIDER_MAX_RANGE = 1e5  # wider bounded ranges (seed) get a number box


@dataclass
class FieldUI:
    name: str
    kind: str  # image | mask | points | pair | slider | number | text | choice | bool | json
    label: str
    description: str = ""
    default: Any = None
    required: bool = False
    optional: bool = False  # None allowed
    integer: bool = False
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: list[Any] = field(default_factory=list)
    on: str | None = None  # mask / points: the image field they are drawn on
    advanced: bool = False


@dataclass
class TaskForm:
    task: str
    description: str
    fields: list[FieldUI]
    hints: dict[str, Any]

    def by_name(self) -> dict[str, FieldUI]:
        return {f.name: f for f in self.fields}

    def of_kind(self, *kinds: str) -> list[FieldUI]:
        return [f for f in self.fields if f.kind in kinds]

    def images(self) -> list[FieldUI]:
        return self.of_kind("image")

    def point_groups(self) -> dict[str, list[str]]:
        """Image field -> the point fields drawn on it, in the order clicks fill them."""
        out: dict[str, list[str]] = {}
        for f in self.of_kind("points"):
            out.setdefault(f.on or "image", []).append(f.name)
        return out

    def masks_on(self, image: str) -> list[str]:
        return [f.name for f in self.of_kind("mask") if f.on == image]


def _unwrap_optional(ann):
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return inner[0], True
    return ann, False


def _bounds(info) -> tuple[float | None, float | None]:
    lo = hi = None
    for m in info.metadata:
        if isinstance(m, at.Ge):
            lo = m.ge
        elif isinstance(m, at.Gt):
            lo = m.gt
        elif isinstance(m, at.Le):
            hi = m.le
        elif isinstance(m, at.Lt):
            hi = m.lt
    return lo, hi


def _is_point_list(ann) -> bool:
    if typing.get_origin(ann) is not list:
        return False
    (inner,) = typing.get_args(ann) or (None,)
    return _is_pair(inner)


def _is_pair(ann) -> bool:
    return typing.get_origin(ann) is tuple and typing.get_args(ann) in ((float, float), (int, int))


def _float_step(lo: float, hi: float, default) -> float:
    span = hi - lo
    step = 0.001 if span <= 10 else 0.01 if span <= 100 else 1.0
    if isinstance(default, float) and default and abs(round(default / step) * step - default) > 1e-12:
        step = 0.0001
    return step


def model_default(task: str, name: str, model_defaults: dict[str, Any] | None, fallback: Any) -> Any:
    defaults = model_defaults or {}
    if f"{task}.{name}" in defaults:
        return defaults[f"{task}.{name}"]
    return defaults.get(name, fallback)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def task_form(task, model_defaults: dict[str, Any] | None = None) -> TaskForm:
    """The form of a registered task (an instance of :class:`diffeditor.interfaces.Task`)."""
    spec_model = task.spec_model
    hints = dict(getattr(task, "ui_hints", None) or {})
    images_hint = dict(hints.get("images", {}))
    mask_hint = set(hints.get("masks", ()))
    main_extra = set(hints.get("main", ()))
    path_fields = [n for n, f in spec_model.model_fields.items()
                   if _unwrap_optional(f.annotation)[0] is Path]
    fields: list[FieldUI] = []
    for name, info in spec_model.model_fields.items():
        if name == "task":
            continue
        ann, optional = _unwrap_optional(info.annotation)
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        default = model_default(task.name, name, model_defaults, default)
        fu = FieldUI(name=name, kind="json", label=name.replace("_", " "),
                     description=info.description or "", default=_jsonable(default),
                     required=info.is_required(), optional=optional)
        if ann is Path:
            is_mask = name in mask_hint or name.endswith("mask")
            fu.kind = "mask" if is_mask else "image"
            if is_mask:
                base = name[: -len("_mask")] if name.endswith("_mask") else ""
                fu.on = images_hint.get(name) or (base if base in path_fields and base != name
                                                  else "image")
        elif _is_point_list(ann):
            fu.kind = "points"
            fu.on = images_hint.get(name, "image")
        elif _is_pair(ann):
            fu.kind = "pair"
        elif typing.get_origin(ann) is typing.Literal:
            fu.kind = "choice"
            fu.choices = list(typing.get_args(ann))
        elif ann is bool:
            fu.kind = "bool"
        elif ann in (int, float):
            fu.integer = ann is int
            lo, hi = _bounds(info)
            fu.minimum, fu.maximum = lo, hi
            if lo is not None and hi is not None and hi - lo <= SLIDER_MAX_RANGE and not optional:
                fu.kind = "slider"
                fu.step = 1 if fu.integer else _float_step(lo, hi, fu.default)
            else:
                fu.kind = "number"
        elif ann is str:
            fu.kind = "text"
        shown = (fu.kind in ("image", "mask", "points") or name in MAIN_COMMON
                 or name.endswith("prompt") or name in main_extra
                 or name not in EditSpec.model_fields)
        fu.advanced = not shown
        fields.append(fu)
    return TaskForm(task=task.name, description=task.description, fields=fields, hints=hints)


# -- form values -> spec ----------------------------------------------------------------------

def spec_data(form: TaskForm, values: dict[str, Any]) -> dict[str, Any]:
    """The spec dict of a filled form. ``values``: field -> value as the page gives it (image and
    mask fields already written to files: their paths; ``None`` = left empty). JSON fields are
    parsed; empty optional fields are left out (the spec's default applies)."""
    from diffeditor.errors import SpecError

    data: dict[str, Any] = {"task": form.task}
    for f in form.fields:
        value = values.get(f.name)
        if f.kind == "json":
            text = value if isinstance(value, str) else json.dumps(value)
            if text is None or not str(text).strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SpecError(f"not valid JSON: {exc.msg} (line {exc.lineno})", f.name) from None
        if value is None or (f.kind == "points" and not value and not f.required):
            continue
        if f.kind in ("slider", "number") and f.integer and isinstance(value, float) and value.is_integer():
            value = int(value)
        if f.kind == "pair":
            value = [float(v) if v is not None else 0.0 for v in value]
        data[f.name] = value
    return data


def relative_spec(spec, names: dict[str, str]) -> dict[str, Any]:
    """A validated spec as JSON data with its file fields renamed (``field -> file name``), for
    a spec file written beside those files."""
    data = spec.model_dump(mode="json")
    for key, name in names.items():
        if key in data and data[key] is not None:
            data[key] = name
    return data
