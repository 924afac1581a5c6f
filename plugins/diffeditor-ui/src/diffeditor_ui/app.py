"""The Gradio page: one tab per registered task, built from :func:`diffeditor_ui.form.task_form`.

Per tab: each image field is an upload box plus a clickable *view* (the image enlarged, with the
masks, numbered handle -> target arrows and the task's preview drawn server-side); a click on
the view places the next point, or, in "select object" mode, asks the segmenter for the
clicked object's mask. Mask fields are brush editors (``gr.ImageEditor``) over their image.
Settings: sliders for bounded numbers, the rest in an "advanced" fold. Run streams a progress
bar (inversion, sampling) and x̂0 previews; cancel stops between steps; the result comes with
its sidecar, a gallery of this session's results and "download spec" (a zip that reproduces
the edit through ``diffeditor edit``).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from . import drawing
from .form import FieldUI, TaskForm, task_form
from .segment import SegmenterError, load_segmenters
from .service import EditCancelled, EditService, cli_message

log = logging.getLogger(__name__)

POINTS_MODE = "place points"
CSS = """
.diffeditor-status textarea {font-family: monospace}
"""


def _seg_mode(mask: str, seg: str) -> str:
    return f"select object -> {mask} ({seg})"


# -- value helpers --------------------------------------------------------------------------------

def editor_mask(value, hw: tuple[int, int] | None) -> np.ndarray | None:
    """The painted mask of an ImageEditor value (any layer's opaque pixels), at ``hw``."""
    if not value:
        return None
    layers = [np.asarray(x) for x in (value.get("layers") or []) if x is not None]
    comp = value.get("composite")
    if comp is not None:  # what the canvas shows: a mask set by the page (examples, segmenters)
        comp = np.asarray(comp)
        if comp.ndim == 3 and comp.shape[2] >= 3:
            painted = (comp[..., 0] == 255) & (comp[..., 1] == 0) & (comp[..., 2] == 255)
            layers.append(np.dstack([np.zeros((*painted.shape, 3), np.uint8), painted.astype(np.uint8) * 255]))
    if not layers:
        return None
    m = np.zeros(layers[0].shape[:2], bool)
    for layer in layers:
        if layer.ndim == 3 and layer.shape[2] == 4:
            m |= layer[..., 3] > 127
        else:
            m |= np.asarray(Image.fromarray(layer).convert("L")) > 127
    if not m.any():
        return None
    if hw is not None and m.shape != tuple(hw):
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((hw[1], hw[0]), Image.NEAREST)) > 127
    return m


def mask_layer(mask: np.ndarray, colour=(255, 0, 255)) -> np.ndarray:
    layer = np.zeros((*mask.shape, 4), np.uint8)
    layer[mask] = (*colour, 255)
    return layer


def editor_value(image: Image.Image | None, mask: np.ndarray | None = None):
    if image is None:
        return None
    bg = np.asarray(image.convert("RGBA"))
    layers = [mask_layer(mask)] if mask is not None else [np.zeros_like(bg)]
    comp = bg.copy()
    if mask is not None:
        comp[mask] = (255, 0, 255, 255)
    return {"background": bg, "layers": layers, "composite": comp}


_VIEW_DIR: Path | None = None


def view_file(view: Image.Image) -> str:
    """A view as a PNG file named by its content, written once and atomically; its path.

    gradio's cache keeps an image returned as a PIL object under a name derived from its
    bytes, and rewrites that file in place every time the same image is returned again (a
    redraw with nothing changed, a click on a mask editor that re-renders the view). A
    browser fetching the file at that moment gets a truncated image. A file path is copied
    into the cache under a temporary name and renamed, and never rewritten when present.
    """
    import io
    import os

    global _VIEW_DIR
    if _VIEW_DIR is None:
        _VIEW_DIR = Path(tempfile.mkdtemp(prefix="diffeditor-ui-views-"))
    buf = io.BytesIO()
    view.save(buf, format="PNG")
    data = buf.getvalue()
    path = _VIEW_DIR / f"{hashlib.sha256(data).hexdigest()}.png"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=_VIEW_DIR, prefix=".view-", suffix=".png")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    return str(path)


