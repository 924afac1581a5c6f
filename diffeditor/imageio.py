"""Reading images and masks with clear errors, and writing outputs atomically."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import OutputError, SpecError, is_file, not_a_file, show
from .geometry import resample_mask

#: images with more pixels than this are refused before decoding (8192 x 8192); the edit works
#: at about ``resolution``\u00b2 pixels anyway. Pillow's own decompression-bomb limit is higher.
MAX_IMAGE_PIXELS = 8192 * 8192
#: the longest side may be at most this many times the shortest (the working size keeps the
#: aspect ratio, so a 1 x 10000 strip would need a huge working image)
MAX_ASPECT = 16
MIN_SIDE = 8


def load_image(path: str | os.PathLike, field: str = "image") -> Image.Image:
    """Open an image fully (truncated files fail here, not later) and convert it to RGB, with
    its real bit depth (a 16-bit PNG is scaled, not clipped)."""
    return _open(path, field, "RGB", "image", "a PNG or JPEG file")


def _open(path, field: str, mode: str, what: str, hint: str) -> Image.Image:
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise SpecError(f"must be a file path, not {type(path).__name__}", field)
    p = Path(path)
    name = show(p, 200)
    if not is_file(p):
        raise SpecError(not_a_file(p), field)
    try:
        with warnings.catch_warnings():
            # the size is checked below, once, with a message of ours
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                _check_size(im.size, name, what, field)
                frames = getattr(im, "n_frames", 1)
                if frames > 1:  # which frame was meant is not ours to guess
                    raise SpecError(f"{what} {name} has {frames} frames (an animation or a "
                                    f"multi-page file); save the one frame to edit as a PNG",
                                    field)
                im.load()  # decode fully: a truncated file fails here
                orientation = exif_orientation(im)
                out = _convert(im, mode, name, what, field)
                if orientation != 1:  # as every viewer shows it (the camera's rotation)
                    out = _ORIENT[orientation](out)
                out.info["exif_orientation"] = orientation
                return out
    except SpecError:
        raise
    except Image.DecompressionBombError:
        raise SpecError(f"{what} {name} is larger than {MAX_IMAGE_PIXELS // 2**20} megapixels; "
                        "scale it down", field) from None
    except MemoryError:
        raise SpecError(f"{what} {name} is too large to decode in memory; scale it down",
                        field) from None
    except Exception as exc:  # a corrupt file can raise almost anything from a decoder
        detail = show(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, 120)
        raise SpecError(f"cannot read {what} {name} ({detail}); give {hint}", field) from None


def _check_size(size: tuple[int, int], name: str, what: str, field: str) -> None:
    w, h = size
    if w * h > MAX_IMAGE_PIXELS:
        raise SpecError(f"{what} {name} is {w}x{h} ({w * h / 2**20:.0f} megapixels), more than "
                        f"the {MAX_IMAGE_PIXELS // 2**20}-megapixel limit; scale it down", field)
    if min(w, h) < MIN_SIDE:
        raise SpecError(f"{what} {name} is {w}x{h}; each side must be at least {MIN_SIDE} pixels",
                        field)
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise SpecError(f"{what} {name} is {w}x{h}; the long side may be at most {MAX_ASPECT} "
                        "times the short one (crop it)", field)


_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def exif_orientation(im: Image.Image) -> int:
    """The EXIF Orientation (1-8) of an open image; 1 when it has none or an invalid one."""
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block is no orientation
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


# the transposition that shows an image with EXIF orientation n upright (what Pillow's
# ImageOps.exif_transpose applies; here on the converted image, so 16-bit and float images keep
# their scaling)
_ORIENT = {
    2: lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    3: lambda im: im.transpose(Image.Transpose.ROTATE_180),
    4: lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
    5: lambda im: im.transpose(Image.Transpose.TRANSPOSE),
    6: lambda im: im.transpose(Image.Transpose.ROTATE_270),
    7: lambda im: im.transpose(Image.Transpose.TRANSVERSE),
    8: lambda im: im.transpose(Image.Transpose.ROTATE_90),
}


def _convert(im: Image.Image, mode: str, name: str = "", what: str = "image",
             field: str = "image") -> Image.Image:
    """``im`` in ``mode`` (``RGB`` or ``L``), scaling high-bit-depth grayscale to 8 bits.

    Pillow's own ``convert`` clips 16-bit values at 255 (a 16-bit PNG turns white): 16-bit
    modes (and ``I``, which is how 16-bit PNGs come in some versions) are divided by 257, float
    images (``F``) are taken as 0..1."""
    if im.mode in _SIXTEEN_BIT or im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            bad = int((~np.isfinite(arr)).sum())
            if bad:  # no pixel value to show there: refused, not painted black
                raise SpecError(f"{what} {name} has {bad} of {arr.size} pixels that are NaN or "
                                f"infinite; give finite pixel values", field)
            arr = arr * 255.0
        else:
            arr = arr / 257.0
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        return gray.convert(mode)
    return im.convert(mode)


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
            f"mask {show(p.name)} is {arr.shape[1]}x{arr.shape[0]} but the image is "
            f"{expect_hw[1]}x{expect_hw[0]}; masks must have the image's size",
            field,
        )
    mask = arr > 127
    if not mask.any():
        raise SpecError(f"mask {show(p.name)} is empty (no white pixels); paint the region white", field)
    return mask


def pad_to(x: torch.Tensor, hw: tuple[int, int] | None, mode: str) -> torch.Tensor:
    """Pad ``(N, C, h, w)`` at the bottom and right to ``hw`` (``"replicate"``: the edge pixels
    repeated, for images; ``"constant"``: zeros, for masks). Points keep their coordinates."""
    if hw is None or tuple(x.shape[-2:]) == tuple(hw):
        return x
    dh, dw = hw[0] - x.shape[-2], hw[1] - x.shape[-1]
    if dh < 0 or dw < 0:
        raise ValueError(f"cannot pad {tuple(x.shape[-2:])} to a smaller {tuple(hw)}")
    return torch.nn.functional.pad(x, (0, dw, 0, dh), mode=mode)


def to_tensor(image: Image.Image, hw: tuple[int, int] | None = None,
              pad: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL RGB -> ``(1, 3, H, W)`` float in [-1, 1], optionally resized (bicubic) to ``hw``,
    then padded (edge pixels repeated, bottom and right) to ``pad``."""
    if hw is not None and (image.height, image.width) != tuple(hw):
        image = image.resize((hw[1], hw[0]), Image.BICUBIC)
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return pad_to(torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous(), pad, "replicate")


