"""The one private diffusers call the image prompt relies on, pinned.

:func:`diffeditor.image_prompt.attach_image_prompt` hands validated weights to
``UNet2DConditionModel._load_ip_adapter_weights`` (diffusers' UNet-side IP-Adapter loader; the
public ``pipe.load_ip_adapter`` wraps it but also loads a CLIP encoder from the hub and cannot
keep our custom self-attention processors). These tests call the private method *directly*, with
no diffeditor code in between, and check each behaviour we rely on; pyproject.toml pins
diffusers to the range they were checked on. A diffusers upgrade that changes any of it fails
here, by name, instead of deep inside an edit.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import IPAdapterPlusImageProjection, MultiIPAdapterImageProjection
from test_image_prompt import TINY_CLIP_WIDTH, cross_attention_layers, make_ip_state_dict, tiny_unet


@pytest.fixture
def loaded():
    torch.set_num_threads(1)
    unet = tiny_unet()
    layers = cross_attention_layers(unet)
    sd = make_ip_state_dict(layers, cross_dim=32, clip_dim=TINY_CLIP_WIDTH, width=64, heads=1)
    before = dict(unet.attn_processors)
    unet._load_ip_adapter_weights([sd], low_cpu_mem_usage=False)
    return unet, sd, layers, before


def test_signature_takes_a_list_of_state_dicts_and_low_cpu_mem_usage():
    params = inspect.signature(UNet2DConditionModel._load_ip_adapter_weights).parameters
    assert list(params)[:2] == ["self", "state_dicts"]
    assert "low_cpu_mem_usage" in params


def test_builds_the_plus_projection_from_image_proj(loaded):
    unet, sd, _, _ = loaded
    assert isinstance(unet.encoder_hid_proj, MultiIPAdapterImageProjection)
    (proj,) = unet.encoder_hid_proj.image_projection_layers
    assert isinstance(proj, IPAdapterPlusImageProjection)
    assert unet.config.encoder_hid_dim_type == "ip_image_proj"
    assert torch.equal(proj.latents.detach(), sd["image_proj"]["latents"])
    assert torch.equal(proj.proj_in.weight.detach(), sd["image_proj"]["proj_in.weight"])
    # the original to_kv is split into diffusers' to_k / to_v
    k, v = sd["image_proj"]["layers.0.0.to_kv.weight"].chunk(2, dim=0)
    got = [p.detach() for p in proj.parameters()]
    assert any(torch.equal(t, k) for t in got), "to_kv's K half not found"
    assert any(torch.equal(t, v) for t in got), "to_kv's V half not found"


def test_cross_attention_gets_ip_processors_keyed_by_processor_index(loaded):
    unet, sd, layers, before = loaded
    procs = unet.attn_processors
    names = [n for n in before]
    for index, _ in layers:
        name = names[index]
        proc = procs[name]
        assert isinstance(proc, IPAdapterAttnProcessor2_0), name
        assert isinstance(proc.scale, list) and len(proc.scale) == 1
        assert torch.equal(proc.to_k_ip[0].weight.detach(), sd["ip_adapter"][f"{index}.to_k_ip.weight"])
        assert torch.equal(proc.to_v_ip[0].weight.detach(), sd["ip_adapter"][f"{index}.to_v_ip.weight"])


def test_other_processors_are_recreated_as_type_of_old(loaded):
    """We rely on this to keep custom self-attention processors: attach gives diffusers plain
    ``AttnProcessor2_0`` there and puts ours back afterwards."""
    unet, _, layers, before = loaded
    cross = {list(before)[i] for i, _ in layers}
    for name, old in before.items():
        if name in cross:
            continue
        new = unet.attn_processors[name]
        assert type(new) is type(old) and isinstance(new, AttnProcessor2_0)


def test_scale_list_drives_the_image_branch(loaded):
    unet, *_ = loaded
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 8, 8, generator=gen)
    text = torch.randn(1, 8, 32, generator=gen)
    clip = torch.randn(1, 1, 5, TINY_CLIP_WIDTH, generator=gen)

    def run(scale):
        for p in unet.attn_processors.values():
            if isinstance(p, IPAdapterAttnProcessor2_0):
                p.scale = [scale]
        with torch.no_grad():
            return unet(z, 10, encoder_hidden_states=text,
                        added_cond_kwargs={"image_embeds": [clip]}).sample

    off, on = run(0.0), run(1.0)
    assert not torch.allclose(off, on)
    assert torch.equal(off, run(0.0))


def test_pinned_diffusers_range_is_declared():
    """The range these tests were run on is the one pyproject.toml declares."""
    import re
    from pathlib import Path

    import diffusers

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    m = re.search(r'"diffusers>=([\d.]+),<([\d.]+)"', text)
    assert m, "pyproject.toml must pin diffusers to a range (>=low,<high)"
    low, high = (tuple(int(x) for x in v.split(".")) for v in m.groups())
    have = tuple(int(x) for x in re.findall(r"\d+", diffusers.__version__)[:3])
    assert low <= have < high, f"diffusers {diffusers.__version__} is outside {m.group(0)}"
