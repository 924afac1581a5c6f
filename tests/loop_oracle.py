"""An analytic denoiser and an independent transcription of the DiffEditor loop: the exact
oracle of the sampling-loop tests (``test_loop_oracle.py``).

:class:`AnalyticUNet` is a tiny network with the structure the engine relies on (three decoder
``up_blocks`` whose outputs are the guidance features, each with a real diffusers self-attention
layer ``up_blocks.j.attn1`` that the memory bank patches) and a closed-form noise prediction::

    eps(z, t, c, ip) = a(t)·z + b·c̄ + Σ_j u_j·f_j + γ·mean(ip)
    f_j = c_j·z + d_j·attn_j(s_j·z) + e_j·c̄ + g_j·t/1000      (the block's output)

where c̄ = <c, P>/√|c| summarises a row's text context with a fixed random P (CLIP's final layer
norm makes a plain mean ~0 for every prompt; this tells prompts apart by O(1)).

Every call is recorded (latent, timestep, context, gradient, memory-bank mode/step/rows, image
prompt weight and tokens, output), so a test can assert what the loop asked for at each step.

:func:`reference_edit` re-implements the loop from ``shared/design/method-reference.md`` §1.6 and
§5 (plus this project's documented extras: pins and the background blend) with its own
inversion, memory bank, attention, CFG, guidance, SDE and rollback arithmetic, calling only the
denoiser's closed form. It never imports the engine's loop, sampling or attention code: an error
shared by the engine's helpers cannot hide on both sides.

:class:`RecordingImagePrompt` stands in for the CLIP image tower in these wiring tests only (the
real image prompt is tested in ``test_image_prompt.py``): its tokens are the mean of the image,
and its weight γ is what the engine set last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

C = 4  # latent channels = token width
U_J = (0.05, 0.15, 0.1)  # weight of each block's output in eps
BLOCK = [  # (c_j, d_j, e_j, g_j, s_j) per block
    (0.7, 0.9, 0.3, 0.2, 1.0),
    (-0.4, 1.1, -0.5, 0.6, 1.5),
    (0.5, -0.8, 0.4, -0.3, 0.75),
]
UNCOND_IP = -0.25


@dataclass
class Call:
    z: Tensor
    t: int
    ctx: Tensor  # (B,) mean of each row's context
    grad: bool
    bank_mode: str  # "none" when no bank processor is installed
    bank_step: int
    inject_rows: int | None
    gamma: float
    ip: Tensor | None  # (B,) image-prompt token value per row
    out: Tensor | None = None  # eps; None for a feature pass stopped early
    pooled: Tensor | None = None  # SDXL layout: (B,) summary of each row's text_embeds
    time_ids: Tensor | None = None  # SDXL layout: (B, 6)


class _Block(torch.nn.Module):
    def __init__(self, j: int, gen: torch.Generator):
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.j = j
        self.attn1 = Attention(query_dim=C, heads=1, dim_head=C, out_bias=False)
        with torch.no_grad():  # fixed, well-conditioned projections
            for lin in (self.attn1.to_q, self.attn1.to_k, self.attn1.to_v, self.attn1.to_out[0]):
                lin.weight.copy_(torch.eye(C) + 0.2 * torch.randn(C, C, generator=gen))

    def forward(self, z: Tensor, t: float, cbar: Tensor) -> Tensor:
        c, d, e, g, s = BLOCK[self.j]
        b, _, h, w = z.shape
        tokens = (s * z).flatten(2).transpose(1, 2)  # (B, hw, C)
        a = self.attn1(tokens).transpose(1, 2).reshape(b, C, h, w)
        return c * z + d * a + e * cbar + g * t / 1000


class AnalyticUNet(torch.nn.Module):
    """See the module docstring."""

    def __init__(self, sample_size: int = 8, pooled_dim: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(1234)
        self._proj: Tensor | None = None
        self.up_blocks = torch.nn.ModuleList([_Block(j, gen) for j in range(3)])
        self.config = SimpleNamespace(in_channels=C, sample_size=sample_size)
        if pooled_dim:  # SDXL's layout: added text (pooled) and time conditions
            self.config = SimpleNamespace(
                in_channels=C, sample_size=sample_size, addition_embed_type="text_time",
                addition_time_embed_dim=8, projection_class_embeddings_input_dim=pooled_dim + 48)
            self.pooled_proj = torch.randn(pooled_dim, generator=torch.Generator().manual_seed(98))
        self.ip_scale = 0.0
        self.calls: list[Call] = []

    def summary(self, ctx: Tensor) -> Tensor:
        """c̄ per row, ``(B,)``."""
        if self._proj is None or self._proj.shape != ctx.shape[1:]:
            gen = torch.Generator().manual_seed(99)
            self._proj = torch.randn(ctx.shape[1:], generator=gen)
        return (ctx.float() * self._proj).sum(dim=(1, 2)) / math.sqrt(self._proj.numel())

    def _bank_state(self):
        bank = getattr(self.up_blocks[0].attn1.processor, "bank", None)
        if bank is None:
            return "none", -1, None
        return bank.mode, bank.step, bank.inject_rows

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=True,
                added_cond_kwargs=None, **_):
        dtype = self.up_blocks[0].attn1.to_q.weight.dtype  # computes in its weights' dtype
        given = [sample.dtype, encoder_hidden_states.dtype]
        added = dict(added_cond_kwargs or {})
        sdxl = getattr(self.config, "addition_embed_type", None) == "text_time"
        if sdxl and not {"text_embeds", "time_ids"} <= set(added):  # as SDXL's UNet refuses
            raise ValueError("an SDXL UNet needs text_embeds and time_ids in added_cond_kwargs")
        if "image_embeds" not in added:
            added_cond_kwargs = None
        if added_cond_kwargs is not None:
            given.append(added_cond_kwargs["image_embeds"][0].dtype)
        if any(d != dtype for d in given):  # as a real UNet's layers would refuse them
            raise TypeError(f"inputs {given} to a {dtype} UNet")
        z = sample.to(dtype)
        b = z.shape[0]
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        cbar = self.summary(encoder_hidden_states).view(b, 1, 1, 1).to(dtype)
        ip = None
        if added_cond_kwargs is not None:
            ip = added_cond_kwargs["image_embeds"][0].float().reshape(b, -1).mean(1).to(dtype)
        mode, step, rows = self._bank_state()
        call = Call(z.detach().float().clone(), int(t), cbar.detach().float().flatten().clone(),
                    sample.requires_grad, mode, step, rows, float(self.ip_scale),
                    None if ip is None else ip.float().clone())
        self.calls.append(call)
        if sdxl:  # recorded before the blocks: a feature pass stops after one
            call.pooled = self.pooled_summary(added["text_embeds"].detach().float())
            call.time_ids = added["time_ids"].detach().float().clone()
        eps = (0.3 + 0.4 * t / 1000) * z + 0.5 * cbar
        for j, block in enumerate(self.up_blocks):  # hooks may stop the pass after a block
            eps = eps + U_J[j] * block(z, t, cbar)
        if ip is not None:
            eps = eps + self.ip_scale * ip.view(b, 1, 1, 1)
        if sdxl:
            eps = eps + added_term(call.pooled, call.time_ids).view(b, 1, 1, 1).to(dtype)
        call.out = eps.detach().float().clone()
        return (eps,) if not return_dict else SimpleNamespace(sample=eps)

    def pooled_summary(self, pooled: Tensor) -> Tensor:
        """p̄ per row: ``<pooled, Q>/√|Q|`` with a fixed random Q, ``(B,)``."""
        return (pooled * self.pooled_proj).sum(dim=1) / math.sqrt(self.pooled_proj.numel())


def added_term(pbar: Tensor, time_ids: Tensor) -> Tensor:
    """What SDXL's added conditions add to the analytic noise prediction, per row."""
    return 0.5 * pbar + 0.2 * time_ids.sum(dim=1) / 1000


