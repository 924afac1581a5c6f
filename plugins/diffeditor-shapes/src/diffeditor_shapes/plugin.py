"""The diffeditor plugin: registers the packaged ``shapes-ldm`` pipeline as model ``shapes``."""

from __future__ import annotations

from diffeditor.hookspecs import hookimpl
from diffeditor.models import ModelEntry

from . import MODEL_DIR

MODEL_NAME = "shapes"


def model_entry() -> ModelEntry:
    """The :class:`~diffeditor.models.ModelEntry` of the packaged model."""
    return ModelEntry(
        name=MODEL_NAME,
        location=str(MODEL_DIR),
        description=(
            "shapes-ldm: a small trained SD-1.5-layout latent diffusion model of 128x128 "
            "procedural shapes scenes (CPU-fast; for tests, demos and ground-truth benchmarks)"
        ),
        defaults={"resolution": 128},
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