class Landmarks:
    """Landmarks of a task's ``landmarks`` preview hint, cached per image content."""

    def __init__(self, detector: str):
        mod, _, fn = detector.partition(":")
        self.detect = getattr(importlib.import_module(mod), fn)
        self.cache: dict[str, Any] = {}

    def __call__(self, image: Image.Image):
        key = hashlib.sha1(image.tobytes()).hexdigest() + str(image.size)
        if key not in self.cache:
            try:
                self.cache[key] = [tuple(map(float, p)) for p in self.detect(image)]
            except Exception as exc:  # no face, no detector: shown as a note
                self.cache[key] = str(exc)
        return self.cache[key]


# -- one tab ------------------------------------------------------------------------------------

class TaskTab:
    def __init__(self, form: TaskForm, service: EditService, segmenters: dict, examples: list):
        self.form = form
        self.service = service
        self.segmenters = segmenters
        self.examples = examples
        self.fields = form.by_name()
        self.comps: dict[str, Any] = {}
        self.views: dict[str, Any] = {}
        self.modes: dict[str, Any] = {}
        self.landmarks = None
        preview = form.hints.get("preview") or {}
        if preview.get("kind") == "landmarks":
            try:
                self.landmarks = Landmarks(preview["detector"])
            except Exception as exc:  # the face extra is optional
                log.warning("landmark preview off: %s", exc)

    # value plumbing: every input component in a fixed order
    def input_components(self) -> list:
        out = []
        for f in self.form.fields:
            if f.kind == "points":  # from the points state, last
                continue
            c = self.comps[f.name]
            out.extend(c if isinstance(c, tuple) else (c,))
        return out + [self.points]

    def values(self, args) -> tuple[dict[str, Any], dict[str, list]]:
        args = list(args)
        vals: dict[str, Any] = {}
        for f in self.form.fields:
            if f.kind == "points":
                continue
            if f.kind == "pair":
                vals[f.name] = [args.pop(0), args.pop(0)]
            else:
                vals[f.name] = args.pop(0)
        points = args.pop(0) or {}
        images = {f.name: vals[f.name] for f in self.form.images()}
        for f in self.form.of_kind("mask"):
            img = images.get(f.on)
            vals[f.name] = editor_mask(vals[f.name], None if img is None else (img.height, img.width))
        for f in self.form.of_kind("points"):
            vals[f.name] = [list(p) for p in points.get(f.name, [])]
        return vals, points

    # -- drawing -------------------------------------------------------------------------------
    def render_views(self, vals: dict[str, Any]) -> list:
        out = []
        groups = self.form.point_groups()
        preview = self.form.hints.get("preview") or {}
        for f in self.form.images():
            img = vals.get(f.name)
            if img is None:
                out.append(None)
                continue
            view, k = drawing.to_view(img)
            for j, m in enumerate(self.form.masks_on(f.name)):
                if vals.get(m) is not None:
                    view = drawing.overlay_mask(view, vals[m], k, drawing.MASK_COLOURS[j % 3])
            kind = preview.get("kind")
            if kind == "move" and f.name == preview.get("on", "image"):
                view = drawing.draw_move(view, vals.get(preview["mask"]), vals.get(preview["offset"]) or (0, 0),
                                         float(vals.get(preview.get("scale", ""), 1.0) or 1.0), k)
            if kind == "paste" and f.name == preview.get("on", "image"):
                ref = vals.get(preview["reference"])
                if ref is not None:
                    view = drawing.paste_preview(view, ref, vals.get(preview["mask"]),
                                                 vals.get(preview["offset"]) or (0, 0),
                                                 float(vals.get(preview.get("scale", ""), 1.0) or 1.0), k)
            if self.landmarks is not None and f.name in preview.get("images", ()):
                pts = self.landmarks(img)
                if isinstance(pts, list):
                    view = drawing.draw_landmarks(view, pts, k)
            if f.name in groups:
                view = drawing.draw_points(view, [vals.get(g) or [] for g in groups[f.name]], k)
            out.append(view_file(view))
        return out

    def landmark_note(self, vals) -> str:
        if self.landmarks is None:
            return ""
        notes = []
        for name in (self.form.hints.get("preview") or {}).get("images", ()):
            img = vals.get(name)
            if img is not None:
                pts = self.landmarks(img)
                notes.append(f"{name}: {len(pts)} landmarks" if isinstance(pts, list) else f"{name}: {pts}")
        return "; ".join(notes)

    # -- building ------------------------------------------------------------------------------
    def build(self):
        form = self.form
        name = form.task
        groups = form.point_groups()
        gr.Markdown(f"**{name}**: {form.description}")
        self.points = gr.State({})
        self.history = gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                for f in form.images():
                    with gr.Group():
                        self.comps[f.name] = gr.Image(
                            label=f"{f.label} — {f.description}", type="pil", image_mode="RGB",
                            sources=["upload", "clipboard"], format="png", height=220,
                            elem_id=f"{name}-{f.name}")
                        choices = ([POINTS_MODE] if f.name in groups else []) + [
                            _seg_mode(m, s) for m in form.masks_on(f.name) for s in self.segmenters]
                        self.views[f.name] = gr.Image(
                            label=f"{f.label}: " + (
                                "click to place " + " -> ".join(groups[f.name]) + " points"
                                if f.name in groups else "click to select an object"
                                if form.masks_on(f.name) else "preview"),
                            interactive=False, format="png", elem_id=f"{name}-{f.name}-view",
                            buttons=[])
                        self.modes[f.name] = gr.Radio(
                            choices, value=choices[0] if choices else None, label="a click on the view will",
                            visible=len(choices) > 1, elem_id=f"{name}-{f.name}-mode")
                        if f.name in groups:
                            with gr.Row():
                                self.undo_btn = gr.Button("undo point", size="sm", elem_id=f"{name}-undo")
                                self.clear_btn = gr.Button("clear points", size="sm", elem_id=f"{name}-clear")
                    for m in form.masks_on(f.name):
                        mf = self.fields[m]
                        self.comps[m] = gr.ImageEditor(
                            label=f"{mf.label} — paint it ({mf.description})", type="numpy",
                            image_mode="RGBA", sources=[], transforms=[], layers=False,
                            brush=gr.Brush(colors=["#ff00ff"], default_color="#ff00ff",
                                           color_mode="fixed", default_size=6),
                            eraser=gr.Eraser(default_size=6), format="png",
                            elem_id=f"{name}-{m}", height=360)
                for f in form.fields:
                    if not f.advanced and f.name not in self.comps and f.kind != "points":
                        self.comps[f.name] = self._scalar(f)
                with gr.Accordion("advanced", open=False, elem_id=f"{name}-advanced"):
                    for f in form.fields:
                        if f.advanced and f.name not in self.comps:
                            self.comps[f.name] = self._scalar(f)
            with gr.Column(scale=2):
                if self.examples:
                    gr.Markdown("examples")
                    with gr.Row():
                        self.example_btns = [gr.Button(label, size="sm", elem_id=f"{name}-example-{k}")
                                             for k, (label, _) in enumerate(self.examples)]
                else:
                    self.example_btns = []
                with gr.Row():
                    self.run_btn = gr.Button("Run", variant="primary", elem_id=f"{name}-run")
                    self.cancel_btn = gr.Button("Cancel", variant="stop", elem_id=f"{name}-cancel")
                self.status = gr.Textbox(label="status", interactive=False, lines=1,
                                         elem_id=f"{name}-status", elem_classes=["diffeditor-status"])
                self.preview = gr.Image(label="x̂0 preview (every few steps)", interactive=False,
                                        format="png", height=200, elem_id=f"{name}-preview", buttons=[])
                self.result = gr.Image(label="result", interactive=False, type="pil", format="png",
                                       elem_id=f"{name}-result")
                self.download = gr.DownloadButton("download spec", value=None, interactive=False,
                                                  elem_id=f"{name}-download")
                self.gallery = gr.Gallery(label="results of this session", columns=4, height=160, object_fit="contain",
                                          format="png", elem_id=f"{name}-gallery")
                with gr.Accordion("sidecar", open=False):
                    self.sidecar = gr.JSON(label="result sidecar", elem_id=f"{name}-sidecar")
        self._wire()

    def _scalar(self, f: FieldUI):
        label = f.label
        info = f.description or None
        eid = f"{self.form.task}-{f.name}"
        if f.kind == "slider":
            return gr.Slider(f.minimum, f.maximum, value=f.default, step=f.step, label=label,
                             info=info, elem_id=eid)
        if f.kind == "number":
            return gr.Number(value=f.default, label=label, info=info, precision=0 if f.integer else None,
                             minimum=f.minimum, maximum=f.maximum, elem_id=eid)
        if f.kind == "choice":
            return gr.Dropdown(f.choices, value=f.default, label=label, info=info, elem_id=eid)
        if f.kind == "bool":
            return gr.Checkbox(value=bool(f.default), label=label, info=info, elem_id=eid)
        if f.kind == "text":
            return gr.Textbox(value=f.default or "", label=label, info=info, elem_id=eid)
        if f.kind == "pair":
            d = f.default or [0.0, 0.0]
            with gr.Row():
                return (gr.Number(value=d[0], label=f"{label} x", info=info, elem_id=f"{eid}-x"),
                        gr.Number(value=d[1], label=f"{label} y", elem_id=f"{eid}-y"))
        import json

        return gr.Code(value=json.dumps(f.default, indent=1) if f.default is not None else "",
                       language="json", label=f"{label} (JSON) — {f.description}", elem_id=eid)

    # -- events --------------------------------------------------------------------------------
    def _wire(self):
        form = self.form
        inputs = self.input_components()
        views = [self.views[f.name] for f in form.images()]

        def redraw(*args):
            vals, _ = self.values(args)
            out = self.render_views(vals)
            return out[0] if len(out) == 1 else out

        for f in form.images():
            masks = form.masks_on(f.name)
            img = self.comps[f.name]
            pts_here = form.point_groups().get(f.name, [])

            def on_new_image(*args, _masks=masks, _pts=pts_here):
                vals, points = self.values(args)
                points = {k: v for k, v in points.items() if k not in _pts}
                for p in _pts:
                    vals[p] = []
                for m in _masks:
                    vals[m] = None
                return [points] + [editor_value(vals[self.fields[m].on]) for m in _masks] + self.render_views(vals)

            outs = [self.points] + [self.comps[m] for m in masks] + views
            img.upload(on_new_image, inputs, outs)
            img.clear(on_new_image, inputs, outs)
            for m in masks:
                self.comps[m].change(redraw, inputs, views, trigger_mode="always_last",
                                     show_progress="hidden")
            self.views[f.name].select(self._click_handler(f.name), inputs + [self.modes[f.name]],
                                      [self.points] + [self.comps[m] for m in masks] + views + [self.status])
        for f in form.of_kind("pair", "slider"):
            c = self.comps[f.name]
            for comp in (c if isinstance(c, tuple) else (c,)):
                comp.change(redraw, inputs, views, trigger_mode="always_last", show_progress="hidden")
        if form.point_groups():
            image_name = next(iter(form.point_groups()))
            pts = form.point_groups()[image_name]

            def undo(*args):
                vals, points = self.values(args)
                order = list(points.get("_order", []))
                if order:
                    last = order.pop()
                    points = {**points, last: points.get(last, [])[:-1], "_order": order}
                    vals[last] = points[last]
                return [points] + self.render_views(vals)

            def clear(*args):
                vals, points = self.values(args)
                points = {"_order": []}
                for p in pts:
                    vals[p] = []
                return [points] + self.render_views(vals)

            self.undo_btn.click(undo, inputs, [self.points] + views)
            self.clear_btn.click(clear, inputs, [self.points] + views)
        for btn, (_, spec_path) in zip(self.example_btns, self.examples):
            btn.click(self._example_loader(spec_path), None,
                      inputs + views + [self.status])
        run_outputs = [self.status, self.preview, self.result, self.download, self.gallery,
                       self.sidecar, self.history]
        self.run_btn.click(self._run, inputs + [self.history], run_outputs,
                           concurrency_limit=1, concurrency_id="edit")
        self.cancel_btn.click(self._cancel, None, None, concurrency_limit=None,
                              concurrency_id="cancel", show_progress="hidden")

    def _click_handler(self, image_name: str):
        form = self.form
        masks = form.masks_on(image_name)
        pts = form.point_groups().get(image_name, [])

        def on_click(*args, evt: Any = None):
            *rest, mode = args
            vals, points = self.values(rest)
            img = vals.get(image_name)
            skip = [None] * len(masks)
            if img is None or evt is None:
                return [points] + [_no_change() for _ in masks] + self.render_views(vals) + ["upload an image first"]
            k = drawing.view_scale(img.size)
            x, y = evt.index[0] / k, evt.index[1] / k
            x, y = round(min(max(x, 0), img.width - 1), 1), round(min(max(y, 0), img.height - 1), 1)
            note = ""
            if mode == POINTS_MODE or (mode is None and pts):
                target = min(pts, key=lambda p: (len(points.get(p, [])), pts.index(p)))
                points = {**points, target: [*points.get(target, []), [x, y]],
                          "_order": [*points.get("_order", []), target]}
                vals[target] = points[target]
                note = f"{target} point {len(points[target])} at ({x:g}, {y:g})"
                updates = [_no_change() for _ in masks]
            else:
                updates = list(skip)
                for j, m in enumerate(masks):
                    for s_name, seg in self.segmenters.items():
                        if mode == _seg_mode(m, s_name):
                            try:
                                reason = seg.unavailable()
                                if reason:
                                    raise SegmenterError(reason)
                                mask = seg.segment(np.asarray(img.convert("RGB")), (x, y))
                            except SegmenterError as exc:
                                note = cli_message(exc)
                                updates = [_no_change() for _ in masks]
                                break
                            vals[m] = mask
                            updates[j] = editor_value(img, mask)
                            note = f"{m}: {int(mask.sum())} pixels selected by {s_name}"
                updates = [u if u is not None else _no_change() for u in updates]
            return [points] + updates + self.render_views(vals) + [note]

        # gradio passes event data to a parameter annotated with SelectData
        def handler(evt: gr.SelectData, *args):  # gradio inserts special arguments by position
            return on_click(*args, evt=evt)

        return handler

    def _example_loader(self, spec_path: Path):
        form = self.form

        def load():
            from diffeditor.specs import read_spec_file

            data = read_spec_file(spec_path)
            base = Path(spec_path).parent
            vals: dict[str, Any] = {}
            out: list = []
            images: dict[str, Image.Image] = {}
            for f in form.images():
                if f.name in data:
                    images[f.name] = Image.open(base / data[f.name]).convert("RGB")
            points: dict[str, Any] = {"_order": []}
            for f in form.fields:
                v = data.get(f.name, f.default)
                if f.kind == "image":
                    v = images.get(f.name)
                    out.append(v)
                elif f.kind == "mask":
                    m = None
                    if f.name in data:
                        m = np.asarray(Image.open(base / data[f.name]).convert("L")) > 127
                    v = m
                    out.append(editor_value(images.get(f.on), m))
                elif f.kind == "points":
                    v = [list(map(float, p)) for p in data.get(f.name, [])]
                    points[f.name] = v
                elif f.kind == "pair":
                    v = list(v or [0, 0])
                    out.extend(v)
                elif f.kind == "json":
                    import json

                    out.append(json.dumps(v, indent=1) if v is not None else "")
                else:
                    out.append(v)
                vals[f.name] = v
            return out + [points] + self.render_views(vals) + [f"example {spec_path.parent.name}/{spec_path.name} loaded"]

        return load

    def _run(self, *args, request: Any = None, progress: Any = None):
        """Placeholder replaced in :meth:`bind_run` (gradio needs the annotations)."""
        raise NotImplementedError

    def _cancel(self, request: Any = None):
        raise NotImplementedError


