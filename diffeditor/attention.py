"""The memory bank: decoder self-attention K/V recorded during inversion, injected while editing.

Patches are attention processors installed by :func:`memory_bank_patch`, a context manager
that restores the UNet's own processors exactly on exit. The bank lives on the compute device
(the reference parks it on the CPU and copies it back every step).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .geometry import resample_mask
from .interfaces import AttentionPolicy

BankMode = Literal["off", "record", "inject"]


def bank_layer_names(unet) -> list[str]:
    """Self-attention (``attn1``) processors inside the decoder's cross-attention up-blocks
    (9 layers in SD 1.5)."""
    return [name + ".processor" for name, _ in _decoder_self_attention(unet)]


def _decoder_self_attention(unet) -> list[tuple[str, object]]:
    return [(name, mod) for name, mod in self_attention_layers(unet) if name.startswith("up_blocks.")]


@dataclass
class MemoryBank:
    """Recorded K/V per (step, layer) and the switches the processors read on every call.

    ``mode`` is ``"record"`` during inversion, ``"inject"`` during editing steps inside the
    policy's window, and ``"off"`` otherwise (feature passes, time-travel rollbacks).
    """

    policy: AttentionPolicy = field(default_factory=AttentionPolicy)
    mode: BankMode = "off"
    step: int = -1
    latent_hw: tuple[int, int] = (0, 0)
    image_index: dict[str, int] = field(default_factory=dict)  # image name -> batch row
    store: dict[tuple[int, str], tuple[Tensor, Tensor]] = field(default_factory=dict)
    # with ``mode == "inject"``: only the first ``inject_rows`` rows of a batch attend to the
    # bank; the rest attend to their own K/V (a reference-feature pass batched with the CFG pair)
    inject_rows: int | None = None
    # denoising steps whose K/V are kept while recording (``None``: all): the steps outside the
    # memory-bank window are never injected, so their K/V would only hold memory
    record_steps: frozenset[int] | None = None
    _mask_cache: dict[tuple[str, int], Tensor] = field(default_factory=dict)

    # -- recording ---------------------------------------------------------------------------
    def record(self, layer: str, k: Tensor, v: Tensor) -> None:
        if self.record_steps is None or self.step in self.record_steps:
            self.store[(self.step, layer)] = (k.detach(), v.detach())

    def covers(self, steps: frozenset[int] | None) -> bool:
        """Whether the recording holds every step of ``steps`` (``None``: all steps)."""
        if self.record_steps is None:
            return True
        return steps is not None and steps <= self.record_steps

    def nbytes(self) -> int:
        """Memory held by the bank."""
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.store.values())

    def clear(self) -> None:
        self.store.clear()
        self._mask_cache.clear()

    # -- injection ---------------------------------------------------------------------------
    def _token_mask(self, which: str, mask: Tensor, tokens: int) -> Tensor:
        key = (which, tokens)
        if key not in self._mask_cache:
            lh, lw = self.latent_hw
            down = math.sqrt(lh * lw / tokens)
            hw = (round(lh / down), round(lw / down))
            m = resample_mask(mask, hw, "nearest")
            self._mask_cache[key] = m.flatten().bool().to(mask.device)
        return self._mask_cache[key]

    def inject(self, layer: str, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The K/V the generation branch attends to, from its own ``k, v`` ``(B, T, C)``."""
        entry = self.store.get((self.step, layer))
        pol = self.policy
        if entry is None or pol.mode == "off":
            return k, v
        bk, bv = entry
        b = k.shape[0]
        src = self.image_index.get(pol.source, 0)
        if pol.mode == "replace":
            return bk[src : src + 1].expand(b, -1, -1), bv[src : src + 1].expand(b, -1, -1)
        if pol.mode == "concat":
            return (
                torch.cat([k, bk[src : src + 1].expand(b, -1, -1)], dim=1),
                torch.cat([v, bv[src : src + 1].expand(b, -1, -1)], dim=1),
            )
        # masked: each named image's tokens inside its part's mask
        tokens = bk.shape[1]
        parts_k, parts_v = [], []
        for j, (name, mask) in enumerate(pol.parts):
            row = self.image_index[name]
            sel = self._token_mask(f"{j}:{name}", mask.to(bk.device), tokens)
            parts_k.append(bk[row][sel])
            parts_v.append(bv[row][sel])
        if sum(p.shape[0] for p in parts_k) == 0:
            return k, v
        mk = torch.cat(parts_k, 0)[None].expand(b, -1, -1)
        mv = torch.cat(parts_v, 0)[None].expand(b, -1, -1)
        return mk, mv


