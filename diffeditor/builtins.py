"""diffeditor's own samplers, energies and schedules, registered through the same hooks (and
the same ``diffeditor`` entry-point group, entry point ``kernel``) as a third party's."""

from __future__ import annotations

from .hookspecs import hookimpl


@hookimpl
def register_samplers(register):
    from .samplers import BUILTIN_SAMPLERS

    for sampler in BUILTIN_SAMPLERS.values():
        register(sampler)


@hookimpl
def register_energies(register):
    from .energies import BUILTIN_ENERGIES

    for energy in BUILTIN_ENERGIES.values():
        register(energy)


@hookimpl
def register_schedules(register):
    from .schedule import BUILTIN_SCHEDULES

    for schedule in BUILTIN_SCHEDULES.values():
        register(schedule)
