"""Metrics of the drag / face benchmarks, each named by the exact variant it computes.

- :func:`mean_distance` -- DragBench **MD**: DIFT point matching, global search, pixel distance
  to the target, not normalised (:data:`MD_VARIANT`).
- :class:`DIFTFeatures` -- SD 2.1 DIFT features (t = 261, up_ft_index 1, ensemble of 8).
- :func:`image_fidelity` -- DragBench **IF** = 1 - LPIPS(AlexNet) at 224 x 224 (:data:`IF_VARIANT`).
- :func:`landmark_mse` -- the face benchmark's landmark **MSE** (:data:`LANDMARK_MSE_VARIANT`).
- :func:`drag100_dai` -- Drag100's **DAI** for radii 1, 5, 10, 20 (:data:`DAI_VARIANT`).

Metrics that need pretrained weights raise :class:`MetricWeightsMissing` (what is missing, how to
get it) instead of a bare hub or download error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffeditor.errors import DiffEditorError

MD_VARIANT = "MD (DIFT, global search, unnormalised px)"
MD_VARIANT_CELLS = "MD (DIFT, global search at feature resolution, unnormalised px)"
IF_VARIANT = "IF (1 - LPIPS AlexNet, 224x224 bicubic)"
LANDMARK_MSE_VARIANT = "landmark MSE (mean over points of squared Euclidean px distance)"
DAI_VARIANT = "DAI (mean over pairs of per-pixel squared RGB L2 in [0,1], (2r+1)^2 patch)"

SD21 = "stabilityai/stable-diffusion-2-1"
#: DIFT's settings for SD 2.1 as used by DragBench's MD.
DIFT_T, DIFT_UP_FT_INDEX, DIFT_ENSEMBLE = 261, 1, 8
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


class MetricWeightsMissing(DiffEditorError, RuntimeError):
    """A metric's pretrained weights (or the package that carries them) are not available."""


Points = np.ndarray | torch.Tensor | Sequence[Sequence[float]]


