"""Model loading: a tiny random SD-1.x-layout pipeline saved and loaded back, the shapes model,
and clear messages when weights are missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffeditor.errors import ModelError
from diffeditor.models import load_pipeline, resolve_device, resolve_dtype, resolve_model


def _tiny_pipeline(tokenizer_dir: Path):
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4,
                        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=49408, max_position_embeddings=77))
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def test_tiny_random_pipeline_round_trip_and_edit(tmp_path, shapes_model):
    pipe = _tiny_pipeline(shapes_model / "tokenizer")
    folder = tmp_path / "tiny-sd"
    pipe.save_pretrained(folder)
    assert (folder / "model_index.json").is_file() and (folder / "unet" / "config.json").is_file()
    loaded = load_pipeline(str(folder), "cpu", "float32")
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the whole edit path runs on it (SD's block layout, tiny widths)
    from diffeditor import Editor

    img = np.full((64, 64, 3), 100, np.uint8)
    img[16:40, 16:40] = (200, 30, 30)
    Image.fromarray(img).save(tmp_path / "i.png")
    m = np.zeros((64, 64), np.uint8)
    m[16:40, 16:40] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    editor = Editor.from_pretrained(str(folder), device="cpu")
    res = editor.edit({"task": "drag", "image": "i.png", "mask": "m.png", "handles": [[28, 28]],
                       "targets": [[40, 30]], "steps": 6, "resolution": 64}, base_dir=tmp_path)
    assert res.image.size == (64, 64)
    assert res.metadata["network_evaluations"]["unet_partial"] > 0


def test_shapes_model_loads_in_float32_on_cpu(shapes_model):
    pipe = load_pipeline(str(shapes_model), "cpu", None)
    assert pipe.unet.dtype == torch.float32 and pipe.unet.device.type == "cpu"
    assert pipe.unet.config.cross_attention_dim == 128


def test_device_and_dtype_resolution():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ModelError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(ModelError, match="unknown device"):
        resolve_device("gpu0")


def test_not_a_pipeline_folder(tmp_path):
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(ModelError, match="model_index.json"):
        load_pipeline(str(tmp_path), "cpu")


def test_unknown_model_name_lists_known_ones():
    with pytest.raises(ModelError, match="registered model name"):
        resolve_model("./no/such/folder")


def test_unreachable_hub_gives_one_clear_line(tmp_path):
    """No cache, no network: one line naming what is missing and how to get it, exit non-zero."""
    img = np.zeros((64, 64, 3), np.uint8)
    Image.fromarray(img).save(tmp_path / "i.png")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(tmp_path / "m.png")
    (tmp_path / "s.json").write_text(json.dumps({"task": "move", "image": "i.png", "mask": "m.png"}))
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-m", "diffeditor.cli", "edit", str(tmp_path / "s.json"),
         "--model", "stable-diffusion-v1-5/stable-diffusion-v1-5", "--out", str(tmp_path / "o.png")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode != 0
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("diffeditor:")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in lines[0]
    assert "diffeditor download" in lines[0] and "--model PATH" in lines[0] and "HF_HOME" in lines[0]
    assert not (tmp_path / "o.png").exists()


def test_image_prompt_runs_in_its_step_window(tmp_path, shapes_model):
    """The paper's image prompt through the whole edit path on tiny components: gamma is set
    only inside the image-prompt window, and it changes the edit."""
    from test_image_prompt import TINY_CLIP_WIDTH, cross_attention_layers, make_ip_state_dict
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from diffeditor import Editor

    pipe = _tiny_pipeline(shapes_model / "tokenizer")
    folder = tmp_path / "tiny-sd"
    pipe.save_pretrained(folder)
    sd = make_ip_state_dict(cross_attention_layers(pipe.unet), cross_dim=32, clip_dim=TINY_CLIP_WIDTH,
                            width=64, heads=1)
    torch.save(sd, tmp_path / "ip.bin")
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=TINY_CLIP_WIDTH, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=16)).save_pretrained(tmp_path / "clip")
    editor = Editor.from_pretrained(str(folder), device="cpu", image_prompt={
        "weights": str(tmp_path / "ip.bin"), "encoder": str(tmp_path / "clip")})
    img = np.full((64, 64, 3), 100, np.uint8)
    img[16:40, 16:40] = (200, 30, 30)
    Image.fromarray(img).save(tmp_path / "i.png")
    Image.fromarray(np.where(img[..., 0] > 150, 255, 0).astype(np.uint8)).save(tmp_path / "m.png")
    attn2 = next(m for n, m in editor.engine.unet.named_modules() if n.endswith("attn2"))
    seen: list[float] = []
    handle = attn2.register_forward_pre_hook(lambda mod, args: seen.append(float(mod.processor.scale[0])))
    spec = {"task": "drag", "image": "i.png", "mask": "m.png", "handles": [[28, 28]], "targets": [[40, 30]],
            "steps": 10, "resolution": 64, "image_prompt_scale": 0.5,
            "schedule": {"image_prompt": {"steps": [3, 4]}, "guidance": [{"steps": [1]}]}}
    with_ip = editor.edit(spec, base_dir=tmp_path).latent
    handle.remove()
    assert seen.count(0.5) == 2  # one CFG call at each of steps 3 and 4
    assert set(seen) == {0.0, 0.5}
    without = editor.edit({**spec, "image_prompt_scale": 0.0}, base_dir=tmp_path).latent
    assert not torch.allclose(with_ip, without)


def _copy_of_shapes(folder: Path) -> Path:
    """A copy of the installed shapes model's folder (weights linked, files copied)."""
    from diffeditor.plugins import get_registry

    if "shapes" not in get_registry().models:
        pytest.skip("diffeditor-shapes is not installed")
    src = Path(get_registry().models["shapes"].location)
    folder.mkdir()
    for item in src.iterdir():
        if item.is_dir():
            (folder / item.name).symlink_to(item, target_is_directory=True)
        else:
            (folder / item.name).write_bytes(item.read_bytes())
    return folder


