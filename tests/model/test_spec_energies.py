"""Energies named in spec files (field ``energies``), and the acceptance check of the kernel
issue: an out-of-tree sampler, prompt encoder and energy, installed as a real distribution (a
``.dist-info`` with an ``entry_points.txt`` on ``sys.path``), selected from one spec, run an
edit on the shapes model."""

from __future__ import annotations

import logging
import sys
import textwrap

import pytest
import torch
from conftest import install_distribution, write_disc_scene

from diffeditor.errors import SpecError
from diffeditor.specs import parse_spec

PLUGIN = '''
"""Out-of-tree kernel plugins: a guided DDIM sampler, a text encoder (CLIP x 0.5) and an
energy (the squared features inside a region), each recording that it ran."""
from diffeditor.encoders import ClipTextEncoder
from diffeditor.energies import Energy, masked_mean
from diffeditor.hookspecs import hookimpl
from diffeditor.interfaces import TextPromptEncoder
from diffeditor.samplers import Sampler, make_step
from diffeditor.sampling import regional_step

STEPS, PROMPTS, BUILDS, ENERGY_CALLS = [], [], [], []


def sample(model, z, grid, settings, callback=None):
    for i in range(grid.num_steps):
        step = make_step(grid, i, z.device, guided=i in settings.schedule.guidance)
        out = model(z, step)
        z, x0 = regional_step(z, out.eps, step.a_t, step.a_prev, eps_hat=out.eps_hat)
        z = model.constrain(z, i)
        STEPS.append(i)
        if callback is not None:
            callback(i, z, x0)
    return z


class HalfClip(TextPromptEncoder):
    name = "outside-clip"
    description = "CLIP text embeddings times 0.5"

    def encode(self, engine, prompts):
        PROMPTS.extend(prompts)
        return ClipTextEncoder().encode(engine, prompts) * 0.5


def energy_from_spec(ctx, region="edit", power=2.0):
    mask = ctx.region(region)
    BUILDS.append((ctx, region, power))

    def energy(cur, refs):
        ENERGY_CALLS.append(sorted(refs))
        return sum(masked_mean(f.float().abs().pow(power).mean(1), mask) for f in cur.values())

    return energy


def energy_build(mask, power=2.0):
    raise AssertionError("a spec-named energy is built with from_spec")


@hookimpl
def register_samplers(register):
    register(Sampler("outside-guided", sample, "guided DDIM, from outside the package"))


@hookimpl
def register_prompt_encoders(register):
    register(HalfClip())


@hookimpl
def register_energies(register):
    register(Energy("outside-power", energy_build, "mean |f|^power in a region",
                    energy_from_spec, "edit"))
'''


@pytest.fixture
def outside(tmp_path, monkeypatch):
    """``outside_kernel`` 0.1: a module and its dist-info (entry point ``outside``) on
    ``sys.path``; yields (registry built from the installed entry points, the module)."""
    from diffeditor.plugins import Registry, make_plugin_manager

    install_distribution(monkeypatch, tmp_path / "site", "outside-kernel", "outside_kernel",
                         textwrap.dedent(PLUGIN), "outside")
    monkeypatch.delenv("DIFFEDITOR_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("DIFFEDITOR_PLUGINS", raising=False)
    pm, failures = make_plugin_manager()
    assert not failures, failures
    reg = Registry(pm, failures)
    yield reg, sys.modules["outside_kernel"]
    sys.modules.pop("outside_kernel", None)


@pytest.fixture
def disc(tmp_path):
    write_disc_scene(tmp_path)
    return tmp_path


MOVE = {"task": "move", "image": "i.png", "mask": "m.png", "offset": [20, 0], "steps": 5,
        "seed": 3, "prompt": "a red square on a gray background"}


def _edit(editor, disc, **extra):
    return editor.edit({**MOVE, **extra}, base_dir=disc)


# -- the spec field ------------------------------------------------------------------------------

def test_energies_default_to_none_and_round_trip(disc):
    spec = parse_spec(MOVE, base_dir=disc)
    assert spec.energies == []
    data = {**MOVE, "energies": [{"name": "content", "weight": 2.0, "region": "global",
                                  "params": {"reference": "source"}}]}
    spec = parse_spec(data, base_dir=disc)
    dumped = spec.model_dump(mode="json")["energies"]
    assert dumped == [{"name": "content", "weight": 2.0, "region": "global",
                       "params": {"reference": "source"}}]
    assert parse_spec({**MOVE, "energies": dumped}, base_dir=disc) == spec


def test_unknown_energy_is_one_line_listing_the_installed_ones(disc):
    with pytest.raises(SpecError) as exc:
        parse_spec({**MOVE, "energies": [{"name": "content"}, {"name": "nope"}]}, base_dir=disc)
    assert str(exc.value) == ("spec: energies[1]: unknown energy 'nope'; installed energies: "
                              "content, mean_feature")


def test_unknown_energy_on_the_command_line_loads_no_model(disc, capsys, monkeypatch):
    import yaml

    from diffeditor import editor as editor_module
    from diffeditor.cli import main

    def no_model(*a, **k):
        raise AssertionError("a model was loaded for a spec that names an unknown energy")

    monkeypatch.setattr(editor_module, "load_pipeline", no_model)
    (disc / "s.yaml").write_text(yaml.safe_dump({**MOVE, "energies": [{"name": "nope"}]}))
    rc = main(["edit", str(disc / "s.yaml"), "--model", "shapes", "--out", str(disc / "o.png")])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "unknown energy" in ln]
    assert len(lines) == 1 and "installed energies: content, mean_feature" in lines[0]
    assert not (disc / "o.png").exists()


