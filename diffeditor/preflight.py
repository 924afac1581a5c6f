"""Everything about an edit that can be checked before any model loads.

``diffeditor edit`` (and the per-task commands) run :func:`check_edits` first: every spec is
parsed and its images and masks decoded (at their real bit depth) and cross-checked, every
output path checked (a known image suffix, not a folder, not existing without ``--force``, a
writable folder, not one of the inputs, not twice in the batch) and the options checked (device
present, dtype known, positive sizes). All problems are collected, one line each naming the spec
file and the field, and raised together as :class:`~diffeditor.errors.CheckErrors`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from .errors import CheckErrors, DiffEditorError, show

#: above this working resolution a CPU edit takes minutes per step: warn (not an error)
CPU_RESOLUTION_WARNING = 1024


def _input_files(spec) -> list[Path]:
    """Every file a validated spec reads (its own and, for compose, its edits')."""
    files = [v for v in vars(spec).values() if isinstance(v, Path)]
    for sub in getattr(spec, "sub_specs", None) or []:
        files += _input_files(sub)
    return files


def _key(path: Path) -> str:
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        return str(path)


def check_edits(sources: list[tuple[str, Any]], outputs: list[Path], args,
                defaults: dict | None = None, base_dir: Path | None = None, *, registry) -> list:
    """Parse and check a batch against ``registry``'s tasks. ``sources`` are ``(label, spec
    file path or dict)``; returns the validated specs or raises :class:`CheckErrors` listing
    every problem found."""
    from .editor import check_spec
    from .imageio import check_output
    from .specs import parse_spec

    errors: list[str] = []
    specs = []
    inputs: dict[str, str] = {}
    for label, source in sources:
        try:
            spec = parse_spec(source, base_dir=base_dir, defaults=defaults, source=label,
                              registry=registry)
        except DiffEditorError as exc:
            errors.append(str(exc))
            continue
        try:
            check_spec(spec, registry=registry)
        except DiffEditorError as exc:
            errors.append(f"{label}: {exc}")
            continue
        specs.append(spec)
        if isinstance(source, (str, os.PathLike)):
            inputs.setdefault(_key(Path(source)), f"spec file of {label}")
        for f in _input_files(spec):
            inputs.setdefault(_key(f), f"an input of {label}")

    seen: set[str] = set()
    for out in outputs:
        try:
            check_output(out, getattr(args, "force", False))
        except DiffEditorError as exc:
            errors.append(str(exc))
            continue
        errors += output_clashes(out, inputs, seen, "--out", "names")

    errors += check_options(args)
    if errors:
        raise CheckErrors(errors)
    _warn_slow(specs, sources, args)
    return specs


def output_clashes(out: Path, inputs: dict[str, str], seen: set[str], out_flags: str,
                   names: str) -> list[str]:
    """What is wrong with writing ``out`` and its sidecar: one of the ``inputs`` (real path ->
    what it is), or a path already in ``seen`` (which gets both). ``out_flags`` and ``names``
    name the command's output options and what tells its specs apart, for the hint."""
    errors = []
    twice = False
    for path in (out, out.with_suffix(".json")):
        key = _key(path)
        if key in inputs:
            errors.append(f"{show(path, 200)} is {inputs[key]}; inputs are never "
                          f"overwritten: choose another {out_flags}")
        elif key in seen and not twice:  # the image and its sidecar: one line
            twice = True
            errors.append(f"{show(path, 200)} would be written twice in this batch; give "
                          f"the specs different {names}")
        seen.add(key)
    return errors


def check_options(args) -> list[str]:
    """The model and device options, checked without loading anything."""
    from .editor import check_load_options

    errors = []
    try:
        check_load_options(getattr(args, "model", None), getattr(args, "device", None),
                           getattr(args, "dtype", None),
                           attention_slice=getattr(args, "attention_slice", None),
                           compile=getattr(args, "compile", None))
    except DiffEditorError as exc:
        msg = str(exc).replace("attention_slice must", "--attention-slice must")
        errors.append(msg)
    from .models import parse_lora

    for item in getattr(args, "lora", None) or []:
        try:
            file, _ = parse_lora(item)
        except DiffEditorError as exc:
            errors.append(str(exc))
            continue
        if not Path(file).expanduser().is_file():
            errors.append(f"--lora: file not found: {show(file, 200)}")
    vae = getattr(args, "vae", None)
    if vae is not None and not Path(vae).expanduser().exists():
        errors.append(f"--vae: not found: {show(vae, 200)}")
    config = getattr(args, "config", None)
    if config is not None and not Path(config).expanduser().is_dir():
        errors.append(f"--config: folder not found: {show(config, 200)}")
    weights = getattr(args, "image_prompt_weights", None)
    encoder = getattr(args, "image_prompt_encoder", None)
    if bool(weights) != bool(encoder):
        errors.append("give both --image-prompt-weights and --image-prompt-encoder")
    elif weights and encoder:
        if not Path(weights).is_file():
            errors.append(f"--image-prompt-weights: file not found: {show(weights, 200)}")
        if not Path(encoder).is_dir():
            errors.append(f"--image-prompt-encoder: folder not found: {show(encoder, 200)}")
    return errors


def _warn_slow(specs, sources, args) -> None:
    from .models import resolve_device

    try:
        device = resolve_device(getattr(args, "device", None))
    except DiffEditorError:  # pragma: no cover - checked above
        return
    if device.type != "cpu":
        return
    for spec, (label, _) in zip(specs, sources):
        if spec.resolution is not None and spec.resolution > CPU_RESOLUTION_WARNING:
            print(f"diffeditor: warning: {label}: resolution {spec.resolution} on a CPU takes "
                  "minutes per step; use a GPU or a resolution of at most "
                  f"{CPU_RESOLUTION_WARNING}", file=sys.stderr)
