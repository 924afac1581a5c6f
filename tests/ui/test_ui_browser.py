"""``diffeditor ui`` in a real browser: the server is started as a user would (``diffeditor ui``
on the ``shapes`` model), and Debian's headless Chromium (through Playwright, pointed at
``/usr/bin/chromium``) clicks, paints and downloads as a user would.

Run alone with ``pytest -m browser``. Skips with a reason when the ui plugin, Playwright,
Chromium or the shapes model is missing (``.ci/run`` installs all of them). Set
``DIFFEDITOR_UI_SCREENSHOTS=docs/ui`` to (re)write the README's screenshots of each tab.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = os.environ.get("DIFFEDITOR_CHROMIUM", "/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
BUILT_IN = ("appearance", "compose", "drag", "face", "move", "paste", "resize")
STEPS = 4  # few DDIM steps: each 128-px edit takes a few seconds on a CPU
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}

# a third party's task plugin, "installed" as a distribution on PYTHONPATH (a .dist-info with
# entry points, as pip would leave it): the ui knows nothing about it
THIRD_PARTY = '''
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from diffeditor.hookspecs import hookimpl
from diffeditor.imageio import load_mask, mask_tensor
from diffeditor.interfaces import AttentionPolicy, EditPlan, Task
from diffeditor.specs import EditSpec, path_validators


class ReviveSpec(EditSpec):
    """Re-sample the painted area (regional SDE only)."""

    task: Literal["revive"] = "revive"
    area_mask: Path = Field(description="the area to re-sample: white")
    noise_level: float = Field(0.7, ge=0.0, le=1.0, description="eta inside the area")

    resolve_paths, check_paths = path_validators("area_mask")


class ReviveTask(Task):
    name, version, spec_model = "revive", "0.1", ReviveSpec
    description = "re-sample a painted area (a test-only third-party plugin)"
    # the documented attribute: spec files (or (label, spec file) pairs) the page offers
    ui_examples = [("revive a square", Path(__file__).with_name("revive_example") / "spec.json")]

    def plan(self, spec, images, geom):
        m = mask_tensor(load_mask(spec.area_mask, "area_mask", geom.input_hw), geom.work_hw)
        lat = (torch.nn.functional.interpolate(m, size=geom.latent_hw, mode="area") > 0).float()
        return EditPlan(images={"source": images["source"]}, prompts={"source": spec.prompt},
                        regions={"edit": lat}, energies=[], sde_mask=lat,
                        attention=AttentionPolicy(mode="off"), masks={"area": m})


@hookimpl
def register_tasks(register):
    register(ReviveTask())
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _third_party(folder: Path) -> Path:
    (folder / "revive_task.py").write_text(textwrap.dedent(THIRD_PARTY))
    ex = folder / "revive_example"
    ex.mkdir()
    shutil.copy(REPO / "specs/assets/move/source.png", ex / "source.png")
    area = np.zeros((128, 128), np.uint8)
    area[40:80, 40:80] = 255
    Image.fromarray(area).save(ex / "area.png")
    (ex / "spec.json").write_text(json.dumps({"task": "revive", "image": "source.png", "area_mask": "area.png",
                                              "noise_level": 0.5}))
    dist = folder / "diffeditor_revive-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: diffeditor-revive\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[diffeditor]\nrevive = revive_task\n")
    return folder


def _serve(tmp: Path, args: list[str], env: dict):
    """``diffeditor ui ARGS`` on a free port, as a user starts it; yields its URL and log."""
    port = _free_port()
    exe = Path(sys.executable).with_name("diffeditor")
    proc = subprocess.Popen([str(exe), "ui", "--port", str(port), *args], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import threading

    seen: list[str] = []
    started = threading.Event()
    t0 = time.monotonic()

    def read():  # the server's output, until it ends; the URL line sets `started`
        for line in proc.stdout:
            seen.append(line)
            if "serving model shapes at" in line:
                started.set()

    threading.Thread(target=read, daemon=True).start()
    if not started.wait(300):
        proc.kill()
        pytest.fail("diffeditor ui did not start within 300 s:\n" + "".join(seen[-30:]))
    url = re.search(r"serving model shapes at (http://\S+)", "".join(seen)).group(1)
    try:
        yield {"url": url, "tmp": tmp, "env": env, "startup_s": time.monotonic() - t0, "log": seen}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _needs():
    pytest.importorskip("diffeditor_ui", reason="the ui plugin is not installed (pip install ./plugins/diffeditor-ui)")
    pytest.importorskip("playwright", reason="playwright is not installed")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    from diffeditor.plugins import get_registry

    if "shapes" not in get_registry().models:
        pytest.skip("diffeditor-shapes is not installed")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Every installed task plus a third party's, on the CPU."""
    _needs()
    tmp = tmp_path_factory.mktemp("ui")
    (tmp / "site").mkdir()
    plugin_dir = _third_party(tmp / "site")
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join(
        [str(plugin_dir), *filter(None, [os.environ.get("PYTHONPATH")])])}
    yield from _serve(tmp, ["--device", "cpu", "--out-dir", str(tmp / "edits"), "--examples", str(REPO / "specs")],
                      env)


