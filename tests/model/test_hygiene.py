"""Kernel hygiene (issue 13 part B): the import graph, no hidden global registry, the registry's
extension points (prompt encoders, bench scenes) and the generated per-task helpers."""

from __future__ import annotations

import ast
import shutil
import textwrap
from pathlib import Path

import pytest
from conftest import install_distribution

ROOT = Path(__file__).resolve().parents[2]
KERNEL = ROOT / "diffeditor"

# -- the import graph ---------------------------------------------------------------------------


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks (imports there never run)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                skip.update(id(n) for n in ast.walk(stmt))
    return skip


def imports_of(path: Path, package: str = "diffeditor") -> set[str]:
    """Every module a file imports (top-level and inside functions), as dotted names; relative
    imports resolved against ``package``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = package + (f".{base}" if base else "")
            if node.level and not node.module:  # from . import x, y
                out.update(f"{base}.{a.name}" for a in node.names)
            else:
                out.add(base)
                out.update(f"{base}.{a.name}" for a in node.names)  # from pkg import submodule
    return out


def kernel_graph(folder: Path = KERNEL, package: str = "diffeditor") -> dict[str, set[str]]:
    """module -> the kernel modules it imports (``__init__`` for the package itself)."""
    mods = {p.stem for p in folder.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for m in mods:
        deps = set()
        for name in imports_of(folder / f"{m}.py", package):
            if name == package:
                deps.add("__init__")
            elif name.startswith(package + "."):
                first = name.split(".")[1]
                if first in mods:
                    deps.add(first)
        deps.discard(m)
        graph[m] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (as a path that returns to its start), or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_kernel_import_graph_has_no_cycle():
    graph = kernel_graph()
    assert "specs" in graph and "plugins" in graph["specs"]  # the graph is really read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in diffeditor/: " + " -> ".join(cycle)


def test_a_deliberate_cycle_is_found(tmp_path):
    """The check above can fail: the same graph with one import added (plugins -> specs, while
    specs imports plugins) has a cycle, and it is reported."""
    copy = tmp_path / "diffeditor"
    shutil.copytree(KERNEL, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert find_cycle(kernel_graph(copy)) is None
    plugins = copy / "plugins.py"
    plugins.write_text(plugins.read_text() + "\n\ndef _f():\n    from .specs import EditSpec\n")
    cycle = find_cycle(kernel_graph(copy))
    assert cycle is not None and {"plugins", "specs"} <= set(cycle)


def _outside_packages() -> set[str]:
    """Top-level packages of tasks/ and plugins/*/src: what the kernel must never import."""
    names = {p.name for p in (ROOT / "tasks").iterdir() if (p / "__init__.py").is_file()}
    for src in (ROOT / "plugins").glob("*/src"):
        names |= {p.name for p in src.iterdir() if (p / "__init__.py").is_file()}
    return names


def test_kernel_imports_nothing_from_tasks_or_plugins():
    outside = _outside_packages()
    assert {"diffeditor_tasks", "diffeditor_shapes", "diffeditor_example"} <= outside
    bad = {}
    for path in KERNEL.glob("*.py"):
        hits = {n for n in imports_of(path) if n.split(".")[0] in outside}
        if hits:
            bad[path.name] = sorted(hits)
    assert not bad, f"the kernel imports tasks/plugins: {bad}"


def test_bench_is_out_of_the_kernels_import_graph():
    """``bench`` registers itself as a command; no kernel module imports it, and it does not
    import the command line."""
    graph = kernel_graph()
    assert "cli" not in graph["bench"]
    users = sorted(m for m, deps in graph.items() if "bench" in deps)
    assert users == [], f"kernel modules importing bench: {users}"


def _string_constants(path: Path) -> set[str]:
    """String literals of a module that are not docstrings."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docs.add(id(body[0].value))
    return {n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs}


def test_kernel_names_no_task_and_no_model(diffeditor_registry):
    """No string literal of the kernel's code is a registered task's or model's name (the
    bench's scenes and the tokenizer come from the plugins)."""
    names = set(diffeditor_registry.tasks) | set(diffeditor_registry.models)
    assert {"move", "drag", "shapes"} <= names
    bad = {}
    for path in KERNEL.glob("*.py"):
        hits = _string_constants(path) & names
        if hits:
            bad[path.name] = sorted(hits)
    assert not bad, f"task or model names in the kernel's code: {bad}"


