"""The plugin manager (diffeditor.plugins): discovery, validation and failure isolation."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from typing import Literal

import pytest

from diffeditor import plugins as plugins_mod
from diffeditor.hookspecs import hookimpl
from diffeditor.interfaces import AttentionPolicy, EditPlan, Task
from diffeditor.plugins import DISABLE_ENV, ONLY_ENV, make_plugin_manager, registry_from
from diffeditor.specs import EditSpec


class DummySpec(EditSpec):
    task: Literal["dummy"] = "dummy"


class DummyTask(Task):
    version = "1.2.3"
    description = "does nothing"
    spec_model = DummySpec

    def __init__(self, name: str = "dummy"):
        self.name = name

    def plan(self, spec, images, geom):
        return EditPlan(images=images, prompts={}, regions={}, energies=[], sde_mask=None,
                        attention=AttentionPolicy(mode="off"))


# -- plugins as classes with hook implementations (pluggy names them by __name__) --------------

class AlphaPlugin:
    @staticmethod
    @hookimpl
    def register_tasks(register):
        register(DummyTask("alpha"))
        register(DummyTask("alpha2"))


class BetaPlugin:
    @staticmethod
    @hookimpl
    def register_tasks(register):
        register(DummyTask("beta"))


class BrokenPlugin:
    @staticmethod
    @hookimpl
    def register_tasks(register):
        raise RuntimeError("boom in broken plugin")


class NotATaskPlugin:
    @staticmethod
    @hookimpl
    def register_tasks(register):
        register("not a task")


class DuplicatePlugin:
    @staticmethod
    @hookimpl
    def register_tasks(register):
        register(DummyTask("beta"))


class MisspelledPlugin:
    @staticmethod
    @hookimpl
    def register_taks(register):  # the misspelling is the point
        register(DummyTask("never"))


class WrongArgumentPlugin:
    @staticmethod
    @hookimpl
    def register_tasks(registr):
        registr(DummyTask("never"))


class NoArgumentPlugin:
    """A hook may take fewer arguments than its spec."""

    @staticmethod
    @hookimpl
    def register_models():
        pass


class ModelPlugin:
    @staticmethod
    @hookimpl
    def register_models(register):
        from types import SimpleNamespace

        register(SimpleNamespace(name="tiny"))


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.delenv(ONLY_ENV, raising=False)


# -- registration ----------------------------------------------------------------------------

def test_registry_collects_tasks():
    reg = registry_from([AlphaPlugin, BetaPlugin])
    assert reg.failures == []
    assert sorted(reg.tasks) == ["alpha", "alpha2", "beta"]
    assert all(isinstance(t, DummyTask) for t in reg.tasks.values())
    assert reg.task("beta").name == "beta"
    assert reg.task_origin["alpha"].name == "AlphaPlugin"
    assert reg.task_origin["beta"].name == "BetaPlugin"
    assert reg.task_origin["beta"].distribution == "(registered in code)"
    names = [p.name for p in reg.plugins()]
    assert names == sorted(names) and {"AlphaPlugin", "BetaPlugin"} <= set(names)
    alpha = next(p for p in reg.plugins() if p.name == "AlphaPlugin")
    assert alpha.hooks == ["register_tasks"]


def test_unknown_task_lists_the_registered_ones():
    reg = registry_from([BetaPlugin])
    with pytest.raises(KeyError, match="beta"):
        reg.task("gamma")


def test_registered_tasks_validate_their_specs(tmp_path):
    img = tmp_path / "x.png"
    img.write_bytes(b"")
    reg = registry_from([BetaPlugin])
    spec = reg.task("beta").spec_model.model_validate({"image": str(img)})
    assert spec.task == "dummy" and spec.steps == 50


def test_models_are_collected():
    reg = registry_from([ModelPlugin, BetaPlugin])
    assert list(reg.models) == ["tiny"] and list(reg.tasks) == ["beta"]
    assert reg.failures == []


def test_fewer_arguments_than_the_spec_are_allowed():
    reg = registry_from([ModelPlugin, NoArgumentPlugin])
    assert list(reg.models) == ["tiny"]
    assert reg.failures == []


def test_misspelled_hook_is_reported_and_the_plugin_skipped():
    reg = registry_from([AlphaPlugin, MisspelledPlugin, BetaPlugin])
    assert sorted(reg.tasks) == ["alpha", "alpha2", "beta"]
    assert [f.name for f in reg.failures] == ["MisspelledPlugin"]
    error = reg.failures[0].error
    assert "register_taks" in error and "did you mean 'register_tasks'" in error
    assert "MisspelledPlugin" not in {p.name for p in reg.plugins()}


def test_wrong_argument_name_is_reported_and_the_plugin_skipped():
    reg = registry_from([WrongArgumentPlugin, BetaPlugin])
    assert list(reg.tasks) == ["beta"]
    assert [f.name for f in reg.failures] == ["WrongArgumentPlugin"]
    assert "registr" in reg.failures[0].error


def test_raising_plugin_is_recorded_and_others_load():
    reg = registry_from([AlphaPlugin, BrokenPlugin, BetaPlugin])
    assert sorted(reg.tasks) == ["alpha", "alpha2", "beta"]
    assert [f.name for f in reg.failures] == ["BrokenPlugin"]
    f = reg.failures[0]
    assert "RuntimeError" in f.error and "boom in broken plugin" in f.error
    assert f.distribution == "(registered in code)"


def test_non_task_registration_is_a_failure():
    reg = registry_from([NotATaskPlugin, BetaPlugin])
    assert list(reg.tasks) == ["beta"]
    assert [f.name for f in reg.failures] == ["NotATaskPlugin"]
    assert "TypeError" in reg.failures[0].error
    assert "not a" in reg.failures[0].error and "Task" in reg.failures[0].error


def test_duplicate_task_name_is_reported():
    reg = registry_from([BetaPlugin, DuplicatePlugin])
    assert list(reg.tasks) == ["beta"]
    assert len(reg.failures) == 1
    f = reg.failures[0]
    winner = reg.task_origin["beta"].name
    loser = ({"BetaPlugin", "DuplicatePlugin"} - {winner}).pop()
    assert f.name == loser
    assert "ValueError" in f.error and "'beta'" in f.error
    assert "BetaPlugin" in f.error and "DuplicatePlugin" in f.error


# -- entry points ------------------------------------------------------------------------------

GOOD_MODULE = """
from diffeditor.hookspecs import hookimpl
from {test_module} import DummyTask