def attend(attn, q: Tensor, k: Tensor, v: Tensor, query_chunk: int | None = None) -> Tensor:
    """Multi-head SDPA on ``(B, T, C)`` projections; ``query_chunk`` bounds the attention
    matrix to ``chunk x keys`` per head (attention slicing, for small GPUs)."""
    heads = attn.heads
    q, k, v = (rearrange(x, "b t (h d) -> b h t d", h=heads) for x in (q, k, v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if query_chunk is None or query_chunk >= q.shape[2]:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = torch.cat([F.scaled_dot_product_attention(qc, k, v)
                         for qc in q.split(query_chunk, dim=2)], dim=2)
    return rearrange(out, "b h t d -> b t (h d)")


class BankAttnProcessor:
    """Self-attention with memory-bank recording/injection, using PyTorch SDPA.

    Without a bank (``bank=None``) it is plain self-attention; ``query_chunk`` slices the
    queries (attention slicing) in either case.
    """

    def __init__(self, name: str, bank: MemoryBank | None, query_chunk: int | None = None):
        self.name = name
        self.bank = bank
        self.query_chunk = query_chunk

    # per-step Python state (the bank's step, mode and store): kept out of torch.compile's
    # graphs, which would otherwise recompile at every step (recursively: ``process`` too)
    @torch.compiler.disable
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        return self.process(attn, hidden_states, encoder_hidden_states, temb)

    # undecorated, so that mutation testing reaches it (mutmut skips decorated functions)
    def process(self, attn, hidden_states, encoder_hidden_states=None, temb=None):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            b, c, h, w = hidden_states.shape
            hidden_states = rearrange(hidden_states, "b c h w -> b (h w) c")
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.to_q(hidden_states)
        k = attn.to_k(context)
        v = attn.to_v(context)
        bank = self.bank
        chunk = self.query_chunk
        if bank is not None and bank.mode == "record":
            bank.record(self.name, k, v)
        if bank is not None and bank.mode == "inject":
            n = bank.inject_rows
            if n is None or n >= q.shape[0]:
                out = attend(attn, q, *bank.inject(self.name, k, v), chunk)
            else:  # rows past n are a bank-free pass batched along
                out = torch.cat([attend(attn, q[:n], *bank.inject(self.name, k[:n], v[:n]), chunk),
                                 attend(attn, q[n:], k[n:], v[n:], chunk)])
        else:
            out = attend(attn, q, k, v, chunk)
        out = out.to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if four_d:
            out = rearrange(out, "b (h w) c -> b c h w", h=h, w=w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def memory_bank_patch(unet, bank: MemoryBank) -> Iterator[MemoryBank]:
    """Install bank processors on the decoder self-attention layers; restore on exit.

    Processors are swapped per module, so other patches (the image prompt's cross-attention
    processors, which also add entries to ``unet.attn_processors``) are left alone.
    """
    saved = _install_bank_processors(unet, bank)
    try:
        yield bank
    finally:
        for mod, proc in saved:
            mod.set_processor(proc)


def _install_bank_processors(unet, bank: MemoryBank) -> list[tuple[object, object]]:
    """Bank processors on the decoder self-attention layers; returns ``(layer, its processor)``
    pairs to restore. (Apart from ``memory_bank_patch``, which mutmut cannot mutate: decorated.)"""
    saved = []
    for name, mod in _decoder_self_attention(unet):
        saved.append((mod, mod.processor))
        # keep the layer's attention slicing, if any
        mod.set_processor(BankAttnProcessor(name + ".processor", bank,
                                            getattr(mod.processor, "query_chunk", None)))
    return saved


def self_attention_layers(module) -> list[tuple[str, object]]:
    """``(name, Attention)`` of every self-attention layer (``attn1``) of a UNet."""
    return [(name, mod) for name, mod in module.named_modules()
            if hasattr(mod, "set_processor") and name.endswith(".attn1")]


def set_attention_slicing(unet, query_chunk: int | None) -> int:
    """Attention slicing for small GPUs: self-attention computed ``query_chunk`` queries at a
    time (``None`` turns it off). Cross-attention keeps its processors (77 text keys and the
    image prompt's tokens make small matrices). Returns the number of layers changed."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if query_chunk is not None and query_chunk < 1:
        raise ValueError(f"attention slice must be a positive number of queries, got {query_chunk}")
    changed = 0
    for name, mod in self_attention_layers(unet):
        proc = mod.processor
        if isinstance(proc, BankAttnProcessor):
            if proc.bank is None and query_chunk is None:
                mod.set_processor(AttnProcessor2_0())
            else:
                proc.query_chunk = query_chunk
        elif query_chunk is not None:
            mod.set_processor(BankAttnProcessor(name + ".processor", None, query_chunk))
        else:
            continue
        changed += 1
    return changed