# -- no hidden global registry ------------------------------------------------------------------

#: the only kernel modules that may reach the process-wide registry: its definition (plugins:
#: ``default_registry``) and the edges
EDGES = {"plugins.py", "pytest_plugin.py", "testing.py", "__init__.py"}


def test_only_the_edges_reach_the_process_wide_registry():
    users = sorted(p.name for p in KERNEL.glob("*.py")
                   if "get_registry" in {n.id for n in ast.walk(ast.parse(p.read_text()))
                                         if isinstance(n, ast.Name)}
                   | {a.name for n in ast.walk(ast.parse(p.read_text()))
                      if isinstance(n, ast.ImportFrom) for a in n.names})
    assert set(users) <= EDGES, f"modules using get_registry: {users}"


#: kernel functions that take a registry: every call inside the kernel and the first-party tasks
#: must pass it
TAKES_REGISTRY = {"parse_spec", "check_spec", "resolve_model", "spec_union", "json_schema",
                  "check_edits", "read_model_card", "_check_default_keys", "build_parser"}


#: where a registry passed positionally sits (1-based count of positional arguments)
REGISTRY_POSITION = {"resolve_model": 2, "_check_default_keys": 3, "read_model_card": 2,
                     "spec_union": 1, "json_schema": 1, "build_parser": 1}


def test_every_internal_call_passes_the_registry():
    missing = []
    files = list(KERNEL.glob("*.py")) + list((ROOT / "tasks").rglob("*.py"))
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if name not in TAKES_REGISTRY:
                continue
            if isinstance(fn, ast.Attribute) and name == "json_schema":
                continue  # pydantic's TypeAdapter.json_schema()
            kw = {k.arg for k in node.keywords}
            positional_registry = len(node.args) >= REGISTRY_POSITION.get(name, 99)
            if "registry" not in kw and not positional_registry:
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}()")
    assert not missing, "calls without a registry: " + ", ".join(missing)


def _mine_plugin():
    """A test-only task ``mine`` (the example plugin's shift under another name) in a module
    registered in code, with a private registry."""
    import types
    from typing import Literal

    from diffeditor_example.shift import ShiftSpec, ShiftTask
    from pydantic import Field

    from diffeditor.hookspecs import hookimpl

    class MineSpec(ShiftSpec):
        task: Literal["mine"] = "mine"
        distance: float = Field(24.0, gt=0.0, le=4096.0, description="how far")

    class MineTask(ShiftTask):
        name = "mine"
        spec_model = MineSpec

    mod = types.ModuleType("mine_plugin")

    @hookimpl
    def register_tasks(register):
        register(MineTask())

    mod.register_tasks = register_tasks
    return mod


