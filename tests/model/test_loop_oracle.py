"""The sampling loop's wiring against an exact oracle (``loop_oracle.py``).

The real :class:`~diffeditor.engine.Engine` runs real task plans (move, drag, paste,
appearance, compose) with an analytic UNet whose every call is recorded, and the real VAE, text
encoder and DDIM scheduler of the shapes model. Two kinds of checks:

* the final latent equals an independent transcription of the method (method reference §1.6,
  §5) to float tolerance, for every memory-bank policy, CFG on and off, the reference pass
  merged into the CFG call or not, batched or per-region gradients;
* per call: which steps get guidance, SDE and time travel, which timestep, context, image-prompt
  weight and memory-bank state each UNet call saw, which inverted latent the reference features
  read, and the rollback's timestep.

Everything runs at 64 px (an 8x8 latent) with 10 steps: a few seconds in all.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from loop_oracle import UNCOND_IP, analytic_engine, reference_edit
from PIL import Image

from diffeditor.editor import Editor
from diffeditor.sampling import DDIMTimesteps

N = 10
ATOL = 5e-4  # float32 sums in another order: measured up to 1.8e-4 (one thread, paste with
#              image-prompt inversion), 2.5e-5 elsewhere; every mechanism moves >= 2.5e-2
SCHEDULE = {
    "guidance": [{"steps": [0, 1, 2, 4, 6]}],
    "sde": {"steps": [2, 3]},
    "time_travel": {"steps": [4, 6]},
    "time_travel_repeats": 3,
    "image_prompt": {"steps": [1, 2, 3]},
}
COMMON = {"steps": N, "resolution": 64, "seed": 7, "schedule": SCHEDULE, "sde_strength": 0.4,
          "sde_strength_outside": 0.2, "image_prompt_scale": 0.3, "prompt": "a red square"}
# energy scales: the analytic features are of order 1 (SD 1.5's are of order 100), so lambda is
# chosen per task for a guidance term k*grad of about 0.3 against an eps of about 1: strong enough
# to move the result, mild enough that float32 rounding is not amplified past ATOL
SPECS = {
    "move": {"task": "move", "image": "i.png", "mask": "m.png", "offset": [16, 8],
             "guidance_scale": 4.0, "energy_scale": 25.0, "background_blend": 0.3, "object_blend": 0.2},
    "drag": {"task": "drag", "image": "i.png", "mask": "e.png", "handles": [[20, 28]],
             "targets": [[36, 30]], "guidance_scale": 4.0, "energy_scale": 200.0},
    "paste": {"task": "paste", "image": "i.png", "reference": "r.png", "reference_mask": "rm.png",
              "offset": [-12, 10], "guidance_scale": 1.0, "reference_prompt": "a green disc",
              "energy_scale": 50.0},
    "appearance": {"task": "appearance", "image": "i.png", "mask": "m.png", "reference": "r.png",
                   "reference_mask": "rm.png", "guidance_scale": 3.0,
                   "reference_prompt": "a green disc", "energy_scale": 20.0},
    "compose": {"task": "compose", "image": "i.png", "guidance_scale": 2.0, "energy_scale": 10.0, "edits": [
        {"task": "move", "mask": "m.png", "offset": [10, 0], "energy_scale": 5.0},
        {"task": "paste", "reference": "r.png", "reference_mask": "rm.png", "offset": [0, 12],
         "energy_scale": 15.0}]},
}


def _write_scenes(folder):
    img = np.full((64, 64, 3), 110, np.uint8)
    img[:, :, 2] = np.linspace(60, 200, 64).astype(np.uint8)[None]  # a gradient: no flat regions
    img[20:36, 12:28] = (220, 40, 40)
    Image.fromarray(img).save(folder / "i.png")
    m = np.zeros((64, 64), np.uint8)
    m[20:36, 12:28] = 255
    Image.fromarray(m).save(folder / "m.png")
    e = np.zeros((64, 64), np.uint8)
    e[8:56, 4:60] = 255
    Image.fromarray(e).save(folder / "e.png")
    ref = np.full((64, 64, 3), 230, np.uint8)
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 40) ** 2 + (xx - 40) ** 2 < 10**2
    ref[disc] = (40, 200, 60)
    Image.fromarray(ref).save(folder / "r.png")
    Image.fromarray(disc.astype(np.uint8) * 255).save(folder / "rm.png")
    return folder


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return _write_scenes(tmp_path_factory.mktemp("oracle"))


@pytest.fixture(scope="module")
def oracle(editor):
    """An editor whose engine runs the analytic UNet."""
    return Editor(analytic_engine(editor.engine), model="analytic")


def _run(oracle, scenes, name, **over):
    """The engine's edit and its recorded UNet calls: ``(output, inversion calls, edit calls,
    spec, plan)``."""
    spec = oracle.parse({**COMMON, **SPECS[name], **over}, base_dir=scenes)
    _, plan, _ = oracle.prepare(spec)
    eng = oracle.engine
    eng.cache = type(eng.cache)(4)  # every run inverts: its calls are in the log
    eng.unet.calls.clear()
    out = eng.edit(plan, spec)
    calls = list(eng.unet.calls)
    inv_calls = [c for c in calls if c.bank_mode == "record"]
    return out, calls[: len(inv_calls)], calls[len(inv_calls):], spec, plan


def _grid(eng):
    sch = eng.scheduler
    sch.set_timesteps(N)
    return [int(t) for t in sch.timesteps], sch.config.num_train_timesteps // N


def _cbar(eng, prompt):
    return eng.unet.summary(eng.encode_text([prompt])).item()


# -- the exact oracle ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "separate"])
def test_edit_equals_the_transcribed_method(oracle, scenes, name, merge):
    eng = oracle.engine
    eng.merge_reference_pass = merge
    try:
        out, *_, spec, plan = _run(oracle, scenes, name)
    finally:
        eng.merge_reference_pass = True
    ref = reference_edit(eng, plan, spec)
    assert any(r["guided"] for r in ref.log) and any(r["sde"] for r in ref.log)
    torch.testing.assert_close(out.latent, ref.latent, atol=ATOL, rtol=0)


@pytest.fixture(scope="module", params=["v_prediction", "sample"])
def oracle_predicting(editor, request):
    """An editor whose analytic UNet's output is read as v, or as x0."""
    return Editor(analytic_engine(editor.engine, prediction_type=request.param), model="analytic")


