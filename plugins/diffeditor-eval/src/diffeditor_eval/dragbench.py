"""DragBench (DragDiffusion, Shi et al. CVPR 2024) in its original on-disk format.

Layout: one folder per case, usually grouped by category folders::

    <root>/<category>/<case>/original_image.png
    <root>/<category>/<case>/meta_data.pkl    # {'prompt': str,
                                               #  'points': [[x, y], ...] handle, target, ...,
                                               #  'mask': uint8 HxW, 1 = editable}

``meta_data.pkl`` is a pickle, and a benchmark file is untrusted input: it is read with
:class:`RestrictedUnpickler`, which resolves only the globals these files need (a protocol-4
pickle of a dict holding a str, a list of int pairs and one numpy array references exactly
``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and ``numpy.dtype``) and refuses
everything else before it can be called.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pickle
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffeditor.errors import DiffEditorError

log = logging.getLogger(__name__)

IMAGE_FILE = "original_image.png"
META_FILE = "meta_data.pkl"
#: File names looked for inside an edited case folder, in order (the first is DragDiffusion's).
EDITED_FILES = ("dragged_image.png", "edited.png", "edited_image.png", "result.png", "output.png",
                "spec.png")  # spec.png: what `diffeditor edit SPECS --out-dir EDITED` writes
                             # for the folders of `diffeditor eval dragbench-specs`


class DragBenchFormatError(DiffEditorError, ValueError):
    """A DragBench case is malformed: the message names the file and what is wrong."""


class UnsafePickleError(DragBenchFormatError, pickle.UnpicklingError):
    """A pickle asked for a global that a DragBench file never needs; nothing was executed."""


# -- restricted unpickling -----------------------------------------------------------------------
#
# numpy's own __setstate__ methods trust their state (a dtype's flags can claim it holds Python
# objects, and an array then reads raw bytes as object pointers), so they never see pickle data
# here: numpy.dtype and numpy.core.multiarray._reconstruct resolve to stand-ins that validate
# what the pickle hands them, and plain arrays are built afterwards with np.frombuffer.

_ALLOWED_KINDS = "biufc"  # bool, signed/unsigned int, float, complex
_BYTEORDERS = {"<", ">", "|", "="}


def _refuse(what: str) -> UnsafePickleError:
    return UnsafePickleError(f"refusing {what}: a DragBench file holds only plain numeric arrays")


class _DTypeStandIn:
    """Stands in for ``numpy.dtype(code, align, copy)`` plus its BUILD state while unpickling."""

    def __init__(self, code: Any, align: Any = False, copy: Any = True):
        if not isinstance(code, str) or len(code) > 8:
            raise _refuse(f"numpy.dtype({code!r})")
        try:
            dtype = np.dtype(code)
        except TypeError:
            raise _refuse(f"numpy.dtype({code!r})") from None
        if (
            dtype.kind not in _ALLOWED_KINDS
            or dtype.fields is not None
            or dtype.subdtype is not None
        ):
            raise _refuse(f"a numpy array of dtype {dtype}")
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata]):
        # only the byte order is taken; everything describing structure must be empty.
        if not (isinstance(state, tuple) and len(state) in (8, 9)):
            raise _refuse("a numpy dtype state of unexpected form")
        byteorder, subarray, names, fields = state[1:5]
        if (
            byteorder not in _BYTEORDERS
            or subarray is not None
            or names is not None
            or fields is not None
        ):
            raise _refuse("a structured or sub-array numpy dtype")
        if byteorder in "<>":
            self.dtype = self.dtype.newbyteorder(byteorder)


class _NDArrayStandIn:
    """Stands in for an array being rebuilt by ``_reconstruct`` + BUILD; ``array`` when done."""

    array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]  # drop the version
        if not (isinstance(state, tuple) and len(state) == 4):
            raise _refuse("a numpy array state of unexpected form")
        shape, dtype, fortran, raw = state
        self.array = _array_from_bytes(raw, dtype, shape, "F" if fortran else "C")


_NDARRAY = object()  # what ``numpy.ndarray`` resolves to: only a marker for _reconstruct


def _array_from_bytes(raw: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    if not isinstance(dtype, _DTypeStandIn):
        raise _refuse(f"an array described by {type(dtype).__name__}")
    if not (isinstance(shape, tuple) and len(shape) <= 32
            and all(type(n) is int and n >= 0 for n in shape)):
        raise _refuse(f"an array of shape {str(shape)[:80]}")
    if order not in ("C", "F"):
        raise _refuse(f"an array of order {order!r}")
    if isinstance(
        raw, str
    ):  # protocol 0/1 (Python 2 era) pickles hand the bytes over as latin-1 text
        raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray, pickle.PickleBuffer)):
        raise _refuse(
            f"array data of type {type(raw).__name__} (object arrays are pickled as lists)"
        )
    expected = math.prod(shape) * dtype.dtype.itemsize
    if memoryview(raw).nbytes != expected:
        raise _refuse(
            f"array data of {memoryview(raw).nbytes} bytes for shape {shape} ({expected} expected)"
        )
    return np.frombuffer(raw, dtype=dtype.dtype).reshape(shape, order=order).copy(order="K")


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _NDArrayStandIn:
    """``numpy.core.multiarray._reconstruct``: plain ``numpy.ndarray`` only."""
    if subtype is not _NDARRAY:
        raise _refuse(f"an array of type {subtype!r}")
    return _NDArrayStandIn()


def _scalar(dtype: Any, raw: Any = None) -> Any:
    """``numpy.core.multiarray.scalar``: numpy scalars such as ``np.int64(3)``."""
    if raw is None:
        raise _refuse("a numpy scalar without data")
    return _array_from_bytes(raw, dtype, (), "C")[()]


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """``numpy.core.numeric._frombuffer``: arrays in protocol-5 pickles."""
    return _array_from_bytes(buf, dtype, shape, order)


def _latin1_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (always with ``latin1``)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _refuse(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


#: the largest allocation any allowed constructor may make from a pickle's arguments (a
#: DragBench mask of 1024 x 1024 float64 is 8 MiB); also the largest meta_data.pkl read
MAX_PICKLE_BYTES = 64 * 2**20
#: the deepest nesting of lists, tuples and dicts materialised (DragBench's is 3)
MAX_DEPTH = 64


def _bounded(constructor: type) -> Callable[..., Any]:
    """``constructor`` (a builtin type) with every argument checked first: a pickle may call
    ``bytearray(1_500_000_000)`` in 39 bytes; sizes are bounded before anything is allocated."""

    def make(*args: Any) -> Any:
        if len(args) > 3:
            raise _refuse(f"{constructor.__name__} with {len(args)} arguments")
        for a in args:
            if isinstance(a, bool):
                continue
            if isinstance(a, int) and constructor in (bytes, bytearray) and a > MAX_PICKLE_BYTES:
                raise _refuse(f"{constructor.__name__}({a}): more than {MAX_PICKLE_BYTES} bytes")
            if isinstance(a, int) and constructor in (bytes, bytearray) and a < 0:
                raise _refuse(f"{constructor.__name__}({a})")
            if isinstance(a, (str, bytes, bytearray)) and len(a) > MAX_PICKLE_BYTES:
                raise _refuse(f"{constructor.__name__} of {len(a)} items")
            if not isinstance(a, (int, float, complex, str, bytes, bytearray, list, tuple, dict,
                                  set, frozenset, type(None))):
                raise _refuse(f"{constructor.__name__}() of a {type(a).__name__}")
        try:
            return constructor(*args)
        except (TypeError, ValueError, OverflowError) as exc:
            raise DragBenchFormatError(f"{constructor.__name__}(...) failed: {exc}") from None

    make.__name__ = constructor.__name__
    return make


_BUILTINS = (list, dict, tuple, set, frozenset, str, bytes, bytearray, int, float, complex, bool)

#: (module, name) -> the object the restricted unpickler hands out for it.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    # (__builtin__: the Python 2 name, which protocol 0-2 pickles written by Python 3 use)
    **{(m, t.__name__): _bounded(t) for t in _BUILTINS for m in ("builtins", "__builtin__")},
    **{
        (m, "_reconstruct"): _reconstruct
        for m in ("numpy.core.multiarray", "numpy._core.multiarray")
    },
    **{(m, "scalar"): _scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTypeStandIn,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS` and has no persistent ids.

    Every global a pickle names (``GLOBAL``, ``STACK_GLOBAL`` and extension codes alike) goes
    through :meth:`find_class`, so a payload such as ``os.system`` is refused before it could be
    called. Use :func:`restricted_load`, which also turns the numpy stand-ins into arrays.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"the pickle refers to {module}.{name}, which a DragBench file never needs "
                "(only builtin containers and numpy arrays are allowed); refusing to load it"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(
            "the pickle uses persistent ids, which a DragBench file never needs"
        )


def _materialize(root: Any) -> Any:
    """Replace the numpy stand-ins inside lists, tuples and dicts by real arrays and dtypes.

    Iterative (an explicit stack, no recursion: a pickle of 10^5 nested lists is a few hundred
    bytes) and bounded to :data:`MAX_DEPTH` levels; shared and self-referencing containers are
    handled once (a tuple that contains itself cannot be rebuilt and is refused)."""
    done: dict[int, Any] = {}

    def leaf(obj: Any) -> Any:
        if isinstance(obj, _NDArrayStandIn):
            if obj.array is None:
                raise _refuse("an array that was never given its data")
            return obj.array
        if isinstance(obj, _DTypeStandIn):
            return obj.dtype
        return obj

    if not isinstance(root, (list, dict, tuple)):
        return leaf(root)
    # post-order walk: (container, depth, children visited?)
    stack: list[tuple[Any, int, bool]] = [(root, 0, False)]
    active: set[int] = set()
    while stack:
        obj, depth, expanded = stack.pop()
        if id(obj) in done:
            continue
        if depth > MAX_DEPTH:
            raise DragBenchFormatError(f"containers nested more than {MAX_DEPTH} deep")
        children = list(obj.values()) if isinstance(obj, dict) else list(obj)
        if not expanded:
            active.add(id(obj))
            stack.append((obj, depth, True))
            for child in children:
                if isinstance(child, (list, dict, tuple)) and id(child) not in done:
                    if id(child) in active:
                        if isinstance(child, tuple) or isinstance(obj, tuple):
                            raise _refuse("a tuple that contains itself")
                        continue  # a list or dict cycle: filled in place below
                    stack.append((child, depth + 1, False))
            continue
        active.discard(id(obj))

        def value(child: Any) -> Any:
            if isinstance(child, (list, dict, tuple)):
                return done.get(id(child), child)
            return leaf(child)

        if isinstance(obj, list):
            obj[:] = [value(v) for v in obj]
            done[id(obj)] = obj
        elif isinstance(obj, dict):
            for k in list(obj):
                obj[k] = value(obj[k])
            done[id(obj)] = obj
        else:
            done[id(obj)] = tuple(value(v) for v in obj)
    return done[id(root)]


def restricted_load(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`; numpy arrays come back as arrays."""
    if len(data) > MAX_PICKLE_BYTES:
        raise DragBenchFormatError(f"{len(data)} bytes; a DragBench pickle is at most "
                                   f"{MAX_PICKLE_BYTES}")
    try:
        return _materialize(RestrictedUnpickler(io.BytesIO(data)).load())
    except DragBenchFormatError:
        raise
    except RecursionError:
        raise DragBenchFormatError("nested too deeply to be a DragBench pickle") from None
    except MemoryError:
        raise DragBenchFormatError("too large to read") from None
    except Exception as exc:  # pickle's own errors for malformed streams are many
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise DragBenchFormatError(f"not a readable DragBench pickle ({detail})") from None


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``meta_data.pkl`` safely; errors name the file."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_PICKLE_BYTES:
            raise DragBenchFormatError(f"{path.stat().st_size} bytes; a DragBench pickle is at "
                                       f"most {MAX_PICKLE_BYTES}")
        meta = restricted_load(path.read_bytes())
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from None
    except DragBenchFormatError as exc:
        raise DragBenchFormatError(f"{path}: {exc}") from None
    except RecursionError:
        raise DragBenchFormatError(f"{path}: nested too deeply to be a DragBench pickle") from None
    except MemoryError:
        raise DragBenchFormatError(f"{path}: too large to read") from None
    except OSError as exc:
        raise DragBenchFormatError(f"{path}: cannot read it ({exc.strerror})") from None
    except Exception as exc:  # pickle's own errors for malformed streams are many
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise DragBenchFormatError(f"{path}: not a readable DragBench pickle ({detail})") from None
    if not isinstance(meta, dict):
        raise DragBenchFormatError(f"{path}: expected a dict, found {type(meta).__name__}")
    missing = {"prompt", "points", "mask"} - set(meta)
    if missing:
        raise DragBenchFormatError(
            f"{path}: missing key(s) {sorted(missing)}; found {sorted(meta)}"
        )
    return meta


