"""The diffeditor plugin: registers the packaged ``shapes-ldm`` pipeline as model ``shapes``."""

from __future__ import annotations

from diffeditor.hookspecs import hookimpl
from diffeditor.models import ModelEntry, read_model_card

from . import MODEL_DIR

MODEL_NAME = "shapes"

#: Defaults measured on this model with ``diffeditor eval shapes`` (see the project README's
#: quality section) live in the model folder's ``diffeditor.json``, so that ``--model shapes``
#: and ``--model path/to/this/folder`` (or a copy) behave the same: the reference's CFG 4-5
#: makes this small model mix up colours of two-object prompts, and DDIM paths from an edited
#: initial latent drift on it, so the background is pinned to the inversion trajectory and the
#: vacated area starts from the background latent. SD 1.5 keeps the reference's defaults.


def model_entry() -> ModelEntry:
    """The :class:`~diffeditor.models.ModelEntry` of the packaged model (its folder's card;
    its fields are checked when the folder is named as a path, and by the tests)."""
    card = read_model_card(MODEL_DIR, check_fields=False)
    return ModelEntry(name=MODEL_NAME, location=str(MODEL_DIR), description=card.description,
                      defaults=card.defaults, image_prompt=card.image_prompt)


@hookimpl
def register_models(register):
    """Register the ``shapes`` model."""
    register(model_entry())


@hookimpl
def register_commands(subparsers):
    """Add ``diffeditor demo`` and ``diffeditor shapes scene``."""
    from .demo import add_demo_command
    from .scene_command import add_shapes_commands

    add_demo_command(subparsers)
    add_shapes_commands(subparsers)
