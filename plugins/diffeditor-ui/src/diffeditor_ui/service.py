"""The editing side of the page, without Gradio: form values -> checked spec -> edit on the
loaded model with progress, x̂0 previews and cancel -> a bundle that reproduces it.

A bundle is a folder (and its zip) holding the inputs as PNG files, ``spec.json`` (the full
validated spec, paths relative to it), ``result.png`` with its sidecar ``result.json``, and
``command.txt``: the ``diffeditor edit`` line that reproduces ``result.png``.
"""

from __future__ import annotations

import json
import queue
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffeditor.editor import check_spec
from diffeditor.errors import DiffEditorError
from diffeditor.imageio import save_image, to_pil
from diffeditor.specs import parse_spec

from .form import TaskForm, relative_spec, spec_data


class EditCancelled(DiffEditorError):
    """The user pressed cancel; the edit stopped between two steps."""


def cli_message(exc: BaseException) -> str:
    """The one line the command line prints for a user error."""
    return f"diffeditor: error: {exc}"


class EditService:
    """One loaded model; edits run one at a time (the page's queue also allows one)."""

    def __init__(self, editor, out_dir: Path, model_name: str, device: str | None = None):
        self.editor = editor
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.model_name = model_name
        self.device = device
        self.lock = threading.Lock()
        self._cancel: dict[str, threading.Event] = {}

    # -- inputs -> spec ----------------------------------------------------------------------
    def new_folder(self) -> Path:
        folder = self.out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        folder.mkdir(parents=True)
        return folder

    def make_spec(self, form: TaskForm, values: dict[str, Any], folder: Path):
        """Write the image and mask values into ``folder`` and validate the spec as the command
        line does (same messages). Image values: PIL images; mask values: bool arrays."""
        names: dict[str, str] = {}
        data_values = dict(values)
        for f in form.fields:
            v = values.get(f.name)
            if f.kind in ("image", "mask") and v is not None:
                name = f"{f.name}.png"
                if f.kind == "mask":
                    v = Image.fromarray(np.asarray(v, dtype=np.uint8) * 255)
                v.save(folder / name)
                names[f.name] = name
                data_values[f.name] = name
        data = spec_data(form, data_values)
        defaults = self.editor.defaults()
        spec = parse_spec(data, base_dir=folder, defaults=defaults, source="page")
        check_spec(spec)
        return spec, names

    # -- running -----------------------------------------------------------------------------
    def cancel(self, session: str) -> None:
        ev = self._cancel.get(session)
        if ev is not None:
            ev.set()

    def start(self, spec, session: str, preview_every: int = 5) -> queue.Queue:
        """Start the edit in a thread; returns a queue of events: ``("progress", desc, done,
        total)``, ``("preview", step, image)``, then ``("done", result)`` or ``("error", exc)``."""
        events: queue.Queue = queue.Queue()
        cancel = threading.Event()
        self._cancel[session] = cancel
        engine = self.editor.engine

        class Bar:
            def __init__(self, total, desc):
                self.total, self.desc, self.n = total, desc, 0
                events.put(("progress", desc, 0, total))

            def update(self, k=1):
                self.n += k
                events.put(("progress", self.desc, self.n, self.total))

            def close(self):
                pass

        steps = spec.steps

        def on_step(i, z, x0):
            if cancel.is_set():
                raise EditCancelled(f"cancelled after step {i} of {steps}")
            if (i + 1) % max(1, preview_every) == 0 or i == steps - 1:
                img = to_pil(engine.decode(x0))
                events.put(("preview", i, img))

        def work():
            with self.lock:
                try:
                    result = self.editor.edit(spec, progress=Bar, callback=on_step)
                    events.put(("done", result))
                except BaseException as exc:  # reported in the page, the server keeps serving
                    events.put(("error", exc))
                finally:
                    self._cancel.pop(session, None)

        threading.Thread(target=work, daemon=True, name="diffeditor-edit").start()
        return events

    # -- outputs -----------------------------------------------------------------------------
    def bundle(self, spec, names: dict[str, str], result, folder: Path) -> Path:
        """Write spec.json, result.png/json and command.txt into ``folder``; return its zip."""
        data = relative_spec(spec, names)
        (folder / "spec.json").write_text(json.dumps(data, indent=2) + "\n")
        result.save(folder / "result.png", force=True)
        dev = f" --device {self.device}" if self.device else ""
        (folder / "command.txt").write_text(
            f"diffeditor edit spec.json --model {self.model_name}{dev} --out again.png\n"
            "# again.png equals result.png (same model, device and dtype)\n")
        zip_base = folder.parent / f"{folder.name}-spec"
        return Path(shutil.make_archive(str(zip_base), "zip", root_dir=folder))


def save_result(image: Image.Image, path: Path) -> Path:
    return save_image(image, path, force=True)