@hookimpl
def register_tasks(register):
    register(DummyTask("{task}"))
"""


@pytest.fixture
def fake_entry_points(tmp_path, monkeypatch):
    """Write real plugin modules into tmp_path and serve entry points for them."""
    modules = {
        "dfe_good_plugin_one": GOOD_MODULE.format(test_module=__name__, task="ep_one"),
        "dfe_good_plugin_two": GOOD_MODULE.format(test_module=__name__, task="ep_two"),
        "dfe_raising_plugin": "raise ImportError('this plugin is broken on import')\n",
        "dfe_misspelled_plugin": textwrap.dedent(
            """
            from diffeditor.hookspecs import hookimpl

            @hookimpl
            def register_taks(register):
                pass
            """
        ),
    }
    for name, src in modules.items():
        (tmp_path / f"{name}.py").write_text(src)
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    EP = importlib.metadata.EntryPoint
    eps = {
        "one": EP(name="one", value="dfe_good_plugin_one", group="diffeditor"),
        "missing": EP(name="missing", value="some_module_that_does_not_exist", group="diffeditor"),
        "raising": EP(name="raising", value="dfe_raising_plugin", group="diffeditor"),
        "two": EP(name="two", value="dfe_good_plugin_two", group="diffeditor"),
        "misspelled": EP(name="misspelled", value="dfe_misspelled_plugin", group="diffeditor"),
    }
    served: dict = {"names": ["one", "missing", "raising", "two"], "calls": []}

    def entry_points(**kw):
        served["calls"].append(kw)
        assert kw.get("group") == "diffeditor"
        return [eps[n] for n in served["names"]]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    yield served
    for name in modules:
        sys.modules.pop(name, None)


def test_entry_point_failures_are_reported_by_name(fake_entry_points):
    pm, failures = make_plugin_manager()
    assert fake_entry_points["calls"], "entry points were not consulted"
    assert sorted(f.name for f in failures) == ["missing", "raising"]
    by_name = {f.name: f for f in failures}
    assert "ModuleNotFoundError" in by_name["missing"].error
    assert "some_module_that_does_not_exist" in by_name["missing"].error
    assert "ImportError" in by_name["raising"].error
    assert "broken on import" in by_name["raising"].error
    assert all(f.distribution == "?" for f in failures)
    assert pm.get_plugin("one") is not None and pm.get_plugin("two") is not None
    assert pm.get_plugin("missing") is None

    from diffeditor.plugins import Registry

    reg = Registry(pm, failures)
    assert sorted(reg.tasks) == ["ep_one", "ep_two"]
    assert reg.task_origin["ep_one"].name == "one"
    assert sorted(f.name for f in reg.failures) == ["missing", "raising"]


def test_registry_from_with_autoload_adds_code_plugins(fake_entry_points):
    reg = registry_from([BetaPlugin], autoload=True)
    assert sorted(reg.tasks) == ["beta", "ep_one", "ep_two"]
    assert sorted(f.name for f in reg.failures) == ["missing", "raising"]


def test_registry_from_does_not_autoload_by_default(fake_entry_points):
    reg = registry_from([BetaPlugin])
    assert list(reg.tasks) == ["beta"] and reg.failures == []
    assert fake_entry_points["calls"] == []


@pytest.mark.parametrize("value", ["1", "true", "yes", " 1 "])
def test_disable_env_stops_autoloading(fake_entry_points, monkeypatch, value):
    monkeypatch.setenv(DISABLE_ENV, value)
    pm, failures = make_plugin_manager()
    assert failures == []  # not even the broken ones were imported
    # consulted for diffeditor's own tasks only (none among these third-party entry points)
    assert pm.get_plugin("one") is None and pm.get_plugin("two") is None
    from diffeditor.plugins import Registry

    assert Registry(pm, failures).tasks == {}


@pytest.mark.parametrize("value", ["", "0", "no"])
def test_disable_env_other_values_autoload(fake_entry_points, monkeypatch, value):
    monkeypatch.setenv(DISABLE_ENV, value)
    pm, failures = make_plugin_manager()
    assert pm.get_plugin("one") is not None


def test_explicit_autoload_overrides_env(fake_entry_points, monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "1")
    pm, _ = make_plugin_manager(autoload=True)
    assert pm.get_plugin("one") is not None
    monkeypatch.delenv(DISABLE_ENV)
    pm, _ = make_plugin_manager(autoload=False)
    assert pm.get_plugin("one") is None


def test_only_env_selects_entry_points(fake_entry_points, monkeypatch):
    monkeypatch.setenv(ONLY_ENV, "two, missing")
    pm, failures = make_plugin_manager()
    assert pm.get_plugin("two") is not None and pm.get_plugin("one") is None
    assert [f.name for f in failures] == ["missing"]


def test_misspelled_hook_in_entry_point_is_skipped(fake_entry_points):
    fake_entry_points["names"] = ["one", "misspelled", "two"]
    pm, failures = make_plugin_manager()
    assert [f.name for f in failures] == ["misspelled"]
    assert "register_taks" in failures[0].error
    assert pm.get_plugin("misspelled") is None
    from diffeditor.plugins import Registry

    assert sorted(Registry(pm, failures).tasks) == ["ep_one", "ep_two"]


def test_only_env_naming_no_plugin_is_reported(fake_entry_points, monkeypatch):
    monkeypatch.setenv(ONLY_ENV, "bogus")
    pm, failures = make_plugin_manager()
    assert [f.name for f in failures] == ["bogus"]
    assert "no installed plugin" in failures[0].error and "one" in failures[0].error
    assert pm.get_plugin("one") is None


def _cli(env: dict, *args) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "diffeditor.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)


def test_cli_reports_a_broken_plugin_once_and_runs(tmp_path):
    """A third-party plugin with a misspelled hook and one that fails to import: each is
    reported in one line, once, and every command still works (a real installed distribution)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "dfe_typo_plugin.py").write_text(
        "from diffeditor.hookspecs import hookimpl\n\n@hookimpl\ndef register_taks(register):\n    pass\n")
    (site / "dfe_crash_plugin.py").write_text("raise ImportError('broken on import')\n")
    (site / "dfe_cmdfail_plugin.py").write_text(
        "from diffeditor.hookspecs import hookimpl\n\n@hookimpl\ndef register_commands(subparsers):\n"
        "    raise RuntimeError('no commands today')\n")
    dist = site / "dfe_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dfe-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[diffeditor]\ntypo = dfe_typo_plugin\ncrash = dfe_crash_plugin\ncmdfail = dfe_cmdfail_plugin\n")
    env = {"PYTHONPATH": str(site), "DIFFEDITOR_DISABLE_PLUGINS": "", "DIFFEDITOR_PLUGINS": ""}
    res = _cli(env, "tasks")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert "move" in res.stdout
    lines = res.stderr.strip().splitlines()
    assert len([ln for ln in lines if "'typo'" in ln]) == 1, res.stderr
    assert len([ln for ln in lines if "'crash'" in ln]) == 1, res.stderr
    assert len([ln for ln in lines if "'cmdfail'" in ln]) == 1, res.stderr
    assert "register_taks" in res.stderr and "broken on import" in res.stderr
    assert "no commands today" in res.stderr
    # the same with the environment switch: third-party plugins off, built-in tasks still there
    res = _cli({**env, "DIFFEDITOR_DISABLE_PLUGINS": "1"}, "tasks")
    assert res.returncode == 0 and "move" in res.stdout and "typo" not in res.stderr
    assert "DIFFEDITOR_DISABLE_PLUGINS" in res.stderr