@pytest.fixture(scope="module")
def builtin_server(tmp_path_factory):
    """The page a user of the built-in tasks sees (the README's screenshots): only their tabs,
    started without --device (the best available one)."""
    _needs()
    tmp = tmp_path_factory.mktemp("ui-builtin")
    yield from _serve(tmp, ["--tasks", ",".join(BUILT_IN), "--out-dir", str(tmp / "edits"),
                            "--examples", str(REPO / "specs")], {**os.environ, **ENV})


@pytest.fixture(scope="module")
def browser():
    _needs()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    pg = _open_page(browser, server)
    yield pg
    pg.context.close()


def _open_page(browser, server):
    ctx = browser.new_context(viewport={"width": 1300, "height": 1900}, accept_downloads=True)
    pg = ctx.new_page()
    pg.set_default_timeout(60_000)
    pg.console_lines = []  # what the page logs (WebGL warnings)
    pg.on("console", lambda m: pg.console_lines.append(m.text))
    pg.goto(server["url"])
    pg.get_by_role("tab", name="drag").wait_for()
    return pg


# -- helpers ------------------------------------------------------------------------------------

def open_tab(page, name):
    page.get_by_role("tab", name=name, exact=True).click()
    page.locator(f"#{name}-run").wait_for(state="visible")


def status(page, task) -> str:
    return page.input_value(f"#{task}-status textarea")


def wait_status(page, task, pattern: str, timeout=120_000) -> str:
    page.wait_for_function(
        "([sel, pat]) => new RegExp(pat).test(document.querySelector(sel).value)",
        arg=[f"#{task}-status textarea", pattern], timeout=timeout)
    return status(page, task)


def set_number(page, elem_id, value):
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")
    page.wait_for_timeout(300)


def picture_box(page, elem_id) -> dict:
    """Where the picture of the ``img`` in ``elem_id`` is drawn (its box less the margins that
    ``object-fit: contain`` leaves)."""
    img = page.locator(f"#{elem_id} img").first
    img.wait_for(state="visible")
    page.wait_for_function("(el) => el.complete && el.naturalWidth > 0", arg=img.element_handle())
    box = img.bounding_box()
    nw, nh = img.evaluate("el => [el.naturalWidth, el.naturalHeight]")
    if img.evaluate("el => getComputedStyle(el).objectFit") in ("contain", "scale-down"):
        k = min(box["width"] / nw, box["height"] / nh)
        w, h = nw * k, nh * k
        box = {"x": box["x"] + (box["width"] - w) / 2, "y": box["y"] + (box["height"] - h) / 2,
               "width": w, "height": h}
    return box


def click_image_px(page, elem_id, x, y, size=128):
    """Click the view ``elem_id`` at image pixel ``(x, y)`` of a ``size``-px image."""
    box = picture_box(page, elem_id)
    page.mouse.click(box["x"] + (x + 0.5) / size * box["width"], box["y"] + (y + 0.5) / size * box["height"])


