"""Tests for diffeditor.image_prompt (the IP-Adapter-Plus image prompt on diffusers).

Everything runs on the CPU with random weights: SD 1.5 shapes are checked on a meta-device UNet
(no memory, no init cost), numerics on tiny random models, and one test uses the small trained
shapes model when it is present.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHAPES_MODEL  # noqa: E402  (the installed shapes plugin's model)
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import IPAdapterPlusImageProjection, MultiIPAdapterImageProjection
from PIL import Image

from diffeditor.image_prompt import (
    ImagePromptEncoder,
    ImagePromptError,
    attach_image_prompt,
    detach_image_prompt,
    has_image_prompt,
    image_prompt_attached,
    image_prompt_kwargs,
    load_ip_state_dict,
    set_image_prompt_scale,
    validate_ip_state_dict,
)

# SD 1.5 / ip_sd15_64.bin constants.
SD15_UNET_CONFIG = {
    "block_out_channels": (320, 640, 1280, 1280),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "layers_per_block": 2,
    "sample_size": 64,
}
# The 16 cross-attention (attn2) processors of SD 1.5, as (index in unet.attn_processors, width):
# down blocks 0-2 (2 each), up blocks 1-3 (3 each), then the mid block, which diffusers lists last.
SD15_IP_LAYERS = [
    (1, 320), (3, 320), (5, 640), (7, 640), (9, 1280), (11, 1280),
    (13, 1280), (15, 1280), (17, 1280), (19, 640), (21, 640), (23, 640),
    (25, 320), (27, 320), (29, 320), (31, 1280),
]  # fmt: skip
VIT_H_WIDTH = 1280
SD15_RESAMPLER_PARAMS = 29_955_072
SD15_KV_PARAMS = 19_169_280


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def make_ip_state_dict(
    layers: list[tuple[int, int]],
    cross_dim: int,
    clip_dim: int,
    width: int,
    heads: int,
    num_queries: int = 64,
    depth: int = 4,
    seed: int = 0,
) -> dict[str, dict[str, torch.Tensor]]:
    """A random state dict with the key names of IP-Adapter-Plus files (``ip_sd15_64.bin``).

    ``image_proj`` is the original Resampler layout (PerceiverAttention ``layers.i.0.*`` with
    norm1/norm2/to_q/to_kv/to_out, FeedForward ``layers.i.1.{0,1,3}``), ``ip_adapter`` holds one
    bias-free to_k_ip/to_v_ip pair (width x cross_dim) per cross-attention processor index.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float | None = None) -> torch.Tensor:
        scale = std if std is not None else shape[-1] ** -0.5
        return torch.randn(*shape, generator=gen) * scale

    def norm(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return 1 + 0.1 * torch.randn(n, generator=gen), 0.1 * torch.randn(n, generator=gen)

    inner = heads * 64
    proj: dict[str, torch.Tensor] = {
        "latents": rand(1, num_queries, width),
        "proj_in.weight": rand(width, clip_dim),
        "proj_in.bias": rand(width, std=0.02),
        "proj_out.weight": rand(cross_dim, width),
        "proj_out.bias": rand(cross_dim, std=0.02),
    }
    proj["norm_out.weight"], proj["norm_out.bias"] = norm(cross_dim)
    for i in range(depth):
        a, f = f"layers.{i}.0", f"layers.{i}.1"
        proj[f"{a}.norm1.weight"], proj[f"{a}.norm1.bias"] = norm(width)
        proj[f"{a}.norm2.weight"], proj[f"{a}.norm2.bias"] = norm(width)
        proj[f"{a}.to_q.weight"] = rand(inner, width)
        proj[f"{a}.to_kv.weight"] = rand(2 * inner, width)
        proj[f"{a}.to_out.weight"] = rand(width, inner)
        proj[f"{f}.0.weight"], proj[f"{f}.0.bias"] = norm(width)
        proj[f"{f}.1.weight"] = rand(4 * width, width)
        proj[f"{f}.3.weight"] = rand(width, 4 * width)
    ip = {}
    for index, hidden in layers:
        ip[f"{index}.to_k_ip.weight"] = rand(hidden, cross_dim)
        ip[f"{index}.to_v_ip.weight"] = rand(hidden, cross_dim)
    return {"image_proj": proj, "ip_adapter": ip}


def cross_attention_layers(unet: UNet2DConditionModel) -> list[tuple[int, int]]:
    """(processor index, layer width) of each attn2 layer, read off the modules themselves."""
    out = []
    for index, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            out.append(
                (index, unet.get_submodule(name.removesuffix(".processor")).to_k.out_features)
            )
    return out


def count(sd: dict[str, dict[str, torch.Tensor]]) -> int:
    return sum(t.numel() for group in sd.values() for t in group.values())


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD-1.x layout (cross-attention down/up blocks, plain outermost blocks) at tiny widths."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


TINY_CLIP_WIDTH = 32


def reference_resampler(proj: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """IP-Adapter-Plus Resampler forward written out from the original key layout.

    Independent of diffusers: checks that diffusers' key conversion (to_kv split, norm names,
    feed-forward indices) keeps the released weights' meaning.
    """
    latents = proj["latents"].expand(x.shape[0], -1, -1)
    x = F.linear(x, proj["proj_in.weight"], proj["proj_in.bias"])
    width = latents.shape[-1]
    for i in range(4):
        p = f"layers.{i}.0."
        xs = F.layer_norm(x, (width,), proj[p + "norm1.weight"], proj[p + "norm1.bias"])
        lat = F.layer_norm(latents, (width,), proj[p + "norm2.weight"], proj[p + "norm2.bias"])
        q = F.linear(lat, proj[p + "to_q.weight"])
        k, v = F.linear(torch.cat([xs, lat], dim=1), proj[p + "to_kv.weight"]).chunk(2, dim=-1)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(lat.shape[0], lat.shape[1], -1)
        latents = F.linear(out, proj[p + "to_out.weight"]) + latents
        f = f"layers.{i}.1."
        h = F.layer_norm(latents, (width,), proj[f + "0.weight"], proj[f + "0.bias"])
        latents = (
            F.linear(F.gelu(F.linear(h, proj[f + "1.weight"])), proj[f + "3.weight"]) + latents
        )
    out = F.linear(latents, proj["proj_out.weight"], proj["proj_out.bias"])
    return F.layer_norm(out, (out.shape[-1],), proj["norm_out.weight"], proj["norm_out.bias"])


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy CPU they can be 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd15_unet() -> UNet2DConditionModel:
    """SD 1.5's UNet (860M params) on the meta device: real module shapes, no memory."""
    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET_CONFIG)


@pytest.fixture(scope="module")
def sd15_ip() -> dict[str, dict[str, torch.Tensor]]:
    return make_ip_state_dict(
        SD15_IP_LAYERS, cross_dim=768, clip_dim=VIT_H_WIDTH, width=768, heads=12
    )


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=TINY_CLIP_WIDTH,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny() -> Iterator[tuple[UNet2DConditionModel, dict[str, dict[str, torch.Tensor]]]]:
    unet = tiny_unet()
    sd = make_ip_state_dict(
        cross_attention_layers(unet), cross_dim=32, clip_dim=TINY_CLIP_WIDTH, width=64, heads=1
    )
    yield unet, sd


def run_unet(unet: UNet2DConditionModel, clip: torch.Tensor | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    text = torch.randn(2, 8, 32, generator=gen)
    kwargs = {} if clip is None else {"added_cond_kwargs": image_prompt_kwargs(clip)}
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=text, **kwargs).sample


def clip_tokens(batch: int = 2, tokens: int = 17, seed: int = 2) -> torch.Tensor:
    return torch.randn(
        batch, tokens, TINY_CLIP_WIDTH, generator=torch.Generator().manual_seed(seed)
    )


# ----------------------------------------------------------------------------------------------
# 1. The real SD 1.5 file layout
# ----------------------------------------------------------------------------------------------


def test_sd15_file_layout_counts_and_validates(sd15_unet, sd15_ip, tmp_path):
    assert len(sd15_ip["ip_adapter"]) == 32  # 16 cross-attention layers x (K, V)
    assert sum(t.numel() for t in sd15_ip["image_proj"].values()) == SD15_RESAMPLER_PARAMS
    assert sum(t.numel() for t in sd15_ip["ip_adapter"].values()) == SD15_KV_PARAMS
    assert count(sd15_ip) == pytest.approx(49.1e6, rel=2e-3)
    # The hand-written layer table agrees with the UNet's own modules.
    assert cross_attention_layers(sd15_unet) == SD15_IP_LAYERS

    path = tmp_path / "ip_sd15_64.bin"
    torch.save(sd15_ip, path)
    loaded = load_ip_state_dict(path)
    assert set(loaded) == {"image_proj", "ip_adapter"}
    assert loaded["image_proj"].keys() == sd15_ip["image_proj"].keys()
    assert torch.equal(loaded["image_proj"]["latents"], sd15_ip["image_proj"]["latents"])
    validate_ip_state_dict(loaded, sd15_unet, num_tokens=64, image_embed_dim=VIT_H_WIDTH)


def test_sd15_attach_builds_diffusers_plus_projection(sd15_unet, sd15_ip):
    with image_prompt_attached(sd15_unet, sd15_ip, scale=0.1):
        proj = sd15_unet.encoder_hid_proj
        assert isinstance(proj, MultiIPAdapterImageProjection)
        (layer,) = proj.image_projection_layers
        assert isinstance(layer, IPAdapterPlusImageProjection)
        assert tuple(layer.latents.shape) == (1, 64, 768)
        assert len(layer.layers) == 4
        assert layer.layers[0].attn.heads == 12
        assert layer.proj_in.in_features == VIT_H_WIDTH
        assert sd15_unet.config.encoder_hid_dim_type == "ip_image_proj"
        ip_procs = {
            i: p
            for i, p in enumerate(sd15_unet.attn_processors.values())
            if isinstance(p, IPAdapterAttnProcessor2_0)
        }
        assert [(i, p.hidden_size) for i, p in ip_procs.items()] == SD15_IP_LAYERS
        assert all(p.num_tokens == [64] and p.scale == [0.1] for p in ip_procs.values())
        assert has_image_prompt(sd15_unet)
    assert not has_image_prompt(sd15_unet)
    assert sd15_unet.encoder_hid_proj is None
    assert sd15_unet.config.encoder_hid_dim_type is None


def test_safetensors_round_trip(tiny, tmp_path):
    from safetensors.torch import save_file

    unet, sd = tiny
    flat = {f"{group}.{k}": v.contiguous() for group, d in sd.items() for k, v in d.items()}
    save_file(flat, tmp_path / "ip.safetensors")
    loaded = load_ip_state_dict(tmp_path / "ip.safetensors")
    validate_ip_state_dict(loaded, unet)
    assert all(torch.equal(loaded[g][k], sd[g][k]) for g in sd for k in sd[g])


# ----------------------------------------------------------------------------------------------
# 2. Validation errors name the key
# ----------------------------------------------------------------------------------------------


def _copy(sd):
    return {g: dict(d) for g, d in sd.items()}


def test_wrong_shape_names_key_and_shapes(sd15_unet, sd15_ip):
    bad = _copy(sd15_ip)
    bad["ip_adapter"]["19.to_v_ip.weight"] = torch.zeros(320, 768)
    with pytest.raises(ImagePromptError) as err:
        validate_ip_state_dict(bad, sd15_unet)
    message = str(err.value)
    assert "ip_adapter.19.to_v_ip.weight" in message
    assert "(640, 768)" in message and "(320, 768)" in message

    bad = _copy(sd15_ip)
    bad["image_proj"]["layers.2.1.3.weight"] = torch.zeros(768, 3000)
    with pytest.raises(
        ImagePromptError, match=r"image_proj\.layers\.2\.1\.3\.weight.*\(768, 3072\)"
    ):
        validate_ip_state_dict(bad, sd15_unet)


def test_missing_and_unexpected_keys_are_named(sd15_unet, sd15_ip):
    bad = _copy(sd15_ip)
    del bad["image_proj"]["layers.3.0.to_kv.weight"]
    with pytest.raises(ImagePromptError, match=r"image_proj\.layers\.3\.0\.to_kv\.weight: missing"):
        validate_ip_state_dict(bad, sd15_unet)

    bad = _copy(sd15_ip)
    del bad["ip_adapter"]["31.to_k_ip.weight"]  # the mid block's layer
    with pytest.raises(ImagePromptError, match=r"ip_adapter\.31\.to_k_ip\.weight: missing"):
        validate_ip_state_dict(bad, sd15_unet)

    bad = _copy(sd15_ip)
    bad["ip_adapter"]["2.to_k_ip.weight"] = torch.zeros(320, 768)  # an attn1 index
    with pytest.raises(ImagePromptError, match=r"ip_adapter\.2\.to_k_ip\.weight: unexpected"):
        validate_ip_state_dict(bad, sd15_unet)

    bad = _copy(sd15_ip)
    bad["image_proj"].update({f"layers.4.0.{k}": v for k, v in [("norm1.weight", torch.ones(768))]})
    with pytest.raises(
        ImagePromptError, match=r"image_proj\.layers\.4\.0\.norm1\.weight: unexpected"
    ):
        validate_ip_state_dict(bad, sd15_unet)

    with pytest.raises(ImagePromptError, match="'ip_adapter'"):
        validate_ip_state_dict({"image_proj": sd15_ip["image_proj"]}, sd15_unet)


def test_wrong_model_kind_is_refused(sd15_unet, sd15_ip):
    # 16 queries instead of 64.
    bad = make_ip_state_dict(SD15_IP_LAYERS, 768, VIT_H_WIDTH, 768, 12, num_queries=16)
    with pytest.raises(
        ImagePromptError, match=r"image_proj\.latents.*\(1, 64, 768\).*\(1, 16, 768\)"
    ):
        validate_ip_state_dict(bad, sd15_unet)
    # A plain IP-Adapter projection (4 tokens from pooled embeds).
    plain = {"image_proj": {"proj.weight": torch.zeros(4 * 768, 1024)}, "ip_adapter": {}}
    with pytest.raises(ImagePromptError, match=r"image_proj\.latents.*missing"):
        validate_ip_state_dict(plain, sd15_unet)
    # Output dim for a different base model (SD 2.x has cross_attention_dim 1024).
    sd2 = make_ip_state_dict(SD15_IP_LAYERS, 1024, VIT_H_WIDTH, 768, 12)
    with pytest.raises(ImagePromptError, match=r"proj_out\.weight: expected shape \(768, 768\)"):
        validate_ip_state_dict(sd2, sd15_unet)
    # Wrong CLIP width when the caller states it.
    with pytest.raises(ImagePromptError, match=r"proj_in\.weight"):
        validate_ip_state_dict(sd15_ip, sd15_unet, image_embed_dim=1024)
    # Integer tensors.
    bad = _copy(sd15_ip)
    bad["ip_adapter"]["1.to_k_ip.weight"] = torch.zeros(320, 768, dtype=torch.int64)
    with pytest.raises(ImagePromptError, match=r"ip_adapter\.1\.to_k_ip\.weight.*floating"):
        validate_ip_state_dict(bad, sd15_unet)


def test_failed_attach_leaves_unet_untouched(tiny):
    unet, sd = tiny
    before = run_unet(unet)
    bad = _copy(sd)
    bad["ip_adapter"]["1.to_k_ip.weight"] = torch.zeros(3, 3)
    with pytest.raises(ImagePromptError, match=r"ip_adapter\.1\.to_k_ip\.weight"):
        attach_image_prompt(unet, bad)
    assert not has_image_prompt(unet)
    assert torch.equal(run_unet(unet), before)


# ----------------------------------------------------------------------------------------------
# 3. Loading is safe
# ----------------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_Payload, _ExecPayload])
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, payload, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "ip_sd15_64.bin"
    obj = {"image_proj": {"latents": torch.zeros(1)}, "ip_adapter": payload(marker)}
    if writer == "pickle":
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)
    else:
        torch.save(obj, path)
    with pytest.raises(ImagePromptError, match="safely") as err:
        load_ip_state_dict(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_missing_file_and_bad_paths(tmp_path):
    missing = tmp_path / "nope" / "ip_sd15_64.bin"
    with pytest.raises(ImagePromptError) as err:
        load_ip_state_dict(missing)
    assert str(missing) in str(err.value) and "diffeditor download" in str(err.value)
    with pytest.raises(ImagePromptError, match="is a folder"):
        load_ip_state_dict(tmp_path)
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"x")
    with pytest.raises(ImagePromptError, match="unknown file type"):
        load_ip_state_dict(odd)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ImagePromptError, match="garbage.bin"):
        load_ip_state_dict(garbage)
    not_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(ImagePromptError, match="expected a dict"):
        load_ip_state_dict(not_dict)


