"""Face modulation (DiffEditor §4.2 "Face landmark manipulation"): drag the 68 dlib landmarks of
the face in ``image`` to those of the face in ``reference``.

Both images are brought to the working size and landmarks are detected there (the reference
additionally FFHQ-aligns both faces first; aligned inputs give the best results). Needs the
optional ``face`` extra: ``pip install 'diffeditor[face]'``. A photo with no face gives a clear
error. ``w_handle_contrast`` (the reference's ``w_inpaint``, exposed but unused there; the old
name is still accepted) is the handle-contrast weight of the drag energy here and defaults to 0,
which reproduces the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from diffeditor.errors import SpecError
from diffeditor.hookspecs import hookimpl
from diffeditor.interfaces import AttentionPolicy, EditPlan, EnergyTerm, Geometry, Task
from diffeditor.schedule import Window
from diffeditor.specs import EditSpec, path_validators, renamed_field

from . import __version__
from .drag import drag_energies


class FaceSpec(EditSpec):
    """Move a face's landmarks to a reference face's."""

    task: Literal["face"] = "face"
    reference: Path = Field(description="a face photo whose 68 landmarks are the targets")
    omit_fields: ClassVar[tuple[str, ...]] = ("w_content",)  # face has no content energy
    task_defaults: ClassVar[dict[str, Any]] = {
        "prompt": "a photo of a human face",
        "guidance_scale": 4.0,
        "energy_scale": 3000.0,
        "guidance_k": 0.04,
        "w_edit": 12.0,
        "sde_strength": 0.2,
        "sde_strength_outside": 0.2,
        "image_prompt_scale": 0.05,
    }
    field_notes: ClassVar[dict[str, str]] = {
        "prompt": "text prompt (reference: fixed)",
        "energy_scale": "lambda (reference 3 x 1e3)",
        "guidance_k": "k (reference 4e-2)",
        "w_edit": "weight of the landmark energy",
        "sde_strength": "eta (global SDE for faces)",
        "sde_strength_outside": "eta outside (= inside)",
        "image_prompt_scale": "gamma (reference 0.05)",
    }
    w_handle_contrast: float = Field(
        0.0, ge=0.0, le=100.0, description="handle-contrast weight (reference: 0.4, unused) (old name: w_inpaint)"
    )
    rename_w_inpaint = renamed_field("w_inpaint", "w_handle_contrast")

    resolve_paths, check_paths = path_validators("reference")


class FaceTask(Task):
    name = "face"
    version = __version__
    description = "drag a face's 68 landmarks to a reference face's (needs the 'face' extra)"
    spec_model = FaceSpec
    ui_hints = {"preview": {"kind": "landmarks", "images": ["image", "reference"],
                            "detector": "diffeditor_tasks.landmarks:detect_landmarks"}}

    def images(self, spec):
        return {"source": spec.image, "reference": spec.reference}

    def plan(self, spec: FaceSpec, images, geom: Geometry) -> EditPlan:
        from diffeditor.imageio import load_image

        from .landmarks import LandmarkError, detect_landmarks

        # detect on the input images at their own size, then scale to the working image
        points = {}
        for name, field, path in (("source", "image", spec.image), ("reference", "reference", spec.reference)):
            pil = load_image(path, field)
            try:
                pts = detect_landmarks(pil)
            except LandmarkError as exc:
                raise SpecError(str(exc), field) from None
            sx, sy = geom.content[1] / pil.width, geom.content[0] / pil.height
            points[name] = [(float(x) * sx, float(y) * sy) for x, y in pts]
        handles, targets = points["source"], points["reference"]
        e_edit, e_handle = drag_energies(handles, targets, geom)
        ones = torch.ones(1, 1, *geom.latent_hw)
        return EditPlan(
            images={"source": images["source"]},
            prompts={"source": spec.prompt},
            regions={"global": ones},
            energies=[EnergyTerm("edit", e_edit, spec.w_edit, "global"),
                      EnergyTerm("handle_contrast", e_handle, spec.w_handle_contrast, "global")],
            sde_mask=None,
            attention=AttentionPolicy(mode="concat", window=Window(start=0.1, stop=1.0)),
            info={"handles_work_px": handles, "targets_work_px": targets},
        )


@hookimpl
def register_tasks(register):
    register(FaceTask())