# -- cases ---------------------------------------------------------------------------------------


@dataclass
class DragCase:
    """One DragBench case.

    Attributes:
        name: the case folder's name (for example ``JH_2023-09-14-1827-57``).
        category: the category folder's name, or ``None`` for an ungrouped case.
        image_path: path of ``original_image.png``.
        image: the photo, RGB.
        prompt: the case's text prompt.
        handles: ``(N, 2)`` float array of ``[x, y]`` pixel positions.
        targets: ``(N, 2)`` float array, ``targets[i]`` is where ``handles[i]`` should go.
        mask: ``(H, W)`` bool array, True = editable.
    """

    name: str
    category: str | None
    image_path: Path
    image: Image.Image
    prompt: str
    handles: np.ndarray
    targets: np.ndarray
    mask: np.ndarray

    @property
    def key(self) -> str:
        """``category/name`` (or ``name`` when ungrouped): unique within a benchmark."""
        return f"{self.category}/{self.name}" if self.category else self.name

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the image."""
        return self.image.size

    @property
    def drag_lengths(self) -> np.ndarray:
        """Pixel length of each handle -> target drag."""
        return np.linalg.norm(self.targets - self.handles, axis=1)


def _parse_points(points: Any, meta_path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        arr = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DragBenchFormatError(
            f"{meta_path}: 'points' is not a list of [x, y] pairs ({exc})"
        ) from None
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise DragBenchFormatError(
            f"{meta_path}: 'points' must be a list of [x, y] pairs, found shape {arr.shape}"
        )
    if len(arr) == 0:
        raise DragBenchFormatError(
            f"{meta_path}: 'points' is empty; a case needs handle/target pairs"
        )
    if len(arr) % 2:
        raise DragBenchFormatError(
            f"{meta_path}: 'points' has {len(arr)} entries, an odd count; they must alternate "
            "handle, target, handle, target"
        )
    if not np.isfinite(arr).all():
        raise DragBenchFormatError(f"{meta_path}: 'points' holds non-finite values")
    return arr[0::2].copy(), arr[1::2].copy()


def _parse_mask(mask: Any, size: tuple[int, int], meta_path: Path) -> np.ndarray:
    if not isinstance(mask, np.ndarray) or mask.dtype.kind not in "biuf":
        raise DragBenchFormatError(
            f"{meta_path}: 'mask' must be a numeric numpy array, found {type(mask).__name__}"
        )
    width, height = size
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.shape != (height, width):
        raise DragBenchFormatError(
            f"{meta_path}: 'mask' has shape {mask.shape} but the image is {width}x{height} "
            f"(expected ({height}, {width}))"
        )
    return np.asarray(mask > 0)


def _read_image(path: Path) -> Image.Image:
    """An RGB image through diffeditor's reader (real bit depth, size limits, one-line errors)."""
    from diffeditor.errors import SpecError
    from diffeditor.imageio import load_image

    try:
        return load_image(path, "image")
    except SpecError as exc:
        raise DragBenchFormatError(str(exc).removeprefix("image: ")) from None


