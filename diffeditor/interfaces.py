"""The kernel's interfaces: what a task, an energy term and a prompt encoder are (a sampler is a
:class:`diffeditor.samplers.Sampler`, a named energy a :class:`diffeditor.energies.Energy`, a
named schedule a :class:`diffeditor.schedule.NamedSchedule`).

A *task* says **what** to edit: its spec model, its masks, its energy terms, its memory-bank
attention policy, its default schedule and its initial-latent surgery, all bundled in an
:class:`EditPlan`. The kernel (:mod:`diffeditor.engine`) owns **how**: feature extraction,
``autograd``, the regional combination of gradients, device and dtype.

Everything here is plain data and callables: nothing from pydantic or pluggy runs inside the
sampling loop.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from torch import Tensor

from .schedule import Window

if TYPE_CHECKING:  # pragma: no cover
    from .specs import EditSpec

Features = dict[int, Tensor]
"""Decoder features by level (``up_blocks`` index) -> ``(B, C, Hf, Wf)`` on the feature grid."""

EnergyFn = Callable[[Features, dict[str, Features]], Tensor]
"""``fn(current, references) -> (B,)``: an energy of the current latent's features given the
(gradient-free) features of the inverted images, keyed by image name (``"source"``, ...)."""


@dataclass
class EnergyTerm:
    """One energy term: ``weight * fn(current, references)``, minimised by guidance.

    Attributes:
        name: a label for logs and tests (``"edit"``, ``"content"``, ``"contrast"``, ...).
        fn: the energy, one value per batch item; reduced in float32 by the task.
        weight: the term's weight (``w_edit``, ``w_content``, ...). Zero-weight terms are skipped.
        region: the key in :attr:`EditPlan.regions` whose mask this term's gradient is applied
            inside. Terms sharing a region are summed and differentiated once.
    """

    name: str
    fn: EnergyFn
    weight: float = 1.0
    region: str = "edit"


AttentionMode = Literal["replace", "concat", "masked", "off"]


@dataclass
class AttentionPolicy:
    """How the memory bank (decoder self-attention K/V recorded during inversion) is injected.

    * ``replace``: the generation branch attends to the source image's K/V only.
    * ``concat``: it attends to ``[own K/V ; source K/V]``.
    * ``masked``: it attends to the concatenation, over ``parts``, of each named image's K/V at
      the tokens inside that part's mask: for appearance and paste, ``[("source", outside the
      edited object), ("reference", the reference object)]``. Masks are image-resolution and
      resized to each layer's token grid (nearest).
    * ``off``: no injection.
    """

    mode: AttentionMode = "replace"
    window: Window = field(default_factory=lambda: Window(start=0.1, stop=1.0))
    source: str = "source"
    parts: list[tuple[str, Tensor]] = field(default_factory=list)


@dataclass
class Geometry:
    """Sizes of one edit: the input image, the working image, the latent and the feature grid.

    Points given in input-image pixels map to the working image by ``scale_xy``; the feature
    grid is ``feature_scale`` times the latent grid (the reference's ``up_scale = 2``).
    """

    input_hw: tuple[int, int]
    work_hw: tuple[int, int]
    vae_scale: int = 8
    feature_scale: int = 2
    #: the image's own part of the working image (top-left; the rest is padding that makes the
    #: sides a multiple of the model's): ``None`` = all of it
    content_hw: tuple[int, int] | None = None

    @property
    def content(self) -> tuple[int, int]:
        """``(height, width)`` of the image inside the working image (``work_hw`` unpadded)."""
        return tuple(self.content_hw) if self.content_hw is not None else tuple(self.work_hw)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return (self.work_hw[0] // self.vae_scale, self.work_hw[1] // self.vae_scale)

    @property
    def feature_hw(self) -> tuple[int, int]:
        h, w = self.latent_hw
        return (h * self.feature_scale, w * self.feature_scale)

    @property
    def scale_xy(self) -> tuple[float, float]:
        """(sx, sy): working pixels per input pixel along x and y (of the image's own part:
        points keep their place when the working image is padded at the bottom and right)."""
        h, w = self.content
        return (w / self.input_hw[1], h / self.input_hw[0])

    def pixels_per_cell(self, grid: Literal["latent", "feature"]) -> float:
        """Working-image pixels per cell of the latent or feature grid."""
        return self.vae_scale if grid == "latent" else self.vae_scale / self.feature_scale


@dataclass
class Pin:
    """Pin part of the latent to (a function of) the inversion trajectory early in the run:
    after each step ``i < until * N``, ``z = mask * target(z_inv) + (1 - mask) * z`` where
    ``z_inv`` are the inverted latents (by image name) at the new step's noise level."""

    mask: Tensor  # (1, 1, h, w) latent resolution
    target: Callable[[dict[str, Tensor]], Tensor]
    until: float


Surgery = Callable[[dict[str, Tensor]], Tensor]
"""``surgery(z_T by image name) -> z_T``: the initial latent of editing."""


@dataclass
class EditPlan:
    """Everything a task hands to the shared sampler for one edit (plain tensors, no pydantic).

    Attributes:
        images: working-resolution images, ``(1, 3, H, W)`` in [-1, 1], by name; ``"source"``
            is the image being edited, other names (``"reference"``) are inverted beside it.
        prompts: the text prompt of each image (inversion and guidance features).
        regions: latent-resolution masks ``(1, 1, h, w)`` in [0, 1] by region name; each
            energy term's gradient is applied inside its region.
        energies: the energy terms.
        sde_mask: latent-resolution region of the regional SDE (``None`` = everywhere).
        attention: the memory-bank policy.
        surgery: builds the initial latent from the inverted ones (``None`` = source's z_T).
        masks: image-resolution masks the task used, by name, for reporting.
        info: anything else worth reporting (scaled offsets, clipped points...).
        image_prompt_source: which image feeds the image prompt (when the model has one).
        pins: parts of the latent held to the inversion trajectory early in the run.
        pixel_region: optional working-size mask ``(1, 1, H, W)`` of the pixels the edit may
            change at most, on the task's own outline (the object for a recolour, source and
            destination for a move); ``paste_back_region: pixel`` keeps the input's pixels
            outside it (``None``: the latent-grid region is used).
    """

    images: dict[str, Tensor]
    prompts: dict[str, str]
    regions: dict[str, Tensor]
    energies: list[EnergyTerm]
    sde_mask: Tensor | None
    attention: AttentionPolicy
    surgery: Surgery | None = None
    masks: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    image_prompt_source: str = "source"
    pins: list[Pin] = field(default_factory=list)
    pixel_region: Tensor | None = None


class Task(abc.ABC):
    """An editing task. Plugins register instances through the ``register_tasks`` hook.

    Subclasses set ``name``, ``version``, ``description`` and ``spec_model`` (a subclass of
    :class:`diffeditor.specs.EditSpec` whose ``task`` field is ``Literal[name]``) and implement
    :meth:`plan`. :meth:`plan` receives the validated spec, its loaded images and the geometry
    and must not touch the model: the kernel does the rest.

    The order of calls for one edit: :meth:`images` (which files to load), :meth:`check` (before
    any model loads), then :meth:`plan`. Inside the plan's energies the kernel passes *feature
    dictionaries*: ``{level: tensor}``, one entry per decoder ``up_blocks`` index in
    ``spec.feature_levels`` (default 1 and 2), each tensor ``(B, C_level, Hf, Wf)`` on the
    feature grid ``geom.feature_hw`` (``feature_scale`` times the latent grid). ``current`` holds
    the features of the latent being edited (with gradient), ``references[name]`` those of each
    inverted image of ``plan.images`` at the same step (without gradient, batch 1).
    The public helpers in :mod:`diffeditor.masks` (masks on each grid, points in working pixels)
    and :mod:`diffeditor.energies` (cosine maps, masked means, the ``1 / (1 + 4 S)`` form) are
    what the built-in tasks use; :class:`diffeditor.testing.TaskConformance` checks a task.
    """

    name: str
    version: str = "0.0.0"
    description: str = ""
    spec_model: type["EditSpec"]
    #: optional hints for user interfaces (``diffeditor ui``), plain data: ``images`` (field ->
    #: the image field a mask or point list is drawn on; default by name: ``reference_mask`` on
    #: ``reference``, others on ``image``), ``masks`` (extra mask fields), ``main`` (fields shown
    #: outside the "advanced" fold) and ``preview`` (``{"kind": "move" | "paste" | "landmarks",
    #: ...field names}``: a live preview drawn on the image)
    ui_hints: dict[str, Any] = {}

    def images(self, spec: "EditSpec") -> dict[str, Any]:
        """The image files this task needs, by name (``source`` is always ``spec.image``).

        Every name other than ``source`` (e.g. ``reference``) is loaded, inverted beside the
        source and reaches :meth:`plan` in ``images`` and the energies in ``references``."""
        return {"source": spec.image}

    @abc.abstractmethod
    def plan(self, spec: "EditSpec", images: dict[str, Tensor], geom: Geometry) -> EditPlan:
        """Build the edit plan: masks, energies, regions, attention policy and surgery.

        Args:
            spec: the validated spec (paths absolute, model defaults applied).
            images: the files named by :meth:`images`, by the same names, loaded and resized
                to the working size: ``(1, 3, H, W)`` float in [-1, 1] with ``(H, W) =
                geom.work_hw`` (a reference image is resized to the edited image's working size).
            geom: the sizes of this edit (:class:`Geometry`): ``input_hw`` (the user's image,
                in which spec points and offsets are given), ``work_hw`` (what the model sees),
                ``latent_hw`` (``work_hw / vae_scale``: regions, SDE mask, surgery) and
                ``feature_hw`` (energies' masks). Map points with ``geom.scale_xy``.

        Put into ``EditPlan.info`` what a user needs to read the result (scaled points,
        centroids, areas): it is written to the sidecar's ``plan``.
        """

    def check(self, spec: "EditSpec", input_hw: tuple[int, int]) -> None:
        """Cross-checks that need the image size (points inside the image, mask sizes).

        Raise :class:`diffeditor.errors.SpecError` naming the field. Runs before any model
        loads. The default does nothing.
        """
        return None


class TextPromptEncoder(abc.ABC):
    """A text prompt encoder: turns prompts into the UNet's cross-attention conditioning.

    Registered through :func:`diffeditor.hookspecs.register_prompt_encoders`; a spec selects it
    by ``name`` (``text_encoder: NAME``). The built-in one is ``clip`` (the model's own CLIP
    text model and tokenizer).
    """

    kind: ClassVar[str] = "text"
    name: str = ""
    description: str = ""

    @abc.abstractmethod
    def encode(self, engine: Any, prompts: list[str]) -> Tensor:
        """``(len(prompts), tokens, cross_attention_dim)`` embeddings for ``engine``'s UNet
        (any dtype and device: the engine moves them). Called without gradients; the engine
        caches the result per (encoder, prompt)."""


class ImagePromptAdapter(abc.ABC):
    """An image prompt: a reference image's tokens added to the UNet's cross-attention.

    Registered through :func:`diffeditor.hookspecs.register_prompt_encoders`; a spec selects it
    by ``name`` (``image_encoder: NAME``). The built-in one is ``ip-adapter`` (the paper's
    IP-Adapter-style image prompt, :mod:`diffeditor.image_prompt`).
    """

    kind: ClassVar[str] = "image"
    name: str = ""
    description: str = ""

    @abc.abstractmethod
    def load(self, engine: Any, weights: str, encoder: str) -> Any:
        """Attach the image prompt to ``engine``'s UNet and return the runtime the engine
        drives: ``set_image(image)``, ``set_scale(gamma)``, ``added_cond_kwargs(batch,
        cond_rows)`` and ``detach()``."""


PromptEncoder = TextPromptEncoder | ImagePromptAdapter
"""Either kind of prompt encoder: what ``register_prompt_encoders`` accepts (checked with
``isinstance(obj, PromptEncoder)``) and :meth:`diffeditor.plugins.Registry.prompt_encoder`
returns."""


@dataclass
class BenchScene:
    """A scene ``diffeditor bench`` times: ``build(size, folder)`` writes the images into
    ``folder`` and returns a spec dict of ``task`` on them (paths relative to ``folder``).
    ``default``: the scene ``bench`` times when no ``--task`` is given (one plugin sets it)."""

    task: str
    build: Callable[[int, Any], dict]
    default: bool = False