def mask_tensor(mask: np.ndarray, hw: tuple[int, int] | None = None,
                pad: tuple[int, int] | None = None) -> torch.Tensor:
    """bool ``(H, W)`` -> float ``(1, 1, H, W)``, resized with nearest neighbour to ``hw``, then
    padded with zeros (bottom and right: the padding is never part of a region) to ``pad``."""
    t = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
    if hw is not None:
        t = resample_mask(t, hw, "nearest")
    return pad_to(t, pad, "constant")


def to_pil(x: torch.Tensor) -> Image.Image:
    """``(1, 3, H, W)`` or ``(3, H, W)`` in [-1, 1] -> PIL RGB."""
    if x.dim() == 4:
        x = x[0]
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(arr.permute(1, 2, 0).numpy())


def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file (0666 less the umask), for temp files
    (``mkstemp`` makes them 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_temps(folder: Path, name: str) -> None:
    """Remove temp files of ``name`` left by processes that no longer run (killed between
    creating the temp file and renaming it)."""
    prefix = f".{name}."
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for t in entries:
        tail = t.name[len(prefix):] if t.name.startswith(prefix) and t.name.endswith(".tmp") else ""
        pid = tail.split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            try:
                t.unlink()
            except OSError:
                pass


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _write_error(path: Path, exc: OSError) -> OutputError:
    return OutputError(f"cannot write {show(path, 200)}: {exc.strerror or exc}; free some space "
                       "or choose another output")


def atomic_write_many(items: list[tuple[Path, Any]], force: bool) -> None:
    """Write several files as one unit: each through ``write(fh)`` to a temporary file beside
    it, then all renamed into place; if anything fails, none of them is left (and no temp file).

    Without ``force`` an existing file is never overwritten, even one that appears while this
    runs (the rename is a hard link, which fails on an existing name). Files get the mode a
    plain ``open()`` would give (umask), not the temp file's 0600."""
    items = [(Path(p), w) for p, w in items]
    for path, _ in items:
        check_writable(path, force=True)  # names the OS refuses: one line
        if path.is_dir():
            raise OutputError(f"{show(path, 200)} is a folder; give a file name")
        if path.exists() and not force:
            raise OutputError(f"{show(path, 200)} exists; pass --force to overwrite it or choose another --out")
    temps: list[tuple[Path, Path]] = []
    done: list[tuple[Path, Path | None]] = []  # committed: (path, backup of what it replaced)
    try:
        for path, write in items:
            folder = _folder(path)
            if not folder.is_dir():
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise OutputError(f"cannot create output folder {show(folder, 200)}: "
                                      f"{exc.strerror}") from None
            _remove_stale_temps(folder, path.name)
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp",
                                           dir=folder)
            except OSError as exc:
                raise OutputError(f"cannot write to {show(folder, 200)}: {exc.strerror}") from None
            temps.append((Path(tmp), path))
            try:
                with os.fdopen(fd, "wb") as fh:
                    write(fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.chmod(tmp, _file_mode())
            except OSError as exc:
                raise _write_error(path, exc) from None
        for tmp, path in temps:
            done.append((path, _commit(tmp, path, force)))
    except BaseException:
        for path, backup in reversed(done):  # both or neither: the old files come back
            try:
                if backup is not None:
                    os.replace(backup, path)
                else:
                    path.unlink()
            except OSError:
                pass
        raise
    finally:
        for tmp, _ in temps:
            for leftover in (tmp, _backup_name(tmp)):
                try:
                    leftover.unlink()
                except OSError:
                    pass


def _backup_name(tmp: Path) -> Path:
    """Where ``_commit`` keeps the file a forced commit replaces until every file is in (a
    temp name: a killed process's backups are removed like its temp files)."""
    return tmp.with_suffix(".old.tmp")


def _commit(tmp: Path, path: Path, force: bool) -> Path | None:
    """Move ``tmp`` to ``path``; returns a hard-linked backup of the file it replaced (with
    ``force``), or None."""
    if force:
        backup = None
        if path.is_file():
            try:
                os.link(path, _backup_name(tmp))
                backup = _backup_name(tmp)
            except OSError:  # no hard links here: no way back for this file
                pass
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise _write_error(path, exc) from None
        return backup
    try:
        os.link(tmp, path)  # atomic, and fails if the name exists
    except FileExistsError:
        raise OutputError(f"{show(path, 200)} was created by someone else meanwhile; nothing "
                          "was overwritten (pass --force to overwrite it)") from None
    except OSError as exc:  # a file system without hard links
        if path.exists():
            raise OutputError(f"{show(path, 200)} exists; pass --force to overwrite it") from None
        try:
            os.replace(tmp, path)
        except OSError:
            raise _write_error(path, exc) from None
    return None


def atomic_write(path: Path, write, force: bool) -> None:
    """Write through ``write(fh)`` to a temporary file beside ``path``, then rename it into place;
    refuses to overwrite an existing file without ``force``."""
    atomic_write_many([(Path(path), write)], force)


def image_format(path: str | os.PathLike) -> str:
    """The Pillow format that writes ``path``'s suffix; :class:`OutputError` if none does."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if path.suffix.lower() == ".json" or fmt is None or fmt not in Image.SAVE:
        raise OutputError(f"unknown image type {show(path.suffix, 20)!r} for {show(path, 200)}; "
                          "use .png or .jpg")
    return fmt


def image_bytes(image: Image.Image, path: str | os.PathLike) -> bytes:
    """``image`` encoded in the format of ``path``'s suffix."""
    import io

    buf = io.BytesIO()
    fmt = image_format(path)
    image.save(buf, format=fmt)
    return buf.getvalue()


def json_bytes(data: Any) -> bytes:
    """Strict JSON (no NaN or Infinity: non-finite numbers become null), indented."""
    return (json.dumps(_finite(data), indent=2, default=str, allow_nan=False) + "\n").encode()


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, np.floating):
        return _finite(float(x))
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return _finite(x.item())
    return x


