"""Where appearance and paste build their object: ``surgery_space`` and appearance's
``object_blend``.

``match_statistics`` gives the values under the object mask the per-channel mean and standard
deviation of the reference's under the reference mask, and leaves every other value untouched.
In ``pixel`` space the task builds a composite image (the object recoloured, or pasted) that the
engine inverts beside the source; the initial latent and the pins take the object from it.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffeditor_tasks.appearance import match_statistics

from diffeditor.geometry import similarity_warp


def _masks():
    m = torch.zeros(1, 1, 8, 8)
    m[..., 2:5, 1:6] = 1
    r = torch.zeros(1, 1, 8, 8)
    r[..., 4:8, 3:7] = 1
    return m, r


def _stats(x, m):
    sel = x[:, :, m[0, 0] > 0.5]
    return sel.mean(-1), sel.std(-1, unbiased=False)


def test_the_object_takes_the_reference_objects_statistics_exactly():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 8, 8, generator=g)
    ref = torch.randn(1, 4, 8, 8, generator=g) * 3 + torch.tensor([1.0, -2.0, 0.5, 4.0])[None, :, None, None]
    m, r = _masks()
    out = match_statistics(z, m, ref, r)
    mu, sd = _stats(out, m)
    mu_r, sd_r = _stats(ref, r)
    torch.testing.assert_close(mu, mu_r, atol=1e-5, rtol=0)
    torch.testing.assert_close(sd, sd_r, atol=1e-4, rtol=0)
    # the pattern inside keeps its shape: a per-channel affine map of the source
    inside = m[0, 0] > 0.5
    for c in range(4):
        a, b = z[0, c][inside], out[0, c][inside]
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9999


def test_nothing_outside_the_object_changes():
    g = torch.Generator().manual_seed(1)
    z, ref = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g) + 5
    m, r = _masks()
    out = match_statistics(z, m, ref, r)
    assert torch.equal(out[:, :, m[0, 0] == 0], z[:, :, m[0, 0] == 0])
    assert not torch.equal(out, z)


scenes = pytest.importorskip("diffeditor_shapes.scenes")


def _plan(editor, task, seed, tmp_path, **fields):
    case = scenes.make_case(task, seed)
    path = scenes.save_case(case, tmp_path)
    data = {**json.loads(path.read_text()), **fields}
    spec = editor.parse(data, base_dir=tmp_path)
    _, plan, geom = editor.prepare(spec)
    return spec, plan, geom


def _latents(plan):
    g = torch.Generator().manual_seed(3)
    return {k: torch.randn(1, 4, 16, 16, generator=g) + i for i, k in enumerate(plan.images)}


def test_pixel_paste_composite_is_the_warped_object_over_the_source(editor, tmp_path):
    spec, plan, geom = _plan(editor, "paste", 1, tmp_path, surgery_space="pixel", object_blend=0.5)
    assert set(plan.images) == {"source", "reference", "composite"}
    assert plan.prompts["composite"] == spec.prompt
    m = plan.masks["destination"]
    src, ref, comp = plan.images["source"], plan.images["reference"], plan.images["composite"]
    moved = similarity_warp(ref, geom.work_hw, plan.info["centroid_in_reference"], spec.scale,
                            plan.info["offset_work_px"], "bilinear")
    inside, outside = m[0, 0] > 0.5, m[0, 0] < 0.5
    assert inside.sum() > 100
    assert torch.equal(comp[:, :, outside], src[:, :, outside])
    torch.testing.assert_close(comp[:, :, inside], moved[:, :, inside])
    # the object's colour arrived: the composite differs from the source where it was pasted
    assert (comp - src)[:, :, inside].abs().mean() > 0.2
    # the initial latent and the pin take the destination from the composite's inversion
    zs = _latents(plan)
    z = plan.surgery(zs)
    ml = plan.pins[0].mask
    assert torch.equal(z[:, :, ml[0, 0] > 0], zs["composite"][:, :, ml[0, 0] > 0])
    assert torch.equal(z[:, :, ml[0, 0] == 0], zs["source"][:, :, ml[0, 0] == 0])
    assert torch.equal(plan.pins[0].target(zs), zs["composite"])


def test_latent_paste_is_the_release_surgery(editor, tmp_path):
    spec, plan, geom = _plan(editor, "paste", 1, tmp_path, surgery_space="latent")
    assert set(plan.images) == {"source", "reference"}
    zs = _latents(plan)
    moved = similarity_warp(zs["reference"], geom.work_hw, plan.info["centroid_in_reference"],
                            spec.scale, plan.info["offset_work_px"])
    ml = plan.pins[0].mask
    z = plan.surgery(zs)
    assert torch.equal(z[:, :, ml[0, 0] > 0], moved[:, :, ml[0, 0] > 0])


@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_appearance_object_blend_recolours_the_object_only(editor, tmp_path, space):
    spec, plan, geom = _plan(editor, "appearance", 0, tmp_path, surgery_space=space, object_blend=0.5)
    assert plan.pins and plan.pins[0].until == 0.5 and plan.surgery is not None
    m, mr = plan.masks["object"], plan.masks["reference_object"]
    if space == "pixel":
        comp = plan.images["composite"]
        want = match_statistics(plan.images["source"], m, plan.images["reference"], mr)
        assert torch.equal(comp, want)
        # the object now has the reference object's mean colour
        mean = comp[:, :, m[0, 0] > 0.5].mean(-1)
        ref_mean = plan.images["reference"][:, :, mr[0, 0] > 0.5].mean(-1)
        torch.testing.assert_close(mean, ref_mean, atol=1e-4, rtol=0)
    else:
        assert "composite" not in plan.images
    zs = _latents(plan)
    z = plan.surgery(zs)
    ml = plan.pins[0].mask
    assert torch.equal(z[:, :, ml[0, 0] == 0], zs["source"][:, :, ml[0, 0] == 0])
    assert not torch.equal(z[:, :, ml[0, 0] > 0], zs["source"][:, :, ml[0, 0] > 0])


def test_appearance_without_object_blend_is_the_reference_plan(editor, tmp_path):
    spec, plan, _ = _plan(editor, "appearance", 0, tmp_path, surgery_space="pixel")
    assert spec.object_blend == 0.0
    assert plan.surgery is None and all(p.until == 0 for p in plan.pins)
    assert set(plan.images) == {"source", "reference"}


@pytest.mark.parametrize(("blend", "radius"), [(0.0, 1), (0.5, 1), (0.5, 2)])
def test_drag_object_blend_pins_each_target_patch_to_its_handle_patch(editor, tmp_path, blend, radius):
    """Drag's ``object_blend`` (ours; 0 = the reference) holds the (2r+1)^2 latent patch at
    each target (``object_blend_radius`` r; 1 = 3x3) to the source trajectory's patch at its
    handle, and nothing else."""
    spec, plan, geom = _plan(editor, "drag", 2, tmp_path, object_blend=blend, object_blend_radius=radius)
    assert len(plan.pins) == 1 and plan.pins[0].until == blend
    (hx, hy), (tx, ty) = plan.info["handles_work_px"][0], plan.info["targets_work_px"][0]
    ppc = geom.pixels_per_cell("latent")
    lh, lw = geom.latent_hw
    hr, hc, tr, tc = (int(v // ppc) for v in (hy, hx, ty, tx))
    hr, tr = (min(max(v, radius), lh - 1 - radius) for v in (hr, tr))
    hc, tc = (min(max(v, radius), lw - 1 - radius) for v in (hc, tc))
    k = 2 * radius + 1
    ml = plan.pins[0].mask[0, 0]
    assert ml.sum() == k * k and ml[tr - radius : tr + radius + 1, tc - radius : tc + radius + 1].all()
    zs = _latents(plan)
    pinned = plan.pins[0].target(zs)
    assert torch.equal(pinned[..., tr - radius : tr + radius + 1, tc - radius : tc + radius + 1],
                       zs["source"][..., hr - radius : hr + radius + 1, hc - radius : hc + radius + 1])
    assert torch.equal(pinned[:, :, ml == 0], zs["source"][:, :, ml == 0])
    assert torch.equal(pinned, plan.surgery(zs))  # the same latent the edit starts from


@pytest.mark.parametrize("radius", [1, 2])
def test_drag_patch_radius_moves_a_larger_feature_patch(radius):
    """The drag energy compares the target patch's features with the handle patch's, on
    (2r+1)^2 feature cells: at its minimum (similarity 1 everywhere) exactly when the features
    there are the handle's, moved."""
    from diffeditor_tasks.drag import drag_energies

    from diffeditor.energies import inverse_energy
    from diffeditor.interfaces import Geometry

    geom = Geometry((128, 128), (128, 128), 8, 2, (128, 128))
    ppc = geom.pixels_per_cell("feature")  # 4 px per feature cell, 32 x 32 cells
    handle, target = (30.0, 30.0), (70.0, 50.0)  # cells (7, 7) -> (12, 17)
    e_edit, _ = drag_energies([handle], [target], geom, half=radius)
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 8, 32, 32, generator=g)
    hr, hc, tr, tc = (int(v // ppc) for v in (handle[1], handle[0], target[1], target[0]))
    good = torch.randn(1, 8, 32, 32, generator=g)
    good[..., tr - radius : tr + radius + 1, tc - radius : tc + radius + 1] = \
        ref[..., hr - radius : hr + radius + 1, hc - radius : hc + radius + 1]
    best = float(inverse_energy(1.0, torch.tensor(1.0)))
    assert float(e_edit({1: good}, {"source": {1: ref}})) == pytest.approx(best, abs=1e-5)
    # one ring too small: the outer cells of the patch are not the handle's
    part = torch.randn(1, 8, 32, 32, generator=g)
    part[..., tr - radius + 1 : tr + radius, tc - radius + 1 : tc + radius] = \
        ref[..., hr - radius + 1 : hr + radius, hc - radius + 1 : hc + radius]
    assert float(e_edit({1: part}, {"source": {1: ref}})) > best + 0.05


@pytest.mark.parametrize("task", ["move", "resize"])
def test_pixel_move_composite_is_the_warped_object_over_the_filled_source(editor, tmp_path, task):
    """Move and resize in ``pixel`` space (ours): the composite is the source with the object
    warped onto its destination (its pixel outline, bilinear) and the vacated area filled from
    the surroundings; the edit's whole region starts from the composite's inversion."""
    spec, plan, geom = _plan(editor, task, 4, tmp_path, surgery_space="pixel")  # resize 4: 0.71
    assert set(plan.images) == {"source", "composite"} and plan.prompts["composite"] == spec.prompt
    src, comp = plan.images["source"], plan.images["composite"]
    m_obj, m_dst = plan.masks["object"] > 0.5, plan.masks["destination"][0, 0] > 0.5
    moved = similarity_warp(src, geom.work_hw, plan.info["centroid"], spec.scale,
                            plan.info["offset_work_px"], "bilinear")
    assert m_dst.sum() > 100
    torch.testing.assert_close(comp[:, :, m_dst], moved[:, :, m_dst])
    # the vacated pixels hold no trace of the object: they are near the background around it
    from diffeditor.geometry import dilate

    vac = (dilate(m_obj.float(), 1)[0, 0] > 0.5) & ~m_dst
    ring = (dilate(m_obj.float(), 6)[0, 0] > 0.5) & ~(dilate(m_obj.float(), 1)[0, 0] > 0.5) & ~m_dst
    assert vac.sum() > 20
    obj_mean = src[:, :, m_obj[0, 0]].mean(-1)
    bg_mean = src[:, :, ring].mean(-1)
    vac_mean = comp[:, :, vac].mean(-1)
    assert (vac_mean - bg_mean).abs().max() < 0.5 * (obj_mean - bg_mean).abs().max()
    # pixels far from both regions are the source's own
    far = ~(dilate(m_obj.float(), 1)[0, 0] > 0.5) & ~m_dst
    assert torch.equal(comp[:, :, far], src[:, :, far])
    zs = _latents(plan)
    z = plan.surgery(zs)
    region = plan.sde_mask[0, 0] > 0
    assert torch.equal(z[:, :, region], zs["composite"][:, :, region])
    assert torch.equal(z[:, :, ~region], zs["source"][:, :, ~region])
    assert torch.equal(plan.pins[0].target(zs), zs["composite"])


def test_latent_move_is_the_release_surgery(editor, tmp_path):
    spec, plan, geom = _plan(editor, "move", 3, tmp_path, surgery_space="latent")
    assert set(plan.images) == {"source"}


def test_fill_hole_continues_a_flat_or_smooth_background_and_keeps_known_pixels():
    from diffeditor.geometry import fill_hole

    hole = torch.zeros(1, 1, 32, 32)
    hole[..., 10:20, 12:24] = 1
    # flat background: the hole takes its colour exactly, whatever was under it
    flat = torch.tensor([0.2, -0.5, 0.9])[None, :, None, None].expand(1, 3, 32, 32).clone()
    img = flat.clone()
    img[..., 10:20, 12:24] = 5.0  # an object
    torch.testing.assert_close(fill_hole(img, hole), flat)
    # a horizontal ramp (0.7 across the hole): the fill stays within 0.3 of it, no trace of
    # the object, and rises from the hole's left side to its right like the ramp
    ramp = torch.linspace(-1, 1, 32)[None, None, None, :].expand(1, 3, 32, 32).clone()
    img = ramp.clone()
    img[..., 10:20, 12:24] = 5.0
    out = fill_hole(img, hole)
    inside = out[..., 10:20, 12:24]
    assert float((inside - ramp[..., 10:20, 12:24]).abs().max()) < 0.3
    assert bool((inside[..., -1] - inside[..., 0] > 0.5).all())
    known = hole[0, 0] == 0
    assert torch.equal(out[:, :, known], img[:, :, known])
