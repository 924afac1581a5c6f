"""The diffeditor plugin: gives ``diffeditor edit --ray`` its runner (``register_commands``)."""

from __future__ import annotations

from diffeditor.hookspecs import hookimpl


def _runner(todo, known, args, total):
    from .runner import run

    return run(todo, known, args, total)


@hookimpl
def register_commands(subparsers):
    """``diffeditor edit`` owns the --ray options; this plugin supplies what runs them."""
    edit = subparsers.choices.get("edit")
    if edit is not None:
        edit.set_defaults(ray_runner=_runner)