def load_case(folder: str | os.PathLike, category: str | None = None) -> DragCase:
    """Load one case folder (``original_image.png`` + ``meta_data.pkl``), validated.

    Raises:
        DragBenchFormatError: a file is missing or malformed (odd point count, mask size not the
            image size, points outside the image); the message names the file.
        UnsafePickleError: the pickle names a global outside :data:`ALLOWED_GLOBALS`.
    """
    folder = Path(folder)
    image_path, meta_path = folder / IMAGE_FILE, folder / META_FILE
    for p in (image_path, meta_path):
        if not p.is_file():
            raise DragBenchFormatError(f"{folder}: missing {p.name}")
    meta = read_meta(meta_path)
    image = _read_image(image_path)
    prompt = meta["prompt"]
    if not isinstance(prompt, str):
        raise DragBenchFormatError(
            f"{meta_path}: 'prompt' must be a str, found {type(prompt).__name__}"
        )
    handles, targets = _parse_points(meta["points"], meta_path)
    width, height = image.size
    for label, pts in (("handle", handles), ("target", targets)):
        bad = ~(
            (pts[:, 0] >= 0)
            & (pts[:, 0] <= width - 1)
            & (pts[:, 1] >= 0)
            & (pts[:, 1] <= height - 1)
        )
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DragBenchFormatError(
                f"{meta_path}: {label} {i} at {pts[i].tolist()} lies outside the "
                f"{width}x{height} image"
            )
    mask = _parse_mask(meta["mask"], image.size, meta_path)
    return DragCase(folder.name, category, image_path, image, prompt, handles, targets, mask)


