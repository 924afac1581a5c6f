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

from diffeditor.errors import DiffEditorError

from . import drawing
from .form import OFF, FieldUI, TaskForm, plain_error, show_optional, task_form
from .segment import SegmenterError, load_segmenters
from .service import EditCancelled, EditService

log = logging.getLogger(__name__)

POINTS_MODE = "place points"
DEST_MODE = "set the destination (click or drag)"
COMPARE = ["after (result)", "before (input)"]
VIEW_HEIGHT = 540  # the input views and the result: one displayed size
CSS = """
.diffeditor-status textarea {font-family: monospace}
.diffeditor-view img {-webkit-user-drag: none; user-select: none}
.diffeditor-gallery img {object-fit: contain !important}
.diffeditor-progress {display: flex; gap: .6em; align-items: center; font-size: .9em}
.diffeditor-progress progress {flex: 1; height: 1em}
"""

# Frees the WebGL context of every canvas the page removes (a brush editor unmounted when its
# tab is left): a context is otherwise held until garbage collection, and past about 16 the
# browser drops the oldest live one ("Too many active WebGL contexts"), blanking an editor.
HEAD = """<script>
(() => {
  const get = HTMLCanvasElement.prototype.getContext;
  HTMLCanvasElement.prototype.getContext = function (type, ...rest) {
    const ctx = get.call(this, type, ...rest);
    if (ctx && /^(webgl2?|experimental-webgl)$/.test(type)) this.__diffeditorGL = ctx;
    return ctx;
  };
  const free = (node) => {
    if (!(node instanceof Element)) return;
    const canvases = node.tagName === "CANVAS" ? [node] : node.querySelectorAll("canvas");
    for (const c of canvases) {
      const gl = c.__diffeditorGL;
      if (gl && !c.isConnected) {
        c.__diffeditorGL = null;
        const ext = gl.getExtension("WEBGL_lose_context");
        if (ext) ext.loseContext();
      }
    }
  };
  const watch = () => new MutationObserver((records) => {
    for (const r of records) for (const n of r.removedNodes) free(n);
  }).observe(document.body, {childList: true, subtree: true});
  if (document.body) watch(); else document.addEventListener("DOMContentLoaded", watch);
})();
</script>"""


