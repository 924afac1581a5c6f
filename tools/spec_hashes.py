"""SHA-256 of the PNG each example spec in ``specs/`` gives on the shapes model (CPU, float32).

The hashes pin the sampler bit for bit through refactors: ``tests/model/test_spec_hashes.py``
recomputes them and compares with ``tests/data/spec_hashes.json``. Regenerate that file only
when the maths changes on purpose (and say so in the commit)::

    python tools/spec_hashes.py --write

Every spec runs with ``steps`` overridden to ``STEPS`` (fast) and its own seed. The image is
encoded with PIL's PNG writer at fixed settings, so the hash is of the pixels plus PNG framing.

The bits also depend on the CPU: MKL and oneDNN pick kernels by vendor and vector extensions,
and an Intel AVX-512 machine gives other low bits than an AMD EPYC one for the guided specs.
So the file keeps one set per CPU family (:func:`machine`); ``--write`` adds or replaces the
current machine's set and keeps the others, less the specs whose hash it found changed on this
machine (:func:`merge`): those entries are stale everywhere, and the test skips them on the
other families until ``--write`` runs there.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPECS = REPO / "specs"
OUT = REPO / "tests" / "data" / "spec_hashes.json"
STEPS = 12  # the smallest count where every window (guidance, SDE, time travel) is non-empty


#: extra cases: name -> (spec file, field overrides). ``dragondiffusion`` pins the
#: DragonDiffusion configuration as it was run through spec overrides before it became a
#: registered sampler: ``sampler: dragondiffusion`` must give the same PNG.
EXTRA: dict[str, tuple[str, dict]] = {
    "move.yaml+dragondiffusion": ("move.yaml", {
        "image_prompt_scale": 0.0, "sde_strength": 0.0, "sde_strength_outside": 0.0,
        "schedule": {"guidance": [{"start": 0.0, "stop": 0.6}], "time_travel_repeats": 1}}),
}


def machine() -> str:
    """This CPU's family as the hashes are keyed: ``vendor/capability`` (``GenuineIntel/AVX512``;
    the vendor from ``/proc/cpuinfo``, the capability is ATen's)."""
    import platform

    import torch

    vendor = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{vendor}/{torch.backends.cpu.get_cpu_capability()}"


def hashes_for(data: dict, key: str) -> dict[str, str] | None:
    """The recorded set for ``key`` (``vendor/capability``), else the vendor's own, else None."""
    sets = data["machines"]
    return sets.get(key) or sets.get(key.split("/")[0])


def merge(machines: dict[str, dict[str, str]], key: str, hashes: dict[str, str]) -> dict:
    """``machines`` with ``key``'s set replaced by ``hashes``. A spec whose hash changed on this
    machine (a deliberate change of the maths or of a model default) changes on every other
    family too, so its old entries elsewhere are dropped rather than kept stale."""
    old = hashes_for({"machines": machines}, key) or {}
    changed = {n for n, h in hashes.items() if n in old and old[n] != h}
    out = {k: {n: h for n, h in v.items() if n not in changed} for k, v in machines.items()
           if k != key}
    out[key] = hashes
    return out


def spec_files() -> list[Path]:
    return sorted(SPECS.glob("*.yaml"))


def png_sha256(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def spec_hash(editor, path: Path, steps: int = STEPS, overrides: dict | None = None) -> str:
    import yaml

    data = yaml.safe_load(path.read_text())
    data.update(overrides or {})
    data["steps"] = steps
    import torch

    # Float reductions (the energies' backward pass above all) split differently across
    # threads, so the bits depend on the thread count: pin one thread for the edit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = editor.edit(data, base_dir=path.parent)
    finally:
        torch.set_num_threads(threads)
    return png_sha256(result.image)


def compute(editor, names=None) -> dict[str, str]:
    out = {p.name: spec_hash(editor, p) for p in spec_files() if names is None or p.name in names}
    for name, (file, overrides) in EXTRA.items():
        if names is None or name in names:
            out[name] = spec_hash(editor, SPECS / file, overrides=overrides)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"write {OUT.relative_to(REPO)}")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from diffeditor import Editor
    from diffeditor.models import quiet_libraries

    quiet_libraries()
    editor = Editor.from_pretrained("shapes", device="cpu", dtype="float32")
    hashes = compute(editor)
    data = json.loads(OUT.read_text()) if OUT.is_file() else {"machines": {}}
    machines = merge(data.get("machines", {}), machine(), hashes)
    text = json.dumps({"steps": STEPS, "model": "shapes", "device": "cpu", "dtype": "float32",
                       "machines": machines}, indent=2) + "\n"
    if args.write:
        OUT.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