# ----------------------------------------------------------------------------------------------
# 4. The whole path on tiny models
# ----------------------------------------------------------------------------------------------


def test_encoder_whole_path_on_tiny_models(tiny, tiny_clip_dir):
    unet, sd = tiny
    encoder = ImagePromptEncoder.from_pretrained(tiny_clip_dir, device="cpu", dtype=torch.float32)
    images = [
        Image.new("RGB", (300, 200), (200, 30, 30)),
        Image.effect_noise((64, 64), 40).convert("RGB"),
    ]
    cond = encoder.encode(images)
    assert cond.shape == (2, 17, TINY_CLIP_WIDTH)  # (32/8)^2 patches + CLS
    pixels = encoder.preprocess(images)
    assert pixels.shape == (2, 3, 32, 32)
    # A [0, 1] tensor takes the same path as the equivalent PIL image.
    as_tensor = torch.stack([torch.from_numpy(np.array(im)) for im in images[1:]])
    as_tensor = as_tensor.permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(encoder.encode(as_tensor), cond[1:], rtol=0, atol=1e-6)
    # Unconditional = CLIP of zero pixel values.
    uncond = encoder.encode_unconditional(2)
    assert uncond.shape == cond.shape
    direct = encoder.model(torch.zeros(1, 3, 32, 32), output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(uncond[:1], direct)

    baseline = run_unet(unet)
    attach_image_prompt(unet, sd, scale=0.0)
    assert has_image_prompt(unet)
    clip = torch.cat([uncond[:1], cond[:1]])
    torch.testing.assert_close(run_unet(unet, clip), baseline)
    set_image_prompt_scale(unet, 0.5)
    with_prompt = run_unet(unet, clip)
    assert (with_prompt - baseline).abs().max() > 1e-3
    # diffusers' own (B, 1, N, D) layout gives the same result as (B, N, D).
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        sample, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 8, 32, generator=gen)
        four_d = unet(
            sample,
            10,
            encoder_hidden_states=text,
            added_cond_kwargs={"image_embeds": [clip[:, None]]},
        ).sample
    assert torch.equal(four_d, with_prompt)
    detach_image_prompt(unet)
    assert torch.equal(run_unet(unet), baseline)


