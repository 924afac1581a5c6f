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
    dist = folder / "diffeditor_revive-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: diffeditor-revive\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[diffeditor]\nrevive = revive_task\n")
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("diffeditor_ui", reason="the ui plugin is not installed (pip install ./plugins/diffeditor-ui)")
    pytest.importorskip("playwright", reason="playwright is not installed")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    from diffeditor.plugins import get_registry

    if "shapes" not in get_registry().models:
        pytest.skip("diffeditor-shapes is not installed")
    tmp = tmp_path_factory.mktemp("ui")
    (tmp / "site").mkdir()
    plugin_dir = _third_party(tmp / "site")
    port = _free_port()
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join(
        [str(plugin_dir), *filter(None, [os.environ.get("PYTHONPATH")])])}
    exe = Path(sys.executable).with_name("diffeditor")
    proc = subprocess.Popen(
        [str(exe), "ui", "--port", str(port), "--device", "cpu", "--out-dir", str(tmp / "edits"),
         "--examples", str(REPO / "specs")],
        cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
    startup = time.monotonic() - t0
    log = seen
    yield {"url": url, "tmp": tmp, "env": env, "startup_s": startup, "log": log}
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1300, "height": 1900}, accept_downloads=True)
    pg = ctx.new_page()
    pg.set_default_timeout(60_000)
    pg.goto(server["url"])
    pg.get_by_role("tab", name="drag").wait_for()
    yield pg
    ctx.close()


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


