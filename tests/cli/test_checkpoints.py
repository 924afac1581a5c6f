"""Single-file checkpoints, LoRAs, a swapped VAE and the default model, through the public
command line on CPU, with a tiny random SD 1.x model written in the files' real layouts
(tests/sd_checkpoints.py): the original-key checkpoint, diffusers and kohya LoRAs, an
original-layout VAE file."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_disc_scene
from PIL import Image
from sd_checkpoints import (
    config_only,
    tiny_sd1_folder,
    vae_state_dict,
    write_checkpoint,
    write_lora,
)

from diffeditor.cli import main

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("checkpoints")
    folder = tiny_sd1_folder(root / "folder")
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    f = {"root": root, "folder": folder, "config": config_only(folder, root / "config"),
         "st": write_checkpoint(pipe, root / "tiny.safetensors"),
         "ckpt": write_checkpoint(pipe, root / "tiny.ckpt"),
         "lora_d": write_lora(pipe, root / "lora_diffusers.safetensors", "diffusers"),
         "lora_k": write_lora(pipe, root / "lora_kohya.safetensors", "kohya"),
         "scene": write_disc_scene(root)}
    torch.manual_seed(7)
    other = AutoencoderKL.from_config(pipe.vae.config)
    save_file(vae_state_dict(other), str(root / "vae.safetensors"))
    other.save_pretrained(root / "vae_folder")
    f["vae"], f["vae_dir"] = root / "vae.safetensors", root / "vae_folder"
    return f


def edit(files, out: Path, *extra: str) -> int:
    scene = files["scene"]
    return main(["move", str(scene / "i.png"), "--mask", str(scene / "m.png"), "--offset", "10",
                 "0", "--resolution", "64", "--steps", "2", "--device", "cpu", "-q", "--out",
                 str(out), *extra])


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffeditor: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.fixture(scope="module")
def base(files):
    """The single-file model with no LoRA or VAE, and the diffusers folder it was made from."""
    root = files["root"]
    assert edit(files, root / "base.png", "--model", str(files["st"]), "--config",
                str(files["config"])) == 0
    assert edit(files, root / "folder.png", "--model", str(files["folder"])) == 0
    return pixels(root / "base.png")


def test_single_file_builds_the_same_model(files, base):
    """The checkpoint in the original key layout loads back into exactly the source weights,
    and edits as the folder does (the same weights, in other memory: last-bit rounding)."""
    from diffusers import StableDiffusionPipeline

    from diffeditor.models import load_pipeline

    pipe = load_pipeline(str(files["st"]), "cpu", "float32", config=str(files["config"]))
    ref = StableDiffusionPipeline.from_pretrained(files["folder"])
    for comp in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, comp).state_dict(), getattr(ref, comp).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), comp
    folder = pixels(files["root"] / "folder.png")
    assert np.abs(base - folder).max() <= 2
    side = json.loads((files["root"] / "base.json").read_text())
    assert side["model"] == str(files["st"].absolute())
    assert side["config"] == str(files["config"].absolute())
    assert side["model_hash"].startswith("sha256:") and "lora" not in side and "vae" not in side


def test_ckpt_loads_with_weights_only(files, base, tmp_path):
    assert edit(files, tmp_path / "c.png", "--model", str(files["ckpt"]), "--config",
                str(files["config"])) == 0
    # the same weights (memory-mapped at other offsets than the .safetensors file's, so the
    # CPU kernels may round the last bit differently)
    assert np.abs(pixels(tmp_path / "c.png") - base).max() <= 2


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_ckpt_that_runs_code_is_refused(files, tmp_path, capsys, layout):
    marker = tmp_path / "ran"
    bad = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"x": _RunsCode(marker)}}
    if layout == "zip":  # what torch.save writes
        torch.save(payload, bad)
    else:  # PyTorch's legacy format, a plain pickle
        with open(bad, "wb") as fh:
            pickle.dump(payload, fh)
    assert edit(files, tmp_path / "o.png", "--model", str(bad), "--config",
                str(files["config"])) == 2
    line = one_error_line(capsys)
    assert "refused" in line and "weights_only" in line and "Weights only load failed" in line
    assert not marker.exists() and not (tmp_path / "o.png").exists()


def test_legacy_format_ckpt_loads(files, tmp_path):
    """An old .ckpt (PyTorch's pre-zip format) is read by the same weights-only loader."""
    from diffeditor.models import checkpoint_shapes, detect_family

    state = torch.load(files["ckpt"], weights_only=True)
    old = tmp_path / "old.ckpt"
    torch.save(state, old, _use_new_zipfile_serialization=False)
    assert detect_family(checkpoint_shapes(old)) == "sd1"


def test_single_file_without_config_names_the_option(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache" / "hub"))
    assert edit(files, tmp_path / "o.png", "--model", str(files["st"])) == 2
    line = one_error_line(capsys)
    assert "SD 1.x checkpoint" in line and "--config DIR" in line


def _header_only(path: Path, shapes: dict[str, tuple]) -> Path:
    from safetensors.torch import save_file

    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    return path


def test_family_detection(files, tmp_path, capsys):
    """SD1 from the real file; SD2 and SDXL from their tensor names (their engine support is
    elsewhere: here only the detection, and that an SD1 config is refused for them)."""
    from diffeditor.models import checkpoint_shapes, detect_family

    assert detect_family(checkpoint_shapes(files["st"])) == "sd1"
    assert detect_family(checkpoint_shapes(files["ckpt"])) == "sd1"
    unet = {"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3)}
    sd2 = _header_only(tmp_path / "sd2.safetensors", {
        **unet, "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (6, 2)})
    sd2b = _header_only(tmp_path / "sd2b.safetensors", {
        **unet, "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 1024)})
    xl = _header_only(tmp_path / "xl.safetensors", {
        **unet, "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (6, 2)})
    assert detect_family(checkpoint_shapes(sd2)) == "sd2"
    assert detect_family(checkpoint_shapes(sd2b)) == "sd2"
    assert detect_family(checkpoint_shapes(xl)) == "sdxl"
    assert edit(files, tmp_path / "o.png", "--model", str(xl), "--config", str(files["config"])) == 2
    assert "SDXL checkpoint" in one_error_line(capsys)
    inpaint = _header_only(tmp_path / "inp.safetensors",
                           {"model.diffusion_model.input_blocks.0.0.weight": (8, 9, 3, 3)})
    assert edit(files, tmp_path / "o.png", "--model", str(inpaint), "--config", str(files["config"])) == 2
    assert "9 input channels" in one_error_line(capsys)
    lora_as_model = files["lora_k"]
    assert edit(files, tmp_path / "o.png", "--model", str(lora_as_model), "--config", str(files["config"])) == 2
    assert "not a Stable Diffusion checkpoint" in one_error_line(capsys)


@pytest.mark.parametrize("fmt", ["lora_d", "lora_k"])
def test_lora_changes_the_edit_and_scale_zero_does_not(files, base, fmt, tmp_path):
    model = ["--model", str(files["st"]), "--config", str(files["config"])]
    assert edit(files, tmp_path / "on.png", *model, "--lora", str(files[fmt])) == 0
    assert edit(files, tmp_path / "off.png", *model, "--lora", f"{files[fmt]}:0") == 0
    on, off = pixels(tmp_path / "on.png"), pixels(tmp_path / "off.png")
    assert np.abs(on - base).mean() > 5, "the LoRA did not change the result"
    assert np.array_equal(off, base), "a LoRA at scale 0 changed the result"
    side = json.loads((tmp_path / "on.json").read_text())
    from diffeditor.models import file_hash

    assert side["lora"] == [{"path": str(files[fmt].absolute()), "scale": 1.0,
                             "sha256": file_hash(files[fmt])}]
    (files["root"] / f"{fmt}.png").write_bytes((tmp_path / "on.png").read_bytes())


def test_diffusers_and_kohya_formats_agree(files):
    """The two files hold the same random LoRA (same seed, alpha = rank): the same edit."""
    a, b = files["root"] / "lora_d.png", files["root"] / "lora_k.png"
    if not (a.is_file() and b.is_file()):
        pytest.skip("needs both LoRA tests")
    assert np.abs(pixels(a) - pixels(b)).max() <= 1


def test_replay_uses_the_recorded_lora_and_says_when_it_changed(files, tmp_path, capsys):
    lora = tmp_path / "mine.safetensors"
    lora.write_bytes(files["lora_k"].read_bytes())
    assert edit(files, tmp_path / "a.png", "--model", str(files["st"]), "--config",
                str(files["config"]), "--lora", f"{lora}:0.7") == 0
    capsys.readouterr()
    assert main(["edit", str(tmp_path / "a.json"), "--out", str(tmp_path / "r.png"), "-q"]) == 0
    assert np.array_equal(pixels(tmp_path / "r.png"), pixels(tmp_path / "a.png"))
    assert json.loads((tmp_path / "r.json").read_text())["lora"][0]["scale"] == 0.7
    from diffusers import StableDiffusionPipeline

    write_lora(StableDiffusionPipeline.from_pretrained(files["folder"]), lora, "kohya", seed=2)
    capsys.readouterr()
    assert main(["edit", str(tmp_path / "a.json"), "--out", str(tmp_path / "r2.png"), "-q"]) == 2
    line = one_error_line(capsys)
    assert "lora" in line and "has changed" in line and str(lora) in line
    assert not (tmp_path / "r2.png").exists()
    lora.unlink()
    assert main(["edit", str(tmp_path / "a.json"), "--out", str(tmp_path / "r2.png"), "-q"]) == 2
    assert "no longer exists" in one_error_line(capsys)


def test_vae_file_and_folder(files, base, tmp_path, capsys):
    model = ["--model", str(files["st"]), "--config", str(files["config"])]
    vae = tmp_path / "v.safetensors"
    vae.write_bytes(files["vae"].read_bytes())
    assert edit(files, tmp_path / "f.png", *model, "--vae", str(vae)) == 0
    assert edit(files, tmp_path / "d.png", *model, "--vae", str(files["vae_dir"])) == 0
    f, d = pixels(tmp_path / "f.png"), pixels(tmp_path / "d.png")
    assert np.abs(f - base).mean() > 5, "the VAE was not swapped"
    assert np.abs(f - d).max() <= 2  # the same VAE, from its original-layout file and a folder
    side = json.loads((tmp_path / "f.json").read_text())
    from diffeditor.models import file_hash

    assert side["vae"] == {"path": str(vae.absolute()), "sha256": file_hash(vae)}
    capsys.readouterr()
    assert main(["edit", str(tmp_path / "f.json"), "--out", str(tmp_path / "r.png"), "-q"]) == 0
    assert np.array_equal(pixels(tmp_path / "r.png"), f)
    vae.write_bytes(files["vae"].read_bytes() + b"")  # same bytes: still fine
    with open(vae, "r+b") as fh:  # one weight byte changed
        fh.seek(-3, 2)
        last = fh.read(1)
        fh.seek(-3, 2)
        fh.write(bytes([last[0] ^ 1]))
    capsys.readouterr()
    assert main(["edit", str(tmp_path / "f.json"), "--out", str(tmp_path / "r2.png"), "-q"]) == 2
    line = one_error_line(capsys)
    assert "vae" in line and "has changed" in line


def test_bad_lora_and_vae_are_one_line(files, tmp_path, capsys):
    model = ["--model", str(files["st"]), "--config", str(files["config"])]
    assert edit(files, tmp_path / "o.png", *model, "--lora", str(tmp_path / "none.safetensors")) == 2
    assert "--lora: file not found" in one_error_line(capsys)
    assert edit(files, tmp_path / "o.png", *model, "--lora", f"{files['lora_k']}:nan") == 2
    assert "finite" in one_error_line(capsys)
    assert edit(files, tmp_path / "o.png", *model, "--lora", str(files["vae"])) == 2
    assert "--lora" in one_error_line(capsys)
    assert edit(files, tmp_path / "o.png", *model, "--vae", str(files["lora_k"])) == 2
    assert "--vae" in one_error_line(capsys)
    assert not (tmp_path / "o.png").exists()


def test_lora_of_another_model_is_one_line(files, tmp_path, capfd):
    """A LoRA naming layers this model lacks, and one for another pipeline altogether (no
    unet/text_encoder keys: diffusers would load nothing and only warn)."""
    from safetensors.torch import save_file

    model = ["--model", str(files["st"]), "--config", str(files["config"])]
    bigger = tmp_path / "bigger.safetensors"
    name = "unet.down_blocks.9.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{name}.lora_A.weight": torch.ones(4, 32),
               f"{name}.lora_B.weight": torch.ones(32, 4)}, str(bigger))
    scene = files["scene"]  # in a process of its own: what really reaches the terminal
    run = subprocess.run(
        [sys.executable, "-m", "diffeditor.cli", "move", str(scene / "i.png"), "--mask",
         str(scene / "m.png"), "--offset", "10", "0", "--device", "cpu", "-q", "--out",
         str(tmp_path / "o.png"), *model, "--lora", str(bigger)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    err = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(err) == 1 and "not a LoRA for this model" in err[0], err
    other = tmp_path / "other.safetensors"
    save_file({"transformer.blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 32),
               "transformer.blocks.0.attn.to_q.lora_B.weight": torch.ones(32, 4)}, str(other))
    assert edit(files, tmp_path / "o.png", *model, "--lora", str(other)) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none of its weights matches" in err[0], err
    assert not (tmp_path / "o.png").exists()


from conftest import SHAPES_MODEL as SHAPES  # noqa: E402  (the installed shapes plugin's model)


def test_config_or_vae_of_another_size_is_one_line(files, tmp_path, capsys):
    """The shapes model (SD 1.x layout, other widths, an 8x VAE) as the config of the tiny
    checkpoint, and as its VAE."""
    if not (SHAPES / "model_index.json").is_file():
        pytest.skip("the shapes model folder is not in this checkout")
    assert edit(files, tmp_path / "o.png", "--model", str(files["st"]), "--config", str(SHAPES)) == 2
    line = one_error_line(capsys)
    assert "cannot build an SD 1.x pipeline" in line and "expected shape" in line
    assert edit(files, tmp_path / "o.png", "--model", str(files["st"]), "--config",
                str(files["config"]), "--vae", str(SHAPES)) == 2
    assert "shrinks images 8x, the model's own VAE 2x" in one_error_line(capsys)
    assert not (tmp_path / "o.png").exists()


def test_default_model_from_config_and_environment(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv("DIFFEDITOR_MODEL", raising=False)
    assert main(["config", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cfg" / "diffeditor" / "config.json")
    assert main(["config", "set", "model", str(files["folder"])]) == 0
    capsys.readouterr()
    assert main(["config", "get", "model"]) == 0
    assert capsys.readouterr().out.strip() == str(files["folder"].absolute())
    assert edit(files, tmp_path / "o.png") == 0  # no --model: the configured one
    assert json.loads((tmp_path / "o.json").read_text())["model"] == str(files["folder"].absolute())
    assert np.array_equal(pixels(tmp_path / "o.png"), pixels(files["root"] / "folder.png"))
    monkeypatch.setenv("DIFFEDITOR_MODEL", str(tmp_path / "nowhere"))
    capsys.readouterr()
    assert edit(files, tmp_path / "o2.png") == 2  # the environment wins over the file
    assert "nowhere" in one_error_line(capsys)
    monkeypatch.delenv("DIFFEDITOR_MODEL")
    assert main(["config", "set", "model", str(tmp_path / "missing")]) == 2
    assert "missing" in one_error_line(capsys)
    assert main(["config", "unset", "model"]) == 0
    assert main(["config", "get", "model"]) == 1
    (tmp_path / "cfg" / "diffeditor" / "config.json").write_text("{not json")
    capsys.readouterr()
    assert main(["config", "get", "model"]) == 2
    assert "config.json" in one_error_line(capsys)


def test_missing_builtin_default_offline_is_one_clean_line(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv("DIFFEDITOR_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache" / "hub"))
    assert edit(files, tmp_path / "o.png") == 2
    line = one_error_line(capsys)
    assert "built-in default model stable-diffusion-v1-5/stable-diffusion-v1-5" in line
    assert "not in the local Hugging Face cache" in line
    assert "config set model" in line and "DIFFEDITOR_MODEL" in line
    from diffeditor.plugins import get_registry

    if "shapes" in get_registry().models:
        assert "--model shapes (installed)" in line
    assert "local_files_o" not in line and line.count("(") == line.count(")")
