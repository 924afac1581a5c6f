"""The plugin manager: discovery of tasks, models and commands through pluggy.

Set ``DIFFEDITOR_DISABLE_PLUGINS=1`` to skip entry-point autoloading (tests use it to build a
registry by hand); set ``DIFFEDITOR_PLUGINS=name1,name2`` to load only the named entry points.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs

log = logging.getLogger(__name__)

DISABLE_ENV = "DIFFEDITOR_DISABLE_PLUGINS"
ONLY_ENV = "DIFFEDITOR_PLUGINS"


@dataclass
class PluginFailure:
    """A plugin that raised while loading: reported by name, the others still load."""

    name: str
    distribution: str
    error: str


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    hooks: list[str] = field(default_factory=list)


class Registry:
    """Everything the installed plugins registered: tasks, models and load failures."""

    def __init__(self, pm: pluggy.PluginManager, failures: list[PluginFailure]):
        self.pm = pm
        self.failures = failures
        self.tasks: dict[str, Any] = {}
        self.task_origin: dict[str, PluginInfo] = {}
        self.models: dict[str, Any] = {}
        self._collect()

    # -- collection -------------------------------------------------------------------------
    def _plugin_info(self, plugin: object) -> PluginInfo:
        name = self.pm.get_name(plugin) or repr(plugin)
        dist = self._dists.get(name)
        if dist is None:
            return PluginInfo(name, "(registered in code)", "")
        return PluginInfo(name, dist[0], dist[1])

    def _collect(self) -> None:
        self._dists: dict[str, tuple[str, str]] = getattr(self.pm, "diffeditor_dists", {})
        for impl in self.pm.hook.register_tasks.get_hookimpls():
            info = self._plugin_info(impl.plugin)

            def add_task(task, _info=info):
                from .interfaces import Task

                if not isinstance(task, Task):
                    raise TypeError(
                        f"plugin {_info.name!r} registered {task!r}, which is not a "
                        "diffeditor.interfaces.Task"
                    )
                if task.name in self.tasks:
                    raise ValueError(
                        f"task {task.name!r} is registered twice: by "
                        f"{self.task_origin[task.name].name!r} and by {_info.name!r}"
                    )
                self.tasks[task.name] = task
                self.task_origin[task.name] = _info

            self._call(impl, add_task, info)
        for impl in self.pm.hook.register_models.get_hookimpls():
            info = self._plugin_info(impl.plugin)

            def add_model(entry, _info=info):
                self.models[entry.name] = entry

            self._call(impl, add_model, info)

    def _call(self, impl, register, info: PluginInfo) -> None:
        try:
            # pass arguments by name, so an implementation may take fewer than the spec
            kwargs = {"register": register}
            impl.function(**{name: kwargs[name] for name in impl.argnames})
        except Exception as exc:  # a broken plugin must not take the others down
            log.warning("plugin %s failed while registering: %s", info.name, exc)
            self.failures.append(PluginFailure(info.name, info.distribution, f"{type(exc).__name__}: {exc}"))

    # -- queries ----------------------------------------------------------------------------
    def task(self, name: str):
        try:
            return self.tasks[name]
        except KeyError:
            known = ", ".join(sorted(self.tasks)) or "none"
            raise KeyError(f"unknown task {name!r}; registered tasks: {known}") from None

    def plugins(self) -> list[PluginInfo]:
        out = []
        for plugin in self.pm.get_plugins():
            info = self._plugin_info(plugin)
            info.hooks = sorted(
                h.name for h in self.pm.get_hookcallers(plugin) or [] if not h.name.startswith("_")
            )
            out.append(info)
        return sorted(out, key=lambda p: p.name)


def make_plugin_manager(
    extra_plugins: list[object] | tuple = (), autoload: bool | None = None
) -> tuple[pluggy.PluginManager, list[PluginFailure]]:
    """A plugin manager with the hookspecs, entry points loaded (unless disabled) and checked.

    A plugin that raises while importing is recorded in the returned failure list and skipped.
    A hook implementation whose name matches no hookspec raises
    :class:`pluggy.PluginValidationError` (a misspelled hook is an error, not silence).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    failures: list[PluginFailure] = []
    dists: dict[str, tuple[str, str]] = {}
    pm.diffeditor_dists = dists  # entry-point name -> (distribution, version)
    if autoload is None:
        autoload = os.environ.get(DISABLE_ENV, "").strip() not in ("1", "true", "yes")
    if autoload:
        only = {s.strip() for s in os.environ.get(ONLY_ENV, "").split(",") if s.strip()}
        for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
            if only and ep.name not in only:
                continue
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            dist = getattr(ep, "dist", None)
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
            except pluggy.PluginValidationError:
                raise
            except Exception as exc:
                log.warning("plugin %s could not be loaded: %s", ep.name, exc)
                failures.append(
                    PluginFailure(
                        ep.name,
                        dist.metadata["Name"] if dist is not None else "?",
                        f"{type(exc).__name__}: {exc}",
                    )
                )
                continue
            if dist is not None:
                dists[ep.name] = (dist.metadata["Name"], dist.version)
    for plugin in extra_plugins:
        pm.register(plugin)
    pm.check_pending()
    return pm, failures


_REGISTRY: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None or refresh:
        pm, failures = make_plugin_manager()
        _REGISTRY = Registry(pm, failures)
    return _REGISTRY


def registry_from(plugins: list[object], autoload: bool = False) -> Registry:
    """A registry from the given plugin objects (modules or classes with hookimpls)."""
    pm, failures = make_plugin_manager(plugins, autoload=autoload)
    return Registry(pm, failures)