def test_detach_restores_bit_identical_unet(tiny):
    unet, sd = tiny
    baseline = run_unet(unet)
    state_before = {k: v.clone() for k, v in unet.state_dict().items()}
    processors_before = unet.attn_processors
    config_before = dict(unet.config)
    slot_before = "encoder_hid_proj" in unet._modules

    attach_image_prompt(unet, sd, scale=0.7)
    assert any(".processor.to_k_ip.0.weight" in k for k in unet.state_dict())
    attach_image_prompt(unet, sd, scale=0.3)  # re-attaching replaces the first one
    assert all(
        p.scale == [0.3]
        for p in unet.attn_processors.values()
        if isinstance(p, IPAdapterAttnProcessor2_0)
    )
    detach_image_prompt(unet)

    assert torch.equal(run_unet(unet), baseline)
    state_after = unet.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())
    assert all(unet.attn_processors[n] is p for n, p in processors_before.items())
    assert dict(unet.config) == config_before
    assert unet.config.encoder_hid_dim_type is None and unet.encoder_hid_proj is None
    assert ("encoder_hid_proj" in unet._modules) == slot_before
    assert not hasattr(unet, "text_encoder_hid_proj")
    with pytest.raises(ImagePromptError, match="no image prompt attached"):
        detach_image_prompt(unet)