@pytest.mark.parametrize("name", ["move", "paste"])
def test_other_prediction_types_equal_the_transcribed_method(oracle_predicting, scenes, name):
    """The output converted to ε for every consumer: inversion (at the latent's own level),
    both CFG branches, guidance's size bound, the regional SDE, x̂0 and the rollback; the
    transcription converts with its own arithmetic. (Read as ε, the latent moves by >= 0.3.)"""
    eng = oracle_predicting.engine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tolerance below was measured with one thread: with more,
    try:  # float32 sums change order, and the x0 conversion amplifies that by up to ~34
        out, *_, spec, plan = _run(oracle_predicting, scenes, name)
        ref = reference_edit(eng, plan, spec)
    finally:
        torch.set_num_threads(threads)
    assert any(r["guided"] for r in ref.log) and any(r["sde"] for r in ref.log)
    assert any(spec.schedule.time_travel.steps or [])
    # an x0-model's ε = (z − √ᾱ·x0)/√(1−ᾱ) multiplies rounding by up to 1/√(1−ᾱ) ≈ 34
    # (measured 1.0e-3 against 5e-4 for ε and v)
    atol = 4 * ATOL if eng.prediction_type == "sample" else ATOL
    torch.testing.assert_close(out.latent, ref.latent, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def oracle_sdxl(editor):
    """An editor whose analytic UNet has SDXL's layout (added text and time conditions) and
    whose engine has a second, projecting text encoder (a small random CLIP, real class)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(5)
    enc2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=24)).eval()
    return Editor(analytic_engine(editor.engine, text_encoder_2=enc2), model="analytic-sdxl")


@pytest.mark.parametrize("name", ["move", "paste", "drag"])
def test_sdxl_layout_equals_the_transcribed_method(oracle_sdxl, scenes, name):
    """Over an SDXL-layout denoiser: the edit equals the transcription (which encodes the
    prompts itself: both encoders' penultimate states, the pooled projection, zeros for the
    unconditional branch), and every UNet call (inversion, CFG, guidance feature pass, merged
    reference rows, rollback) got each row's own pooled embedding and the time ids."""
    eng = oracle_sdxl.engine
    out, inv_calls, calls, spec, plan = _run(oracle_sdxl, scenes, name)
    ref = reference_edit(eng, plan, spec)
    assert any(r["guided"] for r in ref.log) and any(r["sde"] for r in ref.log)
    # latents reach ~35 here (CFG against the zero unconditional context moves far more than
    # against the encoded empty prompt): float32 rounding relative to that size
    torch.testing.assert_close(out.latent, ref.latent, atol=ATOL, rtol=5e-5)
    pbar = {}  # c̄ of a row's context -> p̄ of its pooled embedding (0 for the zero uncond)
    for p in {"", *plan.prompts.values(), spec.prompt}:
        ctx = eng.encode_text([p])
        pbar[round(float(eng.unet.summary(ctx[:, :-1])), 5)] = float(
            eng.unet.pooled_summary(ctx[:, -1, : eng.pooled_dim].float()))
    pbar[0.0] = 0.0
    kinds = set()
    for c in inv_calls + calls:
        assert c.pooled is not None and c.time_ids is not None
        torch.testing.assert_close(c.time_ids, torch.tensor([[64.0, 64, 0, 0, 64, 64]]).expand_as(c.time_ids))
        for cb, pb in zip(c.ctx.tolist(), c.pooled.tolist()):
            assert pb == pytest.approx(pbar[round(cb, 5)], abs=1e-5)
        kinds.add("grad" if c.grad else c.bank_mode if c.out is not None else "stopped")
    assert {"grad", "record", "inject"} <= kinds
    if spec.guidance_scale != 1.0:
        assert any(0.0 in c.ctx.tolist() for c in calls)  # the zero unconditional rows


@pytest.mark.parametrize("batched", [True, False], ids=["batched-grads", "per-region-grads"])
def test_region_gradients_either_way_equal_the_oracle(oracle, scenes, batched):
    eng = oracle.engine
    saved = eng.batched_region_grads
    eng.batched_region_grads = batched
    try:
        out, _, calls, spec, plan = _run(oracle, scenes, "move")
        assert eng.batched_region_grads == batched  # no silent fallback
    finally:
        eng.batched_region_grads = saved
    torch.testing.assert_close(out.latent, reference_edit(eng, plan, spec).latent, atol=ATOL, rtol=0)


@pytest.mark.parametrize("switch", [
    {"energy_scale": 0.0}, {"guidance_k": 0.02}, {"memory_bank": "off"}, {"image_prompt_scale": 0.0},
    {"sde_strength": 0.0, "sde_strength_outside": 0.0}, {"schedule": {**SCHEDULE, "time_travel_repeats": 1}},
    {"guidance_scale": 1.5}, {"background_blend": 0.0}, {"object_blend": 0.0}, {"seed": 8},
], ids=lambda d: next(iter(d)) if "schedule" not in d else "time_travel_repeats")
def test_the_oracle_sees_every_mechanism(oracle, scenes, switch):
    """Each mechanism moves the result far beyond the tolerance: an engine that dropped or
    mis-scaled it would fail the oracle comparison above."""
    _, *_, spec, plan = _run(oracle, scenes, "move")
    _, *_, spec2, plan2 = _run(oracle, scenes, "move", **switch)
    eng = oracle.engine
    a = reference_edit(eng, plan, spec).latent
    b = reference_edit(eng, plan2, spec2).latent
    assert (a - b).abs().max() > 50 * ATOL, switch


# -- per-call wiring ----------------------------------------------------------------------------

def test_inversion_calls_each_step_once_recording_the_bank(oracle, scenes):
    out, inv_calls, _, spec, plan = _run(oracle, scenes, "paste")
    eng = oracle.engine
    ts, _ = _grid(eng)
    assert len(inv_calls) == N
    # inverting from z_0 upwards: denoising step N-1 first, step 0 last; both images in one batch
    assert [c.t for c in inv_calls] == ts[::-1]
    assert [c.bank_step for c in inv_calls] == list(range(N - 1, -1, -1))
    ctx = torch.tensor([_cbar(eng, plan.prompts[k]) for k in plan.images])
    for c in inv_calls:
        assert c.z.shape[0] == 2 and not c.grad and c.gamma == 0.0
        torch.testing.assert_close(c.ctx, ctx)  # each image with its own prompt, no CFG
    ref = reference_edit(eng, plan, spec)
    for k, name in enumerate(plan.images):
        for j, c in enumerate(inv_calls):  # the latent fed at each inversion step
            torch.testing.assert_close(c.z[k : k + 1], ref.inverted[name][j], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,cfg", [("move", 4.0), ("paste", 1.0), ("appearance", 3.0)])
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "separate"])
def test_every_call_of_the_edit(oracle, scenes, name, cfg, merge):
    eng = oracle.engine
    eng.merge_reference_pass = merge
    try:
        out, _, calls, spec, plan = _run(oracle, scenes, name, guidance_scale=cfg)
    finally:
        eng.merge_reference_pass = True
    ts, ratio = _grid(eng)
    ref = reference_edit(eng, plan, spec)
    names = list(plan.images)
    cond, uncond = _cbar(eng, plan.prompts["source"]), _cbar(eng, "")
    ref_ctx = [_cbar(eng, plan.prompts[k]) for k in names]
    ip_cond = plan.images[plan.image_prompt_source].float().mean().item()
    guided = {0, 1, 2, 4, 6}
    bank_window = {"move": set(range(1, N)), "paste": set(range(0, 8)), "appearance": set(range(0, 8))}[name]
    cfg_rows = [uncond, cond] if cfg != 1.0 else [cond]
    it = iter(calls)
    passes_seen = []
    log = iter(ref.log)
    for i in range(N):
        t = ts[i]
        passes = 3 if i in {4, 6} else 1
        for u in range(passes):
            r = next(log)
            c = next(it)  # 1. the CFG call
            rows = len(cfg_rows)
            assert c.t == t and not c.grad, (i, u)
            torch.testing.assert_close(c.z[:rows], r["z_in"].expand(rows, -1, -1, -1), atol=1e-4, rtol=0)
            torch.testing.assert_close(c.ctx[:rows], torch.tensor(cfg_rows))
            in_bank = i in bank_window
            assert c.bank_mode == ("inject" if in_bank else "off") and (not in_bank or c.bank_step == i), (i, c.bank_mode)
            gamma = spec.image_prompt_scale if i in {1, 2, 3} else 0.0
            merged = merge and i in guided and u == 0 and gamma == 0.0
            if merged:  # the reference rows ride along: features of inv[N - i], own prompts
                assert c.z.shape[0] == rows + len(names) and c.inject_rows == rows
                for k, nm in enumerate(names):
                    torch.testing.assert_close(c.z[rows + k : rows + k + 1], ref.inverted[nm][N - i],
                                               atol=ATOL, rtol=0)
                torch.testing.assert_close(c.ctx[rows:], torch.tensor(ref_ctx))
            else:
                assert c.z.shape[0] == rows and c.inject_rows is None
            assert c.gamma == gamma, (i, c.gamma)
            assert c.ip is not None
            torch.testing.assert_close(c.ip[:rows], torch.tensor([UNCOND_IP, ip_cond][-rows:]))
            if i in guided:
                if u == 0 and not merged:  # 2a. reference features, no gradient, own prompts
                    c = next(it)
                    assert c.out is None and not c.grad and c.t == t and c.gamma == 0.0
                    assert c.bank_mode == "off"
                    for k, nm in enumerate(names):
                        torch.testing.assert_close(c.z[k : k + 1], ref.inverted[nm][N - i], atol=ATOL, rtol=0)
                    torch.testing.assert_close(c.ctx, torch.tensor(ref_ctx))
                c = next(it)  # 2b. the current latent's features, with gradient, conditional prompt
                assert c.out is None and c.grad and c.t == t and c.gamma == 0.0 and c.bank_mode == "off"
                torch.testing.assert_close(c.z, r["z_in"], atol=1e-4, rtol=0)
                torch.testing.assert_close(c.ctx, torch.tensor([cond]))
            if u < passes - 1:  # 4. time-travel rollback: eps at t - Δ, cond, bank and image prompt off
                c = next(it)
                assert c.t == t - ratio and c.z.shape[0] == 1 and not c.grad, (i, c.t)
                assert c.bank_mode == "off" and c.gamma == 0.0
                torch.testing.assert_close(c.ctx, torch.tensor([cond]))
            passes_seen.append(i)
    assert next(it, None) is None  # no other call
    partial = sum(c.out is None for c in calls)  # feature passes stopped after their last level
    assert out.counters["unet_partial"] == partial and out.counters["unet_forward"] == len(calls) - partial + N
    assert passes_seen == [i for i in range(N) for _ in range(3 if i in {4, 6} else 1)]


