"""The plugin manager: discovery of tasks, models, prompt encoders, bench scenes and commands
through pluggy.

diffeditor's own tasks (the ``diffeditor`` distribution's entry points: move, drag, appearance,
paste, face, compose) always load when entry points are loaded. The environment selects among the
*other* plugins: ``DIFFEDITOR_DISABLE_PLUGINS=1`` loads none of them (to rule a third-party
plugin out as the cause of a problem), ``DIFFEDITOR_PLUGINS=name1,name2`` only the named entry
points (a name that no installed plugin has is reported). :func:`registry_from` builds a
registry by hand, with no entry points unless asked.

A plugin that fails to import, or whose hook implementations do not match the hook
specifications (a misspelled hook name, a wrong argument name), is skipped and recorded in
``Registry.failures``; the process-wide registry reports each failure once, as a logged warning.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs

if TYPE_CHECKING:  # pragma: no cover
    from .interfaces import PromptEncoder

log = logging.getLogger(__name__)

DISABLE_ENV = "DIFFEDITOR_DISABLE_PLUGINS"
ONLY_ENV = "DIFFEDITOR_PLUGINS"
BUILTIN_DIST = "diffeditor"
"""The distribution whose entry points (the first-party tasks) load whatever the environment says."""
BUILTIN_ENCODERS = "prompt-encoders"
"""The entry-point name of the built-in prompt encoders (``clip``, ``ip-adapter``): registered
even in a registry built by hand, so that every registry can encode a prompt."""


class BuiltinNameClash(ValueError):
    """A plugin registered a task under the name of one of diffeditor's own tasks."""


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
        self.samplers: dict[str, Any] = {}
        self.energies: dict[str, Any] = {}
        self.schedules: dict[str, Any] = {}
        #: prompt encoders by kind ("text", "image") and name
        self.prompt_encoders: dict[str, dict[str, Any]] = {"text": {}, "image": {}}
        #: ``diffeditor bench`` scenes by task name
        self.bench_scenes: dict[str, Any] = {}
        self._collect()

    # -- collection -------------------------------------------------------------------------
    def _plugin_info(self, plugin: object) -> PluginInfo:
        name = self.pm.get_name(plugin) or repr(plugin)
        dist = self._dists.get(name)
        if dist is None:
            return PluginInfo(name, "(registered in code)", "")
        return PluginInfo(name, dist[0], dist[1])

    def _impls(self, hook) -> list:
        """``hook``'s implementations, diffeditor's own first (so that a plugin reusing a
        built-in name is the one refused, whatever order pluggy or the entry points give)."""
        return sorted(hook.get_hookimpls(),
                      key=lambda impl: self._plugin_info(impl.plugin).distribution != BUILTIN_DIST)

    def _collect(self) -> None:
        self._dists: dict[str, tuple[str, str]] = getattr(self.pm, "diffeditor_dists", {})
        for impl in self._impls(self.pm.hook.register_tasks):
            info = self._plugin_info(impl.plugin)

            def add_task(task, _info=info):
                from .interfaces import Task

                if not isinstance(task, Task):
                    raise TypeError(
                        f"plugin {_info.name!r} registered {task!r}, which is not a "
                        "diffeditor.interfaces.Task"
                    )
                from pydantic import BaseModel  # not .specs: specs imports this module

                model = getattr(task, "spec_model", None)
                if not (isinstance(model, type) and issubclass(model, BaseModel)
                        and "task" in model.model_fields):
                    raise TypeError(
                        f"task {getattr(task, 'name', '?')!r} of plugin {_info.name!r}: "
                        f"spec_model is {model!r}, not a subclass of diffeditor.specs.EditSpec")
                if not isinstance(getattr(task, "name", None), str) or not task.name:
                    raise TypeError(f"plugin {_info.name!r} registered a task with no name")
                if task.name in self.tasks:
                    first = self.task_origin[task.name]
                    clash = (BuiltinNameClash if first.distribution == BUILTIN_DIST
                             and _info.distribution != BUILTIN_DIST else ValueError)
                    raise clash(
                        f"task {task.name!r} is registered twice: by {first.name!r} "
                        f"({_dist_label(first)}) and by {_info.name!r} ({_dist_label(_info)}); "
                        f"the first is kept, rename the task in {_info.distribution}"
                    )
                self.tasks[task.name] = task
                self.task_origin[task.name] = _info

            self._call(impl, add_task, info)
        for impl in self._impls(self.pm.hook.register_models):
            info = self._plugin_info(impl.plugin)

            def add_model(entry, _info=info):
                self.models[entry.name] = entry

            self._call(impl, add_model, info)
        from .energies import Energy
        from .samplers import Sampler
        from .schedule import NamedSchedule

        for hook, store, kind, what in (
                (self.pm.hook.register_samplers, self.samplers, Sampler, "sampler"),
                (self.pm.hook.register_energies, self.energies, Energy, "energy"),
                (self.pm.hook.register_schedules, self.schedules, NamedSchedule, "schedule")):
            for impl in self._impls(hook):
                self._call(impl, self._adder(store, kind, what, self._plugin_info(impl.plugin)),
                           self._plugin_info(impl.plugin))

        for impl in self._impls(self.pm.hook.register_prompt_encoders):
            info = self._plugin_info(impl.plugin)

            def add_encoder(encoder, _info=info):
                from .interfaces import PromptEncoder

                if not isinstance(encoder, PromptEncoder):
                    raise TypeError(
                        f"plugin {_info.name!r} registered {encoder!r}, which is neither a "
                        "diffeditor.interfaces.TextPromptEncoder nor an ImagePromptAdapter")
                table = self.prompt_encoders[encoder.kind]
                if not encoder.name or encoder.name in table:
                    raise ValueError(f"{encoder.kind} prompt encoder {encoder.name!r} is registered "
                                     f"twice or has no name (plugin {_info.name!r})")
                table[encoder.name] = encoder

            self._call(impl, add_encoder, info)
        for impl in self._impls(self.pm.hook.register_bench_scenes):
            info = self._plugin_info(impl.plugin)

            def add_scene(scene, _info=info):
                self.bench_scenes[scene.task] = scene

            self._call(impl, add_scene, info)

    @staticmethod
    def _adder(store: dict, kind: type, what: str, info: PluginInfo):
        """``register(obj)`` for one plugin's samplers, energies or schedules: type-checked,
        names unique across plugins."""
        def add(obj):
            if not isinstance(obj, kind):
                raise TypeError(f"plugin {info.name!r} registered {obj!r}, which is not a "
                                f"{kind.__module__}.{kind.__name__}")
            if obj.name in store:
                raise ValueError(f"{what} {obj.name!r} is registered twice (again by {info.name!r})")
            store[obj.name] = obj
        return add

    def _stores(self) -> list[dict]:
        return [self.tasks, self.task_origin, self.models, self.samplers, self.energies,
                self.schedules, self.bench_scenes, *self.prompt_encoders.values()]

    def _call(self, impl, register, info: PluginInfo) -> None:
        before = [dict(store) for store in self._stores()]
        try:
            # pass arguments by name, so an implementation may take fewer than the spec
            kwargs = {"register": register}
            impl.function(**{name: kwargs[name] for name in impl.argnames})
        except Exception as exc:  # a broken plugin must not take the others down
            if isinstance(exc, BuiltinNameClash):
                # a plugin that tries to take a built-in task's name keeps nothing of this call
                # (other failures keep what was registered before them, as always)
                for store, old in zip(self._stores(), before):
                    store.clear()
                    store.update(old)
            log.debug("plugin %s failed while registering: %s", info.name, exc)
            self.failures.append(PluginFailure(info.name, info.distribution, f"{type(exc).__name__}: {exc}"))

    # -- queries ----------------------------------------------------------------------------
    def task(self, name: str):
        try:
            return self.tasks[name]
        except KeyError:
            known = ", ".join(sorted(self.tasks)) or "none"
            raise KeyError(f"unknown task {name!r}; registered tasks: {known}") from None

    def sampler(self, name: str):
        """The sampler registered as ``name``; ``KeyError`` (one line, listing the installed
        ones) if there is none."""
        try:
            return self.samplers[name]
        except KeyError:
            known = ", ".join(sorted(self.samplers)) or "none"
            raise KeyError(f"unknown sampler {name!r}; installed samplers: {known}") from None

    def prompt_encoder(self, name: str, kind: str = "text") -> PromptEncoder:
        """The registered ``kind`` ("text" or "image") prompt encoder called ``name``; an unknown
        name is a one-line :class:`KeyError` listing the installed ones."""
        table = self.prompt_encoders[kind]
        try:
            return table[name]
        except KeyError:
            known = ", ".join(sorted(table)) or "none"
            raise KeyError(f"unknown {kind} prompt encoder {name!r}; installed {kind} encoders: "
                           f"{known}") from None

    def plugins(self) -> list[PluginInfo]:
        out = []
        for plugin in self.pm.get_plugins():
            info = self._plugin_info(plugin)
            info.hooks = sorted(
                h.name for h in self.pm.get_hookcallers(plugin) or [] if not h.name.startswith("_")
            )
            out.append(info)
        return sorted(out, key=lambda p: p.name)


