"""The "dot rate" of the shapes model: the share of objects whose interior is not clean.

An object counts as dotted when less than 95% of its interior (its mask eroded by 2 px) lies
within RGB distance 60 of its colour (a dark or green "eye", a hole, a halo reaching inside).

Two kinds of single-object scenes, both from seeds never used for training or tuning:

* ``generated``: the UNet samples a scene from its caption (50 DDIM steps, CFG 4, the model's
  scheduler); the object is the largest connected region within RGB 60 of the caption's colour,
  holes filled (so a dot inside still counts against it).
* ``roundtrip``: a drawn scene encoded and decoded by the VAE, on the object's true mask.

The latents of the generated scenes depend on the UNet only, so ``--vae`` decoders are compared
on the very same samples::

    python tools/dot_rate.py --n 32 --vae old=PATH/vae --vae new=OTHER/vae
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from scipy import ndimage


def purity(image: np.ndarray, mask: np.ndarray, rgb) -> float:
    inner = ndimage.binary_erosion(mask, iterations=2)
    if not inner.any():
        return 1.0
    d = np.linalg.norm(image[inner].astype(float) - np.asarray(rgb, float), axis=1)
    return float((d < 60).mean())


def found_mask(image: np.ndarray, rgb) -> np.ndarray:
    near = np.linalg.norm(image.astype(float) - np.asarray(rgb, float), axis=2) < 60
    lab, n = ndimage.label(near)
    if n == 0:
        return near
    big = 1 + int(np.argmax(ndimage.sum(near, lab, range(1, n + 1))))
    return ndimage.binary_fill_holes(lab == big)


def main(argv=None) -> int:
    from diffeditor_shapes import MODEL_DIR
    from diffeditor_shapes.scenes import PALETTE, random_scene, render
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(MODEL_DIR))
    ap.add_argument("--vae", action="append", default=[], metavar="NAME=DIR",
                    help="decoders to compare (default: the model's own)")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=7000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save", default=None, help="PNG grid of the generated scenes per decoder")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    pipe = StableDiffusionPipeline.from_pretrained(a.model, torch_dtype=torch.float32,
                                                   local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(a.seed)
    scenes = [random_scene(rng, n_objects=1) for _ in range(a.n)]
    drawn = [render(s, noise=rng).image for s in scenes]
    gen = torch.Generator().manual_seed(a.seed)
    lat = []
    for i in range(0, a.n, 8):
        caps = [s.caption for s in scenes[i:i + 8]]
        lat.append(pipe(caps, num_inference_steps=a.steps, guidance_scale=4.0, generator=gen,
                        output_type="latent").images)
    lat = torch.cat(lat)
    vaes = dict(v.split("=", 1) for v in a.vae) or {"model": f"{a.model}/vae"}
    out = {}
    for name, folder in vaes.items():
        vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
        with torch.no_grad():
            g = vae.decode(lat / vae.config.scaling_factor).sample
            x = torch.from_numpy(np.stack(drawn)).permute(0, 3, 1, 2).float() / 127.5 - 1
            r = vae.decode(vae.encode(x).latent_dist.mean).sample
        to8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # noqa: E731
        g8, r8 = to8(g), to8(r)
        pg = [purity(g8[i], found_mask(g8[i], PALETTE[s.objects[0].colour]), PALETTE[s.objects[0].colour])
              for i, s in enumerate(scenes)]
        pr = [purity(r8[i], render(s).masks[0], PALETTE[s.objects[0].colour])
              for i, s in enumerate(scenes)]
        out[name] = {"generated_dot_rate": float(np.mean([p < 0.95 for p in pg])),
                     "roundtrip_dot_rate": float(np.mean([p < 0.95 for p in pr])),
                     "generated_mean_purity": float(np.mean(pg)),
                     "roundtrip_mean_purity": float(np.mean(pr)), "n": a.n}
        if a.save:
            from PIL import Image
            Image.fromarray(np.concatenate([np.concatenate(list(g8[:8]), 1),
                                            np.concatenate(list(r8[:8]), 1)], 0)).save(
                a.save.replace(".png", f"_{name}.png"))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
