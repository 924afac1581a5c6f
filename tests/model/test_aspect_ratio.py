"""The working size keeps the image's aspect ratio (issue 16): the image is scaled to about the
model's resolution, padded at the bottom and right to the model's multiple, and the output is
cropped back and resized to the input's size. Points and masks map onto the image's own part."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffeditor.editor import working_geometry
from diffeditor.imageio import to_tensor
from diffeditor.interfaces import Geometry
from diffeditor.masks import scale_point, work_mask

SIZES = [(512, 913), (913, 512), (512, 768)]  # (height, width)


@pytest.mark.parametrize("hw", SIZES)
def test_working_geometry_keeps_the_aspect_ratio(hw):
    content, work = working_geometry(hw, 128, 64)
    ratio = (content[1] / content[0]) / (hw[1] / hw[0])
    assert abs(ratio - 1) < 0.05, (hw, content)
    assert all(s % 64 == 0 for s in work) and all(c <= s < c + 64 for c, s in zip(content, work))
    assert abs(content[0] * content[1] / 128**2 - 1) < 0.05  # about the model's area


@pytest.mark.parametrize("hw,res", [((128, 128), 128), ((256, 256), 128), ((512, 512), 768),
                                    ((512, 768), 768)])
def test_no_padding_where_the_sides_already_fit(hw, res):
    """Square inputs at the model's size (the example specs) are edited exactly as before."""
    content, work = working_geometry(hw, res, 64)
    assert content == work


def test_points_and_masks_map_onto_the_image_part(tmp_path):
    hw = (512, 913)
    content, work = working_geometry(hw, 128, 64)
    geom = Geometry(hw, work, 8, 2, content)
    assert scale_point((913, 512), geom) == (content[1], content[0])  # far corner -> content's
    assert scale_point((0, 0), geom) == (0.0, 0.0)
    m = np.zeros(hw, np.uint8)
    m[256:, 456:] = 255  # the bottom-right quarter
    Image.fromarray(m).save(tmp_path / "m.png")
    t = work_mask(tmp_path / "m.png", "mask", geom)[0, 0]
    assert tuple(t.shape) == work
    assert t[content[0]:, :].sum() == 0 and t[:, content[1]:].sum() == 0  # padding: never masked
    ys, xs = torch.nonzero(t, as_tuple=True)
    assert ys.max() == content[0] - 1 and xs.max() == content[1] - 1
    assert abs(ys.min().item() - content[0] / 2) <= 1 and abs(xs.min().item() - 456 * content[1] / 913) <= 1
    img = Image.new("RGB", (913, 512), (10, 200, 30))
    x = to_tensor(img, content, pad=work)
    assert tuple(x.shape[-2:]) == work
    assert torch.equal(x[..., content[0]:, :], x[..., content[0] - 1:content[0], :].expand_as(
        x[..., content[0]:, :]))  # the image's edge, repeated


def _scene(folder, hw):
    """A gradient with a red square (and its mask) at ``hw``."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([60 + 120 * xx / w, 80 + 100 * yy / h, 140 + 0 * xx], -1).astype(np.uint8)
    s = min(h, w) // 4
    y0, x0 = h // 2 - s // 2, w // 3
    img[y0:y0 + s, x0:x0 + s] = (220, 40, 40)
    mask = np.zeros(hw, np.uint8)
    mask[y0:y0 + s, x0:x0 + s] = 255
    Image.fromarray(img).save(folder / "i.png")
    Image.fromarray(mask).save(folder / "m.png")
    return img


@pytest.mark.parametrize("hw", SIZES)
def test_an_edit_keeps_the_aspect_ratio_and_the_size(hw, editor_shapes, tmp_path):
    img = _scene(tmp_path, hw)
    res = editor_shapes.edit({"task": "move", "image": "i.png", "mask": "m.png",
                              "offset": [0, 0], "steps": 4, "prompt": "a red square"},
                             base_dir=tmp_path)
    assert res.image.size == (hw[1], hw[0])
    ch, cw = res.metadata["content_size"]
    wh, ww = res.metadata["working_size"]
    assert abs((cw / ch) / (hw[1] / hw[0]) - 1) < 0.05
    assert wh % 64 == 0 and ww % 64 == 0
    # the output lies where the input is (the padding was cropped away): a still edit comes
    # back closer to the input (about 22 grey levels on this out-of-domain gradient) than to
    # the input squeezed with its padding, as an uncropped output would be
    out = np.asarray(res.image, dtype=np.float32)
    err = np.abs(out - img).mean()
    from diffeditor.imageio import to_pil

    padded = to_pil(to_tensor(Image.fromarray(img), (ch, cw), pad=(wh, ww)))
    uncropped = np.asarray(padded.resize((hw[1], hw[0]), Image.BICUBIC), dtype=np.float32)
    assert err < 0.9 * np.abs(out - uncropped).mean()