def test_wrong_params_are_refused_naming_what_the_energy_takes(disc):
    with pytest.raises(SpecError, match=r"^spec: energies\[0\]: energy 'content': got an "
                                        r"unexpected keyword argument 'mask'; it takes reference$"):
        parse_spec({**MOVE, "energies": [{"name": "content", "params": {"mask": "edit"}}]},
                   base_dir=disc)
    with pytest.raises(SpecError, match=r"energies\.0\.region: Input should be 'edit', "
                                        r"'content' or 'global'"):
        parse_spec({**MOVE, "energies": [{"name": "content", "region": "inside"}]}, base_dir=disc)


def test_compose_takes_energies_on_the_composed_spec_only(disc):
    edit = {"task": "move", "mask": "m.png", "offset": [20, 0]}
    spec = parse_spec({"task": "compose", "image": "i.png", "edits": [edit],
                       "energies": [{"name": "content"}]}, base_dir=disc)
    assert [u.name for u in spec.energies] == ["content"]
    with pytest.raises(SpecError, match=r"edits\[0\]\.energies: set energies on the compose "
                                        r"spec"):
        parse_spec({"task": "compose", "image": "i.png",
                    "edits": [{**edit, "energies": [{"name": "content"}]}]}, base_dir=disc)


def test_spec_energies_join_the_plan_after_the_tasks_own(disc):
    """The task's own terms are unchanged; each named one follows with its weight and region;
    the context's masks are the plan's regions on the feature grid."""
    from diffeditor.energies import BUILTIN_ENERGIES, add_spec_energies, spec_context
    from diffeditor.interfaces import Geometry
    from diffeditor.masks import grid_mask
    from diffeditor.plugins import get_registry

    reg = get_registry()
    spec = parse_spec({**MOVE, "energies": [
        {"name": "content", "weight": 2.5},
        {"name": "mean_feature", "region": "global", "params": {"reference_mask": "global"}}]},
        base_dir=disc)
    geom = Geometry((128, 128), (128, 128), 8, 2)
    images = {"source": torch.zeros(1, 3, 128, 128)}
    task = reg.task("move")
    own = task.plan(spec, images, geom)
    plan = add_spec_energies(own, spec.energies, BUILTIN_ENERGIES, geom)
    assert plan.energies[:len(own.energies)] == own.energies
    added = plan.energies[len(own.energies):]
    assert [(t.name, t.weight, t.region) for t in added] == [
        ("content[0]", 2.5, "content"), ("mean_feature[1]", 1.0, "global")]
    assert set(plan.regions) == {"edit", "content", "global"}
    assert torch.equal(plan.regions["global"], torch.ones(1, 1, 16, 16))
    ctx = spec_context(own, geom)
    assert torch.equal(ctx.edit, grid_mask(own.regions["edit"], (32, 32)))
    assert torch.equal(ctx.content, 1 - ctx.edit) and ctx.edit.sum() > 0
    assert ctx.images == ("source",)
    # the content term is the kernel's content energy around the edit region
    feats = {1: torch.randn(1, 4, 32, 32), 2: torch.randn(1, 4, 32, 32)}
    refs = {"source": {1: torch.randn(1, 4, 32, 32), 2: torch.randn(1, 4, 32, 32)}}
    expect = BUILTIN_ENERGIES["content"].build(ctx.edit)(feats, refs)
    torch.testing.assert_close(added[0].fn(feats, refs), expect, rtol=0, atol=0)
    assert add_spec_energies(own, [], BUILTIN_ENERGIES, geom) is own
    with pytest.raises(ValueError, match=r"energies\[0\]: energy 'mean_feature'.*no image "
                                         r"'reference'; this edit's images: source"):
        bad = parse_spec({**MOVE, "energies": [{"name": "mean_feature",
                                                "params": {"reference": "reference"}}]},
                         base_dir=disc)
        add_spec_energies(own, bad.energies, BUILTIN_ENERGIES, geom)