class RecordingImagePrompt:
    """The engine's image-prompt interface with one token per row: the mean of the image."""

    def __init__(self, unet: AnalyticUNet):
        self.unet = unet
        self.cond = torch.tensor(UNCOND_IP)

    def set_image(self, image: Tensor) -> None:
        self.cond = image.float().mean()

    def set_scale(self, gamma: float) -> None:
        self.unet.ip_scale = float(gamma)

    def added_cond_kwargs(self, batch: int, cond_rows=None) -> dict:
        rows = cond_rows if cond_rows is not None else [True] * batch
        vals = torch.stack([self.cond if c else torch.tensor(UNCOND_IP) for c in rows])
        dtype = next(self.unet.parameters()).dtype  # as the real runtime: the UNet's dtype
        return {"image_embeds": [vals.view(batch, 1, 1).to(dtype)]}


def analytic_engine(like, dtype: torch.dtype = torch.float32, prediction_type: str = "epsilon",
                    text_encoder_2=None):
    """An :class:`~diffeditor.engine.Engine` on the analytic UNet (weights rounded to bfloat16,
    so that a bfloat16 engine holds exactly the same weights, then in ``dtype``), with the real
    VAE, text encoder, tokenizer and DDIM scheduler of the engine ``like`` (configured to read
    the UNet's output as ``prediction_type``)."""
    from diffusers import DDIMScheduler

    from diffeditor.engine import Engine

    pooled = text_encoder_2.config.projection_dim if text_encoder_2 is not None else 0
    unet = AnalyticUNet(pooled_dim=pooled).to(torch.bfloat16).to(dtype)
    scheduler = DDIMScheduler.from_config(like.scheduler.config, prediction_type=prediction_type)
    pipe = SimpleNamespace(unet=unet, vae=like.vae, text_encoder=like.text_encoder,
                           tokenizer=like.tokenizer, scheduler=scheduler)
    if text_encoder_2 is not None:  # SDXL's layout: a second encoder, zeros for the uncond
        pipe.text_encoder_2, pipe.tokenizer_2 = text_encoder_2, like.tokenizer
        pipe.config = {"force_zeros_for_empty_prompt": True}
    eng = Engine(pipe, model_id="analytic")
    eng.image_prompt = RecordingImagePrompt(unet)
    return eng