def test_context_manager_restores_on_error(tiny):
    unet, sd = tiny
    baseline = run_unet(unet)
    with pytest.raises(RuntimeError, match="boom"), image_prompt_attached(unet, sd, scale=1.0):
        assert has_image_prompt(unet)
        raise RuntimeError("boom")
    assert not has_image_prompt(unet)
    assert torch.equal(run_unet(unet), baseline)


def test_diffusers_resampler_matches_original_layout(tiny):
    unet, sd = tiny
    attach_image_prompt(unet, sd)
    layer = unet.encoder_hid_proj.image_projection_layers[0]
    x = clip_tokens()
    with torch.no_grad():
        got = layer(x)
        via_unet = unet.encoder_hid_proj([x])[0]
    expected = reference_resampler(sd["image_proj"], x, heads=1)
    assert got.shape == (2, 64, 32)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(via_unet[:, 0], expected, rtol=1e-4, atol=1e-5)
    # K/V weights landed in the right layers.
    names = list(unet.attn_processors)
    for index, _ in cross_attention_layers(unet):
        proc = unet.attn_processors[names[index]]
        assert torch.equal(proc.to_k_ip[0].weight, sd["ip_adapter"][f"{index}.to_k_ip.weight"])
        assert torch.equal(proc.to_v_ip[0].weight, sd["ip_adapter"][f"{index}.to_v_ip.weight"])


