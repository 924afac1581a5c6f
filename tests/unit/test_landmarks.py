"""68-point dlib landmarks (tasks/diffeditor_tasks/landmarks.py) on real photographs."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
from diffeditor_tasks import landmarks as L
from PIL import Image


def _have_dlib_model() -> bool:
    try:
        L.find_predictor()
    except L.LandmarkError:
        return False
    return True


dlib = pytest.importorskip("dlib", reason="dlib is not installed: pip install 'diffeditor[face]'")
pytestmark = pytest.mark.skipif(
    not _have_dlib_model(),
    reason="dlib's 68-point model is not installed: pip install face-recognition-models",
)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    data = pytest.importorskip("skimage.data")
    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="module")
def grace_hopper() -> Image.Image:
    cbook = pytest.importorskip("matplotlib.cbook")
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB")


def _mean(points: np.ndarray, region: str) -> np.ndarray:
    return points[L.REGIONS[region]].mean(0)


def _check_face_geometry(points: np.ndarray, image: Image.Image) -> None:
    w, h = image.size
    assert points.shape == (68, 2) and points.dtype == np.float64
    assert (points >= 0).all() and (points[:, 0] < w).all() and (points[:, 1] < h).all()
    right_eye, left_eye = _mean(points, "right_eye"), _mean(points, "left_eye")
    nose_tip, mouth = points[30], _mean(points, "mouth")
    chin = points[8]
    # vertical order: brows above eyes above the nose tip above the mouth above the chin
    assert (
        _mean(points, "right_brow")[1] < right_eye[1]
        and _mean(points, "left_brow")[1] < left_eye[1]
    )
    assert max(right_eye[1], left_eye[1]) < nose_tip[1] < mouth[1] < chin[1]
    # the subject's right eye is on the image's left; the nose and mouth sit between the eyes
    assert right_eye[0] < nose_tip[0] < left_eye[0]
    assert right_eye[0] < mouth[0] < left_eye[0]
    # the jaw runs from the image's left to its right, and spans more than the eyes
    assert points[0, 0] < right_eye[0] and points[16, 0] > left_eye[0]
    eye_distance = np.linalg.norm(left_eye - right_eye)
    assert 0.25 < eye_distance / (points[16, 0] - points[0, 0]) < 0.7


def test_astronaut(astronaut):
    points = L.detect_landmarks(astronaut)
    _check_face_geometry(points, astronaut)
    # Eileen Collins' face is in the upper middle of the 512x512 photo
    cx, cy = points.mean(0)
    assert 180 < cx < 270 and 70 < cy < 180


def test_grace_hopper(grace_hopper):
    points = L.detect_landmarks(grace_hopper)
    _check_face_geometry(points, grace_hopper)
    assert grace_hopper.size == (512, 600)
    cx, cy = points.mean(0)
    assert 200 < cx < 330 and 170 < cy < 330


def test_accepts_arrays_and_grayscale(astronaut):
    from_pil = L.detect_landmarks(astronaut)
    np.testing.assert_array_equal(L.detect_landmarks(np.asarray(astronaut)), from_pil)
    grey = L.detect_landmarks(astronaut.convert("L"))
    assert np.abs(grey - from_pil).mean() < 3.0


def test_largest_of_several_faces_is_used_and_logged(astronaut, grace_hopper, caplog):
    # Grace Hopper's face (~105 px) beside the astronaut's, enlarged 1.5x (~130 px)
    canvas = Image.new("RGB", (900, 520), (128, 128, 128))
    canvas.paste(grace_hopper.crop((130, 90, 410, 380)).resize((140, 145)), (20, 40))
    canvas.paste(astronaut.crop((120, 20, 330, 240)).resize((315, 330)), (450, 100))
    with caplog.at_level(logging.INFO, logger=L.__name__):
        points = L.detect_landmarks(canvas)
    assert "found 2 faces" in caplog.text and "largest" in caplog.text
    assert (points[:, 0] > 450).all()  # on the astronaut
    _check_face_geometry(points, canvas)


def test_blank_image_has_no_face():
    with pytest.raises(
        L.LandmarkError, match="no face found in the 256x200 image; use a frontal photo"
    ):
        L.detect_landmarks(Image.new("RGB", (256, 200), (200, 200, 200)))
    with pytest.raises(L.LandmarkError, match="no face found in target.png"):
        L.detect_landmarks(Image.new("RGB", (64, 64)), what="target.png")


def test_missing_dlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)
    L._detector.cache_clear()
    try:
        with pytest.raises(L.LandmarkError, match=r"pip install 'diffeditor\[face\]'"):
            L.detect_landmarks(Image.new("RGB", (64, 64)))
    finally:
        L._detector.cache_clear()


def test_predictor_location(monkeypatch, tmp_path):
    default = L.find_predictor()
    assert default.name == L.PREDICTOR_FILE and default.stat().st_size > 90e6
    monkeypatch.setenv(L.ENV_VAR, str(default))
    assert L.find_predictor() == default
    monkeypatch.setenv(L.ENV_VAR, str(tmp_path / "nope.dat"))
    with pytest.raises(L.LandmarkError, match=L.ENV_VAR):
        L.find_predictor()
    with pytest.raises(L.LandmarkError, match="given path"):
        L.find_predictor(tmp_path / "missing.dat")
    assert L.find_predictor(default) == default  # an explicit path wins over the variable