def _points(points: Points, name: str) -> np.ndarray:
    arr = np.asarray(points.cpu() if isinstance(points, torch.Tensor) else points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must be an (N, 2) array of [x, y] pixels, got shape {arr.shape}")
    return arr


def _pixel_index(points: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest pixel (x, y) integer indices, clipped to the image."""
    xs = np.clip(np.rint(points[:, 0]), 0, width - 1).astype(np.int64)
    ys = np.clip(np.rint(points[:, 1]), 0, height - 1).astype(np.int64)
    return xs, ys


# -- MD ------------------------------------------------------------------------------------------


def _as_features(feats: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(feats).detach()
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3:
        raise ValueError(f"{name} must be (C, h, w) features, got shape {tuple(t.shape)}")
    return t.float()


def _upsampled(feats: torch.Tensor, size_hw: tuple[int, int], chunk: int):
    """Bilinear upsampling to ``size_hw`` (align_corners=False), ``chunk`` channels at a time."""
    for c0 in range(0, feats.shape[0], chunk):
        yield (
            c0,
            F.interpolate(
                feats[None, c0 : c0 + chunk], size=size_hw, mode="bilinear", align_corners=False
            )[0],
        )


def mean_distance(
    orig_feats: Any,
    edited_feats: Any,
    handles: Points,
    targets: Points,
    image_size: tuple[int, int],
    *,
    upsample: bool = True,
    chunk: int = 64,
) -> dict[str, Any]:
    """DragBench's mean distance, variant "MD (DIFT, global search, unnormalised px)".

    For each handle ``p_i``, take the ORIGINAL image's feature vector at ``p_i``; find the pixel
    of the EDITED image whose feature has the highest cosine similarity to it, searching the
    whole image (no window); the pair's distance is the Euclidean pixel distance from that pixel
    to the target ``q_i``. MD is the mean over pairs, in pixels of the image, not normalised by
    image size. Lower is better.

    Args:
        orig_feats, edited_feats: ``(C, h, w)`` (or ``(1, C, h, w)``) feature maps, for example
            from :class:`DIFTFeatures`.
        handles, targets: ``(N, 2)`` ``[x, y]`` pixel positions; rounded to the nearest pixel.
        image_size: ``(width, height)`` of the image the points refer to.
        upsample: True (the DragBench protocol): both maps are upsampled bilinearly to the image
            size and searched per pixel. False: the handle is looked up in the feature cell that
            contains it and the match is the centre of the best cell, mapped back to pixels
            (variant :data:`MD_VARIANT_CELLS`; cheaper, coarser).
        chunk: channels upsampled at a time (the full upsampled SD map is ~1 GB per image).

    Returns:
        ``{"metric": variant name, "md": float, "distances": [float] * N,
        "matches": [[x, y]] * N}``.
    """
    f0, f1 = _as_features(orig_feats, "orig_feats"), _as_features(edited_feats, "edited_feats")
    f1 = f1.to(f0.device)
    if f0.shape != f1.shape:
        raise ValueError(f"feature maps differ in shape: {tuple(f0.shape)} vs {tuple(f1.shape)}")
    h_pts, t_pts = _points(handles, "handles"), _points(targets, "targets")
    if len(h_pts) != len(t_pts) or len(h_pts) == 0:
        raise ValueError(
            f"need the same non-zero number of handles and targets, got {len(h_pts)} and "
            f"{len(t_pts)}"
        )
    width, height = (int(v) for v in image_size)
    if upsample:
        matches = _match_upsampled(f0, f1, h_pts, width, height, chunk)
        name = MD_VARIANT
    else:
        matches = _match_cells(f0, f1, h_pts, width, height)
        name = MD_VARIANT_CELLS
    distances = np.linalg.norm(matches - t_pts, axis=1)
    return {
        "metric": name,
        "md": float(distances.mean()),
        "distances": distances.tolist(),
        "matches": matches.tolist(),
    }


def _best_match(
    dot: torch.Tensor, sq_norm: torch.Tensor, src_norm: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Row/col of the maximum cosine similarity per source vector. dot: (N, H, W)."""
    cos = dot / (src_norm[:, None, None] * sq_norm.sqrt()[None]).clamp_min(1e-12)
    flat = cos.flatten(1).argmax(dim=1).cpu().numpy()
    return np.unravel_index(flat, tuple(sq_norm.shape))


def _match_upsampled(f0, f1, handles, width, height, chunk) -> np.ndarray:
    xs, ys = _pixel_index(handles, width, height)
    device = f0.device
    iy, ix = torch.from_numpy(ys).to(device), torch.from_numpy(xs).to(device)
    src = torch.empty(len(xs), f0.shape[0], device=device)
    for c0, up in _upsampled(f0, (height, width), chunk):
        src[:, c0 : c0 + up.shape[0]] = up[:, iy, ix].T
    dot = torch.zeros(len(xs), height, width, device=device)
    sq = torch.zeros(height, width, device=device)
    for c0, up in _upsampled(f1, (height, width), chunk):
        dot += torch.einsum("nc,chw->nhw", src[:, c0 : c0 + up.shape[0]], up)
        sq += up.square().sum(0)
    rows, cols = _best_match(dot, sq, src.norm(dim=1))
    return np.stack([cols, rows], axis=1).astype(np.float64)


def _match_cells(f0, f1, handles, width, height) -> np.ndarray:
    _, h, w = f0.shape
    sx, sy = width / w, height / h
    xs, ys = _pixel_index(handles, width, height)
    cx = np.minimum((xs / sx).astype(np.int64), w - 1)
    cy = np.minimum((ys / sy).astype(np.int64), h - 1)
    src = f0[:, torch.from_numpy(cy).to(f0.device), torch.from_numpy(cx).to(f0.device)].T  # (N, C)
    dot = torch.einsum("nc,chw->nhw", src, f1)
    rows, cols = _best_match(dot, f1.square().sum(0), src.norm(dim=1))
    # centre of cell (row, col) in pixel coordinates (pixel x is the centre of pixel column x)
    return np.stack([(cols + 0.5) * sx - 0.5, (rows + 0.5) * sy - 0.5], axis=1)


# -- DIFT features -------------------------------------------------------------------------------


class _FeaturesCaptured(Exception):
    """Raised by the forward hook to stop the UNet once the wanted block has run."""


def _weights_missing(what: str, location: str, exc: BaseException) -> MetricWeightsMissing:
    return MetricWeightsMissing(
        f"MD needs Stable Diffusion 2.1 for DIFT features, but its {what} could not be loaded "
        f"from {location!r} ({type(exc).__name__}: {exc}). Download the diffusers-format "
        f"'{SD21}' (unet, vae, text_encoder, tokenizer, scheduler; about 5 GB) on a machine with "
        f"internet, e.g. `huggingface-cli download {SD21} --exclude '*.ckpt' '*.bin' "
        "--local-dir sd21`, and pass that folder (diffeditor eval dragbench --dift-model sd21)."
    )


def _looks_like_path(location: str) -> bool:
    """True for a filesystem path (a hub id is ``owner/name``: one slash, no leading . / ~)."""
    return location.startswith((".", "/", "~")) or location.count("/") > 1 or "\\" in location


class DIFTFeatures:
    """Diffusion features (DIFT, Tang et al. 2023) from a diffusers UNet.

    The image is encoded by the VAE, noised to timestep ``t`` with the model's noise schedule
    (``ensemble_size`` independent noises), passed once through the UNet with the prompt's text
    embedding, and the output of ``unet.up_blocks[up_ft_index]`` is averaged over the ensemble.
    The feature block is read with a forward hook that also stops the UNet there; the UNet is
    never modified. DragBench's MD uses SD 2.1 with ``t=261``, ``up_ft_index=1``,
    ``ensemble_size=8`` (the defaults): 1280 channels at 1/16 of the image size.

    Args:
        unet: a ``UNet2DConditionModel``; its device and dtype are used throughout.
        vae: an ``AutoencoderKL``.
        text_encoder, tokenizer: encode prompts (CLIP); may be omitted if every call passes
            ``prompt_embeds``.
        scheduler: anything with ``add_noise``; defaults to SD's scaled-linear DDPM schedule.
        batch_size: ensemble members per UNet call (default: the whole ensemble at once).
    """

    def __init__(
        self,
        unet,
        vae,
        text_encoder=None,
        tokenizer=None,
        scheduler=None,
        *,
        t: int = DIFT_T,
        up_ft_index: int = DIFT_UP_FT_INDEX,
        ensemble_size: int = DIFT_ENSEMBLE,
        batch_size: int | None = None,
    ):
        if not 0 <= up_ft_index < len(unet.up_blocks):
            raise ValueError(
                f"up_ft_index {up_ft_index} out of range: the UNet has "
                f"{len(unet.up_blocks)} up blocks"
            )
        if ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {ensemble_size}")
        if scheduler is None:
            from diffusers import DDPMScheduler

            scheduler = DDPMScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                num_train_timesteps=1000,
            )
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.t, self.up_ft_index, self.ensemble_size = int(t), int(up_ft_index), int(ensemble_size)
        self.batch_size = batch_size or ensemble_size

    @classmethod
    def from_pretrained(
        cls,
        location: str | os.PathLike = SD21,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        local_files_only: bool | None = None,
        **kwargs: Any,
    ) -> DIFTFeatures:
        """Load SD 2.1's components from a local diffusers folder or a hub id.

        Raises:
            MetricWeightsMissing: a component cannot be found or downloaded (offline, wrong
                folder); the message names the component and how to get it.
        """
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        location = os.fspath(location)
        if not os.path.isdir(location) and _looks_like_path(location):
            raise _weights_missing("folder", location, FileNotFoundError("no such folder"))
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        common: dict[str, Any] = {}
        if local_files_only is not None:
            common["local_files_only"] = local_files_only
        loaders = {
            "unet": lambda: UNet2DConditionModel.from_pretrained(
                location, subfolder="unet", torch_dtype=dtype, **common
            ),
            "vae": lambda: AutoencoderKL.from_pretrained(
                location, subfolder="vae", torch_dtype=dtype, **common
            ),
            "text_encoder": lambda: CLIPTextModel.from_pretrained(
                location, subfolder="text_encoder", torch_dtype=dtype, **common
            ),
            "tokenizer": lambda: CLIPTokenizer.from_pretrained(
                location, subfolder="tokenizer", **common
            ),
            "scheduler": lambda: DDPMScheduler.from_pretrained(
                location, subfolder="scheduler", **common
            ),
        }
        parts: dict[str, Any] = {}
        for what, load in loaders.items():
            try:
                parts[what] = load()
            except (
                OSError,
                ValueError,
            ) as exc:  # hub / offline errors are OSErrors; bad ids ValueErrors
                raise _weights_missing(what, location, exc) from exc
        for what in ("unet", "vae", "text_encoder"):
            parts[what].to(device).eval().requires_grad_(False)
        return cls(**parts, **kwargs)

    # -- pieces -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """``(1, L, D)`` text embedding of ``prompt`` (CLIP's last hidden state)."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this DIFTFeatures has no text encoder/tokenizer: pass prompt_embeds")
        ids = self.tokenizer(
            [prompt],
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )["input_ids"]
        enc_device = next(self.text_encoder.parameters()).device
        return self.text_encoder(ids.to(enc_device))[0].to(self.device, self.dtype)

    def image_tensor(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        """``(1, 3, H, W)`` in [-1, 1] on the VAE's device and dtype."""
        arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected an RGB image, got an array of shape {arr.shape}")
        x = torch.from_numpy(np.array(arr)).permute(2, 0, 1)[None].float()
        x = x / 127.5 - 1.0 if arr.dtype == np.uint8 else x * 2.0 - 1.0
        vae_param = next(self.vae.parameters())
        return x.to(vae_param.device, vae_param.dtype)

    @torch.no_grad()
    def unet_features(
        self, noisy_latents: torch.Tensor, timestep: int, prompt_embeds: torch.Tensor
    ) -> torch.Tensor:
        """Output of ``unet.up_blocks[up_ft_index]`` for noisy latents: ``(B, C, h, w)``."""
        captured: dict[str, torch.Tensor] = {}

        def hook(module, inputs, output):
            captured["ft"] = output[0] if isinstance(output, tuple) else output
            raise _FeaturesCaptured

        handle = self.unet.up_blocks[self.up_ft_index].register_forward_hook(hook)
        try:
            ts = torch.full(
                (noisy_latents.shape[0],), timestep, device=noisy_latents.device, dtype=torch.long
            )
            embeds = prompt_embeds.expand(noisy_latents.shape[0], -1, -1)
            self.unet(noisy_latents, ts, encoder_hidden_states=embeds)
        except _FeaturesCaptured:
            pass
        finally:
            handle.remove()
        if "ft" not in captured:
            raise RuntimeError(f"unet.up_blocks[{self.up_ft_index}] did not run")
        return captured["ft"]

    @torch.no_grad()
    def features(
        self,
        image: Image.Image | np.ndarray,
        prompt: str = "",
        *,
        prompt_embeds: torch.Tensor | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DIFT features of ``image``: ``(C, h, w)`` float32, on the UNet's device.

        ``seed`` (or ``generator``) fixes the VAE sample and the ensemble's noise; use the same
        seed for the original and the edited image.
        """
        from diffusers.utils.torch_utils import randn_tensor

        if generator is None and seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)
        embeds = self.encode_prompt(prompt) if prompt_embeds is None else prompt_embeds
        embeds = embeds.to(self.device, self.dtype)
        posterior = self.vae.encode(self.image_tensor(image)).latent_dist  # encoded once
        mean, std = (
            posterior.mean.to(self.device, self.dtype),
            posterior.std.to(self.device, self.dtype),
        )
        total: torch.Tensor | None = None
        for start in range(0, self.ensemble_size, self.batch_size):
            n = min(self.batch_size, self.ensemble_size - start)
            shape = (n, *mean.shape[1:])
            # one VAE posterior sample and one noise per ensemble member, as DIFT does
            eps = randn_tensor(shape, generator=generator, device=mean.device, dtype=mean.dtype)
            latents = (mean + std * eps) * self.vae.config.scaling_factor
            noise = randn_tensor(shape, generator=generator, device=mean.device, dtype=mean.dtype)
            ts = torch.full((n,), self.t, device=latents.device, dtype=torch.long)
            noisy = self.scheduler.add_noise(latents, noise, ts)
            ft = self.unet_features(noisy, self.t, embeds).float().sum(0)
            total = ft if total is None else total + ft
        return total / self.ensemble_size

    __call__ = features


# -- IF ------------------------------------------------------------------------------------------

_LPIPS_CACHE: dict[str, Any] = {}


def _load_lpips(device: torch.device):
    key = str(device)
    if key in _LPIPS_CACHE:
        return _LPIPS_CACHE[key]
    try:
        import lpips
    except ImportError as exc:
        raise MetricWeightsMissing(
            "IF = 1 - LPIPS(AlexNet) needs the optional lpips package: "
            "pip install 'diffeditor-eval[lpips]' (or pip install lpips). lpips also needs "
            f"torchvision's ImageNet AlexNet weights ({ALEXNET_FILE}), downloaded on first use."
        ) from exc
    try:
        model = lpips.LPIPS(net="alex", verbose=False)
    except (OSError, RuntimeError, ImportError) as exc:  # URLError is an OSError
        where = os.path.join(torch.hub.get_dir(), "checkpoints", ALEXNET_FILE)
        raise MetricWeightsMissing(
            f"LPIPS(AlexNet) could not load its backbone ({type(exc).__name__}: {exc}). lpips uses "
            f"torchvision's ImageNet AlexNet weights: download "
            f"https://download.pytorch.org/models/{ALEXNET_FILE} on a machine with internet and "
            f"put it at {where}."
        ) from exc
    model = model.to(device).eval().requires_grad_(False)
    _LPIPS_CACHE[key] = model
    return model


def _to_lpips_tensor(image: Image.Image | np.ndarray, size: int) -> torch.Tensor:
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    im = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].float()
    return x / 127.5 - 1.0


@torch.no_grad()
def image_fidelity(
    a: Image.Image | np.ndarray,
    b: Image.Image | np.ndarray,
    *,
    model=None,
    device: str | torch.device = "cpu",
    size: int = 224,
) -> float:
    """DragBench's IF = 1 - LPIPS(AlexNet), both images resized to ``size`` x ``size`` (bicubic).

    Higher is better (1 = perceptually identical). ``model`` is any callable
    ``(x, y) -> distance`` on ``(1, 3, size, size)`` tensors in [-1, 1]; by default the ``lpips``
    package's ``LPIPS(net="alex")``, loaded once per device.

    Raises:
        MetricWeightsMissing: lpips is not installed or its AlexNet weights cannot be loaded.
    """
    device = torch.device(device)
    model = model if model is not None else _load_lpips(device)
    x, y = _to_lpips_tensor(a, size).to(device), _to_lpips_tensor(b, size).to(device)
    return 1.0 - float(torch.as_tensor(model(x, y)).mean())


# -- face landmarks ------------------------------------------------------------------------------


def landmark_mse(pred: Points, target: Points) -> float:
    """The face benchmark's landmark MSE: "mean over points of squared Euclidean px distance".

    ``pred`` and ``target`` are ``(N, 2)`` (or ``(B, N, 2)``) ``[x, y]`` landmarks in pixels of
    the aligned image (68 dlib points in the DragonDiffusion / DiffEditor setting). The result
    is ``mean_i ((x_i - x*_i)^2 + (y_i - y*_i)^2)``; note this is twice a per-coordinate MSE.
    """
    p = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred, dtype=np.float64)
    t = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target, dtype=np.float64)
    if p.shape != t.shape or p.ndim < 2 or p.shape[-1] != 2 or p.shape[-2] == 0:
        raise ValueError(
            f"landmarks must be matching (..., N, 2) arrays, got {p.shape} and {t.shape}"
        )
    return float(np.square(p - t).sum(-1).mean())


# -- Drag100 DAI ---------------------------------------------------------------------------------


def _unit_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
    return arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)


def dai_per_pair(
    orig: Image.Image | np.ndarray,
    edited: Image.Image | np.ndarray,
    handles: Points,
    targets: Points,
    radii: Sequence[int] = (1, 5, 10, 20),
) -> np.ndarray:
    """``(N, len(radii))`` DAI of each pair (see :func:`drag100_dai`)."""
    a, b = _unit_rgb(orig), _unit_rgb(edited)
    if a.shape != b.shape:
        raise ValueError(
            f"original {a.shape} and edit {b.shape} differ in size; resize the edit first"
        )
    h_pts, t_pts = _points(handles, "handles"), _points(targets, "targets")
    if len(h_pts) != len(t_pts) or len(h_pts) == 0:
        raise ValueError(
            f"need the same non-zero number of handles and targets, got {len(h_pts)} and "
            f"{len(t_pts)}"
        )
    radii = [int(r) for r in radii]
    if min(radii) < 0:
        raise ValueError(f"radii must be >= 0, got {radii}")
    pad = max(radii)
    a = np.pad(a, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    b = np.pad(b, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    height, width = a.shape[0] - 2 * pad, a.shape[1] - 2 * pad
    hx, hy = _pixel_index(h_pts, width, height)
    tx, ty = _pixel_index(t_pts, width, height)
    out = np.empty((len(h_pts), len(radii)))
    for i in range(len(h_pts)):
        for j, r in enumerate(radii):
            pa = a[hy[i] + pad - r : hy[i] + pad + r + 1, hx[i] + pad - r : hx[i] + pad + r + 1]
            pb = b[ty[i] + pad - r : ty[i] + pad + r + 1, tx[i] + pad - r : tx[i] + pad + r + 1]
            out[i, j] = np.square(pa - pb).sum(-1).mean()
    return out


def drag100_dai(
    orig: Image.Image | np.ndarray,
    edited: Image.Image | np.ndarray,
    handles: Points,
    targets: Points,
    radii: Sequence[int] = (1, 5, 10, 20),
) -> dict[int, float]:
    """Drag100's dragging accuracy index (GoodDrag), one value per radius; lower is better.

    Variant: DAI_r = mean over pairs of ``||P(orig, p_i, r) - P(edit, q_i, r)||^2 / (2r+1)^2``,
    where ``P(I, c, r)`` is the ``(2r+1) x (2r+1)`` RGB patch of ``I`` centred on pixel ``c``
    with values in [0, 1] (uint8 images are divided by 255), i.e. the squared RGB Euclidean
    distance per pixel (summed over the 3 channels), averaged over the patch. Patches reaching
    past the border use edge-replicated pixels. Points are rounded to the nearest pixel.

    Returns:
        ``{r: DAI_r}`` for each radius.
    """
    per_pair = dai_per_pair(orig, edited, handles, targets, radii)
    return {int(r): float(v) for r, v in zip(radii, per_pair.mean(0))}
