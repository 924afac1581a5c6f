"""The fast path gives the plain path's edit: same seed, float32, CPU, stated tolerances.

Each speed or memory option is switched on alone and compared with the engine's plain path on
the trained shapes model. Tolerances are on the final latent (values of order 1): batching and
slicing change only the order of floating-point sums, so differences stay near 1e-5; the SDE
steps and the guidance gradients can amplify them a little over the run.
"""

from __future__ import annotations

import pytest
import torch
from conftest import write_disc_scene

from diffeditor.attention import BankAttnProcessor, set_attention_slicing

TOL = {"atol": 5e-4, "rtol": 5e-4}


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    return write_disc_scene(tmp_path_factory.mktemp("fast-path"), editable=True)


# one spec per memory-bank policy: replace (move), concat (drag), masked with two images (paste)
SPECS = {
    "move-cfg4": {"task": "move", "image": "i.png", "mask": "m.png", "offset": [30, 0], "steps": 8,
                  "guidance_scale": 4.0},
    "drag-cfg1": {"task": "drag", "image": "i.png", "mask": "e.png", "handles": [[40, 60]],
                  "targets": [[70, 60]], "steps": 8, "guidance_scale": 1.0},
    "paste-cfg4": {"task": "paste", "image": "i.png", "reference": "i.png", "reference_mask": "m.png",
                   "offset": [40, 0], "steps": 8, "guidance_scale": 4.0},
}


def _edit(editor, name, scene_dir, **fields):
    spec = dict(SPECS[name], prompt=f"fast-path {name}", **fields)
    return editor.edit(spec, base_dir=scene_dir)


# Measured on the 2-core CPU (float32, 8 steps), max |latent difference| from the default run:
#   spec        energy_scale 0   guidance_k 0   memory_bank off
#   drag-cfg1   1.005            0.745          0.147
#   move-cfg4   2.165            2.140          1.301
#   paste-cfg4  1.577            1.800          1.278
# i.e. 290x to 4300x TOL's atol. energy_scale 0 drops guidance and its time travel; guidance_k 0
# keeps every pass (time travel included) and drops only the energy gradient, so a fast path
# that lost the gradient, the reference features behind it or the memory bank (what the merged
# reference pass and attention slicing touch) could not pass at TOL.
SENSITIVITY = 100 * TOL["atol"]
SWITCHES = ({"energy_scale": 0.0}, {"guidance_k": 0.0}, {"memory_bank": "off"})


@pytest.mark.parametrize("name", sorted(SPECS))
def test_tolerance_is_far_below_the_effect_of_guidance_and_the_memory_bank(editor, scene_dir, name):
    """The comparisons in this file can fail: switching guidance or the memory bank off moves
    the final latent by far more than TOL, so a fast path that lost either would be caught."""
    default = _edit(editor, name, scene_dir).latent
    for fields in SWITCHES:
        off = _edit(editor, name, scene_dir, **fields).latent
        diff = float((off - default).abs().max())
        assert diff > SENSITIVITY, (
            f"{name} with {fields}: the final latent moved by only {diff:.2e} (needs > "
            f"{SENSITIVITY:.0e}); the fast-path tolerance would not notice this mechanism missing")


@pytest.mark.parametrize("name", sorted(SPECS))
def test_reference_pass_batched_into_the_cfg_call_matches_separate_passes(editor, scene_dir, name):
    eng = editor.engine
    assert eng.merge_reference_pass  # the default
    fast = _edit(editor, name, scene_dir)
    eng.merge_reference_pass = False
    try:
        plain = _edit(editor, name, scene_dir)
    finally:
        eng.merge_reference_pass = True
    nf, npl = fast.metadata["network_evaluations"], plain.metadata["network_evaluations"]
    guided_steps = npl["unet_partial"] - nf["unet_partial"]
    assert guided_steps > 0 and nf["merged_reference"] == guided_steps and npl["merged_reference"] == 0
    def sampling_calls(res):  # the inversion's forwards run once, in whichever edit came first
        return res.metadata["network_evaluations"]["unet_forward"] - (
            0 if res.metadata["inversion_cached"] else SPECS[name]["steps"])

    assert sampling_calls(fast) == sampling_calls(plain)  # the references ride along: no extra calls
    # paste's guidance (lambda 1500 on this model) amplifies float rounding: a latent difference
    # of 8.4e-6 becomes 2.3e-2 in its gradient, so with 1 thread the two orders of summation end
    # 1.4e-3 apart (5e-4 with 2 threads); 5e-3 is still 250x below paste's smallest switch
    # effect (1.28, test above)
    tol = {"atol": 5e-3, "rtol": 5e-3} if name == "paste-cfg4" else TOL
    torch.testing.assert_close(fast.latent, plain.latent, **tol)


