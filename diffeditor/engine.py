"""The shared DiffEditor sampler: inversion with a memory bank, CFG denoising with regional
score-based guidance, regional SDE/ODE steps and time travel, for any task's :class:`EditPlan`.

Device and dtype are read from the components; nothing assumes CUDA. Latents and the step math
stay in float32; the UNet runs in its own dtype; energies are reduced in float32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .attention import MemoryBank, memory_bank_patch, set_attention_slicing
from .denoisers import (
    CFGDenoiser,
    Denoiser,
    ImagePromptSwitch,
    MemoryBankSwitch,
    Pins,
    RegionalGuidance,
    Settings,
)
from .encoders import CLIP
from .errors import SpecError
from .features import decoder_features, output_and_features
from .interfaces import EditPlan, Features
from .samplers import DIFFEDITOR, Sampler, StepCallback, sample_ddim
from .sampling import (
    PREDICTION_TYPES,
    DDIMTimesteps,
    bound_guidance,
    combine_cfg,
    ddim_invert,
    eps_from_prediction,
)
from .schedule import Schedule

log = logging.getLogger(__name__)

ProgressFactory = Callable[[int, str], Any]
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs


class _OwnedOutputs:  # pragma: no mutate block
    """A CUDA-graph-compiled UNet whose outputs the caller owns: each call starts a new
    cudagraph step and copies what it returns (and, through ``clone_features``, what the
    feature hooks captured), since a replay overwrites the graph's output buffers."""

    clone_features = True

    def __init__(self, compiled):
        self._compiled = compiled

    def __call__(self, *args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        out = self._compiled(*args, **kwargs)
        return tuple(o.clone() if isinstance(o, Tensor) else o for o in out)

    def __getattr__(self, name):
        return getattr(self._compiled, name)


def _pooled_dim(config) -> int:
    """Width of the pooled text embedding an SDXL-layout UNet (``addition_embed_type:
    text_time``) expects: its added projection's input less the six time-id embeddings."""
    return int(config.projection_class_embeddings_input_dim) - 6 * int(config.addition_time_embed_dim)


def _by_image(feats: Features, names) -> dict[str, Features]:
    """Split a batched feature pass into one single-row feature set per image name."""
    return {n: {lv: f[j : j + 1] for lv, f in feats.items()} for j, n in enumerate(names)}


class _BatchedGradsUnsupported(Exception):
    """The backend cannot batch the regions' backward passes (seen with compiled UNets)."""


@dataclass
class Counters:  # pragma: no mutate block
    """UNet work done, for the benchmark and tests."""

    unet_forward: int = 0  # full forwards (any batch size)
    unet_partial: int = 0  # feature passes stopped after the deepest guidance level
    unet_backward: int = 0  # backward passes through a feature pass (a batched one counts 1)
    region_gradients: int = 0  # gradients of regional energies (one per region per guided pass)
    merged_reference: int = 0  # reference-feature passes batched into a noise-prediction call

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Inversion:
    """The result of inverting a set of images: every latent, and the memory bank."""

    latents: dict[str, list[Tensor]]  # name -> [z_0 .. z_N]
    bank: MemoryBank
    seconds: float = 0.0


@dataclass
class EditOutput:
    latent: Tensor
    image: Tensor  # (1, 3, H, W) in [-1, 1]
    timings: dict[str, float] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    inversion_cached: bool = False
    bank_bytes: int = 0
    guidance: list[dict] = field(default_factory=list)  # per guided pass, see Engine.edit


CACHE_FORMAT = 2


class CacheFileError(ValueError):
    """A cache file's content is not what this version writes (checked before any use)."""


def _cache_tensors(data: dict) -> list[tuple[str, Tensor]]:  # pragma: no mutate block
    out = [(f"latents/{n}/{i}", z) for n in sorted(data["latents"])
           for i, z in enumerate(data["latents"][n])]
    for name in sorted(data["bank"]):
        k, v = data["bank"][name]
        out += [(f"bank/{name}/k", k), (f"bank/{name}/v", v)]
    return out


def _cache_checksum(data: dict) -> str:  # pragma: no mutate block
    """SHA-256 of every field and every tensor's dtype, shape and bytes, in a fixed order."""
    h = hashlib.sha256()
    meta = [data["format"], data["key"], sorted(data["image_index"].items()), list(data["latent_hw"]),
            data["record_steps"], repr(float(data["seconds"]))]
    h.update(repr(meta).encode())
    for name, t in _cache_tensors(data):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()


def _inversion_from(data: Any, key: str) -> Inversion:  # pragma: no mutate block
    """Validate a loaded cache file (structure, types, dtypes, shapes, finiteness, checksum)
    and rebuild the :class:`Inversion`; :class:`CacheFileError` on any doubt."""
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise CacheFileError(what)

    fields = {"format", "key", "latents", "bank", "image_index", "latent_hw", "record_steps",
              "seconds", "checksum"}
    need(isinstance(data, dict) and set(data) == fields, "not a cache file of this version")
    need(data["format"] == CACHE_FORMAT, "written by another version")
    need(data["key"] == key, "made for other inputs")
    latents, bank, index = data["latents"], data["bank"], data["image_index"]
    need(isinstance(latents, dict) and latents and all(isinstance(n, str) for n in latents),
         "latents: not a mapping of image names")
    need(isinstance(index, dict) and set(index) == set(latents)
         and sorted(index.values()) == list(range(len(latents))), "image_index does not match")
    hw = data["latent_hw"]
    need(isinstance(hw, list) and len(hw) == 2 and all(type(x) is int and x > 0 for x in hw),
         "latent_hw: not two positive ints")
    shape = None
    lengths = set()
    for n, zs in latents.items():
        need(isinstance(zs, list) and len(zs) >= 2, f"latents[{n}]: not a list of steps")
        lengths.add(len(zs))
        for z in zs:
            need(isinstance(z, Tensor) and z.is_floating_point(), f"latents[{n}]: not float tensors")
            shape = shape or tuple(z.shape)
            need(tuple(z.shape) == shape and len(shape) == 4 and shape[0] == 1
                 and list(shape[-2:]) == hw, f"latents[{n}]: shape {tuple(z.shape)}")
    need(len(lengths) == 1, "latents: different step counts")
    n_steps = lengths.pop() - 1
    steps = data["record_steps"]
    need(steps is None or (isinstance(steps, list)
                           and all(type(s) is int and 0 <= s < n_steps for s in steps)),
         "record_steps: not step indices")
    need(isinstance(bank, dict), "bank: not a mapping")
    store = {}
    for name, kv in bank.items():
        step, _, layer = name.partition("|") if isinstance(name, str) else ("", "", "")
        need(step.isdigit() and layer and int(step) < n_steps, f"bank key {name!r}")
        need(isinstance(kv, (list, tuple)) and len(kv) == 2
             and all(isinstance(t, Tensor) and t.is_floating_point() for t in kv)
             and kv[0].shape == kv[1].shape, f"bank[{name}]: not a (k, v) pair")
        need(steps is None or int(step) in steps, f"bank[{name}]: step not recorded")
        store[(int(step), layer)] = (kv[0], kv[1])
    seconds = data["seconds"]
    need(isinstance(seconds, float) and seconds >= 0 and seconds == seconds, "seconds")
    need(data["checksum"] == _cache_checksum(data), "checksum mismatch (damaged file)")
    for name, t in _cache_tensors(data):
        need(bool(torch.isfinite(t).all()), f"{name}: holds NaN or infinity")
    mem = MemoryBank(image_index=dict(index), latent_hw=tuple(hw),
                     record_steps=None if steps is None else frozenset(steps))
    mem.store = store
    return Inversion({n: list(zs) for n, zs in latents.items()}, mem, seconds)


class InversionCache:  # pragma: no mutate block
    """An LRU cache of inversions keyed by content (images, prompts, steps, model), bounded in
    memory, optionally backed by a folder (``.pt`` files read with ``weights_only=True``)."""

    def __init__(self, max_items: int = 4, folder: str | Path | None = None):
        self.max_items = max_items
        self.folder = Path(folder) if folder is not None else None
        self.writable = True  # turned off (with one warning) when a write fails
        self._items: OrderedDict[str, Inversion] = OrderedDict()

    def get(self, key: str) -> Inversion | None:
        item = self._items.get(key)
        if item is None and self.folder is not None:
            item = self._load(key)
            if item is not None:
                self._remember(key, item)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: str, value: Inversion) -> None:
        self._remember(key, value)
        if self.folder is not None and self.writable:
            try:
                self._save(key, value)
            except Exception as exc:  # a cache is an optimisation: never fail an edit for it
                self.writable = False
                log.warning("cannot write the inversion cache in %s (%s); edits go on without "
                            "it", self.folder, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    def _remember(self, key: str, value: Inversion) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def _path(self, key: str) -> Path:
        return self.folder / f"inversion-{key[:32]}.pt"

    def _save(self, key: str, inv: Inversion) -> None:
        from .imageio import atomic_write

        data = {
            "format": CACHE_FORMAT,
            "key": key,
            "latents": {n: [z.cpu() for z in zs] for n, zs in inv.latents.items()},
            "bank": {f"{step}|{layer}": [k.cpu(), v.cpu()] for (step, layer), (k, v) in inv.bank.store.items()},
            "image_index": dict(inv.bank.image_index),
            "latent_hw": list(inv.bank.latent_hw),
            "record_steps": None if inv.bank.record_steps is None else sorted(inv.bank.record_steps),
            "seconds": float(inv.seconds),
        }
        data["checksum"] = _cache_checksum(data)
        atomic_write(self._path(key), lambda fh: torch.save(data, fh), force=True)

    def _load(self, key: str) -> Inversion | None:
        path = self._path(key)
        try:
            if not path.is_file():
                return None
            data = torch.load(path, map_location="cpu", weights_only=True)
            return _inversion_from(data, key)
        except Exception as exc:  # any doubt about a cache file: ignore it and invert again
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning("ignoring inversion cache file %s (%s); inverting again", path, reason[:200])
            return None

    def __len__(self) -> int:
        return len(self._items)


class Engine:
    """The shared sampler around a diffusers SD 1.x pipeline's components."""

    def __init__(self, pipe, model_id: str = "", cache_size: int = 4, cache_dir: str | Path | None = None):  # pragma: no mutate block
        self.unet = pipe.unet
        self.net = self.unet  # what runs the UNet: the module itself, or its compiled form
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self.tokenizer = pipe.tokenizer
        self.scheduler = pipe.scheduler
        self.model_id = model_id
        #: what the UNet predicts (the scheduler's ``prediction_type``): every output is
        #: converted to ε in :meth:`eps` (:func:`~diffeditor.sampling.eps_from_prediction`)
        self.prediction_type = getattr(self.scheduler.config, "prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            from .errors import ModelError

            raise ModelError(f"the model's scheduler predicts {str(self.prediction_type)[:40]!r}; "
                             f"diffeditor supports {', '.join(PREDICTION_TYPES)}")
        self._alphas = self.scheduler.alphas_cumprod.double()
        #: SDXL: the second tokenizer and text encoder (CLIP with projection: the pooled
        #: embedding), and the width of that pooled embedding (0: no added conditions)
        self.tokenizer_2 = getattr(pipe, "tokenizer_2", None)
        self.text_encoder_2 = getattr(pipe, "text_encoder_2", None)
        self.pooled_dim = 0
        if getattr(self.unet.config, "addition_embed_type", None) == "text_time":
            self.pooled_dim = _pooled_dim(self.unet.config)
        pipe_config = getattr(pipe, "config", None)
        #: SDXL's unconditional branch: zeros instead of the encoded empty prompt (diffusers'
        #: ``force_zeros_for_empty_prompt``, true for SDXL base)
        self.zero_uncond = bool(self.pooled_dim and pipe_config is not None
                                and pipe_config.get("force_zeros_for_empty_prompt", False))
        self.image_prompt = None  # an ImagePromptEncoder, when the model has image-prompt weights
        #: the text prompt encoder (a registered TextPromptEncoder; the Editor sets the spec's)
        self.text_prompt_encoder = CLIP
        self.cache = InversionCache(cache_size, cache_dir)
        self.counters = Counters()
        # all regions' gradients in one (vmapped) backward pass: fewer kernel launches on a GPU;
        # on a CPU one pass per region measured faster (see README, Speed)
        self.batched_region_grads = self.device.type == "cuda"
        # the reference-feature pass batched into the CFG call of the same step (exact; one
        # call fewer per guided step; measured faster on CPU too)
        self.merge_reference_pass = True
        self.options: dict[str, Any] = {"attention_slice": None, "vae_slicing": False,
                                        "vae_tiling": False, "compile": None}
        self._text_cache: dict[tuple[str, str], Tensor] = {}
        self._unet32 = None  # float32 copy for guidance_precision: float32 (made on first use)
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if module is None:
                continue
            module.requires_grad_(False)
            module.eval()

    # -- speed and memory options --------------------------------------------------------------
    def set_memory_options(self, attention_slice: int | None = None, vae_slicing: bool = False,
                           vae_tiling: bool = False) -> None:  # pragma: no mutate block
        """Options for small GPUs; each gives the same result as without it (tests).

        ``attention_slice``: self-attention ``N`` queries at a time (the memory bank's layers
        included). ``vae_slicing``: encode/decode a batch one image at a time. ``vae_tiling``:
        encode/decode large images in overlapping tiles (approximately equal, seams blended).
        """
        set_attention_slicing(self.unet, attention_slice)
        (self.vae.enable_slicing if vae_slicing or vae_tiling else self.vae.disable_slicing)()
        (self.vae.enable_tiling if vae_tiling else self.vae.disable_tiling)()
        self.options.update(attention_slice=attention_slice, vae_slicing=vae_slicing or vae_tiling,
                            vae_tiling=vae_tiling)

    def compile(self, mode: str | None = "default", backend: str = "inductor") -> None:  # pragma: no mutate block
        """Compile the UNet with ``torch.compile`` for every call the engine makes.

        ``mode`` is torch.compile's: ``"default"``, ``"reduce-overhead"`` (CUDA graphs: the
        lever on a GPU, where the eager UNet is bound by kernel launches at batch 1-4) or
        ``"max-autotune"``; ``None`` or ``"off"`` goes back to eager. Shapes are static: each
        batch size and resolution compiles once (the first edit pays for it). The memory
        bank's processors run eagerly between compiled regions (they read per-step state), so
        the bank never triggers recompiles. With CUDA graphs every call starts a new cudagraph
        step and its outputs are copied out of the graph's buffers. Results match eager to
        float tolerance (test, on a CPU backend; no GPU has run this path yet). Region
        gradients come one backward pass per region (vmap does not batch through compiled
        backward graphs).
        """
        if mode in (None, "off", "none"):
            self.net = self.unet
            self.options["compile"] = None
            self.batched_region_grads = self.device.type == "cuda"
            return
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
        import torch._dynamo

        cfg = torch._dynamo.config
        # variants: batch sizes x grad/no-grad x bank patched or not x image-prompt on/off
        cfg.recompile_limit = max(cfg.recompile_limit, 64)
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 1024)
        # one backward per region runs twice through one graph (retain_graph), which compiled
        # backward functions allow only without donated buffers
        import torch._functorch.config

        torch._functorch.config.donated_buffer = False
        self.batched_region_grads = False
        kwargs = {} if mode == "default" or backend != "inductor" else {"mode": mode}
        compiled = torch.compile(self.unet, backend=backend, dynamic=False, **kwargs)
        self.net = _OwnedOutputs(compiled) if mode in CUDAGRAPH_MODES else compiled
        self.options["compile"] = mode if backend == "inductor" else f"{mode} ({backend})"

    # -- properties ----------------------------------------------------------------------------
    # read from the first parameter: diffusers' ``ModelMixin.device`` walks every submodule
    # (for offloading hooks), which cost ~15% of a CPU edit when asked per step
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # -- encoders ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Tensor:
        """Text embeddings ``(B, 77, D)`` from :attr:`text_prompt_encoder`, cached per
        (encoder, prompt)."""
        enc = self.text_prompt_encoder
        keys = [(enc.name, p) for p in prompts]
        missing = [k for k in dict.fromkeys(keys) if k not in self._text_cache]
        if missing:
            emb = enc.encode(self, [p for _, p in missing])
            for k, e in zip(missing, emb):
                self._text_cache[k] = e.to(self.device, self.dtype)
        return torch.stack([self._text_cache[k] for k in keys])

    @torch.no_grad()
    def encode_uncond(self) -> Tensor:
        """The unconditional branch's context: the empty prompt's embedding, or zeros for an
        SDXL model that asks for them (``force_zeros_for_empty_prompt``, as diffusers does)."""
        emb = self.encode_text([""])
        return torch.zeros_like(emb) if self.zero_uncond else emb

    @torch.no_grad()
    def encode_image(self, image: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> scaled latent (posterior mean), float32."""
        x = image.to(self.vae.device, self.vae.dtype)
        z = self.vae.encode(x).latent_dist.mean
        return (z * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        x = self.vae.decode((z / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        return x.float().clamp(-1, 1)

    # -- network calls -------------------------------------------------------------------------
    def _unet_kwargs(self, batch: int, cond_rows: list[bool] | None = None) -> dict:
        if self.image_prompt is None:
            return {}
        return {"added_cond_kwargs": self.image_prompt.added_cond_kwargs(batch, cond_rows)}

    def _unet_inputs(self, z: Tensor, context: Tensor, cond_rows: list[bool] | None = None
                     ) -> tuple[Tensor, dict]:
        """``(encoder_hidden_states, extra kwargs)`` of one UNet call on the batch ``z``: the
        image prompt's tokens and, for SDXL, the added conditions of every row: its pooled text
        embedding (carried as the context's last token, see :class:`ClipTextEncoder`) and the
        time ids (original size, crop (0, 0), target size: the working size of ``z``)."""
        kwargs = self._unet_kwargs(z.shape[0], cond_rows)
        if not self.pooled_dim:
            return context, kwargs
        added = dict(kwargs.get("added_cond_kwargs", {}))
        added["text_embeds"] = context[:, -1, : self.pooled_dim]
        added["time_ids"] = self.time_ids(tuple(z.shape[-2:]), z.shape[0]).to(context)
        kwargs["added_cond_kwargs"] = added
        return context[:, :-1], kwargs

    def time_ids(self, latent_hw: tuple[int, int], batch: int) -> Tensor:
        """SDXL's added time ids ``(B, 6)``: original size, crop top-left, target size (pixels)."""
        h, w = latent_hw[0] * self.vae_scale, latent_hw[1] * self.vae_scale
        return torch.tensor([[h, w, 0, 0, h, w]]).float().expand(batch, 6)

    def to_eps(self, out: Tensor, z: Tensor, t: Tensor, a: Tensor | None = None) -> Tensor:
        """The model's output as ε (:func:`~diffeditor.sampling.eps_from_prediction`), at the
        noise level ``a`` of ``z`` (default: ᾱ of the timestep ``t`` the model was given)."""
        if self.prediction_type == "epsilon":  # pragma: no mutate (a shortcut: no GPU sync for ᾱ)
            return out
        if a is None:
            a = self._alphas[int(torch.as_tensor(t).reshape(-1)[0])]
        return eps_from_prediction(out, z.float(), a, self.prediction_type)

    @torch.no_grad()
    def eps(self, z: Tensor, t: Tensor, context: Tensor, cond_rows: list[bool] | None = None,
            a: Tensor | None = None) -> Tensor:
        """Noise prediction ε in float32 for a batch (never differentiated: guidance enters
        through :meth:`features`), converted from the model's prediction type at the noise
        level ``a`` of ``z`` (default: the timestep's)."""
        self.counters.unet_forward += 1
        ctx, kwargs = self._unet_inputs(z, context, cond_rows)
        out = self.net(
            z.to(self.dtype), t, encoder_hidden_states=ctx, return_dict=False, **kwargs,
        )[0]
        return self.to_eps(out.float(), z, t, a)

    @staticmethod
    def _cfg_rows(z: Tensor, cond: Tensor, context: Tensor, scale: float) -> tuple[Tensor, Tensor, list[bool]]:
        """The batch, contexts and conditional rows of a CFG call; at scale 1 CFG is the
        conditional branch alone."""
        return (torch.cat([z, z]), context, [False, True]) if scale != 1.0 else (z, cond, [True])

    @staticmethod
    def _cfg_combine(out: Tensor, scale: float) -> Tensor:
        return combine_cfg(*out.chunk(2), scale) if scale != 1.0 else out

    def cfg_eps(self, z: Tensor, t: Tensor, cond: Tensor, context: Tensor, scale: float) -> Tensor:
        """Classifier-free-guided noise prediction (``context`` = ``[uncond, cond]``)."""
        zz, ctx, rows = self._cfg_rows(z, cond, context, scale)
        return self._cfg_combine(self.eps(zz, t, ctx, rows), scale)

    def features(self, z: Tensor, t: Tensor, context: Tensor, levels, scale, net=None) -> Features:
        self.counters.unet_partial += 1
        context, kwargs = self._unet_inputs(z, context, [True] * z.shape[0])
        if net is not None:  # another precision: its inputs follow
            dtype = next(net.parameters()).dtype
            context = context.to(dtype)
            if "added_cond_kwargs" in kwargs:
                kwargs["added_cond_kwargs"] = {
                    k: [e.to(dtype) for e in v] if isinstance(v, list) else v.to(dtype)
                    for k, v in kwargs["added_cond_kwargs"].items()}
        return decoder_features(net if net is not None else self.net, z, t, context, tuple(levels),
                                scale, kwargs)

    def _float32_net(self):  # pragma: no mutate block
        """A float32 copy of a half-precision UNet for the guidance pass with gradient (method
        reference §10.2 item 9: the release backpropagates through fp16); ``None`` when the
        UNet is float32 already. Made once, outside any patch, with the image prompt off; it
        costs a float32 copy of the UNet's weights (about 3.4 GB for SD 1.5)."""
        if self.dtype == torch.float32:
            return None
        if self._unet32 is None:
            import copy

            self._unet32 = copy.deepcopy(self.unet).float()
            from .image_prompt import has_image_prompt, set_image_prompt_scale

            if has_image_prompt(self._unet32):
                set_image_prompt_scale(self._unet32, 0.0)
        return self._unet32

    def _set_image_prompt(self, gamma: float) -> None:
        if self.image_prompt is not None:
            self.image_prompt.set_scale(gamma)

    # -- inversion -----------------------------------------------------------------------------
    def inversion_key(self, plan: EditPlan, steps: int, image_prompt: tuple | None = None) -> str:  # pragma: no mutate block
        h = hashlib.sha256()
        h.update(f"{self.model_id}|{steps}|{self.dtype}|{self.device}".encode())
        if image_prompt is not None:  # inverted under the image prompt: another trajectory
            gamma, ip_steps = image_prompt
            h.update(f"|ip|{gamma}|{sorted(ip_steps)}|{plan.image_prompt_source}".encode())
        for name in plan.images:
            h.update(name.encode())
            h.update(plan.prompts.get(name, "").encode())
            img = plan.images[name].detach().float().cpu().contiguous()
            h.update(str(tuple(img.shape)).encode())
            h.update(img.numpy().tobytes())
        return h.hexdigest()

    def _fits(self, inv: Inversion, plan: EditPlan, num_steps: int) -> bool:  # pragma: no mutate block
        """Whether a cached inversion has this plan's images, step count and latent shape."""
        if set(inv.latents) != set(plan.images):
            return False
        channels = self.unet.config.in_channels
        for name, zs in inv.latents.items():
            h, w = plan.images[name].shape[-2:]
            want = (1, channels, h // self.vae_scale, w // self.vae_scale)
            if len(zs) != num_steps + 1 or any(tuple(z.shape) != want for z in zs):
                return False
        return True

    @torch.no_grad()
    def invert(self, plan: EditPlan, grid: DDIMTimesteps, progress=None,
               bank_steps: frozenset[int] | None = None,
               image_prompt: tuple[float, frozenset[int]] | None = None) -> tuple[Inversion, bool]:
        """DDIM-invert every image of the plan together, recording the memory bank for the
        denoising steps ``bank_steps`` (``None``: all).

        Conditioning: each image's own text prompt, no CFG, no image prompt (as the reference);
        ``image_prompt = (gamma, steps)`` adds the current image prompt (the edit's tokens, set
        by :meth:`edit`) with weight gamma at those denoising steps, as the paper's inversion.
        Results are cached by content; a cached inversion serves when its bank holds the steps
        asked for (else the images are inverted again, recording both sets). Returns
        ``(inversion, was_cached)``.
        """
        if self.image_prompt is None:
            image_prompt = None
        key = self.inversion_key(plan, grid.num_steps, image_prompt)
        hit = self.cache.get(key)
        if hit is not None and not self._fits(hit, plan, grid.num_steps):
            log.warning("ignoring a cached inversion that does not fit this edit; inverting again")
            hit = None
        if hit is not None and not hit.bank.covers(bank_steps):
            # invert again, keeping the cached steps too (the union serves both kinds of edit)
            bank_steps = None if bank_steps is None else bank_steps | hit.bank.record_steps
            hit = None
        if hit is not None:
            dev = self.device
            # loaded from disk (CPU): latents and bank move together; the latents are always
            # there, the bank may be empty
            if next(iter(hit.latents.values()))[0].device != dev:
                hit.bank.store = {s: (k.to(dev), v.to(dev)) for s, (k, v) in hit.bank.store.items()}
                hit.latents = {n: [z.to(dev) for z in zs] for n, zs in hit.latents.items()}
            return hit, True
        start = time.perf_counter()
        names = list(plan.images)
        x = torch.cat([plan.images[n] for n in names])
        z0 = self.encode_image(x).to(self.device)
        context = self.encode_text([plan.prompts.get(n, "") for n in names])
        bank = MemoryBank(mode="record", image_index={n: i for i, n in enumerate(names)},
                          record_steps=None if bank_steps is None else frozenset(bank_steps))
        bank.latent_hw = tuple(z0.shape[-2:])
        self._set_image_prompt(0.0)
        bar = progress(grid.num_steps, "inversion") if progress else None

        def eps_fn(z: Tensor, i: int) -> Tensor:
            bank.step = i
            if image_prompt is not None:
                self._set_image_prompt(image_prompt[0] if i in image_prompt[1] else 0.0)
            # the model sees the next timestep; its output is read at z's own level
            return self.eps(z, grid.timesteps[i].to(self.device), context, [True] * len(names),
                            a=grid.alphas_prev[i])

        def tick(i: int, z: Tensor) -> None:
            if bar is not None:
                bar.update(1)

        with memory_bank_patch(self.unet, bank):
            latents = ddim_invert(z0, eps_fn, grid, tick)
        self._set_image_prompt(0.0)
        if bar is not None:
            bar.close()
        bank.mode = "off"
        inv = Inversion(
            {n: [z[i : i + 1] for z in latents] for i, n in enumerate(names)},
            bank,
            time.perf_counter() - start,
        )
        self.cache.put(key, inv)
        return inv, False

    # -- guidance ------------------------------------------------------------------------------
    def guidance(
        self,
        z: Tensor,
        t: Tensor,
        context: Tensor,
        ref_feats: dict[str, Features],
        plan: EditPlan,
        spec,
        net=None,
        eps: Tensor | None = None,
        log: list | None = None,
    ) -> Tensor:
        """Regional score-based guidance: ``Σ_r region_r ⊙ ∇_z(λ·Σ_{terms in r} w·E)``.

        One feature pass with gradient, one backward pass per region; energies in float32.
        ``spec`` is the resolved :class:`~diffeditor.denoisers.Settings` (a spec object has the
        same fields and serves too). ``net`` runs that pass instead of the UNet (the float32 copy of :meth:`_float32_net`).
        Given the step's noise prediction ``eps``, each region's term ``k·region ⊙ ∇E`` is
        measured against ``eps`` inside the region (its RMS ratio is appended to ``log`` by
        region name) and, with ``spec.guidance_clip``, scaled down to at most that ratio.
        """
        terms = [term for term in plan.energies if term.weight != 0]
        if not terms:
            return torch.zeros_like(z)
        if spec.guidance_region == "global":
            groups = {"__global__": terms}
            regions = {"__global__": torch.ones_like(z[:, :1])}
        else:
            groups = {}
            for term in terms:
                groups.setdefault(term.region, []).append(term)
            regions = plan.regions
        names = list(groups)
        for _attempt in range(2):
            with torch.enable_grad():
                zg = z.detach().requires_grad_(True)
                cur = self.features(zg, t, context, spec.feature_levels, spec.feature_scale, net)
                energies = torch.stack([
                    spec.energy_scale * sum(term.weight * term.fn(cur, ref_feats).float()
                                            for term in groups[r]).sum()
                    for r in names
                ])
                try:
                    grads = self._region_grads(energies, zg)
                    break
                except _BatchedGradsUnsupported:
                    # a failed batched backward may have freed the graph: build it again
                    continue
        correction = torch.zeros_like(z)
        for region, grad in zip(names, grads):
            mask = regions[region].to(z)
            part = mask * grad.float()
            if eps is not None and spec.guidance_k > 0:
                clip = spec.guidance_clip
                bounded, ratio = bound_guidance(spec.guidance_k * part, eps, mask,
                                                clip if clip is not None else float("inf"))
                if log is not None:  # a tensor: read once the edit ends (no sync per pass)
                    log.append((region, ratio.max()))
                part = bounded / spec.guidance_k
            correction = correction + part
        return correction.detach()

    def _region_grads(self, energies: Tensor, z: Tensor) -> list[Tensor]:
        """∇_z of each energy: one batched backward pass (a vmap over the cotangents, exact),
        falling back to one backward pass per energy where batching is unsupported."""
        k = energies.shape[0]
        self.counters.region_gradients += k
        if k > 1 and self.batched_region_grads:
            try:
                (g,) = torch.autograd.grad(energies, z, grad_outputs=torch.eye(k, device=z.device,
                                           dtype=energies.dtype), is_grads_batched=True)
                self.counters.unet_backward += 1
                return list(g.unbind(0))
            except RuntimeError as exc:  # depends on the backend's vmap rules (compiled graphs)
                log.info("batched region gradients unavailable (%s); using one pass per region", exc)
                self.batched_region_grads = False
                raise _BatchedGradsUnsupported from exc
        out = []
        for j in range(k):
            (g,) = torch.autograd.grad(energies[j], z, retain_graph=j < k - 1)
            self.counters.unet_backward += 1
            out.append(g)
        return out

    # -- editing -------------------------------------------------------------------------------
    def settings(self, plan: EditPlan, spec, sampler=None, schedules: dict | None = None) -> Settings:
        """The spec's values the sampler and the denoiser read, resolved for this plan: step
        windows as index sets (``schedule.preset`` filled in from ``schedules``), the sampler's
        own adjustments, no guided steps when the plan has no energy to minimise."""
        from .schedule import BUILTIN_SCHEDULES

        schedules = BUILTIN_SCHEDULES if schedules is None else schedules
        try:
            sched_spec = spec.schedule.with_preset(schedules)
        except KeyError as exc:
            raise SpecError(exc.args[0], "schedule.preset") from None
        blocks = len(self.unet.up_blocks)
        if any(lv >= blocks for lv in spec.feature_levels):
            raise SpecError(f"feature levels {list(spec.feature_levels)}: this UNet has "
                            f"{blocks} up_blocks (0..{blocks - 1})", "feature_levels")
        sched = Schedule.resolve(sched_spec, spec.steps, plan.attention.window)
        sde_mask = plan.sde_mask if spec.sde_region == "regional" else None
        s = Settings.from_spec(spec, sched, None if sde_mask is None else sde_mask.to(self.device))
        s = (sampler or DIFFEDITOR).settings(s, schedules)
        if not (s.energy_scale > 0 and plan.energies):
            s = s.replace(schedule=dataclasses.replace(s.schedule, guidance=frozenset()))
        return s

    def edit(self, plan: EditPlan, spec, progress: ProgressFactory | None = None,
             callback: StepCallback | None = None, sampler: Sampler | None = None,
             schedules: dict | None = None) -> EditOutput:
        """Run one edit plan with ``sampler`` (default: the built-in one ``spec.sampler``
        names); returns the edited latent
        and image. ``schedules``: the named schedules (by name) a spec's ``schedule.preset`` or
        the sampler may refer to (default: the built-in ones).

        ``callback(i, z, x0)``, if given, is called after each denoising step ``i`` with the new
        latent and the step's predicted x̂0 (of its last pass); it must not modify them, and may
        raise to stop the edit between steps (the inversion stays cached)."""
        timings: dict[str, float] = {}
        before = Counters(**self.counters.as_dict())
        t0 = time.perf_counter()
        sampler = sampler or self._builtin_sampler(getattr(spec, "sampler", "diffeditor"))
        s = self.settings(plan, spec, sampler, schedules)
        sched = s.schedule
        grid = DDIMTimesteps.from_scheduler(self.scheduler, s.steps)
        policy = plan.attention
        if s.memory_bank not in ("task",):
            policy = type(policy)(**{**policy.__dict__, "mode": s.memory_bank})
        if policy.mode == "masked" and not policy.parts:  # specs refuse this before any model loads
            raise SpecError("the plan names no parts to mix: use another policy", "memory_bank")
        # the bank keeps only the steps it will inject at
        bank_steps = frozenset() if policy.mode == "off" else sched.memory_bank
        if self.image_prompt is not None:
            self.image_prompt.set_image(plan.images[plan.image_prompt_source])
        ip_inversion = ((s.image_prompt_scale, sched.image_prompt)
                        if s.image_prompt_inversion and s.image_prompt_scale > 0 else None)
        inv, cached = self.invert(plan, grid, progress, bank_steps, ip_inversion)
        timings["inversion"] = 0.0 if cached else inv.seconds
        bank = inv.bank
        bank.policy = policy
        bank._mask_cache.clear()
        z = plan.surgery({k: v[-1] for k, v in inv.latents.items()}) if plan.surgery else inv.latents["source"][-1]
        z = z.to(self.device, torch.float32)
        guidance_log: list[dict] = []  # per guided pass: RMS(k·∇E) / RMS(ε) in each region
        model = self.denoiser(plan, s, inv, policy, guidance_log)
        bar = progress(grid.num_steps, "editing") if progress else None

        def on_step(i: int, z: Tensor, x0: Tensor) -> None:
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback(i, z, x0)

        t1 = time.perf_counter()
        with memory_bank_patch(self.unet, bank):
            z = sampler.fn(model, z, grid, s, on_step)
        if bar is not None:
            bar.close()
        timings["sampling"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        image = self.decode(z)
        timings["decode"] = time.perf_counter() - t2
        timings["total"] = time.perf_counter() - t0
        after = self.counters.as_dict()
        return EditOutput(
            latent=z, image=image, timings=timings,
            counters={k: after[k] - getattr(before, k) for k in after},
            inversion_cached=cached, bank_bytes=bank.nbytes(),
            guidance=[{**g, "ratio": {r: float(v) for r, v in g["ratio"].items()}} for g in guidance_log],
        )

    @staticmethod
    def _builtin_sampler(name: str) -> Sampler:
        from .samplers import BUILTIN_SAMPLERS

        if name not in BUILTIN_SAMPLERS:
            raise SpecError(f"{name!r} is not a built-in sampler: pass the registered one as "
                            f"edit(sampler=...) (Editor.edit does)", "sampler")
        return BUILTIN_SAMPLERS[name]

    def denoiser(self, plan: EditPlan, s: Settings, inv: Inversion, policy, log: list | None = None) -> Denoiser:
        """The edit's denoiser: CFG UNet, memory bank, image prompt, regional guidance, pins."""
        cond = self.encode_text([plan.prompts.get("source", "")])
        context = torch.cat([self.encode_uncond(), cond])
        names = list(plan.images)
        ref_contexts = self.encode_text([plan.prompts.get(k, "") for k in names])
        n = s.steps
        pins = [(p.mask.to(self.device, torch.float32), p.target, int(round(p.until * n)))
                for p in plan.pins if p.until > 0]
        if s.background_blend > 0 and plan.sde_mask is not None:
            from .geometry import dilate

            keep = (1 - dilate(plan.sde_mask.to(self.device), 1)).to(torch.float32)
            pins.insert(0, (keep, lambda zs: zs["source"], int(round(s.background_blend * n))))
        net32 = self._float32_net() if s.guidance_precision == "float32" else None
        model: Denoiser = CFGDenoiser(self, cond, context, s.guidance_scale, inv.bank,
                                      s.feature_levels, s.feature_scale)
        model = ImagePromptSwitch(model, self.image_prompt, s.image_prompt_scale, s.schedule.image_prompt)
        bank_steps = s.schedule.memory_bank if policy.mode != "off" else frozenset()
        model = MemoryBankSwitch(model, inv.bank, bank_steps)
        model = RegionalGuidance(model, self, plan, s, inv, names, ref_contexts, cond, net32,
                                 self.merge_reference_pass, log)
        return Pins(model, pins, inv.latents)

    def _reference_latents(self, inv: Inversion, names, i: int) -> Tensor:
        n = len(inv.latents[names[0]]) - 1
        return torch.cat([inv.latents[k][n - i] for k in names]).to(self.device)

    @torch.no_grad()
    def _eps_with_references(self, zz: Tensor, ctx: Tensor, rows: list[bool], inv: Inversion, names,
                             contexts, i: int, t, levels, scale: int,
                             bank: MemoryBank) -> tuple[Tensor, dict[str, Features]]:
        """The noise prediction for ``zz`` and the reference features of step ``i`` in one UNet
        call; returns ``(eps of zz's rows, features by image name)``."""
        k = zz.shape[0]
        batch = torch.cat([zz, self._reference_latents(inv, names, i)])
        self.counters.unet_forward += 1
        self.counters.merged_reference += 1
        bank.inject_rows = k
        ctx_all, kwargs = self._unet_inputs(batch, torch.cat([ctx, contexts]),
                                            rows + [True] * len(names))
        try:
            out, feats = output_and_features(self.net, batch, t, ctx_all, slice(k, None),
                                             tuple(levels), scale, kwargs)
        finally:
            bank.inject_rows = None
        return self.to_eps(out[:k].float(), zz, t), _by_image(feats, names)

    @torch.no_grad()
    def _reference_features(self, inv: Inversion, names, contexts, i: int, t, spec) -> dict[str, Features]:
        zs = self._reference_latents(inv, names, i)
        return _by_image(self.features(zs, t, contexts, spec.feature_levels, spec.feature_scale), names)

    @torch.no_grad()
    def reconstruct(self, image: Tensor, prompt: str = "", steps: int = 50,
                    guidance_scale: float = 1.0) -> Tensor:  # pragma: no mutate block
        """Invert then regenerate with plain DDIM (no guidance, bank or SDE): a sanity check of
        inversion. Returns the image in [-1, 1]."""
        from .interfaces import AttentionPolicy

        plan = EditPlan(images={"source": image}, prompts={"source": prompt}, regions={},
                        energies=[], sde_mask=None, attention=AttentionPolicy(mode="off"))
        grid = DDIMTimesteps.from_scheduler(self.scheduler, steps)
        inv, _ = self.invert(plan, grid, bank_steps=frozenset())
        z = inv.latents["source"][-1].to(self.device)
        return self.decode(sample_ddim(self._plain_denoiser(prompt, guidance_scale), z, grid))

    @torch.no_grad()
    def generate(self, prompt: str, steps: int = 50, guidance_scale: float = 7.5,
                 hw: tuple[int, int] = (512, 512), seed: int = 0) -> Tensor:  # pragma: no mutate block
        """Plain CFG DDIM text-to-image with the same components (the benchmark's baseline)."""
        gen = torch.Generator("cpu").manual_seed(seed)
        grid = DDIMTimesteps.from_scheduler(self.scheduler, steps)
        c = self.unet.config.in_channels
        z = torch.randn((1, c, hw[0] // self.vae_scale, hw[1] // self.vae_scale), generator=gen)
        z = z.to(self.device)
        return self.decode(sample_ddim(self._plain_denoiser(prompt, guidance_scale), z, grid))

    def _plain_denoiser(self, prompt: str, guidance_scale: float) -> CFGDenoiser:
        cond = self.encode_text([prompt])
        return CFGDenoiser(self, cond, torch.cat([self.encode_uncond(), cond]), guidance_scale)