def test_scale_setter_is_cheap_and_checked(tiny):
    unet, sd = tiny
    with pytest.raises(ImagePromptError, match="attach_image_prompt first"):
        set_image_prompt_scale(unet, 0.1)
    attach_image_prompt(unet, sd)
    procs = [p for p in unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]
    assert len(procs) == 7
    for gamma in (0.1, 0.0, 1.0):
        set_image_prompt_scale(unet, gamma)
        current = [
            p for p in unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)
        ]
        assert all(a is b for a, b in zip(current, procs))  # no reloading
        assert all(p.scale == [gamma] for p in current)
    for bad in (float("nan"), float("inf"), "x"):
        with pytest.raises(ImagePromptError):
            set_image_prompt_scale(unet, bad)


def test_custom_self_attention_processors_survive(tiny):
    """diffusers re-creates attn1 processors as type(p)(); ours must be kept as they are."""

    class MemoryBankProcessor(AttnProcessor2_0):
        def __init__(self, tag: str) -> None:
            super().__init__()
            self.tag = tag

    unet, sd = tiny
    custom = {
        name: MemoryBankProcessor(name) if name.endswith("attn1.processor") else proc
        for name, proc in unet.attn_processors.items()
    }
    unet.set_attn_processor(dict(custom))
    attach_image_prompt(unet, sd, scale=0.2)
    for name, proc in unet.attn_processors.items():
        if name.startswith("encoder_hid_proj."):
            continue  # the resampler's own attention layers
        if name.endswith("attn1.processor"):
            assert proc is custom[name]
        else:
            assert isinstance(proc, IPAdapterAttnProcessor2_0)
    detach_image_prompt(unet)
    assert all(unet.attn_processors[n] is p for n, p in custom.items())


