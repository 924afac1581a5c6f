"""The hook specifications of diffeditor: the whole plugin API in one module.

Plugins are discovered through the ``diffeditor`` entry-point group. The first-party tasks in
``tasks/`` register through that same group, exactly as a third party's plugin would.

Hooks are for *discovery*; the registered objects carry the behaviour (see
:mod:`diffeditor.interfaces`). Nothing goes through pluggy inside the sampling loop.

A hook implementation may accept fewer arguments than its specification, so hooks can grow new
arguments without breaking existing plugins. A misspelled hook implementation (or a wrong
argument name) is an error: the plugin is skipped and the failure reported once.
"""

from __future__ import annotations

import pluggy

PROJECT = "diffeditor"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_tasks(register):
    """Register editing tasks.

    Call ``register(task)`` once per task, where ``task`` is an instance of
    :class:`diffeditor.interfaces.Task` (its ``name`` must be unique across all plugins).
    """


@hookspec
def register_models(register):
    """Register named models.

    Call ``register(entry)`` with a :class:`diffeditor.models.ModelEntry`: a short name users
    pass to ``--model`` (for example ``shapes``), where the weights live (a local folder or a hub
    id), and per-model defaults for spec fields (for example a smaller working resolution).
    """


@hookspec
def register_commands(subparsers, registry):
    """Add sub-commands to the ``diffeditor`` command line.

    ``subparsers`` is the :mod:`argparse` sub-parser action of the top-level parser. Add a
    parser with ``subparsers.add_parser(name, help=...)`` and give it a handler with
    ``parser.set_defaults(func=handler)``; ``handler(args)`` returns the exit status.
    ``registry`` is the command line's :class:`diffeditor.plugins.Registry` (tasks, models,
    ...); the handler finds the same one in ``args.registry``.
    """


@hookspec
def register_prompt_encoders(register):
    """Register prompt encoders: what turns a spec's prompt (text) or a reference image (image)
    into the UNet's conditioning.

    Call ``register(encoder)`` with an instance of
    :class:`diffeditor.interfaces.TextPromptEncoder` (its ``encode(engine, prompts)`` returns
    ``(B, tokens, cross_attention_dim)`` embeddings) or of
    :class:`diffeditor.interfaces.ImagePromptAdapter` (its ``load(engine, weights, encoder)``
    attaches an image prompt to the engine's UNet). The ``name`` is unique per kind; a spec
    selects one with ``text_encoder: NAME`` / ``image_encoder: NAME``. The built-in ``clip``
    text encoder and ``ip-adapter`` image prompt register through this hook too.
    """


@hookspec
def register_bench_scenes(register):
    """Register the scenes ``diffeditor bench`` can time.

    Call ``register(scene)`` with a :class:`diffeditor.interfaces.BenchScene`: a task name and
    ``build(size, folder) -> spec dict`` that writes the scene's images into ``folder`` and
    returns a spec of that task on them (paths relative to ``folder``). Task plugins register a
    scene for their task; ``diffeditor bench --task NAME`` picks it.
    """


@hookspec
def register_samplers(register):
    """Register samplers, called once when the registry is built.

    Call ``register(sampler)`` once per sampler, where ``sampler`` is a
    :class:`diffeditor.samplers.Sampler`: a unique ``name`` (what a spec's ``sampler`` field
    selects), a one-line ``description``, and ``fn(model, z, grid, settings, callback=None)``
    returning the final latent. ``model(z, step)`` is the edit's denoiser (CFG, memory bank,
    image prompt, regional guidance; :mod:`diffeditor.denoisers`), ``grid`` the DDIM timesteps,
    ``settings`` the spec's resolved values; call ``callback(i, z, x0)`` after each step.
    Optional ``configure(settings, schedules) -> settings`` adjusts the settings first.
    Return nothing. diffeditor's own ``diffeditor`` (the default), ``dragondiffusion`` and
    ``ddim`` register through this hook.
    """


@hookspec
def register_energies(register):
    """Register named energy terms that task plugins and spec files can refer to.

    Call ``register(energy)`` once per energy, where ``energy`` is a
    :class:`diffeditor.energies.Energy` with a unique ``name``, a one-line ``description`` and:

    * ``build(**params) -> fn``, for task code: ``fn(current_features, reference_features) ->
      (B,)`` energies to minimise (an :data:`diffeditor.interfaces.EnergyFn`, the ``fn`` of an
      :class:`~diffeditor.interfaces.EnergyTerm`); ``params`` are whatever the energy needs
      (masks on the feature grid, image names).
    * ``from_spec(ctx, **params) -> fn`` (optional), for spec files: a spec's
      ``energies: [{name: NAME, weight: W, region: R, params: {...}}]`` adds the term
      ``W * fn`` to the task's own terms, its gradient applied inside region ``R`` (``edit``,
      ``content`` or ``global``; default: the energy's ``region``). ``ctx`` is a
      :class:`diffeditor.energies.EnergyContext`: ``ctx.regions`` holds the edit's masks on the
      feature grid, ``(1, 1, Hf, Wf)`` float {0, 1}: ``edit`` (the region being edited),
      ``content`` (the region to keep, ``1 - edit``), ``global`` (everywhere) and the task's
      other regions by name (``ctx.region(name)`` checks the name); ``ctx.images`` names the
      inverted images whose features reach ``fn`` (``"source"``, and e.g. ``"reference"``;
      ``ctx.image(name)`` checks one); ``ctx.geom`` the sizes. ``params`` are the spec's JSON
      values: names and numbers, never tensors. Raise ``ValueError`` for a bad value; the
      spec's params are checked against the signature before any model loads. An energy
      without ``from_spec`` cannot be named in a spec.

    Return nothing. diffeditor's ``mean_feature`` and ``content`` register through this hook.
    """


@hookspec
def register_schedules(register):
    """Register named schedules (step windows), called once when the registry is built.

    Call ``register(schedule)`` once per schedule, where ``schedule`` is a
    :class:`diffeditor.schedule.NamedSchedule`: a unique ``name``, a ``ScheduleSpec`` (when
    guidance, the SDE, time travel, the image prompt and the memory bank apply) and a
    ``description``. A spec selects one with ``schedule: {preset: NAME}`` (fields it gives
    itself win); samplers may read them (DragonDiffusion's guidance window). Return nothing.
    diffeditor's ``diffeditor`` and ``dragondiffusion`` schedules register through this hook.
    """
