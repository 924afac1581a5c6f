"""The shared sampler on the trained shapes model: inversion, reconstruction, the memory bank,
decoder features and exact restoration of the UNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_disc_scene

from diffeditor.attention import MemoryBank, bank_layer_names, memory_bank_patch
from diffeditor.features import decoder_features
from diffeditor.interfaces import AttentionPolicy, EditPlan
from diffeditor.sampling import DDIMTimesteps

PROMPT = "a big red circle and a small blue square on a gray background"


@pytest.fixture(scope="module")
def scene():
    scenes = pytest.importorskip("diffeditor_shapes.scenes")
    s = scenes.Scene("gray", [scenes.ShapeObject("circle", "red", 44, 60, 24),
                              scenes.ShapeObject("square", "blue", 92, 92, 18)])
    img = scenes.render(s, noise=1).image
    x = torch.from_numpy(img.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    return x


def test_inversion_reconstruction_matches_vae_roundtrip(editor, scene):
    """Invert then regenerate with guidance off: within 0.02 of the VAE-only error."""
    eng = editor.engine
    vae_only = eng.decode(eng.encode_image(scene))
    rec = eng.reconstruct(scene, PROMPT, steps=50)
    vae_err = (vae_only - scene).abs().mean().item()
    rec_err = (rec - scene).abs().mean().item()
    assert rec_err - vae_err < 0.02, (rec_err, vae_err)


def test_inversion_returns_every_latent_and_records_the_bank(editor, scene):
    eng = editor.engine
    plan = _source_plan(scene, PROMPT)
    grid = DDIMTimesteps.from_scheduler(eng.scheduler, 10)
    eng.cache = type(eng.cache)(2)
    inv, cached = eng.invert(plan, grid)
    assert not cached and len(inv.latents["source"]) == 11
    layers = bank_layer_names(eng.unet)
    assert len(layers) == 9  # 3 cross-attention up-blocks x 3 transformer layers, as SD 1.5
    assert {k[0] for k in inv.bank.store} == set(range(10))
    assert len(inv.bank.store) == 10 * 9
    k, v = inv.bank.store[(0, layers[0])]
    assert k.device == eng.device and k.shape[0] == 1
    assert inv.bank.nbytes() > 0
    # the same image and prompt: the cached inversion comes back
    again, cached = eng.invert(plan, grid)
    assert cached and again is inv


def _source_plan(scene, prompt: str) -> EditPlan:
    """A plan with the scene as its only image: enough for inversion."""
    return EditPlan(images={"source": scene}, prompts={"source": prompt}, regions={}, energies=[],
                    sde_mask=None, attention=AttentionPolicy())


def _unet_out(eng, z, t, ctx):
    with torch.no_grad():
        return eng.unet(z, t, encoder_hidden_states=ctx).sample.clone()


def test_unet_is_bit_identical_after_an_edit(editor, tmp_path):
    """All patches (memory bank, feature hooks) are undone: same outputs, same processors."""
    eng = editor.engine
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 16, 16, generator=gen)
    ctx = eng.encode_text([PROMPT])
    procs = dict(eng.unet.attn_processors)
    hooks = sum(len(m._forward_hooks) for m in eng.unet.modules())
    before = _unet_out(eng, z, 500, ctx)
    write_disc_scene(tmp_path)
    editor.edit({"task": "move", "image": "i.png", "mask": "m.png", "offset": [30, 0], "steps": 4,
                 "schedule": {"guidance": [{"start": 0, "stop": 1}], "time_travel": {"steps": [2]}}},
                base_dir=tmp_path)
    after = _unet_out(eng, z, 500, ctx)
    assert torch.equal(before, after)
    assert dict(eng.unet.attn_processors) == procs
    assert sum(len(m._forward_hooks) for m in eng.unet.modules()) == hooks


def test_decoder_features_shapes_and_gradients(editor):
    eng = editor.engine
    z = torch.randn(1, 4, 16, 16, requires_grad=True)
    ctx = eng.encode_text([PROMPT])
    feats = decoder_features(eng.unet, z, torch.tensor(501), ctx, (1, 2), 2)
    assert set(feats) == {1, 2}
    chans = eng.unet.config.block_out_channels
    assert feats[1].shape == (1, chans[-2], 32, 32)  # up_blocks[1] out channels, 2x latent grid
    assert feats[2].shape == (1, chans[-3], 32, 32)
    assert all(f.dtype == torch.float32 for f in feats.values())
    (g,) = torch.autograd.grad(feats[2].square().mean(), z)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def _bank_with_entry(tokens=64, ch=8, mode="replace", **policy):
    bank = MemoryBank(policy=AttentionPolicy(mode=mode, **policy), mode="inject", step=3,
                      latent_hw=(8, 8), image_index={"source": 0, "reference": 1})
    k = torch.arange(2 * tokens * ch, dtype=torch.float32).reshape(2, tokens, ch)
    bank.store[(3, "L")] = (k, -k)
    return bank, k


def test_memory_bank_policies():
    own_k = torch.zeros(2, 64, 8)
    bank, rec = _bank_with_entry(mode="replace")
    k, v = bank.inject("L", own_k, own_k)
    assert k.shape == (2, 64, 8) and torch.equal(k[1], rec[0]) and torch.equal(v[0], -rec[0])
    bank, rec = _bank_with_entry(mode="concat")
    k, _ = bank.inject("L", own_k, own_k)
    assert k.shape == (2, 128, 8) and torch.equal(k[:, :64], own_k) and torch.equal(k[0, 64:], rec[0])
    keep = torch.zeros(1, 1, 64, 64)
    keep[..., :32, :] = 1  # top half of the source
    refm = torch.zeros(1, 1, 64, 64)
    refm[..., :, :16] = 1  # left quarter of the reference
    bank, rec = _bank_with_entry(mode="masked", parts=[("source", keep), ("reference", refm)])
    k, _ = bank.inject("L", own_k, own_k)
    assert k.shape == (2, 32 + 16, 8)  # masks resized to the layer's 8x8 token grid
    assert torch.equal(k[0, :32], rec[0, :32])
    ref_tokens = rec[1].reshape(8, 8, 8)[:, :2].reshape(-1, 8)
    assert torch.equal(k[0, 32:], ref_tokens)
    # outside the window / bank off: own K/V
    bank.policy = AttentionPolicy(mode="off")
    k, _ = bank.inject("L", own_k, own_k)
    assert k is own_k


def test_memory_bank_patch_restores_processors(editor):
    unet = editor.engine.unet
    before = dict(unet.attn_processors)
    with memory_bank_patch(unet, MemoryBank()):
        during = dict(unet.attn_processors)
        assert sum(type(p).__name__ == "BankAttnProcessor" for p in during.values()) == 9
    assert dict(unet.attn_processors) == before


def test_time_travel_counts_no_wasted_rollback(editor, tmp_path):
    """Guidance at 2 steps, time travel at one of them with U=3: 2 rollbacks, not 3."""
    write_disc_scene(tmp_path)
    res = editor.edit({"task": "move", "image": "i.png", "mask": "m.png", "offset": [30, 0], "steps": 6,
                       "prompt": "tt-count",
                       "schedule": {"guidance": [{"steps": [1, 3]}], "time_travel": {"steps": [3]},
                                    "time_travel_repeats": 3}}, base_dir=tmp_path)
    n = res.metadata["network_evaluations"]
    # 6 inversion + 6 CFG + 2 extra CFG passes + 2 rollbacks
    assert n["unet_forward"] == 6 + 6 + 2 + 2
    # one reference-feature pass per guided step (cached across repeats; batched into that
    # step's CFG call by default) + one with grad per pass
    merged = 2 if editor.engine.merge_reference_pass else 0
    assert n["merged_reference"] == merged
    assert n["unet_partial"] == (2 - merged) + (1 + 3)
    assert n["region_gradients"] == 2 * (1 + 3)  # edit and content regions, one gradient each
    # one batched backward pass per guided pass (GPU default) or one per region (CPU default)
    per_pass = 1 if editor.engine.batched_region_grads else 2
    assert n["unet_backward"] == per_pass * (1 + 3)


def test_batched_region_gradients_equal_one_pass_per_region(editor, tmp_path):
    """The fast path (one batched backward) gives the same edit as one backward per region."""
    write_disc_scene(tmp_path)
    spec = {"task": "move", "image": "i.png", "mask": "m.png", "offset": [30, 0], "steps": 8,
            "prompt": "fast-path"}
    eng = editor.engine
    default = eng.batched_region_grads
    try:
        eng.batched_region_grads = True
        fast = editor.edit(spec, base_dir=tmp_path).latent
        assert eng.batched_region_grads  # the batched pass ran: no fallback
        eng.batched_region_grads = False
        plain = editor.edit(spec, base_dir=tmp_path).latent
    finally:
        eng.batched_region_grads = default
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


def test_inversion_cache_on_disk_round_trip(editor, scene, tmp_path):
    from diffeditor.engine import InversionCache

    eng = editor.engine
    plan = _source_plan(scene, "disk-cache")
    grid = DDIMTimesteps.from_scheduler(eng.scheduler, 4)
    saved = eng.cache
    try:
        eng.cache = InversionCache(1, tmp_path / "cache")
        inv, cached = eng.invert(plan, grid)
        assert not cached and len(list((tmp_path / "cache").glob("*.pt"))) == 1
        eng.cache = InversionCache(1, tmp_path / "cache")  # a new process: empty memory
        again, cached = eng.invert(plan, grid)
        assert cached
        for a, b in zip(inv.latents["source"], again.latents["source"]):
            assert torch.equal(a, b)
        assert again.bank.store.keys() == inv.bank.store.keys()
        (next((tmp_path / "cache").glob("*.pt"))).write_bytes(b"damaged")
        eng.cache = InversionCache(1, tmp_path / "cache")
        _, cached = eng.invert(plan, grid)
        assert not cached  # a damaged file is ignored and rewritten
    finally:
        eng.cache = saved


def test_cfg_scale_one_skips_the_unconditional_branch(editor, tmp_path):
    """guidance_scale 1 gives eps_u + 1*(eps_c - eps_u) = eps_c: one batch-1 call, same edit."""
    write_disc_scene(tmp_path)
    spec = {"task": "move", "image": "i.png", "mask": "m.png", "offset": [30, 0], "steps": 6,
            "prompt": "cfg-one", "guidance_scale": 1.0}
    fast = editor.edit(spec, base_dir=tmp_path).latent
    eng = editor.engine
    calls = []
    orig = eng.eps
    eng.eps = lambda z, *a, **k: (calls.append(z.shape[0]), orig(z, *a, **k))[1]
    try:
        editor.edit(spec, base_dir=tmp_path)
    finally:
        del eng.eps
    assert 2 not in calls  # no CFG pair at all
    # reference: the same step computed through the CFG pair
    spec2 = dict(spec, guidance_scale=1.0 + 1e-9)
    slow = editor.edit(spec2, base_dir=tmp_path).latent
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_bank_records_only_the_steps_asked_for_and_the_cache_widens(editor, scene, tmp_path):
    from diffeditor.engine import InversionCache

    eng = editor.engine
    plan = _source_plan(scene, "bank-steps")
    grid = DDIMTimesteps.from_scheduler(eng.scheduler, 6)
    saved = eng.cache
    try:
        eng.cache = InversionCache(2, tmp_path / "cache")
        inv, cached = eng.invert(plan, grid, bank_steps=frozenset({2, 3}))
        assert not cached and {s for s, _ in inv.bank.store} == {2, 3}
        inv2, cached = eng.invert(plan, grid, bank_steps=frozenset({3, 4}))  # step 4 is missing
        assert not cached and {s for s, _ in inv2.bank.store} == {2, 3, 4}
        for a, b in zip(inv.latents["source"], inv2.latents["source"]):
            assert torch.equal(a, b)  # the same inversion, more of its bank kept
        _, cached = eng.invert(plan, grid, bank_steps=frozenset({2}))
        assert cached
        eng.cache = InversionCache(2, tmp_path / "cache")  # a new process: from disk
        again, cached = eng.invert(plan, grid, bank_steps=frozenset({4}))
        assert cached and again.bank.record_steps == frozenset({2, 3, 4})
        full, cached = eng.invert(plan, grid)  # all steps
        assert not cached and {s for s, _ in full.bank.store} == set(range(6))
    finally:
        eng.cache = saved


def test_edit_with_the_window_only_bank_matches_a_full_bank(editor, tmp_path):
    """Steps outside the memory-bank window are never injected: recording them changes
    nothing but memory."""
    from diffeditor.engine import InversionCache
    from diffeditor.sampling import DDIMTimesteps as Grid

    write_disc_scene(tmp_path)
    spec = editor.parse({"task": "move", "image": "i.png", "mask": "m.png", "offset": [30, 0],
                         "steps": 10, "prompt": "window-bank"}, base_dir=tmp_path)
    eng = editor.engine
    saved = eng.cache
    try:
        eng.cache = InversionCache(2)
        lean = editor.edit(spec)
        eng.cache = InversionCache(2)
        _, plan, _ = editor.prepare(spec)
        eng.invert(plan, Grid.from_scheduler(eng.scheduler, 10))  # every step recorded
        full = editor.edit(spec)
        assert full.metadata["inversion_cached"]
    finally:
        eng.cache = saved
    assert lean.metadata["memory_bank_bytes"] < full.metadata["memory_bank_bytes"]
    torch.testing.assert_close(lean.latent, full.latent, atol=1e-6, rtol=1e-6)