def test_model_defaults_travel_with_the_weights(tmp_path):
    """``--model shapes`` and ``--model <a copy of its folder>`` give the same specs: the
    defaults are the folder's ``diffeditor.json``, checked against the registered tasks."""
    from diffeditor.specs import parse_spec

    copy = _copy_of_shapes(tmp_path / "copy")
    loc_a, by_name = resolve_model("shapes")
    loc_b, by_path = resolve_model(str(copy))
    assert by_path is not None and by_path.defaults == by_name.defaults and by_path.defaults
    assert by_path.defaults["guidance_scale"] == 1.0  # not the release's 4
    img = np.zeros((128, 128, 3), np.uint8)
    Image.fromarray(img).save(tmp_path / "i.png")
    img[40:80, 40:80] = 255
    Image.fromarray(img[..., 0]).save(tmp_path / "m.png")
    spec = {"task": "move", "image": "i.png", "mask": "m.png", "offset": [5, 0]}
    a = parse_spec(spec, base_dir=tmp_path, defaults=by_name.defaults)
    b = parse_spec(spec, base_dir=tmp_path, defaults=by_path.defaults)
    assert a == b and a.energy_scale == 1000.0 and a.vacated_init == "background"
    (copy / "diffeditor.json").unlink()  # without a card: the release's defaults
    assert resolve_model(str(copy))[1] is None


@pytest.mark.parametrize("card, words", [
    ("{not json", "not a readable JSON file"),
    ('["a"]', "expected a mapping"),
    ('{"defaults": {}, "colour": 1}', "unknown: colour"),
    ('{"defaults": {"guidance_scal": 2}}', "defaults.guidance_scal: no such spec field"),
    ('{"defaults": {"move.handles": 2}}', "defaults.move.handles: no such spec field of task 'move'"),
    ('{"defaults": {"teleport.offset": 2}}', "unknown task 'teleport'"),
    ('{"image_prompt": {"weights": "ip.bin"}}', "image_prompt must be"),
])
def test_a_bad_model_card_is_one_clear_line(tmp_path, card, words, capsys):
    from diffeditor.cli import main

    copy = _copy_of_shapes(tmp_path / "copy")
    (copy / "diffeditor.json").write_text(card)
    with pytest.raises(ModelError, match=words.replace("(", r"\(").replace(")", r"\)")):
        resolve_model(str(copy))
    code = main(["edit", str(tmp_path / "none.yaml"), "--model", str(copy), "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and words in err and len(err.strip().splitlines()) == 1


def test_the_shapes_card_names_real_fields():
    from diffeditor.models import read_model_card
    from diffeditor.plugins import get_registry

    if "shapes" not in get_registry().models:
        pytest.skip("diffeditor-shapes is not installed")
    entry = read_model_card(get_registry().models["shapes"].location)  # checks every key
    assert entry.defaults == get_registry().models["shapes"].defaults