def test_private_registry_reaches_specs_compose_and_cli(tmp_path, capsys):
    from PIL import Image

    from diffeditor.cli import main
    from diffeditor.errors import SpecError
    from diffeditor.plugins import registry_from
    from diffeditor.specs import parse_spec

    reg = registry_from([_mine_plugin()])
    assert set(reg.tasks) == {"mine"}  # nothing else: no entry points, no global
    Image.new("RGB", (64, 64), "gray").save(tmp_path / "i.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "m.png")
    spec = parse_spec({"task": "mine", "image": "i.png", "mask": "m.png"}, base_dir=tmp_path,
                      registry=reg)
    assert spec.distance == 24.0
    with pytest.raises(SpecError, match="unknown task 'move'; registered tasks: mine"):
        parse_spec({"task": "move", "image": "i.png", "mask": "m.png"}, base_dir=tmp_path,
                   registry=reg)
    # the command line of that registry: its tasks and nothing else
    assert main(["tasks"], registry=reg) == 0
    out = capsys.readouterr().out
    assert out.split()[0] == "mine" and "move" not in out


def test_compose_validates_its_edits_with_the_given_registry(tmp_path):
    """compose's validator looks the edits' tasks up in the registry parse_spec was given."""
    import diffeditor_tasks.compose as compose
    from PIL import Image

    from diffeditor.errors import SpecError
    from diffeditor.plugins import registry_from
    from diffeditor.specs import parse_spec

    Image.new("RGB", (64, 64), "gray").save(tmp_path / "i.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "m.png")
    data = {"task": "compose", "image": "i.png",
            "edits": [{"task": "mine", "mask": "m.png", "direction": "right"}]}
    reg = registry_from([compose, _mine_plugin()])
    spec = parse_spec(data, base_dir=tmp_path, registry=reg)
    assert [t.name for t, _ in compose.ComposeTask()._tasks(spec)] == ["mine"]
    assert spec.sub_specs[0].distance == 24.0
    # the installed registry has no task 'mine': the same spec is refused there
    with pytest.raises(SpecError, match="unknown task 'mine'"):
        parse_spec(data, base_dir=tmp_path)


# -- generated per-task helpers ----------------------------------------------------------------

@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A 128-px shapes-like scene: a red disc on gray, its mask."""
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("scene")
    im = Image.new("RGB", (128, 128), (128, 128, 128))
    m = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(im).ellipse((30, 44, 70, 84), fill=(220, 40, 40))
    ImageDraw.Draw(m).ellipse((30, 44, 70, 84), fill=255)
    im.save(folder / "image.png")
    m.save(folder / "mask.png")
    return folder


def test_editor_helpers_are_generated_from_the_registered_tasks(editor, scene):
    import inspect

    import numpy as np

    from diffeditor import Editor
    from diffeditor.errors import UsageError
    from diffeditor.plugins import registry_from

    mine = Editor(editor.engine, None, "shapes-test", registry=registry_from([_mine_plugin()]))
    assert "mine" in dir(mine) and not hasattr(mine, "move")  # only the registry's tasks
    sig = inspect.signature(mine.mine)
    assert list(sig.parameters)[:2] == ["image", "mask"]
    assert sig.parameters["distance"].default == 24.0
    assert sig.parameters["direction"].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(UsageError, match="unexpected keyword argument 'distanse'"):
        mine.mine(scene / "image.png", scene / "mask.png", distanse=3)
    fast = {"steps": 3, "resolution": 128, "seed": 1}
    by_helper = mine.mine(scene / "image.png", scene / "mask.png", direction="right",
                          distance=16, **fast)
    assert by_helper.spec.task == "mine" and by_helper.spec.distance == 16
    by_spec = mine.edit({"task": "mine", "image": str(scene / "image.png"),
                         "mask": str(scene / "mask.png"), "direction": "right", "distance": 16,
                         **fast})
    assert np.array_equal(np.asarray(by_helper.image), np.asarray(by_spec.image))
    # the installed registry's built-in tasks get helpers the same way
    assert list(inspect.signature(editor.move).parameters)[:2] == ["image", "mask"]
    assert "offset" in inspect.signature(editor.move).parameters


# -- prompt encoders: an out-of-tree one through the entry-point group ---------------------------

ENCODER_MODULE = textwrap.dedent('''
    """An out-of-tree prompt encoder: CLIP's embeddings of the prompt, scaled by 0.5."""
    from diffeditor.encoders import ClipTextEncoder
    from diffeditor.hookspecs import hookimpl
    from diffeditor.interfaces import TextPromptEncoder


    class HalfClip(TextPromptEncoder):
        name = "half-clip"
        description = "CLIP text embeddings times 0.5 (a test encoder)"

        def encode(self, engine, prompts):
            return ClipTextEncoder().encode(engine, prompts) * 0.5


    @hookimpl
    def register_prompt_encoders(register):
        register(HalfClip())
''')


@pytest.fixture
def installed_encoder(tmp_path, monkeypatch):
    """A real distribution ``halfclip`` (module + dist-info with entry_points.txt) on sys.path."""
    install_distribution(monkeypatch, tmp_path / "site", "halfclip", "halfclip_encoder",
                         ENCODER_MODULE, "halfclip", package=True)
    monkeypatch.delenv("DIFFEDITOR_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("DIFFEDITOR_PLUGINS", raising=False)
    from diffeditor.plugins import Registry, make_plugin_manager

    reg = Registry(*make_plugin_manager())
    yield reg


def test_out_of_tree_prompt_encoder_is_selected_by_a_spec(installed_encoder, editor, scene):
    import numpy as np

    from diffeditor import Editor
    from diffeditor.encoders import CLIP
    from diffeditor.errors import SpecError

    reg = installed_encoder
    assert set(reg.prompt_encoders["text"]) == {"clip", "half-clip"}
    assert set(reg.prompt_encoders["image"]) == {"ip-adapter"}
    enc = reg.prompt_encoder("half-clip")
    assert type(enc).__module__ == "halfclip_encoder"
    info = next(p for p in reg.plugins() if p.name == "halfclip")
    assert (info.distribution, info.version) == ("halfclip", "0.1")

    ed = Editor(editor.engine, None, "shapes-test", registry=reg)
    base = {"task": "move", "image": str(scene / "image.png"), "mask": str(scene / "mask.png"),
            "offset": [24, 0], "steps": 3, "resolution": 128, "seed": 3,
            "prompt": "a red circle on a gray background"}
    try:
        default = ed.edit(dict(base))
        half = ed.edit(dict(base, text_encoder="half-clip"))
        assert half.spec.text_encoder == "half-clip"
        assert half.metadata["spec"]["text_encoder"] == "half-clip"
        a = np.asarray(default.image).astype(float)
        b = np.asarray(half.image).astype(float)
        assert np.abs(a - b).mean() > 0.5, "the selected encoder made no difference"
        # back to the default encoder: the default result again, exactly
        again = ed.edit(dict(base))
        assert np.array_equal(np.asarray(again.image), np.asarray(default.image))
        with pytest.raises(SpecError, match=r"text_encoder: unknown text prompt encoder "
                                            r"'nope'; installed: clip, half-clip"):
            ed.edit(dict(base, text_encoder="nope"))
    finally:
        editor.engine.text_prompt_encoder = CLIP


def test_unknown_prompt_encoder_is_one_line_on_the_command_line(tmp_path, scene, capsys):
    from diffeditor.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text(f"task: move\nimage: {scene / 'image.png'}\nmask: {scene / 'mask.png'}\n"
                    "text_encoder: nope\n")
    assert main(["edit", str(spec), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown text prompt encoder 'nope'; installed: clip" in err[0]


def test_builtin_encoders_register_through_the_entry_point_group(diffeditor_registry):
    import importlib.metadata

    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="diffeditor")}
    assert eps["prompt-encoders"] == "diffeditor.encoders"
    origin = next(p for p in diffeditor_registry.plugins() if p.name == "prompt-encoders")
    assert origin.distribution == "diffeditor"
    assert "register_prompt_encoders" in origin.hooks


def test_bench_scenes_come_from_the_task_plugins(diffeditor_registry, tmp_path):
    from diffeditor.specs import parse_spec

    scenes = diffeditor_registry.bench_scenes
    assert set(scenes) == {"move", "resize", "drag", "appearance", "paste"}
    for name, scene in scenes.items():
        folder = tmp_path / name
        folder.mkdir()
        spec = parse_spec(scene.build(128, folder), base_dir=folder, registry=diffeditor_registry)
        assert spec.task == name


# -- spec housekeeping -------------------------------------------------------------------------

#: fields renamed since tests/data/task_defaults.json was taken: (task, old) -> new
RENAMED = {("drag", "w_inpaint"): "w_handle_contrast", ("face", "w_inpaint"): "w_handle_contrast"}
#: fields removed since: (task, field) (face has no content energy)
REMOVED = {("face", "w_content")}
#: fields added since, to every task, with their default
ADDED = {"energies": [], "paste_back": 0, "paste_back_region": "latent"}
#: fields added since to one task: (task, field) -> default
ADDED_TO = {
    ("drag", "object_blend"): 0.0,
    ("drag", "patch_radius"): 1,
    ("drag", "object_blend_radius"): 1,
    ("move", "surgery_space"): "latent",
    ("resize", "surgery_space"): "latent",
}


def test_each_tasks_resolved_defaults_are_unchanged():
    """The shared fields are declared once (EditSpec) with per-task defaults: every task's
    resolved defaults are still those dumped before (tools/dump_task_defaults.py), up to the
    documented renames."""
    import json
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from dump_task_defaults import resolved_defaults
    finally:
        sys.path.remove(str(ROOT / "tools"))
    import diffeditor_tasks.appearance as a
    import diffeditor_tasks.compose as c
    import diffeditor_tasks.drag as d
    import diffeditor_tasks.face as f
    import diffeditor_tasks.move as m
    import diffeditor_tasks.paste as p

    from diffeditor.plugins import registry_from

    before = json.loads((ROOT / "tests" / "data" / "task_defaults.json").read_text())
    for (task, old), new in RENAMED.items():
        before[task][new] = before[task].pop(old)
    for task, name in REMOVED:
        del before[task][name]
    for task in before:
        before[task].update(ADDED)
    for (task, name), value in ADDED_TO.items():
        before[task][name] = value
    now = resolved_defaults(registry_from([a, c, d, f, m, p]))
    assert set(now) == set(before)
    for task in before:
        assert now[task] == before[task], task


def test_task_specs_do_not_redeclare_the_shared_fields():
    from diffeditor.specs import EditSpec

    shared = set(EditSpec.model_fields) - {"task"}
    bad = []
    for path in (ROOT / "tasks").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Spec"):
                for stmt in node.body:
                    if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                            and stmt.target.id in shared):
                        bad.append(f"{path.name}:{node.name}.{stmt.target.id}")
    assert not bad, f"shared fields declared again (use task_defaults): {bad}"


def test_task_defaults_change_only_defaults():
    """A task default keeps the shared field's bounds; a field_note replaces its description."""
    from diffeditor_tasks.drag import DragSpec

    from diffeditor.specs import EditSpec

    f, base = DragSpec.model_fields["energy_scale"], EditSpec.model_fields["energy_scale"]
    assert (f.default, base.default) == (2000.0, 500.0)
    assert f.metadata == base.metadata
    assert f.description == "lambda (reference 2 x 1e3)"
    assert EditSpec.model_fields["energy_scale"].default == 500.0  # the base is untouched


def test_old_name_w_inpaint_is_accepted_with_a_deprecation_message(tmp_path, caplog):
    from PIL import Image

    from diffeditor.errors import SpecError
    from diffeditor.specs import parse_spec

    Image.new("RGB", (64, 64), "gray").save(tmp_path / "i.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "m.png")
    base = {"task": "drag", "image": "i.png", "mask": "m.png", "handles": [[10, 10]],
            "targets": [[20, 10]]}
    with caplog.at_level("WARNING"):
        spec = parse_spec(dict(base, w_inpaint=0.7), base_dir=tmp_path)
    assert spec.w_handle_contrast == 0.7
    assert "'w_inpaint' is deprecated: it is now called 'w_handle_contrast'" in caplog.text
    assert "w_inpaint" not in spec.model_dump()
    with pytest.raises(SpecError, match="w_inpaint is the old name of w_handle_contrast"):
        parse_spec(dict(base, w_inpaint=0.7, w_handle_contrast=0.1), base_dir=tmp_path)
    # move keeps its own w_inpaint (the inpainting energy of the vacated area)
    move = parse_spec({"task": "move", "image": "i.png", "mask": "m.png", "offset": [4, 0]},
                      base_dir=tmp_path)
    assert move.w_inpaint == 0.8


def test_every_example_spec_validates():
    from diffeditor.specs import parse_spec

    files = sorted((ROOT / "specs").glob("*.yaml"))  # (specs/edits/: compose's edits)
    assert len(files) >= 7
    for path in files:
        parse_spec(path)


def test_version_is_written_once_and_the_kernel_is_typed():
    import importlib.metadata
    import re

    import diffeditor_tasks

    import diffeditor

    text = (ROOT / "pyproject.toml").read_text()
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"^version\s*=", project, re.M), "the version is diffeditor.__version__"
    assert 'version = { attr = "diffeditor.__version__" }' in text
    assert importlib.metadata.version("diffeditor") == diffeditor.__version__
    assert diffeditor_tasks.__version__ == diffeditor.__version__
    assert (KERNEL / "py.typed").is_file()
    assert 'diffeditor = ["py.typed"]' in text


def private_kernel_imports(path: Path, root: Path = ROOT) -> list[str]:
    """``from diffeditor... import _name`` statements of a file: the kernel's private names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{path.relative_to(root)}:{node.lineno}: {node.module}.{a.name}"
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0
            and (node.module or "").split(".")[0] == "diffeditor"
            for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]


def test_plugins_and_tasks_use_only_the_kernels_public_names():
    """A distribution of its own (plugins/) or a task plugin (tasks/) reaches the kernel through
    public names only, so the kernel can rename its internals without breaking them."""
    files = [p for d in ("tasks", "plugins") for p in sorted((ROOT / d).rglob("*.py"))
             if "build" not in p.parts and "tests" not in p.parts]
    assert len(files) > 20
    found = [hit for p in files for hit in private_kernel_imports(p)]
    assert found == []


def test_a_private_kernel_import_is_found(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("from diffeditor.cli import _run_local\nfrom diffeditor import specs, __version__\n"
                   "from .diffeditor import _local\n")
    assert private_kernel_imports(bad, tmp_path) == ["probe.py:1: diffeditor.cli._run_local"]