def _no_change():
    return gr.update()


def bind_handlers(tab: TaskTab):
    """The run and cancel handlers, with the annotations gradio reads (request, progress)."""
    service = tab.service

    def run(request: gr.Request, progress=gr.Progress(), *args):  # noqa: B008 (gradio's idiom)
        *args, history = args
        history = list(history or [])
        vals, _ = tab.values(args)
        session = request.session_hash or "anon"
        folder = service.new_folder()
        nothing = gr.update()
        try:
            spec, names = service.make_spec(tab.form, vals, folder)
        except Exception as exc:
            yield [cli_message(exc), nothing, nothing, nothing, nothing, nothing, history]
            return
        yield ["starting", None, nothing, nothing, nothing, nothing, history]
        events = service.start(spec, session, preview_every=max(1, spec.steps // 5))
        while True:
            ev = events.get()
            if ev[0] == "progress":
                _, desc, done, total = ev
                progress((done, total), desc=desc)
            elif ev[0] == "preview":
                yield [f"sampling: step {ev[1] + 1} of {spec.steps}", ev[2], nothing, nothing,
                       nothing, nothing, history]
            elif ev[0] == "error":
                exc = ev[1]
                msg = (f"cancelled: {exc}" if isinstance(exc, EditCancelled)
                       else cli_message(exc))
                if not isinstance(exc, (EditCancelled,)) and not hasattr(exc, "field"):
                    log.error("edit failed", exc_info=exc)
                yield [msg, nothing, nothing, nothing, nothing, nothing, history]
                return
            else:
                result = ev[1]
                zip_path = service.bundle(spec, names, result, folder)
                meta = result.metadata
                t = meta["timings_s"]
                cached = " (cached inversion)" if meta["inversion_cached"] else ""
                shown = view_file(result.image)  # one file for the result and the gallery
                history = history + [(shown, f"{tab.form.task} {len(history) + 1}")]
                yield [f"done in {t['wall']:.1f} s{cached}: {result.image.width}x{result.image.height}",
                       nothing, shown, gr.update(value=str(zip_path), interactive=True),
                       history, meta, history]
                return

    def cancel(request: gr.Request):
        service.cancel(request.session_hash or "anon")

    tab._run = run
    tab._cancel = cancel


# -- examples -----------------------------------------------------------------------------------

def find_examples(task: str, examples_dir: Path | None, cache: Path) -> list[tuple[str, Path]]:
    """Examples of a task: spec files of ``examples_dir`` whose task matches, then a seeded
    case of the ``shapes`` world where that plugin knows the task."""
    out: list[tuple[str, Path]] = []
    if examples_dir is not None and examples_dir.is_dir():
        from diffeditor.specs import read_spec_file

        for p in sorted(examples_dir.glob("*.y*ml")) + sorted(examples_dir.glob("*.json")):
            try:
                if read_spec_file(p).get("task") == task:
                    out.append((f"{p.stem} (specs)", p))
            except Exception:
                continue
    try:
        from diffeditor_shapes import scenes
    except ImportError:
        return out
    if task in scenes.TASKS:
        for seed in (1, 2):
            try:
                spec = scenes.save_case(scenes.make_case(task, seed, noise=False), cache / f"{task}-{seed}")
            except Exception as exc:  # pragma: no cover - the world builds every listed task
                log.warning("shapes example %s/%s: %s", task, seed, exc)
                continue
            out.append((f"shapes scene {seed}", spec))
    return out


def build_app(service: EditService, segmenters: dict | None = None, examples_dir: Path | None = None,
              registry=None, title: str = "diffeditor"):
    from diffeditor.plugins import get_registry

    reg = registry or get_registry()
    segmenters = segmenters if segmenters is not None else load_segmenters()
    cache = Path(tempfile.mkdtemp(prefix="diffeditor-ui-examples-"))
    defaults = service.editor.defaults()
    tabs: list[TaskTab] = []
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# diffeditor — model `{service.model_name}` on "
                    f"{service.editor.engine.device} · one tab per installed task")
        with gr.Tabs():
            for name in sorted(reg.tasks):
                task = reg.tasks[name]
                form = task_form(task, defaults)
                tab = TaskTab(form, service, segmenters, find_examples(name, examples_dir, cache))
                bind_handlers(tab)
                with gr.Tab(name, id=name, elem_id=f"tab-{name}"):
                    tab.build()
                tabs.append(tab)
    demo.queue(default_concurrency_limit=1)
    demo.diffeditor_tabs = tabs
    return demo


def serve(model: str | None = "shapes", device: str | None = None, dtype: str | None = None,
          host: str = "127.0.0.1", port: int = 7860, out_dir: Path | None = None,
          sam: str | None = None, examples: Path | None = None, block: bool = True):
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from diffeditor.editor import Editor
    from diffeditor.models import quiet_libraries

    quiet_libraries()
    editor = Editor.from_pretrained(model, device=device, dtype=dtype)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="diffeditor-ui-"))
    service = EditService(editor, out, model or "", device)
    if examples is None and Path("specs").is_dir():
        examples = Path("specs")
    segmenters = load_segmenters(sam_path=sam, device=str(editor.engine.device))
    demo = build_app(service, segmenters, examples)
    _, url, _ = demo.launch(server_name=host, server_port=port or None, prevent_thread_lock=True,
                            quiet=True, ssr_mode=False, allowed_paths=[str(out)],
                            show_error=True, css=CSS, theme=gr.themes.Default())
    print(f"diffeditor ui: serving model {model} at {url} (edits kept in {out})", flush=True)
    if block:
        try:
            demo.block_thread()
        except KeyboardInterrupt:
            print("diffeditor ui: stopped", file=sys.stderr)
    return 0