def test_bad_embeds_layout_is_explained(tiny):
    unet, sd = tiny
    attach_image_prompt(unet, sd, scale=0.5)
    with pytest.raises(ImagePromptError, match=r"\(B, N, D\)"):
        unet.encoder_hid_proj([torch.zeros(2, TINY_CLIP_WIDTH)])
    with pytest.raises(ImagePromptError, match="expects CLIP width 32"):
        unet.encoder_hid_proj([torch.zeros(2, 17, 48)])


def test_dtype_follows_unet_and_mixed_placement_is_refused(tiny):
    unet, sd = tiny
    half = tiny_unet().to(torch.bfloat16)
    with image_prompt_attached(half, sd, scale=0.5):
        assert half.encoder_hid_proj.image_projection_layers[0].latents.dtype == torch.bfloat16
        validate_ip_state_dict(sd, half)  # the resampler's own attention layers are ignored
        out = run_unet_typed(half, clip_tokens().to(torch.bfloat16))
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    unet.conv_in.to(torch.float64)
    with pytest.raises(ImagePromptError, match="several devices/dtypes"):
        attach_image_prompt(unet, sd)
    with pytest.raises(ImagePromptError, match=r"\(B, N, D\)"):
        image_prompt_kwargs(torch.zeros(2, 1, 17, TINY_CLIP_WIDTH))


