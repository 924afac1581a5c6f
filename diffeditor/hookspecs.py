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
def register_commands(subparsers):
    """Add sub-commands to the ``diffeditor`` command line.

    ``subparsers`` is the :mod:`argparse` sub-parser action of the top-level parser. Add a
    parser with ``subparsers.add_parser(name, help=...)`` and give it a handler with
    ``parser.set_defaults(func=handler)``; ``handler(args)`` returns the exit status.
    """
