"""The memory bank and its attention processor (diffeditor.attention) against exact oracles:
diffusers' own ``AttnProcessor2_0``, attention written out by hand, and hand-picked K/V rows.

Model-free: tiny diffusers ``Attention`` modules and a tiny randomly initialised UNet, on a CPU.
These tests are part of the mutation-testing suite (docs/testing.md).
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from diffeditor.attention import (
    BankAttnProcessor,
    MemoryBank,
    attend,
    bank_layer_names,
    memory_bank_patch,
    self_attention_layers,
    set_attention_slicing,
)
from diffeditor.interfaces import AttentionPolicy

DECODER_ATTN1 = ["up_blocks.1.attentions.0.transformer_blocks.0.attn1",
                 "up_blocks.1.attentions.1.transformer_blocks.0.attn1"]
ALL_ATTN1 = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1", *DECODER_ATTN1,
             "mid_block.attentions.0.transformer_blocks.0.attn1"]


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval()


def tiny_attention(**kw) -> Attention:
    torch.manual_seed(1)
    kw = {"query_dim": 8, "heads": 2, "dim_head": 4, **kw}
    return Attention(**kw).eval()


def by_hand(q, k, v, heads):
    """softmax(q kᵀ/√d) v per head, heads interleaved as ``(h d)`` in the channels."""
    b, t, c = q.shape
    d = c // heads
    qh, kh, vh = (x.reshape(x.shape[0], x.shape[1], heads, d).transpose(1, 2) for x in (q, k, v))
    w = torch.softmax(qh @ kh.transpose(-1, -2) / d**0.5, dim=-1)
    return (w @ vh).transpose(1, 2).reshape(b, t, c)


@pytest.fixture
def sdpa_queries(monkeypatch):
    """The number of queries of every SDPA call from now on (attention slicing's bound)."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        calls.append(q.shape[2])
        return sdpa(q, k, v, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


# -- attend ------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 1, 3, 5, 7, 100])
@pytest.mark.parametrize("keys", [7, 12])  # own keys, or more (the bank concatenated)
def test_attend_is_multi_head_attention(chunk, keys, sdpa_queries):
    attn = types.SimpleNamespace(heads=2, norm_q=None, norm_k=None)
    q, k, v = randn(3, 7, 8, seed=1), randn(3, keys, 8, seed=2), randn(3, keys, 8, seed=3)
    out = attend(attn, q, k, v, chunk)
    torch.testing.assert_close(out, by_hand(q, k, v, 2), atol=1e-6, rtol=1e-5)
    # slicing bounds the attention matrix to `chunk` queries and covers every query once
    assert sum(sdpa_queries) == 7 and max(sdpa_queries) <= (chunk or 7)


def test_attend_normalises_queries_and_keys_per_head():
    # norm_q scales (a temperature), norm_k permutes within each head: both visible in the output
    attn = types.SimpleNamespace(heads=2, norm_q=lambda x: 3 * x, norm_k=lambda x: x.roll(1, -1))
    q, k, v = randn(2, 5, 8, seed=4), randn(2, 6, 8, seed=5), randn(2, 6, 8, seed=6)
    rolled = k.reshape(2, 6, 2, 4).roll(1, -1).reshape(2, 6, 8)
    for chunk in (None, 2):
        torch.testing.assert_close(attend(attn, q, k, v, chunk), by_hand(3 * q, rolled, v, 2),
                                   atol=1e-5, rtol=1e-5)


# -- the processor -----------------------------------------------------------------------------

CONFIGS = {
    "plain": ({}, (2, 6, 8)),
    "spatial": ({"norm_num_groups": 2, "residual_connection": True, "rescale_output_factor": 2.0},
                (2, 8, 2, 3)),  # 4-D input, group norm, residual and rescale (the VAE's layout)
    "qk_norm": ({"qk_norm": "layer_norm"}, (2, 6, 8)),
    "spatial_norm": ({"query_dim": 32, "spatial_norm_dim": 3}, (2, 32, 2, 3)),  # 32 groups
}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("bank_mode", [None, "off", "record"])
def test_processor_is_diffusers_attention(config, chunk, bank_mode, sdpa_queries):
    """Without injection the processor is diffusers' SDPA processor, whatever the layer, and
    sliced when asked."""
    kw, shape = CONFIGS[config]
    attn = tiny_attention(**kw)
    x = randn(*shape, seed=7)
    temb = randn(2, 3, 1, 2, seed=8) if "spatial_norm_dim" in kw else None
    want = AttnProcessor2_0()(attn, x, temb=temb)
    bank = None if bank_mode is None else MemoryBank(mode=bank_mode)
    sdpa_queries.clear()
    got = BankAttnProcessor("L", bank, chunk)(attn, x, temb=temb)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert sum(sdpa_queries) == 6 and max(sdpa_queries) <= (chunk or 6)


def test_processor_cross_attention_is_diffusers():
    attn = tiny_attention(cross_attention_dim=5)
    x, ctx = randn(2, 6, 8, seed=9), randn(2, 4, 5, seed=10)
    torch.testing.assert_close(BankAttnProcessor("L", None)(attn, x, ctx),
                               AttnProcessor2_0()(attn, x, ctx), atol=1e-6, rtol=1e-5)


def test_processor_records_the_layer_keys_and_values():
    attn = tiny_attention(norm_num_groups=2)
    x = randn(2, 8, 2, 3, seed=11)
    bank = MemoryBank(mode="record", step=4)
    BankAttnProcessor("up.attn1.processor", bank)(attn, x)
    tokens = attn.group_norm(x.flatten(2)).transpose(1, 2)  # (B, HW, C) after the group norm
    k, v = bank.store[(4, "up.attn1.processor")]
    assert list(bank.store) == [(4, "up.attn1.processor")]
    torch.testing.assert_close(k, attn.to_k(tokens), atol=0, rtol=0)
    torch.testing.assert_close(v, attn.to_v(tokens), atol=0, rtol=0)
    assert not k.requires_grad and not v.requires_grad


def _injected(attn, x, keys, values):
    """The processor's output when the queries of ``x`` attend to ``keys``/``values``."""
    out = by_hand(attn.to_q(x), keys, values, attn.heads)
    return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize("mode", ["replace", "concat"])
@pytest.mark.parametrize("batch, tokens, rows", [
    (3, 6, None), (3, 6, 1), (3, 6, 2), (3, 6, 3), (3, 6, 5),
    (4, 2, 2), (4, 2, 3),  # fewer tokens than rows
])
@pytest.mark.parametrize("chunk", [None, 2])
def test_processor_injects_the_bank_into_the_first_rows(mode, batch, tokens, rows, chunk,
                                                        sdpa_queries):
    attn = tiny_attention()
    x = randn(batch, tokens, 8, seed=12)
    bk, bv = randn(2, tokens, 8, seed=13), randn(2, tokens, 8, seed=14)
    bank = MemoryBank(policy=AttentionPolicy(mode=mode), mode="inject", step=2,
                      image_index={"source": 1}, inject_rows=rows)
    bank.store[(2, "L")] = (bk, bv)
    got = BankAttnProcessor("L", bank, chunk)(attn, x)
    n = batch if rows is None else min(rows, batch)
    own_k, own_v = attn.to_k(x), attn.to_v(x)
    src_k, src_v = bk[1:2].expand(batch, -1, -1), bv[1:2].expand(batch, -1, -1)
    if mode == "concat":
        src_k, src_v = torch.cat([own_k, src_k], 1), torch.cat([own_v, src_v], 1)
    want = torch.cat([_injected(attn, x, src_k, src_v)[:n], _injected(attn, x, own_k, own_v)[n:]])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert max(sdpa_queries) <= (chunk or tokens)  # sliced on both sides of the split


# -- MemoryBank --------------------------------------------------------------------------------


def test_record_keeps_only_the_steps_asked_for():
    k, v = randn(1, 4, 2).requires_grad_(True), randn(1, 4, 2, seed=1)
    bank = MemoryBank(mode="record", step=3)
    bank.record("L", k, v)
    assert list(bank.store) == [(3, "L")]
    rk, rv = bank.store[(3, "L")]
    assert torch.equal(rk, k) and torch.equal(rv, v) and not rk.requires_grad
    bank = MemoryBank(mode="record", step=3, record_steps=frozenset({1, 2}))
    bank.record("L", k, v)
    assert bank.store == {}
    bank.step = 2
    bank.record("L", k, v)
    assert list(bank.store) == [(2, "L")]


@pytest.mark.parametrize("recorded, asked, covers", [
    (None, None, True), (None, frozenset({1}), True),
    (frozenset({1, 2}), None, False), (frozenset({1, 2}), frozenset({1, 2}), True),
    (frozenset({1, 2}), frozenset({2}), True), (frozenset({1, 2}), frozenset({2, 3}), False),
    (frozenset(), frozenset(), True),
])
def test_covers(recorded, asked, covers):
    assert MemoryBank(record_steps=recorded).covers(asked) is covers


def test_nbytes_and_clear():
    bank = MemoryBank()
    bank.store[(0, "a")] = (torch.zeros(2, 64, 8), torch.zeros(2, 64, 8))
    bank.store[(1, "b")] = (torch.zeros(1, 16, 4, dtype=torch.float16),) * 2
    assert bank.nbytes() == 2 * 64 * 8 * 4 * 2 + 16 * 4 * 2 * 2
    bank._mask_cache[("x", 1)] = torch.ones(1, dtype=torch.bool)
    bank.clear()
    assert bank.store == {} and bank._mask_cache == {} and bank.nbytes() == 0


def test_token_mask_is_the_nearest_downsample_per_layer():
    bank = MemoryBank(latent_hw=(8, 16))
    mask = (randn(1, 1, 64, 128, seed=2) > 0).float()
    for tokens, (h, w) in ((128, (8, 16)), (32, (4, 8)), (8, (2, 4))):
        got = bank._token_mask("0:source", mask, tokens)
        assert got.dtype == torch.bool and got.shape == (tokens,)
        assert torch.equal(got, mask[0, 0, :: 64 // h, :: 128 // w].flatten().bool())
    # cached per (part, token count): another part's mask is not served from the cache
    other = bank._token_mask("1:reference", 1 - mask, 32)
    assert torch.equal(other, ~bank._token_mask("0:source", mask, 32))


def _bank(mode, rows=3, tokens=16, ch=4, **policy):
    """A bank at step 5, layer "L", recording 3 images (source is row 1) with distinct K/V."""
    bank = MemoryBank(policy=AttentionPolicy(mode=mode, **policy), mode="inject", step=5,
                      latent_hw=(4, 4), image_index={"reference": 0, "source": 1, "other": 2})
    k = torch.arange(rows * tokens * ch, dtype=torch.float32).reshape(rows, tokens, ch)
    bank.store[(5, "L")] = (k, -k - 1)
    return bank, k, -k - 1


OWN = torch.full((2, 16, 4), 0.5), torch.full((2, 16, 4), -0.5)


def test_inject_replace_and_concat_use_the_source_row():
    bank, bk, bv = _bank("replace")
    k, v = bank.inject("L", *OWN)
    assert torch.equal(k, bk[1:2].expand(2, -1, -1)) and torch.equal(v, bv[1:2].expand(2, -1, -1))
    bank, bk, bv = _bank("concat")
    k, v = bank.inject("L", *OWN)
    assert torch.equal(k, torch.cat([OWN[0], bk[1:2].expand(2, -1, -1)], 1))
    assert torch.equal(v, torch.cat([OWN[1], bv[1:2].expand(2, -1, -1)], 1))
    bank, bk, bv = _bank("replace", source="other")
    k, v = bank.inject("L", *OWN)
    assert torch.equal(k, bk[2:3].expand(2, -1, -1)) and torch.equal(v, bv[2:3].expand(2, -1, -1))
    # an image the bank does not know: its first row
    bank, bk, bv = _bank("replace")
    bank.image_index = {}
    k, v = bank.inject("L", *OWN)
    assert torch.equal(k, bk[:1].expand(2, -1, -1)) and torch.equal(v, bv[:1].expand(2, -1, -1))


def test_inject_masked_takes_each_part_inside_its_mask():
    top = torch.zeros(1, 1, 32, 32)
    top[..., :16, :] = 1  # top half of the source: tokens 0..7 of the 4x4 grid
    right = torch.zeros(1, 1, 32, 32)
    right[..., :, 24:] = 1  # right quarter of the reference: tokens 3, 7, 11, 15
    bank, bk, bv = _bank("masked", parts=[("source", top), ("reference", right)])
    k, v = bank.inject("L", *OWN)
    idx = torch.tensor([3, 7, 11, 15])
    assert torch.equal(k, torch.cat([bk[1, :8], bk[0, idx]])[None].expand(2, -1, -1))
    assert torch.equal(v, torch.cat([bv[1, :8], bv[0, idx]])[None].expand(2, -1, -1))
    # empty masks everywhere: the layer keeps its own K/V
    empty = torch.zeros(1, 1, 32, 32)
    bank, _, _ = _bank("masked", parts=[("source", empty), ("reference", empty)])
    k, v = bank.inject("L", *OWN)
    assert k is OWN[0] and v is OWN[1]
    # only one non-empty part
    bank, bk, _ = _bank("masked", parts=[("source", empty), ("reference", right)])
    k, _ = bank.inject("L", *OWN)
    assert torch.equal(k, bk[0, idx][None].expand(2, -1, -1))


@pytest.mark.parametrize("mode", ["off", "replace", "concat", "masked"])
def test_inject_without_an_entry_or_switched_off_keeps_own_kv(mode):
    full = torch.ones(1, 1, 32, 32)
    bank, _, _ = _bank(mode, parts=[("source", full)])
    for step, layer in ((4, "L"), (5, "M")):  # nothing recorded there
        bank.step = step
        k, v = bank.inject(layer, *OWN)
        assert k is OWN[0] and v is OWN[1]
    # a policy switched off keeps its parts (the engine overrides only the mode): still off
    bank, _, _ = _bank("off", parts=[("source", full)])
    k, v = bank.inject("L", *OWN)
    assert k is OWN[0] and v is OWN[1]


# -- the UNet patch and attention slicing ------------------------------------------------------


def test_layer_names():
    unet = tiny_unet()
    assert [name for name, _ in self_attention_layers(unet)] == ALL_ATTN1
    assert bank_layer_names(unet) == [n + ".processor" for n in DECODER_ATTN1]


def test_memory_bank_patch_installs_on_the_decoder_and_restores():
    unet = tiny_unet()
    set_attention_slicing(unet, 3)
    before = dict(unet.attn_processors)
    bank = MemoryBank()
    with pytest.raises(RuntimeError), memory_bank_patch(unet, bank) as patched:
        assert patched is bank
        during = unet.attn_processors
        changed = sorted(n for n in during if during[n] is not before[n])
        assert changed == bank_layer_names(unet)
        for name in changed:
            proc = during[name]
            assert type(proc) is BankAttnProcessor
            assert (proc.name, proc.bank, proc.query_chunk) == (name, bank, 3)
        raise RuntimeError  # restored on the way out of an error too
    after = unet.attn_processors
    assert all(after[n] is before[n] for n in before) and len(after) == len(before)


def test_unet_with_a_recorded_bank_of_itself_is_unchanged():
    """Recording changes nothing; injecting (replace) the K/V recorded from the same latent at
    the same step is self-attention again: the same output."""
    unet = tiny_unet()
    z, t, ctx = randn(1, 4, 8, 8, seed=3), torch.tensor(10), randn(1, 3, 8, seed=4)
    with torch.no_grad():
        plain = unet(z, t, encoder_hidden_states=ctx).sample
        bank = MemoryBank(mode="record", step=0, image_index={"source": 0})
        with memory_bank_patch(unet, bank):
            recorded = unet(z, t, encoder_hidden_states=ctx).sample
            assert sorted(layer for _, layer in bank.store) == bank_layer_names(unet)
            bank.mode = "inject"
            injected = unet(z, t, encoder_hidden_states=ctx).sample
            bank.store = {s: (k * 0, v * 0) for s, (k, v) in bank.store.items()}
            zeroed = unet(z, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(recorded, plain, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(injected, plain, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(zeroed, plain, atol=1e-4)  # and the bank is really what they see


def test_set_attention_slicing():
    unet = tiny_unet()
    procs = lambda: {n: p for n, p in unet.attn_processors.items() if ".attn1." in n}  # noqa: E731
    assert set_attention_slicing(unet, None) == 0  # nothing sliced: nothing to undo
    assert set_attention_slicing(unet, 1) == 4
    for name, proc in procs().items():
        assert type(proc) is BankAttnProcessor
        assert (proc.name, proc.bank, proc.query_chunk) == (name, None, 1)
    assert all(".attn1." in n for n, p in unet.attn_processors.items()
               if type(p) is BankAttnProcessor)  # cross-attention is left alone
    assert set_attention_slicing(unet, 5) == 4
    assert {p.query_chunk for p in procs().values()} == {5}
    with memory_bank_patch(unet, MemoryBank()):
        assert set_attention_slicing(unet, None) == 4
        kinds = {n: (type(p).__name__, p.query_chunk if hasattr(p, "query_chunk") else "-")
                 for n, p in procs().items()}
        # the bank's layers keep their processor, unsliced; the others go back to diffusers'
        assert kinds == {n: ("BankAttnProcessor", None) if n.startswith("up_blocks.")
                         else ("AttnProcessor2_0", "-") for n in procs()}
        assert set_attention_slicing(unet, 2) == 4
        assert {p.query_chunk for p in procs().values()} == {2}
    # plain processors before the bank's layers are skipped, not the end of the walk
    unet = tiny_unet()
    with memory_bank_patch(unet, MemoryBank()):
        assert set_attention_slicing(unet, None) == 2
    for bad in (0, -3):
        with pytest.raises(ValueError, match="positive number of queries, got"):
            set_attention_slicing(unet, bad)