def test_rollback_evaluates_eps_at_the_lower_timestep(oracle, scenes):
    """Method reference §5: z_{t-Δ} goes back to z_t with ε_θ(z_{t-Δ}, t-Δ) (it used t)."""
    _, _, calls, *_ = _run(oracle, scenes, "move")
    ts, ratio = _grid(oracle.engine)
    # at CFG 4 every noise prediction has two rows or more: the batch-1 full calls are rollbacks
    rollbacks = [c.t for c in calls if c.z.shape[0] == 1 and c.out is not None]
    assert rollbacks == [ts[4] - ratio] * 2 + [ts[6] - ratio] * 2


def test_guidance_steps_without_energy_get_no_feature_pass(oracle, scenes):
    _, _, calls, *_ = _run(oracle, scenes, "move", energy_scale=0.0)
    assert not any(c.grad for c in calls) and len(calls) == N  # one CFG call per step, no travel


def test_a_masked_bank_without_parts_is_refused_by_the_engine(oracle, scenes):
    """Specs refuse it first; a plan built in Python that asks for it must not inject nothing."""
    from diffeditor.errors import SpecError

    spec = oracle.parse({**COMMON, **SPECS["move"]}, base_dir=scenes)
    _, plan, _ = oracle.prepare(spec)
    plan.attention.mode = "masked"
    with pytest.raises(SpecError, match="memory_bank: the plan names no parts"):
        oracle.engine.edit(plan, spec)