def iter_dragbench(root: str | os.PathLike, *, strict: bool = True) -> Iterator[DragCase]:
    """Yield every case under ``root`` in sorted order.

    ``root`` may be the benchmark folder (cases grouped by category, or not) or a single case
    folder. A case's category is the name of its parent folder unless that parent is ``root``.
    With ``strict=False`` a malformed case is logged and skipped instead of raising (an unsafe
    pickle is always an error).
    """
    root = Path(root)
    if not root.is_dir():
        raise DragBenchFormatError(f"DragBench folder {root} does not exist"
                                   + (" (it is a file)" if root.exists() else ""))
    metas = sorted(root.rglob(META_FILE))
    if not metas:
        raise DragBenchFormatError(f"{root}: no {META_FILE} found; is this a DragBench folder?")
    for meta_path in metas:
        folder = meta_path.parent
        category = None if folder == root or folder.parent == root else folder.parent.name
        try:
            yield load_case(folder, category)
        except UnsafePickleError:
            raise
        except DragBenchFormatError as exc:
            if strict:
                raise
            log.warning("skipping malformed DragBench case: %s", exc)


# -- export as a diffeditor drag spec ------------------------------------------------------------


def _json_points(points: np.ndarray) -> list[list[float | int]]:
    return [[int(v) if float(v).is_integer() else float(v) for v in p] for p in points.tolist()]


