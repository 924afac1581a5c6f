"""Step schedules: when guidance, regional SDE, time travel, the image prompt and the memory
bank are active.

A window is a half-open range of *fractions of the run* plus a stride: step index ``i`` of an
``N``-step run is inside ``Window(start, stop, every)`` when ``ceil(start*N) <= i < ceil(stop*N)``
and ``i % every == 0``. This is the one place where fractions become step indices.

For ``N = 50`` the reference's hard-coded windows are reproduced exactly:

=============  ===================================  ===============================
mechanism      reference code                       window(s)
=============  ===================================  ===============================
guidance       ``i < 30 and (i < 10 or i % 2 == 0)``  ``[0, 0.2)`` and ``[0.2, 0.6)/2``
regional SDE   ``10 < i < 20``                      ``[0.22, 0.4)``
time travel    ``20 < i < 30 and i % 2 == 0``, U=3  ``[0.42, 0.6)/2``, repeats 3
image prompt   ``10 <= i < 20``                     ``[0.2, 0.4)``
memory bank    move/drag/face ``i >= 5``            ``[0.1, 1.0]``
               appearance/paste ``i <= 35``         ``[0, 0.72)``
=============  ===================================  ===============================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

_EPS = 1e-9


class Window(BaseModel):
    """Steps ``i`` with ``ceil(start*N) <= i < ceil(stop*N)`` and ``i % every == 0``.

    ``stop = 1.0`` includes the last step. Give ``steps`` (explicit 0-based indices) instead to
    pin exact indices regardless of the step count.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    start: float = Field(0.0, ge=0.0, le=1.0, description="first step, as a fraction of the run")
    stop: float = Field(1.0, ge=0.0, le=1.0, description="end (exclusive), as a fraction of the run")
    every: int = Field(1, ge=1, le=1000, description="keep only step indices divisible by this")
    steps: tuple[int, ...] | None = Field(
        None, description="explicit 0-based step indices; overrides start/stop/every"
    )

    @model_validator(mode="after")
    def _ordered(self) -> "Window":
        if self.start > self.stop:
            raise ValueError(f"start ({self.start}) must not exceed stop ({self.stop})")
        if self.steps is not None and any(s < 0 for s in self.steps):
            raise ValueError("explicit steps must be >= 0")
        return self

    def indices(self, num_steps: int) -> list[int]:
        """The sorted, in-range step indices of this window for a run of ``num_steps``."""
        if num_steps <= 0:
            return []
        if self.steps is not None:
            return sorted({s for s in self.steps if s < num_steps})
        lo = math.ceil(self.start * num_steps - _EPS)
        hi = math.ceil(self.stop * num_steps - _EPS)
        return [i for i in range(max(lo, 0), min(hi, num_steps)) if i % self.every == 0]


def union_indices(windows: list[Window] | tuple[Window, ...], num_steps: int) -> list[int]:
    """Sorted union of several windows' indices."""
    out: set[int] = set()
    for w in windows:
        out.update(w.indices(num_steps))
    return sorted(out)


class ScheduleSpec(BaseModel):
    """When each mechanism is active (spec-level, validated). Defaults are the reference's."""

    model_config = ConfigDict(extra="forbid")

    guidance: tuple[Window, ...] = Field(
        (Window(start=0.0, stop=0.2), Window(start=0.2, stop=0.6, every=2)),
        description="steps that get score-based gradient guidance (union of windows)",
    )
    sde: Window = Field(
        Window(start=0.22, stop=0.4), description="steps sampled with the regional SDE"
    )
    time_travel: Window = Field(
        Window(start=0.42, stop=0.6, every=2), description="steps that are repeated by time travel"
    )
    time_travel_repeats: int = Field(
        3, ge=1, le=20, description="guided evaluations per time-travel step (U)"
    )
    image_prompt: Window = Field(
        Window(start=0.2, stop=0.4), description="steps where the image prompt is added (gamma)"
    )
    memory_bank: Window | None = Field(
        None, description="steps where the memory bank is injected; default: the task's own"
    )
    preset: str | None = Field(
        None, description="a named schedule (diffeditor schedules: see `diffeditor plugins`) "
        "whose windows serve for every field this spec leaves out; default: the fields' defaults",
    )

    def with_preset(self, presets: dict[str, NamedSchedule]) -> ScheduleSpec:
        """This schedule with the fields it leaves out taken from its named ``preset``.
        Raises ``KeyError`` (one line, listing the known names) for an unknown name."""
        if self.preset is None:
            return self
        if self.preset not in presets:
            known = ", ".join(sorted(presets)) or "none"
            raise KeyError(f"unknown schedule preset {self.preset!r}; installed: {known}")
        base = presets[self.preset].spec
        given = {k: getattr(self, k) for k in self.model_fields_set if k != "preset"}
        return base.model_copy(update={**given, "preset": None})


@dataclass(frozen=True)
class NamedSchedule:
    """A registered schedule (hook ``register_schedules``): named windows a spec selects with
    ``schedule: {preset: NAME}`` and a sampler may read (DragonDiffusion's guidance window)."""

    name: str
    spec: ScheduleSpec
    description: str = ""


@dataclass(frozen=True)
class Schedule:
    """A :class:`ScheduleSpec` resolved to step-index sets for one run (plain data, no pydantic
    inside the loop)."""

    num_steps: int
    guidance: frozenset[int]
    sde: frozenset[int]
    time_travel: frozenset[int]
    time_travel_repeats: int
    image_prompt: frozenset[int]
    memory_bank: frozenset[int]

    @classmethod
    def resolve(cls, spec: ScheduleSpec, num_steps: int, memory_bank: Window) -> "Schedule":
        bank = spec.memory_bank if spec.memory_bank is not None else memory_bank
        return cls(
            num_steps=num_steps,
            guidance=frozenset(union_indices(spec.guidance, num_steps)),
            sde=frozenset(spec.sde.indices(num_steps)),
            time_travel=frozenset(spec.time_travel.indices(num_steps)),
            time_travel_repeats=spec.time_travel_repeats,
            image_prompt=frozenset(spec.image_prompt.indices(num_steps)),
            memory_bank=frozenset(bank.indices(num_steps)),
        )

    def passes(self, i: int) -> int:
        """Guided evaluations at step ``i``: U inside the time-travel window, else 1."""
        return self.time_travel_repeats if (i in self.time_travel and i in self.guidance) else 1


BUILTIN_SCHEDULES: dict[str, NamedSchedule] = {
    "diffeditor": NamedSchedule(
        "diffeditor", ScheduleSpec(), "the reference's windows (the table above; the default)"),
    "dragondiffusion": NamedSchedule(
        "dragondiffusion",
        ScheduleSpec(guidance=(Window(start=0.0, stop=0.6),), sde=Window(start=0.0, stop=0.0),
                     time_travel=Window(start=0.0, stop=0.0), time_travel_repeats=1,
                     image_prompt=Window(start=0.0, stop=0.0)),
        "DragonDiffusion's: guidance at every step of the first 60%; no SDE, time travel or "
        "image prompt"),
}