def paint(page, elem_id, strokes):
    """Brush strokes on an ImageEditor: each a list of (fx, fy) fractions of its canvas."""
    canvas = page.locator(f"#{elem_id} canvas").first
    canvas.wait_for(state="visible")
    box = canvas.bounding_box()
    for stroke in strokes:
        (x0, y0), *rest = stroke
        page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
        page.mouse.down()
        for fx, fy in rest:
            page.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"], steps=8)
        page.mouse.up()
    page.wait_for_timeout(800)


def magenta_pixels(page, elem_id) -> int:
    """Pixels of the brush's colour in a screenshot of the editor ``elem_id``."""
    shot = np.asarray(Image.open(io.BytesIO(page.locator(f"#{elem_id}").screenshot())).convert("RGB")).astype(int)
    return int(((shot[..., 0] > 230) & (shot[..., 1] < 40) & (shot[..., 2] > 230)).sum())


def mask_tint(view: np.ndarray) -> int:
    """Pixels of a view tinted by the first mask's overlay (magenta at 40 % over light ground)."""
    return int(((view[..., 0] > 200) & (view[..., 1] < 170) & (view[..., 2] > 150)).sum())


def wait_mask_on_view(page, view_id, least=300, tries=30) -> np.ndarray:
    """Wait until the server has the painted mask: it draws it on the view."""
    for _ in range(tries):
        view = fetch_image(page, view_id)
        if mask_tint(view) >= least:
            return view
        page.wait_for_timeout(500)
    raise AssertionError(f"no mask drawn on {view_id}: {mask_tint(view)} tinted pixels")


def number(page, elem_id) -> float:
    return float(page.input_value(f"#{elem_id} input[type=number]"))


def drag_image_px(page, elem_id, start, end, size=128):
    """Press on the view ``elem_id`` at image pixel ``start``, drag to ``end``, release."""
    box = picture_box(page, elem_id)

    def at(p):
        return box["x"] + (p[0] + 0.5) / size * box["width"], box["y"] + (p[1] + 0.5) / size * box["height"]

    page.mouse.move(*at(start))
    page.mouse.down()
    page.mouse.move(*at(end), steps=10)
    page.mouse.up()


def fetch_image(page, elem_id) -> np.ndarray:
    src = page.locator(f"#{elem_id} img").first.get_attribute("src")
    body = page.request.get(src if src.startswith("http") else page.url.rstrip("/") + src).body()
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def natural_size(page, elem_id) -> tuple[int, int]:
    loc = page.locator(f"#{elem_id} img").first
    loc.wait_for(state="visible")
    page.wait_for_function("(el) => el.complete && el.naturalWidth > 0", arg=loc.element_handle())
    return tuple(loc.evaluate("el => [el.naturalWidth, el.naturalHeight]"))


def download_bundle(page, task, dest: Path) -> Path:
    with page.expect_download() as dl:
        page.click(f"#{task}-download")
    zpath = dest / "bundle.zip"
    dl.value.save_as(zpath)
    out = dest / "bundle"
    with zipfile.ZipFile(zpath) as z:
        z.extractall(out)
    return out


