"""diffeditor train: few-step CPU runs with tiny configs (loss down on a fixed batch, files the
project's loaders accept, bit-exact resume), the file layout, bad input, and the shipped shapes
image prompt (it changes edits)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffeditor_shapes")
pytest.importorskip("diffeditor_train")

from diffeditor_train import image_prompt as ipt  # noqa: E402
from diffeditor_train.components import encode_text, load_frozen  # noqa: E402
from diffeditor_train.data import shapes_pairs  # noqa: E402
from diffeditor_train.image_encoder import build_tower, contrastive_loss, pixel_values  # noqa: E402

from diffeditor.cli import main  # noqa: E402
from diffeditor.image_prompt import (  # noqa: E402
    ImagePromptEncoder,
    attach_image_prompt,
    detach_image_prompt,
    load_ip_state_dict,
)

torch.set_num_threads(1)


def run(*argv) -> int:
    return main(["train", *map(str, argv), "--no-progress", "--device", "cpu"])


@pytest.fixture(scope="module")
def shapes_parts():
    return load_frozen("shapes", torch.device("cpu"), vae=True, unet=True)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    out = tmp_path_factory.mktemp("enc") / "image_encoder"
    assert run("image-encoder", "--shapes", 32, "--preset", "tiny", "--steps", 40,
               "--batch-size", 16, "--lr", "2e-3", "--out", out) == 0
    return out


# -- image encoder ----------------------------------------------------------------------------


def test_image_encoder_lowers_the_contrastive_loss_on_a_fixed_batch(tiny_encoder, shapes_parts):
    from transformers import CLIPVisionModelWithProjection

    pairs = shapes_pairs(32, seed=0)  # the training scenes (--data-seed 0)
    before = build_tower("tiny", 128, 128, seed=0)  # the run's initialisation (--seed 0)
    after = CLIPVisionModelWithProjection.from_pretrained(tiny_encoder, dtype=torch.float32)
    enc = ImagePromptEncoder.from_pretrained(tiny_encoder)
    pix = pixel_values(before, enc.processor, pairs.images)
    _, text = encode_text(shapes_parts, pairs.captions)
    with torch.no_grad():
        l0 = contrastive_loss(before(pixel_values=pix).image_embeds, text, 10.0)
        l1 = contrastive_loss(after(pixel_values=pix).image_embeds, text, 10.0)
    assert l1 < l0 - 0.2, (l0, l1)
    from PIL import Image

    # what the image prompt reads: (1 + 4x4 patches of 32 px, width 32)
    assert enc.encode(Image.fromarray(pairs.images[0])).shape == (1, 17, 32)


# -- image prompt -----------------------------------------------------------------------------


def _fixed_batch_loss(parts, encoder_dir, state_dict, n=8):
    """The denoising loss of the image prompt ``state_dict`` on the first ``n`` training scenes,
    with fixed noise and timesteps (same for every call)."""
    from types import SimpleNamespace

    enc = ImagePromptEncoder.from_pretrained(encoder_dir)
    cache = ipt.build_cache(parts, enc, shapes_pairs(n, seed=0), torch.device("cpu"))
    args = SimpleNamespace(batch_size=n, drop_text=0.0, drop_image=0.0, drop_both=0.0,
                           mixed_precision=False)
    unet = parts.unet
    attach_image_prompt(unet, state_dict, 1.0)
    try:
        step = ipt.make_step(unet, parts.noise, cache, args, torch.device("cpu"))
        losses = []
        gen = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for _ in range(4):
                losses.append(float(step(gen)))
        return sum(losses) / len(losses)
    finally:
        detach_image_prompt(unet)


def test_image_prompt_training_lowers_the_loss_and_writes_a_loadable_file(
        tiny_encoder, shapes_parts, tmp_path):
    out = tmp_path / "ip.bin"
    assert run("image-prompt", "--model", "shapes", "--image-encoder", tiny_encoder,
               "--shapes", 8, "--steps", 25, "--batch-size", 4, "--lr", "1e-3",
               "--fp32", "--out", out) == 0
    sd = load_ip_state_dict(out)  # the project's loader, unchanged
    assert set(sd) == {"image_proj", "ip_adapter"}
    assert sd["image_proj"]["latents"].shape == (1, 64, 64)
    unet = shapes_parts.unet
    init = ipt.initial_state_dict(unet, 32, 64, 64, 1, seed=0)  # the run's initialisation
    assert {k: v.shape for k, v in init["image_proj"].items()} == {
        k: v.shape for k, v in sd["image_proj"].items()}
    before = _fixed_batch_loss(shapes_parts, tiny_encoder, init)
    after = _fixed_batch_loss(shapes_parts, tiny_encoder, sd)
    assert after < 0.9 * before, (before, after)


def test_export_is_the_inverse_of_diffusers_loader(shapes_parts):
    unet = shapes_parts.unet
    init = ipt.initial_state_dict(unet, 48, 64, 128, 2, seed=3)
    attach_image_prompt(unet, init, 0.5)
    try:
        back = ipt.export_state_dict(unet, torch.float32)
    finally:
        detach_image_prompt(unet)
    for group in ("image_proj", "ip_adapter"):
        assert set(back[group]) == set(init[group])
        for k in init[group]:
            assert torch.equal(back[group][k], init[group][k]), (group, k)


def test_image_prompt_safetensors_output_loads(tiny_encoder, shapes_parts, tmp_path):
    out = tmp_path / "ip.safetensors"
    assert run("image-prompt", "--image-encoder", tiny_encoder, "--shapes", 4, "--steps", 1,
               "--batch-size", 2, "--out", out) == 0
    sd = load_ip_state_dict(out)
    assert sd["ip_adapter"]["1.to_k_ip.weight"].dtype == torch.float16
    attach_image_prompt(shapes_parts.unet, sd, 0.3)
    detach_image_prompt(shapes_parts.unet)


def _checkpoint_tensors(path):
    state = torch.load(path, map_location="cpu", weights_only=False)
    flat = {}
    for name, sd in state["modules"].items():
        for k, v in sd.items():
            flat[f"{name}.{k}"] = v
    for i, s in state["optimizer"]["state"].items():
        for k, v in s.items():
            flat[f"opt.{i}.{k}"] = torch.as_tensor(v)
    flat["generator"] = state["generator"]
    return state["step"], flat


def _assert_same(a, b):
    assert a[0] == b[0]
    assert set(a[1]) == set(b[1])
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k


def test_image_prompt_resume_is_bit_exact(tiny_encoder, tmp_path):
    common = ["image-prompt", "--image-encoder", tiny_encoder, "--shapes", 6, "--batch-size", 2,
              "--lr", "1e-3", "--fp32"]
    straight, split = tmp_path / "a.bin", tmp_path / "b.bin"
    assert run(*common, "--steps", 4, "--out", straight) == 0
    assert run(*common, "--steps", 2, "--out", split) == 0
    assert run(*common, "--steps", 4, "--resume", "--out", split) == 0
    _assert_same(_checkpoint_tensors(str(straight) + ".ckpt"),
                 _checkpoint_tensors(str(split) + ".ckpt"))
    a, b = load_ip_state_dict(straight), load_ip_state_dict(split)
    for g in a:
        for k in a[g]:
            assert torch.equal(a[g][k], b[g][k])
    # --export-only writes the checkpoint's weights without data or training
    assert run(*common, "--steps", 4, "--export-only", "--checkpoint", str(straight) + ".ckpt",
               "--out", tmp_path / "c.bin") == 0
    c = load_ip_state_dict(tmp_path / "c.bin")
    assert all(torch.equal(a[g][k], c[g][k]) for g in a for k in a[g])
    # a changed setting is refused on resume, in one line
    assert run(*common[:-1], "--steps", 5, "--lr", "2e-3", "--resume", "--out", split) == 2


def test_image_encoder_resume_is_bit_exact(tmp_path):
    common = ["image-encoder", "--shapes", 16, "--preset", "tiny", "--batch-size", 8, "--fp32"]
    assert run(*common, "--steps", 5, "--out", tmp_path / "a") == 0
    assert run(*common, "--steps", 3, "--checkpoint-every", 1, "--out", tmp_path / "b") == 0
    assert run(*common, "--steps", 5, "--resume", "--out", tmp_path / "b") == 0
    _assert_same(_checkpoint_tensors(str(tmp_path / "a") + ".ckpt"),
                 _checkpoint_tensors(str(tmp_path / "b") + ".ckpt"))


# -- ldm ----------------------------------------------------------------------------------------


def test_ldm_recipe_runs_resumes_bit_exactly_and_loads(tmp_path):
    from diffeditor.models import check_model_folder, load_pipeline

    common = ["ldm", "--shapes", 8, "--preset", "tiny", "--vae-steps", 3, "--vae-batch-size", 2,
              "--batch-size", 2]
    assert run(*common, "--steps", 4, "--out", tmp_path / "a") == 0
    assert run(*common, "--steps", 2, "--out", tmp_path / "b") == 0
    shutil.rmtree(tmp_path / "b")
    assert run(*common, "--steps", 4, "--resume", "--out", tmp_path / "b") == 0
    for suffix in (".ckpt", ".ckpt.vae"):
        _assert_same(_checkpoint_tensors(str(tmp_path / "a") + suffix),
                     _checkpoint_tensors(str(tmp_path / "b") + suffix))
    check_model_folder(tmp_path / "a")
    pipe = load_pipeline(str(tmp_path / "a"), device="cpu", dtype=torch.float32,
                         local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == 32
    # an existing output is never overwritten
    assert run(*common, "--steps", 1, "--out", tmp_path / "a",
               "--checkpoint", tmp_path / "c.ckpt") == 2


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, words", [
    (["image-prompt", "--data", "/nonexistent/x", "--out", "o.bin"], "captions.jsonl"),
    (["image-prompt", "--shapes", "0", "--out", "o.bin"], "--shapes"),
    (["image-encoder", "--shapes", "4", "--steps", "0", "--out", "e"], "--steps"),
    (["image-prompt", "--shapes", "4", "--out", "o.bin", "--model", "nonexistent-folder/"],
     "nonexistent-folder"),
    (["image-prompt", "--shapes", "4", "--out", "o.bin", "--resume"], "--resume"),
])
def test_bad_input_is_one_line(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert "Traceback" not in err[0]


def test_folder_dataset(tmp_path):
    import json

    import numpy as np
    from diffeditor_train.data import folder_pairs
    from PIL import Image

    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "a.png", "caption": "grey"}) + "\n")
    pairs = folder_pairs(tmp_path, 128)
    assert pairs.captions == ["grey"] and pairs.images[0].shape == (128, 128, 3)


# -- the shipped shapes image prompt ------------------------------------------------------------


def test_shapes_model_ships_its_image_tower_and_image_prompt():
    from diffeditor_shapes.plugin import model_entry

    entry = model_entry()
    assert entry.image_prompt is not None, "the shapes model card names no image prompt"
    weights, encoder = Path(entry.image_prompt["weights"]), Path(entry.image_prompt["encoder"])
    files = [weights, *[p for p in encoder.iterdir() if p.is_file()]]
    assert sum(p.stat().st_size for p in files) < 2_700_000  # the tree's 64 MiB budget
    enc = ImagePromptEncoder.from_pretrained(encoder)
    sd = load_ip_state_dict(weights)
    assert sd["image_proj"]["proj_in.weight"].shape[1] == enc.hidden_size
    assert sd["image_proj"]["latents"].shape[1] == 64


def test_the_trained_shapes_image_prompt_changes_edits(tmp_path):
    """Not a no-op: the image prompt moves the noise prediction, and the same appearance edit
    with it on and off differs (the measured sizes are in docs/quality.md)."""
    import json

    import numpy as np
    from diffeditor_shapes.scenes import make_case, save_case

    from diffeditor import Editor

    editor = Editor.from_pretrained("shapes", device="cpu")
    eng = editor.engine
    assert eng.image_prompt is not None  # --model shapes loads it by default
    case = make_case("appearance", 3)
    x = torch.from_numpy(case.source.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    z0, ctx = eng.encode_image(x).float(), eng.encode_text([case.prompt])
    eng.image_prompt.set_image(x[0])
    kw = {"added_cond_kwargs": eng.image_prompt.added_cond_kwargs(1)}
    a = eng.scheduler.alphas_cumprod[500]
    zt = a.sqrt() * z0 + (1 - a).sqrt() * torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    eps = {}
    for gamma in (0.0, 1.0):
        eng.image_prompt.set_scale(gamma)
        with torch.no_grad():
            eps[gamma] = eng.unet(zt, torch.tensor([500]), encoder_hidden_states=ctx, **kw).sample
    eng.image_prompt.set_scale(0.0)
    rel = ((eps[1.0] - eps[0.0]).pow(2).mean() / eps[0.0].pow(2).mean()).sqrt()
    assert rel > 0.005, float(rel)  # measured 1.5% at t = 500

    spec = json.loads(Path(save_case(case, tmp_path)).read_text())
    out = {}
    for gamma in (0.0, 1.0):
        data = {**spec, "steps": 10, "image_prompt_scale": gamma}
        out[gamma] = np.asarray(editor.edit(data, base_dir=tmp_path).image.convert("RGB"),
                                dtype=np.float64)
    diff = np.abs(out[0.0] - out[1.0]).mean()
    assert diff > 0.01, diff  # mean absolute difference on the 0..255 scale (a no-op gives 0)


# -- outputs: checked before training, never replaced without --force (issue 31, cases 1-3) -----


@pytest.mark.parametrize("what, out, existing, words", [
    # 1: an existing weights file / folder is not replaced
    ("image-prompt", "w.bin", {"w.bin": b"PRECIOUS"}, "--out w.bin exists; add --force"),
    ("image-encoder", "enc", {"enc/keep.txt": b"PRECIOUS"}, "--out enc exists; add --force"),
    ("ldm", "pipe", {"pipe/keep.txt": b"PRECIOUS"}, "--out pipe exists; add --force"),
    ("image-encoder", "enc", {"enc": b"PRECIOUS"}, "--out enc exists and is not a folder"),
    ("image-prompt", "w.bin", {"w.bin/keep.txt": b"PRECIOUS"}, "--out w.bin is a folder"),
    # 2: an existing checkpoint is not replaced by a run without --resume
    ("image-prompt", "w.bin", {"w.bin.ckpt": b"PRECIOUS"},
     "checkpoint w.bin.ckpt exists; add --resume to continue that run or --force"),
    ("ldm", "pipe", {"pipe.ckpt.vae": b"PRECIOUS"}, "checkpoint pipe.ckpt.vae exists"),
    # 3: a file name the command cannot write is refused before training
    ("image-prompt", "w.xyz", {}, "--out w.xyz: use a file name ending in .bin or .pt or"),
])
def test_outputs_checked_before_training(what, out, existing, words, capsys, tmp_path,
                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, data in existing.items():
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_bytes(data)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    extra = ["--preset", "tiny"] if what != "image-prompt" else []
    assert run(what, "--shapes", 4, "--steps", 2, "--out", out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    # nothing written, nothing replaced (no checkpoint left behind)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    for name, data in existing.items():
        assert Path(name).read_bytes() == data


def test_checkpoint_and_out_the_same_file(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("image-prompt", "--shapes", 4, "--out", "w.bin", "--checkpoint", "w.bin") == 2
    assert "--checkpoint w.bin is --out too" in capsys.readouterr().err


def test_force_replaces_an_existing_output(tiny_encoder, tmp_path):
    out = tmp_path / "w.bin"
    out.write_bytes(b"PRECIOUS")
    Path(str(out) + ".ckpt").write_bytes(b"OLD")
    args = ["image-prompt", "--image-encoder", tiny_encoder, "--shapes", 4, "--batch-size", 2,
            "--steps", 1, "--out", out]
    assert run(*args) == 2 and out.read_bytes() == b"PRECIOUS"
    assert run(*args, "--force") == 0
    assert set(load_ip_state_dict(out)) == {"image_proj", "ip_adapter"}
    assert torch.load(str(out) + ".ckpt", weights_only=False)["step"] == 1