def test_bank_rows_past_inject_rows_attend_to_themselves(editor):
    """The processor's row split: rows past ``inject_rows`` see exactly the bank-free result."""
    from diffeditor.attention import MemoryBank, memory_bank_patch
    from diffeditor.interfaces import AttentionPolicy

    eng = editor.engine
    ctx = eng.encode_text(["rows", "rows", "rows"])
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(501)
    bank = MemoryBank(mode="record", image_index={"source": 0})
    bank.step = 0
    with torch.no_grad(), memory_bank_patch(eng.unet, bank):
        eng.unet(z[:1] * 0.5, t, encoder_hidden_states=ctx[:1])  # record from another latent
        bank.policy = AttentionPolicy(mode="concat")
        bank.mode = "inject"
        bank.inject_rows = 2
        mixed = eng.unet(z, t, encoder_hidden_states=ctx).sample
        bank.inject_rows = None
        injected = eng.unet(z[:2], t, encoder_hidden_states=ctx[:2]).sample
        bank.mode = "off"
        own = eng.unet(z[2:], t, encoder_hidden_states=ctx[2:]).sample
    torch.testing.assert_close(mixed[:2], injected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2:], own, atol=1e-5, rtol=1e-5)
    assert (injected - eng.unet(z[:2], t, encoder_hidden_states=ctx[:2]).sample).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["move-cfg4", "drag-cfg1"])
def test_attention_slicing_matches_full_attention(editor, scene_dir, name):
    eng = editor.engine
    plain = _edit(editor, name, scene_dir)
    eng.set_memory_options(attention_slice=7)  # an odd size: the last slice is short
    try:
        procs = [m.processor for n, m in eng.unet.named_modules() if n.endswith(".attn1")]
        assert procs and all(isinstance(p, BankAttnProcessor) and p.query_chunk == 7 for p in procs)
        sliced = _edit(editor, name, scene_dir)
        assert sliced.metadata["options"]["attention_slice"] == 7
    finally:
        eng.set_memory_options()
    assert all(type(m.processor).__name__ == "AttnProcessor2_0"
               for n, m in eng.unet.named_modules() if n.endswith(".attn1"))
    torch.testing.assert_close(sliced.latent, plain.latent, **TOL)


def test_attention_slicing_rejects_a_bad_size(editor):
    with pytest.raises(ValueError, match="positive"):
        set_attention_slicing(editor.engine.unet, 0)


def test_vae_slicing_matches_batched_vae(editor):
    eng = editor.engine
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = eng.encode_image(x)
    img = eng.decode(z)
    eng.set_memory_options(vae_slicing=True)
    try:
        z2 = eng.encode_image(x)
        img2 = eng.decode(z2)
    finally:
        eng.set_memory_options()
    torch.testing.assert_close(z2, z, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(img2, img, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_compiled_unet_matches_eager(editor, scene_dir):
    """torch.compile over the whole UNet: dynamo's graphs (with breaks at the memory bank's
    processors), the feature hooks and the backward pass give the eager edit. The ``aot_eager``
    backend keeps this test to seconds on a CPU; ``inductor`` differs only in code generation."""
    eng = editor.engine
    spec = dict(SPECS["move-cfg4"], steps=3, guidance_scale=1.0, prompt="compiled")
    plain = editor.edit(spec, base_dir=scene_dir)
    # the CUDA-graph mode's wrapper (new cudagraph step per call, outputs and hooked features
    # copied) is what runs; on a CPU backend the mode itself has no effect
    eng.compile("reduce-overhead", backend="aot_eager")
    try:
        assert eng.net is not eng.unet and getattr(eng.net, "clone_features", False)
        assert not eng.batched_region_grads  # compiled backward graphs: one pass per region
        # asking for the batched backward anyway exercises the fallback: when vmap cannot batch
        # through the compiled graph, the feature pass is rebuilt and each region done alone
        eng.batched_region_grads = True
        fast = editor.edit(spec, base_dir=scene_dir)
        assert fast.metadata["options"]["compile"] == "reduce-overhead (aot_eager)"
    finally:
        eng.compile(None)
    assert eng.net is eng.unet and eng.options["compile"] is None
    nf, npl = fast.metadata["network_evaluations"], plain.metadata["network_evaluations"]
    for key in ("unet_backward", "merged_reference"):
        assert nf[key] == npl[key], key
    # the fallback rebuilt one feature pass at most, once, and stayed off afterwards
    assert npl["unet_partial"] <= nf["unet_partial"] <= npl["unet_partial"] + 1
    torch.testing.assert_close(fast.latent, plain.latent, **TOL)


def test_compile_rejects_an_unknown_mode(editor):
    with pytest.raises(ValueError, match="reduce-overhead"):
        editor.engine.compile("fastest")
