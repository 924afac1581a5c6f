"""The diffeditor plugin: registers the packaged ``shapes-ldm`` pipeline as model ``shapes``."""

from __future__ import annotations

from diffeditor.hookspecs import hookimpl
from diffeditor.models import ModelEntry

from . import MODEL_DIR

MODEL_NAME = "shapes"

#: Defaults measured on this model with ``diffeditor eval shapes`` (see the project README's
#: quality section): the reference's CFG 4-5 makes this small model mix up colours of
#: two-object prompts, and DDIM paths from an edited initial latent drift on it, so the
#: background is pinned to the inversion trajectory and the vacated area starts from the
#: background latent. SD 1.5 keeps the reference's defaults.
SHAPES_DEFAULTS = {
    "resolution": 128,
    "guidance_scale": 1.0,
    "background_blend": 1.0,
    "move.vacated_init": "background",
    "resize.vacated_init": "background",
    "move.energy_scale": 1000.0,
    "resize.energy_scale": 1000.0,
    "move.object_blend": 0.5,
    "resize.object_blend": 0.5,
    "paste.object_blend": 0.5,
}


def model_entry() -> ModelEntry:
    """The :class:`~diffeditor.models.ModelEntry` of the packaged model."""
    return ModelEntry(
        name=MODEL_NAME,
        location=str(MODEL_DIR),
        description=(
            "shapes-ldm: a small trained SD-1.5-layout latent diffusion model of 128x128 "
            "procedural shapes scenes (CPU-fast; for tests, demos and ground-truth benchmarks)"
        ),
        defaults=SHAPES_DEFAULTS,
    )


@hookimpl
def register_models(register):
    """Register the ``shapes`` model."""
    register(model_entry())


@hookimpl
def register_commands(subparsers):
    """Add ``diffeditor demo``."""
    from .demo import add_demo_command

    add_demo_command(subparsers)
