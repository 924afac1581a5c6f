"""68-point face landmarks with dlib, for the face task and the face benchmark's MSE.

Optional extra: ``pip install 'diffeditor[face]'`` (``dlib-bin`` + ``face-recognition-models``).
The second package carries ``shape_predictor_68_face_landmarks.dat`` (iBUG 300-W annotation,
whose licence forbids commercial use). The predictor file is found, in order, at an explicit
``predictor_path``, at ``$DIFFEDITOR_DLIB_68``, or inside the installed
``face_recognition_models`` package (located with :func:`importlib.util.find_spec`, without
importing it: its ``__init__`` needs ``pkg_resources``).

Points are ``[x, y]`` pixels in the iBUG 68 order: jaw 0-16, brows 17-26, nose 27-35, eyes
36-47 (the subject's right eye first, i.e. the one on the image's left), mouth 48-67; see
:data:`REGIONS`.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from diffeditor.errors import DiffEditorError

log = logging.getLogger(__name__)

ENV_VAR = "DIFFEDITOR_DLIB_68"
PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
NUM_LANDMARKS = 68
INSTALL_HINT = "pip install 'diffeditor[face]' (dlib-bin + face-recognition-models)"

#: Index ranges of the iBUG 68-point layout; "right"/"left" are the subject's.
REGIONS: dict[str, slice] = {
    "jaw": slice(0, 17),
    "right_brow": slice(17, 22),
    "left_brow": slice(22, 27),
    "nose": slice(27, 36),
    "right_eye": slice(36, 42),
    "left_eye": slice(42, 48),
    "mouth": slice(48, 68),
}


class LandmarkError(DiffEditorError, ValueError):
    """Landmarks could not be detected: no face, or dlib / its model is not installed."""


def _dlib():
    try:
        import dlib
    except ImportError as exc:
        raise LandmarkError(
            f"face landmarks need dlib, which is not installed: {INSTALL_HINT}"
        ) from exc
    return dlib


def find_predictor(path: str | os.PathLike | None = None) -> Path:
    """Path of ``shape_predictor_68_face_landmarks.dat`` (see the module docstring for the order).

    Raises:
        LandmarkError: the file is not where the explicit path or the environment variable
            says, or ``face_recognition_models`` is not installed.
    """
    for given, origin in (
        (path, "the given path"),
        (os.environ.get(ENV_VAR) or None, f"${ENV_VAR}"),
    ):
        if given is not None:
            p = Path(given).expanduser()
            if not p.is_file():
                raise LandmarkError(f"dlib 68-point landmark model not found at {p} ({origin})")
            return p
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise LandmarkError(
            f"the dlib 68-point landmark model ({PREDICTOR_FILE}) is not installed: "
            f"{INSTALL_HINT}, "
            f"or set {ENV_VAR} to the .dat file"
        )
    for folder in spec.submodule_search_locations:
        p = Path(folder) / "models" / PREDICTOR_FILE
        if p.is_file():
            return p
    raise LandmarkError(
        f"face_recognition_models is installed but has no models/{PREDICTOR_FILE}; reinstall it "
        f"or set {ENV_VAR} to the .dat file"
    )


@functools.lru_cache(maxsize=1)
def _detector():
    return _dlib().get_frontal_face_detector()


@functools.lru_cache(maxsize=4)
def _predictor(path: str):
    return _dlib().shape_predictor(path)


def _rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.ascontiguousarray(np.asarray(image.convert("RGB")))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise LandmarkError(f"expected an RGB image, got an array of shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(
            arr * 255.0 if arr.dtype.kind == "f" and arr.max() <= 1.0 else arr, 0, 255
        ).astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])


def _describe(image: Image.Image | np.ndarray) -> str:
    name = getattr(image, "filename", "") if isinstance(image, Image.Image) else ""
    if name:
        return str(name)
    h, w = np.asarray(image).shape[:2] if not isinstance(image, Image.Image) else image.size[::-1]
    return f"the {w}x{h} image"


def detect_landmarks(
    image: Image.Image | np.ndarray,
    *,
    predictor_path: str | os.PathLike | None = None,
    what: str | None = None,
) -> np.ndarray:
    """The 68 dlib landmarks of the face in ``image``: ``(68, 2)`` float64 ``[x, y]`` pixels.

    Faces are searched with dlib's HOG frontal detector at the image's own scale, then once more
    with the image upsampled 2x (small faces). With several faces the largest box is used, and
    a log message says so.

    Args:
        image: a PIL image (any mode) or an ``(H, W[, 3])`` array.
        predictor_path: the ``.dat`` file; see :func:`find_predictor` for the default.
        what: how to name the image in error messages (default: its file name or its size).

    Raises:
        LandmarkError: no face was found, or dlib / the model is not installed.
    """
    arr = _rgb_array(image)
    dlib = _dlib()
    predictor = _predictor(str(find_predictor(predictor_path)))
    detector = _detector()
    faces = []
    for upsample in (0, 1):
        faces = list(detector(arr, upsample))
        if faces:
            break
    if not faces:
        raise LandmarkError(
            f"no face found in {what or _describe(image)}; use a frontal photo in which the face "
            "is clearly visible and at least about 80 pixels wide"
        )
    face = max(faces, key=lambda r: r.width() * r.height())
    if len(faces) > 1:
        log.info(
            "found %d faces in %s; using the largest (%dx%d at %d,%d)",
            len(faces),
            what or _describe(image),
            face.width(),
            face.height(),
            face.left(),
            face.top(),
        )
    shape = predictor(arr, dlib.rectangle(face.left(), face.top(), face.right(), face.bottom()))
    if shape.num_parts != NUM_LANDMARKS:
        raise LandmarkError(
            f"the predictor at {predictor_path or 'the default path'} gives "
            f"{shape.num_parts} points, not 68"
        )
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
