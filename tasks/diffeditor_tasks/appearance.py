"""Appearance replacing (DiffEditor §4.2): give the object under ``mask`` the appearance of the
object under ``reference_mask`` in ``reference``.

Image tokens: the reference passes 128 image tokens and lets the base image's 64 go through the
*text* projections (method reference §2.4, a quirk). Here the image prompt is the reference
image alone (64 tokens through the image projections), and the text path sees only text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from diffeditor.energies import content_energy, mean_feature_energy
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
from diffeditor.masks import check_mask_file, grid_mask, reference_work_mask, work_mask
from diffeditor.schedule import Window
from diffeditor.specs import EditSpec, path_validators

from . import __version__, scenes

MEMORY_WINDOW = Window(start=0.0, stop=0.72)  # reference: i <= 35 of 50


def match_statistics(z: torch.Tensor, mask: torch.Tensor, ref: torch.Tensor, ref_mask: torch.Tensor):
    """``z`` with its values under ``mask`` given the per-channel mean and standard deviation
    of ``ref`` under ``ref_mask`` (AdaIN restricted to two regions); elsewhere unchanged."""
    def stats(x, m):
        w = m.to(x) / m.sum().clamp_min(1)
        mean = (x * w).sum((-2, -1), keepdim=True)
        var = (((x - mean) ** 2) * w).sum((-2, -1), keepdim=True)
        return mean, var.sqrt()

    mu, sd = stats(z, mask)
    mu_r, sd_r = stats(ref, ref_mask)
    out = (z - mu) / (sd + 1e-5) * sd_r + mu_r
    m = mask.to(z)
    return m * out + (1 - m) * z


class AppearanceSpec(EditSpec):
    """Replace the appearance of an object with that of a reference object."""

    task: Literal["appearance"] = "appearance"
    bank_parts: ClassVar[bool] = True  # the source outside the object, the reference object
    mask: Path = Field(description="the object to change (white), same size as the image")
    reference: Path = Field(description="the image holding the reference object")
    reference_mask: Path = Field(description="the reference object (white), reference's size")
    reference_prompt: str = Field("", description="text prompt describing the reference image")
    task_defaults: ClassVar[dict[str, Any]] = {
        "guidance_scale": 5.0,
        "energy_scale": 2000.0,
        "guidance_k": 0.04,
        "w_edit": 3.5,
        "w_content": 5.0,
    }
    field_notes: ClassVar[dict[str, str]] = {
        "energy_scale": "lambda (reference 2 x 1e3)",
        "guidance_k": "k (reference 4e-2)",
        "w_edit": "weight of the appearance energy",
    }

    object_blend: float = Field(
        0.0, ge=0.0, le=1.0,
        description="not in the reference: start the object recoloured with the reference "
        "object's statistics (per-channel mean and spread, see surgery_space) and hold it to that "
        "trajectory for this fraction of the run (from the start); 0 = off (the reference)",
    )
    surgery_space: Literal["latent", "pixel"] = Field(
        "latent",
        description="where object_blend recolours: 'latent' (the inverted latents) or 'pixel' "
        "(the image, which is then encoded and inverted with the prompt: for a VAE whose latents "
        "depend on their surroundings, as the shapes model's)",
    )

    resolve_paths, check_paths = path_validators("mask", "reference", "reference_mask")


class AppearanceTask(Task):
    name = "appearance"
    version = __version__
    description = "replace an object's appearance with a reference object's"
    spec_model = AppearanceSpec

    def images(self, spec):
        return {"source": spec.image, "reference": spec.reference}

    def check(self, spec: AppearanceSpec, input_hw) -> None:
        from diffeditor.imageio import image_size

        check_mask_file(spec.mask, "mask", input_hw)
        check_mask_file(spec.reference_mask, "reference_mask", image_size(spec.reference, "reference"))

    def plan(self, spec: AppearanceSpec, images, geom: Geometry) -> EditPlan:
        m_base = work_mask(spec.mask, "mask", geom)
        m_rep = reference_work_mask(spec, geom)
        fh, lh = geom.feature_hw, geom.latent_hw
        m_base_f, m_rep_f = grid_mask(m_base, fh), grid_mask(m_rep, fh)
        m_base_l = grid_mask(m_base, lh)

        e_edit = mean_feature_energy(m_base_f, "reference", m_rep_f)

        m_rep_l = grid_mask(m_rep, lh)
        plan_images = {"source": images["source"], "reference": images["reference"]}
        prompts = {"source": spec.prompt, "reference": spec.reference_prompt}
        if spec.object_blend > 0 and spec.surgery_space == "pixel":
            # recolour the image, then let inversion encode it in context
            plan_images["composite"] = match_statistics(images["source"], m_base, images["reference"], m_rep)
            prompts["composite"] = spec.prompt

            def recoloured(zs):
                m = m_base_l.to(zs["source"])
                return m * zs["composite"] + (1 - m) * zs["source"]
        else:
            def recoloured(zs):
                return match_statistics(zs["source"], m_base_l, zs["reference"], m_rep_l)

        return EditPlan(
            images=plan_images,
            prompts=prompts,
            regions={"edit": m_base_l, "content": 1 - m_base_l},
            surgery=recoloured if spec.object_blend > 0 else None,
            pins=[Pin(m_base_l, recoloured, spec.object_blend)],
            energies=[EnergyTerm("edit", e_edit, spec.w_edit, "edit"),
                      EnergyTerm("content", content_energy(m_base_f), spec.w_content, "content")],
            sde_mask=m_base_l,
            attention=AttentionPolicy(mode="masked", window=MEMORY_WINDOW,
                                      parts=[("source", 1 - m_base), ("reference", m_rep)]),
            masks={"object": m_base, "reference_object": m_rep},
            pixel_region=m_base,
            info={"object_area_work_px": int(m_base.sum()),
                  "reference_object_area_work_px": int(m_rep.sum()),
                  "memory_window": [MEMORY_WINDOW.start, MEMORY_WINDOW.stop]},
            image_prompt_source="reference",
        )


@hookimpl
def register_tasks(register):
    register(AppearanceTask())


@hookimpl
def register_bench_scenes(register):
    register(BenchScene("appearance", scenes.appearance_scene))
