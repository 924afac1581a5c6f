"""The image prompt's inversion ablation on the shapes world (``python -m diffeditor_train.measure``).

For shapes scenes (the eval's held-out kind: a seeded generator, noise included), DDIM-invert the
source image with its caption (no CFG, as the editor inverts) and reconstruct it with the same
prompt, then score the reconstruction against the source (mean absolute error on the [-1, 1]
scale and PSNR). Three settings of the image prompt (the source image itself, weight ``gamma``):
off in both passes; in the reconstruction only (the release inverts without it); in both (what
the paper describes). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch


@torch.no_grad()
def roundtrip(eng, x: torch.Tensor, prompt: str, steps: int, g_inv: float, g_rec: float):
    sched = eng.scheduler
    sched.set_timesteps(steps)
    ts = [int(t) for t in sched.timesteps]  # descending
    ac = sched.alphas_cumprod.to(torch.float64)
    final = float(sched.final_alpha_cumprod)
    ctx = eng.encode_text([prompt])
    ip = eng.image_prompt
    ip.set_image(x[0])
    kw = {"added_cond_kwargs": ip.added_cond_kwargs(1)}

    def eps(z, t, gamma):
        ip.set_scale(gamma)
        tt = torch.tensor([t], device=eng.device)
        return eng.unet(z, tt, encoder_hidden_states=ctx, **kw).sample.float()

    def prev_alpha(i):  # the level below ts[i]
        return float(ac[ts[i + 1]]) if i + 1 < len(ts) else final

    z = eng.encode_image(x.to(eng.device)).float()
    for i in reversed(range(len(ts))):  # invert: level prev_alpha(i) -> ts[i]
        a_prev, a_t = prev_alpha(i), float(ac[ts[i]])
        e = eps(z, ts[i], g_inv)
        x0 = (z - math.sqrt(1 - a_prev) * e) / math.sqrt(a_prev)
        z = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * e
    for i in range(len(ts)):  # reconstruct: ts[i] -> prev_alpha(i)
        a_prev, a_t = prev_alpha(i), float(ac[ts[i]])
        e = eps(z, ts[i], g_rec)
        x0 = (z - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
        z = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * e
    ip.set_scale(0.0)
    return eng.decode(z).float().cpu()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1000, help="first scene seed")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--gamma", type=float, default=None,
                    help="image-prompt weight (default: the model's image_prompt_scale)")
    args = ap.parse_args(argv)
    from diffeditor_shapes.scenes import random_scene, render

    from diffeditor import Editor

    editor = Editor.from_pretrained(args.model, device="cpu")
    eng = editor.engine
    if eng.image_prompt is None:
        raise SystemExit(f"model {args.model} has no image prompt")
    gamma = args.gamma
    if gamma is None:
        gamma = float(editor.defaults().get("image_prompt_scale", 0.1)) or 0.1
    settings = {"off": (0.0, 0.0), "reconstruction_only": (0.0, gamma), "both": (gamma, gamma)}
    rows = {k: [] for k in settings}
    for s in range(args.seed, args.seed + args.cases):
        rng = np.random.default_rng(s)
        scene = render(random_scene(rng), noise=rng)
        x = torch.from_numpy(scene.image.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        for name, (gi, gr) in settings.items():
            rec = roundtrip(eng, x, scene.caption, args.steps, gi, gr)
            err = (rec - x).abs().mean().item()
            mse = ((rec - x) ** 2).mean().item() / 4  # on the [0, 1] scale
            rows[name].append({"seed": s, "mae": err, "psnr_db": 10 * math.log10(1 / mse)})
    out = {"model": args.model, "gamma": gamma, "steps": args.steps, "cases": args.cases,
           "summary": {k: {"mae": float(np.mean([r["mae"] for r in v])),
                           "psnr_db": float(np.mean([r["psnr_db"] for r in v]))}
                       for k, v in rows.items()},
           "rows": rows}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
