"""The VAE round trip of a model (encode, posterior mean, decode; no edit) on held-out scenes of
the shapes world: mean / worst PSNR and the 8-px border band, overall and per background.

    python tools/vae_roundtrip.py --vae v1=PATH/vae --vae v2=OTHER/vae --n 256 --seed 4242

Seeds used in training: the VAE and LDM recipe 0, ``train vae-decoder`` 10 (and its in-run
report 9000); pick another seed for a held-out measurement.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def main(argv=None) -> int:
    from diffeditor_shapes import MODEL_DIR
    from diffeditor_shapes.scenes import random_scene, render
    from diffeditor_train.components import to_model_images
    from diffeditor_train.vae_decoder import psnr_table
    from diffusers import AutoencoderKL

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vae", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(a.seed)
    scenes = [random_scene(rng) for _ in range(a.n)]
    images = np.stack([render(s, noise=rng).image for s in scenes])
    bgs = np.array([s.background for s in scenes])
    out = {}
    for name, folder in (dict(v.split("=", 1) for v in a.vae) or {"model": f"{MODEL_DIR}/vae"}).items():
        vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
        recs = []
        with torch.no_grad():
            for i in range(0, a.n, 32):
                x = to_model_images(images[i:i + 32], "cpu")
                recs.append(vae.decode(vae.encode(x).latent_dist.mean).sample)
        rec, src = torch.cat(recs), to_model_images(images, "cpu")
        row = {"all": psnr_table(rec, src)}
        for bg in sorted(set(bgs)):
            k = torch.from_numpy(np.flatnonzero(bgs == bg))
            row[bg] = psnr_table(rec[k], src[k])
        out[name] = row
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
