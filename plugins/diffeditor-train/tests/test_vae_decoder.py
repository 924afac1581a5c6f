"""diffeditor train vae-decoder: the encoder never moves, the decoder learns, crops see the
borders and leave unknowable pixels out of the loss, the run resumes bit-exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffeditor_shapes")
pytest.importorskip("diffeditor_train")

from diffeditor_shapes import MODEL_DIR  # noqa: E402
from diffeditor_train import vae_decoder as vd  # noqa: E402
from diffeditor_train.components import to_model_images  # noqa: E402

from diffeditor.cli import main  # noqa: E402

torch.set_num_threads(1)

VAE_FILE = "diffusion_pytorch_model.safetensors"


def run(*argv) -> int:
    return main(["train", "vae-decoder", *map(str, argv), "--no-progress", "--device", "cpu"])


TINY = ("--shapes", 6, "--steps", 3, "--batch-size", 2, "--crop", 4, "--crop-margin", 8,
        "--eval-shapes", 0, "--lr", "1e-3")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vd") / "vae"
    assert run(*TINY, "--out", out) == 0
    return out


def test_the_encoder_is_byte_identical_and_the_decoder_moved(tiny_run):
    src = load_file(MODEL_DIR / "vae" / VAE_FILE)
    new = load_file(tiny_run / VAE_FILE)
    assert src.keys() == new.keys()
    enc = [k for k in src if k.startswith(vd.ENCODER_PREFIXES)]
    dec = [k for k in src if k.startswith(vd.DECODER_PREFIXES)]
    assert enc and dec and len(enc) + len(dec) == len(src)
    assert all(torch.equal(src[k], new[k]) for k in enc), "the frozen encoder changed"
    assert sum(not torch.equal(src[k], new[k]) for k in dec) > len(dec) // 2


def test_the_written_folder_has_the_umask_permissions(tiny_run):
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(tiny_run.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((tiny_run / VAE_FILE).stat().st_mode) == 0o666 & ~mask


def test_the_written_folder_loads_as_the_model_vae(tiny_run):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_run, torch_dtype=torch.float32, local_files_only=True)
    ref = AutoencoderKL.from_pretrained(MODEL_DIR / "vae", torch_dtype=torch.float32,
                                        local_files_only=True)
    assert vae.config.scaling_factor == ref.config.scaling_factor
    x = torch.zeros(1, 3, 128, 128)
    with torch.no_grad():  # same latents (the encoder), another picture (the decoder)
        za, zb = vae.encode(x).latent_dist.mean, ref.encode(x).latent_dist.mean
        assert torch.equal(za, zb)
        assert not torch.equal(vae.decode(za).sample, ref.decode(zb).sample)


def test_training_lowers_the_decoder_loss_on_a_fixed_batch(tmp_path):
    from diffusers import AutoencoderKL

    out = tmp_path / "vae"
    assert run("--shapes", 4, "--steps", 10, "--batch-size", 4, "--crop", 0, "--eval-shapes", 0,
               "--lr", "1e-4", "--fp32", "--out", out) == 0
    noisy, clean = vd.shapes_clean_noisy(4, 10, 128)  # the run's scenes (--data-seed 10)

    def loss(folder):
        vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
        with torch.no_grad():
            z = vae.encode(to_model_images(noisy, "cpu")).latent_dist.mean
            return float(vd.decoder_loss(vae.decode(z).sample, to_model_images(clean, "cpu"), None, 1.0))

    before, after = loss(MODEL_DIR / "vae"), loss(out)
    assert after < 0.97 * before, (before, after)


def test_crop_windows_touch_the_borders_half_the_time_per_axis():
    gen = torch.Generator().manual_seed(0)
    c = vd.crop_windows(4000, 16, 8, gen)
    assert c.min() >= 0 and c.max() <= 8
    edge = ((c == 0) | (c == 8)).float().mean(0)
    # snapped with probability 1/2, plus the uniform draw landing on 0 or 8 (2/9 of the rest)
    assert torch.allclose(edge, torch.tensor([0.5 + 0.5 * 2 / 9] * 2), atol=0.03)


def test_loss_weights_drop_only_inner_edges():
    corners = torch.tensor([[0, 0], [8, 8], [4, 0]])
    w = vd.loss_weights(corners, 16, 8, 8, 8)[:, 0]
    # top-left window: image border on top/left kept, inner bottom/right margins dropped
    assert w[0, :56, :56].eq(1).all() and w[0, 56:, :].eq(0).all() and w[0, :, 56:].eq(0).all()
    # bottom-right window: the mirror image
    assert w[1, 8:, 8:].eq(1).all() and w[1, :8, :].eq(0).all() and w[1, :, :8].eq(0).all()
    # a window in the middle of the left side: top and bottom and right dropped, left kept
    assert w[2, 8:56, :56].eq(1).all() and w[2, :8].eq(0).all() and w[2, 56:].eq(0).all()
    assert w[2, :, 56:].eq(0).all()


def test_masked_loss_ignores_the_dropped_pixels():
    a, b = torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    w = torch.ones(1, 1, 8, 8)
    w[..., :, 4:] = 0
    b[..., :, 4:] = 5.0  # wrong only where the weight is 0 (and on the seam's gradient: dropped)
    assert float(vd.decoder_loss(a, b, w, 1.0)) == 0.0
    assert float(vd.decoder_loss(a, b, None, 1.0)) > 0


def test_resume_is_bit_exact(tmp_path):
    straight, part = tmp_path / "a", tmp_path / "b"
    base = ("--shapes", 4, "--batch-size", 2, "--crop", 4, "--eval-shapes", 0, "--fp32")
    assert run(*base, "--steps", 4, "--out", straight) == 0
    assert run(*base, "--steps", 2, "--out", tmp_path / "tmp", "--checkpoint",
               tmp_path / "c.ckpt") == 0
    assert run(*base, "--steps", 4, "--out", part, "--checkpoint", tmp_path / "c.ckpt",
               "--resume") == 0
    a, b = load_file(straight / VAE_FILE), load_file(part / VAE_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("argv, words", [
    (("--crop", 99), "larger than the latent grid"),
    (("--crop", -1), "at least 0"),
    (("--grad-weight", "-1"), "--grad-weight"),
])
def test_bad_input_is_one_line(argv, words, capsys, tmp_path):
    assert run("--shapes", 2, "--steps", 1, "--out", tmp_path / "o", *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_an_existing_out_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "x").write_text("precious")
    assert run("--shapes", 2, "--steps", 1, "--out", out) == 2
    assert (out / "x").read_text() == "precious"
    assert not (tmp_path / "keep.ckpt").exists()  # refused before any step