def save_image(image: Image.Image, path: str | os.PathLike, force: bool = False) -> Path:
    """Write an image atomically (format from the suffix); refuses to overwrite without force."""
    path = Path(path)
    data = image_bytes(image, path)
    atomic_write(path, lambda fh: fh.write(data), force)
    return path


def save_json(data: Any, path: str | os.PathLike, force: bool = False) -> Path:
    """Write strict JSON atomically; refuses to overwrite without force."""
    text = json_bytes(data)
    atomic_write(Path(path), lambda fh: fh.write(text), force)
    return Path(path)


def save_image_and_sidecar(image: Image.Image, metadata: Any, path: str | os.PathLike,
                           force: bool = False) -> Path:
    """``path`` and its ``.json`` sidecar, written as one unit (both or neither)."""
    path = Path(path)
    png, side = image_bytes(image, path), json_bytes(metadata)
    atomic_write_many([(path, lambda fh: fh.write(png)),
                       (path.with_suffix(".json"), lambda fh: fh.write(side))], force)
    return path


def check_writable(path: str | os.PathLike, force: bool = False) -> None:
    """Fail early (before any model work) if an output cannot be written."""
    try:
        _check_writable(Path(path), force)
    except OSError as exc:  # a name the OS refuses (too long, ...)
        raise OutputError(f"cannot write {show(path, 200)}: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL character
        raise OutputError(f"cannot write {show(path, 200)}: {exc}") from None


def _check_writable(path: Path, force: bool) -> None:
    name = show(path, 200)
    if path.is_dir():
        raise OutputError(f"{name} is a folder; give a file name such as {show(path / 'out.png', 200)}")
    if path.exists() and not force:
        raise OutputError(f"{name} exists; pass --force to overwrite it or choose another --out")
    folder = _folder(path)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"output folder {show(folder, 200)} cannot be created: {show(probe, 200)} is a file")
    if not os.access(probe, os.W_OK):
        raise OutputError(f"output folder {show(folder, 200)} is not writable; choose another --out")