def test_cli_plugins_env_naming_nothing_is_reported():
    res = _cli({"DIFFEDITOR_PLUGINS": "bogus", "DIFFEDITOR_DISABLE_PLUGINS": ""}, "tasks")
    assert res.returncode == 0 and "drag" in res.stdout
    assert "'bogus'" in res.stderr and "no installed plugin" in res.stderr


def test_get_registry_is_cached_and_refreshable(fake_entry_points, monkeypatch):
    monkeypatch.setattr(plugins_mod, "_REGISTRY", None)
    reg = plugins_mod.get_registry()
    assert plugins_mod.get_registry() is reg
    assert sorted(reg.tasks) == ["ep_one", "ep_two"]
    fresh = plugins_mod.get_registry(refresh=True)
    assert fresh is not reg and sorted(fresh.tasks) == ["ep_one", "ep_two"]


DUP_TASK_MODULE = """
from typing import Literal
from diffeditor.hookspecs import hookimpl
from diffeditor.interfaces import Task
from diffeditor.specs import EditSpec

class S(EditSpec):
    task: Literal[{name!r}] = {name!r}

class T(Task):
    version = "6.6.6"
    description = "duptask"
    spec_model = S

    def plan(self, spec, images, geom):
        raise RuntimeError("the plugin's plan ran")
    name = {name!r}

class U(Task):
    version = "6.6.6"
    description = "duptask"
    spec_model = S

    def plan(self, spec, images, geom):
        raise RuntimeError("the plugin's plan ran")
    name = {extra!r}

@hookimpl
def register_tasks(register):
    register(U())
    register(T())
"""


