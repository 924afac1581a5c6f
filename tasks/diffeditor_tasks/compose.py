"""Composition: several edits of one image in a single sampling pass.

``task: compose`` lists ``edits``, each an ordinary spec of a registered task without ``image``
(it inherits the compose spec's ``image``, ``prompt``, ``seed``, ``steps`` and sampler settings).
The kernel then combines the edits' plans:

* energies: each edit's edit terms keep their own region (``edit:<j>``); all content terms share
  one region, outside *every* edit's region, so no edit's content energy fights another's edit;
  each edit keeps its own guidance strength (its ``energy_scale * guidance_k`` relative to the
  compose spec's);
* masks, SDE regions and reference images are united (reference images are renamed per edit);
* initial-latent surgeries are applied in order, and every edit's pins are kept;
* memory bank: if any edit mixes in a reference image (``masked``), the bank mixes the source
  outside every reference-driven object with each reference object; otherwise ``concat`` if any
  edit uses it, else ``replace``; its window is the union of the edits' windows.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, PrivateAttr, ValidationError, ValidationInfo, model_validator

from diffeditor.errors import SpecError
from diffeditor.hookspecs import hookimpl
from diffeditor.interfaces import AttentionPolicy, EditPlan, EnergyTerm, Geometry, Pin, Task
from diffeditor.schedule import Window
from diffeditor.specs import EditSpec, apply_model_defaults

from . import __version__

INHERITED = ("image", "prompt", "seed", "steps", "resolution")


class ComposeSpec(EditSpec):
    """Several edits of one image in one sampling pass."""

    task: Literal["compose"] = "compose"
    bank_parts: ClassVar[bool] = True  # when an edit names parts: checked with the edits
    edits: list[dict[str, Any]] = Field(
        min_length=1, description="the edits: specs of registered tasks, without 'image'"
    )
    task_defaults: ClassVar[dict[str, Any]] = {
        "energy_scale": 1000.0,
        "guidance_k": 0.04,
    }
    field_notes: ClassVar[dict[str, str]] = {
        "energy_scale": "lambda of the combined guidance",
        "guidance_k": "k of the combined guidance",
    }
    _specs: list[EditSpec] = PrivateAttr(default_factory=list)
    _tasks: list[Task] = PrivateAttr(default_factory=list)  # the edits' tasks, from that registry

    @model_validator(mode="after")
    def _validate_edits(self, info: ValidationInfo) -> "ComposeSpec":
        from diffeditor.plugins import default_registry

        # the registry parse_spec validates with (a direct model_validate: the installed one)
        reg = default_registry((info.context or {}).get("registry"))
        specs = []
        for j, raw in enumerate(self.edits):
            if not isinstance(raw, dict) or "task" not in raw:
                raise ValueError(f"edits[{j}] must be a mapping with a 'task' field")
            if not isinstance(raw["task"], str):
                raise ValueError(f"edits[{j}].task: must be a task name (a string), not "
                                 f"{type(raw['task']).__name__}")
            if raw["task"] in ("compose", "face"):
                raise ValueError(f"edits[{j}]: task {raw['task']!r} cannot be composed")
            if raw["task"] not in reg.tasks:
                raise ValueError(f"edits[{j}]: unknown task {raw['task'][:60]!r}")
            data = dict(raw)
            # the model's defaults, except the fields inherited from the compose spec below
            apply_model_defaults(data, raw["task"], reg.tasks[raw["task"]].spec_model,
                                 (info.context or {}).get("defaults"), skip=INHERITED)
            if data.get("energies"):
                raise ValueError(f"edits[{j}].energies: set energies on the compose spec (they "
                                 "apply to the composed edit), not per edit")
            for key in INHERITED:
                if key in data and key != "prompt":
                    raise ValueError(f"edits[{j}].{key}: set it on the compose spec, not per edit")
                data.setdefault(key, getattr(self, key))
            try:
                specs.append(reg.tasks[raw["task"]].spec_model.model_validate(data, context=info.context))
            except ValidationError as exc:  # re-raised with the edit's index in front
                first = exc.errors()[0]
                loc = ".".join(str(x) for x in first["loc"])
                msg = first["msg"].removeprefix("Value error, ")
                raise ValueError(f"edits[{j}].{loc}: {msg}") from None
        if self.memory_bank == "masked" and not any(sp.bank_parts for sp in specs):
            raise ValueError("memory_bank: 'masked' mixes the parts an edit names (appearance, "
                             "paste) and none of these edits names any: use 'task', 'replace', "
                             "'concat' or 'off'")
        self._specs = specs
        self._tasks = [reg.task(sp.task) for sp in specs]
        # the edits as validated: every field (model defaults included) and absolute paths, so
        # that a sidecar's spec replays the same edit from any folder
        self.edits = [
            {k: v for k, v in sp.model_dump(mode="json").items()
             if k not in INHERITED or (k == "prompt" and "prompt" in raw)}
            for sp, raw in zip(specs, self.edits)]
        return self

    @property
    def sub_specs(self) -> list[EditSpec]:
        return self._specs


def _rename(name: str, j: int) -> str:
    return name if name == "source" else f"{name}:{j}"


def _own(by_name: dict, j: int, names: list[str]) -> dict:
    """Edit ``j``'s view of a by-image-name mapping of the composed plan (renamed images)."""
    return {n: by_name[_rename(n, j)] for n in names}