def check_output(path: str | os.PathLike, force: bool = False) -> None:
    """Everything about an edit output that can be known before the edit: a known image suffix,
    not a folder, not existing (without ``force``), a writable folder; the same for its
    ``.json`` sidecar."""
    path = Path(path)
    check_writable(path, force)
    image_format(path)
    check_writable(path.with_suffix(".json"), force)


class OutputsBusy(OutputError):
    """Another process is writing the same output."""


@contextlib.contextmanager
def reserve_outputs(paths: list[Path]):
    """Hold an exclusive lock on each output (``.NAME.lock`` beside it) while the edit runs, so
    that a second process aiming at the same output fails at once instead of after its edit.
    The lock is released by the OS if the process dies; the file is removed on exit."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX: no reservation
        yield
        return
    held: list[tuple[Path, int]] = []
    created: list[Path] = []  # folders made here: removed again if the edit wrote nothing
    try:
        for path in paths:
            folder = _folder(Path(path))
            missing = [f for f in [folder, *folder.parents] if not f.exists()]
            try:
                folder.mkdir(parents=True, exist_ok=True)
                created += missing
                lock = folder / f".{Path(path).name}.lock"
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(f"cannot write to {show(folder, 200)}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise OutputsBusy(f"another diffeditor process is writing {show(path, 200)}; "
                                  "wait for it or choose another --out") from None
            held.append((lock, fd))
        yield
    finally:
        for lock, fd in held:
            try:
                lock.unlink()
            except OSError:
                pass
            os.close(fd)
        for folder in created:  # deepest first
            try:
                folder.rmdir()  # only if empty
            except OSError:
                pass
