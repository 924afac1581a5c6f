"""Reading images and masks with clear errors, and writing outputs atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import OutputError, SpecError


def load_image(path: str | os.PathLike, field: str = "image") -> Image.Image:
    """Open an image fully (truncated files fail here, not later) and convert it to RGB."""
    return _open(path, field, "RGB", "image", "a PNG or JPEG file")


def _open(path, field: str, mode: str, what: str, hint: str) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"file not found: {p}", field)
    try:
        with Image.open(p) as im:
            im.load()  # decode fully: a truncated file fails here
            return im.convert(mode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise SpecError(f"cannot read {what} {p} ({exc}); give {hint}", field) from None


def image_size(path: str | os.PathLike, field: str = "image") -> tuple[int, int]:
    """``(height, width)`` of an image file, validating that it decodes."""
    im = load_image(path, field)
    return (im.height, im.width)


def load_mask(
    path: str | os.PathLike, field: str, expect_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """A binary mask (white = selected) as a bool array; checks its size and that it's non-empty."""
    p = Path(path)
    arr = np.asarray(_open(p, field, "L", "mask", "a PNG file"))
    if expect_hw is not None and arr.shape != tuple(expect_hw):
        raise SpecError(
            f"mask {p.name} is {arr.shape[1]}x{arr.shape[0]} but the image is "
            f"{expect_hw[1]}x{expect_hw[0]}; masks must have the image's size",
            field,
        )
    mask = arr > 127
    if not mask.any():
        raise SpecError(f"mask {p.name} is empty (no white pixels); paint the region white", field)
    return mask


def to_tensor(image: Image.Image, hw: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL RGB -> ``(1, 3, H, W)`` float in [-1, 1], optionally resized (bicubic) to ``hw``."""
    if hw is not None and (image.height, image.width) != tuple(hw):
        image = image.resize((hw[1], hw[0]), Image.BICUBIC)
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def mask_tensor(mask: np.ndarray, hw: tuple[int, int] | None = None) -> torch.Tensor:
    """bool ``(H, W)`` -> float ``(1, 1, H, W)``, resized with nearest neighbour to ``hw``."""
    t = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
    if hw is not None and tuple(t.shape[-2:]) != tuple(hw):
        t = torch.nn.functional.interpolate(t, size=hw, mode="nearest")
    return t


def to_pil(x: torch.Tensor) -> Image.Image:
    """``(1, 3, H, W)`` or ``(3, H, W)`` in [-1, 1] -> PIL RGB."""
    if x.dim() == 4:
        x = x[0]
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(arr.permute(1, 2, 0).numpy())


def atomic_write(path: Path, write, force: bool) -> None:
    """Write through ``write(fh)`` to a temporary file beside ``path``, then rename it into place;
    refuses to overwrite an existing file without ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputError(f"{path} exists; pass --force to overwrite it or choose another --out")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create output folder {folder}: {exc.strerror}") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write to {folder}: {exc.strerror}") from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; outputs get the usual mode
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_image(image: Image.Image, path: str | os.PathLike, force: bool = False) -> Path:
    """Write an image atomically (format from the suffix); refuses to overwrite without force."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise OutputError(f"unknown image type {path.suffix!r} for {path}; use .png or .jpg")
    atomic_write(path, lambda fh: image.save(fh, format=fmt), force)
    return path


def save_json(data: Any, path: str | os.PathLike, force: bool = False) -> Path:
    """Write JSON atomically; refuses to overwrite without force."""
    text = json.dumps(data, indent=2, default=str).encode()
    atomic_write(Path(path), lambda fh: fh.write(text), force)
    return Path(path)


def check_writable(path: str | os.PathLike, force: bool = False) -> None:
    """Fail early (before any model work) if an output cannot be written."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputError(f"{path} exists; pass --force to overwrite it or choose another --out")
    folder = path.parent if str(path.parent) else Path(".")
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"output folder {folder} cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK):
        raise OutputError(f"output folder {folder} is not writable; choose another --out")