def _dist_label(info: PluginInfo) -> str:
    return f"{info.distribution} {info.version}".strip()


def make_plugin_manager(
    extra_plugins: list[object] | tuple = (), autoload: bool | None = None
) -> tuple[pluggy.PluginManager, list[PluginFailure]]:
    """A plugin manager with the hookspecs, entry points loaded (unless disabled) and checked.

    A plugin that raises while importing, or whose hook implementations match no hook
    specification (a misspelled hook is an error, not silence), is recorded in the returned
    failure list and skipped; the others load.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    failures: list[PluginFailure] = []
    dists: dict[str, tuple[str, str]] = {}
    pm.diffeditor_dists = dists  # entry-point name -> (distribution, version)
    third_party = autoload is True or (
        os.environ.get(DISABLE_ENV, "").strip().lower() not in ("1", "true", "yes"))
    autoload = True if autoload is None else autoload
    only = {s.strip() for s in os.environ.get(ONLY_ENV, "").split(",") if s.strip()}
    if autoload:
        seen: set[str] = set()
        eps = list(importlib.metadata.entry_points(group=hookspecs.PROJECT))
        # diffeditor's own entry points first: a plugin cannot take a built-in's name
        eps.sort(key=lambda ep: _ep_dist(ep) != BUILTIN_DIST)
        for ep in eps:
            dist = getattr(ep, "dist", None)
            dist_name = _ep_dist(ep)
            seen.add(ep.name)
            if dist_name != BUILTIN_DIST and (not third_party or (only and ep.name not in only)):
                continue
            if pm.is_blocked(ep.name):
                continue
            if pm.get_plugin(ep.name) is not None:
                if dists.get(ep.name, ("?",))[0] != dist_name:  # not the same one listed twice
                    first = dists.get(ep.name, ("?", ""))
                    failures.append(PluginFailure(
                        ep.name, dist_name, f"ValueError: entry point {ep.name!r} of "
                        f"{dist_name} has the name of one of {first[0]} {first[1]}".rstrip()
                        + f"; the first is kept, rename it in {dist_name}"))
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                log.debug("plugin %s could not be loaded: %s", ep.name, exc)
                failures.append(PluginFailure(ep.name, dist_name, f"{type(exc).__name__}: {exc}"))
                continue
            if _register_checked(pm, plugin, ep.name, dist_name, failures) and dist is not None:
                dists[ep.name] = (dist_name, dist.version)
        if third_party:
            for name in sorted(only - seen):
                failures.append(PluginFailure(
                    name, "not installed", f"{ONLY_ENV} names {name!r}, but no installed plugin has that "
                    f"entry-point name (installed: {', '.join(sorted(seen)) or 'none'})"))
    if pm.get_plugin(BUILTIN_ENCODERS) is None:  # a registry built by hand: still has clip
        from . import encoders

        _register_checked(pm, encoders, BUILTIN_ENCODERS, BUILTIN_DIST, failures)
    for plugin in extra_plugins:
        _register_checked(pm, plugin, None, "(registered in code)", failures)
    return pm, failures


def _ep_dist(ep) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "?"


def _hook_names() -> list[str]:
    return sorted(n for n in vars(hookspecs) if n.startswith("register_"))


def _register_checked(pm, plugin, name, dist_name: str, failures: list[PluginFailure]) -> bool:
    """Register ``plugin``; if its hooks do not match the specifications, unregister it and
    record why (a misspelled hook name, a wrong argument name). Returns whether it stayed."""
    label = name or getattr(plugin, "__name__", repr(plugin))
    try:
        pm.register(plugin, name=name)
        unknown = sorted(hc.name for hc in pm.get_hookcallers(plugin) or [] if not hc.has_spec())
    except pluggy.PluginValidationError as exc:
        if pm.is_registered(plugin):
            pm.unregister(plugin)
        failures.append(PluginFailure(label, dist_name, f"PluginValidationError: {_first_line(exc)}"))
        return False
    if unknown:
        pm.unregister(plugin)
        import difflib

        hints = []
        for u in unknown:
            close = difflib.get_close_matches(u, _hook_names(), n=1)
            hints.append(f"{u!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        failures.append(PluginFailure(
            label, dist_name, f"PluginValidationError: unknown hook {', '.join(hints)}; the hooks "
            f"are {', '.join(_hook_names())}"))
        return False
    return True


def _first_line(exc: BaseException) -> str:
    """The exception's message on one line."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return "; ".join(lines) if lines else type(exc).__name__


_REGISTRY: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry of the installed plugins, built on first use.

    Only the edges use it as a default (the command line, :class:`diffeditor.Editor` when it is
    given no registry, the conformance kit and the pytest fixture); everything inside is handed a
    registry explicitly."""
    global _REGISTRY
    if _REGISTRY is None or refresh:
        pm, failures = make_plugin_manager()
        _REGISTRY = Registry(pm, failures)
        for f in _REGISTRY.failures:  # reported once, here; the plugin was skipped
            log.warning("plugin %r (%s) skipped: %s", f.name, f.distribution, f.error)
    return _REGISTRY


def default_registry(registry: Registry | None = None) -> Registry:
    """``registry``, or the process-wide one when it is ``None``: the one place a public
    function's ``registry=None`` becomes the installed plugins' registry."""
    return registry if registry is not None else get_registry()


def registry_from(plugins: list[object], autoload: bool = False) -> Registry:
    """A registry from the given plugin objects (modules or classes with hookimpls)."""
    pm, failures = make_plugin_manager(plugins, autoload=autoload)
    return Registry(pm, failures)