def progress_html(phase: str | None, done: int = 0, total: int = 0) -> str:
    """The progress bar over inversion and sampling: one phase at a time, its steps."""
    if phase == "done":
        return '<div class="diffeditor-progress" data-phase="done"><progress value="1" max="1"></progress><span>done</span></div>'
    if phase is None:
        return '<div class="diffeditor-progress" data-phase="idle"><progress value="0" max="1"></progress><span>idle</span></div>'
    return (f'<div class="diffeditor-progress" data-phase="{phase}" data-done="{done}" data-total="{total}">'
            f'<progress value="{done}" max="{max(total, 1)}"></progress>'
            f'<span>{phase}: step {done} of {total}</span></div>')


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
    def build(self, editors_visible: bool = True):
        """The tab's components. Input side (left): each image's upload box and clickable view,
        its mask editors, the settings. Output side (right, as wide): run, progress, and the
        result at the main view's displayed size with a before/after toggle."""
        form = self.form
        name = form.task
        groups = form.point_groups()
        dest_on = self.dest_image()
        gr.Markdown(f"**{name}**: {form.description}")
        self.points = gr.State({})
        self.history = gr.State([])
        self.shown = gr.State({})  # "after"/"before" -> the result's and the input's view files
        self.editors: list = []
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                for f in form.images():
                    with gr.Group():
                        self.comps[f.name] = gr.Image(
                            label=f"{f.label}: upload or paste a picture"
                            + (f" ({f.description})" if f.description else ""),
                            type="pil", image_mode="RGB",
                            sources=["upload", "clipboard"], format="png", height=180,
                            elem_id=f"{name}-{f.name}")
                        choices = ([POINTS_MODE] if f.name in groups else []) + [
                            _seg_mode(m, s) for m in form.masks_on(f.name) for s in self.segmenters]
                        if f.name == dest_on:
                            choices.append(DEST_MODE)
                        how = []
                        if f.name in groups:
                            how.append("click to place " + " -> ".join(groups[f.name]) + " points")
                        elif form.masks_on(f.name):
                            how.append("click to select an object")
                        if f.name == dest_on:
                            how.append("click or drag to set where the object goes")
                        self.views[f.name] = gr.Image(
                            label=f"{f.label}: " + ("; ".join(how) or "preview"),
                            interactive=False, format="png", elem_id=f"{name}-{f.name}-view",
                            height=VIEW_HEIGHT, buttons=[], elem_classes=["diffeditor-view"])
                        self.modes[f.name] = gr.Radio(
                            choices, value=choices[0] if choices else None, label="a click on the view will",
                            visible=len(choices) > 1, elem_id=f"{name}-{f.name}-mode")
                        if f.name in groups:
                            with gr.Row():
                                self.undo_btn = gr.Button("undo point", size="sm", elem_id=f"{name}-undo")
                                self.clear_btn = gr.Button("clear points", size="sm", elem_id=f"{name}-clear")
                    for m in form.masks_on(f.name):
                        mf = self.fields[m]
                        # shown only while its tab is: a browser keeps few WebGL contexts (see
                        # build_app), each editor holds some
                        self.comps[m] = gr.ImageEditor(
                            label=f"{mf.label} — paint it ({mf.description})", type="numpy",
                            image_mode="RGBA", sources=[], transforms=[], layers=False,
                            brush=gr.Brush(colors=["#ff00ff"], default_color="#ff00ff",
                                           color_mode="fixed", default_size=6),
                            eraser=gr.Eraser(default_size=6), format="png",
                            elem_id=f"{name}-{m}", height=360, visible=editors_visible)
                        self.editors.append(self.comps[m])
                for f in form.fields:
                    if not f.advanced and f.name not in self.comps and f.kind != "points":
                        self.comps[f.name] = self._scalar(f)
                with gr.Accordion("advanced", open=False, elem_id=f"{name}-advanced"):
                    for f in form.fields:
                        if f.advanced and f.name not in self.comps:
                            self.comps[f.name] = self._scalar(f)
            with gr.Column(scale=1):
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
                self.progress = gr.HTML(progress_html(None), elem_id=f"{name}-progress")
                self.status = gr.Textbox(label="status", interactive=False, lines=1,
                                         elem_id=f"{name}-status", elem_classes=["diffeditor-status"])
                self.result = gr.Image(label="result (shown at the input view's size)", interactive=False,
                                       format="png", height=VIEW_HEIGHT, elem_id=f"{name}-result",
                                       elem_classes=["diffeditor-view"])
                with gr.Row():
                    self.compare = gr.Radio(COMPARE, value=COMPARE[0], label="show", elem_id=f"{name}-compare",
                                            scale=2)
                    self.download = gr.DownloadButton("download spec", value=None, interactive=False,
                                                      elem_id=f"{name}-download", scale=1)
                self.preview = gr.Image(label="x̂0 preview (every few steps)", interactive=False,
                                        format="png", height=200, elem_id=f"{name}-preview", buttons=[])
                self.gallery = gr.Gallery(label="results of this session", columns=4, height=180, object_fit="contain",
                                          format="png", elem_id=f"{name}-gallery",
                                          elem_classes=["diffeditor-gallery"])
                with gr.Accordion("sidecar", open=False):
                    self.sidecar = gr.JSON(label="result sidecar", elem_id=f"{name}-sidecar")
        self._wire()

    def dest_image(self) -> str | None:
        """The image whose view sets the destination by click or drag (move, resize, paste)."""
        preview = self.form.hints.get("preview") or {}
        if preview.get("kind") in ("move", "paste") and preview.get("offset") in self.fields:
            return preview.get("on", "image")
        return None

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
        if f.kind == "optional":  # unset shows "off", not 0
            return gr.Textbox(value=show_optional(f.default), label=f"{label} (a number, or {OFF})",
                              info=info, elem_id=eid)
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
                                      [self.points] + [self.comps[m] for m in masks] + views + [self.status]
                                      + self._dest_outputs(f.name) + [self.modes[f.name]])
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
                       self.sidecar, self.history, self.progress, self.shown, self.compare]
        self.compare.change(lambda choice, shown: (shown or {}).get(choice, gr.update()),
                            [self.compare, self.shown], [self.result], show_progress="hidden")
        self.run_btn.click(self._run, inputs + [self.history], run_outputs,
                           concurrency_limit=1, concurrency_id="edit", show_progress="hidden")
        self.cancel_btn.click(self._cancel, None, None, concurrency_limit=None,
                              concurrency_id="cancel", show_progress="hidden")

    def _dest_outputs(self, image_name: str) -> list:
        """The offset fields a click on this view sets (x, y), if it sets the destination."""
        if image_name != self.dest_image():
            return []
        return list(self.comps[(self.form.hints.get("preview") or {})["offset"]])

    def destination(self, vals: dict[str, Any], x: float, y: float):
        """The offset that puts the object's centre at image pixel (x, y), or a note why not."""
        preview = self.form.hints.get("preview") or {}
        mask = vals.get(preview["mask"])
        label = self.fields[preview["mask"]].label
        if mask is None or not mask.any():
            return None, f"{label}: paint or select the object first, then click where it goes"
        cx, cy = drawing.centroid(mask)
        if preview["kind"] == "paste":  # the reference's mask, in the edited image's pixels
            img = vals.get(preview.get("on", "image"))
            cx, cy = cx * img.width / mask.shape[1], cy * img.height / mask.shape[0]
        return (round(x - cx, 1), round(y - cy, 1)), ""

    def _click_handler(self, image_name: str):
        form = self.form
        masks = form.masks_on(image_name)
        pts = form.point_groups().get(image_name, [])
        dest = self._dest_outputs(image_name)
        preview = form.hints.get("preview") or {}

        def on_click(*args, evt: Any = None):
            *rest, mode = args
            vals, points = self.values(rest)
            img = vals.get(image_name)
            skip = [None] * len(masks)
            keep_dest = [_no_change() for _ in dest]
            if img is None or evt is None:
                return ([points] + [_no_change() for _ in masks] + self.render_views(vals)
                        + ["upload an image first"] + keep_dest + [_no_change()])
            k = drawing.view_scale(img.size)
            x, y = evt.index[0] / k, evt.index[1] / k
            x, y = round(min(max(x, 0), img.width - 1), 1), round(min(max(y, 0), img.height - 1), 1)
            note = ""
            new_mode = _no_change()
            if dest and (mode == DEST_MODE or mode is None):
                offset, note = self.destination(vals, x, y)
                updates = [_no_change() for _ in masks]
                if offset is not None:
                    vals[preview["offset"]] = list(offset)
                    keep_dest = list(offset)
                    note = f"destination ({x:g}, {y:g}): offset {offset[0]:g}, {offset[1]:g}"
            elif mode == POINTS_MODE or (mode is None and pts):
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
                                note = f"error: {exc}"
                                updates = [_no_change() for _ in masks]
                                break
                            vals[m] = mask
                            updates[j] = editor_value(img, mask)
                            note = f"{m}: {int(mask.sum())} pixels selected by {s_name}"
                            if dest and m == preview.get("mask"):  # next: where it goes
                                new_mode = DEST_MODE
                                note += "; now click or drag where it goes"
                updates = [u if u is not None else _no_change() for u in updates]
            return [points] + updates + self.render_views(vals) + [note] + keep_dest + [new_mode]

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
                elif f.kind == "optional":
                    out.append(show_optional(v))
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

    def run(request: gr.Request, *args):
        *args, history = args
        history = list(history or [])
        vals, _ = tab.values(args)
        session = request.session_hash or "anon"
        nothing = gr.update()

        def out(status, bar=nothing, preview=nothing, result=nothing, download=nothing, gallery=nothing,
                sidecar=nothing, shown=nothing, compare=nothing):
            return [status, preview, result, download, gallery, sidecar, history, bar, shown, compare]

        folder = service.new_folder()
        try:
            spec, names = service.make_spec(tab.form, vals, folder)
        except Exception as exc:
            if not isinstance(exc, DiffEditorError):
                log.error("bad form", exc_info=exc)
            yield out(f"error: {plain_error(exc, tab.form)}", progress_html(None))
            return
        yield out("starting", preview=None)
        events = service.start(spec, session, preview_every=max(1, spec.steps // 5))
        while True:
            ev = events.get()
            if ev[0] == "progress":
                _, desc, done, total = ev
                phase = "sampling" if desc == "editing" else desc
                yield out(f"{phase}: step {done} of {total}", progress_html(phase, done, total))
            elif ev[0] == "preview":
                yield out(f"sampling: step {ev[1] + 1} of {spec.steps}", preview=ev[2])
            elif ev[0] == "error":
                exc = ev[1]
                msg = (f"cancelled: {exc}" if isinstance(exc, EditCancelled)
                       else f"error: {plain_error(exc, tab.form)}")
                if not isinstance(exc, (EditCancelled,)) and not hasattr(exc, "field"):
                    log.error("edit failed", exc_info=exc)
                yield out(msg)
                return
            else:
                result = ev[1]
                zip_path = service.bundle(spec, names, result, folder)
                meta = result.metadata
                t = meta["timings_s"]
                cached = " (cached inversion)" if meta["inversion_cached"] else ""
                # the result enlarged as the input's view is (same factor, nearest: its pixels
                # stay exact), so that both show at one size; "before" is the input's view
                after = view_file(drawing.to_view(result.image)[0])
                source = vals.get(tab.form.images()[0].name)
                before = view_file(drawing.to_view(source)[0]) if source is not None else after
                history = history + [(after, f"{tab.form.task} {len(history) + 1}")]
                yield out(f"done in {t['wall']:.1f} s{cached}: {result.image.width}x{result.image.height}",
                          progress_html("done", 1, 1), result=after,
                          download=gr.update(value=str(zip_path), interactive=True), gallery=history,
                          sidecar=meta, shown={COMPARE[0]: after, COMPARE[1]: before}, compare=COMPARE[0])
                return

    def cancel(request: gr.Request):
        service.cancel(request.session_hash or "anon")

    tab._run = run
    tab._cancel = cancel


# -- examples -----------------------------------------------------------------------------------

EXAMPLES_GROUP = "diffeditor_ui.examples"


def _example_items(items, where: str) -> list[tuple[str, Path]]:
    out = []
    for item in items or ():
        label, path = item if isinstance(item, (tuple, list)) else (Path(item).stem, item)
        path = Path(path)
        if not path.is_file():
            log.warning("%s: example spec %s is not a file", where, path)
            continue
        out.append((str(label), path))
    return out


def plugin_examples(task, cache: Path) -> list[tuple[str, Path]]:
    """Examples a plugin ships for a task: the task's ``ui_examples`` attribute (spec files, or
    ``(label, spec file)`` pairs, or a callable ``(folder) -> those`` that may write them into
    ``folder``), then every ``diffeditor_ui.examples`` entry point (a callable ``(task name,
    folder) -> those``, for a distribution with examples for tasks it does not define)."""
    from importlib.metadata import entry_points

    out: list[tuple[str, Path]] = []
    items = getattr(task, "ui_examples", None)
    try:
        if callable(items):
            folder = cache / f"task-{task.name}"
            folder.mkdir(parents=True, exist_ok=True)
            items = items(folder)
        out += _example_items(items, f"task {task.name}")
    except Exception as exc:  # a broken plugin costs its examples, not the page
        log.warning("task %s: ui_examples: %s", task.name, exc)
    for ep in entry_points(group=EXAMPLES_GROUP):
        try:
            folder = cache / f"ep-{ep.name}-{task.name}"
            folder.mkdir(parents=True, exist_ok=True)
            out += _example_items(ep.load()(task.name, folder), f"{EXAMPLES_GROUP} {ep.name}")
        except Exception as exc:
            log.warning("%s %s: %s", EXAMPLES_GROUP, ep.name, exc)
    return out


def find_examples(task: str, examples_dir: Path | None, cache: Path, task_obj=None) -> list[tuple[str, Path]]:
    """Examples of a task: spec files of ``examples_dir`` whose task matches, those its plugins
    ship (:func:`plugin_examples`), then a seeded case of the ``shapes`` world where that plugin
    knows the task."""
    out: list[tuple[str, Path]] = []
    if examples_dir is not None and examples_dir.is_dir():
        from diffeditor.specs import read_spec_file

        for p in sorted(examples_dir.glob("*.y*ml")) + sorted(examples_dir.glob("*.json")):
            try:
                if read_spec_file(p).get("task") == task:
                    out.append((f"{p.stem} (specs)", p))
            except Exception:
                continue
    if task_obj is not None:
        out += plugin_examples(task_obj, cache)
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


def _show_editors_of(tab: TaskTab, editors: list) -> Any:
    """The tab-select handler: this tab's editors shown, with their masks painted again (an
    editor mounted anew shows only its background), every other editor hidden."""

    def show(*values):
        mine = dict(zip(map(id, tab.editors), values))
        out = []
        for t, ed in editors:
            if t is not tab:
                out.append(gr.update(visible=False))
                continue
            value = mine[id(ed)]
            bg = value.get("background") if isinstance(value, dict) else None
            if bg is None:
                out.append(gr.update(visible=True))
                continue
            out.append(gr.update(visible=True, value=editor_value(Image.fromarray(np.asarray(bg)),
                                                                  editor_mask(value, None))))
        return out

    return show


def build_app(service: EditService, segmenters: dict | None = None, examples_dir: Path | None = None,
              registry=None, title: str = "diffeditor", tasks: list[str] | None = None):
    """The page. ``tasks``: the tabs to show (default: every registered task)."""
    from diffeditor.errors import UsageError
    from diffeditor.plugins import get_registry

    reg = registry or get_registry()
    names = sorted(reg.tasks) if not tasks else list(dict.fromkeys(tasks))
    unknown = [n for n in names if n not in reg.tasks]
    if unknown:
        raise UsageError(f"--tasks: no task named {', '.join(unknown)}; installed: {', '.join(sorted(reg.tasks))}")
    segmenters = segmenters if segmenters is not None else load_segmenters()
    cache = Path(tempfile.mkdtemp(prefix="diffeditor-ui-examples-"))
    defaults = service.editor.defaults()
    tabs: list[TaskTab] = []
    gtabs = []
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# diffeditor — model `{service.model_name}` on "
                    f"{service.editor.engine.device} · one tab per installed task")
        with gr.Tabs():
            for i, name in enumerate(names):
                task = reg.tasks[name]
                form = task_form(task, defaults)
                tab = TaskTab(form, service, segmenters, find_examples(name, examples_dir, cache, task))
                bind_handlers(tab)
                with gr.Tab(name, id=name, elem_id=f"tab-{name}") as gtab:
                    tab.build(editors_visible=i == 0)
                tabs.append(tab)
                gtabs.append(gtab)
        # A browser keeps about 16 WebGL contexts per page and silently drops the oldest
        # beyond that; every brush editor holds some. A visited tab stays mounted, so a tour
        # of the tabs used to blank the first editors. Only the selected tab's editors are
        # shown (mounted); the others are unmounted, which frees their contexts, and keep
        # their values for when their tab comes back.
        editors = [(tab, ed) for tab in tabs for ed in tab.editors]
        if editors:
            for tab, gtab in zip(tabs, gtabs):
                gtab.select(_show_editors_of(tab, editors), tab.editors, [ed for _, ed in editors],
                            show_progress="hidden", concurrency_limit=None, concurrency_id="tabs")
    demo.queue(default_concurrency_limit=1)
    demo.diffeditor_tabs = tabs
    return demo


def serve(model: str | None = "shapes", device: str | None = None, dtype: str | None = None,
          host: str = "127.0.0.1", port: int = 7860, out_dir: Path | None = None,
          sam: str | None = None, examples: Path | None = None, block: bool = True,
          tasks: list[str] | None = None):
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from diffeditor.editor import Editor
    from diffeditor.models import quiet_libraries

    quiet_libraries()
    editor = Editor.from_pretrained(model, device=device, dtype=dtype)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="diffeditor-ui-"))
    service = EditService(editor, out, model or "", device, dtype)
    if examples is None and Path("specs").is_dir():
        examples = Path("specs")
    segmenters = load_segmenters(sam_path=sam, device=str(editor.engine.device))
    demo = build_app(service, segmenters, examples, tasks=tasks)
    for attempt in range(3):
        try:
            _, url, _ = demo.launch(server_name=host, server_port=port or None, prevent_thread_lock=True,
                                    quiet=True, ssr_mode=False, allowed_paths=[str(out)],
                                    show_error=True, css=CSS, head=HEAD, theme=gr.themes.Default())
            break
        except ValueError as exc:
            # gradio's one 3-s look at its own page fails on a busy machine: try again
            if "localhost is not accessible" not in str(exc) or attempt == 2:
                raise
            log.warning("the page did not answer gradio's check in time; starting again")
            demo.close()
    print(f"diffeditor ui: serving model {model} at {url} (edits kept in {out})", flush=True)
    if block:
        try:
            demo.block_thread()
        except KeyboardInterrupt:
            print("diffeditor ui: stopped", file=sys.stderr)
    return 0