def test_a_plugin_cannot_take_a_built_in_name(tmp_path):
    """Issue 31, case 4: a third-party task named ``move`` (and an entry point named ``move``,
    installed before diffeditor on the path) is refused in one line naming both distributions;
    the built-in move stays, and nothing else of the refused plugin is registered."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "dfe_duptask_plugin.py").write_text(DUP_TASK_MODULE.format(name="move", extra="dupextra"))
    (site / "dfe_dupname_plugin.py").write_text(DUP_TASK_MODULE.format(name="sneaky", extra="sneaky2"))
    dist = site / "dfe_duptask-6.6.6.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dfe-duptask\nVersion: 6.6.6\n")
    (dist / "entry_points.txt").write_text(
        "[diffeditor]\nduptask = dfe_duptask_plugin\nmove = dfe_dupname_plugin\n")
    env = {"PYTHONPATH": str(site), "DIFFEDITOR_DISABLE_PLUGINS": "", "DIFFEDITOR_PLUGINS": ""}
    res = _cli(env, "tasks")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    rows = {ln.split()[0]: ln.split()[1:3] for ln in res.stdout.splitlines()}
    assert rows["move"] == ["0.1.0", "diffeditor"]
    assert not {"dupextra", "sneaky", "sneaky2"} & set(rows)
    lines = res.stderr.strip().splitlines()
    dup = [ln for ln in lines if "'duptask'" in ln]
    assert len(dup) == 1 and "task 'move' is registered twice" in dup[0], res.stderr
    assert "(diffeditor 0." in dup[0] and "(dfe-duptask 6.6.6)" in dup[0]
    name = [ln for ln in lines if "entry point 'move'" in ln]
    assert len(name) == 1 and "dfe-duptask" in name[0] and "diffeditor" in name[0], res.stderr


class LateMovePlugin:
    """Registered in code, ordered by pluggy before the built-ins (``trylast``)."""

    @staticmethod
    @hookimpl(trylast=True)
    def register_tasks(register):
        register(DummyTask("dupextra"))
        register(DummyTask("move"))


def test_a_code_plugin_cannot_take_a_built_in_name():
    reg = registry_from([LateMovePlugin], autoload=True)
    assert reg.task_origin["move"].distribution == "diffeditor"
    assert type(reg.tasks["move"]).__module__ == "diffeditor_tasks.move"
    assert "dupextra" not in reg.tasks
    (f,) = [f for f in reg.failures if f.name == "LateMovePlugin"]
    assert "task 'move' is registered twice" in f.error and "(registered in code)" in f.error
