"""Object pasting (DiffEditor §4.2): paste the object under ``reference_mask`` in ``reference``
into the image, shifted by ``offset`` from its place in the reference and scaled about its
centroid by ``scale``. A destination that leaves the frame is cropped. The same pixel-unit
transform moves the mask, the reference features and the reference's initial latent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from diffeditor.energies import content_energy, cosine_map, inverse_energy, masked_mean, sim01
from diffeditor.geometry import mask_centroid, similarity_warp
from diffeditor.hookspecs import hookimpl
from diffeditor.interfaces import (
    AttentionPolicy,
    BenchScene,
    EditPlan,
    EnergyTerm,
    Geometry,
    Pin,
    Task,
)
from diffeditor.masks import (
    check_mask_file,
    check_offset,
    grid_mask,
    reference_work_mask,
    scale_offset,
)
from diffeditor.specs import EditSpec, path_validators

from . import __version__, scenes
from .appearance import MEMORY_WINDOW


class PasteSpec(EditSpec):
    """Paste an object from a reference image."""

    task: Literal["paste"] = "paste"
    bank_parts: ClassVar[bool] = True  # the source outside the object, the reference object
    reference: Path = Field(description="the image holding the object to paste")
    reference_mask: Path = Field(description="the object to paste (white), reference's size")
    offset: tuple[float, float] = Field(
        (0.0, 0.0), description="[dx, dy]: shift from the object's place in the reference, "
        "in pixels of the edited image"
    )
    scale: float = Field(1.0, ge=0.01, le=10.0, description="resize factor about the centroid")
    reference_prompt: str = Field("", description="text prompt describing the reference image")
    task_defaults: ClassVar[dict[str, Any]] = {
        "guidance_scale": 4.0,
        "energy_scale": 1500.0,
        "guidance_k": 0.04,
        "w_edit": 4.0,
        "w_content": 6.0,
    }
    field_notes: ClassVar[dict[str, str]] = {
        "energy_scale": "lambda (reference 1.5 x 1e3)",
        "guidance_k": "k (reference 4e-2)",
        "w_edit": "weight of the paste energy",
    }

    feature_warp: Literal["nearest", "bilinear"] = Field(
        "nearest",
        description="how the reference features are moved to the destination for the edit "
        "energy: nearest (the release) or bilinear; no measurable difference on the shapes "
        "world (README)",
    )
    object_blend: float = Field(
        0.0, ge=0.0, le=1.0,
        description="fraction of the run (from the start) during which the destination is held "
        "to the reference's moved inversion trajectory; 0 = off (the reference)",
    )

    surgery_space: Literal["latent", "pixel"] = Field(
        "latent",
        description="where the object is pasted for the initial latent and object_blend: "
        "'latent' (the reference's inverted latents moved into place, the release) or 'pixel' "
        "(the object pasted into the image, which is then encoded and inverted with the prompt: "
        "for a VAE whose latents depend on their surroundings, as the shapes model's)",
    )

    resolve_paths, check_paths = path_validators("reference", "reference_mask")


class PasteTask(Task):
    name = "paste"
    version = __version__
    description = "paste an object from a reference image"
    spec_model = PasteSpec
    ui_hints = {"preview": {"kind": "paste", "reference": "reference", "mask": "reference_mask",
                            "offset": "offset", "scale": "scale"}}

    def images(self, spec):
        return {"source": spec.image, "reference": spec.reference}

    def check(self, spec: PasteSpec, input_hw) -> None:
        from diffeditor.imageio import image_size

        check_offset(spec.offset, "offset", input_hw)
        check_mask_file(spec.reference_mask, "reference_mask", image_size(spec.reference, "reference"))

    def plan(self, spec: PasteSpec, images, geom: Geometry) -> EditPlan:
        m_ref = reference_work_mask(spec, geom)
        center = mask_centroid(m_ref, geom.work_hw)
        offset = scale_offset(spec.offset, geom)

        def warp(x, mode="nearest"):
            return similarity_warp(x, geom.work_hw, center, spec.scale, offset, mode)

        fh, lh = geom.feature_hw, geom.latent_hw
        m_ref_f = grid_mask(m_ref, fh)
        m_dst_f = (warp(m_ref_f) > 0.5).float()
        m_dst_l = (warp(grid_mask(m_ref, lh)) > 0.5).float()
        m_dst = (warp(m_ref) > 0.5).float()

        def e_edit(cur, refs):
            rep = refs["reference"]
            return sum(
                inverse_energy(1.0, masked_mean(sim01(cosine_map(f, warp(rep[lv], spec.feature_warp))), m_dst_f))
                for lv, f in cur.items()
            )

        plan_images = {"source": images["source"], "reference": images["reference"]}
        prompts = {"source": spec.prompt, "reference": spec.reference_prompt}
        if spec.surgery_space == "pixel":
            # paste in the image, then let inversion encode the object in its new surroundings
            plan_images["composite"] = m_dst * warp(images["reference"], "bilinear") + (1 - m_dst) * images["source"]
            prompts["composite"] = spec.prompt

            def pasted(zs):
                return zs["composite"]
        else:
            def pasted(zs):
                return warp(zs["reference"])

        def surgery(zt):
            z = zt["source"]
            m = m_dst_l.to(z)
            return m * pasted(zt) + (1 - m) * z

        return EditPlan(
            images=plan_images,
            prompts=prompts,
            regions={"edit": m_dst_l, "content": 1 - m_dst_l},
            energies=[EnergyTerm("edit", e_edit, spec.w_edit, "edit"),
                      EnergyTerm("content", content_energy(m_dst_f), spec.w_content, "content")],
            sde_mask=m_dst_l,
            attention=AttentionPolicy(mode="masked", window=MEMORY_WINDOW,
                                      parts=[("source", 1 - m_dst), ("reference", m_ref)]),
            surgery=surgery,
            masks={"destination": m_dst, "reference_object": m_ref},
            pixel_region=m_dst,
            info={"centroid_in_reference": center, "offset_work_px": offset},
            pins=[Pin(m_dst_l, pasted, spec.object_blend)],
            image_prompt_source="reference",
        )


@hookimpl
def register_tasks(register):
    register(PasteTask())


@hookimpl
def register_bench_scenes(register):
    register(BenchScene("paste", scenes.paste_scene))
