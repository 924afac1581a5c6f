"""Samplers, energies and schedules as extension points: the built-in ones come through the
``diffeditor`` entry-point group; a sampler from an out-of-tree distribution (a real
``.dist-info`` with an ``entry_points.txt`` on ``sys.path``) is found the same way, selected
from a spec and runs an edit on the shapes model."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from conftest import install_distribution, write_disc_scene

from diffeditor.errors import SpecError
from diffeditor.plugins import Registry, get_registry, make_plugin_manager

PLUGIN = '''
"""An out-of-tree sampler: plain DDIM over the edit's denoiser, recording the steps it ran."""
from diffeditor.hookspecs import hookimpl
from diffeditor.samplers import Sampler, make_step
from diffeditor.sampling import regional_step

CALLS = []


def sample(model, z, grid, settings, callback=None):
    for i in range(grid.num_steps):
        step = make_step(grid, i, z.device)
        out = model(z, step)
        z, x0 = regional_step(z, out.eps, step.a_t, step.a_prev)
        z = model.constrain(z, i)
        CALLS.append(i)
        if callback is not None:
            callback(i, z, x0)
    return z


@hookimpl
def register_samplers(register):
    register(Sampler("outside-ddim", sample, "plain DDIM, from outside the package"))
'''


@pytest.fixture
def outside_plugin(tmp_path, monkeypatch):
    """``outside_sampler`` 0.1: a module and its dist-info (entry point ``outside``) in a
    folder on ``sys.path``; yields a registry built from the installed entry points."""
    install_distribution(monkeypatch, tmp_path / "site", "outside-sampler", "outside_sampler",
                         textwrap.dedent(PLUGIN), "outside")
    pm, failures = make_plugin_manager()
    assert not failures, failures
    yield Registry(pm, failures)
    sys.modules.pop("outside_sampler", None)


def test_builtins_register_through_the_entry_point_group():
    reg = get_registry()
    assert {"diffeditor", "dragondiffusion", "ddim"} <= set(reg.samplers)
    assert {"mean_feature", "content"} <= set(reg.energies)
    assert {"diffeditor", "dragondiffusion"} <= set(reg.schedules)
    # through the hooks of the plugin the "kernel" entry point loads, like any plugin's
    kernel = reg.pm.get_plugin("kernel")
    assert kernel is not None and kernel.__name__ == "diffeditor.builtins"
    origins = {impl.plugin for hook in (reg.pm.hook.register_samplers, reg.pm.hook.register_energies,
                                        reg.pm.hook.register_schedules)
               for impl in hook.get_hookimpls()}
    assert kernel in origins


def test_out_of_tree_sampler_is_found_through_the_entry_point(outside_plugin):
    reg = outside_plugin
    assert "outside-ddim" in reg.samplers
    assert reg.pm.get_plugin("outside").__name__ == "outside_sampler"
    assert "outside-ddim" not in get_registry().samplers  # nothing leaked into the global one


def test_unknown_sampler_is_one_clear_line(tmp_path):
    from diffeditor.editor import check_spec
    from diffeditor.specs import parse_spec

    write_disc_scene(tmp_path)
    spec = parse_spec({"task": "move", "image": "i.png", "mask": "m.png", "offset": [4, 0],
                       "sampler": "nope"}, base_dir=tmp_path)
    with pytest.raises(SpecError) as exc:
        check_spec(spec)
    msg = str(exc.value)
    assert msg == ("sampler: unknown sampler 'nope'; installed samplers: ddim, diffeditor, "
                   "dragondiffusion")


def test_a_duplicate_or_wrong_sampler_is_a_plugin_failure():
    from diffeditor.hookspecs import hookimpl
    from diffeditor.plugins import registry_from
    from diffeditor.samplers import DDIM

    class Twice:
        @hookimpl
        def register_samplers(register):
            register(DDIM)
            register(DDIM)

    class NotASampler:
        @hookimpl
        def register_samplers(register):
            register("ddim")

    reg = registry_from([Twice, NotASampler])
    assert list(reg.samplers) == ["ddim"]
    assert [f.error.split(":")[0] for f in reg.failures] == ["ValueError", "TypeError"]


@pytest.mark.slow
def test_out_of_tree_sampler_runs_an_edit_from_a_spec(outside_plugin, editor_shapes, tmp_path,
                                                      monkeypatch):
    """The spec names the plugin's sampler; the edit runs it (every step, in order) and gives
    exactly what the built-in plain DDIM sampler gives (same arithmetic), not DiffEditor's."""
    write_disc_scene(tmp_path)
    monkeypatch.setattr(editor_shapes, "registry", outside_plugin)
    spec = {"task": "move", "image": "i.png", "mask": "m.png", "offset": [20, 0], "steps": 6}
    mod = sys.modules["outside_sampler"]
    mod.CALLS.clear()
    seen = []
    out = editor_shapes.edit({**spec, "sampler": "outside-ddim"}, base_dir=tmp_path,
                             callback=lambda i, z, x0: seen.append(i))
    assert mod.CALLS == list(range(6)) and seen == list(range(6))
    assert out.metadata["spec"]["sampler"] == "outside-ddim"
    ddim = editor_shapes.edit({**spec, "sampler": "ddim"}, base_dir=tmp_path)
    torch.testing.assert_close(out.latent, ddim.latent, atol=0, rtol=0)
    default = editor_shapes.edit(spec, base_dir=tmp_path)
    assert (default.latent - out.latent).abs().max() > 1e-2


def test_schedule_preset_fills_what_the_spec_leaves_out():
    from diffeditor.schedule import BUILTIN_SCHEDULES, Schedule, ScheduleSpec

    spec = ScheduleSpec.model_validate({"preset": "dragondiffusion", "time_travel_repeats": 2})
    resolved = Schedule.resolve(spec.with_preset(BUILTIN_SCHEDULES), 10, BUILTIN_SCHEDULES[
        "diffeditor"].spec.guidance[0])
    assert resolved.guidance == frozenset(range(6))  # the preset's window
    assert resolved.sde == frozenset() and resolved.time_travel_repeats == 2  # the spec's own
    plain = Schedule.resolve(ScheduleSpec().with_preset(BUILTIN_SCHEDULES), 10,
                             BUILTIN_SCHEDULES["diffeditor"].spec.guidance[0])
    assert plain.guidance == frozenset({0, 1, 2, 4}) and plain.sde == frozenset({3})
    with pytest.raises(KeyError, match="unknown schedule preset 'x'; installed: diffeditor, "
                                       "dragondiffusion"):
        ScheduleSpec(preset="x").with_preset(BUILTIN_SCHEDULES)


def test_one_mean_feature_energy():
    """The tasks build their mean-feature terms from the kernel's one implementation."""
    from pathlib import Path

    import diffeditor_tasks

    folder = Path(diffeditor_tasks.__file__).parent
    for path in folder.glob("*.py"):
        text = path.read_text()
        assert "mean_feature(" not in text, path.name
    assert "mean_feature_energy(" in (folder / "move.py").read_text()
    assert "mean_feature_energy(" in (folder / "appearance.py").read_text()


def test_plugins_command_lists_samplers_schedules_and_energies(capsys):
    from diffeditor.cli import main

    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "samplers:     ddim, diffeditor, dragondiffusion" in lines
    assert "schedules:    diffeditor, dragondiffusion" in lines
    assert "energies:     content, mean_feature" in lines