def click_image_px(page, elem_id, x, y, size=128):
    """Click the view ``elem_id`` at image pixel ``(x, y)`` of a ``size``-px image."""
    img = page.locator(f"#{elem_id} img").first
    img.wait_for(state="visible")
    box = img.bounding_box()
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
    brush, the edit run: a 128x128 result appears (after x̂0 previews), and the downloaded spec
    reproduces it bit for bit through ``diffeditor edit`` on the CPU."""
    open_tab(page, "drag")
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
    done = wait_status(page, "drag", r"^(done|diffeditor)")
    assert done.startswith("done"), done
    assert "128x128" in done
    assert natural_size(page, "drag-result") == (128, 128)
    assert natural_size(page, "drag-preview") == (128, 128)  # the last x̂0 preview
    shown = fetch_image(page, "drag-result")

    bundle = download_bundle(page, "drag", tmp_path)
    spec = json.loads((bundle / "spec.json").read_text())
    assert spec["task"] == "drag" and spec["steps"] == STEPS
    (hx, hy), = spec["handles"]
    (tx, ty), = spec["targets"]
    assert abs(hx - 55.5) <= 1 and abs(hy - 49.5) <= 1 and abs(tx - 86.5) <= 1 and abs(ty - 45.5) <= 1
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
    msg = wait_status(page, "move", r"^diffeditor: error: ")
    assert "no SAM weights" in msg and "--sam" in msg
    page.locator("#move-image-mode").get_by_test_id("select object -> mask (flood)-radio-label").click()
    click_image_px(page, view, cx, cy)
    msg = wait_status(page, "move", r"^mask: \d+ pixels selected by flood")
    selected = int(re.search(r"mask: (\d+) pixels", msg).group(1))
    assert abs(selected - truth.sum()) <= 0.15 * truth.sum()
    # the brush editor shows the selected mask (magenta), ready to be touched up
    for _ in range(30):  # the editor loads the new value asynchronously
        page.wait_for_timeout(500)
        shot = np.asarray(Image.open(io.BytesIO(page.locator("#move-mask").screenshot())).convert("RGB")).astype(int)
        magenta = (shot[..., 0] > 230) & (shot[..., 1] < 40) & (shot[..., 2] > 230)
        if magenta.sum() > 0.5 * truth.sum():
            break
    assert magenta.sum() > 0.5 * truth.sum(), magenta.sum()
    set_number(page, "move-offset-x", 16)
    set_number(page, "move-offset-y", -13)
    set_number(page, "move-steps", STEPS)
    page.click("#move-run")
    done = wait_status(page, "move", r"^(done|diffeditor)")
    assert done.startswith("done"), done
    assert natural_size(page, "move-result") == (128, 128)
    bundle = download_bundle(page, "move", tmp_path)
    mask = np.asarray(Image.open(bundle / "mask.png").convert("L")) > 127
    assert abs(int(mask.sum()) - selected) <= 0.02 * selected and (mask & truth).sum() >= 0.85 * truth.sum()


def test_bad_input_shows_the_cli_message_and_the_server_keeps_serving(page, server, tmp_path):
    open_tab(page, "move")
    page.set_input_files("#move-image input[type=file]", str(REPO / "specs/assets/move/source.png"))
    page.locator("#move-image-view img").wait_for(state="visible")
    page.click("#move-run")  # no mask painted
    msg = wait_status(page, "move", r"^(done|diffeditor)")
    # the command line, on the same spec without a mask
    spec = tmp_path / "s.json"
    shutil.copy(REPO / "specs/assets/move/source.png", tmp_path / "source.png")
    spec.write_text(json.dumps({"task": "move", "image": "source.png"}))
    exe = Path(sys.executable).with_name("diffeditor")
    cli = subprocess.run([str(exe), "edit", str(spec), "--model", "shapes", "--out", str(tmp_path / "o.png")],
                         env=server["env"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2
    cli_line = cli.stderr.strip().splitlines()[-1]
    assert msg == cli_line.replace(str(spec), "page"), (msg, cli_line)
    # still serving: an example runs in the same page
    page.click("#move-example-0")
    wait_status(page, "move", r"^example .* loaded")
    set_number(page, "move-steps", STEPS)
    page.click("#move-run")
    assert wait_status(page, "move", r"^(done|diffeditor)").startswith("done")


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
        assert wait_status(pg, "resize", r"^(done|diffeditor)").startswith("done")
        assert natural_size(pg, "resize-result") == (128, 128)
    for pg in pages:
        pg.context.close()


def test_cancel_stops_between_steps_and_a_re_edit_reuses_the_inversion(page):
    open_tab(page, "drag")
    page.click("#drag-example-0")
    wait_status(page, "drag", r"^example .* loaded")
    set_number(page, "drag-steps", 20)
    page.click("#drag-run")
    # the progress bar over the status box: inversion, then sampling ("editing")
    for phase in ("inversion - ", "editing - "):
        page.wait_for_function("(t) => document.querySelector('#drag-status').innerText.includes(t)",
                               arg=phase, timeout=60_000)
    wait_status(page, "drag", r"^sampling: step")
    page.click("#drag-cancel")
    msg = wait_status(page, "drag", r"^(done|cancelled|diffeditor)")
    assert msg.startswith("cancelled: cancelled after step"), msg
    step = int(re.search(r"after step (\d+)", msg).group(1))
    assert step < 19
    # a re-edit (same image, prompt and steps; another weight) reuses the inversion
    set_number(page, "drag-w_handle_contrast", 0.5)
    page.click("#drag-run")
    done = wait_status(page, "drag", r"^(done|diffeditor)")
    assert done.startswith("done") and "(cached inversion)" in done, done
    assert natural_size(page, "drag-result") == (128, 128)


def test_a_third_party_task_gets_its_own_tab(page, tmp_path):
    """The test-only plugin's tab: its ``area_mask`` is a brush editor, ``noise_level`` a
    slider; it runs."""
    open_tab(page, "revive")
    assert page.locator("#revive-noise_level input[type=range]").count() == 1
    page.set_input_files("#revive-image input[type=file]", str(REPO / "specs/assets/move/source.png"))
    page.locator("#revive-image-view img").wait_for(state="visible")
    paint(page, "revive-area_mask", [[(0.4, 0.4), (0.6, 0.4), (0.6, 0.6), (0.4, 0.6)]])
    set_number(page, "revive-steps", STEPS)
    page.click("#revive-run")
    done = wait_status(page, "revive", r"^(done|diffeditor)")
    assert done.startswith("done"), done
    assert natural_size(page, "revive-result") == (128, 128)
    bundle = download_bundle(page, "revive", tmp_path)
    assert json.loads((bundle / "spec.json").read_text())["task"] == "revive"


def test_every_built_in_task_has_a_tab_with_its_example(page, tmp_path):
    """Every built-in tab renders its generated inputs with its first example loaded (the
    README's screenshots; written to $DIFFEDITOR_UI_SCREENSHOTS when set)."""
    out = os.environ.get("DIFFEDITOR_UI_SCREENSHOTS")
    for name in BUILT_IN:
        open_tab(page, name)
        page.click(f"#{name}-example-0")
        wait_status(page, name, r"^example .* loaded")
        page.locator(f"#{name}-image-view img").wait_for(state="visible")
        page.wait_for_timeout(1000)
        if out:
            shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
            shot = shot.resize((shot.width // 2, shot.height // 2), Image.LANCZOS)
            Path(out).mkdir(parents=True, exist_ok=True)
            shot.quantize(colors=64).save(Path(out) / f"{name}.png", optimize=True)