# -- the independent transcription ---------------------------------------------------------------

def _attention(blk: _Block, q_tokens: Tensor, kv_tokens: Tensor | None = None,
               kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """softmax(q·kᵀ/√C)·v with the block's own projections; ``kv`` overrides the keys/values."""
    a = blk.attn1
    q = q_tokens @ a.to_q.weight.T
    if kv is None:
        k, v = kv_tokens @ a.to_k.weight.T, kv_tokens @ a.to_v.weight.T
    else:
        k, v = kv
    w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(C), dim=-1)
    return (w @ v) @ a.to_out[0].weight.T


def closed_form(unet: AnalyticUNet, z: Tensor, t: int, cbar, kv=None, gamma: float = 0.0,
                ip: Tensor | None = None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``(eps, block outputs, tokens per block)`` of the analytic UNet without its modules'
    forward (``kv(j, tokens)`` returns the keys/values block ``j`` attends to, or ``None``).
    ``cbar`` may be ``(c̄, added)``: the SDXL layout's added-conditions term of the row."""
    cbar, added = cbar if isinstance(cbar, tuple) else (cbar, None)
    b, _, h, w = z.shape
    cb = cbar.view(b, 1, 1, 1)
    eps = (0.3 + 0.4 * t / 1000) * z + 0.5 * cb
    feats, toks = [], []
    for j, blk in enumerate(unet.up_blocks):
        c, d, e, g, s = BLOCK[j]
        tokens = (s * z).flatten(2).transpose(1, 2)
        override = kv(j, tokens) if kv is not None else None
        a = _attention(blk, tokens, tokens, override).transpose(1, 2).reshape(b, C, h, w)
        f = c * z + d * a + e * cb + g * t / 1000
        feats.append(f)
        toks.append(tokens)
        eps = eps + U_J[j] * f
    if ip is not None:
        eps = eps + gamma * ip.view(b, 1, 1, 1)
    if added is not None:
        eps = eps + added.view(b, 1, 1, 1)
    return eps, feats, toks


def _window(w, n: int) -> set[int]:
    if w.steps is not None:
        return {s for s in w.steps if s < n}
    lo = math.ceil(w.start * n - 1e-9)
    hi = math.ceil(w.stop * n - 1e-9)
    return {i for i in range(max(lo, 0), min(hi, n)) if i % w.every == 0}


@dataclass
class Reference:
    latent: Tensor
    inverted: dict[str, list[Tensor]]
    log: list[dict] = field(default_factory=list)


def reference_edit(eng, plan, spec, *, guidance_rows_batched: bool = False) -> Reference:
    """The edit the method prescribes for ``plan`` and ``spec`` with ``eng``'s analytic UNet,
    text encoder, VAE and scheduler alphas (read from the scheduler's table, not the grid)."""
    unet: AnalyticUNet = eng.unet
    sch = eng.scheduler
    n = spec.steps
    ratio = sch.config.num_train_timesteps // n
    sch.set_timesteps(n)
    ts = [int(x) for x in sch.timesteps]
    ac = sch.alphas_cumprod.double()

    def alpha(t: int) -> float:
        return float(ac[t]) if t >= 0 else float(sch.final_alpha_cumprod)

    kind = sch.config.prediction_type

    def as_eps(out: Tensor, z: Tensor, a: float) -> Tensor:
        """The noise the output means for a latent at level a (v = √a·ε − √(1−a)·x0)."""
        if kind == "v_prediction":
            return math.sqrt(a) * out + math.sqrt(1 - a) * z
        if kind == "sample":
            return (z - math.sqrt(a) * out) / math.sqrt(1 - a)
        return out

    sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"

    def cbar_of(prompt: str, uncond: bool = False):
        if not sdxl:
            return unet.summary(eng.encode_text([prompt]))
        # SDXL: both encoders' penultimate states side by side, the second's pooled projection,
        # the time ids of the working size (original, crop 0 0, target); zeros for the uncond
        states, pooled = [], None
        for tok, enc in ((eng.tokenizer, eng.text_encoder), (eng.tokenizer_2, eng.text_encoder_2)):
            ids = tok([prompt], padding="max_length", max_length=77, truncation=True,
                      return_tensors="pt").input_ids
            with torch.no_grad():
                out = enc(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]
        ctx = torch.cat(states, dim=-1)
        if uncond:
            ctx, pooled = torch.zeros_like(ctx), torch.zeros_like(pooled)
        h_px, w_px = (int(s) for s in plan.images["source"].shape[-2:])
        ids6 = torch.tensor([[h_px, w_px, 0, 0, h_px, w_px]], dtype=torch.float32)
        return unet.summary(ctx), added_term(unet.pooled_summary(pooled.float()), ids6)

    names = list(plan.images)
    prompts = {k: plan.prompts.get(k, "") for k in names}
    # 1. inversion, each image with its own prompt, no CFG, no image prompt; bank[i][name][j] =
    #    the tokens block j saw while inverting into step i's noise level
    sc = spec.schedule
    ip_steps = _window(sc.image_prompt, n)
    ip_cond = plan.images[plan.image_prompt_source].float().mean().view(1)
    ip_inv = spec.image_prompt_inversion and spec.image_prompt_scale > 0
    z = {k: eng.encode_image(plan.images[k]).float() for k in names}
    inv = {k: [z[k]] for k in names}
    bank: dict[int, dict[str, list[Tensor]]] = {}
    for k_step in range(n):
        i = n - 1 - k_step
        t, t_low = ts[i], ts[i] - ratio
        bank[i] = {}
        for k in names:
            g_inv = spec.image_prompt_scale if ip_inv and i in ip_steps else 0.0
            e, _, toks = closed_form(unet, z[k], t, cbar_of(prompts[k]), None, g_inv, ip_cond)
            bank[i][k] = toks
            a_t, a_p = alpha(t), alpha(t_low)
            e = as_eps(e, z[k], a_p)  # z[k] sits at a_p
            z[k] = math.sqrt(a_t) * (z[k] - math.sqrt(1 - a_p) * e) / math.sqrt(a_p) + math.sqrt(1 - a_t) * e
            inv[k].append(z[k])

    # 2. windows
    guided = set().union(*(_window(w, n) for w in sc.guidance)) if spec.energy_scale > 0 and any(
        term.weight != 0 for term in plan.energies) else set()
    sde_steps = _window(sc.sde, n)
    tt_steps = _window(sc.time_travel, n)
    mode = plan.attention.mode if spec.memory_bank == "task" else spec.memory_bank
    bank_steps = _window(sc.memory_bank or plan.attention.window, n) if mode != "off" else set()

    def bank_kv(i: int):
        """Keys/values of the generation rows at step i, per the policy (method ref. §1.4)."""
        def kv(j: int, own: Tensor):
            a = unet.up_blocks[j].attn1
            proj = lambda x: (x @ a.to_k.weight.T, x @ a.to_v.weight.T)  # noqa: E731
            src = bank[i][plan.attention.source][j]
            if mode == "replace":
                return proj(src.expand(own.shape[0], -1, -1))
            if mode == "concat":
                return proj(torch.cat([own, src.expand(own.shape[0], -1, -1)], dim=1))
            parts = []
            lh, lw = z["source"].shape[-2:]
            for name, m in plan.attention.parts:
                sel = F.interpolate(m.float(), size=(lh, lw), mode="nearest").flatten() > 0.5
                parts.append(bank[i][name][j][0][sel])
            kvt = torch.cat(parts)[None].expand(own.shape[0], -1, -1)
            return proj(kvt)
        return kv

    # 3. the edit
    cond_c, uncond_c = cbar_of(prompts["source"]), cbar_of("", uncond=True)
    ip_uncond = torch.tensor([UNCOND_IP])
    zt = {k: inv[k][n] for k in names}
    x = plan.surgery(zt) if plan.surgery else zt["source"]
    gen = torch.Generator("cpu").manual_seed(spec.seed)
    levels = spec.feature_levels
    pins = [(p.mask.float(), p.target, round(p.until * n)) for p in plan.pins if p.until > 0]
    if spec.background_blend > 0 and plan.sde_mask is not None:
        m = plan.sde_mask.float()
        grown = F.max_pool2d(m, 3, stride=1, padding=1)  # one cell of dilation, 8-neighbourhood
        pins.insert(0, (1 - grown, lambda zs: zs["source"], round(spec.background_blend * n)))
    ref = Reference(x, inv)

    def feats_of(fs: list[Tensor]) -> dict[int, Tensor]:
        return {lv: F.interpolate(fs[lv], scale_factor=spec.feature_scale, mode="nearest")
                for lv in levels}

    for i in range(n):
        t, t_low = ts[i], ts[i] - ratio
        a_t, a_p = alpha(t), alpha(t_low)
        g_on = i in guided
        passes = sc.time_travel_repeats if (g_on and i in tt_steps) else 1
        kv = bank_kv(i) if i in bank_steps else None
        gamma = spec.image_prompt_scale if i in ip_steps else 0.0
        for u in range(passes):
            e_c = as_eps(closed_form(unet, x, t, cond_c, kv, gamma, ip_cond)[0], x, a_t)
            if spec.guidance_scale != 1.0:
                e_u = as_eps(closed_form(unet, x, t, uncond_c, kv, gamma, ip_uncond)[0], x, a_t)
                eps = e_u + spec.guidance_scale * (e_c - e_u)
            else:
                eps = e_c
            eps_hat = eps
            if g_on:
                refs = {k: feats_of(closed_form(unet, inv[k][n - i], t, cbar_of(prompts[k]))[1])
                        for k in names}
                xg = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    cur = feats_of(closed_form(unet, xg, t, cond_c)[1])
                    groups: dict[str, list] = {}
                    for term in plan.energies:
                        if term.weight != 0:
                            region = "all" if spec.guidance_region == "global" else term.region
                            groups.setdefault(region, []).append(term)
                    corr = torch.zeros_like(x)
                    ratios = {}
                    for region, terms in groups.items():
                        energy = spec.energy_scale * sum(term.weight * term.fn(cur, refs) for term in terms).sum()
                        (grad,) = torch.autograd.grad(energy, xg, retain_graph=True)
                        mask = torch.ones_like(x[:, :1]) if region == "all" else plan.regions[region]
                        term = spec.guidance_k * mask * grad
                        # size against eps inside the region: sqrt(Σ m·x²/(Σm·C)) for both
                        cells = float(mask.sum()) * x.shape[1]
                        size = math.sqrt(float((mask * term**2).sum()) / cells)
                        rel = size / math.sqrt(float((mask * eps**2).sum()) / cells)
                        ratios[region] = rel
                        if spec.guidance_clip is not None and rel > spec.guidance_clip:
                            term = term * (spec.guidance_clip / rel)
                        corr = corr + term
                eps_hat = eps + corr
            sde = i in sde_steps and (spec.sde_strength > 0 or spec.sde_strength_outside > 0)
            x0 = (x - math.sqrt(1 - a_t) * eps_hat) / math.sqrt(a_t)
            var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
            regional = spec.sde_region == "regional" and plan.sde_mask is not None
            eta_in = spec.sde_strength if sde else 0.0
            eta_out = (spec.sde_strength_outside if regional else spec.sde_strength) if sde else 0.0
            s_in, s_out = eta_in * math.sqrt(var), eta_out * math.sqrt(var)
            noise = torch.randn(x.shape, generator=gen) if sde else torch.zeros_like(x)
            z_in = math.sqrt(a_p) * x0 + math.sqrt(max(1 - a_p - s_in**2, 0)) * eps + s_in * noise
            z_out = math.sqrt(a_p) * x0 + math.sqrt(max(1 - a_p - s_out**2, 0)) * eps + s_out * noise
            m = plan.sde_mask.float() if regional else torch.ones_like(x[:, :1])
            x_prev = m * z_in + (1 - m) * z_out
            ref.log.append({"step": i, "pass": u, "guided": g_on, "sde": sde, "z_in": x.clone(),
                            "eps_hat_minus_eps": (eps_hat - eps).detach().clone(),
                            "ratio": ratios if g_on else None})
            if u < passes - 1:  # time travel: back from t-Δ to t, eps at t-Δ, cond, no bank/ip
                e_r = as_eps(closed_form(unet, x_prev, max(t_low, 0), cond_c)[0], x_prev, a_p)
                x = math.sqrt(a_t) * (x_prev - math.sqrt(1 - a_p) * e_r) / math.sqrt(a_p) \
                    + math.sqrt(1 - a_t) * e_r
        x = x_prev.detach()
        for mask, target, until in pins:
            if i < until:
                zs = {k: inv[k][n - i - 1] for k in names}
                x = mask * target(zs) + (1 - mask) * x
    ref.latent = x
    return ref