def spec_folder(case: DragCase, root: str | os.PathLike) -> Path:
    """Where :func:`write_specs` puts a case's spec: ``<root>/<category>/<name>`` (or
    ``<root>/<name>``). ``diffeditor edit <root> --out-dir EDITED`` then writes
    ``EDITED/<category>/<name>/spec.png``, which :func:`find_edited` reads."""
    root = Path(root)
    return root / case.category / case.name if case.category else root / case.name


def write_specs(cases: Sequence[DragCase], root: str | os.PathLike,
                steps: int | None = None) -> list[Path]:
    """Every case as ``spec.json`` (+ ``image.png``, ``mask.png``) in :func:`spec_folder`;
    returns the spec files. ``steps`` overrides the task's default number of steps."""
    paths = []
    for case in cases:
        folder = spec_folder(case, root)
        spec = case_to_spec(case, folder, spec_name=None)
        if steps is not None:
            spec["steps"] = steps
        path = folder / "spec.json"
        path.write_text(json.dumps(spec, indent=2) + "\n")
        paths.append(path)
    return paths


def case_to_spec(
    case: DragCase,
    out_dir: str | os.PathLike,
    *,
    copy_image: bool = True,
    spec_name: str | None = "spec.json",
) -> dict[str, Any]:
    """Write ``case`` as a diffeditor drag spec in ``out_dir`` and return the spec dict.

    Writes ``mask.png`` (white = editable) and, with ``copy_image``, a copy of the photo as
    ``image.png``; otherwise the spec references the benchmark's own file. Paths in the spec are
    relative to ``out_dir`` (where the spec file lives). With ``spec_name`` the spec is also
    written there as JSON (which any YAML loader reads too).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if copy_image:
        image_file = out_dir / "image.png"
        shutil.copyfile(case.image_path, image_file)
    else:
        image_file = case.image_path
    mask_file = out_dir / "mask.png"
    Image.fromarray(case.mask.astype(np.uint8) * 255).save(mask_file)  # uint8 2-D: mode L
    spec = {
        "task": "drag",
        "image": Path(os.path.relpath(image_file.resolve(), out_dir.resolve())).as_posix(),
        "mask": mask_file.name,
        "handles": _json_points(case.handles),
        "targets": _json_points(case.targets),
        "prompt": case.prompt,
    }
    if spec_name:
        (out_dir / spec_name).write_text(json.dumps(spec, indent=2) + "\n")
    return spec


# -- evaluation of already-edited images ---------------------------------------------------------


def find_edited(case: DragCase, edited_root: str | os.PathLike) -> Path | None:
    """The edited image for ``case`` under ``edited_root``, or ``None``.

    Looked for, in order: ``<root>/<category>/<case>/<file>`` (DragDiffusion's result layout),
    ``<root>/<case>/<file>`` for ``file`` in :data:`EDITED_FILES`, then
    ``<root>/<category>/<case>.png``
    and ``<root>/<case>.png``.
    """
    root = Path(edited_root)
    folders = [root / case.category / case.name] if case.category else []
    folders.append(root / case.name)
    candidates = [f / name for f in folders for name in EDITED_FILES]
    if case.category:
        candidates.append(root / case.category / f"{case.name}.png")
    candidates.append(root / f"{case.name}.png")
    return next((c for c in candidates if c.is_file()), None)


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def evaluate_dragbench(
    cases: Sequence[DragCase],
    edited_root: str | os.PathLike,
    metrics: Sequence[str] = ("md", "if"),
    *,
    dift: Callable[[], Any] | Any | None = None,
    fidelity: Callable[[Image.Image, Image.Image], float] | None = None,
    dai_radii: Sequence[int] = (1, 5, 10, 20),
    seed: int = 0,
) -> dict[str, Any]:
    """Score already-edited images of DragBench cases.

    Args:
        cases: the benchmark cases.
        edited_root: where the edits are (see :func:`find_edited`). An edit whose size differs
            from the original is resized to the original's size (bicubic) before scoring.
        metrics: any of ``"md"``, ``"if"``, ``"dai"``.
        dift: a :class:`~diffeditor_eval.metrics.DIFTFeatures`, or a zero-argument factory
            called on first use (so missing weights surface only when MD is asked for).
        fidelity: ``(original, edited) -> float``; defaults to
            :func:`~diffeditor_eval.metrics.image_fidelity`.
        seed: seeds DIFT's noise, the same for the original and the edit.

    Returns:
        ``{"summary": {metric name: value}, "cases": [...], "missing": [case keys],
        "skipped": {metric: reason}}``. MD is averaged over all handle/target pairs, IF over
        images, DAI over pairs; a metric whose weights are missing lands in ``skipped``.
    """
    from . import metrics as M

    unknown = set(metrics) - {"md", "if", "dai"}
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; choose from md, if, dai")
    fidelity = fidelity or M.image_fidelity
    wanted = list(dict.fromkeys(metrics))
    skipped: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    md_name = M.MD_VARIANT
    all_dist: list[float] = []
    all_if: list[float] = []
    all_dai: dict[int, list[float]] = {int(r): [] for r in dai_radii}
    extractor = dift

    for case in cases:
        path = find_edited(case, edited_root)
        if path is None:
            missing.append(case.key)
            continue
        edited = _read_image(path)
        if edited.size != case.image.size:
            log.info(
                "%s: edit is %s, original %s; resizing the edit",
                case.key,
                edited.size,
                case.image.size,
            )
            edited = edited.resize(case.image.size, Image.Resampling.BICUBIC)
        row: dict[str, Any] = {"case": case.key, "edited": str(path), "pairs": len(case.handles)}
        if "md" in wanted and "md" not in skipped:
            try:
                if extractor is None:
                    extractor = M.DIFTFeatures.from_pretrained()
                elif not hasattr(extractor, "features"):  # a factory: load on first use
                    extractor = extractor()
                f0 = extractor.features(case.image, case.prompt, seed=seed)
                f1 = extractor.features(edited, case.prompt, seed=seed)
                md = M.mean_distance(f0, f1, case.handles, case.targets, case.image.size)
                md_name = md["metric"]
                row["md"], row["md_distances"] = md["md"], md["distances"]
                all_dist.extend(md["distances"])
            except M.MetricWeightsMissing as exc:
                skipped["md"] = str(exc)
        if "if" in wanted and "if" not in skipped:
            try:
                row["if"] = fidelity(case.image, edited)
                all_if.append(row["if"])
            except M.MetricWeightsMissing as exc:
                skipped["if"] = str(exc)
        if "dai" in wanted:
            per_pair = M.dai_per_pair(
                case.image, edited, case.handles, case.targets, radii=dai_radii
            )
            row["dai"] = {str(r): float(v) for r, v in zip(all_dai, per_pair.mean(0))}
            for r, col in zip(all_dai, per_pair.T):
                all_dai[r].extend(col.tolist())
        rows.append(row)

    summary: dict[str, Any] = {"cases": len(rows), "pairs": sum(r["pairs"] for r in rows)}
    if "md" in wanted and "md" not in skipped:
        summary[md_name] = _mean(all_dist)
    if "if" in wanted and "if" not in skipped:
        summary[M.IF_VARIANT] = _mean(all_if)
    if "dai" in wanted:
        for r, vals in all_dai.items():
            summary[f"{M.DAI_VARIANT} r={r}"] = _mean(vals)
    return {"summary": summary, "cases": rows, "missing": missing, "skipped": skipped}