def test_face_has_no_content_weight_and_old_specs_still_load(disc, caplog):
    spec = {"task": "face", "image": "i.png", "reference": "i.png"}
    face = parse_spec(spec, base_dir=disc)
    assert "w_content" not in type(face).model_fields
    assert "w_content" not in face.model_dump()
    with caplog.at_level(logging.WARNING, logger="diffeditor.specs"):
        old = parse_spec({**spec, "w_content": 0.0}, base_dir=disc)
    assert old == face
    assert "'w_content' is deprecated for task 'face'" in caplog.text
    # the tasks with a content energy keep it, with their own defaults
    assert parse_spec(MOVE, base_dir=disc).w_content == 6.0


# -- edits on the shapes model -------------------------------------------------------------------

def test_content_energy_from_a_spec_changes_the_edit_and_weight_zero_does_not(editor, disc):
    base = _edit(editor, disc)
    zero = _edit(editor, disc, energies=[{"name": "content", "weight": 0.0}])
    assert torch.equal(zero.latent, base.latent)
    more = _edit(editor, disc, energies=[{"name": "content", "weight": 2.0}])
    assert (more.latent - base.latent).abs().max() > 1e-3
    assert more.metadata["spec"]["energies"] == [
        {"name": "content", "weight": 2.0, "region": None, "params": {}}]


def test_out_of_tree_energy_is_selected_from_a_spec_and_called(outside, editor, disc,
                                                                monkeypatch):
    reg, mod = outside
    assert "outside-power" in reg.energies
    assert "outside-power" not in __import__("diffeditor.plugins").plugins.get_registry().energies
    monkeypatch.setattr(editor, "registry", reg)
    for lst in (mod.BUILDS, mod.ENERGY_CALLS):
        lst.clear()
    base = _edit(editor, disc)
    assert mod.BUILDS == [] and mod.ENERGY_CALLS == []
    out = _edit(editor, disc, energies=[{"name": "outside-power", "weight": 3.0,
                                         "params": {"region": "content", "power": 1.0}}])
    (ctx, region, power), = mod.BUILDS
    assert (region, power) == ("content", 1.0)
    assert tuple(ctx.edit.shape[-2:]) == (32, 32) and ctx.images == ("source",)
    # called once per guided pass (the kernel's guidance: one gradient for each of move's two
    # regions, edit and content, per pass), with the inverted images' features
    passes = out.metadata["network_evaluations"]["region_gradients"] // 2
    assert len(mod.ENERGY_CALLS) == passes > 0
    assert all(refs == ["source"] for refs in mod.ENERGY_CALLS)
    assert (out.latent - base.latent).abs().max() > 1e-3
    # an energy from outside that the global registry does not have is refused there
    with pytest.raises(SpecError, match="unknown energy 'outside-power'"):
        parse_spec({**MOVE, "energies": [{"name": "outside-power"}]}, base_dir=disc)