def cli_reproduce(bundle: Path, env) -> np.ndarray:
    exe = Path(sys.executable).with_name("diffeditor")
    r = subprocess.run([str(exe), "edit", "spec.json", "--model", "shapes", "--device", "cpu",
                        "--out", "again.png", "-q"], cwd=bundle, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return np.asarray(Image.open(bundle / "again.png").convert("RGB"))


# -- the tests ----------------------------------------------------------------------------------

def test_drag_by_clicks_and_brush_reproduces_through_the_cli(page, server, tmp_path):
    """Handle and target placed by clicking the image, the editable mask painted with the
    brush, the edit run: the 128x128 result appears (after x̂0 previews) at the input view's
    size, with a before/after toggle, and the downloaded spec reproduces it bit for bit through
    ``diffeditor edit`` on the CPU."""
    open_tab(page, "drag")
    label = page.locator("#drag-image").inner_text()
    assert "upload" in label and "relative to the spec" not in label, label
    page.click("#drag-advanced")
    assert page.input_value("#drag-guidance_clip textarea, #drag-guidance_clip input") == "off"
    page.set_input_files("#drag-image input[type=file]", str(REPO / "specs/assets/drag/source.png"))
    page.locator("#drag-image-view img").wait_for(state="visible")
    click_image_px(page, "drag-image-view", 55, 49)
    wait_status(page, "drag", r"^handles point 1 at \(55(\.\d)?, 49")
    click_image_px(page, "drag-image-view", 86, 45)
    wait_status(page, "drag", r"^targets point 1 at \(86(\.\d)?, 45")
    # the brush: three horizontal strokes across the middle of the canvas (the image is centred)
    paint(page, "drag-mask", [[(0.35, y), (0.65, y)] for y in (0.40, 0.45, 0.50)])
    set_number(page, "drag-steps", STEPS)
    page.click("#drag-run")
    done = wait_status(page, "drag", r"^(done|error|cancelled)")
    assert done.startswith("done"), done
    assert "128x128" in done
    assert page.locator("#drag-progress [data-phase=done]").count() == 1
    # the result is shown as the input is: the same enlargement (512 px for 128), the same
    # box on the page, beside it
    assert natural_size(page, "drag-result") == natural_size(page, "drag-image-view") == (512, 512)
    rbox = page.locator("#drag-result img").first.bounding_box()
    vbox = page.locator("#drag-image-view img").first.bounding_box()
    assert abs(rbox["width"] - vbox["width"]) < 2 and abs(rbox["height"] - vbox["height"]) < 2, (rbox, vbox)
    assert rbox["width"] > 400 and rbox["x"] > vbox["x"] + vbox["width"] - 1  # large, on its right
    assert natural_size(page, "drag-preview") == (128, 128)  # the last x̂0 preview
    shown_big = fetch_image(page, "drag-result")
    shown = shown_big[::4, ::4]  # nearest enlargement: every 4th pixel is the result's
    assert np.array_equal(shown_big, np.repeat(np.repeat(shown, 4, 0), 4, 1))
    # before/after: the input, then the result again
    source = np.asarray(Image.open(REPO / "specs/assets/drag/source.png").convert("RGB"))
    page.locator("#drag-compare").get_by_text("before (input)").click()
    page.wait_for_function("(old) => document.querySelector('#drag-result img').src !== old",
                           arg=page.locator("#drag-result img").first.get_attribute("src"))
    before = fetch_image(page, "drag-result")
    assert before.shape == (512, 512, 3) and np.array_equal(before[::4, ::4], source)
    page.locator("#drag-compare").get_by_text("after (result)").click()
    page.wait_for_timeout(1500)
    assert np.array_equal(fetch_image(page, "drag-result"), shown_big)
    # the gallery's thumbnail: the whole result (contained), not a crop
    thumb = page.locator("#drag-gallery img").first
    thumb.wait_for(state="visible")
    assert thumb.evaluate("el => getComputedStyle(el).objectFit") == "contain"

    bundle = download_bundle(page, "drag", tmp_path)
    spec = json.loads((bundle / "spec.json").read_text())
    assert spec["task"] == "drag" and spec["steps"] == STEPS
    (hx, hy), = spec["handles"]
    (tx, ty), = spec["targets"]
    assert abs(hx - 55.5) <= 1 and abs(hy - 49.5) <= 1 and abs(tx - 86.5) <= 1 and abs(ty - 45.5) <= 1
    assert "guidance_clip" not in spec or spec["guidance_clip"] is None  # "off"
    assert "--device cpu" in (bundle / "command.txt").read_text()
    mask = np.asarray(Image.open(bundle / spec["mask"]).convert("L")) > 127
    assert 300 < mask.sum() < 0.5 * mask.size, mask.sum()  # painted strokes, not the whole image
    rows = np.nonzero(mask.any(1))[0]
    assert 30 < rows.min() and rows.max() < 100  # around the middle, where the strokes went
    result = np.asarray(Image.open(bundle / "result.png").convert("RGB"))
    assert result.shape == (128, 128, 3)
    assert np.array_equal(shown, result)
    again = cli_reproduce(bundle, server["env"])
    assert np.array_equal(again, result), f"{(again != result).any(-1).sum()} pixels differ"
    source = np.asarray(Image.open(REPO / "specs/assets/drag/source.png").convert("RGB"))
    assert not np.array_equal(result, source)


def test_points_undo_and_clear(page):
    open_tab(page, "drag")
    page.set_input_files("#drag-image input[type=file]", str(REPO / "specs/assets/drag/source.png"))
    page.locator("#drag-image-view img").wait_for(state="visible")
    before = fetch_image(page, "drag-image-view")
    click_image_px(page, "drag-image-view", 20, 20)
    wait_status(page, "drag", r"^handles point 1")
    page.wait_for_timeout(500)
    with_point = fetch_image(page, "drag-image-view")
    assert not np.array_equal(before, with_point)  # the numbered point is drawn
    page.click("#drag-undo")
    page.wait_for_timeout(1500)
    assert np.array_equal(fetch_image(page, "drag-image-view"), before)
    click_image_px(page, "drag-image-view", 20, 20)
    click_image_px(page, "drag-image-view", 40, 40)
    page.wait_for_timeout(1000)
    page.click("#drag-clear")
    page.wait_for_timeout(1500)
    assert np.array_equal(fetch_image(page, "drag-image-view"), before)


def test_click_an_object_to_mask_it_then_move(page, server, tmp_path):
    """The flood-fill segmenter from a click fills the move tab's mask; SAM without weights
    says so in the page; the move runs."""
    open_tab(page, "move")
    page.set_input_files("#move-image input[type=file]", str(REPO / "specs/assets/move/source.png"))
    view = "move-image-view"
    page.locator(f"#{view} img").wait_for(state="visible")
    truth = np.asarray(Image.open(REPO / "specs/assets/move/mask.png").convert("L")) > 127
    ys, xs = np.nonzero(truth)
    cx, cy = int(xs.mean()), int(ys.mean())
    page.locator("#move-image-mode").get_by_test_id("select object -> mask (sam)-radio-label").click()
    click_image_px(page, view, cx, cy)
    msg = wait_status(page, "move", r"^error: ")
    assert "no SAM weights" in msg and "--sam" in msg
    page.locator("#move-image-mode").get_by_test_id("select object -> mask (flood)-radio-label").click()
    click_image_px(page, view, cx, cy)
    msg = wait_status(page, "move", r"^mask: \d+ pixels selected by flood")
    selected = int(re.search(r"mask: (\d+) pixels", msg).group(1))
    # the next click sets where the object goes: the mode switched by itself
    assert page.locator("#move-image-mode input[type=radio]:checked").get_attribute("value").startswith(
        "set the destination")
    assert abs(selected - truth.sum()) <= 0.15 * truth.sum()
    # the brush editor shows the selected mask (magenta), ready to be touched up
    for _ in range(30):  # the editor loads the new value asynchronously
        page.wait_for_timeout(500)
        shot = np.asarray(Image.open(io.BytesIO(page.locator("#move-mask").screenshot())).convert("RGB")).astype(int)
        magenta = (shot[..., 0] > 230) & (shot[..., 1] < 40) & (shot[..., 2] > 230)
        if magenta.sum() > 0.5 * truth.sum():
            break
    assert magenta.sum() > 0.5 * truth.sum(), magenta.sum()
    # a click on the view puts the object's centre there: the offset fields follow
    before_click = fetch_image(page, view)
    click_image_px(page, view, cx + 16, cy - 13)
    wait_status(page, "move", r"^destination")
    page.wait_for_function("() => Number(document.querySelector('#move-offset-x input').value) !== 0")
    ox, oy = number(page, "move-offset-x"), number(page, "move-offset-y")
    # the flood fill's centroid is near the true mask's: the offset is the click minus it
    assert abs(ox - (cx + 16.5 - (xs.mean() + 0.5))) < 2.5 and abs(oy - (cy - 12.5 - (ys.mean() + 0.5))) < 2.5, (ox, oy)
    page.wait_for_timeout(1000)
    assert not np.array_equal(fetch_image(page, view), before_click)  # the destination is drawn
    set_number(page, "move-steps", STEPS)
    page.click("#move-run")
    done = wait_status(page, "move", r"^(done|error|cancelled)")
    assert done.startswith("done"), done
    assert natural_size(page, "move-result") == (512, 512)  # shown enlarged as the input view is
    bundle = download_bundle(page, "move", tmp_path)
    assert json.loads((bundle / "spec.json").read_text())["offset"] == [ox, oy]
    mask = np.asarray(Image.open(bundle / "mask.png").convert("L")) > 127
    assert abs(int(mask.sum()) - selected) <= 0.02 * selected and (mask & truth).sum() >= 0.85 * truth.sum()


def test_bad_input_says_what_to_do_naming_the_field_and_the_server_keeps_serving(page, server):
    """A form the spec rejects: one line in plain words naming the field by its label (not
    pydantic's 'List should have at least 1 item after validation'); then an edit still runs."""
    open_tab(page, "drag")
    page.set_input_files("#drag-image input[type=file]", str(REPO / "specs/assets/drag/source.png"))
    page.locator("#drag-image-view img").wait_for(state="visible")
    page.wait_for_timeout(1500)
    paint(page, "drag-mask", [[(0.35, y), (0.65, y)] for y in (0.40, 0.45, 0.50)])
    wait_mask_on_view(page, "drag-image-view")
    click_image_px(page, "drag-image-view", 55, 49)  # a handle, no target
    wait_status(page, "drag", r"^handles point 1")
    page.click("#drag-run")
    msg = wait_status(page, "drag", r"^(done|error|cancelled)")
    assert msg == "error: targets: place at least one target point (click on the image)", msg
    open_tab(page, "move")
    page.set_input_files("#move-image input[type=file]", str(REPO / "specs/assets/move/source.png"))
    page.locator("#move-image-view img").wait_for(state="visible")
    page.click("#move-run")  # no mask painted
    msg = wait_status(page, "move", r"^(done|error|cancelled)")
    assert msg == "error: mask: paint the mask (or click an object to select it)", msg
    page.click("#move-advanced")
    clip = page.locator("#move-guidance_clip textarea, #move-guidance_clip input").first
    clip.fill("lots")
    page.click("#move-example-0")
    wait_status(page, "move", r"^example .* loaded")
    clip.fill("lots")
    clip.press("Tab")
    page.click("#move-run")
    msg = wait_status(page, "move", r"^(done|error|cancelled)")
    assert msg == "error: guidance clip: type a number or off, not 'lots'", msg
    clip.fill("off")
    clip.press("Tab")
    set_number(page, "move-steps", STEPS)
    page.click("#move-run")
    assert wait_status(page, "move", r"^(done|cancelled|error: (?!guidance clip))").startswith("done")


def test_paste_destination_by_dragging_on_the_view(page):
    """Press on the pasted object's preview, drag, release: its centre goes where the mouse is
    released, the offset fields follow; typing an offset moves the preview back."""
    open_tab(page, "paste")
    page.click("#paste-example-0")
    wait_status(page, "paste", r"^example .* loaded")
    view = "paste-image-view"
    page.locator(f"#{view} img").wait_for(state="visible")
    page.wait_for_timeout(1000)
    ox0, oy0 = number(page, "paste-offset-x"), number(page, "paste-offset-y")
    first = fetch_image(page, view)
    # the reference mask's centroid, where the preview's object centre is before the offset
    box = page.locator("#paste-reference-view img").first
    page.wait_for_function("(el) => el.complete && el.naturalWidth > 0", arg=box.element_handle())
    spec = json.loads(json.dumps(__import__("yaml").safe_load((REPO / "specs/paste.yaml").read_text())))
    ref_mask = np.asarray(Image.open(REPO / "specs" / spec["reference_mask"]).convert("L")) > 127
    ys, xs = np.nonzero(ref_mask)
    c = (xs.mean() + 0.5, ys.mean() + 0.5)
    start = (int(c[0] + ox0), int(c[1] + oy0))
    end = (start[0] - 25, start[1] + 10)
    drag_image_px(page, view, start, end)
    wait_status(page, "paste", r"^destination")
    page.wait_for_timeout(1000)
    ox, oy = number(page, "paste-offset-x"), number(page, "paste-offset-y")
    # the page's centroid is that of the editor's copy of the mask (what the spec gets), within
    # about a pixel of the file's
    assert abs(ox - (end[0] + 0.5 - c[0])) < 2 and abs(oy - (end[1] + 0.5 - c[1])) < 2, (ox, oy, c, end)
    # a second drag from there, released 10 px left and 7 down: the offset follows exactly
    drag_image_px(page, view, end, (end[0] - 10, end[1] + 7))
    page.wait_for_function("(x) => Number(document.querySelector('#paste-offset-x input').value) !== x", arg=ox)
    page.wait_for_timeout(500)
    ox2, oy2 = number(page, "paste-offset-x"), number(page, "paste-offset-y")
    assert abs(ox2 - ox + 10) < 0.6 and abs(oy2 - oy - 7) < 0.6, (ox, oy, ox2, oy2)  # a click: +-0.5 px
    moved = fetch_image(page, view)
    assert not np.array_equal(moved, first)
    set_number(page, "paste-offset-x", ox0)
    set_number(page, "paste-offset-y", oy0)
    page.wait_for_timeout(1500)
    assert np.array_equal(fetch_image(page, view), first)


def test_a_tour_of_every_tab_then_paint_a_mask(page):
    """Every tab visited (twice), then the first tab's brush (the oldest editor, the one a
    browser's WebGL limit took first) paints, and a mask painted before the tour is still there."""
    tabs = [t.inner_text() for t in page.get_by_role("tab").all()]
    assert len(tabs) >= 8, tabs  # more brush editors than a browser keeps WebGL contexts for
    open_tab(page, "drag")
    page.set_input_files("#drag-image input[type=file]", str(REPO / "specs/assets/drag/source.png"))
    page.locator("#drag-image-view img").wait_for(state="visible")
    paint(page, "drag-mask", [[(0.35, y), (0.65, y)] for y in (0.40, 0.45, 0.50)])
    painted = magenta_pixels(page, "drag-mask")
    assert painted > 2000, painted
    for name in tabs + tabs:
        open_tab(page, name)
        page.wait_for_timeout(1500)
    open_tab(page, "drag")
    page.wait_for_timeout(2000)
    assert magenta_pixels(page, "drag-mask") > 0.8 * painted  # kept through the tour
    first = tabs[0]
    open_tab(page, first)
    page.set_input_files(f"#{first}-image input[type=file]", str(REPO / "specs/assets/move/source.png"))
    page.locator(f"#{first}-image-view img").wait_for(state="visible")
    page.wait_for_timeout(1500)
    editor = page.locator(f"#tab-{first} [id^={first}-][id$=mask]").first.get_attribute("id")
    before = magenta_pixels(page, editor)
    paint(page, editor, [[(0.3, y), (0.7, y)] for y in (0.3, 0.35, 0.4)])
    assert magenta_pixels(page, editor) > before + 2000
    wait_mask_on_view(page, f"{first}-image-view", least=2000)  # the server got the mask
    lost = [m for m in page.console_lines if "WebGL" in m and ("Too many" in m or "lost" in m)]
    assert not lost, lost


def test_two_sessions_editing_at_once_both_get_results(browser, server):
    pages = []
    for _ in range(2):
        ctx = browser.new_context(viewport={"width": 1300, "height": 1900})
        pg = ctx.new_page()
        pg.set_default_timeout(60_000)
        pg.goto(server["url"])
        open_tab(pg, "resize")
        pg.click("#resize-example-0")
        wait_status(pg, "resize", r"^example .* loaded")
        set_number(pg, "resize-steps", STEPS)
        pages.append(pg)
    for pg in pages:
        pg.click("#resize-run")
    for pg in pages:
        assert wait_status(pg, "resize", r"^(done|error|cancelled)").startswith("done")
        assert natural_size(pg, "resize-result") == (512, 512)  # shown enlarged as the input view is
    for pg in pages:
        pg.context.close()


def test_cancel_stops_between_steps_and_a_re_edit_reuses_the_inversion(page):
    open_tab(page, "drag")
    page.click("#drag-example-0")
    wait_status(page, "drag", r"^example .* loaded")
    set_number(page, "drag-steps", 20)
    page.click("#drag-run")
    # the progress bar: inversion, then sampling, each step by step
    for phase in ("inversion", "sampling"):
        page.wait_for_function(
            "(p) => { const d = document.querySelector('#drag-progress [data-phase=' + p + ']');"
            " return d && Number(d.dataset.done) >= 2 && d.querySelector('progress').value >= 2"
            " && d.innerText.includes(p + ': step'); }", arg=phase, timeout=60_000)
    wait_status(page, "drag", r"^sampling: step")
    page.click("#drag-cancel")
    msg = wait_status(page, "drag", r"^(done|cancelled|diffeditor)")
    assert msg.startswith("cancelled: cancelled after step"), msg
    step = int(re.search(r"after step (\d+)", msg).group(1))
    assert step < 19
    # a re-edit (same image, prompt and steps; another weight) reuses the inversion
    set_number(page, "drag-w_handle_contrast", 0.5)
    page.click("#drag-run")
    done = wait_status(page, "drag", r"^(done|error|cancelled)")
    assert done.startswith("done") and "(cached inversion)" in done, done
    assert natural_size(page, "drag-result") == (512, 512)  # shown enlarged as the input view is


def test_a_third_party_task_gets_its_own_tab(page, tmp_path):
    """The test-only plugin's tab: its ``area_mask`` is a brush editor, ``noise_level`` a
    slider; the example it ships (its ``ui_examples``) loads; it runs."""
    open_tab(page, "revive")
    assert page.locator("#revive-noise_level input[type=range]").count() == 1
    assert page.locator("#revive-example-0").inner_text().strip() == "revive a square"
    page.click("#revive-example-0")
    wait_status(page, "revive", r"^example revive_example/spec.json loaded")
    for _ in range(30):  # the editor loads the example's mask asynchronously
        page.wait_for_timeout(500)
        if magenta_pixels(page, "revive-area_mask") > 1000:
            break
    assert magenta_pixels(page, "revive-area_mask") > 1000
    assert float(page.input_value("#revive-noise_level input[type=number]")) == 0.5
    page.set_input_files("#revive-image input[type=file]", str(REPO / "specs/assets/move/source.png"))
    page.locator("#revive-image-view img").wait_for(state="visible")
    paint(page, "revive-area_mask", [[(0.4, 0.4), (0.6, 0.4), (0.6, 0.6), (0.4, 0.6)]])
    set_number(page, "revive-steps", STEPS)
    page.click("#revive-run")
    done = wait_status(page, "revive", r"^(done|error|cancelled)")
    assert done.startswith("done"), done
    assert natural_size(page, "revive-result") == (512, 512)  # shown enlarged as the input view is
    bundle = download_bundle(page, "revive", tmp_path)
    assert json.loads((bundle / "spec.json").read_text())["task"] == "revive"


def test_every_built_in_task_has_a_tab_with_its_example(browser, builtin_server, tmp_path):
    """The page of the built-in tasks (``--tasks``; no --device): a tab each, nothing else,
    each renders its generated inputs with its first example loaded (the README's screenshots,
    written to $DIFFEDITOR_UI_SCREENSHOTS when set); command.txt names the device the page
    picked."""
    page = _open_page(browser, builtin_server)
    assert [t.inner_text() for t in page.get_by_role("tab").all()] == list(BUILT_IN)
    out = os.environ.get("DIFFEDITOR_UI_SCREENSHOTS")
    for name in BUILT_IN:
        open_tab(page, name)
        page.click(f"#{name}-example-0")
        wait_status(page, name, r"^example .* loaded")
        page.locator(f"#{name}-image-view img").wait_for(state="visible")
        page.wait_for_timeout(1500)
        if name == "move":  # a result beside the input, for the screenshot and command.txt
            set_number(page, "move-steps", STEPS)
            page.click("#move-run")
            assert wait_status(page, "move", r"^(done|error|cancelled)").startswith("done")
            page.locator("#move-gallery img").first.wait_for(state="visible")
            page.wait_for_timeout(1000)
            bundle = download_bundle(page, "move", tmp_path)
            assert re.search(r"--device \S+", (bundle / "command.txt").read_text())
        if out:
            shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
            shot = shot.resize((shot.width // 2, shot.height // 2), Image.LANCZOS)
            Path(out).mkdir(parents=True, exist_ok=True)
            shot.quantize(colors=64).save(Path(out) / f"{name}.png", optimize=True)
    page.context.close()
