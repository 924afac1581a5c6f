"""The shared training loop: deterministic batches, checkpoints and bit-exact resume.

Every random draw of a training step (batch indices, noise, timesteps, condition dropping) comes
from one ``torch.Generator`` owned by the loop, so a checkpoint that stores the step, the
trainable weights, the optimizer state and that generator's state (plus torch's global RNG
states, for any module that draws from them) resumes bit-exactly: N steps straight give the same
tensors as k steps, a restart from the checkpoint, and N - k more.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffeditor.errors import DiffEditorError

CHECKPOINT_VERSION = 1


class TrainError(DiffEditorError):
    """Bad training input (one line saying what is wrong and what to do)."""


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        _public(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None], *,
                 replace: bool = True) -> None:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` over ``path``. With ``replace=False``
    the commit is a hard link, which never replaces a file that appeared meanwhile (a
    :class:`TrainError` then)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        _public(tmp)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise TrainError(f"{path} appeared while training; it was left as it is (add "
                                 f"--force to replace it)") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def commit_folder(tmp: Path, out: Path, *, replace: bool) -> None:
    """Rename the finished folder ``tmp`` to ``out``. An existing empty ``out`` is taken; any
    other existing ``out`` only with ``replace`` (``--force``/``--resume``), else a
    :class:`TrainError` and ``out`` is left as it is."""
    import shutil

    mask = os.umask(0)
    os.umask(mask)
    for folder, _, files in os.walk(tmp):  # mkdtemp and some writers make them owner-only
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)
    if out.exists() or out.is_symlink():
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            out.rmdir()
        elif not replace:
            raise TrainError(f"--out {out} exists; add --force to replace it (or choose a new "
                             f"folder)")
        elif out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        else:
            out.unlink()
    tmp.rename(out)


def _public(path: str) -> None:
    """Give a temporary file the usual permissions (mkstemp makes it owner-only)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when ``enabled``; a no-op elsewhere (CPU training is float32)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class LoopResult:
    step: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def train_loop(
    *,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    step_fn: Callable[[torch.Generator], torch.Tensor],
    steps: int,
    seed: int,
    config: dict[str, Any],
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    progress: bool = True,
    desc: str = "training",
    grad_clip: float | None = 1.0,
    on_step: Callable[[int], None] | None = None,
) -> LoopResult:
    """Run ``steps`` optimizer steps of ``loss = step_fn(generator)``.

    Args:
        modules: the trainable modules by name (their state is checkpointed).
        optimizer: over the trainable parameters.
        step_fn: draws its batch and noise from the generator it is given, returns the loss.
        steps: total number of steps (a resumed run continues up to this count).
        seed: seeds the loop's generator (a fresh run only).
        config: the run's settings; a checkpoint is only resumed by a run with the same ones
            (``steps`` may differ).
        checkpoint: file written every ``checkpoint_every`` steps and at the end (atomically).
        resume: continue from ``checkpoint`` (it must exist).
    """
    gen = torch.Generator("cpu").manual_seed(int(seed))
    start, losses = 0, []
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    if resume:
        if checkpoint is None or not Path(checkpoint).is_file():
            raise TrainError(f"--resume: no checkpoint at {checkpoint}; run without --resume first")
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if state.get("version") != CHECKPOINT_VERSION or state.get("config") != config:
            diff = sorted(k for k in set(config) | set(state.get("config", {}))
                          if config.get(k) != state.get("config", {}).get(k))
            raise TrainError(f"--resume: checkpoint {checkpoint} was written with other settings "
                             f"({', '.join(diff) or 'version'}); use the same options or a new "
                             f"--checkpoint")
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if torch.cuda.is_available() and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start, losses = int(state["step"]), list(state["losses"])
        if start > steps:
            raise TrainError(f"--resume: the checkpoint is at step {start}, past --steps {steps}")

    def save(step: int) -> None:
        if checkpoint is None:
            return
        atomic_save({
            "version": CHECKPOINT_VERSION, "config": config, "step": step, "losses": losses,
            "modules": {n: m.state_dict() for n, m in modules.items()},
            "optimizer": optimizer.state_dict(), "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }, checkpoint)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=desc, dynamic_ncols=True)
    t0, c0 = time.perf_counter(), time.process_time()
    smooth = None
    for module in modules.values():
        module.train()
    try:
        for step in range(start, steps):
            optimizer.zero_grad(set_to_none=True)
            loss = step_fn(gen)
            if not torch.isfinite(loss):
                raise TrainError(f"the loss became {loss.item()} at step {step}; lower --lr")
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            value = float(loss.detach())
            losses.append(value)
            smooth = value if smooth is None else 0.98 * smooth + 0.02 * value
            if on_step is not None:
                on_step(step + 1)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{smooth:.4f}")
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                save(step + 1)
    finally:
        if bar is not None:
            bar.close()
    save(steps)
    return LoopResult(step=steps, losses=losses, seconds=time.perf_counter() - t0,
                      cpu_seconds=time.process_time() - c0)


def sample_indices(n: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` dataset indices drawn uniformly (with replacement) from the loop's generator."""
    return torch.randint(0, n, (batch,), generator=gen)


def mean_tail(values: Iterable[float], fraction: float = 0.1) -> float:
    vals = list(values)
    k = max(1, int(math.ceil(len(vals) * fraction)))
    return sum(vals[-k:]) / k