def test_out_of_tree_sampler_encoder_and_energy_from_one_spec(outside, editor, disc,
                                                              monkeypatch):
    """The issue's acceptance check: a distribution from outside the package supplies a
    sampler, a prompt encoder and an energy; one spec selects all three; the edit runs each."""
    import numpy as np

    from diffeditor.encoders import CLIP

    reg, mod = outside
    monkeypatch.setattr(editor, "registry", reg)
    for lst in (mod.STEPS, mod.PROMPTS, mod.BUILDS, mod.ENERGY_CALLS):
        lst.clear()
    chosen = {"sampler": "outside-guided", "text_encoder": "outside-clip",
              "energies": [{"name": "outside-power", "weight": 2.0}]}
    seen = []
    try:
        out = editor.edit({**MOVE, **chosen}, base_dir=disc,
                          callback=lambda i, z, x0: seen.append(i))
        assert mod.STEPS == list(range(5)) and seen == list(range(5))
        assert MOVE["prompt"] in mod.PROMPTS
        assert len(mod.BUILDS) == 1 and len(mod.ENERGY_CALLS) > 0
        assert {k: out.metadata["spec"][k] for k in ("sampler", "text_encoder")} == {
            "sampler": "outside-guided", "text_encoder": "outside-clip"}
        clip = editor.edit({**MOVE, **chosen, "text_encoder": "clip"}, base_dir=disc)
        a, b = (np.asarray(r.image).astype(float) for r in (out, clip))
        assert np.abs(a - b).mean() > 0.5, "the selected encoder made no difference"
    finally:
        editor.engine.text_prompt_encoder = CLIP


# -- one vocabulary for modes ----------------------------------------------------------------------

def test_eval_ablation_old_name_still_runs_with_a_deprecation_note(tmp_path, capsys):
    """`no_<mechanism>` switches a mechanism off: the SDE ablation is `no_sde` now; its old
    name `sde_none` still runs the same ablation, with a note."""
    import json

    from diffeditor.cli import main
    from diffeditor.plugins import get_registry

    if "shapes" not in get_registry().models:
        pytest.skip("diffeditor-shapes is not installed")
    pytest.importorskip("diffeditor_eval")
    from diffeditor_eval.shapes_eval import ABLATIONS

    assert "sde_none" not in ABLATIONS
    assert ABLATIONS["no_sde"] == {"sde_strength": 0.0, "sde_strength_outside": 0.0}
    args = ["eval", "shapes", "--task", "move", "--cases", "1", "--steps", "2",
            "--ablation", "sde_none", "--json", str(tmp_path / "a.json")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "ablation 'sde_none' is deprecated: it is now called 'no_sde'" in err
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["settings"]["ablations"] == ["no_sde"]
    assert {row["ablation"] for row in report["cases"]} == {"no_sde"}


# -- housekeeping --------------------------------------------------------------------------------

def test_one_mask_resampler():
    """Masks change grids in one function, ``geometry.resample_mask`` (coverage or nearest);
    the only other resize in the kernel is of features (``features.py``)."""
    from pathlib import Path

    import diffeditor
    from diffeditor.geometry import resample_mask

    kernel = Path(diffeditor.__file__).parent
    users = sorted(p.name for p in kernel.glob("*.py") if "interpolate(" in p.read_text())
    assert users == ["features.py", "geometry.py"]
    m = torch.zeros(1, 1, 8, 8)
    m[..., 0:3, 0:3] = 1  # covers 9 of the 16 cells of the top-left 4x4 block
    assert resample_mask(m, (2, 2)).tolist() == [[[[1.0, 0.0], [0.0, 0.0]]]]
    tiny = torch.zeros(1, 1, 8, 8)
    tiny[..., 7, 7] = 1  # under half a cell: coverage keeps the one covered cell
    assert resample_mask(tiny, (2, 2)).tolist() == [[[[0.0, 0.0], [0.0, 1.0]]]]
    assert resample_mask(m, (16, 16), "nearest").sum() == 9 * 4
    with pytest.raises(ValueError, match="rule must be"):
        resample_mask(m, (2, 2), "area")


def test_the_unused_protocols_are_gone():
    import diffeditor.interfaces as itf

    assert not hasattr(itf, "Sampler") and not hasattr(itf, "EnergyFunction")
    assert itf.PromptEncoder == itf.TextPromptEncoder | itf.ImagePromptAdapter