def _wrap(fn, j: int, names: list[str]):
    """An energy of edit ``j`` reading the composed plan's reference features."""
    def wrapped(cur, refs):
        return fn(cur, _own(refs, j, names))

    return wrapped


def _renamed_target(target, j: int, names: list[str]):
    """A pin target of edit ``j`` reading the composed plan's inverted latents."""
    def renamed(zs):
        return target(_own(zs, j, names))

    return renamed


class ComposeTask(Task):
    name = "compose"
    version = __version__
    description = "several edits of one image in a single sampling pass"
    spec_model = ComposeSpec

    def _tasks(self, spec: ComposeSpec):
        """The edits' (task, spec) pairs, the tasks from the registry the spec was parsed with."""
        return list(zip(spec._tasks, spec.sub_specs))

    def images(self, spec: ComposeSpec):
        out = {"source": spec.image}
        for j, (task, sub) in enumerate(self._tasks(spec)):
            for name, path in task.images(sub).items():
                out[_rename(name, j)] = path
        return out

    def check(self, spec: ComposeSpec, input_hw) -> None:
        for j, (task, sub) in enumerate(self._tasks(spec)):
            try:
                task.check(sub, input_hw)
            except SpecError as exc:
                raise SpecError(str(exc), f"edits[{j}]") from None

    def plan(self, spec: ComposeSpec, images, geom: Geometry) -> EditPlan:
        plans: list[EditPlan] = []
        for j, (task, sub) in enumerate(self._tasks(spec)):
            own = _own(images, j, list(task.images(sub)))
            plans.append(task.plan(sub, own, geom))
        lh = geom.latent_hw
        union = torch.zeros(1, 1, *lh)
        regions: dict[str, torch.Tensor] = {}
        energies: list[EnergyTerm] = []
        base = max(spec.energy_scale * spec.guidance_k, 1e-12)
        for j, (p, (_, sub)) in enumerate(zip(plans, self._tasks(spec))):
            gain = sub.energy_scale * sub.guidance_k / base
            names = list(p.images)
            for term in p.energies:
                region = f"edit:{j}" if term.region == "edit" else term.region
                energies.append(EnergyTerm(f"{term.name}:{j}", _wrap(term.fn, j, names),
                                           term.weight * gain, region))
            edit = p.regions.get("edit", torch.zeros(1, 1, *lh))
            regions[f"edit:{j}"] = edit
            union = torch.clamp(union + edit, max=1)
        regions["content"] = 1 - union
        regions["global"] = torch.ones(1, 1, *lh)
        sde = torch.zeros(1, 1, *lh)
        for p in plans:
            sde = torch.clamp(sde + (p.sde_mask if p.sde_mask is not None else torch.ones(1, 1, *lh)), max=1)

        def surgery(zt):
            z = zt["source"]
            for j, p in enumerate(plans):
                if p.surgery is not None:
                    z = p.surgery({n: (z if n == "source" else zt[_rename(n, j)]) for n in p.images})
            return z

        masks = {f"{k}:{j}": v for j, p in enumerate(plans) for k, v in p.masks.items()}
        pins = [Pin(pin.mask, _renamed_target(pin.target, j, list(p.images)), pin.until)
                for j, p in enumerate(plans) for pin in p.pins]
        # every sub-plan's images, renamed: the loaded ones and any a plan built (a pixel-space
        # composite)
        all_images = {"source": images["source"], **{
            _rename(n, j): t for j, p in enumerate(plans) for n, t in p.images.items() if n != "source"}}
        return EditPlan(
            images=all_images,
            prompts={"source": spec.prompt, **{
                _rename(n, j): p.prompts.get(n, "") for j, p in enumerate(plans) for n in p.images if n != "source"}},
            regions=regions,
            energies=energies,
            sde_mask=sde,
            attention=self._attention(plans, geom),
            surgery=surgery,
            masks=masks,
            pins=pins,
            info={f"edit:{j}": p.info for j, p in enumerate(plans)},
            image_prompt_source=next((n for n in images if n != "source"), "source"),  # loaded ones
            # the union of the edits' pixel outlines, when every edit has one
            pixel_region=(torch.clamp(sum(p.pixel_region for p in plans), max=1)
                          if all(p.pixel_region is not None for p in plans) else None),
        )

    @staticmethod
    def _attention(plans: list[EditPlan], geom: Geometry) -> AttentionPolicy:
        modes = [p.attention.mode for p in plans]
        window = Window(start=min(p.attention.window.start for p in plans),
                        stop=max(p.attention.window.stop for p in plans))
        if "masked" in modes:
            keep = torch.ones(1, 1, *geom.work_hw)
            refs = []
            for j, p in enumerate(plans):
                for name, mask in p.attention.parts:
                    if name == "source":
                        keep = keep * mask
                    else:
                        refs.append((_rename(name, j), mask))
            return AttentionPolicy(mode="masked", window=window, parts=[("source", keep), *refs])
        mode = "concat" if "concat" in modes else ("replace" if "replace" in modes else "off")
        return AttentionPolicy(mode=mode, window=window)


@hookimpl
def register_tasks(register):
    register(ComposeTask())