@pytest.mark.parametrize("name", ["move", "paste"])
def test_image_prompt_during_inversion(oracle, scenes, name):
    """``image_prompt_inversion``: the inversion adds the edit's image prompt with gamma inside
    its window (method reference §10.2 item 8) and is cached apart from the plain inversion."""
    out, inv_calls, _, spec, plan = _run(oracle, scenes, name, image_prompt_inversion=True)
    ip_cond = plan.images[plan.image_prompt_source].float().mean()
    for c in inv_calls:  # inversion goes from step N-1 down to 0
        assert c.gamma == (0.3 if c.bank_step in {1, 2, 3} else 0.0), c.bank_step
        torch.testing.assert_close(c.ip, ip_cond.expand(c.z.shape[0]))
    torch.testing.assert_close(out.latent, reference_edit(oracle.engine, plan, spec).latent, atol=ATOL, rtol=0)
    eng = oracle.engine
    plain = eng.edit(plan, spec.model_copy(update={"image_prompt_inversion": False}))
    assert not plain.inversion_cached  # another trajectory: not served from the cache
    assert (plain.latent - out.latent).abs().max() > 50 * ATOL


def test_float32_guidance_on_a_half_precision_model(oracle, scenes):
    """``guidance_precision: float32`` backpropagates through a float32 copy of a bfloat16 UNet:
    its guidance equals the float32 model's (same weights) where the bfloat16 pass does not."""
    eng32 = oracle.engine
    eng16 = analytic_engine(eng32, torch.bfloat16)
    spec = oracle.parse({**COMMON, **SPECS["move"]}, base_dir=scenes)
    _, plan, _ = oracle.prepare(spec)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(1, 4, 8, 8, generator=gen)
    t = torch.tensor(701)
    cond = eng16.encode_text([spec.prompt])  # bfloat16: the float32 model gets the same values
    refs = {"source": eng32.features(torch.randn(1, 4, 8, 8, generator=gen), t, cond.float(),
                                     spec.feature_levels, spec.feature_scale)}
    exact = eng32.guidance(z, t, cond.float(), refs, plan, spec)
    half = eng16.guidance(z, t, cond, refs, plan, spec)
    net32 = eng16._float32_net()
    assert next(net32.parameters()).dtype == torch.float32 and eng16.dtype == torch.bfloat16
    full = eng16.guidance(z, t, cond, refs, plan, spec, net32)
    eng16.image_prompt, saved = None, eng16.image_prompt  # a model without an image prompt too
    try:
        torch.testing.assert_close(eng16.guidance(z, t, cond, refs, plan, spec, net32), full)
    finally:
        eng16.image_prompt = saved
    err_half = (half - exact).abs().max().item()
    err_full = (full - exact).abs().max().item()
    # measured: bfloat16 off by 0.13 on a guidance term of 13.9; the float32 copy by 0.0
    assert err_full < 1e-4 * exact.abs().max().item() and err_half > 100 * err_full, (err_half, err_full)
    # the option reaches the loop: a whole edit runs with it, the UNet stays bfloat16
    net32.calls.clear()
    eng16.unet.calls.clear()
    res = eng16.edit(plan, spec.model_copy(update={"guidance_precision": "float32"}))
    assert torch.isfinite(res.latent).all() and eng16.dtype == torch.bfloat16
    passes = 5 + 2 * 2  # guided steps 0, 1, 2, 4, 6; steps 4 and 6 three passes each
    assert sum(c.grad for c in net32.calls) == passes and not any(c.grad for c in eng16.unet.calls)