def run_unet_typed(unet: UNet2DConditionModel, clip: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    dtype = unet.dtype
    sample = torch.randn(2, 4, 8, 8, generator=gen).to(dtype)
    text = torch.randn(2, 8, 32, generator=gen).to(dtype)
    with torch.no_grad():
        return unet(
            sample, 10, encoder_hidden_states=text, added_cond_kwargs=image_prompt_kwargs(clip)
        ).sample


def test_encoder_errors(tmp_path, tiny_clip_dir):
    with pytest.raises(ImagePromptError, match="not found.*diffeditor download"):
        ImagePromptEncoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(ImagePromptError, match="config.json"):
        ImagePromptEncoder.from_pretrained(tmp_path)
    encoder = ImagePromptEncoder.from_pretrained(tiny_clip_dir)
    with pytest.raises(ImagePromptError, match=r"\[0, 1\]"):
        encoder.encode(torch.full((1, 3, 8, 8), -1.0))
    with pytest.raises(ImagePromptError, match="RGB"):
        encoder.encode(torch.zeros(1, 4, 8, 8))


# ----------------------------------------------------------------------------------------------
# 5. The trained shapes model
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not (SHAPES_MODEL / "unet" / "config.json").is_file(),
    reason=f"shapes model not found at {SHAPES_MODEL} (set DIFFEDITOR_SHAPES_MODEL)",
)
def test_shapes_model_attach_and_validate():
    unet = UNet2DConditionModel.from_pretrained(
        SHAPES_MODEL / "unet", torch_dtype=torch.float32, local_files_only=True
    ).eval()
    assert unet.config.cross_attention_dim == 128
    layers = cross_attention_layers(unet)
    assert [i for i, _ in layers] == list(range(1, 2 * len(layers), 2))
    sd = make_ip_state_dict(layers, cross_dim=128, clip_dim=TINY_CLIP_WIDTH, width=64, heads=1)
    validate_ip_state_dict(sd, unet)

    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    text = torch.randn(2, 77, 128, generator=gen)
    clip = clip_tokens(tokens=17)
    with torch.no_grad():
        baseline = unet(sample, 500, encoder_hidden_states=text).sample
        with image_prompt_attached(unet, sd, scale=0.0):
            kwargs = image_prompt_kwargs(clip)
            off = unet(sample, 500, encoder_hidden_states=text, added_cond_kwargs=kwargs).sample
            set_image_prompt_scale(unet, 1.0)
            on = unet(sample, 500, encoder_hidden_states=text, added_cond_kwargs=kwargs).sample
        after = unet(sample, 500, encoder_hidden_states=text).sample
    torch.testing.assert_close(off, baseline)
    assert (on - baseline).abs().max() > 1e-4
    assert torch.equal(after, baseline)