@pytest.mark.parametrize("name", ["move", "appearance", "compose"])
def test_guidance_size_is_reported_and_bounded(oracle, scenes, name):
    """Every guided pass reports RMS(k·∇E)/RMS(ε) per region (the oracle's numbers); with
    ``guidance_clip`` each region's term is scaled down to that ratio, and only where above."""
    out, *_, spec, plan = _run(oracle, scenes, name)
    ref = reference_edit(oracle.engine, plan, spec)
    want = [r["ratio"] for r in ref.log if r["guided"]]
    assert [g["ratio"].keys() for g in out.guidance] == [w.keys() for w in want]
    for got, exp in zip(out.guidance, want):
        for region, ratio in exp.items():
            assert got["ratio"][region] == pytest.approx(ratio, rel=1e-3, abs=1e-7), region
    ratios = sorted(r for w in want for r in w.values())
    clip = ratios[len(ratios) // 2]  # bites on about half of the region terms
    out2, *_, spec2, plan2 = _run(oracle, scenes, name, guidance_clip=clip)
    ref2 = reference_edit(oracle.engine, plan2, spec2)
    torch.testing.assert_close(out2.latent, ref2.latent, atol=ATOL, rtol=0)
    assert (out2.latent - out.latent).abs().max() > 50 * ATOL
    # a bound above every ratio changes nothing
    out3, *_ = _run(oracle, scenes, name, guidance_clip=ratios[-1] * 1.01)
    torch.testing.assert_close(out3.latent, out.latent, atol=1e-6, rtol=0)


def test_step_callback_sees_each_step_and_can_stop_the_edit(oracle, scenes):
    """``Engine.edit(callback=...)``: called once per denoising step with the new latent and
    the step's x̂0 (the UI's live previews); raising in it stops the edit between steps, and the
    next edit (same inversion, now cached) is the uninterrupted one."""
    eng = oracle.engine
    seen = []
    spec = oracle.parse({**COMMON, **SPECS["drag"]}, base_dir=scenes)
    _, plan, _ = oracle.prepare(spec)
    eng.cache = type(eng.cache)(4)
    out = eng.edit(plan, spec, callback=lambda i, z, x0: seen.append((i, z.clone(), x0.clone())))
    assert [i for i, *_ in seen] == list(range(N))
    torch.testing.assert_close(seen[-1][1], out.latent, atol=0, rtol=0)
    for _, z, x0 in seen:
        assert x0.shape == z.shape and not torch.equal(x0, z)
    # the last step is nearly noise-free (alpha_prev ~ 1): its x̂0 is close to the result
    a_last = float(DDIMTimesteps.from_scheduler(eng.scheduler, N).alphas_prev[-1])
    assert a_last > 0.99
    assert (seen[-1][2] - out.latent).abs().max() < 0.1 * out.latent.abs().max()
    assert (seen[0][2] - out.latent).abs().max() > (seen[-1][2] - out.latent).abs().max()

    class Stop(Exception):
        pass

    def stop_at_3(i, z, x0):
        if i == 3:
            raise Stop

    eng.unet.calls.clear()
    with pytest.raises(Stop):
        eng.edit(plan, spec, callback=stop_at_3)
    stopped = len(eng.unet.calls)
    eng.unet.calls.clear()
    again = eng.edit(plan, spec)
    assert again.inversion_cached and stopped < len(eng.unet.calls)
    torch.testing.assert_close(again.latent, out.latent, atol=0, rtol=0)


# -- the DragonDiffusion sampler ----------------------------------------------------------------

DRAGON = {"schedule": {"guidance": [{"start": 0.0, "stop": 0.6}], "time_travel_repeats": 1,
                       "sde": {"steps": []}, "time_travel": {"steps": []},
                       "image_prompt": {"steps": []}},
          "sde_strength": 0.0, "sde_strength_outside": 0.0, "image_prompt_scale": 0.0}


@pytest.mark.parametrize("name", ["move", "paste"])
def test_dragondiffusion_sampler_equals_the_transcribed_configuration(oracle, scenes, name):
    """``sampler: dragondiffusion`` on a spec that asks for SDE, time travel and an image
    prompt = the transcribed method with guidance at every step of the first 60%, no SDE, no
    time travel, no image prompt (what the eval's "DragonDiffusion configuration" set by hand)."""
    out, _, calls, *_ = _run(oracle, scenes, name, sampler="dragondiffusion")
    spec = oracle.parse({**COMMON, **SPECS[name], **DRAGON}, base_dir=scenes)
    _, plan, _ = oracle.prepare(spec)
    ref = reference_edit(oracle.engine, plan, spec)
    assert [r["guided"] for r in ref.log] == [i < 6 for i in range(N)]
    assert not any(r["sde"] for r in ref.log)
    torch.testing.assert_close(out.latent, ref.latent, atol=ATOL, rtol=0)
    # every step guided once (one gradient pass per guided step), no rollback, no image prompt
    assert sum(c.grad for c in calls) == 6 and all(c.gamma == 0.0 for c in calls)
    assert [g["step"] for g in out.guidance] == [0, 1, 2, 3, 4, 5]
    default, *_ = _run(oracle, scenes, name)
    assert (default.latent - out.latent).abs().max() > 50 * ATOL
